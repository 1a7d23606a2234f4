"""Padding, positions, EMB positions and the session-masked 4D mask vs hand-written matrices
(and vs the reference builder it replaced, on random lengths, left and right padding)."""

from __future__ import annotations

import pytest
import torch

from chatretriever.modeling.collate import (
    additive_mask,
    csit_allowed,
    csit_batch,
    csit_mask,
    encode_batch,
    last_token_positions,
    pad_batch,
)
from chatretriever.modeling.template import CsitPieces

E1, E2 = 901, 902  # EMB token ids of these tests

# Example A: s0 s1 s2 | E1 E2 | h r0 r1 | F1 F2 | pad  (S=3, t=2, assistant header h, trained
# tokens r0 r1, two more response-side tokens F1 F2). Row 5 (h) is the separator row that the
# official code leaked: it must NOT see s0..s2.
CSIT_A = """
10000000000
11000000000
11100000000
11110000000
11111000000
00011100000
00011110000
00011111000
00011111100
00011111110
00000000001
"""
VANILLA_A = """
10000000000
11000000000
11100000000
11110000000
11111000000
11111100000
11111110000
11111111000
11111111100
11111111110
00000000001
"""
# Example B: s0 s1 s2 s3 | E1 E2 | h r0 r1 F1 F2   (S=4, t=2, no padding)
CSIT_B = """
10000000000
11000000000
11100000000
11110000000
11111000000
11111100000
00001110000
00001111000
00001111100
00001111110
00001111111
"""


def _matrix(text: str) -> torch.Tensor:
    rows = [r.strip() for r in text.strip().splitlines()]
    return torch.tensor([[c == "1" for c in r] for r in rows])


def _examples() -> list[CsitPieces]:
    a = CsitPieces((10, 11, 12, E1, E2, 20, 21, 22, E1, E2), 3, 2, label_start=6, label_end=8)
    b = CsitPieces((10, 11, 12, 13, E1, E2, 20, 21, 22, E1, E2), 4, 2, label_start=7, label_end=9)
    return [a, b]


def test_pad_batch_right_and_left():
    ids, mask = pad_batch([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    ids, mask = pad_batch([[5, 6, 7], [8]], pad_id=0, padding_side="left")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    with pytest.raises(ValueError):
        pad_batch([[1], []], pad_id=0)


def test_positions_and_emb_positions_do_not_depend_on_padding_side():
    seqs = [[5, 6, E1, E2], [7, E2, 8, E1, E2, 9]]  # EMB_t need not be the last token
    right = encode_batch(seqs, pad_id=0, padding_side="right")
    left = encode_batch(seqs, pad_id=0, padding_side="left")
    assert right["position_ids"].tolist() == [[0, 1, 2, 3, 0, 0], [0, 1, 2, 3, 4, 5]]
    assert left["position_ids"].tolist() == [[0, 0, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5]]
    pos_r = last_token_positions(right["input_ids"], right["attention_mask"], E2)
    pos_l = last_token_positions(left["input_ids"], left["attention_mask"], E2)
    assert pos_r.tolist() == [3, 4] and pos_l.tolist() == [5, 4]
    with pytest.raises(ValueError, match="rows \\[0\\]"):
        last_token_positions(right["input_ids"], right["attention_mask"], 9)


def test_csit_mask_equals_hand_written_matrices():
    _, mask2d = pad_batch([[1] * 10, [1] * 11], pad_id=0)  # lengths 10 and 11, right padded
    session_lens, response_starts = torch.tensor([3, 4]), torch.tensor([5, 6])  # S, S + t
    allowed = csit_allowed(mask2d, session_lens, response_starts)
    assert torch.equal(allowed[0], _matrix(CSIT_A))
    assert torch.equal(allowed[1], _matrix(CSIT_B))
    vanilla = csit_allowed(mask2d, torch.zeros(2, dtype=torch.long), response_starts)
    assert torch.equal(vanilla[0], _matrix(VANILLA_A))
    # The separator row (assistant header right after the session EMB) sees no session token.
    assert not allowed[0, 5, :3].any() and allowed[0, 5, 3:5].all()


def test_csit_batch_tensors():
    batch = csit_batch(_examples(), pad_id=0)
    # The batch holds lengths, not a (B, 1, L, L) float mask: that is built where it is used.
    assert all(t.dim() <= 2 for t in batch.values())
    assert batch["attention_mask"].tolist() == [[1] * 10 + [0], [1] * 11]
    assert batch["masked_session_lens"].tolist() == [3, 4]
    assert batch["response_starts"].tolist() == [5, 6]
    mask = csit_mask(batch, torch.float32)
    assert mask.shape == (2, 1, 11, 11) and mask.dtype == torch.float32
    assert torch.isfinite(mask).all()  # dtype-min, never -inf
    assert set(mask.unique().tolist()) == {0.0, torch.finfo(torch.float32).min}
    assert torch.equal(mask[0, 0] == 0, _matrix(CSIT_A))
    assert torch.equal(mask[1, 0] == 0, _matrix(CSIT_B))
    assert batch["input_ids"][0].tolist() == [10, 11, 12, E1, E2, 20, 21, 22, E1, E2, 0]
    assert batch["labels"].tolist() == [
        [-100] * 6 + [21, 22] + [-100] * 3,
        [-100] * 7 + [21, 22] + [-100] * 2,
    ]
    assert batch["position_ids"][0].tolist() == list(range(10)) + [0]
    assert batch["session_emb_pos"].tolist() == [4, 5]
    vanilla = csit_batch(_examples(), pad_id=0, mode="vanilla")
    assert vanilla["masked_session_lens"].tolist() == [0, 0]
    assert torch.equal(csit_mask(vanilla, torch.float32)[0, 0] == 0, _matrix(VANILLA_A))
    with pytest.raises(ValueError, match="mask mode"):
        csit_batch(_examples(), pad_id=0, mode="none")


def test_additive_mask_in_bf16_is_finite():
    allowed = _matrix(CSIT_A).unsqueeze(0)
    mask = additive_mask(allowed, torch.bfloat16)
    assert mask.dtype == torch.bfloat16 and torch.isfinite(mask).all()
    assert torch.equal(mask[0, 0] == 0, allowed[0])


def _reference_csit_allowed(lengths, session_lens, n_emb, max_len, mode):
    """The builder `csit_allowed` replaced (right padding only; it ran on the CPU in the
    collator): the reference the new one must equal exactly."""
    i = torch.arange(max_len).view(1, -1, 1)
    j = torch.arange(max_len).view(1, 1, -1)
    n = lengths.view(-1, 1, 1)
    allowed = (j <= i) & (i < n) & (j < n)
    if mode == "csit":
        response_row = i >= session_lens.view(-1, 1, 1) + n_emb
        session_col = j < session_lens.view(-1, 1, 1)
        allowed = allowed & ~(response_row & session_col)
    return allowed | ((i >= n) & (i == j))


@pytest.mark.parametrize("mode", ["csit", "vanilla"])
def test_mask_from_lengths_equals_the_reference_left_and_right(mode):
    g = torch.Generator().manual_seed(0)
    for trial in range(25):
        b, t = int(torch.randint(1, 6, (1,), generator=g)), 1 + trial % 3
        session_lens = torch.randint(1, 12, (b,), generator=g)
        lengths = session_lens + t + torch.randint(1, 10, (b,), generator=g)  # >= 1 response row
        max_len = int(lengths.max()) + int(torch.randint(0, 3, (1,), generator=g))
        expected = _reference_csit_allowed(lengths, session_lens, t, max_len, mode)
        masked = session_lens if mode == "csit" else torch.zeros_like(session_lens)
        seqs = [[1] * int(n) for n in lengths]
        for side in ("right", "left"):
            _, mask2d = pad_batch(seqs, pad_id=0, padding_side=side)
            extra = max_len - mask2d.shape[1]  # the reference may pad further
            mask2d = torch.nn.functional.pad(mask2d, (extra, 0) if side == "left" else (0, extra))
            got = csit_allowed(mask2d, masked, session_lens + t)
            for row, n in enumerate(lengths.tolist()):
                shift = max_len - n if side == "left" else 0  # left: the same matrix, rolled
                want = torch.roll(expected[row], (shift, shift), (0, 1))
                assert torch.equal(got[row], want), (trial, side, row)


def test_mask_is_built_on_the_batch_device():
    """No CPU tensor sneaks in: on the meta device every step must stay on the meta device."""
    batch = {k: v.to("meta") for k, v in csit_batch(_examples(), pad_id=0).items()}
    mask = csit_mask(batch, torch.bfloat16)
    assert mask.device.type == "meta" and mask.shape == (2, 1, 11, 11)
    assert mask.dtype == torch.bfloat16
