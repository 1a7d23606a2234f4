"""L_C and L_S against values worked out by hand on small tensors."""

from __future__ import annotations

import math

import pytest
import torch

from chatretriever.modeling.losses import (
    combine_csit_losses,
    contrastive_loss,
    next_token_targets,
    session_masked_lm_loss,
)


def _lse(*xs: float) -> float:
    return math.log(sum(math.exp(x) for x in xs))


def test_contrastive_in_batch_without_hard_negatives():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    pos = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    # scores/T with T=0.5: q0 -> [2.0, 1.2], q1 -> [0.0, 1.6]; targets 0 and 1.
    expected = ((_lse(2.0, 1.2) - 2.0) + (_lse(0.0, 1.6) - 1.6)) / 2
    out = contrastive_loss(q, pos, temperature=0.5)
    assert set(out) == {"contrastive"}
    assert out["contrastive"].item() == pytest.approx(expected, abs=1e-6)


def test_contrastive_with_hard_negatives_per_example_only():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    pos = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    neg = torch.tensor([[[0.0, 1.0]], [[0.8, 0.6]]])  # (B=2, K=1, D=2)
    # T=1: q0 -> pos 1.0, own neg 0.0; q1 -> pos 0.8, own neg 0.6.
    expected = ((_lse(1.0, 0.0) - 1.0) + (_lse(0.8, 0.6) - 0.8)) / 2
    out = contrastive_loss(q, pos, neg, temperature=1.0, in_batch=False)
    assert out["contrastive"].item() == pytest.approx(expected, abs=1e-6)
    with pytest.raises(ValueError, match="hard negatives"):
        contrastive_loss(q, pos, None, in_batch=False)


def test_contrastive_in_batch_uses_everyones_positives_and_hard_negatives():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    pos = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    neg = torch.tensor([[[0.0, 1.0]], [[0.8, 0.6]]])
    # Candidates: pos0, pos1, neg0, neg1. q0 -> [1.0, 0.6, 0.0, 0.8]; q1 -> [0.0, 0.8, 1.0, 0.6].
    expected = ((_lse(1.0, 0.6, 0.0, 0.8) - 1.0) + (_lse(0.0, 0.8, 1.0, 0.6) - 0.8)) / 2
    out = contrastive_loss(q, pos, neg, temperature=1.0, in_batch=True)
    assert out["contrastive"].item() == pytest.approx(expected, abs=1e-6)


def test_contrastive_loss_has_gradients_and_checks_shapes():
    q = torch.randn(3, 4, requires_grad=True)
    out = contrastive_loss(q, torch.randn(3, 4), torch.randn(3, 2, 4))
    out["contrastive"].backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
    with pytest.raises(ValueError):
        contrastive_loss(torch.randn(3, 4), torch.randn(2, 4))


def test_session_masked_lm_loss_by_hand():
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [5.0, 5.0, 5.0]]])  # (1, 3, 3)
    labels = torch.tensor([[0, 2, -100]])  # last position carries no loss
    expected = ((_lse(2.0, 0.0, 0.0) - 2.0) + (_lse(0.0, 1.0, 0.0) - 0.0)) / 2
    out = session_masked_lm_loss(logits, labels)
    assert set(out) == {"session_lm"}
    assert out["session_lm"].item() == pytest.approx(expected, abs=1e-6)
    # Label smoothing eps over V classes: (1 - eps) * NLL + eps * mean_v(-log p_v).
    eps, v = 0.1, 3
    row0 = [2.0, 0.0, 0.0]
    nll0 = _lse(*row0) - 2.0
    uni0 = sum(_lse(*row0) - x for x in row0) / v
    row1 = [0.0, 1.0, 0.0]
    nll1 = _lse(*row1) - 0.0
    uni1 = sum(_lse(*row1) - x for x in row1) / v
    smooth = ((1 - eps) * nll0 + eps * uni0 + (1 - eps) * nll1 + eps * uni1) / 2
    out = session_masked_lm_loss(logits, labels, label_smoothing=eps)
    assert out["session_lm"].item() == pytest.approx(smooth, abs=1e-6)


def test_lm_loss_with_no_labelled_token_is_zero_not_nan():
    logits = torch.randn(2, 4, requires_grad=True)
    out = session_masked_lm_loss(logits, torch.tensor([-100, -100]))
    assert out["session_lm"].item() == 0.0
    out["session_lm"].backward()  # still part of the graph


def test_next_token_targets_shift():
    logits = torch.arange(2 * 3 * 1, dtype=torch.float).view(2, 3, 1)
    labels = torch.tensor([[-100, 7, 8], [-100, -100, 9]])
    lg, lb = next_token_targets(logits, labels)
    assert lg.shape == (2, 2, 1) and lb.tolist() == [[7, 8], [-100, 9]]
    assert lg[:, :, 0].tolist() == [[0.0, 1.0], [3.0, 4.0]]


def test_combine_weights_the_lm_part():
    lc = {"contrastive": torch.tensor(2.0)}
    ls = {"session_lm": torch.tensor(4.0)}
    parts = combine_csit_losses(lc, ls, alpha=0.3)
    assert parts["contrastive"].item() == 2.0
    assert parts["session_lm"].item() == pytest.approx(1.2)
    assert sum(parts.values()).item() == pytest.approx(3.2)
    assert set(combine_csit_losses(lc, ls, alpha=0.0)) == {"contrastive"}
    assert set(combine_csit_losses(lc, None, alpha=0.0)) == {"contrastive"}
    with pytest.raises(ValueError):
        combine_csit_losses(lc, None, alpha=0.3)


def test_candidate_exclusions_mask_padding_and_copies_of_the_positive():
    from chatretriever.modeling.losses import candidate_exclusions

    pos_keys = torch.tensor([7, 7, 9])  # sessions 0 and 1 share their positive
    neg_keys = torch.tensor([[9, -1], [5, 7], [1, 2]])
    valid = torch.tensor([[True, False], [True, True], [True, True]])
    got = candidate_exclusions(pos_keys, neg_keys, valid, n_queries=3)
    # columns: pos0 pos1 pos2 | n00 n01 n10 n11 n20 n21
    expected = [
        [0, 1, 0, 0, 1, 0, 1, 0, 0],  # pos1 is a copy of its positive; n01 is padding
        [1, 0, 0, 0, 1, 0, 1, 0, 0],  # pos0 and n11 are copies of its positive
        [0, 0, 0, 1, 1, 0, 0, 0, 0],  # n00 is a copy of pos2
    ]
    assert got.int().tolist() == expected
    own = candidate_exclusions(pos_keys, neg_keys, valid, n_queries=3, in_batch=False)
    assert own.int().tolist() == [[0, 0, 1], [0, 0, 1], [0, 0, 0]]


def test_contrastive_offset_and_exclude_by_hand():
    q = torch.tensor([[1.0, 0.0]])
    pos = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.5, 0.5]])  # q's positive is row 1
    exclude = torch.tensor([[False, False, True]])
    out = contrastive_loss(q, pos, temperature=1.0, offset=1, exclude=exclude)
    # softmax over scores [0, 1] (the excluded 0.5 is left out): -log(e / (1 + e))
    expected = -math.log(math.e / (1 + math.e))
    assert float(out["contrastive"]) == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="do not fit"):
        contrastive_loss(q, pos, offset=3)
