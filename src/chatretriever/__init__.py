"""chatretriever: turn chat LLMs into retrievers that read the whole conversation."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from chatretriever.errors import DataFormatError
from chatretriever.types import Passage, Qrel, Run, ScoredDoc, Session, Turn

__version__ = "0.1.0"

if TYPE_CHECKING:
    from chatretriever.methods.chatretriever.model import ChatRetriever
    from chatretriever.methods.uniconv.model import UniConv


def __getattr__(name: str) -> Any:
    # The models need torch: import them only when asked for (nothing heavy at import).
    if name == "ChatRetriever":
        from chatretriever.methods.chatretriever.model import ChatRetriever

        return ChatRetriever
    if name == "UniConv":
        from chatretriever.methods.uniconv.model import UniConv

        return UniConv
    raise AttributeError(f"module 'chatretriever' has no attribute {name!r}")


def __dir__() -> list[str]:
    # the lazy names too, so that tab completion offers ChatRetriever and UniConv
    return sorted({*globals(), *__all__})


__all__ = [
    "ChatRetriever",
    "DataFormatError",
    "Passage",
    "Qrel",
    "Run",
    "ScoredDoc",
    "Session",
    "Turn",
    "UniConv",
    "__version__",
]
