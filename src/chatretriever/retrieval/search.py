"""Sessions -> top-k passages -> Run, with the query formulations used to compare retrievers.

A formulation turns a Session into the query a retriever sees. Every formulation except
"session" returns a new session holding a single user turn, so any `Encoder` (and BM25) can
search with it; "session" passes the whole conversation (what ChatRetriever is trained on).
The formulations that join several turns order them so that the reader's cut of an over-long
text drops the oldest turns, never the question (`join_turns`, `joins_newest_first`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from chatretriever.io.atomic import atomic_write
from chatretriever.io.trec import write_run
from chatretriever.retrieval.encoders import Encoder, fingerprint_of
from chatretriever.retrieval.fusion import FusionConfig, fuse_runs
from chatretriever.types import Run, Session, Turn, batch, rank_key

if TYPE_CHECKING:
    from chatretriever.retrieval.index import DenseIndex

logger = logging.getLogger(__name__)


class Formulation(str, Enum):
    """How a conversation becomes a query."""

    SESSION = "session"  # the whole session, as is (ChatRetriever)
    LAST_TURN = "last_turn"  # the current question only
    ALL_USER_TURNS = "all_user_turns"  # every user turn, concatenated
    FULL_HISTORY = "full_history"  # every turn (user and assistant), concatenated
    REWRITE = "rewrite"  # the standalone rewrite the session carries


FORMULATIONS = tuple(f.value for f in Formulation)
MISSING_REWRITE = ("error", "last_turn")


def join_turns(turns: Sequence[Turn], newest_first: bool = True) -> str:
    """One text for several turns, ordered so that cutting an over-long text keeps the newest.

    Args:
        turns: The turns, oldest first (as a session holds them), the current one last.
        newest_first: True: the current turn first, then earlier turns newest first, for a
            reader that cuts a long text's END (BM25, sentence embedders; as in ConvDR and
            LLM4CS). False: oldest first, the current turn last, for a reader that cuts its
            START (an LLM encoder's template keeps the end of an over-long turn).

    Returns:
        The turns' contents joined by newlines.
    """
    return "\n".join(t.content for t in (reversed(turns) if newest_first else turns))


def joins_newest_first(encoder: object) -> bool:
    """The `join_turns` order that keeps an encoder's question: newest first, unless the
    encoder declares `keeps_text_end` (it keeps the end of an over-long text: `EmbLLM`)."""
    return not getattr(encoder, "keeps_text_end", False)


def session_text(session: Session) -> str:
    """The text a single-text retriever (BM25, sentence embedders) reads for a session."""
    return join_turns(session.turns)


def _single_turn(session: Session, text: str) -> Session:
    return dataclasses.replace(session, turns=(Turn("user", text),))


def formulate(
    session: Session,
    formulation: Formulation | str,
    missing_rewrite: str = "error",
    newest_first: bool = True,
) -> Session:
    """Turn a session into the query of a formulation.

    Args:
        session: The conversation, ending with the current question.
        formulation: A `Formulation` or its value ("session", "last_turn", ...).
        missing_rewrite: For "rewrite" when the session has none: "error" raises ValueError,
            "last_turn" uses the current question instead (the caller logs a warning).
        newest_first: The order "all_user_turns" and "full_history" join turns in (see
            `join_turns`; `joins_newest_first(encoder)` gives an encoder's).

    Returns:
        The session itself for "session", else a session with one user turn (same id).
    """
    f = Formulation(formulation)
    if f is Formulation.SESSION:
        return session
    if f is Formulation.LAST_TURN:
        return _single_turn(session, session.question)
    if f is Formulation.ALL_USER_TURNS:
        turns = [t for t in session.turns if t.role == "user"]
        return _single_turn(session, join_turns(turns, newest_first))
    if f is Formulation.FULL_HISTORY:
        turns = [t for t in session.turns if t.role != "system"]
        return _single_turn(session, join_turns(turns, newest_first))
    if session.rewrite:
        return _single_turn(session, session.rewrite)
    if missing_rewrite == "last_turn":
        return _single_turn(session, session.question)
    raise ValueError(f"session {session.id!r} has no rewrite (use missing_rewrite='last_turn')")


def formulation_of(value: Formulation | str) -> Formulation:
    """The Formulation a value names; an unknown one is a ValueError listing them."""
    try:
        return Formulation(value)
    except ValueError:
        raise ValueError(
            f"formulation must be one of {', '.join(FORMULATIONS)}, got {value!r}"
        ) from None


def check_k(k: int) -> int:
    """k as a count of hits: an integer of at least 1."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer of at least 1, got {k!r}")
    return k


def check_queries(sessions: Sequence[Session]) -> list[Session]:
    """Sessions searched as queries: Session objects with distinct ids and a question."""
    seen: dict[str, int] = {}
    out = batch(sessions, "sessions", "Sessions")
    for i, s in enumerate(out):
        if not isinstance(s, Session):
            raise TypeError(
                f"sessions[{i}] must be a Session (its id becomes the query id), got a "
                f"{type(s).__name__}: Session.from_messages(id, messages) makes one"
            )
        if s.id in seen:
            raise ValueError(
                f"sessions[{i}].id {s.id!r} is also sessions[{seen[s.id]}]'s: each query needs "
                "its own id (their results would overwrite each other)"
            )
        if not s.question.strip():
            raise ValueError(
                f"session {s.id!r}: the current question (the last message) is empty: nothing "
                "to search for"
            )
        seen[s.id] = i
    return out


def formulate_all(
    sessions: Sequence[Session],
    formulation: Formulation | str,
    missing_rewrite: str = "error",
    newest_first: bool = True,
) -> list[Session]:
    """`formulate` every session (`newest_first`: see there); missing rewrites are counted and
    reported once.

    Raises:
        TypeError: `sessions` is not a list of Session objects (their ids become query ids).
        ValueError: Two sessions share an id (their results would overwrite each other), or
            `formulation` / `missing_rewrite` is unknown.
    """
    sessions = check_queries(sessions)
    if missing_rewrite not in MISSING_REWRITE:
        raise ValueError(f"missing_rewrite must be one of {MISSING_REWRITE}")
    f = formulation_of(formulation)
    if f is Formulation.REWRITE:
        missing = [s.id for s in sessions if not s.rewrite]
        if missing and missing_rewrite == "error":
            raise ValueError(
                f"{len(missing)} of {len(sessions)} sessions have no rewrite (first: "
                f"{missing[0]!r}); run `chatretriever rewrite` first, or search their last turn "
                "instead (`--missing-rewrite last_turn`; in Python missing_rewrite='last_turn')"
            )
        if missing:
            logger.warning(
                "%d of %d sessions have no rewrite: searching with their last turn instead",
                len(missing),
                len(sessions),
            )
    return [formulate(s, f, missing_rewrite, newest_first) for s in sessions]


def search_dense(
    encoder: Encoder,
    index: DenseIndex,
    sessions: Sequence[Session],
    k: int = 100,
    formulation: Formulation | str = Formulation.SESSION,
    batch_size: int = 16,
    missing_rewrite: str = "error",
    params: str | None = None,
    show_progress: bool = True,
) -> Run:
    """Encode formulated sessions and retrieve the top-k passages of each from a dense index.

    Every query is encoded first (the encoder batches and length-sorts them as a whole), then
    the index is searched once: one Faiss call uses all its threads on the whole (Q, D) matrix.

    Args:
        encoder: The query encoder; it must match the encoder that built the index.
        index: A `DenseIndex`.
        sessions: Conversations; their ids become query ids.
        k: Passages per query.
        formulation: See `Formulation`; turns it joins are ordered for the encoder
            (`joins_newest_first`).
        batch_size: Sessions per encoder call.
        missing_rewrite: See `formulate`.
        params: Faiss search parameters ("efSearch=128", "nprobe=16").
        show_progress: Show the encoder's progress bar.

    Returns:
        A Run named after the encoder and formulation.
    """
    check_k(k)
    index.check_encoder(encoder.name, encoder.dim, encoder.normalize, fingerprint_of(encoder))
    # joined turns in the order whose cut keeps this encoder's question (LLMs keep the end)
    queries = formulate_all(sessions, formulation, missing_rewrite, joins_newest_first(encoder))
    name = f"{encoder.name}.{Formulation(formulation).value}"
    if not queries:
        return Run(scores={}, name=name)
    emb = encoder.encode_sessions(queries, batch_size=batch_size, show_progress=show_progress)
    hits = index.search(emb, k, params)  # emb: (Q, D)
    return Run(scores={s.id: dict(h) for s, h in zip(queries, hits, strict=True)}, name=name)


class SessionSearcher(Protocol):
    """Anything that searches sessions under a formulation (`baselines.BM25Retriever`)."""

    def search(
        self,
        sessions: Sequence[Session],
        k: int = 100,
        formulation: Formulation | str = Formulation.SESSION,
        missing_rewrite: str = "error",
    ) -> Run: ...


def search_hybrid(
    encoder: Encoder,
    index: DenseIndex,
    sparse: SessionSearcher,
    sessions: Sequence[Session],
    k: int = 100,
    fusion: FusionConfig | None = None,
    formulation: Formulation | str = Formulation.SESSION,
    sparse_formulation: Formulation | str = Formulation.LAST_TURN,
    depth: int = 100,
    **dense_kwargs: Any,
) -> Run:
    """The dense run and a sparse (BM25) run of the same sessions, fused, cut to k per query.

    Args:
        encoder: The query encoder of the dense index.
        index: The dense index.
        sparse: The BM25 side (searched with `sparse_formulation`).
        sessions: Conversations; their ids become query ids.
        k: Passages per query in the fused run.
        fusion: How the runs are fused (default: RRF, k 60, equal weights).
        formulation: The dense side's formulation (the whole session for ChatRetriever).
        sparse_formulation: The sparse side's formulation (BM25 is best on the last turn).
        depth: Hits taken from each side before fusing (at least k).
        **dense_kwargs: `search_dense`'s batch_size, missing_rewrite, params, show_progress.

    Returns:
        The fused Run, named "<dense run>+<sparse run>.<method>".
    """
    depth = max(depth, check_k(k))
    dense = search_dense(encoder, index, sessions, depth, formulation, **dense_kwargs)
    missing = dense_kwargs.get("missing_rewrite", "error")
    bm25 = sparse.search(sessions, depth, sparse_formulation, missing)
    fused = fuse_runs(dense, bm25, fusion)
    top = {
        q: dict(sorted(d.items(), key=lambda kv: rank_key(*kv))[:k])
        for q, d in fused.scores.items()
    }
    return Run(top, fused.name)


def save_run(path: str | Path, run: Run, settings: dict[str, Any], depth: int | None = None) -> int:
    """Write a TREC run file and its resolved settings beside it (`<path>.settings.json`; none
    beside a device or a pipe such as /dev/stdout)."""
    n = write_run(path, run, depth)
    if not Path(path).is_file():
        return n
    with atomic_write(settings_path(path)) as f:
        json.dump({**settings, "run_name": run.name, "lines": n}, f, indent=2, default=str)
    return n


def settings_path(run_path: str | Path) -> Path:
    run_path = Path(run_path)
    return run_path.with_name(run_path.name + ".settings.json")
