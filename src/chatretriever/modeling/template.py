"""Chat formatting and the pooled tokens ([EMB_i], or the end-of-sequence token): the only module
that knows either.

Every input is the tokenizer's own chat template followed by t special tokens [EMB_1..EMB_t]
(pooling "last_emb"), or by the tokenizer's own end-of-sequence token (pooling "eos", UniConv's
representation: nothing is added to the vocabulary); the final hidden state of the last one is
the embedding. Below, "EMB tokens" means these appended tokens either way.

- A session renders all its turns, ending with the current user question, with no generation
  prompt. Too long: whole exchanges of the history are dropped oldest first (a cut always lands
  on a user turn); then the question itself is cut from its end. The template's tokens around the
  question and the EMB tokens always survive.
- A passage (or a response used as a positive) is one assistant message: "title\\ntext".
- The CSIT sequence is [session, EMB x t, assistant turn with the response] (no EMB tokens after
  the response: nothing reads them).

System messages are rendered on purpose. Some templates (SmolLM2, Qwen2.5) inject a default system
message ("You are a helpful AI assistant named SmolLM...", ~20 tokens) whenever the conversation
has none. When `system_prompt` is None and the template is detected to inject one, an explicit
EMPTY system message is passed instead, so only the template's few framing tokens remain.
A session's own system turn is always kept as it is.

Every message's content (each turn, the question, a passage, a response) is user text: it is
tokenized with no added token matched, so a literal "<|im_end|>" or "[EMB_1]" typed anywhere stays
text; only the chat template's own text yields control tokens. The rendering of a role sequence
(contents left as slots) is split at the template's added tokens once and cached. The text between
two of them (template text and earlier turns' contents) is tokenized as one run, as the tokenizer
tokenizes a full rendering, and each run's ids are cached: a history turn is tokenized once, not
once per truncation step. The current question, a passage and a response are tokenized on their
own (they are cut from their end), so lengths and spans are exact. Functions return plain lists
of token ids; the `*_batch` ones tokenize the texts of many inputs in one tokenizer call.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from chatretriever.modeling.content_ids import ContentTokenizer

# passage_text lives in types (BM25 and mining read passages the same way); re-exported here.
from chatretriever.types import Passage, SessionLike, Turn, as_session, passage_text

if TYPE_CHECKING:
    from chatretriever.config import RetrieverConfig

logger = logging.getLogger(__name__)

EMB_TOKEN_FORMAT = "[EMB_{}]"
# Placeholders for message contents: the rendered text is split around them.
_SLOT = "@@CHATRETRIEVER_SLOT@@"
_SLOT_FORMAT = "@@CHATRETRIEVER_SLOT_{}@@"
_SLOT_RE = re.compile(r"@@CHATRETRIEVER_SLOT_(\d+)@@")
_PROBE_SYSTEM = "\x01SYSTEM-PROBE\x02"
_PROBE_USER = "\x01USER-PROBE\x02"
_TRIM_PROBES = (("system", _PROBE_SYSTEM), ("user", _PROBE_USER), ("assistant", "\x01A-PROBE\x02"))
_MAX_LAYOUTS = 1024  # cached renderings of role sequences
_SESSION_CHUNK = 256  # sessions whose history runs are tokenized together
# Llama 3.x templates print today's date unless given one: fix it so embeddings do not change daily.
_FIXED_DATE = "26 Jul 2024"
# Used only when a tokenizer carries no chat template (e.g. a base model).
PLAIN_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


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
class _Slot:
    """Where the content of message `index` goes in a rendered role sequence."""

    index: int


@dataclass(frozen=True)
class _SessionParts:
    """A session as truncation sees it: system turn(s), history, current question."""

    id: str
    system: tuple[Turn, ...]
    history: tuple[Turn, ...]
    question: str

    def messages(self, cut: int) -> list[Turn]:
        """The messages when the history is cut before turn `cut`."""
        return [*self.system, *self.history[cut:], Turn("user", self.question)]


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
        self._warned_cut = False
        self.max_passage_len = max_passage_len
        self.max_response_len = max_response_len
        self._chat_template = getattr(tokenizer, "chat_template", None) or PLAIN_TEMPLATE
        if self._chat_template is PLAIN_TEMPLATE:
            logger.info("tokenizer has no chat template: using a plain 'role: content' one")
        self.contents = ContentTokenizer(tokenizer)  # user text -> ids, no control token
        self._layouts: dict[tuple[str, ...], tuple[int | str | _Slot, ...]] = {}
        self.system: list[dict[str, str]] = []
        if system_prompt is not None:
            self.system = [{"role": "system", "content": system_prompt}]
        elif self.injects_default_system():
            self.system = [{"role": "system", "content": ""}]
        self._system_turns = tuple(Turn(m["role"], m["content"]) for m in self.system)
        self._trimmed = self._trimmed_roles()
        self._passage_frame = self._frames([[*self._system_turns, Turn("assistant", "")]])[0]
        self._response_frame = self._response_frame_ids()

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

    # ---------------------------------------------------------------- rendering
    def render(
        self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = False
    ) -> str:
        """The chat template's text of `messages` (no system message is added here)."""
        return self.tokenizer.apply_chat_template(
            list(messages),
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            chat_template=self._chat_template,
            date_string=_FIXED_DATE,
        )

    def injects_default_system(self) -> bool:
        """Whether the chat template adds its own system message when none is given.

        Compares [user] with [system=probe, user]: text found in the first rendering where the
        second holds the probe is an injected default system message.
        """
        user = {"role": "user", "content": _PROBE_USER}
        try:
            plain = self.render([user])
            with_system = self.render([{"role": "system", "content": _PROBE_SYSTEM}, user])
        except Exception:  # templates without a system role raise from Jinja
            return False
        prefix = 0
        while prefix < min(len(plain), len(with_system)) and plain[prefix] == with_system[prefix]:
            prefix += 1
        suffix = 0
        limit = min(len(plain), len(with_system)) - prefix
        while suffix < limit and plain[-1 - suffix] == with_system[-1 - suffix]:
            suffix += 1
        injected = plain[prefix : len(plain) - suffix]
        return _PROBE_SYSTEM in with_system and bool(injected.strip())

    def _trimmed_roles(self) -> frozenset[str]:
        """Roles whose content the template strips of surrounding whitespace (`| trim`).

        Llama 3 and Gemma templates do; earlier turns are then stripped as rendering would.
        """
        for probes in (_TRIM_PROBES, _TRIM_PROBES[1:]):
            try:
                text = self.render([{"role": r, "content": f" {p} "} for r, p in probes])
            except Exception:  # e.g. a template without a system role
                continue
            return frozenset(r for r, p in probes if p in text and f" {p} " not in text)
        return frozenset()

    def _layout(self, roles: tuple[str, ...]) -> tuple[int | str | _Slot, ...]:
        """Messages with these roles rendered: the template's added-token ids, its text, slots.

        A rendering depends on the roles only, so each role sequence is rendered once.
        """
        layout = self._layouts.get(roles)
        if layout is not None:
            return layout
        msgs = [{"role": r, "content": _SLOT_FORMAT.format(i)} for i, r in enumerate(roles)]
        try:
            text = self.render(msgs)
        except Exception as e:
            if roles[-1] != "assistant":
                raise
            # Some templates insist on user/assistant alternation: a lone passage is then a user
            # message.
            logger.warning(
                "chat template rejects a lone assistant message (%s): passages are "
                "rendered as user messages",
                e,
            )
            layout = self._layout((*roles[:-1], "user"))
        else:
            parts = _SLOT_RE.split(text)  # [text, "0", text, "1", ..., text]
            if parts[1::2] != [str(i) for i in range(len(roles))]:
                raise ValueError("the chat template alters message contents; cannot place them")
            items: list[int | str | _Slot] = []
            for i, frame in enumerate(parts[::2]):
                items += [_Slot(i - 1)] if i else []
                pieces = self.contents.split_added(frame)
                if self.contents.ids_of(pieces) != self._tok(frame):
                    logger.warning("template text %r tokenizes differently in pieces", frame)
                items += pieces
            layout = tuple(items)
        if len(self._layouts) >= _MAX_LAYOUTS:
            self._layouts.clear()
        self._layouts[roles] = layout
        return layout

    def _pieces(self, messages: Sequence[Turn]) -> tuple[list[int | str], list[int | str]]:
        """The rendering of `messages` before and after the last one's content.

        Each piece is a template added-token id or a run of text between two of them: template
        text joined with the earlier messages' contents, tokenized as one text as the tokenizer
        tokenizes the full rendering, but with no added token matched inside.
        """
        sides: tuple[list[int | str], list[int | str]] = ([], [])
        side, run = 0, []
        for item in self._layout(tuple(m.role for m in messages)):
            if isinstance(item, str):
                run.append(item)
            elif isinstance(item, _Slot) and item.index < len(messages) - 1:
                m = messages[item.index]
                run.append(m.content.strip() if m.role in self._trimmed else m.content)
            else:  # a template token, or the last content's slot: the run ends
                if run:
                    sides[side].append("".join(run))
                    run = []
                if isinstance(item, int):
                    sides[side].append(item)
                else:
                    side = 1
        if run:
            sides[side].append("".join(run))
        return sides

    def _frames(self, sessions: Sequence[Sequence[Turn]]) -> list[tuple[list[int], list[int]]]:
        """Ids before and after the last message's content of each message list.

        The text runs missing from the cache are tokenized in one call.
        """
        pieces = [self._pieces(messages) for messages in sessions]
        self.contents.cached(
            p for pair in pieces for side in pair for p in side if isinstance(p, str)
        )
        return [(self.contents.ids_of(pre), self.contents.ids_of(post)) for pre, post in pieces]

    def _split(self, text: str) -> tuple[list[int], list[int]]:
        if text.count(_SLOT) != 1:
            raise ValueError("the chat template alters message contents; cannot place the content")
        before, after = text.split(_SLOT)
        return self._tok(before), self._tok(after)

    def _response_frame_ids(self) -> tuple[list[int], list[int]]:
        """The assistant turn that follows a session: (header ids, end-of-turn ids).

        Read once from a dummy session: [session + assistant] minus [session].
        """
        session = self.system + [{"role": "user", "content": "Hi"}]
        head = self.render(session)
        full = self.render(session + [{"role": "assistant", "content": _SLOT}])
        if not full.startswith(head):
            logger.warning("chat template re-renders earlier turns: responses use passage format")
            return self._passage_frame
        return self._split(full[len(head) :])

    # ---------------------------------------------------------------- tokenizing
    def _tok(self, text: str) -> list[int]:
        """Ids of template text (its special tokens such as <|im_start|> are parsed)."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

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
        system, history = (turns[:1], turns[1:-1]) if own else (self._system_turns, turns[:-1])
        return _SessionParts(s.id, tuple(system), tuple(history), turns[-1].content)

    def _fit(self, parts: list[_SessionParts], questions: list[list[int]]) -> list[list[int]]:
        """Keep the longest history suffix of whole exchanges that fits, then cut the question
        from its start (its end, where a long turn asks, survives).

        Suffixes grow newest first, one exchange per round, the new turns of all sessions
        tokenized in one call per round: turns too old to fit are never tokenized. (More turns
        never render shorter, so the first suffix that does not fit ends the search.)
        """
        budget = self.max_session_len - self.n_emb_tokens

        def fits(frame: tuple[list[int], list[int]], q: list[int]) -> bool:
            return len(frame[0]) + len(q) + len(frame[1]) <= budget

        cuts = [_history_cuts(x.history) for x in parts]
        pos = [len(c) - 1 for c in cuts]  # index in cuts of each kept suffix: no history yet
        frames = self._frames([x.messages(c[-1]) for x, c in zip(parts, cuts, strict=True)])
        todo = [i for i, p in enumerate(pos) if p > 0 and fits(frames[i], questions[i])]
        while todo:
            trial = self._frames([parts[i].messages(cuts[i][pos[i] - 1]) for i in todo])
            grown = []
            for i, frame in zip(todo, trial, strict=True):
                if fits(frame, questions[i]):
                    frames[i], pos[i] = frame, pos[i] - 1
                    grown.append(i)
            todo = [i for i in grown if pos[i] > 0]
        out, cut = [], []
        for x, q, c, p, (pre, post) in zip(parts, questions, cuts, pos, frames, strict=True):
            if c[p]:
                logger.debug(
                    "session %s: dropped %d of %d history turns", x.id, c[p], len(x.history)
                )
            room = budget - len(pre) - len(post)
            if room < 1:
                raise ValueError(
                    f"max_session_len={self.max_session_len} leaves no room for the question "
                    f"(template needs {len(pre) + len(post)} + {self.n_emb_tokens} EMB tokens)"
                )
            if len(q) > room:  # keep the end: a long turn (pasted text) ends with its question
                cut.append(x.id)
            out.append(pre + q[-room:] + post + list(self.emb_ids))
        if cut and not self._warned_cut:  # once per template: training meets it every batch
            self._warned_cut = True
            logger.warning(
                "%d session(s) with a current turn over max_session_len=%d (first: %r): its "
                "start was cut, its end (the question) kept",
                len(cut),
                self.max_session_len,
                cut[0],
            )
        return out

    def passage_ids(self, passage: Passage | str) -> list[int]:
        """Token ids of a passage as one assistant message ("title\\ntext") + the EMB tokens."""
        return self.passage_ids_batch([passage])[0]

    def passage_ids_batch(self, passages: Sequence[Passage | Any]) -> list[list[int]]:
        """`passage_ids` of each passage (anything `passage_text` reads), one tokenizer call."""
        texts = [passage_text(p) for p in passages]
        frame, max_len = self._passage_frame, self.max_passage_len
        return [self._framed(frame, ids, max_len) for ids in self.contents.encode(texts)]

    def _framed(
        self, frame: tuple[list[int], list[int]], content: list[int], max_len: int
    ) -> list[int]:
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
        header, footer = self._response_frame
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


def _history_cuts(history: Sequence[Turn]) -> list[int]:
    """Where the history may be cut: before each user turn (and everything), oldest first."""
    cuts = [i for i, t in enumerate(history) if t.role == "user" and i > 0]
    return [0, *cuts, len(history)]
