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
) -> dict[str, torch.Tensor]:
    """InfoNCE between each session and its positive against hard and in-batch negatives.

    Scores are dot products divided by `temperature` (pass L2-normalised embeddings for
    cosine similarity).

    Args:
        q: (B, D) session embeddings.
        pos: (B, D) embeddings of each session's positive.
        neg: (B, K, D) hard negatives of each session, or None.
        temperature: Softmax temperature.
        in_batch: Also score every other example's positive and hard negatives as negatives.

    Returns:
        {"contrastive": scalar loss}.
    """
    if q.shape != pos.shape or q.dim() != 2:
        raise ValueError(f"q and pos must both be (B, D), got {tuple(q.shape)}, {tuple(pos.shape)}")
    if neg is not None and (neg.dim() != 3 or neg.shape[0] != q.shape[0]):
        raise ValueError(f"neg must be (B, K, D), got {tuple(neg.shape)}")
    b = q.shape[0]
    if in_batch:
        cands = pos if neg is None else torch.cat([pos, neg.reshape(-1, neg.shape[-1])])
        scores = q @ cands.T  # (B, B + B*K): column i is example i's positive
        target = torch.arange(b, device=q.device)
    else:
        if neg is None or neg.shape[1] == 0:
            raise ValueError("in_batch=False needs hard negatives")
        cands = torch.cat([pos.unsqueeze(1), neg], dim=1)  # (B, 1 + K, D)
        scores = torch.einsum("bd,bkd->bk", q, cands)  # (B, 1 + K): column 0 is the positive
        target = torch.zeros(b, dtype=torch.long, device=q.device)
    loss = F.cross_entropy(scores.float() / temperature, target)
    return {"contrastive": loss}


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
