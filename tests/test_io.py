"""The core torch-free formats: files, BEIR corpus, sessions, qrels, runs, embedding shards."""

from __future__ import annotations

import gzip
import json
import os

import numpy as np
import pytest
from fixtures import write

from chatretriever.errors import DataFormatError
from chatretriever.io import atomic
from chatretriever.io.atomic import atomic_dir, atomic_files, atomic_path, atomic_write
from chatretriever.io.corpus import iter_corpus, read_corpus, write_corpus
from chatretriever.io.embeddings import EmbeddingMeta, read_embeddings, write_embeddings
from chatretriever.io.files import (
    iter_jsonl,
    iter_lines,
    open_text,
    read_json,
    require,
    write_jsonl,
)
from chatretriever.io.sessions import read_sessions, session_from_dict, write_sessions
from chatretriever.io.trec import (
    read_beir_qrels,
    read_json_qrels,
    read_qrels,
    read_qrels_files,
    read_run,
    read_trec_qrels,
    write_qrels,
    write_run,
)
from chatretriever.types import Passage, Qrel, Run, Session, Turn


def raises_at(exc_info, line, field=None):
    """The error names this line (also in its message) and this field."""
    err = exc_info.value
    assert (err.line, err.field) == (line, field), str(err)
    assert f":{line}: " in str(err)
    if field:
        assert f"field '{field}'" in str(err)


# --- files -------------------------------------------------------------------------------------


def test_open_text_missing_file(tmp_path):
    with pytest.raises(DataFormatError, match="file not found"):
        open_text(tmp_path / "nope.jsonl")


def test_open_text_directory_is_a_clear_error(tmp_path):
    with pytest.raises(DataFormatError, match="is a directory; expected a file") as e:
        open_text(tmp_path)
    assert str(tmp_path) in str(e.value)


def test_iter_lines_skips_blanks_keeps_numbers(tmp_path):
    path = write(tmp_path / "a.txt.gz", "one\n\n  \nfour\r\n")
    assert list(iter_lines(path)) == [(1, "one"), (4, "four")]


def test_corrupt_gzip_is_a_data_format_error(tmp_path):
    path = tmp_path / "bad.jsonl.gz"
    path.write_bytes(b"this is not gzip data at all")
    with pytest.raises(DataFormatError, match="cannot read file"):
        list(iter_jsonl(path))
    with pytest.raises(DataFormatError, match="cannot read file"):
        read_json(path)


def test_iter_jsonl_names_the_bad_line(tmp_path):
    path = write(tmp_path / "a.jsonl", '{"a": 1}\n{"a": \n')
    with pytest.raises(DataFormatError, match="malformed JSON") as e:
        list(iter_jsonl(path))
    raises_at(e, 2)
    path = write(tmp_path / "b.jsonl", '{"a": 1}\n\n[1, 2]\n')
    with pytest.raises(DataFormatError, match="expected a JSON object") as e:
        list(iter_jsonl(path))
    raises_at(e, 3)


def test_read_json_names_the_line(tmp_path):
    path = write(tmp_path / "a.json", '[\n  {"a": 1},\n  {"a": }\n]\n')
    with pytest.raises(DataFormatError) as e:
        read_json(path)
    assert e.value.line == 3


def test_require():
    assert require({"id": 7}, "id", "f", 1) == "7"  # numeric ids become strings
    with pytest.raises(DataFormatError) as e:
        require({}, "id", "f", 4)
    raises_at(e, 4, "id")
    with pytest.raises(DataFormatError, match="expected str, got bool"):
        require({"id": True}, "id", "f", 1)
    with pytest.raises(DataFormatError, match="expected list, got str"):
        require({"x": "a"}, "x", "f", 1, kind=list)


@pytest.mark.parametrize("name", ["out.jsonl", "out.jsonl.gz"])
def test_atomic_writer_leaves_nothing_when_the_body_raises(tmp_path, name):
    def rows():
        yield {"a": 1}
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        write_jsonl(tmp_path / name, rows())
    assert os.listdir(tmp_path) == []


def test_atomic_writer_keeps_the_old_file_when_the_body_raises(tmp_path):
    path = tmp_path / "run.trec"
    path.write_text("old\n")
    with pytest.raises(ValueError), atomic_write(path) as f:
        f.write("new partial content\n")
        raise ValueError("writer failed")
    assert path.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["run.trec"]


def test_atomic_writer_binary_and_gzip(tmp_path):
    with atomic_write(tmp_path / "a.bin", "wb") as f:
        f.write(b"\x00\x01")
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01"
    with atomic_write(tmp_path / "a.txt.gz") as f:
        f.write("héllo\n")
    assert gzip.decompress((tmp_path / "a.txt.gz").read_bytes()).decode() == "héllo\n"
    assert sorted(os.listdir(tmp_path)) == ["a.bin", "a.txt.gz"]


def _tree(root):
    """{relative path: bytes} of every file under `root`."""
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _fill(directory, **contents):
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in contents.items():
        (directory / name).write_text(text)
    return directory


def _record_fsyncs_and_renames(monkeypatch):
    """Patches os.fsync/os.replace (as io.atomic calls them) to log ("fsync", "file"|"dir") and
    ("replace", destination name) in call order."""
    import stat

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        kind = "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"
        events.append(("fsync", kind))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.path.basename(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "fsync", fsync)
    monkeypatch.setattr(atomic.os, "replace", replace)
    return events


def test_atomic_write_fsyncs_the_file_before_the_rename_and_the_directory_after(
    tmp_path, monkeypatch
):
    events = _record_fsyncs_and_renames(monkeypatch)
    with atomic_write(tmp_path / "a.txt.gz") as f:
        f.write("x\n")
    assert events == [("fsync", "file"), ("replace", "a.txt.gz"), ("fsync", "dir")]
    assert gzip.decompress((tmp_path / "a.txt.gz").read_bytes()) == b"x\n"


def test_atomic_path_renames_a_named_file_into_place(tmp_path):
    target = tmp_path / "fig.png"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".png"  # writers infer the format
        tmp.write_bytes(b"half")
        raise RuntimeError("writer died")
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["fig.png"]
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new" and os.listdir(tmp_path) == ["fig.png"]
    assert target.stat().st_mode & 0o777 == 0o644


def test_atomic_dir_keeps_the_old_copy_when_the_body_raises(tmp_path):
    target = _fill(tmp_path / "d", a="old a", b="old b")
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "a").write_text("new a")
        raise RuntimeError("writer died halfway")
    assert _tree(target) == {"a": b"old a", "b": b"old b"}
    assert os.listdir(tmp_path) == ["d"]  # no temporary directory left


def test_atomic_dir_deletes_the_old_copy_only_once_the_new_one_is_in_place(tmp_path, monkeypatch):
    target = _fill(tmp_path / "d", a="old")
    seen = []
    real_rmtree = atomic.shutil.rmtree

    def rmtree(path, *args, **kwargs):  # what the target holds whenever something is deleted
        seen.append(_tree(target) if target.is_dir() else None)
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(atomic.shutil, "rmtree", rmtree)
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("new")
    assert seen == [{"a": b"new"}]
    assert _tree(target) == {"a": b"new"} and os.listdir(tmp_path) == ["d"]


def test_atomic_dir_whose_old_copy_cannot_be_deleted_still_has_the_new_one(
    tmp_path, monkeypatch, caplog
):
    target = _fill(tmp_path / "d", a="old")

    def rmtree(path, *args, **kwargs):
        raise PermissionError(13, "cannot delete", str(path))

    monkeypatch.setattr(atomic.shutil, "rmtree", rmtree)
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("new")
    assert _tree(target) == {"a": b"new"}
    assert "could not be deleted" in caplog.text  # the leftover old copy is named


def test_atomic_dir_whose_swap_fails_puts_the_old_copy_back(tmp_path, monkeypatch):
    target = _fill(tmp_path / "d", a="old")
    real_replace = os.replace

    def replace(src, dst):  # renaming the new copy onto the target fails (disk gone, ...)
        if os.path.abspath(dst) == str(target) and os.path.basename(src) != "d":
            raise OSError(5, "I/O error")
        return real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", replace)
    with pytest.raises(OSError, match="I/O error"), atomic_dir(target) as tmp:
        (tmp / "a").write_text("new")
    assert _tree(target) == {"a": b"old"}
    assert os.listdir(tmp_path) == ["d"]


def test_atomic_dir_fsyncs_the_new_tree_before_the_swap(tmp_path, monkeypatch):
    target = _fill(tmp_path / "d", a="old")
    events = _record_fsyncs_and_renames(monkeypatch)
    with atomic_dir(target) as tmp:
        _fill(tmp / "sub", b="new")
        (tmp / "a").write_text("new")
    first_rename = next(i for i, e in enumerate(events) if e[0] == "replace")
    before = events[:first_rename]
    assert before.count(("fsync", "file")) == 2 and ("fsync", "dir") in before
    assert events[-1] == ("fsync", "dir")  # the parent, after the swap
    assert _tree(target) == {"a": b"new", "sub/b": b"new"}


def test_atomic_files_replaces_its_files_and_keeps_the_others(tmp_path, monkeypatch):
    run = _fill(tmp_path / "run", **{"model.bin": "old", "marker.json": "old", "log": "keep"})
    _fill(run / "checkpoint-2", state="keep")
    (run / "old-shard.bin").write_text("stale")
    events = _record_fsyncs_and_renames(monkeypatch)
    with atomic_files(run, last=["marker.json"], stale=["*.bin"]) as tmp:
        assert tmp.parent == run and not any(tmp.iterdir())
        _fill(tmp, **{"marker.json": "new", "model.bin": "new", "tok.json": "new"})
    assert _tree(run) == {
        "checkpoint-2/state": b"keep",
        "log": b"keep",
        "marker.json": b"new",
        "model.bin": b"new",
        "tok.json": b"new",
    }
    renames = [name for kind, name in events if kind == "replace"]
    assert renames[0] == "marker.json"  # the old marker goes first ...
    assert renames[-1] == "marker.json"  # ... and the new one comes last
    assert sorted(os.listdir(run)) == [
        "checkpoint-2",
        "log",
        "marker.json",
        "model.bin",
        "tok.json",
    ]


def test_atomic_files_leaves_the_directory_as_it_was_on_failure(tmp_path, monkeypatch):
    run = _fill(tmp_path / "run", **{"model.bin": "old", "marker.json": "old", "log": "keep"})
    before = _tree(run)
    with pytest.raises(RuntimeError), atomic_files(run, last=["marker.json"]) as tmp:
        (tmp / "model.bin").write_text("new, half written")
        raise RuntimeError("writer died")
    assert _tree(run) == before and sorted(os.listdir(run)) == ["log", "marker.json", "model.bin"]
    real_replace = os.replace
    placed = []

    def replace(src, dst):  # the second file moved into place fails
        if os.path.dirname(dst) == str(run) and ".tmp" in str(src):
            placed.append(dst)
            if len(placed) == 2:
                raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", replace)
    with pytest.raises(OSError), atomic_files(run, last=["marker.json"]) as tmp:
        _fill(tmp, **{"a.json": "new", "model.bin": "new", "marker.json": "new"})
    assert len(placed) == 2
    assert _tree(run) == before and sorted(os.listdir(run)) == ["log", "marker.json", "model.bin"]


def test_atomic_files_into_a_new_directory(tmp_path):
    with atomic_files(tmp_path / "new" / "dir") as tmp:
        assert not (tmp_path / "new" / "dir").exists()
        (tmp / "a").write_text("x")
    assert _tree(tmp_path / "new") == {"dir/a": b"x"}
    # another writer (a second training process) creates the directory meanwhile: both stay
    with atomic_files(tmp_path / "ckpt") as tmp:
        (tmp / "model").write_text("rank 0")
        _fill(tmp_path / "ckpt", rng_1="rank 1")
    assert _tree(tmp_path / "ckpt") == {"model": b"rank 0", "rng_1": b"rank 1"}
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "new"]  # no staging dir left


# --- BEIR corpus -------------------------------------------------------------------------------

PASSAGES = [
    Passage("d1", "Paris is the capital of France.", "France", {"domain": "clapnq"}),
    Passage("d2", "Reset the password in settings.", "", {"domain": "cloud", "url": "u"}),
]


@pytest.mark.parametrize("name", ["corpus.jsonl", "corpus.jsonl.gz"])
def test_corpus_round_trip(tmp_path, name):
    assert write_corpus(tmp_path / name, PASSAGES) == 2
    assert read_corpus(tmp_path / name) == PASSAGES


def test_corpus_accepts_id_and_numeric_ids(tmp_path):
    path = write(tmp_path / "c.jsonl", '{"id": 5, "text": "t", "title": null}\n')
    assert read_corpus(path) == [Passage("5", "t", "")]
    path = write(tmp_path / "n.jsonl", '{"_id": "a", "text": 3.5}\n')
    assert read_corpus(path)[0].text == "3.5"


def test_tsv_corpora(tmp_path):
    marco = write(tmp_path / "collection.tsv", "0\tThe cheetah runs fast.\n7\tBM25 ranks.\n")
    assert read_corpus(marco) == [
        Passage("0", "The cheetah runs fast."),
        Passage("7", "BM25 ranks."),
    ]
    dpr = write(tmp_path / "psgs_w100.tsv", "id\ttext\ttitle\n1\tAaron was a prophet.\tAaron\n")
    assert read_corpus(dpr) == [Passage("1", "Aaron was a prophet.", "Aaron")]
    for header in ("docid\ttext", "pid\tpassage", "_id\tcontents", "corpus-id\tbody"):
        named = write(tmp_path / "named.tsv", f"{header}\nd1\tcheetahs run\n")
        assert read_corpus(named) == [Passage("d1", "cheetahs run")]  # the header is no passage
    both = write(tmp_path / "both.tsv", "pid\tid\ttext\n7\td7\tx\n")  # `id` itself wins
    assert read_corpus(both) == [Passage("d7", "x", metadata={"pid": "7"})]
    for name, text, match in (
        ("a.tsv", "1\tt\tT\n", ":1: a tab-separated corpus needs id<TAB>text lines or a header"),
        ("d.jsonl", "not json\n", ":1: malformed JSON"),  # no tab: JSON lines, as before
        ("b.tsv", "1\tt\n2\tu\tv\n", r":2: expected 2 tab-separated columns \(id, text\), got 3"),
        ("c.tsv", "1\tt\n1\tu\n", ":2: field 'id': duplicate id '1'"),
    ):
        with pytest.raises(DataFormatError, match=match):
            read_corpus(write(tmp_path / name, text))


def test_corpus_warns_of_blank_passages(tmp_path, caplog):
    lines = ['{"_id": "a", "text": "x"}', '{"_id": "b", "text": " "}', '{"_id": "c", "text": ""}']
    path = write(
        tmp_path / "c.jsonl", "\n".join([*lines, '{"_id": "d", "title": "T", "text": ""}'])
    )
    assert [p.id for p in read_corpus(path)] == ["a", "b", "c", "d"]  # kept
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [
        f"{path}: 2 passage(s) with neither text nor title (first: line 2, id 'b'): kept, "
        "but they can only match a query by chance"
    ]
    caplog.clear()
    read_corpus(write(tmp_path / "ok.jsonl", lines[0]))
    assert not caplog.records


@pytest.mark.parametrize(
    "lines, line, field, match",
    [
        (['{"_id": "a", "text": "x"}', '{"_id": "b", "text": '], 2, None, "malformed JSON"),
        (['{"_id": "a", "text": "x"}', '{"_id": "b"}'], 2, "text", "missing field"),
        (['{"text": "x"}'], 1, "_id", "missing field"),
        (['{"_id": "a", "text": "x"}', '{"_id": "a", "text": "y"}'], 2, "_id", "duplicate id"),
        (['{"_id": "", "text": "x"}'], 1, "_id", "empty id"),
        (
            ['{"_id": "a", "text": "x"}', '{"_id": "has space", "text": "y"}'],
            2,
            "_id",
            "whitespace",
        ),
        (['{"id": "tab\\there", "text": "y"}'], 1, "id", "contains whitespace"),
        (['{"_id": "a", "text": "x", "title": ["t"]}'], 1, "title", "expected str"),
        (['{"_id": "a", "text": ["x"]}'], 1, "text", "expected str"),
    ],
)
def test_corpus_bad_input(tmp_path, lines, line, field, match):
    path = write(tmp_path / "c.jsonl", "\n".join(lines) + "\n")
    with pytest.raises(DataFormatError, match=match) as e:
        list(iter_corpus(path))
    raises_at(e, line, field)
    assert str(path) in str(e.value)


# --- sessions ----------------------------------------------------------------------------------

SESSIONS = [
    Session.from_messages(
        "s1",
        [
            {"role": "user", "content": "who wrote hamlet?"},
            {"role": "assistant", "content": "Shakespeare."},
            {"role": "user", "content": "when was he born?"},
        ],
        rewrite="when was shakespeare born?",
        response="1564.",
        metadata={"domain": "clapnq", "turn": 2},
    ),
    Session("s2", (Turn("system", "be brief"), Turn("user", "hi"))),
]


@pytest.mark.parametrize("name", ["s.jsonl", "s.jsonl.gz"])
def test_sessions_round_trip(tmp_path, name):
    assert write_sessions(tmp_path / name, SESSIONS) == 2
    back = read_sessions(tmp_path / name)
    assert back == SESSIONS
    assert back[0].question == "when was he born?" and len(back[0].history) == 2


def test_session_extra_fields_go_to_metadata():
    s = session_from_dict(
        {"id": "q", "messages": [{"role": "user", "content": "x"}], "topic": "t", "metadata": {}}
    )
    assert s.metadata == {"topic": "t"}


@pytest.mark.parametrize(
    "obj, field, match",
    [
        ({"messages": [{"role": "user", "content": "x"}]}, "id", "missing field"),
        ({"id": "q", "messages": []}, "messages", "non-empty list"),
        ({"id": "q", "messages": [{"role": "bot", "content": "x"}]}, "messages[0]", "role"),
        ({"id": "q", "messages": [{"role": "user", "content": 1}]}, "messages[0]", "content"),
        (
            {
                "id": "q",
                "messages": [
                    {"role": "user", "content": "a"},
                    {"role": "assistant", "content": "b"},
                ],
            },
            "messages",
            "last message",
        ),
        (
            {
                "id": "q",
                "messages": [
                    {"role": "assistant", "content": "hi"},
                    {"role": "user", "content": " "},
                ],
            },  # fmt: skip
            "messages[1]",
            "the current question",
        ),
        (
            {"id": "q", "messages": [{"role": "user", "content": "x"}], "metadata": [1]},
            "metadata",
            "expected an object",
        ),
        (
            {"id": "q", "messages": [{"role": "user", "content": "x"}], "rewrite": 3},
            "rewrite",
            "expected str",
        ),
        (
            {"id": "a b", "messages": [{"role": "user", "content": "x"}]},
            "id",
            "id 'a b' contains whitespace: TREC runs",
        ),
    ],
)
def test_sessions_bad_input(tmp_path, obj, field, match):
    good = {"id": "ok", "messages": [{"role": "user", "content": "fine"}]}
    path = write(tmp_path / "s.jsonl", json.dumps(good) + "\n" + json.dumps(obj) + "\n")
    with pytest.raises(DataFormatError, match=match) as e:
        read_sessions(path)
    raises_at(e, 2, field)


def test_sessions_duplicate_id(tmp_path):
    row = json.dumps({"id": "q", "messages": [{"role": "user", "content": "x"}]})
    path = write(tmp_path / "s.jsonl", f"{row}\n\n{row}\n")
    with pytest.raises(DataFormatError, match="duplicate id") as e:
        read_sessions(path)
    raises_at(e, 3, "id")


# --- qrels -------------------------------------------------------------------------------------

TREC_QRELS = "31_1 Q0 CAR_a 0\n31_1 Q0 CAR_b 2\n31_2 0 MARCO_1 4\n31_2 0 MARCO_2 1.0\n"


def test_graded_trec_qrels(tmp_path):
    path = write(tmp_path / "q.txt", TREC_QRELS)
    assert read_trec_qrels(path) == [
        Qrel("31_1", "CAR_a", 0),
        Qrel("31_1", "CAR_b", 2),
        Qrel("31_2", "MARCO_1", 4),
        Qrel("31_2", "MARCO_2", 1),
    ]
    assert read_qrels(path) == read_trec_qrels(path)


@pytest.mark.parametrize("name", ["q.txt", "q.txt.gz"])
def test_qrels_round_trip(tmp_path, name):
    qrels = [Qrel("a", "d1", 3), Qrel("a", "d2", 0), Qrel("b", "d1", 1)]
    assert write_qrels(tmp_path / name, qrels) == 3
    assert read_qrels(tmp_path / name) == qrels


def test_beir_qrels_with_and_without_header(tmp_path):
    body = "conv<::>1\tdoc-1\t1\nconv<::>2\tdoc-2\t2\n"
    with_header = write(tmp_path / "h.tsv", "query-id\tcorpus-id\tscore\n" + body)
    without = write(tmp_path / "n.tsv", body)
    expected = [Qrel("conv<::>1", "doc-1", 1), Qrel("conv<::>2", "doc-2", 2)]
    assert read_beir_qrels(with_header) == expected
    assert read_beir_qrels(without) == expected
    assert read_qrels(with_header) == expected  # told apart from TREC by the first line


def test_json_qrels(tmp_path):
    # pytrec_eval's dict, as OR-QuAC publishes its qrels.txt
    path = write(
        tmp_path / "qrels.txt", json.dumps({"C_1_q#0": {"d1": 1, "d2": 0}, "b": {"d1": 2.0}})
    )
    expected = [Qrel("C_1_q#0", "d1", 1), Qrel("C_1_q#0", "d2", 0), Qrel("b", "d1", 2)]
    assert read_qrels(path) == expected
    for text, field, match in (
        ('{"a": {"d1": "high"}}', "a.d1", "expected a number, got 'high'"),
        ('{"a": ["d1"]}', "a", "expected an object of doc id: grade"),
        ('{"a": {"d 1": 1}}', "a doc id", "contains whitespace"),
        ('[{"a": 1}]', None, "expected a JSON object"),
    ):
        with pytest.raises(DataFormatError, match=match) as e:
            read_json_qrels(write(tmp_path / "bad.json", text))
        assert (e.value.line, e.value.field) == (None, field)
    with pytest.raises(DataFormatError, match="names no document"):
        read_qrels(path, known_docs={"d1"})


def test_repeated_identical_judgment_is_kept_once(tmp_path):
    path = write(tmp_path / "q.txt", "a 0 d1 1\na 0 d2 0\na 0 d1 1\n")
    assert read_trec_qrels(path) == [Qrel("a", "d1", 1), Qrel("a", "d2", 0)]


@pytest.mark.parametrize(
    "reader, text, line, field, match",
    [
        (read_trec_qrels, "a 0 d1 1\na 0 d2\n", 2, None, "expected 4 columns"),
        (read_trec_qrels, "a 0 d1 1\na 0 d2 high\n", 2, "relevance", "not a number"),
        (read_trec_qrels, "a 0 d1 1\na 0 d1 2\n", 2, "relevance", "judged 1 before"),
        (read_beir_qrels, "query-id\tcorpus-id\tscore\na\td1\n", 2, None, "3 tab-separated"),
        (read_beir_qrels, "a\td1\t1\na d2 1\n", 2, None, "3 tab-separated"),
        (read_beir_qrels, "a\td1\t1\nb\td1\tx\n", 2, "score", "not a number"),
    ],
)
def test_qrels_bad_input(tmp_path, reader, text, line, field, match):
    path = write(tmp_path / "q.txt", text)
    with pytest.raises(DataFormatError, match=match) as e:
        reader(path)
    raises_at(e, line, field)


def test_qrels_of_several_files_and_directories_are_merged(tmp_path):
    qrels = tmp_path / "qrels"
    qrels.mkdir()
    (qrels / "cloud.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td2\t2\n")
    (qrels / "fiqa.txt").write_text("q3 0 d3 1\nq1 0 d1 1\n")  # q1/d1 again, same grade
    (qrels / ".hidden").write_text("not qrels at all\n")  # an editor's leftover: skipped
    (tmp_path / "extra.json").write_text('{"q4": {"d4": 3}}')
    merged = read_qrels_files([qrels, tmp_path / "extra.json"])
    assert merged == [Qrel("q1", "d1", 1), Qrel("q2", "d2", 2), Qrel("q3", "d3", 1),
                      Qrel("q4", "d4", 3)]  # fmt: skip
    assert read_qrels_files(str(qrels / "fiqa.txt")) == read_qrels(qrels / "fiqa.txt")


def test_qrels_files_that_grade_one_pair_differently_are_refused(tmp_path):
    (tmp_path / "a.txt").write_text("q1 0 d1 1\n")
    (tmp_path / "b.txt").write_text("q1 0 d1 2\n")
    clash = r"b\.txt.*\(q1, d1\) judged 2 here but 1 in .*a\.txt"
    with pytest.raises(DataFormatError, match=clash):
        read_qrels_files([tmp_path / "a.txt", tmp_path / "b.txt"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataFormatError, match="empty: is a directory holding no qrels file"):
        read_qrels_files([tmp_path / "empty"])


def test_qrels_ids_must_name_known_queries_and_docs(tmp_path):
    path = write(tmp_path / "q.txt", "a 0 d1 1\nzzz 0 d1 1\n")
    with pytest.raises(DataFormatError, match="names no known query") as e:
        read_trec_qrels(path, known_queries={"a"})
    raises_at(e, 2, "query_id")
    with pytest.raises(DataFormatError, match="names no document") as e:
        read_qrels(path, known_docs={"d2"})
    raises_at(e, 1, "doc_id")


# --- runs --------------------------------------------------------------------------------------


def test_run_ties_broken_by_score_then_docid(tmp_path):
    run = Run({"q2": {"z": 0.5}, "q1": {"b": 1.0, "c": 2.0, "a": 1.0, "d": -1.0}}, name="my run")
    assert write_run(tmp_path / "run.trec", run) == 5
    lines = (tmp_path / "run.trec").read_text().splitlines()
    assert [line.split() for line in lines] == [
        ["q1", "Q0", "c", "1", "2.0", "my_run"],
        ["q1", "Q0", "a", "2", "1.0", "my_run"],
        ["q1", "Q0", "b", "3", "1.0", "my_run"],
        ["q1", "Q0", "d", "4", "-1.0", "my_run"],
        ["q2", "Q0", "z", "1", "0.5", "my_run"],
    ]
    assert [d.doc_id for d in run.ranked("q1")] == ["c", "a", "b", "d"]


def test_run_round_trip_keeps_exact_scores_and_depth(tmp_path):
    run = Run({"q": {"d1": 0.123456789012, "d2": 0.1234567, "d3": 1e-9}}, name="r")
    write_run(tmp_path / "r.trec.gz", run)
    back = read_run(tmp_path / "r.trec.gz")
    assert back.scores == run.scores and back.name == "r"
    assert write_run(tmp_path / "top2.trec", run, depth=2) == 2
    assert list(read_run(tmp_path / "top2.trec").scores["q"]) == ["d1", "d2"]


def test_write_run_refuses_ids_a_trec_file_cannot_hold_and_keeps_the_old_file(tmp_path):
    path = tmp_path / "r.trec"
    write_run(path, Run({"q": {"d1": 1.0}}, name="r"))
    for scores in ({"q": {"has space": 1.0}}, {"a b": {"d1": 1.0}}):
        with pytest.raises(DataFormatError, match="contains whitespace"):
            write_run(path, Run(scores, name="r"))
    assert read_run(path).scores == {"q": {"d1": 1.0}}


def test_read_run_recomputes_ranks(tmp_path):
    # ranks in the file disagree with scores: scores decide
    path = write(tmp_path / "r.trec", "q Q0 a 1 0.1 t\nq Q0 b 2 0.9 t\n")
    assert [d.doc_id for d in read_run(path).ranked("q")] == ["b", "a"]


@pytest.mark.parametrize(
    "text, line, field, match",
    [
        ("q Q0 a 1 0.5 t\nq Q0 b 2 0.4\n", 2, None, "expected 6 columns"),
        ("q Q0 a 1 high t\n", 1, "score", "not a finite number"),
        ("q Q0 a 1 nan t\n", 1, "score", "not a finite number"),
        ("q Q0 a 1 inf t\n", 1, "score", "not a finite number"),
        ("q Q0 a 1 0.5 t\nq Q0 b 2 -inf t\n", 2, "score", "not a finite number"),
        ("q Q0 a 1 0.5 t\nq Q0 a 2 0.4 t\n", 2, "doc_id", "listed twice"),
    ],
)
def test_run_bad_input(tmp_path, text, line, field, match):
    path = write(tmp_path / "r.trec", text)
    with pytest.raises(DataFormatError, match=match) as e:
        read_run(path)
    raises_at(e, line, field)


def test_run_ids_must_name_known_queries(tmp_path):
    path = write(tmp_path / "r.trec", "q1 Q0 a 1 0.5 t\nq9 Q0 a 1 0.5 t\n")
    with pytest.raises(DataFormatError, match="names no known query") as e:
        read_run(path, known_queries={"q1"})
    raises_at(e, 2, "query_id")


# --- embedding shards --------------------------------------------------------------------------


@pytest.fixture
def shard(tmp_path):
    emb = np.arange(12, dtype=np.float32).reshape(3, 4)
    out = write_embeddings(tmp_path / "shard", ["a", "b", "c"], emb, EmbeddingMeta("m", dim=0))
    return out, emb


def test_embeddings_round_trip(shard):
    directory, emb = shard
    for mmap in (True, False):
        ids, back, meta = read_embeddings(directory, mmap=mmap)
        assert ids == ["a", "b", "c"]
        np.testing.assert_array_equal(back, emb)
        assert (meta.model, meta.dim, meta.count, meta.dtype) == ("m", 4, 3, "float32")
    assert meta.compatible_with(EmbeddingMeta("m", 4))
    assert not meta.compatible_with(EmbeddingMeta("other", 4))


def test_embeddings_overwrite_is_whole(shard, tmp_path):
    directory, _ = shard
    write_embeddings(directory, ["x"], np.ones((1, 2), np.float16), EmbeddingMeta("m", 2))
    ids, emb, meta = read_embeddings(directory)
    assert ids == ["x"] and emb.dtype == np.float16 and meta.dim == 2
    assert sorted(os.listdir(tmp_path)) == ["shard"]  # no temp directory left behind


def test_write_embeddings_rejects_bad_input(tmp_path):
    meta = EmbeddingMeta("m", 2)
    with pytest.raises(ValueError, match="do not match"):
        write_embeddings(tmp_path / "s", ["a"], np.zeros((2, 2), np.float32), meta)
    with pytest.raises(ValueError, match="duplicate"):
        write_embeddings(tmp_path / "s", ["a", "a"], np.zeros((2, 2), np.float32), meta)
    with pytest.raises(ValueError, match="newline"):
        write_embeddings(tmp_path / "s", ["a\nb"], np.zeros((1, 2), np.float32), meta)
    assert not (tmp_path / "s").exists()


def _edit_meta(directory, **changes):
    raw = json.loads((directory / "meta.json").read_text())
    (directory / "meta.json").write_text(json.dumps({**raw, **changes}))


def test_embeddings_mismatch_errors(shard):
    directory, _ = shard
    (directory / "ids.txt").write_text("a\nb\n")
    with pytest.raises(DataFormatError, match="3 rows but 2 ids"):
        read_embeddings(directory)
    (directory / "ids.txt").write_text("a\nb\na\n")
    with pytest.raises(DataFormatError, match="duplicate id 'a'") as e:
        read_embeddings(directory)
    assert e.value.line == 3
    (directory / "ids.txt").write_text("a\nb\nc\n")
    _edit_meta(directory, dim=8)
    with pytest.raises(DataFormatError, match="dim 8") as e:
        read_embeddings(directory)
    assert e.value.field == "dim"
    _edit_meta(directory, dim=4, count=5)
    with pytest.raises(DataFormatError, match="count 5") as e:
        read_embeddings(directory)
    assert e.value.field == "count"


def test_embeddings_missing_or_broken_files(shard):
    directory, _ = shard
    (directory / "meta.json").write_text("{not json")
    with pytest.raises(DataFormatError, match="bad embedding metadata"):
        read_embeddings(directory)
    (directory / "meta.json").write_text(json.dumps({"model": "m", "bogus": 1}))
    with pytest.raises(DataFormatError, match="unknown fields bogus; missing fields dim"):
        read_embeddings(directory)  # named, not a dataclass's TypeError
    index_meta = {"backend": "faiss", "factory": "Flat", "embedding": {}, "ntotal": 3}
    (directory / "meta.json").write_text(json.dumps(index_meta))
    with pytest.raises(DataFormatError, match="a search index's metadata.*not embeddings"):
        read_embeddings(directory)
    (directory / "meta.json").unlink()
    with pytest.raises(DataFormatError, match="file not found"):
        read_embeddings(directory)
    write_embeddings(directory, ["a"], np.zeros((1, 2), np.float32), EmbeddingMeta("m", 2))
    (directory / "embeddings.npy").write_bytes(b"garbage")
    with pytest.raises(DataFormatError, match="cannot load"):
        read_embeddings(directory)
