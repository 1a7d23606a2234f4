"""The robustness LLM: seeded, batched, cached generations, with malformed replies retried.

Generations are cached with `rewrite.RewriteCache` (append-only JSONL, one flushed line per
generation) under a key of the chat messages, the model name and the seed, so a rerun makes no
LLM call. A plain `rewrite.Generator` (messages -> reply) is accepted too: it is called once per
prompt and its seed is only part of the key.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from chatretriever.retrieval.rewrite import DEFAULT_MODEL, Generator, RewriteCache

logger = logging.getLogger(__name__)

Messages = list[dict[str, str]]
T = TypeVar("T")


class BatchGenerator(Protocol):
    """Generates one reply per (messages, seed); a batch is one forward pass where it can be.
    `max_new_tokens`, when given, caps this call's replies (a judgment needs few tokens)."""

    def __call__(
        self, prompts: Sequence[Messages], seeds: Sequence[int], max_new_tokens: int | None = None
    ) -> list[str]: ...


# Token caps per prompt kind: a verdict is a word, a rewrite one question (as in rewrite.py).
KIND_MAX_NEW_TOKENS = {"judge": 16, "rewrite": 64}


def batched(generate: Generator) -> BatchGenerator:
    """A `rewrite.Generator` (messages -> reply) as a BatchGenerator (one call per prompt)."""

    def run(
        prompts: Sequence[Messages], seeds: Sequence[int], max_new_tokens: int | None = None
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
    retries: dict[str, int] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)
    reasons: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        return {
            "generated": self.generated,
            "cached": self.cached,
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
        settings = dict(self.settings)
        if cap is not None:  # the key records the limit the generator really applies
            settings["max_new_tokens"] = min(cap, settings.get("max_new_tokens", cap))
        keys = [
            generation_key(m, self.model, s, settings) for m, s in zip(prompts, seeds, strict=True)
        ]
        out = [self.cache.get(k) for k in keys]
        todo = [i for i, t in enumerate(out) if t is None]
        self.stats.cached += len(prompts) - len(todo)
        for start in range(0, len(todo), self.batch_size):
            part = todo[start : start + self.batch_size]
            texts = self.generate_batch([prompts[i] for i in part], [seeds[i] for i in part], cap)
            for i, text in zip(part, texts, strict=True):
                self.cache.put(keys[i], {"model": self.model, "seed": seeds[i], "rewrite": text})
                out[i] = text
            self.stats.generated += len(part)
        return [str(t) for t in out]

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

    def plain(self, seed: int = 0) -> Generator:
        """This LLM (cached) as a `rewrite.Generator`: messages -> reply."""

        def run(messages: Messages) -> str:
            return self.generate([messages], [seed], "rewrite")[0]

        return run

    def close(self) -> None:
        self.cache.close()


def hf_batch_generator(
    model_name: str = DEFAULT_MODEL,
    max_new_tokens: int = 192,
    temperature: float = 0.7,
    device: str | None = None,
) -> BatchGenerator:
    """A sampling chat generator over a causal LM (`load_backbone(kind="causal")`), batched with
    left padding; each seed group is generated after `torch.manual_seed(seed)`.

    Args:
        model_name: A built-in chat model name, a local model directory or a `.gguf` file.
        max_new_tokens: The most tokens of one reply.
        temperature: Sampling temperature (0: greedy; seeds then change nothing).
        device: Where to run; default the current accelerator, else CPU.

    Returns:
        (prompts, seeds) -> replies.
    """
    import torch

    from chatretriever.modeling.backbones import default_device, load_backbone

    model, tokenizer = load_backbone(model_name, kind="causal")
    model.to(default_device() if device is None else device).eval()
    tokenizer.padding_side = "left"  # generation continues from the right end of every row
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token

    def run(prompts: Sequence[Messages], seeds: Sequence[int], cap: int | None = None) -> list[str]:
        out: list[str] = [""] * len(prompts)
        for seed in sorted(set(seeds)):
            rows = [i for i, s in enumerate(seeds) if s == seed]
            texts = [
                tokenizer.apply_chat_template(
                    prompts[i], add_generation_prompt=True, tokenize=False
                )
                for i in rows
            ]
            enc = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
            enc = enc.to(model.device)
            torch.manual_seed(seed)
            with torch.no_grad():
                gen = model.generate(
                    **enc,
                    max_new_tokens=max_new_tokens if cap is None else min(cap, max_new_tokens),
                    do_sample=temperature > 0,
                    temperature=temperature if temperature > 0 else None,
                    top_p=None,
                    top_k=None,
                    pad_token_id=tokenizer.pad_token_id,
                )  # (B, T + T_new)
            new = gen[:, enc["input_ids"].shape[1] :]  # (B, T_new)
            for i, row in zip(rows, new.tolist(), strict=True):
                out[i] = tokenizer.decode(row, skip_special_tokens=True).strip()
        return out

    return run
