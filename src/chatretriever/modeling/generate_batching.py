"""Batched generation without computing padding: every prompt is read alone, then decoded together.

A left-padded batch of prompts of unequal lengths makes the model read every pad column (on
MTRAG robustness prompts, 138 to 1,123 SmolLM2 tokens, 40-46% of a batch of 16 is padding,
and the attention of the padded prefill is quadratic in the longest row). Here each prompt is
read alone (its own causal forward, no padding) and the rows' key/value states are written,
left-padded with zeros that the attention mask hides, into one cache of the whole batch; the
batch then decodes together as before. For `generate` the cache is a static one
(`transformers.StaticCache`, sized for the prompt and its new tokens): the default dynamic
cache concatenates every layer's keys and values at every step, a copy of the whole cache per
new token (a third of a bf16 decoding step on CPU, most of a float32 one).

A row's tokens, positions and visible keys are those of the padded batch, so replies are those
of the padded path up to floating-point rounding (identical token for token in float32 on real
MTRAG prompts). Where the model's cache has sliding-window layers (Gemma 3), its generation
config names a cache of its own, or its cache holds no plain keys and values, the helpers return
None and callers keep the padded path. So they do off the CPU: an accelerator reads a padded
batch in one parallel forward, where one forward per prompt would serialise the batch (the
gain was measured on a 2-core CPU only).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def unpadded_rows(enc: Mapping[str, torch.Tensor]) -> list[list[int]]:
    """Each row's real token ids from tokenizer tensors padded on either side.

    Args:
        enc: {"input_ids", "attention_mask"}, (B, T) each.

    Returns:
        One id list per row, the masked (pad) columns left out.
    """
    ids, mask = enc["input_ids"], enc["attention_mask"]
    return [row[keep.bool()].tolist() for row, keep in zip(ids, mask, strict=True)]


def _batch_cache(model: Any, static_len: int | None) -> Any | None:
    """An empty cache for the model's layers (static of `static_len` positions, else dynamic),
    or None off the CPU, where a layer is a sliding window one or the generation config names
    its own."""
    from transformers import DynamicCache, StaticCache

    if model.device.type != "cpu":
        return None  # see the module docstring: measured faster on a CPU only
    if getattr(model.generation_config, "cache_implementation", None) is not None:
        return None  # generate refuses a cache object beside a cache_implementation
    config = model.config.get_text_config(decoder=True)
    if static_len is None:
        cache = DynamicCache(config=config)
    else:
        cache = StaticCache(config=config, max_cache_len=static_len)
    # A window layer keeps only its last positions: rows' windows end at different columns.
    if not cache.layers or any(layer.is_sliding for layer in cache.layers):
        return None
    return cache


def _read_rows(model: Any, rows: Sequence[Sequence[int]]) -> tuple[list[Any], torch.Tensor]:
    """One causal forward per row (no padding); returns each row's key/value cache and the
    logits at its last token, (B, V) float32."""
    import torch

    caches, last = [], []
    for row in rows:
        x = torch.tensor([list(row)], dtype=torch.long, device=model.device)  # (1, T_i)
        out = model(input_ids=x, use_cache=True, logits_to_keep=1)
        caches.append(out.cache)  # transformers 5 names the key/value cache "cache"
        last.append(out.logits[:, -1].float())  # (1, V)
    return caches, torch.cat(last)


def _fill(cache: Any, row_caches: Sequence[Any | None], lengths: Sequence[int]) -> bool:
    """Write the rows' keys and values, left-padded with zeros to the longest, into `cache`
    (one `update` per layer). A row of length 0 is all padding. Returns False where a row's
    cache does not hold a key/value tensor for every layer (nothing is then written)."""
    import torch

    width = max(lengths)
    layers = [getattr(c, "layers", None) for c in row_caches if c is not None]
    if not layers or any(ls is None or len(ls) != len(cache.layers) for ls in layers):
        return False
    if any(getattr(layer, "keys", None) is None for ls in layers for layer in ls):
        return False
    ref = layers[0]
    for i in range(len(cache.layers)):
        keys, values = [], []
        for c, n in zip(row_caches, lengths, strict=True):
            for part, out in ((0, keys), (1, values)):
                like = ref[i].keys if part == 0 else ref[i].values  # (1, H, T_0, D)
                pad = like.new_zeros(1, like.shape[1], width - n, like.shape[3])
                if c is None:
                    out.append(pad)
                    continue
                real = c.layers[i].keys if part == 0 else c.layers[i].values  # (1, H, n, D)
                out.append(torch.cat([pad, real], dim=2))  # (1, H, width, D)
        cache.update(torch.cat(keys), torch.cat(values), i)  # (B, H, width, D) each
    return True


def left_padded(rows: Sequence[Sequence[int]], pad_id: int, device: Any) -> dict[str, torch.Tensor]:
    """Rows left-padded to the longest, so every row ends at the column where generation starts.

    Args:
        rows: Token ids of each row.
        pad_id: The id of the padding columns (hidden by the mask).
        device: Where the tensors go.

    Returns:
        {"input_ids", "attention_mask"}, (B, T) each.
    """
    import torch

    width = max(len(r) for r in rows)
    ids = [[pad_id] * (width - len(r)) + list(r) for r in rows]
    mask = [[0] * (width - len(r)) + [1] * len(r) for r in rows]
    return {
        "input_ids": torch.tensor(ids, dtype=torch.long, device=device),
        "attention_mask": torch.tensor(mask, dtype=torch.long, device=device),
    }


def prefilled_generate_inputs(
    model: Any, rows: Sequence[Sequence[int]], pad_id: int, max_new_tokens: int
) -> dict[str, Any] | None:
    """`model.generate` inputs for a batch of prompts whose static cache already holds every
    prompt but its last token, each read alone: `generate` then feeds the batch's last column
    (one step for all rows) and decodes with the cache (no concatenation per step).

    Args:
        model: A causal LM (transformers 5).
        rows: Token ids of each prompt (at least one id each), already fitted to the context.
        pad_id: The id that fills the left padding of `input_ids`.
        max_new_tokens: The most tokens `generate` will add (the cache's room past the prompt).

    Returns:
        {"input_ids" (B, T) left-padded, "attention_mask" (B, T), "cache"}: pass them to
        `generate` in place of the padded tensors; None where the padded path must be kept
        (a sliding-window model, a cache implementation in the generation config, or no
        prompt longer than one token).
    """
    import torch

    if not rows or any(len(r) < 1 for r in rows) or max(len(r) for r in rows) < 2:
        return None
    width = max(len(r) for r in rows)
    cache = _batch_cache(model, width + max_new_tokens)
    if cache is None:
        return None
    heads = [list(r[:-1]) for r in rows]  # the last token is generate's first step
    with torch.no_grad():
        read = [i for i, h in enumerate(heads) if h]
        caches, _ = _read_rows(model, [heads[i] for i in read])
        per_row: list[Any | None] = [None] * len(rows)
        for i, c in zip(read, caches, strict=True):
            per_row[i] = c
        if not _fill(cache, per_row, [len(h) for h in heads]):
            return None
    return {**left_padded(rows, pad_id, model.device), "cache": cache}


def prefilled_prompts(
    model: Any, rows: Sequence[Sequence[int]], pad_id: int
) -> tuple[torch.Tensor, dict[str, Any]] | None:
    """Each prompt read alone, the next-token logits at its end and one dynamic cache of the
    whole batch (left-padded), for a caller that then feeds more tokens to every row.

    Args:
        model: A causal LM (transformers 5).
        rows: Token ids of each prompt (at least one id each).
        pad_id: The id that fills the left padding of `input_ids`.

    Returns:
        (logits (B, V) float32 at each prompt's last token, {"input_ids" (B, T) left-padded,
        "attention_mask" (B, T), "cache" holding all T columns}), or None where the padded
        path must be kept (see `prefilled_generate_inputs`).
    """
    import torch

    if not rows or any(len(r) < 1 for r in rows):
        return None
    cache = _batch_cache(model, None)
    if cache is None:
        return None
    with torch.no_grad():
        caches, logits = _read_rows(model, rows)
        if not _fill(cache, caches, [len(r) for r in rows]):
            return None
    return logits, {**left_padded(rows, pad_id, model.device), "cache": cache}
