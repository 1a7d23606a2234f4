"""Which MTRAG-UN tasks are evaluated: conversation id files (`--eval-conversations`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from chatretriever.io.mtrag import TASK_SEPARATOR
from chatretriever.types import Qrel, Session


def read_conversations(path: str | Path) -> set[str]:
    """Conversation ids, one per line (blank lines and # comments ignored)."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    ids = {line.strip() for line in lines if line.strip() and not line.startswith("#")}
    if not ids:
        raise ValueError(f"{path}: no conversation ids in the file")
    return ids


def conversation_of(task_id: str) -> str:
    """The conversation of an MTRAG task id ("<conversation><::><turn>")."""
    return task_id.split(TASK_SEPARATOR, 1)[0]


def restrict(
    sessions: Sequence[Session], qrels: Sequence[Qrel], conversations: set[str], source: str
) -> tuple[list[Session], list[Qrel]]:
    """The tasks and judgments of the chosen conversations only."""
    known = {conversation_of(s.id) for s in sessions}
    unknown = conversations - known
    if unknown == conversations:
        raise ValueError(f"{source}: none of its {len(unknown)} conversation ids is in the data")
    if unknown:
        print(f"  {source}: {len(unknown)} conversation ids are not in the data (ignored)")
    kept = [s for s in sessions if conversation_of(s.id) in conversations]
    return kept, [q for q in qrels if conversation_of(q.query_id) in conversations]
