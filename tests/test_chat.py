"""`chatretriever chat` through stdin with a fake-encoder index, and the chat library."""

from __future__ import annotations

import io
import sys

import pytest
from fakes import HashEncoder
from fixtures import jsonl, write

from chatretriever.apps.chat import (
    ChatSearcher,
    Conversation,
    Hit,
    format_hits,
    snippet,
)
from chatretriever.apps.registry import register_encoder, unregister_encoder
from chatretriever.cli import main
from chatretriever.retrieval.corpus_index import CorpusIndex, build_corpus_index

pytest.importorskip("faiss")

CORPUS = [
    {"_id": "diet", "title": "Jaguar diet", "text": "jaguars eat deer capybaras and caimans"},
    {"_id": "range", "title": "Jaguar range", "text": "jaguars live in the rainforests"},
    {"_id": "pasta", "title": "Pasta", "text": "cook pasta in salted water with tomato sauce"},
    {"_id": "shoes", "title": "Shoes", "text": "running shoes for marathon training"},
    {"_id": "owls", "title": "Owls", "text": "owls hunt mice at night"},
]


class RecordingEncoder(HashEncoder):
    """A HashEncoder that remembers every session it encoded (as lists of (role, content))."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.seen: list[list[tuple[str, str]]] = []

    def encode_sessions(self, sessions, batch_size=16, show_progress=False):
        self.seen.extend([(t.role, t.content) for t in s.turns] for s in sessions)
        return super().encode_sessions(sessions, batch_size, show_progress)


@pytest.fixture
def encoder():
    """`--model fake:NAME` loads one shared RecordingEncoder named NAME or "fake-hash"."""
    made: dict[str, RecordingEncoder] = {}

    def factory(rest: str) -> RecordingEncoder:
        return made.setdefault(rest, RecordingEncoder(name=rest or "fake-hash"))

    register_encoder("fake", factory)
    yield factory
    unregister_encoder("fake")


@pytest.fixture
def index_dir(tmp_path, encoder):
    write(tmp_path / "corpus.jsonl", jsonl(CORPUS))
    out = tmp_path / "idx"
    assert (
        main(["index", str(tmp_path / "corpus.jsonl"), "--out", str(out), "--model", "fake:"]) == 0
    )
    return out


def _chat(monkeypatch, stdin, argv):
    monkeypatch.setattr(sys, "stdin", stdin)
    return main(["chat", *argv])


def _turn_blocks(out: str) -> dict[str, list[str]]:
    """Output of a non-interactive chat: header line "turn N: text" -> its result lines."""
    blocks: dict[str, list[str]] = {}
    current = None
    for line in out.splitlines():
        if line.startswith("turn "):
            current = line
            blocks[current] = []
        elif current and line.strip():
            blocks[current].append(line)
    return blocks


def test_chat_reads_one_turn_per_line(index_dir, encoder, monkeypatch, capsys):
    capsys.readouterr()
    stdin = io.StringIO(
        "tell me about jaguars\n\nwhat do they eat\n:reset\nhow do I cook pasta\n:quit\nlost\n"
    )
    assert _chat(monkeypatch, stdin, ["--index", str(index_dir), "--k", "2"]) == 0
    out = capsys.readouterr().out
    blocks = _turn_blocks(out)
    assert list(blocks) == [
        "turn 1: tell me about jaguars",
        "turn 2: what do they eat",
        "turn 1: how do I cook pasta",
    ]
    assert "(new conversation)" in out and "lost" not in out
    # rank, score, title and id on one line, the snippet under it
    first = blocks["turn 2: what do they eat"]
    assert first[0].lstrip().startswith("1. [") and first[0].endswith("] Jaguar diet (diet)")
    assert first[1].strip() == "jaguars eat deer capybaras and caimans"
    assert blocks["turn 1: how do I cook pasta"][0].endswith("Pasta (pasta)")
    assert sum(1 for line in first if line.lstrip()[:2] in ("1.", "2.")) == 2  # --k 2
    # the model read the whole conversation so far, user turns only, and nothing after :reset
    assert encoder("").seen == [
        [("user", "tell me about jaguars")],
        [("user", "tell me about jaguars"), ("user", "what do they eat")],
        [("user", "how do I cook pasta")],
    ]


def test_chat_interactive_prompts_until_eof(index_dir, monkeypatch, capsys):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    capsys.readouterr()
    stdin = Terminal("where do jaguars live\n")
    assert _chat(monkeypatch, stdin, ["--index", str(index_dir), "--snippet-chars", "0"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("chatretriever chat: 5 passages, model fake:")
    assert ":reset" in out and ":quit" in out
    assert out.count("you> ") == 2  # one turn, then EOF at the second prompt
    assert " 1. [" in out and "Jaguar range (range)" in out
    assert "rainforests" not in out  # --snippet-chars 0: titles only


def test_chat_on_a_plain_index_needs_model_and_takes_corpus(tmp_path, encoder, monkeypatch, capsys):
    write(tmp_path / "corpus.jsonl", jsonl(CORPUS))
    main(
        ["encode", str(tmp_path / "corpus.jsonl"), "--model", "fake:", "--out", str(tmp_path / "e")]
    )
    main(["index", str(tmp_path / "e"), "--out", str(tmp_path / "idx")])
    capsys.readouterr()
    argv = ["--index", str(tmp_path / "idx")]
    assert _chat(monkeypatch, io.StringIO("owls\n"), argv) == 2
    assert "does not record its model: pass --model" in capsys.readouterr().err
    argv += ["--model", "fake:", "--corpus", str(tmp_path / "corpus.jsonl"), "--k", "1"]
    assert _chat(monkeypatch, io.StringIO("what do owls hunt\n"), argv) == 0
    assert "Owls (owls)" in capsys.readouterr().out


def test_chat_refuses_another_encoder_and_bad_corpus(index_dir, tmp_path, monkeypatch, capsys):
    capsys.readouterr()
    argv = ["--index", str(index_dir), "--model", "fake:other"]
    assert _chat(monkeypatch, io.StringIO("owls\n"), argv) == 2
    err = capsys.readouterr().err
    assert "model 'fake-hash'" in err and "model 'other'" in err and "\n" not in err.strip()
    write(tmp_path / "small.jsonl", jsonl(CORPUS[:2]))
    argv = ["--index", str(index_dir), "--corpus", str(tmp_path / "small.jsonl")]
    assert _chat(monkeypatch, io.StringIO("owls\n"), argv) == 2
    assert "small.jsonl: lacks 3 of the 5 indexed ids" in capsys.readouterr().err


def test_conversation_holds_user_turns_and_resets():
    c = Conversation()
    with pytest.raises(ValueError, match="empty"):
        c.session()
    with pytest.raises(ValueError, match="needs some text"):
        c.add("   ")
    c.add(" first ")
    s = c.add("second")
    assert s.id == "chat::2" and [t.content for t in s.turns] == ["first", "second"]
    assert {t.role for t in s.turns} == {"user"} and s.question == "second"
    c.reset()
    assert len(c) == 0 and c.add("again").id == "chat::1"


def test_searcher_and_corpus_index_library(tmp_path):
    write(tmp_path / "corpus.jsonl", jsonl(CORPUS))
    enc = HashEncoder(name="lib")
    built = build_corpus_index(enc, "fake:lib", tmp_path / "corpus.jsonl", tmp_path / "idx")
    loaded = CorpusIndex.load(tmp_path / "idx")
    assert loaded.model == "fake:lib" and len(loaded.index) == 5 == len(built.index)
    assert loaded.passages["diet"].title == "Jaguar diet"
    assert CorpusIndex.load(tmp_path / "idx", with_passages=False).passages is None
    searcher = ChatSearcher(enc, loaded, k=3)
    hits = searcher.search(Conversation().add("what do owls hunt"))
    assert [h.rank for h in hits] == [1, 2, 3] and hits[0].doc_id == "owls"
    assert hits[0].title == "Owls" and hits[0].score >= hits[1].score >= hits[2].score
    with pytest.raises(ValueError, match="k must be positive"):
        ChatSearcher(enc, loaded, k=0)


def test_format_hits_and_snippet():
    long = "word " * 100
    assert snippet("a\n  b   c") == "a b c"
    assert len(snippet(long, 30)) <= 30 and snippet(long, 30).endswith(" ...")
    hits = [Hit(1, "a", 0.5, "Title A", long), Hit(2, "b", 0.25)]
    text = format_hits(hits, relevant={"b"}, snippet_chars=20)
    assert text.splitlines() == [
        "    1. [0.500] Title A (a)",
        "        word word word ...",
        "  * 2. [0.250] b (b)",
    ]
    assert format_hits([]) == "  (no results)"


def _bytes_stdin(data: bytes, errors: str) -> io.TextIOWrapper:
    """stdin as Python opens it: UTF-8 text over bytes (strict under a UTF-8 locale,
    surrogateescape under the C locale)."""
    return io.TextIOWrapper(io.BytesIO(data), encoding="utf-8", errors=errors)


@pytest.mark.parametrize("errors", ["strict", "surrogateescape"])
def test_chat_skips_a_line_that_is_not_text_and_goes_on(
    index_dir, encoder, monkeypatch, capsys, errors
):
    capsys.readouterr()
    stdin = _bytes_stdin(b"tell me about jaguars\njaguar \xff\xfe diet\nwhat do they eat\n", errors)
    assert _chat(monkeypatch, stdin, ["--index", str(index_dir), "--k", "1"]) == 0
    out = capsys.readouterr().out
    assert list(_turn_blocks(out)) == ["turn 1: tell me about jaguars", "turn 2: what do they eat"]
    assert "(skipped: the line holds byte 0xff, not utf-8 text, at character 8; type it again)" in (
        out
    )
    # the conversation went on: the second turn was searched with the first
    assert encoder("").seen[-1] == [("user", "tell me about jaguars"), ("user", "what do they eat")]


def test_chat_skips_a_lone_surrogate(index_dir, encoder, monkeypatch, capsys):
    capsys.readouterr()
    stdin = io.StringIO("owls\njaguar \ud800 diet\nwhat do they hunt\n")
    assert _chat(monkeypatch, stdin, ["--index", str(index_dir), "--k", "1"]) == 0
    out = capsys.readouterr().out
    assert "(skipped: the line holds a lone surrogate \\ud800, at character 8" in out
    assert list(_turn_blocks(out)) == ["turn 1: owls", "turn 2: what do they hunt"]


class AnsweringEncoder(RecordingEncoder):
    """Answers every turn; says on the way what transformers says when decoding with a BPE
    tokenizer whose files set clean_up_tokenization_spaces, and another warning."""

    def answer_batch(self, items, max_new_tokens=96, batch_size=8):
        import logging

        said_by = logging.getLogger("transformers.tokenization_utils_tokenizers")
        said_by.warning(
            "Ignoring clean_up_tokenization_spaces=True for BPE tokenizer TokenizersBackend. The "
            "clean_up_tokenization post-processing step is designed for WordPiece tokenizers"
        )
        said_by.warning("something else to know")
        return ["jaguars eat deer" for _ in items]


def test_chat_answer_hides_the_bpe_cleanup_notice(tmp_path, monkeypatch, capsys):
    import logging

    register_encoder("fakeans", lambda rest: AnsweringEncoder(name="answering"))
    try:
        write(tmp_path / "corpus.jsonl", jsonl(CORPUS))
        argv = ["index", str(tmp_path / "corpus.jsonl"), "--out", str(tmp_path / "idx")]
        assert main([*argv, "--model", "fakeans:"]) == 0
        seen: list[str] = []

        class Collect(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                seen.append(record.getMessage())

        said_by = logging.getLogger("transformers.tokenization_utils_tokenizers")
        collect = Collect()
        said_by.addHandler(collect)
        try:
            argv = ["--index", str(tmp_path / "idx"), "--answer", "--k", "1"]
            assert _chat(monkeypatch, io.StringIO("what do jaguars eat\n"), argv) == 0
        finally:
            said_by.removeHandler(collect)
    finally:
        unregister_encoder("fakeans")
    assert "jaguars eat deer" in capsys.readouterr().out
    assert seen == ["something else to know"]  # the notice no chat user can act on is dropped
