"""Fitting a session in its token budget: the over-long-turn rule of the retrieval template.

A session (its turns, ending with the current user question) renders with the template's
framing (`chat_render.ChatRenderer`), then the pooled tokens (`template.py`). Too long:

- whole exchanges of the history are dropped oldest first (a cut always lands on a user turn);
- then the content of the session's own system turn, if any, is cut from its end (its start is
  kept; the template's system message is never cut);
- then the question itself is cut from its START (its end, where a long pasted turn asks, is
  kept).

The template's framing and the pooled tokens always survive; a budget that cannot hold them
raises. Each kind of cut is warned of once per fitter (training meets it every batch).

History turns are tokenized inside the template's runs (cached: a turn is tokenized once, not
once per truncation step), newest first and only while they fit. The current question is
tokenized on its own, as the template renders it (stripped where the template `| trim`s user
contents: Gemma, Llama 3), so its length in these choices and its cut are exact.

A session whose question stays whole then gets exactly the ids the tokenizer gives its whole
rendered text (`ChatRenderer.whole_ids`: the question tokenized in its run, joined with the
template text around it). They differ from the pieces' only where an edge of the question merges
with that text: SmolLM2's "user\\n" + a question that starts with "\\n\\n" or two spaces gives
"\\n\\n" + "\\n", not three "\\n" (no MTRAG, TopiOCQA or iKAT question does; untrimmed, 13 of 300
MTRAG questions differed with Gemma 3, by the whitespace at their edges). Merged ids were a token
shorter in every case seen, so they fit; whole ids over the budget would leave the pieces' ids.
The history is still chosen with the question's own length, so a session within a token of its
budget may keep one exchange less than its whole text would allow. A question that is cut keeps
its own ids: the cut is exact, its first token may differ from the full text's.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from chatretriever.modeling.chat_render import ChatRenderer, Frame
from chatretriever.types import SessionLike, Turn, as_session

logger = logging.getLogger(__name__)

_SESSION_CHUNK = 256  # sessions whose history runs are tokenized together


@dataclass(frozen=True)
class _SessionParts:
    """A session as truncation sees it: system turn(s), history, current question."""

    id: str
    system: tuple[Turn, ...]
    history: tuple[Turn, ...]
    question: str
    own_system: bool = False  # system is the session's own turn (may be cut), not the template's

    def messages(self, cut: int) -> list[Turn]:
        """The messages when the history is cut before turn `cut`."""
        return [*self.system, *self.history[cut:], Turn("user", self.question)]

    def without_history(self, system_chars: int) -> list[Turn]:
        """The messages with no history and the own system content cut to `system_chars`."""
        return [Turn("system", self.system[0].content[:system_chars]), Turn("user", self.question)]


class SessionFitter:
    """Sessions -> token ids of at most `max_session_len`, pooled tokens included.

    Args:
        renderer: The template's chat renderer (its system turns replace none of a session's own).
        pooled_ids: The ids appended to every session (EMB tokens or the end-of-sequence token).
        max_session_len: Token budget of a session, pooled tokens included.
    """

    def __init__(
        self, renderer: ChatRenderer, pooled_ids: Sequence[int], max_session_len: int
    ) -> None:
        self.renderer = renderer
        self.pooled_ids = tuple(pooled_ids)
        self.max_session_len = max_session_len
        self._warned: set[str] = set()  # kinds of cut already logged

    def ids_batch(self, sessions: Sequence[SessionLike]) -> list[list[int]]:
        """The ids of each session, with few tokenizer calls for all of them.

        Args:
            sessions: Sessions, or lists of {"role", "content"} messages ending with a user turn.

        Returns:
            Token ids per session, ending with the pooled tokens, at most `max_session_len`.

        Raises:
            ValueError: A session whose framing alone (with an empty own system turn and no
                history) leaves no room for one token of the question.
        """
        sessions = list(sessions)
        out: list[list[int]] = []
        for start in range(0, len(sessions), _SESSION_CHUNK):
            parts = [self._session_parts(s) for s in sessions[start : start + _SESSION_CHUNK]]
            out += self._fit(parts, self.renderer.contents.encode([x.question for x in parts]))
        return out

    def _session_parts(self, session: SessionLike) -> _SessionParts:
        s = as_session(session)
        turns = s.turns
        own = turns[0].role == "system"
        system, history = (
            (turns[:1], turns[1:-1]) if own else (self.renderer.system_turns, turns[:-1])
        )
        question = self.renderer.content_text(turns[-1])  # as rendered: trimmed or not
        return _SessionParts(s.id, tuple(system), tuple(history), question, own)

    def _fit(self, parts: list[_SessionParts], questions: list[list[int]]) -> list[list[int]]:
        """Fit each session in `max_session_len` (the rule of the module docstring).

        Args:
            parts: The sessions as truncation sees them.
            questions: The content ids of each session's current question.

        Returns:
            The ids of each session, pooled tokens included.
        """
        n_pooled = len(self.pooled_ids)
        budget = self.max_session_len - n_pooled
        kept = self._history_frames(parts, questions, budget)
        out, cut_system, cut_question = [], [], []
        whole: list[tuple[int, list[Turn]]] = []  # (index, messages kept) of whole questions
        for i, (x, q, (messages, (pre, post))) in enumerate(
            zip(parts, questions, kept, strict=True)
        ):
            if x.own_system and not _fits((pre, post), len(q), budget):
                # the history is gone already: it is only added while the whole question fits
                messages, (pre, post) = self._cut_own_system(x, len(q), budget)
                cut_system.append(x.id)
            room = budget - len(pre) - len(post)
            if room < min(1, len(q)):  # (an empty question may have history fill the budget)
                raise ValueError(
                    f"max_session_len={self.max_session_len} leaves no room for the question: "
                    f"the session's framing alone takes {len(pre) + len(post)} tokens + "
                    f"{n_pooled} EMB tokens"
                )
            if len(q) > room:  # keep the end: a long turn (pasted text) ends with its question
                cut_question.append(x.id)
            else:
                whole.append((i, messages))
            out.append(pre + q[-room:] + post + list(self.pooled_ids))
        self._use_whole_text(out, whole, budget)
        self._warn_once(
            "whose own system turn and current turn are over",
            cut_system,
            "all history was dropped, then the system turn's end was cut",
        )
        self._warn_once(
            "with a current turn over",
            cut_question,
            "its start was cut, its end (the question) kept",
        )
        return out

    def _use_whole_text(
        self, out: list[list[int]], whole: list[tuple[int, list[Turn]]], budget: int
    ) -> None:
        """Give each session whose question is whole the ids of its whole rendered text.

        Args:
            out: The fitted ids of every session (pieces: frame, question alone, frame,
                pooled tokens); replaced in place.
            whole: (index in `out`, the messages kept) of each session whose question is whole.
            budget: Tokens for the framing and the question.
        """
        if not whole:
            return
        for (i, _), ids in zip(whole, self.renderer.whole_ids([m for _, m in whole]), strict=True):
            if len(ids) <= budget:
                out[i] = ids + list(self.pooled_ids)
            else:  # never seen: the pieces' ids stay, within the budget
                logger.debug("session ids: the whole text is longer than its pieces (%d)", len(ids))

    def _history_frames(
        self, parts: list[_SessionParts], questions: list[list[int]], budget: int
    ) -> list[tuple[list[Turn], Frame]]:
        """The messages and frame of each session with its longest history suffix of whole
        exchanges beside which the whole question fits (no history when the question does not
        fit alone).

        Suffixes grow newest first, one exchange per round, the new turns of all sessions
        tokenized in one call per round: turns too old to fit are never tokenized. (More turns
        never render shorter, so the first suffix that does not fit ends the search.)
        """
        cuts = [exchange_cuts([t.role for t in x.history]) for x in parts]
        pos = [len(c) - 1 for c in cuts]  # index in cuts of each kept suffix: no history yet
        frames = self.renderer.frames([x.messages(c[-1]) for x, c in zip(parts, cuts, strict=True)])
        todo = [
            i for i, p in enumerate(pos) if p > 0 and _fits(frames[i], len(questions[i]), budget)
        ]
        while todo:
            trial = self.renderer.frames([parts[i].messages(cuts[i][pos[i] - 1]) for i in todo])
            grown = []
            for i, frame in zip(todo, trial, strict=True):
                if _fits(frame, len(questions[i]), budget):
                    frames[i], pos[i] = frame, pos[i] - 1
                    grown.append(i)
            todo = [i for i in grown if pos[i] > 0]
        for x, c, p in zip(parts, cuts, pos, strict=True):
            if c[p]:
                logger.debug(
                    "session %s: dropped %d of %d history turns", x.id, c[p], len(x.history)
                )
        return [
            (x.messages(c[p]), frame)
            for x, c, p, frame in zip(parts, cuts, pos, frames, strict=True)
        ]

    def _cut_own_system(
        self, x: _SessionParts, n_question: int, budget: int
    ) -> tuple[list[Turn], Frame]:
        """The messages and frame of a session without history whose own system content is cut
        from its end.

        Args:
            x: A session with its own system turn, too long with the whole question.
            n_question: The question's length in tokens.
            budget: Tokens for the framing and the question.

        Returns:
            The messages and frame with the prefix of the system content found by bisection
            over its characters (the whole question fits beside it, not beside one more
            character), or with an empty content when none fits: the question is then cut.
        """

        def frame(chars: int) -> Frame:
            return self.renderer.frames([x.without_history(chars)])[0]

        lo, hi, best = 0, len(x.system[0].content), frame(0)
        if not _fits(best, n_question, budget):
            return x.without_history(0), best
        while hi - lo > 1:  # lo fits, hi does not
            mid = (lo + hi) // 2
            trial = frame(mid)
            if _fits(trial, n_question, budget):
                lo, best = mid, trial
            else:
                hi = mid
        return x.without_history(lo), best

    def _warn_once(self, kind: str, ids: list[str], what: str) -> None:
        """Warn of a kind of cut once per fitter: training meets it every batch."""
        if ids and kind not in self._warned:
            self._warned.add(kind)
            logger.warning(
                "%d session(s) %s max_session_len=%d (first: %r): %s",
                *(len(ids), kind, self.max_session_len, ids[0], what),
            )


def _fits(frame: Frame, n_content: int, budget: int) -> bool:
    """Whether a frame and that many content tokens take at most `budget` tokens."""
    return len(frame[0]) + n_content + len(frame[1]) <= budget


def exchange_cuts(roles: Sequence[str]) -> list[int]:
    """Where a history of these roles may be cut, keeping whole exchanges: before each user turn
    (and before everything), oldest first; also `grounded_fit`'s rule for prompts."""
    cuts = [i for i, role in enumerate(roles) if role == "user" and i > 0]
    return [0, *cuts, len(roles)]
