"""A conversational item recommender (Chat-Rec style) and its multi-turn measurement.

Each turn the conversation so far is embedded (any `Encoder`), the top 20 items are retrieved,
and a chat LLM picks at most five of them and writes a short reply naming them. The reply is
checked: it must name at least one retrieved item and no catalog item that was not retrieved
(else the recommender falls back to listing the top retrieved items itself), so it never
recommends something retrieval did not find.

`multi_turn_requests` turns FA2I/UQ2I test queries into 2-3 turn conversations that reveal
their constraints one turn at a time; `session_vs_last_turn` compares Hit@5 of retrieving with
the whole conversation against the last turn alone.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from chatretriever.methods.items.catalog import Constraint, field_values, render_item
from chatretriever.methods.items.evaluate import RankFn, rank_items
from chatretriever.methods.items.metrics import hit_at_k
from chatretriever.methods.items.schema import GAME_NOUN, STEAM_SCHEMA, CatalogSchema
from chatretriever.methods.items.tasks import describe
from chatretriever.methods.items.templates import with_article
from chatretriever.retrieval.encoders import Encoder
from chatretriever.types import Passage, Session, Turn, batch

ChatFn = Callable[[list[dict[str, str]]], str]
"""(chat messages) -> the assistant's reply."""
MIN_TITLE = 4  # shorter catalog titles ("Go") are not looked for in replies: too many false hits

PROMPT = (
    "You are a {one} recommender. The user said:\n{conversation}\n\n"
    "Candidate {noun}:\n{candidates}\n\n"
    "Recommend at most {k} of the candidate {noun} that fit the user best. Name each by its exact "
    "title and say in a few words why. Do not mention any {one} that is not a candidate."
)  # with "games" / "game": the Steam prompt, word for word as before nouns were told
STEAM_FIELD = "game_details"  # a field only Steam's games have: such a catalog holds "games"


def catalog_noun(items: Sequence[Passage]) -> str:
    """What a catalog holds, plural, for the replies: "games" for a Steam catalog (its items
    have `game_details`), else the neutral "items"."""
    return "games" if any(STEAM_FIELD in p.metadata for p in items) else "items"


def catalog_items(items: Any, schema: CatalogSchema = STEAM_SCHEMA) -> list[Passage]:
    """The catalog as Passages: each a `Passage`, or a mapping with a string "id" and "title",
    an optional "text" (default: `render_item` with `schema`, as `read_catalog` renders a line)
    and "metadata" (default: its other fields, as a `write_catalog` line holds them).

    Raises:
        TypeError: `items` not a list, an item of another type or with non-string fields.
        ValueError: An empty catalog, an item mapping without "id" or "title".
    """
    out = []
    for i, item in enumerate(batch(items, "items", "items (Passages or mappings)")):
        if isinstance(item, Mapping):
            item = _mapping_item(item, f"items[{i}]", schema)
        elif not isinstance(item, Passage):
            raise TypeError(
                f"items[{i}] must be a Passage or a mapping, got a {type(item).__name__}"
            )
        out.append(item)
    if not out:
        raise ValueError("items: the catalog is empty; the recommender needs items to retrieve")
    return out


def _mapping_item(item: Mapping[str, Any], name: str, schema: CatalogSchema) -> Passage:
    missing = [k for k in ("id", "title") if k not in item]
    if missing:
        raise ValueError(f"{name} has no {' or '.join(map(repr, missing))} field: {sorted(item)}")
    rest = {k: v for k, v in item.items() if k not in ("id", "title", "text")}
    meta = item.get("metadata", rest)
    if not isinstance(meta, Mapping):
        raise TypeError(f"{name}: 'metadata' must be a mapping, got a {type(meta).__name__}")
    try:
        bare = Passage(item["id"], "", item["title"], dict(meta))
        text = item["text"] if "text" in item else render_item(bare, schema)  # as read_catalog
        return Passage(bare.id, text, bare.title, bare.metadata)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{name}: {e}") from None


@dataclass
class Reply:
    """One recommender turn: the text shown, the items it names, what retrieval found."""

    text: str
    named: list[Passage]
    retrieved: list[Passage]
    fell_back: bool


def named_titles(text: str, titles: Sequence[str]) -> set[str]:
    """The titles that `text` names, as whole words; a longer title claims its span first.

    "Try Portal 2" names "portal 2" and not "portal": a mention of a longer title is not a
    mention of a shorter title inside it, so each span of the text counts for one title only.

    Args:
        text: The reply, casefolded.
        titles: Casefolded titles, longest first.

    Returns:
        The titles named.
    """
    taken: list[tuple[int, int]] = []
    found = set()
    for title in titles:
        if title not in text:  # most titles: a substring test, not a regex compiled per title
            continue
        pattern = r"(?<!\w)" + re.escape(title) + r"(?!\w)"
        for m in re.finditer(pattern, text):
            if not any(a < m.end() and m.start() < b for a, b in taken):
                taken.append(m.span())
                found.add(title)
    return found


@dataclass
class ItemRecommender:
    """The recommender (see the module docstring).

    Args:
        encoder: Embeds the conversation and the items.
        items: The catalog (text = the rendered item): `Passage`s or mappings
            (`catalog_items`); not empty.
        chat: The chat LLM as a `ChatFn`; None: always list the retrieved items.
        top_k: Items retrieved per turn.
        max_picks: Most items a reply may name.
        noun: What the catalog holds, plural, as the prompt and the replies say it; None: the
            schema's plural, or without a schema or with Steam's (the default, saved by a
            build without --schema) `catalog_noun` ("games" for Steam's items, else "items").
        schema: The catalog's schema (`build-items` saves it as `schema.json`): how mapping
            items render, and the field shown beside each candidate (its `tag_field`); None:
            Steam's.

    Raises:
        TypeError, ValueError: A bad or empty catalog (`catalog_items`).
    """

    encoder: Encoder
    items: Sequence[Passage]
    chat: ChatFn | None = None
    top_k: int = 20
    max_picks: int = 5
    turns: list[Turn] = field(default_factory=list)
    noun: str | None = None
    schema: CatalogSchema | None = None

    def __post_init__(self) -> None:
        self.items = catalog_items(self.items, self.schema or STEAM_SCHEMA)
        # Steam's schema is also what a build without --schema saves: it is no choice of noun, so
        # such a catalog keeps the older rule ("games" only for items with game_details)
        explicit = self.schema is not None and self.schema != STEAM_SCHEMA
        self.noun = self.noun or (self.schema.plural if explicit else catalog_noun(self.items))
        self._shown = (self.schema or STEAM_SCHEMA).tag_field  # beside each candidate's title
        rendered = [Passage(p.id, p.text) for p in self.items]
        self._emb = self.encoder.encode_passages(rendered, 64)  # (N, D)
        folded = {p.title.casefold() for p in self.items}
        self._titles = sorted(folded, key=lambda t: (-len(t), t))  # longest first

    def reset(self) -> None:
        """Start a new conversation."""
        self.turns.clear()

    def retrieve(self) -> list[Passage]:
        """The top_k items for the conversation so far (user turns)."""
        users = [t for t in self.turns if t.role == "user"]
        q = self.encoder.encode_sessions([Session("chat", tuple(users))])  # (1, D)
        scores = (q @ self._emb.T)[0]  # (N,)
        order = np.lexsort((np.arange(len(scores)), -scores))[: self.top_k]
        return [self.items[i] for i in order]

    def respond(self, text: str) -> Reply:
        """Add a user turn; retrieve, let the LLM pick and present, check the reply."""
        self.turns.append(Turn("user", text))
        retrieved = self.retrieve()
        reply = None
        if self.chat is not None:
            raw = self.chat([{"role": "user", "content": self._prompt(retrieved)}])
            reply = self._checked(raw, retrieved)
        if reply is None:
            reply = self._fallback(retrieved)
        self.turns.append(Turn("assistant", reply.text))
        return reply

    def _prompt(self, retrieved: Sequence[Passage]) -> str:
        said = "\n".join(f"- {t.content}" for t in self.turns if t.role == "user")
        lines = [f"{i}. {self._line(p, 4)}" for i, p in enumerate(retrieved, 1)]
        one = self.noun[:-1] if self.noun.endswith("s") else self.noun  # "games" -> "game"
        return PROMPT.format(
            one=one,
            noun=self.noun,
            conversation=said,
            candidates="\n".join(lines),
            k=self.max_picks,
        )

    def _checked(self, raw: str, retrieved: Sequence[Passage]) -> Reply | None:
        """The LLM's reply when it names 1..max_picks retrieved items and nothing else."""
        allowed = {p.title.casefold() for p in retrieved}
        looked_for = [t for t in self._titles if t and (t in allowed or len(t) >= MIN_TITLE)]
        found = named_titles(raw.casefold(), looked_for)
        named = [p for p in retrieved if p.title.casefold() in found]
        if found - allowed or not 1 <= len(named) <= self.max_picks:
            return None
        return Reply(raw.strip(), named, list(retrieved), fell_back=False)

    def _fallback(self, retrieved: Sequence[Passage]) -> Reply:
        picks = list(retrieved[: self.max_picks])
        lines = [f"{i}. {self._line(p, 3)}" for i, p in enumerate(picks, 1)]
        text = f"Here are {self.noun} that fit what you asked for:\n" + "\n".join(lines)
        return Reply(text, picks, list(retrieved), fell_back=True)

    def _line(self, item: Passage, n: int) -> str:
        """ "Title (tag, tag)": the first n values of the schema's tag field; the title alone
        when the item has none (no empty brackets)."""
        values = [] if self._shown is None else field_values(item.metadata, self._shown)[:n]
        return f"{item.title} ({', '.join(values)})" if values else item.title


def llm_chat(model: Any, tokenizer: Any, max_new_tokens: int = 160) -> ChatFn:
    """A `ChatFn` over a local causal LM (greedy decoding)."""
    from chatretriever.modeling.backbones import generate_reply

    def chat(messages: list[dict[str, str]]) -> str:
        return generate_reply(model, tokenizer, messages, max_new_tokens)

    return chat


# --- the multi-turn measurement -----------------------------------------------------------------


def multi_turn_requests(
    sessions: Sequence[Session],
    titles: Mapping[str, str],
    max_history: int = 20,
    schema: CatalogSchema = STEAM_SCHEMA,
) -> list[Session]:
    """2-3 turn conversations from FA2I / UQ2I test queries with >= 2 constraints.

    Args:
        sessions: Test queries (`build-items`: metadata task, constraints, exclude).
        titles: item id -> title (the UQ2I history is told by its titles, newest first).
        max_history: Most titles told.
        schema: The catalog's schema (its noun and field names are what the turns say).

    FA2I: the constraints split over 2-3 turns ("I'm looking for a game with tags: X",
    "It should also have ..."); UQ2I: the history first, then the constraints over 1-2 turns.
    The id, targets (qrels) and mask stay those of the source query.
    """
    out = []
    for s in sessions:
        task = s.metadata.get("task")
        cons = [Constraint.from_dict(c) for c in s.metadata.get("constraints", ())]
        if task not in ("FA2I", "UQ2I") or len(cons) < 2:
            continue
        n = 3 if len(cons) >= 3 else 2
        groups = [cons[i::n] for i in range(n)] if task == "FA2I" else [cons[:1], cons[1:]]
        texts = [f"I'm looking for {with_article(schema.noun)} with {describe(groups[0], schema)}."]
        texts += [f"It should also have {describe(g, schema)}." for g in groups[1:] if g]
        if task == "UQ2I":
            newest = list(reversed(s.metadata.get("exclude", ())))[:max_history]
            verb = "played" if schema.noun == GAME_NOUN else "liked"
            texts = [f"I have {verb} {', '.join(titles[i] for i in newest)}.", *texts]
        turns = []
        for t in texts:
            turns += [Turn("user", t), Turn("assistant", "Noted.")]
        out.append(Session(s.id, tuple(turns[:-1]), metadata=dict(s.metadata)))
    return out


def session_vs_last_turn(
    rank: RankFn, conversations: Sequence[Session], qrels: Mapping[str, Mapping[str, int]]
) -> dict[str, float]:
    """Hit@5 of retrieving with every user turn joined vs the last user turn alone."""
    joined = [
        Session(s.id, (Turn("user", " ".join(t.content for t in s.turns if t.role == "user")),),
                metadata=s.metadata)
        for s in conversations
    ]  # fmt: skip
    last = [Session(s.id, (s.turns[-1],), metadata=s.metadata) for s in conversations]
    out = {"conversations": float(len(conversations))}
    for name, queries in (("session", joined), ("last_turn", last)):
        run = rank_items(rank, queries, depth=5)
        hits = [hit_at_k([d.doc_id for d in run.ranked(s.id)], qrels[s.id], 5) for s in queries]
        out[f"hit@5_{name}"] = float(np.mean(hits)) if hits else float("nan")
    return out
