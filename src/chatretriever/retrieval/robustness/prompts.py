"""The three prompts of the robustness evaluation (paper Figures 5-7, appendices B and C).

Each prompt is a template filled with `str.format`; the parsers and checks that read the LLM's
replies live beside them, so a prompt and what is expected back change together.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

from chatretriever.types import Turn

# Figure 5: the response to the current query from the context and the top-3 passages.
RESPONSE_TEMPLATE = (
    "Generate a response to the current query given the context and retrieved passages. If the "
    "passages are relevant and useful, referring to their information when forming your "
    "response. Otherwise, you may disregard them.\n\n"
    "# Context:\n{context}\n\n# Current Query:\n{query}\n\n# Retrieved Passages:\n{passages}"
)

# Figure 6: is the next query still reasonable after the (modified) context? The last line,
# asking for one word, is ours: the figure leaves the answer's form open and a parser needs one.
JUDGE_TEMPLATE = (
    "Given the context of a conversation, evaluate whether the subsequent query is reasonable. "
    "A query is considered unreasonable if we cannot figure out its real search intent based on "
    "the context. For example:\n\n"
    "# Context:\nQuery: Who achieved 40,000 points in the NBA?\nResponse: Michael Jordan.\n\n"
    "# Next Query:\nWhich team drafted James?\n\n"
    'This query is unreasonable because it is unclear who "James" is, as he was not mentioned '
    "in the context. The confusion arises because the response to the previous query is "
    'incorrect; the correct answer should be "LeBron James."\n\n'
    "Now, it's your turn to assess the reasonableness of the query in the following context:\n\n"
    "# Context:\n{context}\n\n# Next Query\n{query}\n\n"
    "Answer with one word: reasonable or unreasonable."
)

# Figure 7: two synthetic turns of context for a query, its standalone rewrite and its response.
CONTEXT_TEMPLATE = (
    "Given a conversational query, its context-independent rewrite, and its response, generate "
    "*two* turns of conversational context for it.\n\n"
    "This turn:\n# Query: {query}\n# Rewrite: {rewrite}\n# Response: {response}\n\n"
    "# Synthetic Conversation Context:\n"
    "Query1: ...\nResponse1: ...\nQuery2: ...\nResponse2: ..."
)

# The judge's two answers (scored by likelihood when the generator can, else parsed).
JUDGE_OPTIONS = ("reasonable", "unreasonable")
# The Figure 7 layout, written slot by slot when the generator continues a reply.
CONTEXT_SLOTS = ("Query1", "Response1", "Query2", "Response2")


@dataclass(frozen=True)
class RobustnessPrompts:
    """The three templates and the limits of what is put into them and accepted back.

    Attributes:
        system: System message of every prompt.
        response: Figure 5 template (`context`, `query`, `passages`).
        judge: Figure 6 template (`context`, `query`).
        context: Figure 7 template (`query`, `rewrite`, `response`).
        max_turn_chars: Turns and passages longer than this are cut (small contexts fill fast).
        max_reply_chars: A reply longer than this is a runaway (malformed).
    """

    system: str = "You are a helpful AI assistant."
    response: str = RESPONSE_TEMPLATE
    judge: str = JUDGE_TEMPLATE
    context: str = CONTEXT_TEMPLATE
    max_turn_chars: int = 400
    max_reply_chars: int = 2000

    @property
    def hash(self) -> str:
        raw = json.dumps(dataclasses.asdict(self), sort_keys=True).encode("utf-8")
        return hashlib.sha256(raw).hexdigest()[:12]

    def _cut(self, text: str) -> str:
        text = " ".join(text.split())
        return text if len(text) <= self.max_turn_chars else text[: self.max_turn_chars] + " ..."

    def _messages(self, user: str) -> list[dict[str, str]]:
        return [{"role": "system", "content": self.system}, {"role": "user", "content": user}]

    def format_context(self, turns: Sequence[Turn]) -> str:
        """Turns as "Query: ... / Response: ..." lines (the paper's context layout)."""
        lines = [
            f"{'Query' if t.role == 'user' else 'Response'}: {self._cut(t.content)}"
            for t in turns
            if t.role != "system"
        ]
        return "\n".join(lines) or "(none)"

    def response_messages(
        self, history: Sequence[Turn], query: str, passages: Sequence[str]
    ) -> list[dict[str, str]]:
        """Figure 5: the chat messages asking for the response to `query`."""
        text = "\n".join(f"[{i}] {self._cut(p)}" for i, p in enumerate(passages, start=1))
        user = self.response.format(
            context=self.format_context(history), query=query.strip(), passages=text or "(none)"
        )
        return self._messages(user)

    def judge_messages(self, history: Sequence[Turn], query: str) -> list[dict[str, str]]:
        """Figure 6: the chat messages asking whether `query` is reasonable after `history`."""
        return self._messages(self.judge.format(context=self.format_context(history), query=query))

    def context_messages(self, query: str, rewrite: str, response: str) -> list[dict[str, str]]:
        """Figure 7: the chat messages asking for two synthetic turns of context."""
        user = self.context.format(
            query=query.strip(), rewrite=rewrite.strip(), response=self._cut(response)
        )
        return self._messages(user)

    def context_slot_messages(
        self, query: str, rewrite: str, response: str, filled: Sequence[str]
    ) -> list[dict[str, str]]:
        """Figure 7 with the reply started: the slots in `filled` written, the next slot's label
        open ("Query1: ...\nResponse1:"), so the model writes one line of the layout."""
        labels = CONTEXT_SLOTS[: len(filled) + 1]
        if len(filled) >= len(CONTEXT_SLOTS):
            raise ValueError(f"a context has {len(CONTEXT_SLOTS)} slots")
        lines = [f"{label}: {text}" for label, text in zip(labels, filled, strict=False)]
        reply = "\n".join([*lines, f"{labels[-1]}:"])
        return [
            *self.context_messages(query, rewrite, response),
            {"role": "assistant", "content": reply},
        ]


def parse_verdict(text: str) -> bool | None:
    """The judge's reply -> True (reasonable), False (unreasonable), None (neither said)."""
    low = " ".join(re.findall(r"[a-z]+", text.lower()))
    if "unreasonable" in low or "not reasonable" in low:
        return False
    if "reasonable" in low:
        return True
    return None


_PAIR = re.compile(r"(?:\*\*)?\s*(query|response)\s*(\d)?\s*(?:\*\*)?\s*:\s*(.*)", re.IGNORECASE)


def parse_context(text: str) -> tuple[Turn, ...] | None:
    """A Figure 7 reply -> four turns (user, assistant, user, assistant), or None if malformed.

    Lines "QueryN: ..." / "ResponseN: ..." start a turn; other lines continue the open one.
    """
    turns: list[list[str]] = []
    for line in text.splitlines():
        m = _PAIR.match(line.strip().lstrip("#-* ").strip())
        if m:
            turns.append(["user" if m.group(1).lower() == "query" else "assistant", m.group(3)])
        elif turns and line.strip():
            turns[-1][1] += " " + line.strip()
    roles = [r for r, _ in turns]
    if roles != ["user", "assistant", "user", "assistant"]:
        return None
    if any(not c.strip() for _, c in turns):
        return None
    return tuple(Turn(r, c.strip()) for r, c in turns)


def malformed_reason(text: str, max_chars: int) -> str | None:
    """Why a free-text reply is unusable ("empty": no letter or digit, as the "..." a small model
    copies from the Figure 7 layout; "runaway"), or None when it is usable."""
    if not any(c.isalnum() for c in text):
        return "empty"
    if len(text) > max_chars:
        return "runaway"
    return None
