from __future__ import annotations

import gzip
import json

import pytest

from chatretriever.errors import DataFormatError
from chatretriever.io.training import (
    TrainingExample,
    TrainingPassage,
    example_from_session,
    iter_training_examples,
    normalized_text,
    passage_keys,
    read_training_examples,
    write_training_examples,
)
from chatretriever.types import Passage, Session, Turn


def _example(eid: str = "q1", target: str | None = "Paris.") -> TrainingExample:
    return TrainingExample(
        id=eid,
        messages=(
            Turn("user", "capital of france?"),
            Turn("assistant", "Paris."),
            Turn("user", "and of italy?"),
        ),
        positives=(TrainingPassage("Rome is the capital of Italy.", id="d1", title="Rome"),),
        negatives=(TrainingPassage("Milan is in Italy."), TrainingPassage("Oslo.", id="d9")),
        target=target,
        source="unit",
        metadata={"conversation_id": "c1"},
    )


_ANSWER = {"role": "assistant", "content": "a"}


def _good() -> dict:
    return {
        "id": "q1",
        "messages": [{"role": "user", "content": "hi?"}],
        "positives": [{"id": "d1", "text": "hello"}],
        "negatives": [{"text": "bye"}],
        "target": None,
        "source": "x",
    }


def _write_lines(path, rows) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def test_round_trip_plain_and_gzip(tmp_path):
    examples = [_example("q1"), _example("q2", target=None)]
    for name in ("train.jsonl", "train.jsonl.gz"):
        path = tmp_path / name
        assert write_training_examples(path, examples) == 2
        assert read_training_examples(path) == examples
    with gzip.open(tmp_path / "train.jsonl.gz", "rt") as f:
        first = json.loads(f.readline())
    rome = {"id": "d1", "title": "Rome", "text": "Rome is the capital of Italy."}
    assert first["positives"] == [rome]
    assert first["negatives"][0] == {"text": "Milan is in Italy."}
    assert first["target"] == "Paris." and first["source"] == "unit"
    assert [m["role"] for m in first["messages"]] == ["user", "assistant", "user"]


def test_target_text_falls_back_to_first_positive():
    assert _example(target="Paris.").target_text == "Paris."
    assert _example(target=None).target_text == "Rome is the capital of Italy."


def test_optional_fields_default(tmp_path):
    path = tmp_path / "t.jsonl"
    row = {"id": 7, "messages": [{"role": "user", "content": "q"}], "positives": [{"text": "p"}]}
    _write_lines(path, [row])
    (ex,) = read_training_examples(path)
    assert ex.id == "7" and ex.negatives == () and ex.target is None and ex.source == ""
    assert ex.positives == (TrainingPassage("p"),)


def test_extra_keys_go_to_metadata(tmp_path):
    path = tmp_path / "t.jsonl"
    _write_lines(path, [{**_good(), "domain": "fiqa", "metadata": {"a": 1}}])
    (ex,) = read_training_examples(path)
    assert ex.metadata == {"a": 1, "domain": "fiqa"}


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"id": None}, "id"),
        ({"id": ""}, "id"),
        ({"messages": []}, "messages"),
        ({"messages": "hi"}, "messages"),
        ({"messages": [{"role": "bot", "content": "x"}]}, "messages[0]"),
        ({"messages": [{"role": "user", "content": 3}]}, "messages[0]"),
        ({"messages": [{"role": "user", "content": "q"}, _ANSWER]}, "messages"),
        ({"positives": []}, "positives"),
        ({"positives": {"text": "p"}}, "positives"),
        ({"positives": ["p"]}, "positives[0]"),
        ({"positives": [{"id": "d"}]}, "positives[0].text"),
        ({"positives": [{"text": "  "}]}, "positives[0].text"),
        ({"positives": [{"text": "p", "title": 3}]}, "positives[0].title"),
        ({"positives": [{"text": "p", "id": [1]}]}, "positives[0].id"),
        ({"negatives": None}, "negatives"),
        ({"negatives": [{"text": 1}]}, "negatives[0].text"),
        ({"target": 5}, "target"),
        ({"source": None}, "source"),
        ({"metadata": [1]}, "metadata"),
    ],
)
def test_bad_field_names_file_line_field(tmp_path, change, field):
    path = tmp_path / "bad.jsonl"
    _write_lines(path, [_good() | {"id": "ok"}, _good() | change])
    with pytest.raises(DataFormatError) as err:
        read_training_examples(path)
    assert (err.value.path, err.value.line, err.value.field) == (str(path), 2, field)


@pytest.mark.parametrize("missing", ["id", "messages", "positives"])
def test_missing_required_field(tmp_path, missing):
    path = tmp_path / "bad.jsonl"
    row = _good()
    del row[missing]
    _write_lines(path, [row])
    with pytest.raises(DataFormatError) as err:
        read_training_examples(path)
    assert (err.value.line, err.value.field) == (1, missing)
    assert "missing" in err.value.message


@pytest.mark.parametrize("line", ["{not json", "[1, 2]"])
def test_malformed_line(tmp_path, line):
    path = tmp_path / "bad.jsonl"
    _write_lines(path, [_good(), "", line])
    with pytest.raises(DataFormatError) as err:
        read_training_examples(path)
    assert err.value.line == 3 and err.value.path == str(path)


def test_duplicate_id_and_missing_file(tmp_path):
    path = tmp_path / "dup.jsonl"
    _write_lines(path, [_good(), _good()])
    with pytest.raises(DataFormatError) as err:
        read_training_examples(path)
    assert (err.value.line, err.value.field) == (2, "id")
    with pytest.raises(DataFormatError, match="not found"):
        read_training_examples(tmp_path / "nope.jsonl")


def test_reader_streams(tmp_path):
    path = tmp_path / "t.jsonl"
    _write_lines(path, [_good(), "{broken"])
    it = iter_training_examples(path)
    assert next(it).id == "q1"  # the good first line is yielded before the bad one is read
    with pytest.raises(DataFormatError):
        next(it)


def test_writer_is_atomic(tmp_path):
    path = tmp_path / "t.jsonl"
    write_training_examples(path, [_example("old")])
    with pytest.raises(ValueError, match="duplicate"):
        write_training_examples(path, [_example("a"), _example("a")])
    assert [e.id for e in read_training_examples(path)] == ["old"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.jsonl"]


def test_example_from_session_converts_passages():
    s = Session.from_messages(
        "s1", [{"role": "user", "content": "q?"}], response="the answer", metadata={"topic": 3}
    )
    ex = example_from_session(s, [Passage("d1", "text one", "T")], negatives=[TrainingPassage("n")])
    assert ex.positives == (TrainingPassage("text one", "d1", "T"),)
    assert ex.target == "the answer" and ex.metadata == {"topic": 3}
    assert ex.session().question == "q?" and ex.session().response == "the answer"
    assert example_from_session(s, [TrainingPassage("p")], target="other").target == "other"


def test_invalid_construction():
    with pytest.raises(ValueError):
        TrainingPassage("")
    with pytest.raises(ValueError):
        TrainingExample("x", (Turn("user", "q"),), positives=())
    with pytest.raises(ValueError):
        TrainingExample("x", (Turn("user", "q"), Turn("assistant", "a")), (TrainingPassage("p"),))


def test_passage_keys_find_copies_under_other_ids_and_near_duplicates():
    p = TrainingPassage("Paris is the capital of France.", id="d1", title="Paris")
    id_key, text_key = passage_keys(p, "mtrag")
    assert id_key >= 0 and text_key >= 0  # -1 means "no key"
    assert (
        normalized_text("  PARIS is the\tcapital, of France!! ") == "paris is the capital of france"
    )
    # same text (other spacing, case, punctuation, title) under another id: same text key only
    copy = TrainingPassage("paris  is the CAPITAL of france", id="d7", title="")
    assert passage_keys(copy, "mtrag")[1] == text_key and passage_keys(copy, "mtrag")[0] != id_key
    # the same id with other text: same id key; another namespace: another id key
    assert passage_keys(TrainingPassage("other text", id="d1"), "mtrag")[0] == id_key
    assert passage_keys(p, "topiocqa")[0] != id_key
    # no id: no id key; other words: other text key; only punctuation: its own text
    assert passage_keys(TrainingPassage("Paris is the capital of France."))[0] == -1
    assert passage_keys(TrainingPassage("Rome is the capital of Italy."))[1] != text_key
    assert passage_keys(TrainingPassage("..."))[1] != passage_keys(TrainingPassage("!!"))[1]
