"""The robustness LLM: seeded, batched, cached generations, with malformed replies retried.

Generations are cached with `rewrite.RewriteCache` (append-only JSONL, one flushed line per
generation) under a key of the chat messages, the model name, the seed and the generation
settings, so a rerun makes no LLM call. A plain `rewrite.Generator` (messages -> reply) is
accepted too: it is called once per prompt and its seed is only part of the key. The Hugging Face
model itself lives in `hf_generator.py` (its names are re-exported here, where callers import
them).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from tqdm.auto import tqdm

from chatretriever.retrieval.rewrite import DEFAULT_MODEL, Generator, RewriteCache
from chatretriever.retrieval.robustness.hf_generator import (
    HFChatGenerator,
    LazyHFGenerator,
    hf_batch_generator,
)
from chatretriever.types import Session

__all__ = [
    "KIND_MAX_NEW_TOKENS",
    "KIND_STOP",
    "BatchGenerator",
    "GenerationStats",
    "HFChatGenerator",
    "LazyHFGenerator",
    "Messages",
    "RobustnessLLM",
    "batched",
    "generation_key",
    "generation_settings",
    "hf_batch_generator",
]

logger = logging.getLogger(__name__)

Messages = list[dict[str, str]]
T = TypeVar("T")


class BatchGenerator(Protocol):
    """Generates one reply per (messages, seed); a batch is one forward pass where it can be.
    `max_new_tokens`, when given, caps this call's replies (a judgment needs few tokens); `stop`,
    when given, ends a reply at its first occurrence (a generator that cannot stop there may run
    on: `RobustnessLLM` cuts the reply). A generator may also offer
    `score(prompts, options) -> [[log-likelihood per option]]` (choices without sampling),
    `continues_reply = True` (a last assistant message is continued, not answered) and
    `sampler` (the name of a sampling procedure whose reply depends only on the prompt, the
    seed and the settings; part of the key of sampled replies)."""

    def __call__(
        self,
        prompts: Sequence[Messages],
        seeds: Sequence[int],
        max_new_tokens: int | None = None,
        stop: str | None = None,
    ) -> list[str]: ...


# Token caps per prompt kind: a verdict is a word, a rewrite one question (as in rewrite.py), a
# response about what a later context shows of it (`RobustnessPrompts.max_turn_chars`, 400
# characters, ~100 tokens: more is never read), a slot of a context one line.
KIND_MAX_NEW_TOKENS = {"judge": 16, "rewrite": 64, "response": 96, "context_slot": 64}
# Stop strings per prompt kind: a context slot is one line.
KIND_STOP = {"context_slot": "\n"}


def batched(generate: Generator) -> BatchGenerator:
    """A `rewrite.Generator` (messages -> reply) as a BatchGenerator (one call per prompt)."""

    def run(
        prompts: Sequence[Messages],
        seeds: Sequence[int],
        max_new_tokens: int | None = None,
        stop: str | None = None,
    ) -> list[str]:
        return [generate(list(m)) for m in prompts]

    return run


def generation_key(
    messages: Messages, model: str, seed: int, settings: Mapping[str, Any] | None = None
) -> str:
    """The cache key of one generation: its prompt, the model, the seed and the generation
    settings (max new tokens, temperature) where given."""
    raw = json.dumps([messages, model, seed, settings or {}], ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(raw.encode("utf-8")).hexdigest()


@dataclass
class GenerationStats:
    """What the LLM did: fresh generations, cache hits, retries and failures per prompt kind."""

    generated: int = 0
    cached: int = 0
    scored: int = 0
    choices: dict[str, dict[str, int]] = field(default_factory=dict)
    retries: dict[str, int] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)
    reasons: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        return {
            "generated": self.generated,
            "cached": self.cached,
            "scored": self.scored,
            "choices": {k: dict(v) for k, v in self.choices.items()},
            "retries": dict(self.retries),
            "failures": dict(self.failures),
            "malformed_reasons": dict(self.reasons),
        }


class RobustnessLLM:
    """A chat LLM behind a generation cache, with bounded retries on malformed replies.

    Args:
        generate: The model (`hf_batch_generator`, or `batched(any rewrite.Generator)`).
        model: Its name (recorded, and part of every cache key).
        cache_path: The JSONL cache (None: in memory only).
        batch_size: Prompts per generator call.
        max_retries: Extra tries, each with another seed, for a malformed reply.
        settings: Generation settings that change replies (part of every cache key).
        kind_max_new_tokens: Token caps per prompt kind (default KIND_MAX_NEW_TOKENS); other
            kinds get the generator's own limit.
    """

    def __init__(
        self,
        generate: BatchGenerator,
        model: str = DEFAULT_MODEL,
        cache_path: str | Path | None = None,
        batch_size: int = 8,
        max_retries: int = 2,
        settings: Mapping[str, Any] | None = None,
        kind_max_new_tokens: Mapping[str, int] | None = None,
    ) -> None:
        if batch_size < 1 or max_retries < 0:
            raise ValueError("batch_size must be >= 1 and max_retries >= 0")
        self.generate_batch = generate
        self.model = model
        self.cache = RewriteCache(cache_path)
        self.batch_size = batch_size
        self.max_retries = max_retries
        self.settings = dict(settings or {})
        caps = KIND_MAX_NEW_TOKENS if kind_max_new_tokens is None else kind_max_new_tokens
        self.kind_max_new_tokens = dict(caps)
        self.stats = GenerationStats()

    def generate(
        self, prompts: Sequence[Messages], seeds: Sequence[int], kind: str | None = None
    ) -> list[str]:
        """One reply per (prompt, seed): cached ones read, the rest generated in batches.

        Args:
            prompts: Chat messages.
            seeds: One seed per prompt.
            kind: The prompt kind; its token cap (`kind_max_new_tokens`) applies.

        Returns:
            One reply per prompt, in order.
        """
        cap = self.kind_max_new_tokens.get(kind) if kind else None
        stop = KIND_STOP.get(kind) if kind else None
        settings = dict(self.settings)
        if cap is not None:  # the key records the limit the generator really applies
            settings["max_new_tokens"] = min(cap, settings.get("max_new_tokens", cap))
        if stop is not None:
            settings["stop"] = stop
        sampler = getattr(self.generate_batch, "sampler", None)
        if sampler is not None and settings.get("temperature") != 0:
            # Replies sampled before this procedure depended on their batch: never read them
            # back as its replies. Greedy replies (temperature 0) did not, and keep their keys.
            settings["sampler"] = sampler
        keys = [
            generation_key(m, self.model, s, settings) for m, s in zip(prompts, seeds, strict=True)
        ]
        out = [self.cache.get(k) for k in keys]
        todo = [i for i, t in enumerate(out) if t is None]
        self.stats.cached += len(prompts) - len(todo)
        for start in self._progress(len(todo), kind or "generate"):
            part = todo[start : start + self.batch_size]
            batch = [prompts[i] for i in part], [seeds[i] for i in part], cap
            texts = self.generate_batch(*batch, stop) if stop else self.generate_batch(*batch)
            for i, text in zip(part, texts, strict=True):
                if stop is not None:
                    text = text.split(stop)[0]
                self.cache.put(keys[i], {"model": self.model, "seed": seeds[i], "rewrite": text})
                out[i] = text
            self.stats.generated += len(part)
        return [str(t) for t in out]

    def _progress(self, n: int, kind: str) -> Iterable[int]:
        """Batch starts over n prompts, with a progress bar when there is more than one batch."""
        starts = range(0, n, self.batch_size)
        return tqdm(starts, desc=f"LLM {kind}", unit="batch", disable=len(starts) < 2, leave=False)

    @property
    def can_choose(self) -> bool:
        """Whether the generator scores options (`choose` then needs no sampling)."""
        return callable(getattr(self.generate_batch, "score", None))

    @property
    def continues_reply(self) -> bool:
        """Whether the generator continues a last assistant message (slot-wise contexts)."""
        return bool(getattr(self.generate_batch, "continues_reply", False))

    def choose(self, kind: str, prompts: Sequence[Messages], options: Sequence[str]) -> list[int]:
        """The option each prompt's reply most likely starts with (highest summed token
        log-likelihood as the assistant's reply: lm-evaluation-harness's "acc"); cached.

        Args:
            kind: The prompt kind (counted per chosen option in `stats.choices`).
            prompts: Chat messages.
            options: The replies to choose from (at least two).

        Returns:
            The index of the chosen option per prompt.
        """
        if len(options) < 2 or not self.can_choose:
            raise ValueError("choose needs two options and a generator with score()")
        settings = {**self.settings, "choose": list(options)}  # the dtype changes scores too
        keys = [generation_key(m, self.model, 0, settings) for m in prompts]
        cached = [self.cache.get(k) for k in keys]
        out = [options.index(c) if c in options else None for c in cached]
        todo = [i for i, c in enumerate(out) if c is None]
        self.stats.cached += len(prompts) - len(todo)
        score = self.generate_batch.score  # type: ignore[attr-defined]
        for start in self._progress(len(todo), kind):
            part = todo[start : start + self.batch_size]
            rows = score([prompts[i] for i in part], list(options))
            for i, row in zip(part, rows, strict=True):
                best = max(range(len(options)), key=lambda o: row[o])
                self.cache.put(keys[i], {"model": self.model, "seed": 0, "rewrite": options[best]})
                out[i] = best
            self.stats.scored += len(part)
        counts = self.stats.choices.setdefault(kind, {})
        for c in out:
            counts[options[c]] = counts.get(options[c], 0) + 1
        return [int(c) for c in out]  # type: ignore[arg-type]

    def generate_valid(
        self,
        kind: str,
        prompts: Sequence[Messages],
        seeds: Sequence[int],
        parse: Callable[[str], tuple[T | None, str | None]],
    ) -> list[T | None]:
        """Generate, parse, and regenerate malformed replies with other seeds (bounded).

        Args:
            kind: The prompt kind ("response", "judge", "context"), for the counts.
            prompts: Chat messages, one per item.
            seeds: The first seed of each item; retry r uses seed + 1000 * r.
            parse: reply -> (value, None) when usable, else (None, reason).

        Returns:
            The parsed value per item; None where every try was malformed (counted as failure).
        """
        values: list[T | None] = [None] * len(prompts)
        todo = list(range(len(prompts)))
        for attempt in range(self.max_retries + 1):
            if not todo:
                break
            if attempt:
                self.stats.retries[kind] = self.stats.retries.get(kind, 0) + len(todo)
            texts = self.generate(
                [prompts[i] for i in todo], [seeds[i] + 1000 * attempt for i in todo], kind
            )
            left = []
            for i, text in zip(todo, texts, strict=True):
                value, reason = parse(text)
                if reason is None:
                    values[i] = value
                else:
                    self.stats.reasons[reason] = self.stats.reasons.get(reason, 0) + 1
                    left.append(i)
            todo = left
        if todo:
            self.stats.failures[kind] = self.stats.failures.get(kind, 0) + len(todo)
            logger.warning("%d %s prompts stayed malformed after retries", len(todo), kind)
        return values

    def rewrite_sessions(self, sessions: Sequence[Session]) -> list[Session]:
        """`rewrite.rewrite_sessions` through this LLM (seed 0), its prompts generated in
        batches first (the rewriter asks one prompt at a time; then it reads the cache)."""
        from chatretriever.retrieval.rewrite import RewritePrompt, build_messages, rewrite_sessions

        prompt = RewritePrompt()
        need = [
            build_messages(s, prompt)
            for s in sessions
            if any(t.role != "system" for t in s.history)
        ]
        self.generate(need, [0] * len(need), "rewrite")
        return rewrite_sessions(
            sessions, self.plain(), self.model, prompt=prompt, show_progress=False
        )

    def plain(self, seed: int = 0) -> Generator:
        """This LLM (cached) as a `rewrite.Generator`: messages -> reply."""

        def run(messages: Messages) -> str:
            return self.generate([messages], [seed], "rewrite")[0]

        return run

    def close(self) -> None:
        self.cache.close()


def generation_settings(max_new_tokens: int, temperature: float, dtype: str) -> dict[str, Any]:
    """The settings that change a reply (part of every cache key); float32, the default, is
    left out so that caches written before dtypes were recorded stay valid."""
    settings: dict[str, Any] = {"max_new_tokens": max_new_tokens, "temperature": temperature}
    if dtype != "float32":
        settings["dtype"] = dtype
    return settings
