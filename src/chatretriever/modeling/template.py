"""Chat formatting and the pooled tokens ([EMB_i], or the end-of-sequence token): the only module
that knows either.

Every input is the tokenizer's own chat template followed by t special tokens [EMB_1..EMB_t]
(pooling "last_emb"), or by the tokenizer's own end-of-sequence token (pooling "eos", UniConv's
representation: nothing is added to the vocabulary); the final hidden state of the last one is
the embedding. Below, "EMB tokens" means these appended tokens either way.

- A session renders all its turns, ending with the current user question, with no generation
  prompt. Too long, it is fitted to `max_session_len` by the over-long-turn rule, described
  and implemented in `session_fit.py`.
- A passage (or a response used as a positive) is one assistant message: "title\\ntext".
- The CSIT sequence is [session, EMB x t, assistant turn with the response] (no EMB tokens after
  the response: nothing reads them).

System messages are rendered on purpose (an injected default one is replaced by an empty one:
`chat_render.py`); a session's own system turn replaces it (cut only as `session_fit.py` says).

Every message's content (each turn, the question, a passage, a response) is user text: it is
tokenized with no added token matched, so a literal "<|im_end|>" or "[EMB_1]" typed anywhere stays
text; only the chat template's own text yields control tokens. The rendering of a role sequence
(contents left as slots) is split at the template's added tokens once and cached
(`chat_render.ChatRenderer`). The text between two of them (template text and earlier turns'
contents) is tokenized as one run, as the tokenizer tokenizes a full rendering, and each run's ids
are cached. A passage and a response are tokenized on their own and cut from their end, so
lengths and spans are exact. Functions return plain lists of token ids; the `*_batch` ones
tokenize the texts of many inputs in one tokenizer call.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from chatretriever.modeling.chat_render import ChatRenderer, Frame
from chatretriever.modeling.session_fit import SessionFitter

# passage_text lives in types (BM25 and mining read passages the same way); re-exported here.
from chatretriever.types import Passage, SessionLike, Turn, passage_text

if TYPE_CHECKING:
    from chatretriever.config import RetrieverConfig

EMB_TOKEN_FORMAT = "[EMB_{}]"


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
    vocab = tokenizer.get_vocab()  # once: a copy of the whole vocabulary (Gemma 3: 262k entries)
    missing = [tok for tok in tokens if tok not in vocab]
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
        self.max_passage_len = max_passage_len
        self.max_response_len = max_response_len
        self.renderer = ChatRenderer(tokenizer, system_prompt)
        self.contents = self.renderer.contents
        self.system = self.renderer.system
        self._check_room()
        # over-long sessions: its cuts are warned of once per template
        self.session_fitter = SessionFitter(self.renderer, self.emb_ids, max_session_len)

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
        return self.session_fitter.ids_batch(sessions)

    def passage_ids(self, passage: Passage | str) -> list[int]:
        """Token ids of a passage as one assistant message ("title\\ntext") + the EMB tokens."""
        return self.passage_ids_batch([passage])[0]

    def passage_ids_batch(self, passages: Sequence[Passage | Any]) -> list[list[int]]:
        """`passage_ids` of each passage (anything `passage_text` reads), one tokenizer call."""
        # a lone assistant message's content as rendered: stripped where the template trims it
        texts = [self.renderer.content_text(Turn("assistant", passage_text(p))) for p in passages]
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
        rendered = [self.renderer.content_text(Turn("assistant", r)) for r in responses]
        for s_ids, content in zip(session_ids, self.contents.encode(rendered), strict=True):
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
