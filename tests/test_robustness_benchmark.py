"""benchmarks/robustness.py end to end on the tiny MTRAG fixture, with fakes (LLM and encoders)."""

from __future__ import annotations

import json

import pytest
from test_benchmarks import load_benchmark, loads, mtrag  # noqa: F401 (fixtures)
from test_robustness import ChoosingLLM

from chatretriever.modeling.precision import dtype_name

pytest.importorskip("bm25s")
pytest.importorskip("ir_measures")


def test_robustness_benchmark_table_json_plot_and_cached_rerun(
    mtrag,  # noqa: F811
    loads,  # noqa: F811
    tmp_path,
    monkeypatch,
    capsys,
) -> None:
    rob = load_benchmark("robustness")
    fake = ChoosingLLM("unreasonable")
    from chatretriever.retrieval.robustness import hf_generator

    monkeypatch.setattr(hf_generator, "hf_batch_generator", lambda *a: fake)
    monkeypatch.setattr(rob.runs.backends, "have_faiss", lambda: False)  # numpy search path
    convs = tmp_path / "convs.txt"
    convs.write_text("cA\ncB\n")
    out = tmp_path / "out"
    argv = [
        "--data", str(mtrag), "--out", str(out), "--eval-conversations", str(convs),
        "--dense", "fake:hash", "--model", "csit=fake:csit", "--rewrite-dense", "fake:hash",
        "--generator", "fake-llm", "--contexts", "3", "--chunk-size", "4", "--k", "5",
    ]  # fmt: skip
    assert rob.main(argv) == 0
    summary = json.loads((out / "robustness.json").read_text())
    names = list(summary["systems"])
    assert names == [
        "bm25.last_turn",
        "bm25.all_user_turns",
        "bm25.llm_rewrite",
        "fake_hash.llm_rewrite",
        "fake_hash.last_turn",
        "fake_hash.all_user_turns",
        "csit.session",
        "fake_hash.all_user_turns_bm25.last_turn.rrf",
        "csit.session_bm25.last_turn.rrf",
    ]
    for row in summary["systems"].values():
        assert len(row["full"]["per_seed"]) == 3 and "diff" in row["partial"]
        # turn 2 of cA is judged unreasonable and has no human rewrite: the LLM rewrite is asked
        assert row["partial"]["query_forms"] == {"original": 2, "llm_rewrite": 1}
    assert summary["judged_turns"] == 3 and summary["generator"] == "fake-llm"
    md = (out / "robustness.md").read_text()
    assert "| csit.session |" in md and "full SD" in md
    # the judge chose by likelihood (the fake scores): one verdict per system (cA's turn 2),
    # scored afresh only where a system's modified history is new
    judged = summary["llm"]["choices"]["judge"]
    assert judged == {"unreasonable": len(names)} and "'unreasonable': 9" in md
    assert 1 <= summary["llm"]["scored"] <= len(names)
    assert not any("reasonable or unreasonable" in u for u, _ in fake.calls)
    assert summary["generation"]["dtype"] == dtype_name("auto")  # as this machine resolves it
    # the judge check runs on training conversations: the fixture's are all evaluated
    assert summary["judge_check"] == {"skipped": "the judge check needs two sessions with history"}
    assert "Judge check skipped" in md
    assert (out / "robustness.png").stat().st_size > 0
    assert len(list(out.glob("partial.*.jsonl"))) == 9 and (out / "full.seed2.jsonl").exists()
    calls = len(fake.calls)
    assert rob.main(argv) == 0
    assert len(fake.calls) == calls  # a rerun makes no LLM call
    again = json.loads((out / "robustness.json").read_text())
    assert again["llm"]["generated"] == 0
    assert {k: v["full"] for k, v in again["systems"].items()} == {
        k: v["full"] for k, v in summary["systems"].items()
    }


def test_robustness_benchmark_limits_conversations(mtrag, tmp_path) -> None:  # noqa: F811
    rob = load_benchmark("robustness")
    args = rob.parse_args(
        ["--data", str(mtrag), "--eval-conversations", "", "--limit-conversations", "1"]
    )
    sessions, qrels, corpus = rob.load_data(args)
    assert [s.id for s in sessions] == ["cA<::>1", "cA<::>2"]
    assert {q.query_id for q in qrels} == {
        "cA<::>1",
        "cA<::>2",
    } and corpus.name == "corpus.jsonl.gz"


@pytest.mark.parametrize("temperature", ["-1", "nan"])
def test_robustness_benchmark_refuses_a_negative_temperature(temperature, capsys) -> None:
    rob = load_benchmark("robustness")
    with pytest.raises(SystemExit) as stop:
        rob.parse_args(["--temperature", temperature])
    assert stop.value.code == 2 and "--temperature" in capsys.readouterr().err
