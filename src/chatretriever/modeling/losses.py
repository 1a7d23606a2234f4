"""The CSIT losses: InfoNCE (L_C) and the session-masked LM loss (L_S), L = L_C + alpha * L_S.

Losses take embeddings or logits, never the model, and return dicts of named parts; the trainer
sums the parts and logs each one.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def contrastive_loss(
    q: torch.Tensor,
    pos: torch.Tensor,
    neg: torch.Tensor | None = None,
    temperature: float = 0.01,
    in_batch: bool = True,
    offset: int = 0,
    exclude: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """InfoNCE between each session and its positive against hard and in-batch negatives.

    Scores are dot products divided by `temperature` (pass L2-normalised embeddings for
    cosine similarity).

    Args:
        q: (B, D) session embeddings.
        pos: (N, D) positives. Without in-batch negatives N == B; with them N >= B may hold
            the positives of every process (row `offset + i` is session i's positive).
        neg: (N, K, D) hard negatives of each row of `pos`, or None.
        temperature: Softmax temperature.
        in_batch: Also score every other example's positive and hard negatives as negatives.
        offset: Row of `pos` holding the positive of q[0] (the process rank times B under DDP).
        exclude: (B, C) bool, True = candidate left out of row i's softmax (padding or a
            duplicate of its positive); C = N + N*K candidates in the order [pos, neg
            flattened] with in-batch negatives, else 1 + K ([own positive, own negatives]).
            See `candidate_exclusions`.

    Returns:
        {"contrastive": scalar loss}.
    """
    b = q.shape[0]
    if q.dim() != 2 or pos.dim() != 2 or pos.shape[1] != q.shape[1]:
        raise ValueError(f"q and pos must both be (*, D), got {tuple(q.shape)}, {tuple(pos.shape)}")
    if neg is not None and (neg.dim() != 3 or neg.shape[0] != pos.shape[0]):
        raise ValueError(f"neg must be (N, K, D) with N = len(pos), got {tuple(neg.shape)}")
    if not 0 <= offset <= pos.shape[0] - b or (not in_batch and pos.shape[0] != b):
        raise ValueError(f"{b} sessions at offset {offset} do not fit {pos.shape[0]} positives")
    if in_batch:
        cands = pos if neg is None else torch.cat([pos, neg.reshape(-1, neg.shape[-1])])
        scores = q @ cands.T  # (B, N + N*K): column offset + i is session i's positive
        target = torch.arange(b, device=q.device) + offset
    else:
        if neg is None or neg.shape[1] == 0:
            raise ValueError("in_batch=False needs hard negatives")
        cands = torch.cat([pos.unsqueeze(1), neg], dim=1)  # (B, 1 + K, D)
        scores = torch.einsum("bd,bkd->bk", q, cands)  # (B, 1 + K): column 0 is the positive
        target = torch.zeros(b, dtype=torch.long, device=q.device)
    scores = scores.float() / temperature
    if exclude is not None:
        if exclude.shape != scores.shape:
            raise ValueError(f"exclude must be {tuple(scores.shape)}, got {tuple(exclude.shape)}")
        scores = scores.masked_fill(exclude.to(scores.device), torch.finfo(scores.dtype).min)
    return {"contrastive": F.cross_entropy(scores, target)}


def candidate_exclusions(
    pos_keys: torch.Tensor,
    neg_keys: torch.Tensor,
    neg_valid: torch.Tensor,
    n_queries: int,
    offset: int = 0,
    in_batch: bool = True,
) -> torch.Tensor:
    """Which candidates `contrastive_loss` must leave out: padding, and false negatives.

    A candidate whose key (e.g. a hash of its text) equals the session's own positive key is a
    copy of the positive (two turns of one conversation often share a passage): scoring it as
    a negative would push the session away from its own answer.

    Args:
        pos_keys: (N,) int64 key of each positive.
        neg_keys: (N, K) int64 keys of the hard negatives.
        neg_valid: (N, K) bool, False = padding slot (the example had fewer negatives).
        n_queries: B, the sessions scored here (rows offset .. offset + B - 1 of pos).
        offset: Row of pos_keys holding the first session's positive.
        in_batch: The candidate layout of `contrastive_loss`.

    Returns:
        (B, C) bool, True = leave out; never True at a session's own positive.
    """
    rows = torch.arange(n_queries, device=pos_keys.device) + offset
    own = pos_keys[rows].unsqueeze(1)  # (B, 1)
    if in_batch:
        keys = torch.cat([pos_keys, neg_keys.reshape(-1)])  # (C,)
        valid = torch.cat([torch.ones_like(pos_keys, dtype=torch.bool), neg_valid.reshape(-1)])
        out = (keys.unsqueeze(0) == own) | ~valid.unsqueeze(0)  # (B, C)
        out[torch.arange(n_queries), rows] = False
        return out
    same = neg_keys[rows] == own  # (B, K)
    out = same | ~neg_valid[rows]
    return torch.cat([torch.zeros_like(own, dtype=torch.bool), out], dim=1)  # (B, 1 + K)


def next_token_targets(
    logits: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Align Hugging-Face-style labels with logits: position i predicts token i + 1.

    Args:
        logits: (B, L, V).
        labels: (B, L), -100 = no loss.

    Returns:
        logits (B, L - 1, V) and the labels they predict (B, L - 1).
    """
    return logits[:, :-1], labels[:, 1:]


def session_masked_lm_loss(
    logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0
) -> dict[str, torch.Tensor]:
    """Token-mean cross-entropy of the response tokens generated from the session's EMB tokens.

    The session mask lives in the attention mask (`collate.csit_batch`); this is the LM loss
    over whatever logits it produced.

    Args:
        logits: (..., V) logits, already aligned with `labels` (see `next_token_targets`).
        labels: (...) target ids, -100 = no loss.
        label_smoothing: Label smoothing.

    Returns:
        {"session_lm": scalar loss} (0 when no token is labelled).
    """
    flat_logits = logits.reshape(-1, logits.shape[-1]).float()  # (N, V)
    flat_labels = labels.reshape(-1)  # (N,)
    if not bool((flat_labels != IGNORE_INDEX).any()):
        return {"session_lm": flat_logits.sum() * 0.0}
    loss = F.cross_entropy(
        flat_logits, flat_labels, ignore_index=IGNORE_INDEX, label_smoothing=label_smoothing
    )
    return {"session_lm": loss}


def combine_csit_losses(
    contrastive: Mapping[str, torch.Tensor],
    lm: Mapping[str, torch.Tensor] | None,
    alpha: float,
) -> dict[str, torch.Tensor]:
    """The weighted parts of L = L_C + alpha * L_S; their sum is the training loss.

    Args:
        contrastive: Output of `contrastive_loss`.
        lm: Output of `session_masked_lm_loss`, or None (alpha must then be 0).
        alpha: Weight of L_S.

    Returns:
        {"contrastive": L_C} plus {"session_lm": alpha * L_S} when alpha > 0.
    """
    parts = dict(contrastive)
    if alpha > 0:
        if lm is None:
            raise ValueError("alpha > 0 needs the session-masked LM loss")
        parts.update({name: alpha * value for name, value in lm.items()})
    return parts
