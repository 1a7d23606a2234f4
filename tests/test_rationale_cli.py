"""The `rerank`, `esconv-tasks` and `rerank-train` commands on fixtures and tiny models."""

from __future__ import annotations

import json
from pathlib import Path

from chatretriever.cli import main
from chatretriever.io.sessions import write_sessions
from chatretriever.io.training import read_training_examples
from chatretriever.io.trec import read_run
from chatretriever.types import Session, Turn

CORPUS = [
    {"_id": "d1", "title": "Question", "text": "ask the seeker about it"},
    {"_id": "d2", "text": "give advice"},
    {"_id": "d3", "text": "share your own story"},
]
RUN = "q1 Q0 d1 1 3.0 bm25\nq1 Q0 d2 2 2.0 bm25\nq1 Q0 d3 3 1.0 bm25\nq2 Q0 d3 1 9.0 bm25\n"
DIALOG = {"dialog": [{"text": "I am sad.", "speaker": "usr"},
                     {"text": "Why?", "speaker": "sys", "strategy": "Question"},
                     {"text": "Work.", "speaker": "usr"},
                     {"text": "That is hard.", "speaker": "sys",
                      "strategy": "Reflection of feelings"}]}  # fmt: skip


def write_esconv_split(root: Path, train: list[int], evals: list[int]) -> Path:
    """A tiny ESConv directory (root/esconv/multiesc_valid.txt: DIALOG once per id) and a split
    file whose `data_dir` points at it (so `--split` alone finds the data).

    Args:
        root: Where both go.
        train, evals: The dialog ids (0-based lines) of each part; each dialog has two
            supporter turns, so two task queries.

    Returns:
        The split file, root/split.json.
    """
    data = root / "esconv"
    data.mkdir()
    (data / "multiesc_valid.txt").write_text((json.dumps(DIALOG) + "\n") * (max(train + evals) + 1))
    split = {"data_dir": str(data), "train": {"multiesc_valid.txt": train},
             "eval": {"multiesc_valid.txt": evals}}  # fmt: skip
    (root / "split.json").write_text(json.dumps(split))
    return root / "split.json"


def _files(tmp_path):
    (tmp_path / "corpus.jsonl").write_text("\n".join(json.dumps(c) for c in CORPUS) + "\n")
    sessions = [
        Session("q1", (Turn("user", "i failed my exam"),)),
        Session("q2", (Turn("user", "hi"), Turn("assistant", "hello"), Turn("user", "sad"))),
    ]
    write_sessions(tmp_path / "sessions.jsonl", sessions)
    (tmp_path / "run.txt").write_text(RUN)
    return [
        "--corpus",
        str(tmp_path / "corpus.jsonl"),
        "--sessions",
        str(tmp_path / "sessions.jsonl"),
    ]


def test_rerank_command(tmp_path, tiny_qwen2_dir, capsys):
    common = _files(tmp_path) + ["--model", str(tiny_qwen2_dir), "--k", "2"]
    out = tmp_path / "reranked.txt"
    assert main(["rerank", "--run", str(tmp_path / "run.txt"), "--out", str(out), *common]) == 0
    assert "reranked 2 queries (3 lines)" in capsys.readouterr().out
    run = read_run(out)
    assert set(run.scores["q1"]) == {"d1", "d2"} and set(run.scores["q2"]) == {"d3"}
    assert run.name == "bm25.rahore"
    settings = json.loads((tmp_path / "reranked.txt.settings.json").read_text())
    assert settings["kv_reuse"] is True and settings["k"] == 2 and settings["wording"] == "ab"
    plain = tmp_path / "plain.txt"
    args = ["rerank", "--run", str(tmp_path / "run.txt"), "--out", str(plain), "--no-kv-reuse"]
    assert main([*args, "--wording", "ab", *common]) == 0
    other = read_run(plain)
    for q, docs in run.scores.items():
        for d, v in docs.items():
            assert abs(v - other.scores[q][d]) < 1e-4


def test_rerank_bad_inputs_name_the_file(tmp_path, tiny_qwen2_dir, capsys):
    common = _files(tmp_path) + ["--model", str(tiny_qwen2_dir)]
    (tmp_path / "bad.txt").write_text("q1 Q0 d9 1 3.0 bm25\n")
    code = main(
        ["rerank", "--run", str(tmp_path / "bad.txt"), "--out", str(tmp_path / "o"), *common]
    )
    err = capsys.readouterr().err
    assert code == 2 and "bad.txt:1" in err and "'d9'" in err
    code = main(["rerank", "--run", str(tmp_path / "run.txt"), "--out", "o", "--k", "0", *common])
    assert code == 2 and "--k must be positive" in capsys.readouterr().err


def test_esconv_tasks_default_split_is_the_packaged_one(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no checkout around, no ../shared/data/esconv
    assert main(["esconv-tasks", "--out", "o"]) == 2
    err = capsys.readouterr().err
    # the shipped split was read (from the package); the data it names is what is missing
    assert "ESConv data directory ../shared/data/esconv" in err and "--data-dir" in err
    assert not (tmp_path / "o").exists()


def test_esconv_tasks_and_train_dry_run(tmp_path, capsys):
    split = write_esconv_split(tmp_path, train=[0, 1], evals=[2])
    data = (tmp_path / "esconv").rename(tmp_path / "moved")  # found through --data-dir only
    out = tmp_path / "tasks"
    args = ["esconv-tasks", "--split", str(split), "--data-dir", str(data)]
    assert main([*args, "--out", str(out), "--negatives", "2"]) == 0
    assert "4 queries" in capsys.readouterr().out
    qrels = (out / "strategy" / "eval" / "qrels.txt").read_text().splitlines()
    assert qrels == ["multiesc-2_1 0 question 1", "multiesc-2_3 0 reflection 1"]
    pairs = (out / "strategy" / "train" / "pairs.jsonl").read_text().splitlines()
    assert len(pairs) == 4 * 3 and sum(json.loads(p)["relevant"] for p in pairs) == 4
    examples = read_training_examples(out / "strategy" / "train" / "contrastive.jsonl")
    assert [e.positives[0].id for e in examples] == ["question", "reflection"] * 2
    assert all(len(e.negatives) == 7 for e in examples)
    responses = read_training_examples(out / "response" / "train" / "contrastive.jsonl")
    assert len(responses) == 4 and responses[0].positives[0].text == "Why?"
    corpus = (out / "response" / "eval" / "corpus.jsonl").read_text().splitlines()
    assert [json.loads(c)["_id"] for c in corpus] == ["multiesc-2_1-r", "multiesc-2_3-r"]
    recipe = str(Path(__file__).parents[1] / "configs" / "rationale-dpo.yaml")
    assert main(["rerank-train", recipe, "--dry-run", "--set", "dpo.beta=0.2"]) == 0
    printed = capsys.readouterr().out
    assert "objective: dpo" in printed and "beta: 0.2" in printed and "rationale-dpo" in printed


def _benchmark():
    import importlib.util

    path = Path(__file__).parents[1] / "benchmarks" / "rationale.py"
    spec = importlib.util.spec_from_file_location("rationale_benchmark", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_cost_benchmark_smoke(tmp_path, tiny_llama_dir, capsys):
    bench = _benchmark()
    split = write_esconv_split(tmp_path, train=[0], evals=[1, 2])  # 4 eval queries, no ../shared
    args = ["cost", "--model", str(tiny_llama_dir), "--candidates", "3", "2", "--doc-tokens", "8",
            "--max-full-candidates", "2", "--split", str(split)]  # fmt: skip
    out = tmp_path / "out"
    assert bench.main([*args, "--queries", "1", "--out", str(out)]) == 0
    result = json.loads((out / "cost.json").read_text())
    assert [(r["doc_tokens"], r["candidates"]) for r in result["rows"]] == [(8, 2), (8, 3)]
    # No reuse runs up to --max-full-candidates only; the other two at every size.
    assert [r["full"] is not None for r in result["rows"]] == [True, False]
    assert result["rows"][0]["full"] > 0
    assert all(r["kv_reuse"] > 0 and r["student"] > 0 for r in result["rows"])
    assert list(result["offline_seconds"]) == ["8"]
    assert set(result["offline_seconds"]["8"]) == {"kv_caches", "student_states"}
    assert result["settings"]["split"] == str(split)
    # a split of one's own is read with its own data_dir (the fixture), not ../shared/data's
    assert result["settings"]["data_dir"] is None
    assert (out / "cost.png").read_bytes()[:4] == b"\x89PNG"
    md = (out / "cost.md").read_text()
    assert "| 8 | 2 | " in md and "| 8 | 3 | - |" in md
    assert md in capsys.readouterr().out
    # more candidates than supporter turns would time empty documents: refused, exit 2
    import pytest

    with pytest.raises(SystemExit, match="--candidates up to 50 needs as many supporter turns"):
        bench.main([*args[:4], "50", *args[6:], "--queries", "1", "--out", str(tmp_path / "o2")])


def test_benchmark_reranker_and_student_rows_parse(tmp_path, capsys):
    import pytest

    bench = _benchmark()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a, b = f"{tmp_path / 'a'}", f"{tmp_path / 'b'}"
    args = bench.parse_args(["quality", "--reranker", f"sft={a}", "--reranker", f"dpo={b}",
                             "--student", f"s1={a}", "--dense", f"bi={b}"])  # fmt: skip
    assert args.dense == [("bi", str(tmp_path / "b"))]
    assert args.reranker == [("sft", str(tmp_path / "a")), ("dpo", str(tmp_path / "b"))]
    assert args.student == [("s1", str(tmp_path / "a"))]
    plain = bench.parse_args(["quality"])
    assert plain.reranker == [] and plain.student == [] and plain.dense == []
    assert plain.adapter is None
    bad = [
        (["--student", str(tmp_path / "a")], "expected NAME=DIR"),
        (["--reranker", f"={tmp_path / 'a'}"], "expected NAME=DIR"),
        (["--student", "s="], "expected NAME=DIR"),
        (["--student", f"s={tmp_path / 'none'}"], "is not a directory"),
        (["--reranker", f"x={tmp_path / 'a'}", "--student", f"x={tmp_path / 'b'}"], "unique"),
        (["--student", f"bm25={tmp_path / 'a'}"], "not a baseline's"),
        (["--dense", f"s={tmp_path / 'a'}", "--student", f"s={tmp_path / 'b'}"], "unique"),
        (["--dense", f"minilm-l6={tmp_path / 'a'}"], "not a baseline's"),
        (["--reranker", f"rahore-zeroshot-ab={tmp_path / 'a'}"], "unique"),
    ]
    for argv, message in bad:
        with pytest.raises(SystemExit) as e:
            bench.parse_args(["quality", *argv])
        assert e.value.code == 2 and message in capsys.readouterr().err, argv
    # --skip-reranker frees the default reranker's name
    args = bench.parse_args(["quality", "--skip-reranker", "--reranker",
                             f"rahore-zeroshot-ab={tmp_path / 'a'}"])  # fmt: skip
    assert args.reranker == [("rahore-zeroshot-ab", str(tmp_path / "a"))]


def test_benchmark_student_rows_and_their_timing(tmp_path, tiny_llama_dir):
    import torch

    from chatretriever.methods.rationale.distill import Predictor, PredictorConfig, save_predictor
    from chatretriever.methods.rationale.distill_recipe import DistillConfig
    from chatretriever.methods.rationale.student import RabtrieverStudent
    from chatretriever.modeling.recipe import save_recipe
    from chatretriever.types import Passage

    bench = _benchmark()
    out = tmp_path / "student"  # a saved student: its recipe and an (untrained) predictor
    config = {"model": str(tiny_llama_dir), "output_dir": str(out), "max_document_tokens": 16,
              "data": {"files": [{"path": "pairs.jsonl"}]}}  # fmt: skip
    save_recipe(DistillConfig.from_dict(config), out)
    torch.manual_seed(0)
    save_predictor(Predictor(PredictorConfig(hidden=32)), out)
    sessions = [Session("q1", (Turn("user", "i failed my exam"),)),
                Session("q2", (Turn("user", "hi"), Turn("user", "sad")))]  # fmt: skip
    docs = [Passage(c["_id"], c["text"], title=c.get("title", "")) for c in CORPUS]
    rows = bench.student_runs(str(out), "s", sessions, {"a": (docs, 2), "b": (docs[:1], 5)}, 2)
    student = RabtrieverStudent.from_pretrained(out, device="cpu")
    expected = student.score(
        student.query_states(sessions),
        student.document_states([bench.passage_text(d) for d in docs]),
    )  # (2, 3)
    run, timing = rows["a"]
    assert run.name == "s" and set(run.scores) == {"q1", "q2"}
    for i, q in enumerate(("q1", "q2")):
        best = [docs[j].id for j in torch.argsort(-expected[i], stable=True)[:2].tolist()]
        assert sorted(run.scores[q]) == sorted(best)  # the top 2 of the student's scores
        for d, v in run.scores[q].items():
            assert abs(v - expected[i, [x.id for x in docs].index(d)].item()) < 1e-5
    assert set(rows["b"][0].scores["q1"]) == {"d1"}  # depth 5, one candidate
    assert timing["queries"] == 2 and timing["seconds"] > 0 and "document_states_s" in timing
    result = {"environment": {"command": "x", "cpu_model": "c", "cpu_count": 1,
                              "loadavg_1_5_15": []},
              "rerank_queries": 2, "response_candidates": 3,
              "strategy": {"s": {"queries": 2, **{m: 0.5 for m in bench.MEASURES}}},
              "strategy_subset": {}, "response": {},
              "timing": {"strategy": {"s": timing}}}  # fmt: skip
    md = bench.quality_markdown(result)
    assert "| s | 2 | 50.0 |" in md and f"- s: {timing['seconds']} s for 2 queries" in md


def test_benchmark_reranks_the_response_first_stage(tiny_llama_dir):
    import argparse

    from chatretriever.methods.rationale.reranker import BinaryChoiceReranker
    from chatretriever.types import Passage, Run

    bench = _benchmark()
    docs = [Passage(c["_id"], c["text"], title=c.get("title", "")) for c in CORPUS]
    sessions = [Session("q1", (Turn("user", "i failed my exam"),)),
                Session("q2", (Turn("user", "hi"), Turn("user", "sad")))]  # fmt: skip
    first = Run({"q1": {"d1": 3.0, "d2": 2.0, "d3": 1.0}, "q2": {"d3": 9.0, "d1": 1.0}}, "first")
    args = argparse.Namespace(model=str(tiny_llama_dir), wording="ab", batch_size=2,
                              max_query_tokens=48, rerank_response=2)  # fmt: skip
    run, timing = bench.response_rerank_run(first, sessions, docs, args, None, "rr")
    assert run.name == "rr" and timing["queries"] == 2
    assert set(run.scores["q1"]) == {"d1", "d2"} and set(run.scores["q2"]) == {"d3", "d1"}
    rr = BinaryChoiceReranker.from_pretrained(str(tiny_llama_dir), batch_size=2,
                                              max_query_tokens=48)  # fmt: skip
    text = {d.id: bench.passage_text(d) for d in docs}
    for q, s in zip(("q1", "q2"), sessions, strict=True):
        ids = sorted(run.scores[q])
        expected = rr.score_pairs([text[d] for d in ids], [s] * len(ids))
        got = [run.scores[q][d] for d in ids]
        assert max(abs(a - b) for a, b in zip(got, expected, strict=True)) < 1e-4
    import pytest

    with pytest.raises(SystemExit):
        bench.parse_args(["quality", "--rerank-response", "-1"])


def test_benchmark_refuses_a_missing_builtin_before_any_work(monkeypatch, capsys):
    import pytest

    from chatretriever.modeling.sources import BUILTIN_MODELS, ShippedDir

    bench = _benchmark()
    info = BUILTIN_MODELS["mpnet-base"]
    monkeypatch.setitem(
        BUILTIN_MODELS, "mpnet-base", type(info)(**{**vars(info), "source": ShippedDir("nowhere")})
    )
    with pytest.raises(SystemExit) as e:
        bench.parse_args(["quality", "--mpnet"])
    assert e.value.code == 2 and "mpnet-base is not installed" in capsys.readouterr().err
