"""`chatretriever answer --k` larger than the index: what each answer read is reported."""

from __future__ import annotations

import json
import logging

from test_rag import _index, _rows, _sessions, models  # noqa: F401 (models: a fixture)

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
