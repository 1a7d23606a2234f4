"""The CSIT training example: a session, its positive and negative passages, a generation target.

Training JSONL, one example per line::

    {"id": "q1",
     "messages": [{"role": "user", "content": "..."}, ...],   # the session, ends with the question
     "positives": [{"id"?: "d1", "title"?: "...", "text": "..."}],   # at least one
     "negatives": [{"id"?, "title"?, "text"}],                 # optional, default []
     "target": "..." | null,                                   # optional, default null
     "source": "mtrag",                                        # optional, default ""
     "teacher": {"model": "minilm-l6", "query": "rewrite",     # optional: teacher scores of
                 "positives": [0.71], "negatives": [0.42, ...]},  # each positive and negative
     "metadata": {...}}                                        # optional, default {}

`target` is what the session-masked LM loss learns to generate after the session (e.g. the
reference answer). When it is null the trainer uses the first positive's text instead
(`TrainingExample.target_text`). No tokenizing happens here: that is `collate.py`'s job.

Every positive is relevant: training never scores a passage as a negative of a session when it
has the id or the normalised text of any of that session's positives (`passage_keys`).
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chatretriever.errors import DataFormatError
from chatretriever.io.files import iter_jsonl, require, write_jsonl
from chatretriever.io.sessions import parse_messages
from chatretriever.types import Passage, Session, Turn

_FIELDS = ("id", "messages", "positives", "negatives", "target", "source", "teacher", "metadata")
_WORD = re.compile(r"\w+")


@dataclass(frozen=True)
class TrainingPassage:
    """A positive or negative passage of a training example; only the text is required."""

    text: str
    id: str | None = None
    title: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.text, str) or not self.text.strip():
            raise ValueError("TrainingPassage.text must be a non-empty string")

    @classmethod
    def from_passage(cls, p: Passage) -> TrainingPassage:
        return cls(text=p.text, id=p.id, title=p.title)

    def to_dict(self) -> dict[str, str]:
        out: dict[str, str] = {}
        if self.id is not None:
            out["id"] = self.id
        if self.title:
            out["title"] = self.title
        out["text"] = self.text
        return out


def normalized_text(text: str) -> str:
    """A passage's text for near-duplicate detection: Unicode NFKC, case-folded, punctuation
    dropped, words joined by single spaces ("Paris,  the CAPITAL." -> "paris the capital")."""
    return " ".join(_WORD.findall(unicodedata.normalize("NFKC", text).casefold()))


def _key(text: str) -> int:
    """A non-negative int64 key of a string, the same in every process (hash() is salted)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big") >> 1


def passage_keys(passage: TrainingPassage, namespace: str = "") -> tuple[int, int]:
    """The identity keys of a passage: two passages are the same when either key matches.

    Args:
        passage: The passage.
        namespace: Where its id is unique (an example's `source`: two corpora may reuse ids).

    Returns:
        (id key, or -1 without an id; key of its `normalized_text`, the title left out, so
        copies of one text under other ids or titles, or with other spacing, case or
        punctuation, share it).
    """
    id_key = -1 if passage.id is None else _key(f"{namespace}\x1f{passage.id}")
    text = normalized_text(passage.text) or passage.text.strip()  # all punctuation: keep as is
    return id_key, _key(text)


@dataclass(frozen=True)
class TeacherScores:
    """An off-the-shelf embedder's scores of one example's positives and negatives (in order),
    precomputed once by `build-train --teacher` for the distillation loss.

    Attributes:
        model: The teacher's name (and fingerprint, when known: "name@fp").
        positives: One score per positive.
        negatives: One score per negative.
        query: The formulation the teacher scored with ("rewrite", "user_turns").
    """

    model: str
    positives: tuple[float, ...]
    negatives: tuple[float, ...] = ()
    query: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "query": self.query,
            "positives": list(self.positives),
            "negatives": list(self.negatives),
        }


@dataclass(frozen=True)
class TrainingExample:
    """One CSIT training example.

    Attributes:
        id: Unique example id (usually the session id).
        messages: The session, oldest turn first, ending with the user's question.
        positives: Passages relevant to the question (at least one).
        negatives: Hard negatives (may be empty: in-batch negatives still apply).
        target: The generation target of the session-masked LM loss, or None to use
            the first positive's text (see `target_text`).
        source: Which dataset/builder made it (e.g. "mtrag", "topiocqa").
        metadata: Free extras (conversation id, domain, ...).
        teacher: Teacher scores of the positives and negatives, or None.
    """

    id: str
    messages: tuple[Turn, ...]
    positives: tuple[TrainingPassage, ...]
    negatives: tuple[TrainingPassage, ...] = ()
    target: str | None = None
    source: str = ""
    metadata: Mapping[str, Any] = field(default_factory=dict)
    teacher: TeacherScores | None = None

    def __post_init__(self) -> None:
        if not self.id:
            raise ValueError("TrainingExample.id must be a non-empty string")
        if not self.messages or self.messages[-1].role != "user":
            raise ValueError("TrainingExample.messages must end with the user's question")
        if not self.positives:
            raise ValueError("TrainingExample.positives must not be empty")
        t = self.teacher
        if t is not None and (
            len(t.positives) != len(self.positives) or len(t.negatives) != len(self.negatives)
        ):
            raise ValueError(
                f"example {self.id!r}: teacher scores for {len(t.positives)} positives and "
                f"{len(t.negatives)} negatives, the example has {len(self.positives)} and "
                f"{len(self.negatives)} (score again after changing its passages)"
            )

    @property
    def target_text(self) -> str:
        """The text the session-masked LM loss generates: `target`, else the first positive."""
        return self.target if self.target is not None else self.positives[0].text

    def session(self) -> Session:
        """The example's conversation as a Session (for encoders and mining queries)."""
        return Session(self.id, self.messages, response=self.target, metadata=self.metadata)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "messages": [t.to_dict() for t in self.messages],
            "positives": [p.to_dict() for p in self.positives],
            "negatives": [p.to_dict() for p in self.negatives],
            "target": self.target,
            "source": self.source,
        }
        if self.teacher is not None:
            out["teacher"] = self.teacher.to_dict()
        if self.metadata:
            out["metadata"] = dict(self.metadata)
        return out


def example_from_session(
    session: Session,
    positives: Sequence[TrainingPassage | Passage],
    negatives: Sequence[TrainingPassage | Passage] = (),
    target: str | None = None,
    source: str = "",
    metadata: Mapping[str, Any] | None = None,
) -> TrainingExample:
    """Make a training example from a session.

    Args:
        session: The conversation; its id becomes the example id.
        positives: Relevant passages (Passage objects are converted).
        negatives: Negative passages.
        target: Generation target; defaults to `session.response` (which may be None).
        source: Builder/dataset name.
        metadata: Extras; defaults to the session's metadata (plus its human rewrite, as
            "rewrite", when it has one).

    Returns:
        The TrainingExample.
    """

    def conv(ps: Sequence[TrainingPassage | Passage]) -> tuple[TrainingPassage, ...]:
        return tuple(TrainingPassage.from_passage(p) if isinstance(p, Passage) else p for p in ps)

    meta = dict(session.metadata if metadata is None else metadata)
    if session.rewrite:  # the teacher's query (`training_data.teacher.teacher_query`)
        meta.setdefault("rewrite", session.rewrite)
    return TrainingExample(
        id=session.id,
        messages=tuple(session.turns),
        positives=conv(positives),
        negatives=conv(negatives),
        target=session.response if target is None else target,
        source=source,
        metadata=meta,
    )


def _parse_passages(
    raw: Any, path: str | Path, line: int, name: str, allow_empty: bool
) -> tuple[TrainingPassage, ...]:
    if not isinstance(raw, list):
        raise DataFormatError(path, "expected a list of passages", line, name)
    if not raw and not allow_empty:
        raise DataFormatError(path, "must not be empty", line, name)
    out = []
    for i, p in enumerate(raw):
        where = f"{name}[{i}]"
        if not isinstance(p, Mapping):
            raise DataFormatError(path, "expected an object", line, where)
        text = p.get("text")
        if not isinstance(text, str) or not text.strip():
            raise DataFormatError(path, "text must be a non-empty string", line, f"{where}.text")
        pid, title = p.get("id"), p.get("title") or ""
        if pid is not None and not isinstance(pid, (str, int)):
            raise DataFormatError(path, "id must be a string", line, f"{where}.id")
        if not isinstance(title, str):
            raise DataFormatError(path, "title must be a string", line, f"{where}.title")
        out.append(TrainingPassage(text=text, id=None if pid is None else str(pid), title=title))
    return tuple(out)


def _parse_scores(raw: Any, path: str | Path, line: int, name: str, n: int) -> tuple[float, ...]:
    if not isinstance(raw, list) or len(raw) != n:
        raise DataFormatError(path, f"expected a list of {n} scores", line, name)
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in raw):
        raise DataFormatError(path, "scores must be numbers", line, name)
    return tuple(float(x) for x in raw)


def _parse_teacher(
    raw: Any, path: str | Path, line: int, n_pos: int, n_neg: int
) -> TeacherScores | None:
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise DataFormatError(path, "expected an object", line, "teacher")
    model, query = raw.get("model"), raw.get("query", "")
    if not isinstance(model, str) or not model:
        raise DataFormatError(path, "model must be a non-empty string", line, "teacher.model")
    if not isinstance(query, str):
        raise DataFormatError(path, "query must be a string", line, "teacher.query")
    pos = _parse_scores(raw.get("positives"), path, line, "teacher.positives", n_pos)
    neg = _parse_scores(raw.get("negatives", []), path, line, "teacher.negatives", n_neg)
    return TeacherScores(model, pos, neg, query)


def example_from_dict(
    obj: Mapping[str, Any], path: str | Path = "<input>", line: int = 0
) -> TrainingExample:
    """Parse and validate one training-JSONL object; errors name the file, line and field."""
    eid = require(obj, "id", path, line)
    if not eid:
        raise DataFormatError(path, "empty id", line, "id")
    if "messages" not in obj:
        raise DataFormatError(path, "missing field", line, "messages")
    if "positives" not in obj:
        raise DataFormatError(path, "missing field", line, "positives")
    turns = parse_messages(obj["messages"], path, line)
    positives = _parse_passages(obj["positives"], path, line, "positives", allow_empty=False)
    negatives = _parse_passages(obj.get("negatives", []), path, line, "negatives", True)
    target, source = obj.get("target"), obj.get("source", "")
    if target is not None and not isinstance(target, str):
        raise DataFormatError(path, "expected a string or null", line, "target")
    if not isinstance(source, str):
        raise DataFormatError(path, "expected a string", line, "source")
    meta = obj.get("metadata") or {}
    if not isinstance(meta, Mapping):
        raise DataFormatError(path, "expected an object", line, "metadata")
    teacher = _parse_teacher(obj.get("teacher"), path, line, len(positives), len(negatives))
    extra = {k: v for k, v in obj.items() if k not in _FIELDS}
    meta = {**meta, **extra}
    return TrainingExample(eid, turns, positives, negatives, target, source, meta, teacher)


def iter_training_examples(
    path: str | Path, require_teacher: str | None = None
) -> Iterator[TrainingExample]:
    """Stream and validate training examples from JSONL (`.gz` ok); duplicate ids raise.

    Args:
        path: The training JSONL file.
        require_teacher: Why every example needs teacher scores (e.g. "distill.weight > 0"):
            an example without them raises. None: scores are optional.

    Raises:
        DataFormatError: malformed JSON, a missing or ill-typed field, empty positives,
            a duplicate id, or missing teacher scores; the error names the file, line and field.
    """
    seen: set[str] = set()
    for lineno, obj in iter_jsonl(path):
        ex = example_from_dict(obj, path, lineno)
        if ex.id in seen:
            raise DataFormatError(path, f"duplicate id {ex.id!r}", lineno, "id")
        if require_teacher and ex.teacher is None:
            raise DataFormatError(
                path,
                f"missing ({require_teacher}: build the file with `chatretriever build-train "
                "... --teacher NAME`)",
                lineno,
                "teacher",
            )
        seen.add(ex.id)
        yield ex


def read_training_examples(path: str | Path) -> list[TrainingExample]:
    """Read a whole training JSONL file (see `iter_training_examples` to stream)."""
    return list(iter_training_examples(path))


def write_training_examples(path: str | Path, examples: Iterable[TrainingExample]) -> int:
    """Write training examples as JSONL atomically (`.gz` compresses); returns the count.

    Raises:
        ValueError: two examples share an id (nothing is written).
    """

    def rows() -> Iterator[dict[str, Any]]:
        seen: set[str] = set()
        for ex in examples:
            if ex.id in seen:
                raise ValueError(f"duplicate training example id {ex.id!r}")
            seen.add(ex.id)
            yield ex.to_dict()

    return write_jsonl(path, rows())
