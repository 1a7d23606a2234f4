"""Build CSIT training examples from datasets and hold conversations out (negatives: `negatives`).

Parsing of each public dataset lives in its `chatretriever.io` module; this module only turns the
parsed sessions into `TrainingExample`s (see `chatretriever.io.training`).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

from chatretriever.errors import DataFormatError
from chatretriever.io.files import iter_jsonl, iter_lines
from chatretriever.io.sessions import session_from_dict
from chatretriever.io.training import (
    TrainingExample,
    TrainingPassage,
    example_from_session,
)
from chatretriever.types import Passage, Qrel, Session, Turn

logger = logging.getLogger(__name__)

_Item = TypeVar("_Item", Session, TrainingExample)


# ----------------------------------------------------------------------------- hold-out


_CONVERSATION_KEYS = ("conversation_id", "conversation", "topic")


def conversation_id(item: Session | TrainingExample) -> str:
    """The conversation a session (or example) belongs to.

    The first of `metadata["conversation_id"]` (MTRAG), `["conversation"]` (TopiOCQA) and
    `["topic"]` (CAsT); else the part of the id before `<::>`; else the id itself.
    """
    for key in _CONVERSATION_KEYS:
        if item.metadata.get(key) is not None:
            return str(item.metadata[key])
    return item.id.split("<::>")[0]


def in_holdout_fraction(conv_id: str, fraction: float, seed: int = 0) -> bool:
    """Whether a conversation falls in the deterministic held-out fraction.

    The decision hashes (seed, conversation id) only, so it never depends on the order or the
    set of other conversations: the same conversation is held out in every build.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"hold-out fraction must be in [0, 1], got {fraction}")
    digest = hashlib.sha256(f"{seed}:{conv_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def read_id_list(path: str | Path) -> set[str]:
    """Read ids, one a line; blank lines and `#` comments are skipped."""
    return {s for _, line in iter_lines(path) if (s := line.strip()) and not s.startswith("#")}


def first_question(item: Session | TrainingExample) -> str:
    """The conversation's opening user message: a hold-out key that also keeps conversations
    grown from the same seed question (MTRAG has such siblings) on one side of the split."""
    turns = item.turns if isinstance(item, Session) else item.messages
    return next(t.content for t in turns if t.role == "user")


def split_heldout(
    sessions: Iterable[_Item],
    heldout_ids: Iterable[str] = (),
    fraction: float = 0.0,
    seed: int = 0,
    key: Callable[[_Item], str] = conversation_id,
) -> tuple[list[_Item], list[_Item]]:
    """Split sessions into (train, held out) by conversation, never splitting one conversation.

    Args:
        sessions: All sessions (or training examples).
        heldout_ids: Conversation ids (`conversation_id`) to hold out.
        fraction: Also hold out this deterministic fraction of conversations, decided by
            hashing `key(session)` (see `in_holdout_fraction`).
        seed: Seed of the fraction hash.
        key: The grouping hashed for the fraction: `conversation_id` or `first_question`.

    Returns:
        (train sessions, held-out sessions), each in input order.
    """
    explicit = set(heldout_ids)
    train: list[_Item] = []
    held: list[_Item] = []
    for s in sessions:
        out = conversation_id(s) in explicit
        out = out or (fraction > 0 and in_holdout_fraction(key(s), fraction, seed))
        (held if out else train).append(s)
    return train, held


# ----------------------------------------------------------------------------- builders


def examples_from_responses(
    sessions: Iterable[Session],
    source: str,
    positive_id: Callable[[Session], str | None] | None = None,
    skip: Iterable[str] = (),
) -> list[TrainingExample]:
    """Session -> its response as the one positive and the target (TopiOCQA, CAsT, chat logs).

    Args:
        sessions: Sessions whose `response` is set; those without one are skipped.
        source: Source name stored on each example.
        positive_id: Optional id of the response passage (e.g. a CAsT canonical passage id).
        skip: Responses that are not answers (e.g. "UNANSWERABLE"), compared case-insensitively.

    Returns:
        The examples, in session order.
    """
    skip_set = {s.strip().casefold() for s in skip}
    out, dropped = [], 0
    for s in sessions:
        text = (s.response or "").strip()
        if not text or text.casefold() in skip_set:
            dropped += 1
            continue
        pid = positive_id(s) if positive_id else None
        pos = [TrainingPassage(text, pid)]
        out.append(example_from_session(s, pos, target=text, source=source))
    logger.info("%s: %d examples, %d sessions without a usable response", source, len(out), dropped)
    return out


def examples_from_qrels(
    sessions: Iterable[Session],
    qrels: Iterable[Qrel],
    passages: Mapping[str, Passage],
    source: str,
    min_relevance: int = 1,
) -> list[TrainingExample]:
    """Session -> its judged-relevant passages as positives, its response as target (MTRAG).

    Args:
        sessions: Sessions (their ids are the qrels' query ids).
        qrels: Relevance judgments.
        passages: Doc id -> Passage for (at least) the judged documents.
        source: Source name stored on each example.
        min_relevance: Smallest relevance that counts as positive.

    Returns:
        The examples of sessions with at least one positive found in `passages` (passages
        with blank text, which real corpora hold, are skipped).
    """
    rel: dict[str, list[str]] = {}
    for q in qrels:
        if q.relevance >= min_relevance:
            rel.setdefault(q.query_id, []).append(q.doc_id)
    out, missing = [], 0
    for s in sessions:
        docs = sorted(rel.get(s.id, ()))
        missing += sum(d not in passages for d in docs)
        pos = [passages[d] for d in docs if d in passages and passages[d].text.strip()]
        if pos:
            out.append(example_from_session(s, pos, source=source))
    if missing:
        logger.warning("%s: %d judged documents are not in the passages given", source, missing)
    return out


def read_chat_examples(
    path: str | Path, source: str = "sessions", seen: dict[str, str] | None = None
) -> list[TrainingExample]:
    """Examples from a sessions JSONL file (see `chatretriever.io.sessions`).

    A line whose messages end with the user's question takes its `"response"`; a line whose
    messages end with an assistant turn uses that turn as the response to the turns before it.
    The response is the positive and the target. Lines without a response (none, or blank, as
    `data convert` writes unanswered turns) are skipped and counted; a file where no line has
    one raises, naming the first. An answered line's id used twice (in this file, or in `seen`:
    id -> where it was first read, filled in) raises, naming both lines.
    """
    sessions, first_without = [], None
    seen = {} if seen is None else seen
    for lineno, obj in iter_jsonl(path):
        msgs = obj.get("messages")
        if isinstance(msgs, list) and msgs and isinstance(msgs[-1], Mapping):
            if msgs[-1].get("role") == "assistant":
                content = msgs[-1].get("content")
                if not isinstance(content, str):
                    where = f"messages[{len(msgs) - 1}].content"
                    raise DataFormatError(path, "content must be a string", lineno, where)
                obj = {**obj, "messages": msgs[:-1], "response": content}
        s = session_from_dict(obj, path, lineno)
        if not (s.response or "").strip():
            first_without = first_without or lineno
        elif s.id in seen:  # two examples of one id (skipped lines make none)
            msg = f"duplicate id {s.id!r} (first at {seen[s.id]})"
            raise DataFormatError(path, msg, lineno, "id")
        else:
            seen[s.id] = f"{path}:{lineno}"
        sessions.append(s)
    if first_without is not None and all(not (s.response or "").strip() for s in sessions):
        msg = "needs a response or a final assistant turn (no line has one)"
        raise DataFormatError(path, msg, first_without, "response")
    return examples_from_responses(sessions, source)


def read_triples(path: str | Path, source: str = "triples") -> list[TrainingExample]:
    """Examples from MS MARCO-style TSV lines `query \\t positive [\\t negative]`.

    The query becomes a one-turn session; the id is `<file stem>-<line>`.
    """
    stem = Path(path).name.split(".")[0]
    out = []
    for lineno, line in iter_lines(path):
        cols = line.split("\t")
        if len(cols) not in (2, 3):
            raise DataFormatError(
                path, f"expected 2 or 3 tab-separated columns, got {len(cols)}", lineno
            )
        names = ("query", "positive", "negative")
        for name, col in zip(names, cols, strict=False):
            if not col.strip():
                raise DataFormatError(path, "empty column", lineno, name)
        neg = [TrainingPassage(cols[2])] if len(cols) == 3 else []
        out.append(
            TrainingExample(
                id=f"{stem}-{lineno}",
                messages=(Turn("user", cols[0]),),
                positives=(TrainingPassage(cols[1]),),
                negatives=tuple(neg),
                source=source,
            )
        )
    return out


def mtrag_examples(
    sessions: Iterable[Session],
    qrels: Iterable[Qrel],
    passages: Mapping[str, Passage],
    use_contexts: bool = True,
) -> list[TrainingExample]:
    """MTRAG task -> its judged passages as positives, the reference answer as target.

    Args:
        sessions: MTRAG tasks (`chatretriever.io.mtrag`).
        qrels: Their judgments.
        passages: The MTRAG corpus by id (positives' texts come from it).
        use_contexts: Tasks without judgments (e.g. underspecified questions) use their
            reference passages (`metadata["context_ids"]`) instead.

    Returns:
        One example per task with at least one positive, source "mtrag".
    """
    sessions = list(sessions)
    qrels = list(qrels)
    if use_contexts:
        judged = {q.query_id for q in qrels}
        qrels += [
            Qrel(s.id, d, 1)
            for s in sessions
            if s.id not in judged
            for d in s.metadata.get("context_ids", ())
        ]
    return examples_from_qrels(sessions, qrels, passages, "mtrag")


def topiocqa_examples(sessions: Iterable[Session]) -> list[TrainingExample]:
    """TopiOCQA turn -> its answer as the positive and target; unanswerable turns are skipped."""
    return examples_from_responses(sessions, "topiocqa", skip=["UNANSWERABLE"])


def qrecc_examples(sessions: Iterable[Session]) -> list[TrainingExample]:
    """QReCC turn -> its answer as the positive and target (turns without one are skipped)."""
    return examples_from_responses(sessions, "qrecc")


def _cast_passage_id(session: Session) -> str | None:
    """CAsT 2021 names its canonical response passage `{canonical_result_id}-{passage_id}`."""
    doc, part = (session.metadata.get(k) for k in ("canonical_result_id", "passage_id"))
    return None if doc is None else str(doc) if part is None else f"{doc}-{part}"


def cast_examples(sessions: Iterable[Session]) -> list[TrainingExample]:
    """TREC CAsT turn -> its canonical response passage (2021, 2022) as positive and target."""
    return examples_from_responses(sessions, "cast", positive_id=_cast_passage_id)


POSITIVES = ("passages", "answers")
"""What a builder takes as positives: the judged/cited passages, or the reference answers."""


def examples_from_cited(
    sessions: Iterable[Session],
    passages: Mapping[str, Passage],
    source: str,
    key: str,
    positives: str = "passages",
) -> list[TrainingExample]:
    """Session -> the passages its `metadata[key]` cites as positives (or, with
    positives="answers", its response), its response as the target (iKAT, DSTC11).

    Args:
        sessions: Sessions whose metadata lists cited passage ids under `key`.
        passages: Passage id -> Passage.
        source: Source name stored on each example.
        key: The metadata field of cited ids ("passage_ids", "snippet_ids").
        positives: "passages" or "answers" (`examples_from_responses`, cited sessions only;
            with no passages at all, sessions citing any id).

    Returns:
        The examples of sessions that cite at least one known passage, in session order.
    """
    if positives not in POSITIVES:
        raise ValueError(f"positives must be one of {POSITIVES}, got {positives!r}")
    cited = [s for s in sessions if any(p in passages for p in s.metadata.get(key, ()))]
    if positives == "answers":
        if not passages:  # no texts published (iKAT 2024/2025): whatever cites a passage
            cited = [s for s in sessions if s.metadata.get(key)]
        return examples_from_responses(cited, source)
    out = []
    for s in cited:
        ids = [p for p in dict.fromkeys(s.metadata[key]) if p in passages]
        pos = [passages[p] for p in ids if passages[p].text.strip()]
        if pos:
            out.append(example_from_session(s, pos, source=source))
    logger.info("%s: %d examples with cited passages", source, len(out))
    return out


def ikat_examples(
    sessions: Iterable[Session], passages: Mapping[str, Passage], positives: str = "passages"
) -> list[TrainingExample]:
    """TREC iKAT turn -> its cited passages (`response_provenance`) as positives, its response as
    target, its human rewrite in metadata["rewrite"] (the teacher's query)."""
    return examples_from_cited(sessions, passages, "ikat", "passage_ids", positives)


def dstc11_examples(
    sessions: Iterable[Session], snippets: Mapping[str, Passage], positives: str = "passages"
) -> list[TrainingExample]:
    """DSTC11 track 5 knowledge-seeking turn -> its grounding review/FAQ snippets as positives,
    its response as target (turns that seek no knowledge have none and are skipped)."""
    return examples_from_cited(sessions, snippets, "dstc11", "snippet_ids", positives)


def drop_same_entity_negatives(
    examples: Iterable[TrainingExample], n_negatives: int
) -> list[TrainingExample]:
    """Keep the first `n_negatives` negatives not about an entity of the example's positives
    (DSTC11: other review sentences of the same hotel or restaurant often answer the question
    too, unlabelled: false negatives). Entities are the `domain:entity_id` prefix of the ids."""

    def entity(p: TrainingPassage) -> str | None:
        return None if p.id is None else ":".join(p.id.split(":")[:2])

    out = []
    for ex in examples:
        own = {entity(p) for p in ex.positives} - {None}
        keep = [p for p in ex.negatives if entity(p) not in own][:n_negatives]
        out.append(replace(ex, negatives=tuple(keep)))
    return out
