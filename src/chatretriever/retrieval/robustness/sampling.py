"""Batch-independent sampling: every generated item draws from its own random stream.

A sampled reply must depend only on its prompt, the model, the seed and the generation settings,
never on the other prompts of its batch or on the batch size; with one global stream per batch
(`torch.manual_seed` before `generate`), another `--gen-batch-size`, a subset of conversations or
a run resumed from a partly filled cache got other replies. Here each row's tokens are drawn from
a `torch.Generator` seeded from the seed and the row's own prompt, one draw per step, and the
model's `generate` then decodes greedily over scores that leave only the drawn token.
Torch is imported inside the functions (nothing heavy at import).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

# Names this sampling procedure in the cache key of every sampled reply, so that replies sampled
# before it (batch-dependent) are never read back as if this procedure had drawn them.
SAMPLER = "per-item-v1"


def item_seed(messages: Sequence[Mapping[str, str]], seed: int) -> int:
    """The seed of one item's random stream: a stable hash of its prompt and its seed.

    Args:
        messages: The item's chat messages.
        seed: The seed asked for (the same seed is shared by many items of a run).

    Returns:
        A non-negative 63-bit integer, the same in every process and on every machine.
    """
    raw = json.dumps([list(messages), seed], ensure_ascii=False, sort_keys=True)
    return int.from_bytes(hashlib.sha256(raw.encode("utf-8")).digest()[:8], "big") >> 1


class RowSampler:
    """A logits processor that samples each row's next token from that row's own generator.

    It returns scores that are -inf everywhere but at the drawn token, so `generate` run
    greedily (`do_sample=False`) emits exactly the draw. Every row draws once per step while the
    batch runs (also after it has ended: those draws are never read), so the k-th token of a row
    is the k-th draw of its stream whatever its neighbours do.

    Args:
        seeds: One stream seed per row (`item_seed`).
        temperature: Sampling temperature (> 0).
        device: Where the scores live (the generators must be on the same device).
    """

    def __init__(self, seeds: Sequence[int], temperature: float, device: Any) -> None:
        import torch

        if not temperature > 0:
            raise ValueError(f"RowSampler samples: temperature must be > 0, got {temperature}")
        self.temperature = temperature
        self.generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        """Draw one token per row.

        Args:
            input_ids: The tokens so far, (B, T) (unused: the draw depends on scores only).
            scores: Next-token logits, (B, V).

        Returns:
            Scores of the same shape, 0 at each row's drawn token and -inf elsewhere.
        """
        import torch

        if scores.shape[0] != len(self.generators):
            raise ValueError(f"{scores.shape[0]} rows for {len(self.generators)} generators")
        # Row by row: a softmax or draw over the whole batch would tie a row to its neighbours.
        picks = [
            torch.multinomial(torch.softmax(row.float() / self.temperature, dim=-1), 1, generator=g)
            for row, g in zip(scores, self.generators, strict=True)
        ]  # (1,) each
        chosen = torch.cat(picks)  # (B,)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, chosen[:, None], 0.0)  # (B, V)
