"""Partial response modification (paper section 4.3, (1)): an online, turn-by-turn replay.

At every turn the system under test retrieves for the (possibly modified) history, the LLM
writes the response from the context, the query and the top passages (Figure 5), and that
response replaces the dataset's one for later turns. Before each later turn the LLM judges
whether the dataset's next query is still reasonable (Figure 6); if not, its standalone form is
asked instead: the dataset's human rewrite, else an LLM rewrite (`rewrite.rewrite_sessions`).
All conversations advance together, so each turn is one batch of judgments, one retrieval call
and one batch of responses.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

from chatretriever.retrieval.robustness.conversations import Conversation, Step, with_history
from chatretriever.retrieval.robustness.generation import Messages, RobustnessLLM
from chatretriever.retrieval.robustness.prompts import (
    JUDGE_OPTIONS,
    RobustnessPrompts,
    malformed_reason,
    parse_verdict,
)
from chatretriever.types import Run, Session, Turn

logger = logging.getLogger(__name__)

# A system under test: sessions -> their run (query id = session id).
Retrieve = Callable[[Sequence[Session]], Run]
# Standalone forms of the questions of (original) sessions that carry no human rewrite.
Standalone = Callable[[Sequence[Session]], list[str]]

ORIGINAL, HUMAN_REWRITE, LLM_REWRITE = "original", "human_rewrite", "llm_rewrite"


def llm_standalone(llm: RobustnessLLM) -> Standalone:
    """Standalone questions from `rewrite.rewrite_sessions` on this (cached) LLM."""

    def run(sessions: Sequence[Session]) -> list[str]:
        plain = [Session(s.id, s.turns) for s in sessions]  # no dataset rewrite to keep
        out = llm.rewrite_sessions(plain)
        return [s.rewrite or s.question for s in out]

    return run


@dataclass
class PartialResult:
    """The replay of one system.

    Attributes:
        run: The system's run on the modified sessions of the evaluated turns.
        sessions: Those modified sessions (metadata "query_form": which question was asked).
        forms: Count of each query form over the evaluated turns.
    """

    run: Run
    sessions: list[Session]
    forms: dict[str, int] = field(default_factory=dict)


@dataclass
class _State:
    conversation: Conversation
    history: list[Turn] = field(default_factory=list)


def partial_modification(
    conversations: Sequence[Conversation],
    retrieve: Retrieve,
    passages: Mapping[str, str],
    llm: RobustnessLLM,
    standalone: Standalone | None = None,
    prompts: RobustnessPrompts | None = None,
    top_passages: int = 3,
    seed: int = 0,
    name: str = "partial",
) -> PartialResult:
    """Replay conversations with LLM responses to what `retrieve` finds.

    Args:
        conversations: From `group_conversations`.
        retrieve: The system under test.
        passages: Passage id -> text (for the response prompt).
        llm: The response writer and judge.
        standalone: Standalone forms for turns without a human rewrite (default: LLM rewrite).
        prompts: The templates.
        top_passages: Passages given to the response prompt (the paper: 3).
        seed: Seed of every generation (retries add 1000 per try).
        name: Name of the returned run.

    Returns:
        The run and the modified sessions of the evaluated turns.
    """
    prompts = prompts or RobustnessPrompts()
    standalone = standalone or llm_standalone(llm)
    states = [_State(c) for c in conversations]
    scores: dict[str, dict[str, float]] = {}
    kept: list[Session] = []
    forms: dict[str, int] = {}
    longest = max((len(c.steps) for c in conversations), default=0)
    for j in tqdm(range(longest), desc="partial: turn", unit="turn", disable=longest < 2):
        active = [s for s in states if j < len(s.conversation.steps)]
        steps = [s.conversation.steps[j] for s in active]
        questions, used = _questions(active, steps, j, llm, standalone, prompts, seed)
        sessions = [
            with_history(step.session, st.history, q)
            for st, step, q in zip(active, steps, questions, strict=True)
        ]
        run = retrieve(sessions)
        # A conversation's last turn has no later turn to read its response: none is written.
        go_on = [i for i, st in enumerate(active) if j + 1 < len(st.conversation.steps)]
        replies = _responses(
            run,
            [sessions[i] for i in go_on],
            [steps[i] for i in go_on],
            passages,
            llm,
            prompts,
            top_passages,
            seed,
        )
        responses = dict(zip(go_on, replies, strict=True))
        for i, (st, step, s, form) in enumerate(zip(active, steps, sessions, used, strict=True)):
            if i in responses:
                st.history += [Turn("user", s.question), Turn("assistant", responses[i])]
            if step.task:
                scores[s.id] = dict(run.scores.get(s.id, {}))
                meta = {**s.metadata, "query_form": form, "original_question": step.question}
                kept.append(Session(s.id, s.turns, s.rewrite, s.response, meta))
                forms[form] = forms.get(form, 0) + 1
    order = {st.session.id: i for i, st in enumerate(s for c in conversations for s in c.steps)}
    kept.sort(key=lambda s: order[s.id])  # conversation by conversation, oldest turn first
    return PartialResult(Run(scores, name=name), kept, forms)


def _questions(
    active: list[_State],
    steps: list[Step],
    j: int,
    llm: RobustnessLLM,
    standalone: Standalone,
    prompts: RobustnessPrompts,
    seed: int,
) -> tuple[list[str], list[str]]:
    """The question each conversation asks at turn j, and its form."""
    questions = [step.question for step in steps]
    forms = [ORIGINAL] * len(steps)
    if j == 0:  # no context yet: every first question is reasonable
        return questions, forms
    pairs = zip(active, questions, strict=True)
    verdicts = judge(llm, [prompts.judge_messages(st.history, q) for st, q in pairs], seed)
    # A judge that never answered leaves the query as it is (counted among the failures).
    bad = [i for i, v in enumerate(verdicts) if v is False]
    need_llm = [i for i in bad if not steps[i].session.rewrite]
    llm_forms = standalone([steps[i].session for i in need_llm]) if need_llm else []
    by_llm = dict(zip(need_llm, llm_forms, strict=True))
    for i in bad:
        if i in by_llm:
            questions[i], forms[i] = by_llm[i], LLM_REWRITE
        else:
            questions[i], forms[i] = str(steps[i].session.rewrite), HUMAN_REWRITE
    return questions, forms


def judge(
    llm: RobustnessLLM, messages: Sequence[Messages], seed: int = 0, kind: str = "judge"
) -> list[bool | None]:
    """Figure 6 verdicts (True: reasonable): by likelihood when the LLM scores options (always
    one, no sampling), else written, parsed and retried; None where no try named a verdict.
    `kind` names the verdicts in the LLM's counts."""
    if llm.can_choose:
        picks = llm.choose(kind, messages, JUDGE_OPTIONS)
        return [JUDGE_OPTIONS[c] == "reasonable" for c in picks]
    return llm.generate_valid(kind, messages, [seed] * len(messages), _parse_verdict)


def judge_check(
    llm: RobustnessLLM,
    sessions: Sequence[Session],
    n: int = 60,
    prompts: RobustnessPrompts | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Does the judge tell a question's own history from another conversation's? A sanity
    check of the Figure 6 judge, to run on training conversations: n sessions with history
    (a seeded sample), each judged after its own history and after the next sampled session's.

    Returns:
        {"n", "unreasonable_own", "unreasonable_other", "no_verdict"}: counts; a judge that
        reads the context says "unreasonable" more often after another conversation's history.
    """
    prompts = prompts or RobustnessPrompts()
    pool = [s for s in sessions if any(t.role == "assistant" for t in s.history)]
    random.Random(seed).shuffle(pool)
    pool = pool[:n]
    if len(pool) < 2:
        raise ValueError("the judge check needs two sessions with history")
    own = [prompts.judge_messages(s.history, s.question) for s in pool]
    other = [
        prompts.judge_messages(pool[(i + 1) % len(pool)].history, s.question)
        for i, s in enumerate(pool)
    ]
    verdicts = judge(llm, own + other, seed, "judge_check")
    return {
        "n": len(pool),
        "unreasonable_own": sum(v is False for v in verdicts[: len(pool)]),
        "unreasonable_other": sum(v is False for v in verdicts[len(pool) :]),
        "no_verdict": sum(v is None for v in verdicts),
    }


def _parse_verdict(text: str) -> tuple[bool | None, str | None]:
    verdict = parse_verdict(text)
    return (verdict, None) if verdict is not None else (None, "no verdict")


def _responses(
    run: Run,
    sessions: list[Session],
    steps: list[Step],
    passages: Mapping[str, str],
    llm: RobustnessLLM,
    prompts: RobustnessPrompts,
    top_passages: int,
    seed: int,
) -> list[str]:
    """The LLM's response to every session from its top passages; the dataset's response
    where every try was malformed (counted among the failures)."""
    batch = []
    for s in sessions:
        top = [d.doc_id for d in run.ranked(s.id)[:top_passages]] if s.id in run.scores else []
        texts = [passages[d] for d in top if d in passages]
        batch.append(prompts.response_messages(s.history, s.question, texts))

    def parse(text: str) -> tuple[str | None, str | None]:
        reason = malformed_reason(text, prompts.max_reply_chars)
        return (None, reason) if reason else (text.strip(), None)

    replies = llm.generate_valid("response", batch, [seed] * len(batch), parse)
    return [r if r is not None else step.response for r, step in zip(replies, steps, strict=True)]
