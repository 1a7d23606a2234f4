"""Context-identification (CII) scoring in one pass: K candidate responses after one context.

UniConv's L_CII ranks an example's reference response above K - 1 incorrect ones (other
examples' references) by each response's sequence log-likelihood given the context (the
conversation and its positive passage, as a chat prompt ending with the generation prompt).
K separate forwards of [context + resp_k] would encode the context K times; here one row per
example is [context, resp_1, ..., resp_K] with

- context rows: causal over the context;
- a row of response k: the whole context and the earlier tokens of response k only (the
  responses are block-diagonal, never each other);
- the position ids of every response restart at len(context);

so each response token sees exactly what it would see in [context + resp_k] alone, and its
logits equal those of that separate forward. The mask is a (B, 1, L, L) float additive mask
(`chatretriever.modeling.collate.additive_mask`), passed through the standard transformers
4D-mask path together with explicit `position_ids`.

The first token of response k is predicted from the LAST context position (shared by every
k); token t > 0 from the previous token of the same response.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from chatretriever.modeling.collate import additive_mask as additive_from_allowed

__all__ = [
    "NORMALIZATIONS",
    "CiiBatch",
    "CiiRow",
    "additive_from_allowed",
    "cii_allowed",
    "cii_batch",
    "cii_row",
    "response_logliks",
    "sequence_logliks",
]

NORMALIZATIONS = ("mean", "sum")
CHUNK_ROWS = 1024
"""Scored positions whose (rows, V) float32 log-softmax is materialised at once."""


@dataclass(frozen=True)
class CiiRow:
    """One packed example: [context, resp_1, ..., resp_K].

    Attributes:
        input_ids: The L token ids.
        position_ids: 0 .. C-1 over the context, then C, C+1, ... again for every response.
        spans: (start, end) of each response in the row (end exclusive); spans[0] is the
            reference when the row is built for `cii_loss`.
    """

    input_ids: list[int]
    position_ids: list[int]
    spans: tuple[tuple[int, int], ...]

    @property
    def context_len(self) -> int:
        """C, the context tokens at the start of the row."""
        return self.spans[0][0] if self.spans else len(self.input_ids)


def cii_row(context_ids: Sequence[int], responses: Sequence[Sequence[int]]) -> CiiRow:
    """Pack one context and its candidate responses into one row.

    Args:
        context_ids: The context's token ids (chat prompt ending with the generation prompt).
        responses: K >= 1 candidate responses' token ids (reference first, by convention).

    Returns:
        The packed `CiiRow`. Raises ValueError on an empty context or response, or no response.
    """
    if len(context_ids) == 0:
        raise ValueError("the CII context is empty")
    if len(responses) == 0 or any(len(r) == 0 for r in responses):
        raise ValueError("a CII row needs at least one response and no empty response")
    c = len(context_ids)
    ids, pos, spans = list(context_ids), list(range(c)), []
    for resp in responses:
        spans.append((len(ids), len(ids) + len(resp)))
        ids.extend(resp)
        pos.extend(range(c, c + len(resp)))
    return CiiRow(ids, pos, tuple(spans))


def _segments(row: CiiRow) -> torch.Tensor:
    """(L,) long: 0 on the context, k + 1 on response k."""
    seg = torch.zeros(len(row.input_ids), dtype=torch.long)
    for k, (start, end) in enumerate(row.spans):
        seg[start:end] = k + 1
    return seg


def cii_allowed(row: CiiRow) -> torch.Tensor:
    """Boolean "query i may attend key j" matrix of one packed row.

    Args:
        row: A `CiiRow`.

    Returns:
        (L, L) bool: causal, except that a response row never sees another response.
    """
    seg = _segments(row)  # (L,)
    n = seg.shape[0]
    causal = torch.ones(n, n, dtype=torch.bool).tril()  # (L, L)
    same_or_context = (seg.unsqueeze(0) == 0) | (seg.unsqueeze(0) == seg.unsqueeze(1))
    return causal & same_or_context


@dataclass
class CiiBatch:
    """B packed rows, right-padded, with the index of every scored response token.

    Attributes:
        input_ids: (B, L) long, padded with the pad id.
        position_ids: (B, L) long (0 on padding).
        allowed: (B, L, L) bool; padding keys are never allowed and a padding query attends to
            itself only (no NaN). `additive_mask(dtype)` gives the model's (B, 1, L, L) mask.
        pred_rows: (N,) row of each scored token.
        pred_pos: (N,) position whose logits predict it.
        targets: (N,) the token id.
        segment: (N,) its candidate in the flat (B * K) list: b * K + k.
        candidate_mask: (B, K) bool, False = no such candidate (a row with fewer than K).
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    allowed: torch.Tensor
    pred_rows: torch.Tensor
    pred_pos: torch.Tensor
    targets: torch.Tensor
    segment: torch.Tensor
    candidate_mask: torch.Tensor

    @property
    def n_candidates(self) -> int:
        """K, the candidate slots of each row."""
        return self.candidate_mask.shape[1]

    def candidate_tokens(self) -> torch.Tensor:
        """(B, K) long: the scored tokens of each candidate (0 for an empty slot)."""
        b, k = self.candidate_mask.shape
        return torch.bincount(self.segment, minlength=b * k).view(b, k)

    def additive_mask(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(B, 1, L, L) float mask: 0 where allowed, finfo(dtype).min elsewhere."""
        return additive_from_allowed(self.allowed, dtype)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> CiiBatch:
        """The same batch on `device`."""
        moved = {
            name: getattr(self, name).to(device, non_blocking=non_blocking)
            for name in self.__dataclass_fields__
        }
        return CiiBatch(**moved)


def _score_index(rows: Sequence[CiiRow], k_max: int) -> tuple[list[int], ...]:
    """Flat (row, predicting position, target, segment) lists of every response token."""
    pred_rows, pred_pos, targets, segment = [], [], [], []
    for b, row in enumerate(rows):
        last_context = row.context_len - 1
        for k, (start, end) in enumerate(row.spans):
            for t in range(start, end):
                pred_rows.append(b)
                pred_pos.append(last_context if t == start else t - 1)
                targets.append(row.input_ids[t])
                segment.append(b * k_max + k)
    return pred_rows, pred_pos, targets, segment


def cii_batch(rows: Sequence[CiiRow], pad_id: int) -> CiiBatch:
    """Pad packed rows (right) and index their response tokens for scoring.

    Args:
        rows: B rows from `cii_row`.
        pad_id: Id written into padding positions (never attended).

    Returns:
        A `CiiBatch` with K = the most candidates of one row.
    """
    if not rows:
        raise ValueError("cii_batch needs at least one row")
    b, length = len(rows), max(len(r.input_ids) for r in rows)
    k_max = max(len(r.spans) for r in rows)
    ids = torch.full((b, length), pad_id, dtype=torch.long)
    pos = torch.zeros((b, length), dtype=torch.long)
    allowed = torch.eye(length, dtype=torch.bool).repeat(b, 1, 1)  # padding: itself only
    cand = torch.zeros((b, k_max), dtype=torch.bool)
    for i, row in enumerate(rows):
        n = len(row.input_ids)
        ids[i, :n] = torch.tensor(row.input_ids, dtype=torch.long)
        pos[i, :n] = torch.tensor(row.position_ids, dtype=torch.long)
        allowed[i, :n, :n] = cii_allowed(row)
        cand[i, : len(row.spans)] = True
    index = (torch.tensor(v, dtype=torch.long) for v in _score_index(rows, k_max))
    return CiiBatch(ids, pos, allowed, *index, candidate_mask=cand)


def _target_logprobs(
    x: torch.Tensor, targets: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor] | None
) -> torch.Tensor:
    """(n, H or V), (n,) -> (n,) float32 log p(target) of one chunk."""
    logits = x if head is None else head(x)  # (n, V)
    logp = torch.log_softmax(logits.float(), dim=-1)  # (n, V)
    return logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def _chunked_logprobs(
    x: torch.Tensor,
    targets: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor] | None = None,
    chunk: int = CHUNK_ROWS,
) -> torch.Tensor:
    """log p(target) of every row, `chunk` rows at a time.

    Under autograd each chunk is checkpointed, so backward recomputes its (chunk, V) float32
    log-softmax instead of keeping all N of them alive.
    """
    if x.shape[0] <= chunk:
        return _target_logprobs(x, targets, head)
    out = []
    for s in range(0, x.shape[0], chunk):
        piece, tgt = x[s : s + chunk], targets[s : s + chunk]
        if torch.is_grad_enabled():
            out.append(checkpoint(_target_logprobs, piece, tgt, head, use_reentrant=False))
        else:
            out.append(_target_logprobs(piece, tgt, head))
    return torch.cat(out)


def _reduce_segments(
    logp: torch.Tensor, segment: torch.Tensor, n_segments: int, normalize: str
) -> torch.Tensor:
    """(N,) token log-probs -> (n_segments,) per-candidate sum or token mean."""
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
    segment = segment.to(logp.device)
    total = logp.new_zeros(n_segments).index_add(0, segment, logp)  # (n_segments,)
    if normalize == "sum":
        return total
    count = torch.zeros(n_segments, device=logp.device).index_add(0, segment, torch.ones_like(logp))
    return total / count.clamp(min=1)  # a candidate with no token scores 0


def sequence_logliks(
    logits: torch.Tensor,
    targets: torch.Tensor,
    segment: torch.Tensor,
    n_segments: int,
    normalize: str = "mean",
    chunk_rows: int = CHUNK_ROWS,
) -> torch.Tensor:
    """Per-candidate log-likelihood of its tokens.

    Args:
        logits: (N, V) logits of the position predicting each scored token.
        targets: (N,) the scored token ids.
        segment: (N,) the candidate (0 .. n_segments - 1) each token belongs to.
        n_segments: Number of candidates.
        normalize: "sum" (sequence log-likelihood) or "mean" (per-token mean).
        chunk_rows: Rows whose float32 log-softmax is built at once.

    Returns:
        (n_segments,) float32; a candidate with no token scores 0.
    """
    n = logits.shape[0]
    if logits.dim() != 2 or targets.shape != (n,) or segment.shape != (n,):
        raise ValueError(
            f"logits must be (N, V) with N targets and segments, got {tuple(logits.shape)}, "
            f"{tuple(targets.shape)}, {tuple(segment.shape)}"
        )
    logp = _chunked_logprobs(logits, targets.to(logits.device), None, chunk_rows)  # (N,)
    return _reduce_segments(logp, segment, n_segments, normalize)


def response_logliks(
    hidden_or_logits: torch.Tensor,
    batch: CiiBatch,
    normalize: str = "mean",
    head: Callable[[torch.Tensor], torch.Tensor] | None = None,
    chunk_rows: int = CHUNK_ROWS,
) -> torch.Tensor:
    """Score every candidate of a packed batch from one forward's outputs.

    Args:
        hidden_or_logits: (B, L, V) logits, or (B, L, H) last hidden states when `head` is given.
        batch: The `CiiBatch` the forward ran on.
        normalize: "sum" or "mean" (see `sequence_logliks`).
        head: Maps (n, H) hidden states to (n, V) logits (the LM head); applied to the N scored
            positions only, chunk by chunk, so (B, L, V) logits are never built.
        chunk_rows: Scored positions whose logits and log-softmax are built at once.

    Returns:
        (B, K) float32 scores; slots outside `batch.candidate_mask` score 0.
    """
    device = hidden_or_logits.device
    rows, pos = batch.pred_rows.to(device), batch.pred_pos.to(device)
    picked = hidden_or_logits[rows, pos]  # (N, H or V)
    logp = _chunked_logprobs(picked, batch.targets.to(device), head, chunk_rows)  # (N,)
    b, k = batch.candidate_mask.shape
    return _reduce_segments(logp, batch.segment, b * k, normalize).view(b, k)
