"""Optional paraphrasing of template queries by a local chat LLM, with a JSONL cache.

The paper had GPT-4 write the US2I summaries and AS2I search queries; here they come from
templates, and `paraphrase_queries` can have a local chat LLM (e.g. `smollm2-135m-instruct`)
rewrite them. Every answer is cached by (model name, prompt) in a JSONL file, so a rebuild with
the same seed asks the LLM nothing. A reply that is empty, multi-line or far longer than the
query, or that echoes the instruction, keeps the template text (small LLMs ramble: with
SmolLM2-135M most US2I/AS2I replies are rejected).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from tqdm.auto import tqdm

from chatretriever.io.files import iter_jsonl, require, write_jsonl
from chatretriever.methods.items.schema import GAME_NOUN
from chatretriever.methods.items.tasks import ItemQuery

logger = logging.getLogger(__name__)

ChatFn = Callable[[list[dict[str, str]]], str]
PARAPHRASED_TASKS = ("US2I", "AS2I")
_ASK = {
    "US2I": "Rewrite this description of a gamer's taste in one natural sentence, in the first "
    "person. Reply with the sentence only.\n\n{query}",
    "AS2I": "Rewrite this as a short web search query someone would type to find the game. "
    "Reply with the query only.\n\n{query}",
}
_ASK_NEUTRAL = {  # a catalog of something else than games ({noun}: the schema's)
    "US2I": "Rewrite this description of a person's taste in {nouns} in one natural sentence, "
    "in the first person. Reply with the sentence only.\n\n{query}",
    "AS2I": "Rewrite this as a short web search query someone would type to find the {noun}. "
    "Reply with the query only.\n\n{query}",
}


class ParaphraseCache:
    """(model, prompt) -> reply, kept in a JSONL file (`save` rewrites it atomically).

    Args:
        path: The cache file (created on `save` when missing).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.entries: dict[str, dict[str, str]] = {}
        if self.path.is_file():
            for line, obj in iter_jsonl(self.path):
                self.entries[require(obj, "key", self.path, line)] = obj

    @staticmethod
    def key(model: str, prompt: str) -> str:
        return hashlib.sha256(f"{model}\x1f{prompt}".encode()).hexdigest()[:32]

    def get(self, model: str, prompt: str) -> str | None:
        entry = self.entries.get(self.key(model, prompt))
        return None if entry is None else entry["reply"]

    def put(self, model: str, prompt: str, reply: str) -> None:
        self.entries[self.key(model, prompt)] = {
            "key": self.key(model, prompt),
            "model": model,
            "prompt": prompt,
            "reply": reply,
        }

    def save(self) -> None:
        write_jsonl(self.path, list(self.entries.values()))


_ECHOES = ("rewrite", "sentence", "search query", "description")  # the instruction echoed


def _usable(reply: str, query: str) -> bool:
    text = reply.strip()
    if not text or "\n" in text or len(text) > 3 * len(query) + 40:
        return False
    return not any(w in text.casefold() for w in _ECHOES)


def paraphrase_queries(
    queries: Sequence[ItemQuery],
    chat: ChatFn | None,
    cache: ParaphraseCache,
    model: str,
    tasks: Sequence[str] = PARAPHRASED_TASKS,
    noun: str = GAME_NOUN,
    nouns: str = "",
) -> list[ItemQuery]:
    """The queries with those of `tasks` rewritten by the LLM (cached).

    Args:
        queries: Generated queries.
        chat: The chat LLM; None: cached replies only (the rest keep their text).
        cache: The cache (saved by the caller).
        model: The LLM's name (part of the cache key).
        tasks: Which tasks to paraphrase.
        noun: What one item is (the schema's noun): "game" asks in the paper's Steam words.
        nouns: Its plural (default: noun + "s").

    Returns:
        The queries in the same order.
    """
    out, asked, kept = [], 0, 0
    for q in tqdm(queries, desc="paraphrase", disable=chat is None):
        if q.task not in tasks:
            out.append(q)
            continue
        if noun == GAME_NOUN:
            prompt = _ASK[q.task].format(query=q.query)
        else:
            prompt = _ASK_NEUTRAL[q.task].format(
                query=q.query, noun=noun, nouns=nouns or f"{noun}s"
            )
        reply = cache.get(model, prompt)
        if reply is None and chat is not None:
            reply = chat([{"role": "user", "content": prompt}])
            cache.put(model, prompt, reply)
            asked += 1
        if reply is not None and _usable(reply, q.query):
            out.append(dataclasses.replace(q, query=reply.strip().strip('"')))
        else:
            out.append(q)
            kept += 1
    logger.info("paraphrase: %d asked, %d kept their template text", asked, kept)
    return out
