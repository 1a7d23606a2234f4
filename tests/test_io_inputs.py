"""Text a reader cannot use is one error naming the file, the line and the field."""

from __future__ import annotations

import json

import pytest

from chatretriever.cli import main
from chatretriever.errors import DataFormatError
from chatretriever.io.corpus import read_corpus
from chatretriever.io.files import read_json
from chatretriever.io.sessions import read_sessions

GOOD = {"id": "x", "messages": [{"role": "user", "content": "jaguar diet"}]}
LONE = '{"id": "y", "messages": [{"role": "user", "content": "jaguar \\ud800 diet"}]}\n'


def test_a_lone_surrogate_escape_names_its_line_and_field(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + LONE)
    with pytest.raises(DataFormatError, match=r"s\.jsonl:2.*messages\[0\]\.content.*surrogate"):
        read_sessions(path)
    pair = '{"id": "z", "messages": [{"role": "user", "content": "smile \\ud83d\\ude00"}]}\n'
    path.write_text(pair)  # a surrogate PAIR is a valid escape (an emoji): read as it is
    assert read_sessions(path)[0].question == "smile \U0001f600"
    doc = tmp_path / "d.json"
    doc.write_text('{"a": [\n "ok",\n "bad \\udc00"\n]}')
    with pytest.raises(DataFormatError, match=r"d\.json:3.*a\[1\].*surrogate"):
        read_json(doc)


def test_a_byte_order_mark_is_read_through(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text(json.dumps(GOOD) + "\n", encoding="utf-8-sig")
    assert [s.id for s in read_sessions(path)] == ["x"]
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"_id": "p", "title": "t", "text": "x"}\n', encoding="utf-8-sig")
    assert [p.id for p in read_corpus(corpus)] == ["p"]


def test_text_that_is_not_utf8_names_its_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    lines = [json.dumps(GOOD), '{"id": "y", "messages": [{"role": "user", "content": "café"}]}']
    path.write_bytes("\n".join(lines).encode("latin-1"))
    with pytest.raises(DataFormatError, match=r"latin1\.jsonl:2.*byte 0xe9 at column"):
        read_sessions(path)
    from chatretriever.io.conversations import read_conversations

    with pytest.raises(DataFormatError, match=r"latin1\.jsonl:2.*byte 0xe9"):
        read_conversations(path)  # format guessing reads the head first: the same message


def test_the_line_named_is_the_lone_surrogates_not_an_earlier_pair(tmp_path):
    doc = tmp_path / "d.json"
    doc.write_text('{"a": "\\ud83d\\ude00",\n"b": "x",\n"c": "\\ud800"}')
    with pytest.raises(DataFormatError, match=r"d\.json:3: field 'c'"):
        read_json(doc)
    key = tmp_path / "k.jsonl"
    key.write_text('{"\\ud800k": 1}\n')
    with pytest.raises(DataFormatError, match=r"k\.jsonl:1: field '\\ud800k \(its name\)'"):
        read_sessions(key)


def _bm25_search(tmp_path, sessions: str, out) -> int:
    """`search --bm25` of a one-passage corpus for the given sessions JSONL text."""
    pytest.importorskip("bm25s")
    (tmp_path / "c.jsonl").write_text('{"_id": "p", "title": "t", "text": "jaguar"}\n')
    (tmp_path / "s.jsonl").write_text(sessions)
    corpus, queries = str(tmp_path / "c.jsonl"), str(tmp_path / "s.jsonl")
    return main(["search", "--bm25", corpus, "--sessions", queries, "--out", str(out)])


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_cli_search_of_a_lone_surrogate_is_one_line(tmp_path, capsys):
    assert _bm25_search(tmp_path, LONE, tmp_path / "r.trec") == 2
    err = _one_error_line(capsys)
    assert "s.jsonl:1" in err and "surrogate" in err


def test_ids_that_are_floats_are_refused_integers_read_as_digits(tmp_path):
    path = tmp_path / "s.jsonl"
    msg = {"role": "user", "content": "q"}
    path.write_text(json.dumps({"id": 5, "messages": [msg]}) + "\n")
    assert read_sessions(path)[0].id == "5"  # BEIR files often number their ids
    for bad in ("1.5", "NaN", "true"):
        path.write_text('{"id": ' + bad + ', "messages": [{"role": "user", "content": "q"}]}\n')
        with pytest.raises(DataFormatError, match=r"s\.jsonl:1: field 'id'"):
            read_sessions(path)
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"_id": 1.0, "text": "x"}\n')  # "1.0" would never meet qrels of "1"
    with pytest.raises(DataFormatError, match=r"c\.jsonl:1: field '_id': expected a string or"):
        read_corpus(corpus)
    corpus.write_text('{"_id": "p", "text": NaN}\n')
    with pytest.raises(DataFormatError, match=r"c\.jsonl:1: field 'text': expected str, got nan"):
        read_corpus(corpus)


def test_a_blank_question_is_refused_before_searching(tmp_path, capsys):
    blank = '{"id": "q1", "messages": [{"role": "user", "content": "  "}]}\n'
    assert _bm25_search(tmp_path, blank, tmp_path / "r.trec") == 2
    err = _one_error_line(capsys)  # the reader names the file, line and message
    assert ":1: field 'messages[0]': the current question (the last message) is empty" in err


def test_an_out_of_the_wrong_kind_is_one_line(tmp_path, capsys):
    (tmp_path / "a_dir").mkdir()
    assert _bm25_search(tmp_path, json.dumps(GOOD) + "\n", tmp_path / "a_dir") == 2
    assert "a_dir: is a directory" in _one_error_line(capsys)
    (tmp_path / "file").write_text("x")
    assert _bm25_search(tmp_path, json.dumps(GOOD) + "\n", tmp_path / "file" / "r.trec") == 2
    err = _one_error_line(capsys)
    assert "r.trec: cannot write here" in err and ".tmp" not in err


def test_a_device_or_pipe_is_written_as_a_stream_not_renamed_over(tmp_path):
    import os

    from chatretriever.io.atomic import atomic_write

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # so the writer's open does not block
    try:
        with atomic_write(fifo) as f:
            f.write("q1 Q0 d1 1 1.0 run\n")
        assert os.read(reader, 100) == b"q1 Q0 d1 1 1.0 run\n"
    finally:
        os.close(reader)
    assert not fifo.is_file() and fifo.exists()  # still the pipe, not a file put in its place
