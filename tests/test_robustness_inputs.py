"""Robustness evaluation on awkward inputs: shared first questions, qrels of another dataset,
one context set, flags out of range, and a second system's report beside the first."""

from __future__ import annotations

import json

import pytest
from fakes import HashEncoder
from test_robustness import (
    PASSAGES,
    QRELS,
    ChoosingLLM,
    FakeLLM,
    conversation_sessions,
    hash_retrieve,
)

from chatretriever.cli import main
from chatretriever.io.sessions import write_sessions
from chatretriever.retrieval.robustness.conversations import group_conversations
from chatretriever.retrieval.robustness.evaluation import evaluate_robustness
from chatretriever.retrieval.robustness.generation import RobustnessLLM
from chatretriever.types import Qrel, Session, Turn

pytest.importorskip("ir_measures")


def shared_first_question() -> list[Session]:
    """Two conversations that open with the same question; b goes on, a ends there."""
    hello = Turn("user", "How much is garage door opener repair?")
    return [
        Session("a<::>1", (hello,)),
        Session("b<::>1", (hello,)),
        Session("b<::>2", (hello, Turn("assistant", "100 dollars."), Turn("user", "And new?"))),
    ]


def test_conversations_sharing_a_first_question_keep_every_session() -> None:
    convs = group_conversations(shared_first_question())
    tasks = [step.session.id for c in convs for step in c.steps if step.task]
    assert sorted(tasks) == ["a<::>1", "b<::>1", "b<::>2"]  # none lost to a shared slot
    by_id = {c.id: [step.session.id for step in c.steps] for c in convs}
    assert by_id == {"a<::>1": ["a<::>1"], "b<::>2": ["b<::>1", "b<::>2"]}  # by id prefix


def test_partial_scores_the_same_sessions_as_the_original(tmp_path) -> None:
    qrels = [Qrel(i, "p-garage", 1) for i in ("a<::>1", "b<::>1")] + [Qrel("b<::>2", "p-opener", 1)]
    llm = RobustnessLLM(FakeLLM(), "fake")
    report = evaluate_robustness(
        {"hash": hash_retrieve(HashEncoder())}, shared_first_question(), qrels, PASSAGES, llm,
        tmp_path, modes=("partial",),
    )  # fmt: skip
    forms = report["systems"]["hash"]["partial"]["query_forms"]
    assert sum(forms.values()) == 3  # every evaluated turn replayed, so Diff compares like sets
    assert report["systems"]["hash"]["partial"]["diff"] == pytest.approx(0.0)


def test_qrels_of_other_sessions_stop_before_any_generation(tmp_path) -> None:
    fake = FakeLLM()
    llm = RobustnessLLM(fake, "fake")
    with pytest.raises(ValueError, match="judgment"):
        evaluate_robustness(
            {"hash": hash_retrieve(HashEncoder())}, conversation_sessions(),
            [Qrel("other<::>1", "p-nba", 1)], PASSAGES, llm, tmp_path,
        )  # fmt: skip
    assert fake.calls == []  # failed fast: not after writing every context and response
    assert not list(tmp_path.iterdir())


def test_one_context_set_has_no_sd(tmp_path) -> None:
    llm = RobustnessLLM(FakeLLM(), "fake")
    report = evaluate_robustness(
        {"hash": hash_retrieve(HashEncoder())}, conversation_sessions(), QRELS, PASSAGES, llm,
        tmp_path, n_contexts=1, modes=("full",),
    )  # fmt: skip
    assert report["systems"]["hash"]["full"]["sd"] is None  # not 0.0: one draw shows no spread


@pytest.fixture
def files(tmp_path, monkeypatch):
    pytest.importorskip("bm25s")
    fake = ChoosingLLM("unreasonable")
    from chatretriever.retrieval.robustness import hf_generator

    monkeypatch.setattr(hf_generator, "hf_batch_generator", lambda *a: fake)
    corpus = "".join(json.dumps({"_id": i, "text": t}) + "\n" for i, t in PASSAGES.items())
    (tmp_path / "corpus.jsonl").write_text(corpus)
    write_sessions(tmp_path / "sessions.jsonl", conversation_sessions())
    qrels = "".join(f"{q.query_id} 0 {q.doc_id} {q.relevance}\n" for q in QRELS)
    (tmp_path / "qrels.txt").write_text(qrels)
    base = [
        "robustness", "--sessions", str(tmp_path / "sessions.jsonl"), "--qrels",
        str(tmp_path / "qrels.txt"), "--bm25", str(tmp_path / "corpus.jsonl"),
        "--out", str(tmp_path / "rob"), "--contexts", "2",
    ]  # fmt: skip
    return tmp_path, base, fake


def test_cli_qrels_judging_none_of_the_sessions_names_the_file(files, capsys) -> None:
    d, base, fake = files
    (d / "other.txt").write_text("zz<::>1 0 p-nba 1\n")
    argv = [*base]
    argv[argv.index("--qrels") + 1] = str(d / "other.txt")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{d / 'other.txt'}: judges none of the 3 sessions" in err and "Traceback" not in err
    assert fake.calls == [] and not (d / "rob").exists()


@pytest.mark.parametrize(
    ("flag", "value"), [("--temperature", "nan"), ("--max-retries", "-1"), ("--k", "0")]
)
def test_cli_refuses_out_of_range_flags_naming_them(files, capsys, flag, value) -> None:
    _, base, fake = files
    assert main([*base, flag, value]) == 2
    assert flag in capsys.readouterr().err and fake.calls == []


def test_cli_second_system_keeps_the_first_systems_row(files, capsys) -> None:
    d, base, _ = files
    assert main([*base, "--formulation", "last_turn"]) == 0
    assert main([*base, "--formulation", "all_user_turns"]) == 0
    report = json.loads((d / "rob" / "robustness.json").read_text())
    assert list(report["systems"]) == ["bm25.last_turn", "bm25.all_user_turns"]
    assert main([*base, "--formulation", "last_turn", "--contexts", "3"]) == 0  # other settings
    report = json.loads((d / "rob" / "robustness.json").read_text())
    assert list(report["systems"]) == ["bm25.last_turn"]
    assert "SD" in capsys.readouterr().out


def test_cli_one_context_set_prints_no_sd(files, capsys) -> None:
    _, base, _ = files
    assert main([*base, "--contexts", "1", "--modes", "full"]) == 0
    assert "SD n/a" in capsys.readouterr().out


def test_benchmark_table_shows_no_sd_for_one_context_set() -> None:
    from test_benchmarks import load_benchmark

    rob = load_benchmark("robustness")
    row = {"original": 0.5, "full": {"mean": 0.4, "sd": None, "per_seed": {"0": 0.4}}}
    lines = rob.table({"systems": {"bm25": {**row, "seconds": 1.0}}}).splitlines()
    assert lines[-1].startswith("| bm25 | 50.0 | - | - | 40.0 | - |")
