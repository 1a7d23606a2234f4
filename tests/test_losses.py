"""L_C and L_S against values worked out by hand on small tensors."""

from __future__ import annotations

import math
import re
from pathlib import Path

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


def _keys(*pairs):
    """(n, N_KEYS) key rows from (id key, text key) pairs."""
    return torch.tensor(pairs, dtype=torch.long)


def test_candidate_exclusions_leave_out_padding_and_every_relevant_passage():
    from chatretriever.modeling.losses import candidate_exclusions

    # Passages as (id key, text key). Session 0 has two positives: a (slot 0) and b; b's text
    # also appears under another id (b2). Session 1's positive is c, session 2's is d.
    a, b, b2, c, d = (1, 10), (2, 20), (7, 20), (3, 30), (4, 40)
    x, y, pad = (5, 50), (6, 60), (-1, -1)
    positive_keys = torch.stack([_keys(a, b), _keys(c, pad), _keys(d, pad)])  # (3, P=2, 2)
    cand_keys = torch.stack([_keys(a, x, pad), _keys(c, b2, a), _keys(d, b, y)])  # (3, 1+K, 2)
    valid = torch.tensor([[True, True, False], [True, True, True], [True, True, True]])
    got = candidate_exclusions(positive_keys, cand_keys, valid)
    # columns: pos0 pos1 pos2 | n00 n01 n10 n11 n20 n21
    expected = [
        [0, 0, 0, 0, 1, 1, 1, 1, 0],  # n01 padding; b2 and b are its other positive; n11 = a
        [0, 0, 0, 0, 1, 0, 0, 0, 0],  # only the padding slot
        [0, 0, 0, 0, 1, 0, 0, 0, 0],
    ]
    assert got.int().tolist() == expected
    own = candidate_exclusions(positive_keys, cand_keys, valid, in_batch=False)
    assert own.int().tolist() == [[0, 0, 1], [0, 0, 0], [0, 0, 0]]
    # Gathered rows (another process holds rows 0 and 1): session 2 at offset 2.
    last = candidate_exclusions(positive_keys[2:], cand_keys, valid, offset=2)
    assert last.int().tolist() == [expected[2]]
    # A key that is absent (-1) never matches another absent key.
    no_id = candidate_exclusions(
        _keys((-1, 1)).unsqueeze(0),
        _keys((-1, 1), (-1, 2)).view(1, 2, 2),
        torch.ones(1, 2, dtype=torch.bool),
    )
    assert no_id.int().tolist() == [[0, 0]]


def test_layout_places_real_passages_and_pads_with_zeros():
    from chatretriever.modeling.losses import CandidateLayout

    rows = torch.tensor([[0, 1, -1], [2, -1, -1]])  # 3 real passages for 2 x (1 + 2) slots
    keys = torch.full((2, 3, 2), -1)
    layout = CandidateLayout(rows, keys, torch.full((2, 1, 2), -1))
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]], requires_grad=True)
    slots = layout.place(emb)
    assert slots.tolist() == [[[1, 0], [0, 1], [0, 0]], [[2, 2], [0, 0], [0, 0]]]
    assert layout.valid.tolist() == [[True, True, False], [True, False, False]]
    slots.sum().backward()
    assert emb.grad.tolist() == [[1, 1], [1, 1], [1, 1]]  # each real passage used once
    with pytest.raises(ValueError, match="slot 0"):
        CandidateLayout(torch.tensor([[-1, 0]]), torch.full((1, 2, 2), -1), keys[:1, :1])


def test_layout_loss_by_hand_with_several_positives_and_no_hard_negatives():
    """n_hard_negatives = 0 (a (B, 1) layout) with in-batch negatives: session 0's second
    positive is session 1's positive, so it is no negative of session 0 (but session 0's
    positive is a negative of session 1, which has only that one positive)."""
    from chatretriever.modeling.losses import CandidateLayout, layout_contrastive_loss

    q = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    emb = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])  # the three positives
    keys = torch.tensor([[[1, 10]], [[2, 20]], [[3, 30]]])  # (B, 1, 2)
    positive_keys = torch.tensor([[[1, 10], [2, 20]], [[2, 20], [-1, -1]], [[3, 30], [-1, -1]]])
    layout = CandidateLayout(torch.tensor([[0], [1], [2]]), keys, positive_keys)
    out = layout_contrastive_loss(q, emb, layout, temperature=1.0)
    # T=1 scores: q0 -> [1.0, (0.6), 0.0]; q1 -> [0.0, 0.8, 1.0]; q2 -> [0.6, 1.0, 0.8].
    expected = (
        (_lse(1.0, 0.0) - 1.0) + (_lse(0.0, 0.8, 1.0) - 0.8) + (_lse(0.6, 1.0, 0.8) - 0.8)
    ) / 3
    assert out["contrastive"].item() == pytest.approx(expected, abs=1e-6)


def test_layout_loss_per_example_ignores_padding_and_relevant_negatives():
    from chatretriever.modeling.losses import CandidateLayout, layout_contrastive_loss

    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # example 0: positive, one negative that is a near-copy of its positive (same text key),
    # one real negative; example 1: positive and one real negative, one padding slot.
    emb = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.6, 0.8], [0.8, 0.6]])
    rows = torch.tensor([[0, 1, 2], [3, 4, -1]])
    keys = torch.tensor([[[1, 10], [9, 10], [2, 20]], [[3, 30], [4, 40], [-1, -1]]])
    layout = CandidateLayout(rows, keys, keys[:, :1])
    out = layout_contrastive_loss(q, emb, layout, temperature=1.0, in_batch=False)
    expected = ((_lse(1.0, 0.0) - 1.0) + (_lse(0.8, 0.6) - 0.8)) / 2
    assert out["contrastive"].item() == pytest.approx(expected, abs=1e-6)


def test_one_ignore_index():
    """The label ignored by the LM loss is defined once, and nothing spells it as a literal."""
    import chatretriever

    root = Path(chatretriever.__file__).parent
    definitions, literals = [], []
    for path in root.rglob("*.py"):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if re.match(r"\s*IGNORE_INDEX\s*(:[^=]*)?=", code):
                definitions.append(f"{path.name}:{n}")
            elif re.search(r"(?<![\w.])-100\b", code):
                literals.append(f"{path.name}:{n}")
    assert len(definitions) == 1, definitions
    assert not literals, literals


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
