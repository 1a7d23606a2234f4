"""Chat formatting and the pooled tokens ([EMB_i], or the end-of-sequence token): the only module
that knows either.

Every input is the tokenizer's own chat template followed by t special tokens [EMB_1..EMB_t]
(pooling "last_emb"), or by the tokenizer's own end-of-sequence token (pooling "eos", UniConv's
representation: nothing is added to the vocabulary); the final hidden state of the last one is
the embedding. Below, "EMB tokens" means these appended tokens either way.

- A session renders all its turns, ending with the current user question, with no generation
  prompt. Too long: whole exchanges of the history are dropped oldest first (a cut always lands
  on a user turn); then the content of the session's own system turn, if any, is cut from its
  end (its start is kept); then the question itself is cut from its START (its end, where a long
  pasted turn asks, is kept). The template's framing and the EMB tokens always survive; a budget
  that cannot hold them raises.
- A passage (or a response used as a positive) is one assistant message: "title\\ntext".
- The CSIT sequence is [session, EMB x t, assistant turn with the response] (no EMB tokens after
  the response: nothing reads them).

System messages are rendered on purpose (an injected default one is replaced by an empty one:
`chat_render.py`); a session's own system turn replaces it, kept whole unless the question would
not fit beside it (above).

Every message's content (each turn, the question, a passage, a response) is user text: it is
tokenized with no added token matched, so a literal "<|im_end|>" or "[EMB_1]" typed anywhere stays
text; only the chat template's own text yields control tokens. The rendering of a role sequence
(contents left as slots) is split at the template's added tokens once and cached
(`chat_render.ChatRenderer`). The text between two of them (template text and earlier turns'
contents) is tokenized as one run, as the tokenizer tokenizes a full rendering, and each run's ids
are cached: a history turn is tokenized once, not once per truncation step. The current question,
a passage and a response are tokenized on their own (a passage and a response are cut from their
end, the current question from its start), so lengths and spans are exact. Functions return
plain lists of token ids; the `*_batch` ones tokenize the texts of many inputs in one tokenizer
call.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from chatretriever.modeling.chat_render import ChatRenderer, Frame

# passage_text lives in types (BM25 and mining read passages the same way); re-exported here.
from chatretriever.types import Passage, SessionLike, Turn, as_session, passage_text

if TYPE_CHECKING:
    from chatretriever.config import RetrieverConfig

logger = logging.getLogger(__name__)

EMB_TOKEN_FORMAT = "[EMB_{}]"
_SESSION_CHUNK = 256  # sessions whose history runs are tokenized together


def emb_tokens(t: int) -> list[str]:
    """The strings of the t special tokens: ["[EMB_1]", ..., "[EMB_t]"]."""
    if t < 1:
        raise ValueError(f"the number of EMB tokens must be >= 1, got {t}")
    return [EMB_TOKEN_FORMAT.format(i) for i in range(1, t + 1)]


def add_emb_tokens(tokenizer: Any, t: int) -> list[int]:
    """Add [EMB_1..EMB_t] to the tokenizer as special tokens (idempotent).

    Args:
        tokenizer: A Hugging Face tokenizer; modified in place.
        t: Number of EMB tokens.

    Returns:
        Their t token ids, in order. The model's embedding matrix must then be resized to
        `len(tokenizer)` (`modeling.py` does it).
    """
    tokens = emb_tokens(t)
    missing = [tok for tok in tokens if tok not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    return emb_token_ids(tokenizer, t)


def emb_token_ids(tokenizer: Any, t: int) -> list[int]:
    """The ids of [EMB_1..EMB_t]; raises ValueError when the tokenizer lacks them."""
    vocab = tokenizer.get_vocab()
    tokens = emb_tokens(t)
    missing = [tok for tok in tokens if tok not in vocab]
    if missing:
        raise ValueError(f"tokenizer has no {missing}: call add_emb_tokens(tokenizer, {t}) first")
    return [vocab[tok] for tok in tokens]


def pooled_token_ids(tokenizer: Any, t: int, pooling: str = "last_emb") -> list[int]:
    """The ids appended to every input, the last of which is pooled.

    Args:
        tokenizer: A Hugging Face tokenizer (holding the EMB tokens for "last_emb").
        t: Number of appended tokens (1 for "eos").
        pooling: "last_emb" ([EMB_1..EMB_t]) or "eos" (the tokenizer's end-of-sequence token).

    Raises:
        ValueError: A tokenizer without the EMB tokens, or without an end-of-sequence token for
            "eos", or t != 1 with "eos".
    """
    if pooling != "eos":
        return emb_token_ids(tokenizer, t)
    if t != 1:
        raise ValueError(f"pooling 'eos' appends one token, got n_emb_tokens={t}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("pooling 'eos' needs a tokenizer with an end-of-sequence token")
    return [int(eos)]


@dataclass(frozen=True)
class CsitPieces:
    """One CSIT sequence [session, EMB x t, response part] and its spans.

    Spans are half-open [start, end) token positions:
    session [0, session_len), session EMB [session_len, response_start),
    response part [response_start, label_end) = assistant header, then the trained tokens
    [label_start, label_end) (the response and the template's end-of-turn tokens);
    label_end == len(input_ids). The response part has no EMB tokens: nothing reads their
    outputs (the LM loss ends at the end-of-turn tokens, the session embedding comes before).
    """

    input_ids: tuple[int, ...]
    session_len: int
    n_emb: int
    label_start: int
    label_end: int

    @property
    def response_start(self) -> int:
        return self.session_len + self.n_emb

    @property
    def session_emb_pos(self) -> int:
        """Position of the session's last EMB token (its hidden state is the session embedding)."""
        return self.session_len + self.n_emb - 1

    def __len__(self) -> int:
        return len(self.input_ids)


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


class RetrievalTemplate:
    """Turns sessions, passages and responses into token ids ending with the EMB tokens.

    Args:
        tokenizer: A Hugging Face tokenizer that already holds the EMB tokens (`add_emb_tokens`;
            none are needed for pooling "eos").
        n_emb_tokens: t.
        max_session_len: Token budget of a session, EMB tokens included.
        max_passage_len: Token budget of a passage, EMB tokens included.
        max_response_len: Token budget of a CSIT response part (header, response, end of turn).
        system_prompt: None = no system message (see module docstring), or the system message.
        pooling: "last_emb" or "eos" (`pooled_token_ids`).

    Raises:
        ValueError: A budget that cannot hold the template's framing of its input, its EMB
            tokens and one token of content (named with its minimum).
    """

    def __init__(
        self,
        tokenizer: Any,
        n_emb_tokens: int = 3,
        max_session_len: int = 512,
        max_passage_len: int = 256,
        max_response_len: int = 256,
        system_prompt: str | None = None,
        pooling: str = "last_emb",
    ) -> None:
        self.tokenizer = tokenizer
        self.n_emb_tokens = n_emb_tokens
        self.emb_ids: tuple[int, ...] = tuple(pooled_token_ids(tokenizer, n_emb_tokens, pooling))
        self.max_session_len = max_session_len
        self._warned: set[str] = set()  # kinds of cut already logged
        self.max_passage_len = max_passage_len
        self.max_response_len = max_response_len
        self.renderer = ChatRenderer(tokenizer, system_prompt)
        self.contents = self.renderer.contents
        self.system = self.renderer.system
        self._check_room()

    def _check_room(self) -> None:
        """Raise now, not at the first encode, when a budget cannot hold one token of content.

        Raises:
            ValueError: Naming the setting and its minimum: the template's framing of that
                input (a session without history), its EMB tokens (a response has none), and
                one token of content.
        """
        session = self.renderer.frames([[*self.renderer.system_turns, Turn("user", "")]])[0]
        emb = self.n_emb_tokens
        needs = {  # setting -> (value, framing tokens, EMB tokens)
            "max_session_len": (self.max_session_len, session, emb),
            "max_passage_len": (self.max_passage_len, self.renderer.passage_frame, emb),
            "max_response_len": (self.max_response_len, self.renderer.response_frame, 0),
        }
        for name, (value, (pre, post), n_emb) in needs.items():
            taken = len(pre) + len(post) + n_emb
            if value <= taken:
                raise ValueError(
                    f"{name}={value} leaves no room for content: the chat template's framing "
                    f"takes {len(pre) + len(post)} tokens"
                    + (f" and the EMB tokens {n_emb}" if n_emb else "")
                    + f", so {name} must be at least {taken + 1}"
                )

    def render(
        self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = False
    ) -> str:
        """The chat template's text of `messages` (no system message is added here)."""
        return self.renderer.render(messages, add_generation_prompt)

    def injects_default_system(self) -> bool:
        """Whether the chat template adds its own system message when none is given."""
        return self.renderer.injects_default_system()

    @classmethod
    def from_config(cls, tokenizer: Any, config: RetrieverConfig) -> RetrievalTemplate:
        """The template of a RetrieverConfig."""
        return cls(
            tokenizer,
            n_emb_tokens=config.n_emb_tokens,
            max_session_len=config.max_session_len,
            max_passage_len=config.max_passage_len,
            max_response_len=config.max_response_len,
            system_prompt=config.system_prompt,
            pooling=config.pooling,
        )

    # ---------------------------------------------------------------- public ids
    def session_ids(self, session: SessionLike) -> list[int]:
        """Token ids of a session followed by the t EMB tokens, at most `max_session_len`.

        Args:
            session: A Session or a list of {"role", "content"} messages ending with a user turn.

        Returns:
            Token ids; the current question's framing tokens and the EMB tokens always survive.
        """
        return self.session_ids_batch([session])[0]

    def session_ids_batch(self, sessions: Sequence[SessionLike]) -> list[list[int]]:
        """`session_ids` of each session, with few tokenizer calls for all of them."""
        sessions = list(sessions)
        out: list[list[int]] = []
        for start in range(0, len(sessions), _SESSION_CHUNK):
            parts = [self._session_parts(s) for s in sessions[start : start + _SESSION_CHUNK]]
            out += self._fit(parts, self.contents.encode([x.question for x in parts]))
        return out

    def _session_parts(self, session: SessionLike) -> _SessionParts:
        s = as_session(session)
        turns = s.turns
        own = turns[0].role == "system"
        system, history = (
            (turns[:1], turns[1:-1]) if own else (self.renderer.system_turns, turns[:-1])
        )
        return _SessionParts(s.id, tuple(system), tuple(history), turns[-1].content, own)

    def _fit(self, parts: list[_SessionParts], questions: list[list[int]]) -> list[list[int]]:
        """Fit each session in `max_session_len`: the over-long-turn rule (module docstring).

        Args:
            parts: The sessions as truncation sees them.
            questions: The content ids of each session's current question.

        Returns:
            The ids of each session, EMB tokens included.

        Raises:
            ValueError: A session whose framing alone (with an empty own system turn and no
                history) leaves no room for one token of the question.
        """
        budget = self.max_session_len - self.n_emb_tokens
        frames = self._history_frames(parts, questions, budget)
        out, cut_system, cut_question = [], [], []
        for x, q, (pre, post) in zip(parts, questions, frames, strict=True):
            if x.own_system and not _fits((pre, post), len(q), budget):
                # the history is gone already: it is only added while the whole question fits
                pre, post = self._cut_own_system(x, len(q), budget)
                cut_system.append(x.id)
            room = budget - len(pre) - len(post)
            if room < min(1, len(q)):  # (an empty question may have history fill the budget)
                raise ValueError(
                    f"max_session_len={self.max_session_len} leaves no room for the question: "
                    f"the session's framing alone takes {len(pre) + len(post)} tokens + "
                    f"{self.n_emb_tokens} EMB tokens"
                )
            if len(q) > room:  # keep the end: a long turn (pasted text) ends with its question
                cut_question.append(x.id)
            out.append(pre + q[-room:] + post + list(self.emb_ids))
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

    def _history_frames(
        self, parts: list[_SessionParts], questions: list[list[int]], budget: int
    ) -> list[Frame]:
        """The frame of each session with its longest history suffix of whole exchanges beside
        which the whole question fits (no history when the question does not fit alone).

        Suffixes grow newest first, one exchange per round, the new turns of all sessions
        tokenized in one call per round: turns too old to fit are never tokenized. (More turns
        never render shorter, so the first suffix that does not fit ends the search.)
        """
        cuts = [_history_cuts(x.history) for x in parts]
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
        return frames

    def _cut_own_system(self, x: _SessionParts, n_question: int, budget: int) -> Frame:
        """The frame of a session without history whose own system content is cut from its end.

        Args:
            x: A session with its own system turn, too long with the whole question.
            n_question: The question's length in tokens.
            budget: Tokens for the framing and the question.

        Returns:
            The frame with the prefix of the system content found by bisection over its
            characters (the whole question fits beside it, not beside one more character), or
            with an empty content when none fits: the question is then cut.
        """

        def frame(chars: int) -> Frame:
            return self.renderer.frames([x.without_history(chars)])[0]

        lo, hi, best = 0, len(x.system[0].content), frame(0)
        if not _fits(best, n_question, budget):
            return best
        while hi - lo > 1:  # lo fits, hi does not
            mid = (lo + hi) // 2
            trial = frame(mid)
            if _fits(trial, n_question, budget):
                lo, best = mid, trial
            else:
                hi = mid
        return best

    def _warn_once(self, kind: str, ids: list[str], what: str) -> None:
        """Warn of a kind of cut once per template: training meets it every batch."""
        if ids and kind not in self._warned:
            self._warned.add(kind)
            logger.warning(
                "%d session(s) %s max_session_len=%d (first: %r): %s",
                *(len(ids), kind, self.max_session_len, ids[0], what),
            )

    def passage_ids(self, passage: Passage | str) -> list[int]:
        """Token ids of a passage as one assistant message ("title\\ntext") + the EMB tokens."""
        return self.passage_ids_batch([passage])[0]

    def passage_ids_batch(self, passages: Sequence[Passage | Any]) -> list[list[int]]:
        """`passage_ids` of each passage (anything `passage_text` reads), one tokenizer call."""
        texts = [passage_text(p) for p in passages]
        frame, max_len = self.renderer.passage_frame, self.max_passage_len
        return [self._framed(frame, ids, max_len) for ids in self.contents.encode(texts)]

    def _framed(self, frame: Frame, content: list[int], max_len: int) -> list[int]:
        pre, post = frame
        room = max_len - self.n_emb_tokens - len(pre) - len(post)
        if room < 1:
            raise ValueError(f"max length {max_len} leaves no room for content in the template")
        return pre + content[:room] + post + list(self.emb_ids)

    def csit_pieces(self, session: SessionLike, response: str) -> CsitPieces:
        """The CSIT sequence of a session and the response it should generate.

        Args:
            session: The session (truncated as in `session_ids`).
            response: The generation target (e.g. the reference answer or positive passage).

        Returns:
            CsitPieces; its session part is exactly `session_ids(session)` without the EMB tokens.
        """
        return self.csit_pieces_batch([session], [response])[0]

    def csit_pieces_batch(
        self, sessions: Sequence[SessionLike], responses: Sequence[str]
    ) -> list[CsitPieces]:
        """`csit_pieces` of each (session, response) pair, tokenized in one call per chunk."""
        if len(sessions) != len(responses):
            raise ValueError(f"{len(sessions)} sessions but {len(responses)} responses")
        header, footer = self.renderer.response_frame
        room = self.max_response_len - len(header) - len(footer)  # no EMB tokens on this side
        if room < 1:
            raise ValueError(f"max_response_len={self.max_response_len} leaves no room for text")
        out = []
        session_ids = self.session_ids_batch(sessions)
        for s_ids, content in zip(session_ids, self.contents.encode(responses), strict=True):
            r_ids = header + content[:room] + footer
            label_start = len(s_ids) + len(header)
            label_end = len(s_ids) + len(r_ids)
            out.append(
                CsitPieces(
                    input_ids=tuple(s_ids + r_ids),
                    session_len=len(s_ids) - self.n_emb_tokens,
                    n_emb=self.n_emb_tokens,
                    label_start=label_start,
                    label_end=label_end,
                )
            )
        return out


def _fits(frame: Frame, n_content: int, budget: int) -> bool:
    """Whether a frame and that many content tokens take at most `budget` tokens."""
    return len(frame[0]) + n_content + len(frame[1]) <= budget


def _history_cuts(history: Sequence[Turn]) -> list[int]:
    """Where the history may be cut: before each user turn (and everything), oldest first."""
    cuts = [i for i, t in enumerate(history) if t.role == "user" and i > 0]
    return [0, *cuts, len(history)]
