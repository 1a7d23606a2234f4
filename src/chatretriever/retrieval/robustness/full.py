"""Full context modification (paper section 4.3, (2)): new two-turn contexts for every turn.

For each evaluated turn the LLM writes two synthetic turns of context from the query, its
standalone form and its response (Figure 7), once per seed; the query stays the dataset's, so
its judgments still hold. The contexts do not depend on the system under test: they are made
once and every system is evaluated on each of the n context sets (Mean and SD of nDCG@3).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from chatretriever.retrieval.robustness.conversations import with_history
from chatretriever.retrieval.robustness.generation import RobustnessLLM
from chatretriever.retrieval.robustness.partial import (
    HUMAN_REWRITE,
    LLM_REWRITE,
    Standalone,
    llm_standalone,
)
from chatretriever.retrieval.robustness.prompts import (
    CONTEXT_SLOTS,
    RobustnessPrompts,
    malformed_reason,
    parse_context,
)
from chatretriever.types import Session, Turn

logger = logging.getLogger(__name__)

N_CONTEXTS = 5  # the paper's five contexts per turn


@dataclass
class FullResult:
    """The modified datasets.

    Attributes:
        context_sets: One list of sessions per seed, in the order of the input sessions; each
            session is two synthetic turns + the dataset's question.
        seeds: The seed of each set.
        fallbacks: Sessions per set that kept their original history (every try malformed).
    """

    context_sets: list[list[Session]]
    seeds: list[int]
    fallbacks: list[int]


def full_modification(
    sessions: Sequence[Session],
    llm: RobustnessLLM,
    standalone: Standalone | None = None,
    prompts: RobustnessPrompts | None = None,
    n_contexts: int = N_CONTEXTS,
    first_seed: int = 0,
) -> FullResult:
    """Write `n_contexts` two-turn contexts per session, one per seed.

    Args:
        sessions: The evaluated turns (the dataset's sessions).
        llm: The context writer.
        standalone: Standalone forms for sessions without a human rewrite (default: LLM rewrite).
        prompts: The templates.
        n_contexts: Contexts per session (the paper: 5).
        first_seed: Seeds are first_seed, first_seed + 1, ...

    Returns:
        The context sets; a session whose every try was malformed keeps its original history
        in that set (counted in `fallbacks` and in the LLM's failures).
    """
    if n_contexts < 1:
        raise ValueError("n_contexts must be >= 1")
    prompts = prompts or RobustnessPrompts()
    standalone = standalone or llm_standalone(llm)
    rewrites, forms = _rewrites(sessions, standalone)
    messages = [
        prompts.context_messages(s.question, r, s.response or "(no response)")
        for s, r in zip(sessions, rewrites, strict=True)
    ]

    def parse(text: str) -> tuple[tuple[Turn, ...] | None, str | None]:
        if len(text) > prompts.max_reply_chars:
            return None, "runaway"
        turns = parse_context(text)
        if turns is None:
            return None, "empty" if not text.strip() else "not two turns"
        return turns, None

    sets, seeds, fallbacks = [], [], []
    for r in range(n_contexts):
        seed = first_seed + r
        if llm.continues_reply:
            contexts = _slotwise_contexts(sessions, rewrites, llm, prompts, seed)
        else:
            contexts = llm.generate_valid("context", messages, [seed] * len(messages), parse)
        out = []
        for s, turns, form in zip(sessions, contexts, forms, strict=True):
            meta = {**s.metadata, "context_seed": seed, "standalone_form": form}
            history = s.history if turns is None else turns
            meta["context"] = "original" if turns is None else "synthetic"
            out.append(
                with_history(
                    Session(s.id, s.turns, s.rewrite, s.response, meta), history, s.question
                )
            )
        sets.append(out)
        seeds.append(seed)
        fallbacks.append(sum(1 for t in contexts if t is None))
    return FullResult(sets, seeds, fallbacks)


def _slotwise_contexts(
    sessions: Sequence[Session],
    rewrites: Sequence[str],
    llm: RobustnessLLM,
    prompts: RobustnessPrompts,
    seed: int,
) -> list[tuple[Turn, ...] | None]:
    """Figure 7 contexts written one slot (line) at a time after its label, so the layout holds
    by construction; a slot still empty or runaway after the retries fails its context."""

    def parse(text: str) -> tuple[str | None, str | None]:
        reason = malformed_reason(text, prompts.max_turn_chars * 2)
        return (None, reason) if reason else (text.strip(), None)

    filled: list[list[str] | None] = [[] for _ in sessions]
    for _ in CONTEXT_SLOTS:
        live = [i for i, f in enumerate(filled) if f is not None]
        messages = [
            prompts.context_slot_messages(
                sessions[i].question, rewrites[i], sessions[i].response or "(no response)",
                filled[i],  # type: ignore[arg-type]
            )
            for i in live
        ]  # fmt: skip
        slots = llm.generate_valid("context_slot", messages, [seed] * len(live), parse)
        for i, slot in zip(live, slots, strict=True):
            filled[i] = None if slot is None else [*filled[i], slot]  # type: ignore[misc]
    roles = ("user", "assistant") * (len(CONTEXT_SLOTS) // 2)
    return [
        None if f is None else tuple(Turn(r, t) for r, t in zip(roles, f, strict=True))
        for f in filled
    ]


def _rewrites(sessions: Sequence[Session], standalone: Standalone) -> tuple[list[str], list[str]]:
    """The standalone form of every question (human rewrite, else `standalone`) and its kind."""
    need = [i for i, s in enumerate(sessions) if not s.rewrite]
    made = dict(zip(need, standalone([sessions[i] for i in need]) if need else [], strict=True))
    rewrites = [made.get(i, s.rewrite or "") for i, s in enumerate(sessions)]
    forms = [LLM_REWRITE if i in made else HUMAN_REWRITE for i in range(len(sessions))]
    return rewrites, forms
