"""chatretriever: turn chat LLMs into retrievers that read the whole conversation."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from chatretriever.errors import DataFormatError
from chatretriever.types import Passage, Qrel, Run, ScoredDoc, Session, Turn

__version__ = "0.1.0"

if TYPE_CHECKING:
    from chatretriever.methods.chatretriever.model import ChatRetriever


def __getattr__(name: str) -> Any:
    # ChatRetriever needs torch: import it only when asked for (nothing heavy at import).
    if name == "ChatRetriever":
        from chatretriever.methods.chatretriever.model import ChatRetriever

        return ChatRetriever
    raise AttributeError(f"module 'chatretriever' has no attribute {name!r}")


__all__ = [
    "ChatRetriever",
    "DataFormatError",
    "Passage",
    "Qrel",
    "Run",
    "ScoredDoc",
    "Session",
    "Turn",
    "__version__",
]
