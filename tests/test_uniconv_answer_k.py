"""`chatretriever answer`: what each answer read (`--k` larger than the index) and the budgets it
was generated under (prompts fitted to `max_prompt_tokens`) are reported."""

from __future__ import annotations

import json
import logging

from fixtures import jsonl, write
from test_rag import SESSIONS, _index, _rows, _sessions, models  # noqa: F401 (models: a fixture)

from chatretriever.cli import main


def test_answer_k_beyond_the_index_reports_what_was_read(tmp_path, models, capsys, caplog):  # noqa: F811
    index = _index(tmp_path, "fakeuni:")  # 4 passages
    out = tmp_path / "answers.jsonl"
    argv = ["answer", "--index", str(index), "--sessions", str(_sessions(tmp_path)),
            "--out", str(out), "--k", "10"]  # fmt: skip
    with caplog.at_level(logging.WARNING, "chatretriever.cli.answer"):
        assert main(argv) == 0
    assert {len(r["passages"]) for r in _rows(out)} == {4}
    assert "3 answers by uni (top 4 passages: the index holds fewer than --k 10)" in (
        capsys.readouterr().out
    )
    assert any("each answer read at most 4" in r.getMessage() for r in caplog.records)
    settings = json.loads((tmp_path / "answers.jsonl.settings.json").read_text())
    assert settings["k"] == 10 and settings["passages_read"] == 4
    # --k within the index: as before
    assert main([*argv[:-1], "2"]) == 0
    assert "(top 2 passages)" in capsys.readouterr().out
    assert json.loads((tmp_path / "answers.jsonl.settings.json").read_text())["passages_read"] == 2


def _long_session(i: int) -> dict:
    """A session whose history alone passes the tiny models' context (512 positions)."""
    history = []
    for j in range(30):
        history += [
            {"role": "user", "content": f"old question {j} about jaguars"},
            {"role": "assistant", "content": "jaguars live in the rainforests"},
        ]
    last = {"role": "user", "content": f"what do jaguars eat {i}"}
    return {"id": f"s{i}", "messages": [*history, last]}


def test_answer_settings_record_the_generation_budgets_and_cuts(
    tmp_path,
    tiny_llama_dir,
    models,  # noqa: F811
):
    index = _index(tmp_path, "fake:")
    sessions = write(tmp_path / "long.jsonl", jsonl([_long_session(0), *SESSIONS[:2]]))
    out = tmp_path / "answers.jsonl"
    argv = ["answer", "--index", str(index), "--sessions", str(sessions), "--out", str(out),
            "--generator", str(tiny_llama_dir), "--max-new-tokens", "4", "--k", "2"]  # fmt: skip
    assert main(argv) == 0
    generation = json.loads((tmp_path / "answers.jsonl.settings.json").read_text())["generation"]
    assert generation.pop("history_messages_dropped") > 0  # the long session's oldest turns
    # 1536 + 4 exceed the tiny model's 512 positions: the prompts were fitted to 508 tokens
    assert generation == {
        "max_new_tokens": 4,
        "max_prompt_tokens": 508,
        "max_passage_chars": 1200,
        "prompts": 3,
        "prompts_cut": 1,
        "passages_dropped": 0,
        "passages_shortened": 0,
        "questions_cut": 0,
        "systems_cut": 0,
    }


def test_uniconv_answers_take_the_prompt_budget(tiny_llama_dir):
    from chatretriever.methods.uniconv.model import UniConv

    model = UniConv.from_pretrained(str(tiny_llama_dir), device="cpu", dtype="fp32")
    assert model.answer_report() == {}
    session = _long_session(0)["messages"]
    passages = ["jaguars eat deer capybaras and caimans " * 10] * 3
    answer = model.answer(session, passages, max_new_tokens=3, max_prompt_tokens=300)
    assert isinstance(answer, str)
    report = model.answer_report()
    assert report["max_prompt_tokens"] == 300 and report["max_new_tokens"] == 3
    assert report["prompts"] == 1 and report["prompts_cut"] == 1
    assert report["history_messages_dropped"] == 60  # the passages come first
    model.answer_batch([(session, passages[:1])] * 2, max_new_tokens=3, max_passage_chars=50)
    report = model.answer_report()  # budgets of the last call, counts of every call
    assert report["max_prompt_tokens"] == 512 - 3 and report["max_passage_chars"] == 50
    assert report["prompts"] == 3 and report["prompts_cut"] == 3
