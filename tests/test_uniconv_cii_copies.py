"""L_CII never scores a copy of an example's own reference as one of its incorrect responses."""

from __future__ import annotations

import pytest
import torch
from test_uniconv import _model, _rows

from chatretriever.io.training import example_from_dict
from chatretriever.methods.uniconv.train import UniConvSettings, make_collator, uniconv_losses


def _examples(targets):
    rows = _rows()[: len(targets)]
    return [example_from_dict({**r, "target": t}) for r, t in zip(rows, targets, strict=True)]


def _candidates(tokenizer, cii, i: int) -> list[str]:
    """The decoded candidate responses of packed row i, in slot order."""
    k = cii.n_candidates
    texts = []
    for j in range(k):
        sel = (cii.pred_rows == i) & (cii.segment == i * k + j)
        texts.append(tokenizer.decode(cii.targets[sel].tolist()))
    return texts


def test_a_copy_of_the_reference_is_not_an_incorrect_response(tmp_path, tiny_llama_dir):
    model, cfg = _model(tmp_path, tiny_llama_dir)  # cii_negatives 2
    tok = model.tokenizer
    examples = _examples(["yes", "open settings", " yes ", "no"])
    batch = make_collator(model, cfg.loss, cfg.uniconv)(examples)
    cii = batch["cii"]
    eos = tok.decode([tok.eos_token_id])
    rows = [_candidates(tok, cii, i) for i in range(4)]
    # row 0 ("yes"): the next two OTHER responses, skipping example 2's " yes "
    assert rows[0] == [f"yes{eos}", f"open settings{eos}", f"no{eos}"]
    assert rows[2] == [f" yes {eos}", f"no{eos}", f"open settings{eos}"]
    for i, texts in enumerate(rows):
        ref = texts[0].removesuffix(eos).strip()
        assert all(t.removesuffix(eos).strip() != ref for t in texts[1:]), i
    # a batch whose references are all one answer has nothing to contrast: L_CII adds 0
    same = make_collator(model, cfg.loss, cfg.uniconv)(_examples(["yes", "yes", "yes "]))
    assert same["cii"].n_candidates == 1
    with torch.no_grad():
        parts = uniconv_losses(model, same, cfg.loss, cfg.uniconv)
    assert parts["cii"].item() == 0.0


def test_embedding_cii_leaves_copies_out_of_the_softmax(tmp_path, tiny_llama_dir):
    model, cfg = _model(tmp_path, tiny_llama_dir)
    settings = UniConvSettings(**{**cfg.uniconv.__dict__, "cii_score": "embedding"})
    batch = make_collator(model, cfg.loss, settings)(_examples(["yes", "no", "yes"]))
    assert batch["cii"]["exclude"].tolist() == [
        [False, False, True], [False, False, False], [True, False, False]
    ]  # fmt: skip
    with torch.no_grad():
        parts = uniconv_losses(model, batch, cfg.loss, settings)
        ctx = model.embed(batch["cii"]["contexts"])
        resp = model.embed(batch["cii"]["responses"])
    scores = (ctx @ resp.T).float() / cfg.loss.temperature  # (3, 3)
    scores[0, 2] = scores[2, 0] = float("-inf")
    expected = -torch.log_softmax(scores, -1).diagonal().mean()
    assert parts["cii"].item() == pytest.approx(settings.alpha * expected.item(), rel=1e-4)
