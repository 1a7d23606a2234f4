"""One forward pass per batch: the two option logits at the answer position, with or without a
document's KV cache.

- `option_logits`: whole prompts (document prefix + query suffix), left-padded so the answer
  position is the last column; the LM head runs on that column only (`logits_to_keep=1`).
- `prefix_kv`: a document prefix's keys and values, computed once.
- `cached_option_logits`: query suffixes over a batch of prefix caches. One cache used by the
  whole batch is broadcast (`expand`: no copy); different ones are stacked, left-padded to the
  longest. Positions continue each row's own prefix, so with fp32 the logits equal those of
  `option_logits` on the concatenated ids (up to float summation order).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch

from chatretriever.modeling.collate import pad_batch, position_ids_from_mask

KV = tuple[tuple[torch.Tensor, torch.Tensor], ...]
"""A prefix cache: per layer (keys, values), each (1, heads, P, head_dim)."""


def _cache_kwarg(model: Any) -> str:
    """The forward's name of the KV cache argument: `cache` (transformers >= 5.2x, where
    `past_key_values` is deprecated) or `past_key_values`."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = inspect.signature(type(base).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _pick(logits: torch.Tensor, option_ids: Sequence[int]) -> torch.Tensor:
    """(B, 1, V) last-position logits -> (B, 2) option logits in fp32."""
    return logits[:, -1, list(option_ids)].float()


def option_logits(
    model: Any,
    sequences: Sequence[Sequence[int]],
    option_ids: Sequence[int],
    pad_id: int,
) -> torch.Tensor:
    """The logits of the two options at the end of each full prompt (gradients flow).

    Args:
        model: A causal LM (plain or peft-wrapped).
        sequences: B token id lists, each a whole prompt ending at the answer position.
        option_ids: The (yes, no) token ids.
        pad_id: The padding token id.

    Returns:
        (B, 2) float32 logits.
    """
    device = next(model.parameters()).device
    ids, mask = pad_batch(sequences, pad_id, padding_side="left")  # (B, L)
    out = model(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        position_ids=position_ids_from_mask(mask).to(device),
        use_cache=False,
        logits_to_keep=1,
    )
    return _pick(out.logits, option_ids)  # (B, 2)


@torch.inference_mode()
def prefix_kv(model: Any, prefix: Sequence[int]) -> KV:
    """Keys and values of every layer for one document prefix (computed once, reused).

    Returns:
        Per layer (keys, values), each (1, heads, P, head_dim).
    """
    from transformers import DynamicCache

    device = next(model.parameters()).device
    ids = torch.tensor([list(prefix)], dtype=torch.long, device=device)  # (1, P)
    cache = DynamicCache()
    model(input_ids=ids, use_cache=True, logits_to_keep=1, **{_cache_kwarg(model): cache})
    return tuple((layer.keys, layer.values) for layer in cache.layers)


def _batch_cache(caches: Sequence[KV]) -> tuple[Any, torch.Tensor]:
    """A DynamicCache over B prefix caches and its (B, Pmax) mask (left padding = 0)."""
    from transformers import DynamicCache

    lengths = [kv[0][0].shape[2] for kv in caches]
    p_max = max(lengths)
    device = caches[0][0][0].device
    if all(kv is caches[0] for kv in caches):  # one document for every row: broadcast
        b = len(caches)
        layers = [(k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1)) for k, v in caches[0]]
        return DynamicCache(layers), torch.ones(b, p_max, dtype=torch.long, device=device)
    mask = torch.zeros(len(caches), p_max, dtype=torch.long, device=device)
    layers = []
    for layer in range(len(caches[0])):
        keys, values = [], []
        for kv in caches:
            k, v = kv[layer]  # (1, H, P, D)
            pad = p_max - k.shape[2]
            keys.append(torch.nn.functional.pad(k, (0, 0, pad, 0)))
            values.append(torch.nn.functional.pad(v, (0, 0, pad, 0)))
        layers.append((torch.cat(keys), torch.cat(values)))  # (B, H, Pmax, D)
    for b, n in enumerate(lengths):
        mask[b, p_max - n :] = 1
    return DynamicCache(layers), mask


@torch.inference_mode()
def cached_option_logits(
    model: Any,
    caches: Sequence[KV],
    suffixes: Sequence[Sequence[int]],
    option_ids: Sequence[int],
    pad_id: int,
) -> torch.Tensor:
    """The option logits of B query suffixes, each read after its own document prefix cache.

    Args:
        model: The causal LM that computed the caches.
        caches: B prefix caches (`prefix_kv`); the same object may repeat.
        suffixes: B query suffixes (token id lists) ending at the answer position.
        option_ids: The (yes, no) token ids.
        pad_id: The padding token id.

    Returns:
        (B, 2) float32 logits.
    """
    if len(caches) != len(suffixes):
        raise ValueError(f"{len(caches)} caches for {len(suffixes)} suffixes")
    device = next(model.parameters()).device
    cache, prefix_mask = _batch_cache(caches)  # prefix_mask: (B, Pmax)
    ids, mask = pad_batch(suffixes, pad_id, padding_side="left")  # (B, S)
    ids, mask = ids.to(device), mask.to(device)
    starts = prefix_mask.sum(dim=1, keepdim=True)  # (B, 1): each prefix's own length
    positions = (starts + position_ids_from_mask(mask)) * mask  # (B, S)
    out = model(
        input_ids=ids,
        attention_mask=torch.cat([prefix_mask, mask], dim=1),  # (B, Pmax + S)
        position_ids=positions,
        use_cache=True,
        logits_to_keep=1,
        **{_cache_kwarg(model): cache},
    )
    return _pick(out.logits, option_ids)  # (B, 2)


def relevance_scores(logits: torch.Tensor) -> torch.Tensor:
    """log P(yes) under the two-option distribution: log-softmax over (yes, no), column 0.

    Args:
        logits: (B, 2) option logits.

    Returns:
        (B,) scores in (-inf, 0].
    """
    return torch.log_softmax(logits.float(), dim=-1)[:, 0]
