"""Chat formatting and the [EMB_i] tokens: the only module that knows either.

Every input is the tokenizer's own chat template followed by t special tokens [EMB_1..EMB_t];
the final hidden state of the last one is the embedding.

- A session renders all its turns, ending with the current user question, with no generation
  prompt. Too long: whole exchanges of the history are dropped oldest first (a cut always lands
  on a user turn); then the question itself is cut from its end. The template's tokens around the
  question and the EMB tokens always survive.
- A passage (or a response used as a positive) is one assistant message: "title\\ntext".
- The CSIT sequence is [session, EMB x t, assistant turn with the response, EMB x t].

System messages are rendered on purpose. Some templates (SmolLM2, Qwen2.5) inject a default system
message ("You are a helpful AI assistant named SmolLM...", ~20 tokens) whenever the conversation
has none. When `system_prompt` is None and the template is detected to inject one, an explicit
EMPTY system message is passed instead, so only the template's few framing tokens remain.
A session's own system turn is always kept as it is.

Pieces are tokenized separately (template text before the content, the content, the template
text after it) so that lengths and spans are exact. Functions return plain lists of token ids.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from chatretriever.types import Passage, SessionLike, Turn, as_session

if TYPE_CHECKING:
    from chatretriever.config import RetrieverConfig

logger = logging.getLogger(__name__)

EMB_TOKEN_FORMAT = "[EMB_{}]"
# Placeholder for a message's content: the rendered text is split around it.
_SLOT = "@@CHATRETRIEVER_SLOT@@"
_PROBE_SYSTEM = "\x01SYSTEM-PROBE\x02"
_PROBE_USER = "\x01USER-PROBE\x02"
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


@dataclass(frozen=True)
class CsitPieces:
    """One CSIT sequence [session, EMB x t, response part, EMB x t] and its spans.

    Spans are half-open [start, end) token positions:
    session [0, session_len), session EMB [session_len, response_start),
    response part [response_start, label_end) = assistant header, then the trained tokens
    [label_start, label_end) (the response and the template's end-of-turn tokens),
    response EMB [label_end, len(input_ids)).
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


class RetrievalTemplate:
    """Turns sessions, passages and responses into token ids ending with the EMB tokens.

    Args:
        tokenizer: A Hugging Face tokenizer that already holds the EMB tokens (`add_emb_tokens`).
        n_emb_tokens: t.
        max_session_len: Token budget of a session, EMB tokens included.
        max_passage_len: Token budget of a passage, EMB tokens included.
        max_response_len: Token budget of a CSIT response part, EMB tokens included.
        system_prompt: None = no system message (see module docstring), or the system message.
    """

    def __init__(
        self,
        tokenizer: Any,
        n_emb_tokens: int = 3,
        max_session_len: int = 512,
        max_passage_len: int = 256,
        max_response_len: int = 256,
        system_prompt: str | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.n_emb_tokens = n_emb_tokens
        self.emb_ids: tuple[int, ...] = tuple(emb_token_ids(tokenizer, n_emb_tokens))
        self.max_session_len = max_session_len
        self.max_passage_len = max_passage_len
        self.max_response_len = max_response_len
        self._chat_template = getattr(tokenizer, "chat_template", None) or PLAIN_TEMPLATE
        if self._chat_template is PLAIN_TEMPLATE:
            logger.info("tokenizer has no chat template: using a plain 'role: content' one")
        self.system: list[dict[str, str]] = []
        if system_prompt is not None:
            self.system = [{"role": "system", "content": system_prompt}]
        elif self.injects_default_system():
            self.system = [{"role": "system", "content": ""}]
        self._passage_frame = self._frame_ids([{"role": "assistant", "content": _SLOT}])
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

    def _tok(self, text: str) -> list[int]:
        """Ids of template text (its special tokens such as <|im_start|> are parsed)."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _tok_content(self, text: str) -> list[int]:
        """Ids of user-provided content: a literal "[EMB_1]" or "<|im_end|>" in it stays text."""
        enc = self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)
        return list(enc["input_ids"])

    def _frame_ids(self, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
        """Token ids of the template text before and after the single _SLOT content."""
        msgs = messages if messages[0]["role"] == "system" else self.system + messages
        try:
            text = self.render(msgs)
        except Exception as e:
            if messages[-1]["role"] != "assistant":
                raise
            # Some templates insist on user/assistant alternation: a lone passage is then a user
            # message.
            logger.warning(
                "chat template rejects a lone assistant message (%s): passages are "
                "rendered as user messages",
                e,
            )
            return self._frame_ids(messages[:-1] + [{"role": "user", "content": _SLOT}])
        return self._split(text)

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

    # ---------------------------------------------------------------- public ids
    def session_ids(self, session: SessionLike) -> list[int]:
        """Token ids of a session followed by the t EMB tokens, at most `max_session_len`.

        Args:
            session: A Session or a list of {"role", "content"} messages ending with a user turn.

        Returns:
            Token ids; the current question's framing tokens and the EMB tokens always survive.
        """
        s = as_session(session)
        turns = list(s.turns)
        system = [turns.pop(0).to_dict()] if turns[0].role == "system" else []
        history, question = turns[:-1], turns[-1].content
        budget = self.max_session_len - self.n_emb_tokens
        q_ids = self._tok_content(question)

        def frame(cut: int) -> tuple[list[int], list[int]]:
            msgs = system + [t.to_dict() for t in history[cut:]]
            return self._frame_ids(msgs + [{"role": "user", "content": _SLOT}])

        def fits(cut: int) -> bool:
            pre, post = frame(cut)
            return len(pre) + len(q_ids) + len(post) <= budget

        cuts = _history_cuts(history)
        if not fits(0):
            # Fewer turns never make the text longer: binary search the first cut that fits.
            i = bisect.bisect_left(cuts, True, lo=1, key=fits)
            cut = cuts[min(i, len(cuts) - 1)]
            logger.debug("session %s: dropped %d of %d history turns", s.id, cut, len(history))
        else:
            cut = 0
        pre, post = frame(cut)
        room = budget - len(pre) - len(post)
        if room < 1:
            raise ValueError(
                f"max_session_len={self.max_session_len} leaves no room for the question "
                f"(template needs {len(pre) + len(post)} + {self.n_emb_tokens} EMB tokens)"
            )
        return pre + q_ids[:room] + post + list(self.emb_ids)

    def passage_ids(self, passage: Passage | str) -> list[int]:
        """Token ids of a passage as one assistant message ("title\\ntext") + the EMB tokens."""
        return self._framed(self._passage_frame, passage_text(passage), self.max_passage_len)

    def _framed(self, frame: tuple[list[int], list[int]], content: str, max_len: int) -> list[int]:
        pre, post = frame
        room = max_len - self.n_emb_tokens - len(pre) - len(post)
        if room < 1:
            raise ValueError(f"max length {max_len} leaves no room for content in the template")
        return pre + self._tok_content(content)[:room] + post + list(self.emb_ids)

    def csit_pieces(self, session: SessionLike, response: str) -> CsitPieces:
        """The CSIT sequence of a session and the response it should generate.

        Args:
            session: The session (truncated as in `session_ids`).
            response: The generation target (e.g. the reference answer or positive passage).

        Returns:
            CsitPieces; its session part is exactly `session_ids(session)` without the EMB tokens.
        """
        s_ids = self.session_ids(session)
        header = self._response_frame[0]
        r_ids = self._framed(self._response_frame, response, self.max_response_len)
        label_start = len(s_ids) + len(header)
        label_end = len(s_ids) + len(r_ids) - self.n_emb_tokens
        return CsitPieces(
            input_ids=tuple(s_ids + r_ids),
            session_len=len(s_ids) - self.n_emb_tokens,
            n_emb=self.n_emb_tokens,
            label_start=label_start,
            label_end=label_end,
        )


def passage_text(passage: Passage | Mapping[str, Any] | str | Any) -> str:
    """The content of a passage's message: "title\\ntext", or the text when there is no title.

    A passage may be a `Passage`, a string, or a mapping with "text" (and optional "title"),
    like a BEIR corpus line.
    """
    if isinstance(passage, str):
        return passage
    if isinstance(passage, Mapping):
        if not isinstance(passage.get("text"), str):
            raise ValueError(
                f"a passage mapping needs a string 'text' field, got keys {sorted(passage)}"
            )
        title, text = passage.get("title") or "", passage["text"]
    else:
        title, text = getattr(passage, "title", "") or "", passage.text
    return f"{title}\n{text}" if title else text


def _history_cuts(history: Sequence[Turn]) -> list[int]:
    """Where the history may be cut: before each user turn (and everything), oldest first."""
    cuts = [i for i, t in enumerate(history) if t.role == "user" and i > 0]
    return [0, *cuts, len(history)]
