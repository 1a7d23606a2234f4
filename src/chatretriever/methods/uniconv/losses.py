"""UniConv's losses: the context-identification loss L_CII and L = L_R + L_G + alpha * L_CII.

Losses take scores or logits, never the model, and return named parts (see
`chatretriever.modeling.losses` for the retrieval and LM parts).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

CII = "cii"
"""The name of the context-identification part (the one weighted by alpha)."""


def cii_loss(
    scores: torch.Tensor, candidate_mask: torch.Tensor, temperature: float = 1.0
) -> dict[str, torch.Tensor]:
    """Cross-entropy picking each example's reference response over its incorrect ones.

    Args:
        scores: (B, K) response log-likelihoods (`cii.response_logliks`); column 0 is the
            reference.
        candidate_mask: (B, K) bool, False = no candidate in that slot (left out).
        temperature: Divides the scores.

    Returns:
        {"cii": scalar}: the mean over rows whose reference and at least one other candidate
        are valid; the other rows add nothing (0, gradient still connected, when none ranks).
    """
    if scores.dim() != 2 or candidate_mask.shape != scores.shape:
        raise ValueError(
            f"scores and candidate_mask must both be (B, K), got {tuple(scores.shape)}, "
            f"{tuple(candidate_mask.shape)}"
        )
    valid = candidate_mask.to(scores.device).bool()
    # finfo.min rather than -inf: a row with no valid candidate stays finite (no NaN grads).
    logits = (scores.float() / temperature).masked_fill(~valid, torch.finfo(torch.float32).min)
    per_row = -F.log_softmax(logits, dim=-1)[:, 0]  # (B,)
    ranks = valid[:, 0] & (valid.sum(-1) >= 2)  # (B,)
    # The mean over ranking rows, without reading their count back (no device sync).
    total = torch.where(ranks, per_row, torch.zeros_like(per_row)).sum()
    return {CII: total / ranks.sum().clamp(min=1)}


GROUNDED = "grounded"
"""The name of the grounded-generation part (the answer path's LM loss)."""


def grounded_lm_loss(ref_loglik: torch.Tensor, valid: torch.Tensor) -> dict[str, torch.Tensor]:
    """Negative log-likelihood of each reference response after its grounded prompt.

    The answer path (`UniConv.answer`: the session and its passages, then the response) trained
    directly; the reference's scores come from the L_CII forward, so this part costs no forward
    of its own.

    Args:
        ref_loglik: (B,) per-token MEAN log-likelihood of each example's reference response.
        valid: (B,) bool, False = the row has no reference (left out).

    Returns:
        {"grounded": scalar}: minus the mean over valid rows (0, gradient connected, when none).
    """
    if ref_loglik.dim() != 1 or valid.shape != ref_loglik.shape:
        raise ValueError(
            f"ref_loglik and valid must both be (B,), got {tuple(ref_loglik.shape)}, "
            f"{tuple(valid.shape)}"
        )
    valid = valid.to(ref_loglik.device).bool()
    total = torch.where(valid, -ref_loglik.float(), torch.zeros_like(ref_loglik.float())).sum()
    return {GROUNDED: total / valid.sum().clamp(min=1)}


def uniconv_total(parts: Mapping[str, torch.Tensor], alpha: float) -> torch.Tensor:
    """L = L_R + L_G + alpha * L_CII over the parts present.

    Every part is added with weight 1 (the retrieval and generation losses, whatever they are
    named) except "cii", which is multiplied by `alpha`.

    Args:
        parts: Named scalar losses, e.g. {"contrastive": L_R, "generation": L_G, "cii": L_CII}.
        alpha: Weight of L_CII.

    Returns:
        Scalar tensor, the training loss. Raises ValueError when `parts` is empty.
    """
    if not parts:
        raise ValueError("uniconv_total needs at least one loss part")
    return sum(
        (alpha * value if name == CII else value for name, value in parts.items()),
        start=torch.zeros((), device=next(iter(parts.values())).device),
    )
