"""The Hugging Face chat model behind the robustness LLM: batched generation and option scoring.

`hf_batch_generator` loads a causal LM (`load_backbone(kind="causal")`) and generates a batch of
chat prompts in one left-padded `generate`, each prompt read alone first (no pad column computed:
`modeling.generate_batching`); sampled rows draw from their own random streams
(`sampling.RowSampler`), so a reply does not depend on its batch. `score` reads the
log-likelihood of fixed options (the judge's verdicts) without sampling. `LazyHFGenerator`
loads the model on its first call, so a rerun served from the cache loads nothing. A prompt that
does not fit the model's context beside its new tokens keeps its end (`keep_prompt_end`).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from chatretriever.modeling.backbones import keep_prompt_end
from chatretriever.modeling.generate_batching import (
    prefilled_generate_inputs,
    prefilled_prompts,
    unpadded_rows,
)
from chatretriever.retrieval.rewrite import DEFAULT_MODEL
from chatretriever.retrieval.robustness.sampling import SAMPLER, RowSampler, item_seed

if TYPE_CHECKING:  # generation.py re-exports this module's names: no import cycle at run time
    from chatretriever.retrieval.robustness.generation import Messages


def hf_batch_generator(
    model_name: str = DEFAULT_MODEL,
    max_new_tokens: int = 192,
    temperature: float = 0.7,
    device: str | None = None,
    dtype: str | None = None,
) -> HFChatGenerator:
    """A sampling chat generator over a causal LM (`load_backbone(kind="causal")`), batched with
    left padding; each sampled row draws from its own stream, seeded from its seed and its
    prompt (`sampling.item_seed`), so its reply does not depend on the other rows.

    Args:
        model_name: A built-in chat model name, a local model directory or a `.gguf` file.
        max_new_tokens: The most tokens of one reply.
        temperature: Sampling temperature (0: greedy; seeds then change nothing).
        device: Where to run; default the current accelerator, else CPU.
        dtype: Weights' dtype (`load_backbone`: None is float32; "bf16" halves the time of a
            generation on a CPU with AVX512-BF16/AMX; the name belongs in the cache settings).

    Returns:
        (prompts, seeds[, max_new_tokens, stop]) -> replies; it also scores options and
        continues a last assistant message (see `BatchGenerator`).
    """
    return HFChatGenerator(model_name, max_new_tokens, temperature, device, dtype)


class HFChatGenerator:
    """See `hf_batch_generator`."""

    continues_reply = True
    sampler = SAMPLER  # sampled replies are keyed by it (see `RobustnessLLM.generate`)

    def __init__(
        self,
        model_name: str,
        max_new_tokens: int,
        temperature: float,
        device: str | None,
        dtype: str | None,
    ) -> None:
        from chatretriever.modeling.backbones import default_device, load_backbone

        model, tokenizer = load_backbone(model_name, kind="causal", dtype=dtype)
        self.model = model.to(default_device() if device is None else device).eval()
        tokenizer.padding_side = "left"  # generation continues from the right end of every row
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature

    def _text(self, messages: Messages) -> str:
        """The chat template; a last assistant message is left open to be continued."""
        if messages and messages[-1]["role"] == "assistant":
            return self.tokenizer.apply_chat_template(
                messages, continue_final_message=True, tokenize=False
            )
        return self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )

    def __call__(
        self,
        prompts: Sequence[Messages],
        seeds: Sequence[int],
        cap: int | None = None,
        stop: str | None = None,
    ) -> list[str]:
        """One reply per (prompt, seed), all prompts in one left-padded `generate`.

        Args:
            prompts: Chat messages (a last assistant message is continued); one too long for
                the model's context beside the new tokens keeps its end.
            seeds: One seed per prompt (greedy decoding ignores them).
            cap: At most this many new tokens (never more than `max_new_tokens`).
            stop: Ends a reply at its first occurrence (cut from the reply).

        Returns:
            One stripped reply per prompt, in order.
        """
        import torch
        from transformers import LogitsProcessorList

        tokenizer, model = self.tokenizer, self.model
        limit = self.max_new_tokens if cap is None else min(cap, self.max_new_tokens)
        extra: dict[str, Any] = {"stop_strings": [stop], "tokenizer": tokenizer} if stop else {}
        if self.temperature > 0:  # drawn by RowSampler; generate then takes its one token
            rows = [item_seed(m, s) for m, s in zip(prompts, seeds, strict=True)]
            sampler = RowSampler(rows, self.temperature, model.device)
            extra["logits_processor"] = LogitsProcessorList([sampler])
        texts = [self._text(m) for m in prompts]
        enc = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
        enc = keep_prompt_end(enc.to(model.device), model, limit)  # left-padded: rows' ends kept
        # Each prompt read alone into a static cache (no pad column computed, no cache copy per
        # step); the padded batch where the model's cache does not allow it.
        rows = unpadded_rows(enc)
        inputs = prefilled_generate_inputs(model, rows, tokenizer.pad_token_id, limit) or enc
        with torch.no_grad():
            gen = model.generate(
                **inputs,
                max_new_tokens=limit,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                pad_token_id=tokenizer.pad_token_id,
                **extra,
            )  # (B, T + T_new)
        new = gen[:, inputs["input_ids"].shape[1] :]  # (B, T_new)
        out = [tokenizer.decode(row, skip_special_tokens=True) for row in new.tolist()]
        return [(text.split(stop)[0] if stop else text).strip() for text in out]

    def score(self, prompts: Sequence[Messages], options: Sequence[str]) -> list[list[float]]:
        """Summed log-likelihood of each option as the assistant's reply to each prompt. The
        prompts are read once (left-padded, one forward, its key/value cache kept); each
        option's later tokens are then read on a copy of that cache, so a long prompt costs
        one prefill whatever the number of options."""
        import torch

        tokenizer, model = self.tokenizer, self.model
        heads = [tokenizer(self._text(m), add_special_tokens=False)["input_ids"] for m in prompts]
        tails = [tokenizer(o, add_special_tokens=False)["input_ids"] for o in options]
        if any(not t for t in tails):
            raise ValueError("an option has no tokens")
        longest = max(len(t) for t in tails)
        width, dev = max(len(h) for h in heads), model.device
        pad = tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(h)) + h for h in heads], device=dev)
        mask = torch.tensor([[0] * (width - len(h)) + [1] * len(h) for h in heads], device=dev)
        # An option's last token is predicted, never fed: its position is not needed.
        fit = keep_prompt_end({"input_ids": ids, "attention_mask": mask}, model, longest - 1)
        ids, mask = fit["input_ids"], fit["attention_mask"]
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: real tokens from 0
        totals = []
        with torch.no_grad():
            first, prompt_cache = self._read_prompts(ids, mask, positions)  # (P, V), its cache
            for o, tail in enumerate(tails):
                total = first[:, tail[0]]  # (P,)
                if len(tail) > 1:  # feed tokens 0 .. L-2, each predicting the next
                    n = len(tail) - 1
                    last = o == len(tails) - 1
                    cache = prompt_cache if last else copy.deepcopy(prompt_cache)
                    feed = torch.tensor([tail[:-1]] * len(heads), device=dev)  # (P, n)
                    step = torch.arange(1, n + 1, device=dev)
                    more = model(
                        input_ids=feed,
                        attention_mask=torch.cat([mask, torch.ones_like(feed)], dim=1),
                        position_ids=positions[:, -1:] + step,
                        cache=cache,
                        use_cache=True,
                    )
                    logp = torch.log_softmax(more.logits.float(), dim=-1)  # (P, n, V)
                    target = torch.tensor(tail[1:], device=dev).expand(len(heads), n)
                    total = total + logp.gather(-1, target.unsqueeze(-1)).squeeze(-1).sum(-1)
                totals.append(total.tolist())
        return [[totals[o][p] for o in range(len(tails))] for p in range(len(heads))]

    def _read_prompts(self, ids: Any, mask: Any, positions: Any) -> tuple[Any, Any]:
        """The log-probabilities of each prompt's next token, (P, V) float32, and the batch's
        key/value cache: each prompt read alone (`prefilled_prompts`), else the padded batch in
        one forward (the model's cache does not allow the former)."""
        import torch

        model = self.model
        rows = unpadded_rows({"input_ids": ids, "attention_mask": mask})
        read = prefilled_prompts(model, rows, self.tokenizer.pad_token_id)
        if read is not None:
            logits, batch = read
            return torch.log_softmax(logits, dim=-1), batch["cache"]
        out = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
        )
        # transformers 5 names the key/value cache "cache"
        return torch.log_softmax(out.logits[:, -1].float(), dim=-1), out.cache


class LazyHFGenerator:
    """`hf_batch_generator(*settings)` loaded on its first call (an all-cached rerun loads no
    model), with the seconds spent in it (`seconds`, loading included). It scores and continues
    replies as the HF generator does, known before loading (the cache keys depend on it)."""

    continues_reply = True
    sampler = SAMPLER

    def __init__(self, *settings: Any) -> None:
        self._settings = settings
        self._model: HFChatGenerator | None = None
        self.seconds = 0.0

    def _timed(self, method: str, *args: Any) -> Any:
        start = time.perf_counter()
        try:
            if self._model is None:
                self._model = hf_batch_generator(*self._settings)
            return getattr(self._model, method)(*args)
        finally:
            self.seconds += time.perf_counter() - start

    def __call__(self, *args: Any) -> list[str]:
        return self._timed("__call__", *args)  # type: ignore[no-any-return]

    def score(self, *args: Any) -> list[list[float]]:
        return self._timed("score", *args)  # type: ignore[no-any-return]
