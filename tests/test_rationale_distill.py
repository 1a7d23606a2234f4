"""Rabtriever distillation: both losses by hand, the predictor, the frozen LLM's readings."""

from __future__ import annotations

import json
import math

import pytest
import torch

from chatretriever.methods.rationale.distill import (
    Predictor,
    PredictorConfig,
    RabtrieverEncoder,
    distill_features,
    distill_losses,
    load_predictor,
    mse_loss,
    reverse_kl,
    student_scores,
    train_predictor,
)
from chatretriever.methods.rationale.reranker import BinaryChoiceReranker
from chatretriever.types import Session, Turn

SESSIONS = [
    Session("a", (Turn("user", "i am sad"),)),
    Session("b", (Turn("user", "hi"), Turn("assistant", "hello"), Turn("user", "help me"))),
]
DOCS = ["ask a question", "give some advice about it"]


def test_mse_by_hand():
    predicted = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    teacher = torch.tensor([[0.0, 0.0], [1.0, -1.0]])
    assert mse_loss(predicted, teacher).item() == pytest.approx((1 + 4 + 1 + 1) / 4)


def test_reverse_kl_by_hand():
    # row 1: student (0.5, 0.5), teacher softmax(log 3, 0) = (0.75, 0.25)
    student = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    teacher = torch.tensor([[math.log(3.0), 0.0], [2.0, 2.0]])
    row1 = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert reverse_kl(student, teacher).item() == pytest.approx(row1 / 2)  # row 2: equal, 0
    # reverse, not forward: KL(t || s) of row 1 differs
    forward = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert row1 != pytest.approx(forward)
    parts = distill_losses(student, student, student, teacher, kl_weight=0.5)
    assert set(parts) == {"mse", "reverse_kl"}
    assert parts["mse"].item() == 0.0
    assert parts["reverse_kl"].item() == pytest.approx(0.5 * row1 / 2)


def test_predictor_shapes_and_residual():
    torch.manual_seed(0)
    p = Predictor(PredictorConfig(hidden=4))
    assert [type(m).__name__ for m in p.mlp] == ["Linear", "GELU", "Linear"]
    assert p.mlp[0].in_features == 8 and p.mlp[0].out_features == 8 and p.mlp[2].out_features == 4
    q, d = torch.randn(3, 4), torch.randn(3, 4)
    torch.nn.init.zeros_(p.mlp[2].weight)
    torch.nn.init.zeros_(p.mlp[2].bias)
    torch.testing.assert_close(p(q, d), q)  # a zero MLP leaves the query state
    one = Predictor(PredictorConfig(hidden=4, layers=1, residual=False))
    assert [type(m).__name__ for m in one.mlp] == ["Linear"]
    with pytest.raises(ValueError, match="layers"):
        PredictorConfig(hidden=4, layers=0)


@pytest.fixture
def encoder(tiny_llama_dir):
    r = BinaryChoiceReranker.from_pretrained(tiny_llama_dir, device="cpu")
    return r, RabtrieverEncoder(r.model, r.prompt, batch_size=2)


def test_teacher_state_gives_the_rerankers_scores(encoder):
    reranker, enc = encoder
    states = enc.teacher_states(DOCS, SESSIONS)  # (2, 32)
    assert states.shape == (2, 32)
    from_states = torch.log_softmax(enc.lm_head_options(states), dim=-1)[:, 0]
    torch.testing.assert_close(
        from_states, torch.from_numpy(reranker.score_pairs(DOCS, SESSIONS)), atol=1e-4, rtol=0
    )
    # the student's readings never see the other side
    q = enc.query_states(SESSIONS)
    assert q.shape == (2, 32) and not torch.allclose(q, states)
    torch.testing.assert_close(enc.query_states(SESSIONS[:1]), q[:1], atol=1e-5, rtol=0)


def test_train_predictor_smoke(encoder, tmp_path):
    _, enc = encoder
    features = distill_features(enc, DOCS * 2, SESSIONS * 2)
    assert features.teacher_logits.shape == (4, 2)
    torch.manual_seed(0)
    config = PredictorConfig(hidden=32)
    before = Predictor(config).state_dict()
    torch.manual_seed(0)
    training = {"max_steps": 3, "per_device_train_batch_size": 2, "logging_steps": 1,
                "save_strategy": "no", "warmup_steps": 0}  # fmt: skip
    trained = train_predictor(enc, features, tmp_path / "p", config, 0.5, training)
    after = trained.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    for p in enc.model.parameters():
        assert not p.requires_grad  # the LLM stays frozen
    logs = [
        json.loads(line) for line in (tmp_path / "p" / "train_log.jsonl").read_text().splitlines()
    ]
    parts = [(row["loss_mse"], row["loss_reverse_kl"]) for row in logs if "loss_mse" in row]
    assert len(parts) == 3 and all(math.isfinite(a) and math.isfinite(b) for a, b in parts)
    loaded = load_predictor(tmp_path / "p")
    torch.testing.assert_close(
        loaded(features.query, features.document), trained(features.query, features.document)
    )
    scores = student_scores(enc, trained, features.query[0], features.document)
    assert scores.shape == (4,) and torch.isfinite(scores).all() and (scores <= 0).all()
