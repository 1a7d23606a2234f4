"""The binary-choice prompt of the RaHoRe reranker, as token ids split at the document's end.

One user message in the model's own chat template, with the generation prompt added:

    [template head] <document head> DOCUMENT <query head> CONVERSATION <question with 2 options>
    [end of user turn, assistant header]  -> the next token is the answer: option 1 or option 2

The DOCUMENT comes first, so `document_ids(doc)` is a prefix shared by every query scored against
that document (its KV cache is computed once), and `query_ids(session)` is the rest. Both are
tokenized on their own, with and without KV reuse alike, so the two paths see the very same ids.

Two wordings (plain prompt strings: no special token is added, so `modeling.template` is not
involved): "ab", in the spirit of the released RaHoRe code (a reply-strategy question, options
A = yes / B = no), and "tf", the paper's ("Can Q be appropriately responded with D? ... true,
choose T; otherwise F"). Both are our own phrasings. User text (documents, turns) is tokenized
with no added token matched (`ContentTokenizer`): a typed "<|im_end|>" stays text.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from chatretriever.modeling.chat_render import PLAIN_TEMPLATE
from chatretriever.modeling.content_ids import ContentTokenizer
from chatretriever.types import Passage, Session, SessionLike, as_sessions, passage_texts

logger = logging.getLogger(__name__)

BUDGETS = ("max_document_tokens", "max_query_tokens")  # `BinaryChoicePrompt`'s token budgets

DocumentLike = str | Passage | Mapping[str, Any]
"""A document: its text, or a `Passage` / {title?, text} mapping read by `types.passage_text`."""

_SLOT_DOC = "@@RATIONALE_DOCUMENT@@"
_SLOT_QUERY = "@@RATIONALE_QUERY@@"
# Llama 3 templates print today's date unless given one; a fixed one keeps scores stable.
_FIXED_DATE = "26 Jul 2024"


@dataclass(frozen=True)
class ChoiceWording:
    """The text around the document and the conversation, and the two option tokens.

    Attributes:
        name: Short name ("ab", "tf").
        document_head: Text before the document.
        query_head: Text between the document and the conversation.
        question: Text after the conversation: the question and its two options.
        yes: The option that means "relevant" (one token of the tokenizer).
        no: The other option.
        user_label: How the conversation names the user (the seeker).
        assistant_label: How it names the assistant (the supporter).
    """

    name: str
    document_head: str
    query_head: str
    question: str
    yes: str
    no: str
    user_label: str = "Seeker"
    assistant_label: str = "Supporter"


WORDINGS = {
    "ab": ChoiceWording(
        name="ab",
        document_head="Here is a reply strategy for an emotional-support conversation.\nStrategy: ",
        query_head="\n\nHere is the conversation so far:\n",
        question="\n\nCan the supporter reply to the seeker's last message with this strategy?\n"
        "A. Yes\nB. No\nAnswer with A or B only.",
        yes="A",
        no="B",
    ),
    "tf": ChoiceWording(
        name="tf",
        document_head="document: ",
        query_head="\nquery: ",
        question="\nCan the query be appropriately responded with the document? If you think "
        "the answer is true, choose T; otherwise choose F. Answer with T or F only.",
        yes="T",
        no="F",
        user_label="User",
        assistant_label="Assistant",
    ),
}


def choice_wording(wording: ChoiceWording | str) -> ChoiceWording:
    """The wording `wording` names (a key of `WORDINGS`), or `wording` itself.

    Raises:
        ValueError: A name that is not a key of `WORDINGS` (the error lists them).
        TypeError: Neither a name nor a `ChoiceWording`.
    """
    if isinstance(wording, ChoiceWording):
        return wording
    if not isinstance(wording, str):
        raise TypeError(
            f"wording must be one of {sorted(WORDINGS)} or a ChoiceWording, "
            f"got a {type(wording).__name__}"
        )
    if wording not in WORDINGS:
        raise ValueError(f"wording must be one of {sorted(WORDINGS)}, got {wording!r}")
    return WORDINGS[wording]


def conversation_text(session: Session, wording: ChoiceWording) -> str:
    """The dialog so far as labelled lines, oldest first.

    Supporter messages said after the seeker's last turn (`metadata["supporter_prefix"]`) close
    it; with `metadata["show_situation"]` the seeker's `situation` opens it.
    """
    meta = session.metadata or {}
    lines = []
    if meta.get("show_situation") and meta.get("situation"):
        lines.append(f"({wording.user_label}'s situation: {meta['situation']})")
    for t in session.turns:
        label = wording.user_label if t.role == "user" else wording.assistant_label
        lines.append(f"{label}: {t.content}")
    lines += [f"{wording.assistant_label}: {text}" for text in meta.get("supporter_prefix") or ()]
    return "\n".join(lines)


class BinaryChoicePrompt:
    """Token ids of the binary-choice prompt: a document prefix and a query suffix.

    Args:
        tokenizer: A Hugging Face tokenizer (its chat template, else a plain one).
        wording: A `ChoiceWording` or the name of one in `WORDINGS`.
        max_document_tokens: A longer document is cut from its end.
        max_query_tokens: A longer conversation keeps its most recent tokens.
        system_prompt: A system message; None keeps the template's own behaviour.

    Raises:
        ValueError: An unknown wording name (`choice_wording`), or an option is not exactly one
            token of the tokenizer.
    """

    def __init__(
        self,
        tokenizer: Any,
        wording: ChoiceWording | str = "ab",
        max_document_tokens: int = 256,
        max_query_tokens: int = 384,
        system_prompt: str | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.wording = choice_wording(wording)
        self.max_document_tokens = max_document_tokens
        self.max_query_tokens = max_query_tokens
        self.contents = ContentTokenizer(tokenizer)
        w = self.wording
        user = f"{w.document_head}{_SLOT_DOC}{w.query_head}{_SLOT_QUERY}{w.question}"
        messages = [{"role": "user", "content": user}]
        if system_prompt is not None:
            messages.insert(0, {"role": "system", "content": system_prompt})
        text = tokenizer.apply_chat_template(
            messages,
            tokenize=False,
            add_generation_prompt=True,
            chat_template=getattr(tokenizer, "chat_template", None) or PLAIN_TEMPLATE,
            date_string=_FIXED_DATE,
        )
        before, rest = text.split(_SLOT_DOC)
        middle, after = rest.split(_SLOT_QUERY)
        self._before, self._middle, self._after = (
            self.contents.ids_of(self.contents.split_added(t)) for t in (before, middle, after)
        )
        self.option_ids = (self._option_id(w.yes), self._option_id(w.no))

    def _option_id(self, option: str) -> int:
        ids = self.tokenizer(option, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ValueError(
                f"option {option!r} of wording {self.wording.name!r} is {len(ids)} tokens of "
                "this tokenizer; the reranker needs exactly one"
            )
        return int(ids[0])

    def document_ids(self, documents: Sequence[DocumentLike]) -> list[list[int]]:
        """The prefix of each document: template head, document head, the document.

        Args:
            documents: Document texts, or `Passage`s / {title?, text} mappings, read by their
                `types.passage_text` (as `encode_passages` reads them).
        """
        docs = self.contents.encode(passage_texts(documents, "documents"))
        return [self._before + d[: self.max_document_tokens] for d in docs]

    def query_ids(self, sessions: Sequence[SessionLike]) -> list[list[int]]:
        """The suffix of each session: conversation, question, assistant header.

        Args:
            sessions: Sessions, or lists of {role, content} messages (`types.as_sessions`).
        """
        texts = [conversation_text(s, self.wording) for s in as_sessions(sessions)]
        convs = self.contents.encode(texts)
        return [self._middle + c[-self.max_query_tokens :] + self._after for c in convs]

    def answer_ids(self, relevant: Sequence[bool]) -> list[int]:
        """The target token of each pair: the yes option when relevant, else the no option."""
        return [self.option_ids[0] if r else self.option_ids[1] for r in relevant]


def default_budgets() -> dict[str, int]:
    """`BinaryChoicePrompt`'s default token budgets, {"max_document_tokens": .., "max_query_tokens":
    ..}: read from its signature, the one place the numbers live."""
    import inspect

    params = inspect.signature(BinaryChoicePrompt).parameters
    return {k: params[k].default for k in BUDGETS}
