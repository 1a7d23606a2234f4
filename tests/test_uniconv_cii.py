"""UniConv's one-pass context-identification scoring (packed rows, block-diagonal responses)
and its loss: masks and positions against hand-written values, one packed forward against
separate forwards on two architectures, the losses against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import build_tiny_model

from chatretriever.methods.uniconv.cii import (
    additive_from_allowed,
    cii_allowed,
    cii_batch,
    cii_row,
    response_logliks,
    sequence_logliks,
)
from chatretriever.methods.uniconv.losses import cii_loss, grounded_lm_loss, uniconv_total
from chatretriever.modeling.collate import additive_mask

VOCAB = 64
PAD = 0

# Context of 2 tokens, responses of 2 and 1 tokens: [c0 c1 | a0 a1 | b0].
SMALL = cii_row([11, 12], [[21, 22], [31]])
SMALL_ALLOWED = [
    [1, 0, 0, 0, 0],
    [1, 1, 0, 0, 0],
    [1, 1, 1, 0, 0],
    [1, 1, 1, 1, 0],
    [1, 1, 0, 0, 1],  # b0 sees the context and itself, never a0 / a1
]


def test_small_row_ids_positions_and_spans():
    assert SMALL.input_ids == [11, 12, 21, 22, 31]
    assert SMALL.position_ids == [0, 1, 2, 3, 2]  # every response restarts at len(context)
    assert SMALL.spans == ((2, 4), (4, 5))
    assert SMALL.context_len == 2


def test_small_row_allowed_matrix():
    assert cii_allowed(SMALL).int().tolist() == SMALL_ALLOWED


@pytest.mark.parametrize(("context", "responses"), [([], [[1]]), ([1], []), ([1], [[2], []])])
def test_empty_context_or_response_is_refused(context, responses):
    with pytest.raises(ValueError):
        cii_row(context, responses)


def test_batch_with_padding_and_fewer_candidates():
    other = cii_row([5, 6, 7], [[8]])  # 4 tokens, one candidate
    batch = cii_batch([SMALL, other], pad_id=PAD)
    assert batch.input_ids.tolist() == [[11, 12, 21, 22, 31], [5, 6, 7, 8, PAD]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 2], [0, 1, 2, 3, 0]]
    assert batch.allowed[0].int().tolist() == SMALL_ALLOWED
    assert batch.allowed[1].int().tolist() == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0],
        [0, 0, 0, 0, 1],  # the padding query attends to itself only
    ]
    assert batch.candidate_mask.tolist() == [[True, True], [True, False]]
    assert batch.n_candidates == 2
    # a0 from the last context position, a1 from a0, b0 from the last context position again.
    assert batch.pred_rows.tolist() == [0, 0, 0, 1]
    assert batch.pred_pos.tolist() == [1, 2, 1, 2]
    assert batch.targets.tolist() == [21, 22, 31, 8]
    assert batch.segment.tolist() == [0, 0, 1, 2]  # b * K + k
    assert batch.candidate_tokens().tolist() == [[2, 1], [1, 0]]


def test_additive_mask_is_the_collate_one():
    assert additive_from_allowed is additive_mask
    batch = cii_batch([SMALL], pad_id=PAD)
    mask = batch.additive_mask(torch.float32)
    assert mask.shape == (1, 1, 5, 5)
    low = torch.finfo(torch.float32).min
    expected = torch.tensor(SMALL_ALLOWED, dtype=torch.bool)
    assert torch.equal(mask[0, 0], torch.where(expected, 0.0, low))


# Two examples with different context lengths, 3 and 2 responses of different lengths.
EXAMPLES = [
    ([3, 9, 14, 27, 40], [[5, 6, 7], [50], [8, 19, 33, 2]]),
    ([44, 17, 23], [[61, 4], [12, 13, 14, 15, 16]]),
]


def _separate_logliks(model, context, response) -> float:
    """Summed log p(response | context) from a forward of [context + response] alone."""
    ids = torch.tensor([context + response])
    logp = torch.log_softmax(model(ids).logits[0].float(), dim=-1)  # (L, V)
    c = len(context)
    return sum(logp[c - 1 + t, tok].item() for t, tok in enumerate(response))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_one_packed_forward_equals_separate_forwards(arch, attn):
    model = build_tiny_model(arch, VOCAB).eval()
    model.set_attn_implementation(attn)
    batch = cii_batch([cii_row(c, rs) for c, rs in EXAMPLES], pad_id=PAD)
    assert batch.input_ids.shape == (2, 13)  # 5 + 8 and 3 + 7 tokens: the second is padded
    with torch.no_grad():
        out = model(
            input_ids=batch.input_ids,
            attention_mask=batch.additive_mask(torch.float32),
            position_ids=batch.position_ids,
        )
        packed = response_logliks(out.logits, batch, normalize="sum")  # (B, K)
        mean = response_logliks(out.logits, batch, normalize="mean")
        separate = [[_separate_logliks(model, c, r) for r in rs] for c, rs in EXAMPLES]
    assert torch.isfinite(out.logits).all()  # padding rows give no NaN
    for b, (_, responses) in enumerate(EXAMPLES):
        for k, resp in enumerate(responses):
            assert packed[b, k].item() == pytest.approx(separate[b][k], abs=1e-5)
            assert mean[b, k].item() == pytest.approx(separate[b][k] / len(resp), abs=1e-5)
    assert packed[1, 2].item() == 0.0  # the missing third candidate of example 1


def test_hidden_states_with_head_match_logits():
    model = build_tiny_model("qwen2", VOCAB).eval()
    batch = cii_batch([cii_row(c, rs) for c, rs in EXAMPLES], pad_id=PAD)
    kwargs = dict(
        input_ids=batch.input_ids,
        attention_mask=batch.additive_mask(torch.float32),
        position_ids=batch.position_ids,
    )
    with torch.no_grad():
        logits = model(**kwargs).logits
        hidden = model.model(**kwargs).last_hidden_state  # (B, L, H)
        from_logits = response_logliks(logits, batch)
        from_hidden = response_logliks(hidden, batch, head=model.lm_head, chunk_rows=4)
    torch.testing.assert_close(from_hidden, from_logits, atol=1e-5, rtol=0)


def test_sequence_logliks_sum_and_mean_by_hand():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0], [0.0, 0.0]])  # (N=3, V=2)
    targets = torch.tensor([0, 0, 1])
    segment = torch.tensor([0, 0, 1])
    first = math.log(0.5) + math.log(0.75)  # p = 1/2, then 3/4
    summed = sequence_logliks(logits, targets, segment, 3, normalize="sum")
    mean = sequence_logliks(logits, targets, segment, 3, normalize="mean")
    assert summed.dtype == torch.float32
    assert summed.tolist() == pytest.approx([first, math.log(0.5), 0.0])
    assert mean.tolist() == pytest.approx([first / 2, math.log(0.5), 0.0])  # empty -> 0
    with pytest.raises(ValueError):
        sequence_logliks(logits, targets, segment, 3, normalize="max")


def test_chunked_logliks_match_in_value_and_gradient():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(11, 7, generator=g, dtype=torch.bfloat16)
    targets = torch.randint(0, 7, (11,), generator=g)
    segment = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3])
    grads, values = [], []
    for chunk in (1024, 3):
        x = logits.clone().requires_grad_(True)
        out = sequence_logliks(x, targets, segment, 4, chunk_rows=chunk)
        out.sum().backward()
        values.append(out.detach())
        grads.append(x.grad)
    torch.testing.assert_close(values[0], values[1], atol=0, rtol=0)
    torch.testing.assert_close(grads[0], grads[1], atol=0, rtol=0)


def test_cii_loss_by_hand():
    scores = torch.tensor([[2.0, 1.0, 0.0]])
    expected = -math.log(math.e**2 / (math.e**2 + math.e + 1.0))
    assert expected == pytest.approx(0.4076, abs=1e-4)
    assert cii_loss(scores, torch.ones(1, 3, dtype=torch.bool))["cii"].item() == pytest.approx(
        expected
    )
    halved = -math.log(math.e / (math.e + math.e**0.5 + 1.0))  # temperature 2
    loss = cii_loss(scores, torch.ones(1, 3, dtype=torch.bool), temperature=2.0)["cii"]
    assert loss.item() == pytest.approx(halved)


def test_cii_loss_ignores_masked_columns_and_single_candidate_rows():
    scores = torch.tensor([[2.0, 1.0, 0.0], [5.0, 9.0, 9.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    masked = -math.log(math.e**2 / (math.e**2 + math.e))  # column 2 left out; row 1 adds nothing
    assert cii_loss(scores, mask)["cii"].item() == pytest.approx(masked)


def test_cii_loss_with_nothing_to_rank_is_zero_and_connected():
    scores = torch.tensor([[3.0, 1.0], [2.0, 4.0]], requires_grad=True)
    mask = torch.tensor([[True, False], [True, False]])
    loss = cii_loss(scores, mask)["cii"]
    assert loss.item() == 0.0
    loss.backward()
    assert scores.grad is not None and torch.equal(scores.grad, torch.zeros(2, 2))


def test_uniconv_total_weights_only_cii():
    parts = {"contrastive": torch.tensor(1.0), "generation": torch.tensor(2.0)}
    assert uniconv_total(parts, alpha=0.5).item() == pytest.approx(3.0)
    parts["cii"] = torch.tensor(3.0)
    assert uniconv_total(parts, alpha=0.5).item() == pytest.approx(4.5)
    with pytest.raises(ValueError):
        uniconv_total({}, alpha=1.0)


def test_grounded_lm_loss_by_hand():
    ref = torch.tensor([-0.5, -2.0, -9.0], requires_grad=True)  # token-mean log-likelihoods
    valid = torch.tensor([True, True, False])  # row 2 has no reference
    loss = grounded_lm_loss(ref, valid)["grounded"]
    assert loss.item() == pytest.approx(1.25)  # (0.5 + 2.0) / 2
    loss.backward()
    assert ref.grad.tolist() == [-0.5, -0.5, 0.0]
    none = grounded_lm_loss(ref.detach(), torch.zeros(3, dtype=torch.bool))["grounded"]
    assert none.item() == 0.0
    with pytest.raises(ValueError, match="must both be"):
        grounded_lm_loss(torch.zeros(2, 2), torch.ones(2, 2, dtype=torch.bool))


# ------------------------------------------------------------------ the CII grounded contexts
def _collator(max_context_tokens: int):
    """A UniConv collator over the test tokenizer (no model: only the CII inputs are built)."""
    from conftest import build_tokenizer

    from chatretriever.config import LossConfig
    from chatretriever.methods.uniconv.train import UniConvCollator, UniConvSettings
    from chatretriever.modeling.template import RetrievalTemplate, add_emb_tokens

    tok = build_tokenizer()
    add_emb_tokens(tok, 3)
    settings = UniConvSettings(cii_negatives=1, max_context_tokens=max_context_tokens)
    return UniConvCollator(RetrievalTemplate(tok, 3), tok, LossConfig(), settings, pad_id=0)


def _examples(n_exchanges: int):
    from chatretriever.io.training import example_from_dict

    history = []
    for i in range(n_exchanges):
        history += [
            {"role": "user", "content": f"OLDQ {i}: and the part {i}?"},
            {"role": "assistant", "content": "The device has many features. " * 3},
        ]
    return [
        example_from_dict(
            {
                "id": f"ex{j}",
                "messages": [*history, {"role": "user", "content": f"LASTQ {j}: the warranty?"}],
                "positives": [{"title": "Warranty", "text": "two years, parts and labour " * 8}],
                "target": f"Two years ({j}).",
            }
        )
        for j in range(2)
    ]


def _context(collator, examples) -> list[int]:
    """The context ids of the first CII row (before its first candidate response)."""
    positives = [ex.positives[0] for ex in examples]
    cii = collator.cii_inputs(examples, positives, list(range(len(examples))))["cii"]
    first = int(cii.pred_pos[cii.pred_rows == 0].min())  # the last context position
    return cii.input_ids[0, : first + 1].tolist()


def test_cii_context_keeps_system_instruction():
    from chatretriever.modeling.grounded import GROUNDED_SYSTEM

    collator = _collator(max_context_tokens=700)
    examples = _examples(n_exchanges=10)  # 1369 tokens
    ids = _context(collator, examples)
    text = collator.tokenizer.decode(ids)
    assert len(ids) <= 700
    assert text.startswith(f"<|im_start|>system\n{GROUNDED_SYSTEM}<|im_end|>\n<|im_start|>user\n")
    assert text.endswith("Question: LASTQ 0: the warranty?<|im_end|>\n<|im_start|>assistant\n")
    assert "[1] Warranty: two years" in text and "OLDQ 9" in text and "OLDQ 0" not in text
    assert collator.fitter.counts.prompts_cut == 2


def test_cii_contexts_that_fit_are_unchanged():
    """The shipped uniconv-smol was trained on contexts that fit whole: they are the same ids."""
    from chatretriever.modeling.grounded import grounded_messages
    from chatretriever.types import Passage

    collator = _collator(max_context_tokens=100_000)
    examples = _examples(n_exchanges=2)
    p = examples[0].positives[0]
    prompt = grounded_messages(list(examples[0].messages), [Passage("x", p.text, p.title)], 800)
    tok = collator.tokenizer
    text = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    assert _context(collator, examples) == tok(text, add_special_tokens=False)["input_ids"]
    assert collator.fitter.counts.prompts_cut == 0
