"""Grounded answers: chat prompts that put numbered passages before the user's question, and a
batched, deterministic generator for any causal chat LM.

Shared by UniConv (one model retrieves and answers), the decoupled baseline (any chat LLM answers
from retrieved passages) and the generation benchmark, so that all of them prompt the same way.
A prompt longer than `max_prompt_tokens` keeps its system message and generation prompt, drops
old history in whole exchanges and the lowest-ranked passages first (`grounded_fit.py`, also
UniConv's CII training contexts); the budget and the answer length together stay within the
model's context.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from chatretriever.modeling.backbones import context_length
from chatretriever.modeling.generate_batching import left_padded, prefilled_generate_inputs
from chatretriever.modeling.grounded_fit import FitCounts, PromptFitter
from chatretriever.modeling.grounded_text import cut_text, grounded_user_content
from chatretriever.types import Passage, Session, Turn

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

GROUNDED_SYSTEM = (
    "Answer the user's last question using only the numbered passages. Use no other knowledge. "
    "If the passages do not contain the answer, say that you do not know. Be brief."
)
CLOSED_BOOK_SYSTEM = (
    "Answer the user's last question. If you do not know the answer, say that you do not know. "
    "Be brief."
)

DEFAULT_PROMPT_TOKENS = 1536
DEFAULT_PASSAGE_CHARS = 1200

TurnLike = Turn | Mapping[str, str]
PassageLike = Passage | str


def _as_turn(turn: TurnLike) -> Turn:
    if isinstance(turn, Turn):
        return turn
    if not isinstance(turn, Mapping) or "role" not in turn or "content" not in turn:
        raise ValueError(f"a turn must be a Turn or a {{'role', 'content'}} dict, got {turn!r}")
    return Turn(role=turn["role"], content=turn["content"])


def _passage_line(i: int, passage: PassageLike, max_chars: int) -> str:
    """`[i] title: text` (or `[i] text` without a title); the text is cut to `max_chars`."""
    if isinstance(passage, str):
        title, text = "", passage
    elif isinstance(passage, Passage):
        title, text = passage.title, passage.text
    else:
        raise ValueError(f"a passage must be a Passage or a str, got {type(passage).__name__}")
    # One line per passage, no inner newlines or tabs: a title's newline followed by "[2] " would
    # also shift the passage numbering that `grounded_text.split_grounded_user` reads.
    title = " ".join(title.split())
    text = cut_text(" ".join(text.split()), max_chars)
    return f"[{i}] {title}: {text}" if title else f"[{i}] {text}"


def grounded_messages(
    turns: Sequence[TurnLike] | Session,
    passages: Sequence[PassageLike],
    max_passage_chars: int = DEFAULT_PASSAGE_CHARS,
    closed_book: bool = False,
) -> list[dict[str, str]]:
    """The chat messages that ask a model to answer a conversation's last question from passages.

    Args:
        turns: The conversation, oldest first (Turns or {"role", "content"} dicts, or a
            Session); the last one is the user's question.
        passages: The passages to answer from (best first), Passages or strings.
        max_passage_chars: Each passage's text is cut to this many characters, at a word boundary.
        closed_book: Ask without passages (also the case when `passages` is empty).

    Returns:
        [system, *earlier turns, user]: the system message is `GROUNDED_SYSTEM` (or
        `CLOSED_BOOK_SYSTEM`); the last user message is "Passages:\\n[1] title: text\\n...\\n\\n
        Question: <question>", or the question alone when closed-book.
    """
    if isinstance(turns, Session):
        turns = turns.turns
    if not turns:
        raise ValueError("grounded_messages needs at least one turn (the user's question)")
    if max_passage_chars < 1:
        raise ValueError(f"max_passage_chars must be >= 1, got {max_passage_chars}")
    parsed = [_as_turn(t) for t in turns]
    if parsed[-1].role != "user":
        raise ValueError(
            f"the conversation must end with the user's question, but its last turn is "
            f"'{parsed[-1].role}'"
        )
    *history, question = parsed
    closed = closed_book or not passages
    if closed:
        last = question.content
    else:
        lines = [_passage_line(i, p, max_passage_chars) for i, p in enumerate(passages, start=1)]
        last = grounded_user_content(lines, question.content)
    system = CLOSED_BOOK_SYSTEM if closed else GROUNDED_SYSTEM
    return [
        {"role": "system", "content": system},
        *(t.to_dict() for t in history),
        {"role": "user", "content": last},
    ]


def _stop_ids(model: Any, tokenizer: Any) -> set[int]:
    """The token ids that end an answer: the generation config's eos (an int or a list)."""
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    return {eos} if isinstance(eos, int) else set(eos or [])


def _prompt_budget(model: Any, max_prompt_tokens: int, max_new_tokens: int) -> int:
    """`max_prompt_tokens`, lowered so that a prompt and its answer fit the model's context:
    past it, learned positions raise IndexError and rotary ones answer from positions the
    model never saw."""
    ctx = context_length(model)
    if ctx is None or max_prompt_tokens + max_new_tokens <= ctx:
        return max_prompt_tokens
    if ctx - max_new_tokens < 1:
        raise ValueError(
            f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's "
            f"context of {ctx} tokens"
        )
    logger.warning(
        "max_prompt_tokens=%d + max_new_tokens=%d exceed the model's context of %d tokens: "
        "prompts are fitted to %d tokens",
        max_prompt_tokens,
        max_new_tokens,
        ctx,
        ctx - max_new_tokens,
    )
    return ctx - max_new_tokens


class GroundedGenerator:
    """Batched answers from a causal chat LM: chat template, left padding, length-sorted batches.

    Greedy decoding gives the same answer for a prompt whatever the batch it lands in (left
    padding with an attention mask; positions follow the mask).

    Args:
        model: A causal LM (put in eval mode here).
        tokenizer: Its tokenizer, with a chat template.
        max_new_tokens: The most tokens generated per answer.
        max_prompt_tokens: Longer prompts are fitted to this many tokens (`grounded_fit.py`:
            the system message and the generation prompt kept, old history and the
            lowest-ranked passages dropped first). Lowered, with a warning, when it and
            `max_new_tokens` exceed the model's context length.
        batch_size: Prompts per `model.generate` call.
        fitter: The `PromptFitter` to use (one shared by many generators counts their cuts
            together); default: a new one.

    Raises:
        ValueError: A setting < 1, no chat template, or `max_new_tokens` alone fills the
            model's context.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        max_new_tokens: int = 96,
        max_prompt_tokens: int = DEFAULT_PROMPT_TOKENS,
        batch_size: int = 8,
        fitter: PromptFitter | None = None,
    ) -> None:
        for name, value in (
            ("max_new_tokens", max_new_tokens),
            ("max_prompt_tokens", max_prompt_tokens),
            ("batch_size", batch_size),
        ):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("the tokenizer has no chat template")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.max_prompt_tokens = _prompt_budget(model, max_prompt_tokens, max_new_tokens)
        self.batch_size = batch_size
        self.fitter = fitter if fitter is not None else PromptFitter(tokenizer)
        self.max_passage_chars: int | None = None  # of the last `answer_batch`

    @property
    def fit_counts(self) -> FitCounts:
        """What `encode_prompts` cut so far (counts of its fitter)."""
        return self.fitter.counts

    def answer_report(self) -> dict[str, Any]:
        """The effective generation budgets and the prompt cuts so far (for a run's settings).

        Returns:
            {"max_new_tokens", "max_prompt_tokens", "max_passage_chars" (of the last
            `answer_batch`; None when prompts came ready-made), and `FitCounts`' fields}.
        """
        return {
            "max_new_tokens": self.max_new_tokens,
            "max_prompt_tokens": self.max_prompt_tokens,
            "max_passage_chars": self.max_passage_chars,
            **self.fit_counts.as_dict(),
        }

    @classmethod
    def from_pretrained(
        cls,
        name: str,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        **kw: Any,
    ) -> GroundedGenerator:
        """Load a causal LM by built-in name or local path (offline) and wrap it.

        Args:
            name: See `backbones.load_backbone` ("smollm2-135m-instruct", a directory, ...).
            device: Where to run; default `backbones.default_device()`.
            dtype: See `backbones.load_backbone` (None: float32).
            **kw: Passed to `GroundedGenerator.__init__` (max_new_tokens, batch_size, ...).

        Returns:
            The generator.
        """
        from chatretriever.modeling.backbones import default_device, load_backbone

        model, tokenizer = load_backbone(name, kind="causal", dtype=dtype)
        return cls(model.to(device or default_device()), tokenizer, **kw)

    def encode_prompts(self, prompts: Sequence[Sequence[Mapping[str, str]]]) -> list[list[int]]:
        """Token ids of each chat prompt (with the generation prompt), fitted to
        `max_prompt_tokens` (`grounded_fit.PromptFitter`; message contents never yield control
        tokens).

        Args:
            prompts: Chat messages per prompt.

        Returns:
            One id list per prompt, each at most `max_prompt_tokens` long; a prompt that fits
            gets the ids of its whole chat-template text.
        """
        if not prompts:
            return []
        return self.fitter.fit_batch(prompts, self.max_prompt_tokens)

    def _batch_ids(self, batch: Sequence[Sequence[int]], **gen_kw: Any) -> list[list[int]]:
        """Generate for one batch of prompt ids; returns the new ids of each, cut at eos."""
        pad = self.tokenizer.pad_token_id
        pad = self.tokenizer.eos_token_id if pad is None else pad
        # Each prompt read alone into a static cache (no pad column computed, no cache copy per
        # step); else the left-padded batch. Either way generation starts after column T.
        inputs = prefilled_generate_inputs(
            self.model, batch, pad, self.max_new_tokens
        ) or left_padded(batch, pad, self.model.device)
        out = self.model.generate(
            **inputs,
            max_new_tokens=self.max_new_tokens,
            pad_token_id=pad,
            use_cache=True,
            **gen_kw,
        )  # (B, T + T_new)
        stops = _stop_ids(self.model, self.tokenizer)
        answers = []
        width = inputs["input_ids"].shape[1]
        for new in out[:, width:].tolist():  # (T_new,) each
            end = next((i for i, t in enumerate(new) if t in stops), len(new))
            answers.append(new[:end])
        return answers

    def generate_ids(
        self,
        prompts: Sequence[Sequence[Mapping[str, str]]],
        do_sample: bool = False,
        temperature: float = 0.7,
        seed: int = 0,
        show_progress: bool = False,
    ) -> list[list[int]]:
        """The generated token ids of each prompt (without the stop token), in input order.

        Args:
            prompts: Chat messages per prompt (see `grounded_messages`).
            do_sample: Sample instead of greedy decoding.
            temperature: Sampling temperature (only with `do_sample`).
            seed: Seeds torch's global generator before sampling (only with `do_sample`).
            show_progress: Show a tqdm bar over prompts.

        Returns:
            One list of at most `max_new_tokens` ids per prompt.
        """
        import torch
        from tqdm.auto import tqdm

        ids = self.encode_prompts(prompts)
        gen_kw: dict[str, Any] = {"do_sample": do_sample}
        if do_sample:
            gen_kw["temperature"] = temperature
            torch.manual_seed(seed)
        # Longest first: batches of similar lengths need little padding, and the first batch
        # shows at once whether the longest prompts fit in memory.
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        results: list[list[int]] = [[] for _ in ids]
        bar = tqdm(total=len(ids), desc="answers", unit="prompt", disable=not show_progress)
        with bar, torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                chunk = order[start : start + self.batch_size]
                answers = self._batch_ids([ids[i] for i in chunk], **gen_kw)
                for i, new in zip(chunk, answers, strict=True):
                    results[i] = new
                bar.update(len(chunk))
        return results

    def generate(
        self,
        prompts: Sequence[Sequence[Mapping[str, str]]],
        do_sample: bool = False,
        temperature: float = 0.7,
        seed: int = 0,
        show_progress: bool = False,
    ) -> list[str]:
        """The answer to each chat prompt, in input order (see `generate_ids` for the arguments).

        Returns:
            One stripped answer per prompt, without special tokens.
        """
        ids = self.generate_ids(prompts, do_sample, temperature, seed, show_progress)
        return [self.tokenizer.decode(x, skip_special_tokens=True).strip() for x in ids]

    def answer(
        self,
        turns: Sequence[TurnLike] | Session,
        passages: Sequence[PassageLike],
        max_passage_chars: int = DEFAULT_PASSAGE_CHARS,
        closed_book: bool = False,
        **kw: Any,
    ) -> str:
        """The grounded answer to one conversation (see `grounded_messages` and `generate`)."""
        return self.answer_batch([(turns, passages)], max_passage_chars, closed_book, **kw)[0]

    def answer_batch(
        self,
        items: Sequence[tuple[Sequence[TurnLike] | Session, Sequence[PassageLike]]],
        max_passage_chars: int = DEFAULT_PASSAGE_CHARS,
        closed_book: bool = False,
        **kw: Any,
    ) -> list[str]:
        """Grounded answers to many conversations, in input order.

        Args:
            items: (turns, passages) per conversation.
            max_passage_chars: See `grounded_messages`.
            closed_book: See `grounded_messages`.
            **kw: Passed to `generate` (do_sample, temperature, seed, show_progress).

        Returns:
            One answer per item.
        """
        prompts = [
            grounded_messages(turns, passages, max_passage_chars, closed_book)
            for turns, passages in items
        ]
        self.max_passage_chars = max_passage_chars
        return self.generate(prompts, **kw)
