"""A file given where another kind is read is refused naming what it holds (io/kinds.py), and a
file of the right kind keeps its reader's own error (its line and field)."""

from __future__ import annotations

import json

import pytest
from fixtures import write

from chatretriever.errors import DataFormatError
from chatretriever.io.conversations import read_conversations
from chatretriever.io.corpus import read_corpus
from chatretriever.io.kinds import told_kind
from chatretriever.io.trec import read_qrels, read_run

SESSION = {"id": "s1", "messages": [{"role": "user", "content": "where do penguins live"}]}
KNOWLEDGE = {"hotel": {"20": {"name": "H", "reviews": {"9": {"sentences": {"4": "Clean."}}}}}}
RUN = "s1 Q0 d1 1 2.5 bm25\ns1 Q0 d2 2 1.5 bm25\n"
QRELS = "s1 0 d1 1\n"


@pytest.fixture
def files(tmp_path):
    return {
        "sessions": write(tmp_path / "sessions.jsonl", json.dumps(SESSION) + "\n"),
        "knowledge": write(tmp_path / "knowledge.json", json.dumps(KNOWLEDGE, indent=1)),
        "run": write(tmp_path / "bm25.trec", RUN),
        "qrels": write(tmp_path / "test.qrels", QRELS),
    }


@pytest.mark.parametrize(
    "reader, given, message",
    [
        (read_corpus, "sessions", "holds sessions data, not a corpus (`--sessions` reads it)"),
        (read_corpus, "knowledge", "holds dstc-knowledge data, not a corpus (`chatretriever data "
                                   "corpus FILE --out corpus.jsonl` writes it as a corpus)"),
        (read_qrels, "run", "holds trec-run data, not qrels (`evaluate RUN QRELS` takes it first)"),
        (read_qrels, "sessions", "holds sessions data, not qrels (`--sessions` reads it)"),
        (read_run, "qrels", "holds trec-qrels data, not a run (`evaluate RUN QRELS` takes it "
                            "second)"),
        (read_conversations, "knowledge", "holds dstc-knowledge data, not conversations "
                                          "(`chatretriever data corpus FILE --out corpus.jsonl` "
                                          "writes it as a corpus)"),
    ],
)  # fmt: skip
def test_another_kind_of_file_is_named(files, reader, given, message):
    with pytest.raises(DataFormatError) as e:
        reader(files[given])
    assert str(e.value) == f"{files[given]}: {message}"


def test_a_file_of_the_right_kind_keeps_its_own_error(tmp_path):
    corpus = [{"_id": f"d{i}", "text": f"passage {i}"} for i in range(4)] + [{"_id": "d9"}]
    bad = write(tmp_path / "corpus.jsonl", "".join(json.dumps(r) + "\n" for r in corpus))
    with pytest.raises(DataFormatError, match=r"corpus.jsonl:5: field 'text': missing"):
        read_corpus(bad)
    first = write(tmp_path / "first.jsonl", '{"_id": "d1", "title": "T"}\n{"_id": "d2"}\n')
    with pytest.raises(DataFormatError, match=r"first.jsonl:1: field 'text': missing"):
        read_corpus(first)  # told as a corpus (it has a title): the reader's own words
    qrels = write(tmp_path / "q.txt", "q1 0 d1 1\nq1 0 d2 x\n")
    with pytest.raises(DataFormatError, match=r"q.txt:2: field 'relevance': not a number"):
        read_qrels(qrels)


def test_told_kind(files, tmp_path):
    assert told_kind(files["knowledge"]) == "dstc-knowledge"
    assert told_kind(files["run"]) == "trec-run"
    assert told_kind(write(tmp_path / "odd.bin", "\x00\x01 nothing known")) is None
    assert told_kind(tmp_path / "absent.jsonl") is None
