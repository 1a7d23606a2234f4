"""The Rabtriever predictor's training: the `rank` part by hand, query groups and their padding,
the validation split by dialog, top-1 agreement, keeping the best state on validation, dropout,
and the new recipe fields."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from chatretriever.cli import main
from chatretriever.methods.rationale.distill import (
    DistillFeatures,
    Predictor,
    PredictorConfig,
    RabtrieverEncoder,
    load_predictor,
    option_margin,
    rank_loss,
    save_predictor,
)
from chatretriever.methods.rationale.distill_recipe import DistillConfig
from chatretriever.methods.rationale.distill_train import (
    QueryGroups,
    Validation,
    collate_groups,
    distill_loss_fn,
    query_groups,
    renumber,
    split_groups,
    subset,
    top1_agreement,
    train_predictor,
)
from chatretriever.methods.rationale.pairs import ChoicePair
from chatretriever.methods.rationale.reranker import BinaryChoiceReranker
from chatretriever.types import Session, Turn


def test_option_margin_is_the_log_odds_of_yes():
    logits = torch.tensor([[2.0, -1.0], [0.0, 30.0]])
    torch.testing.assert_close(option_margin(logits), torch.tensor([3.0, -30.0]))
    # the same order as log P(yes), which saturates to exactly 0 in float32 where this does not
    saturated = torch.tensor([[40.0, 0.0], [60.0, 0.0]])
    assert torch.log_softmax(saturated, -1)[:, 0].tolist() == [0.0, 0.0]
    assert option_margin(saturated).tolist() == [40.0, 60.0]


def test_rank_loss_by_hand():
    # query 1: student (1, 2, 6) centred (-2, -1, 3); teacher (0, 0, 3) centred (-1, -1, 2)
    #          squared differences (1, 0, 1) -> mean 2/3
    # query 2: two candidates, the second padding: one real candidate -> left out
    # query 3: student (5, 5) centred (0, 0); teacher (1, 3) centred (-1, 1) -> mean 1
    student = torch.tensor([[1.0, 2.0, 6.0], [4.0, 9.0, 0.0], [5.0, 5.0, 7.0]])
    teacher = torch.tensor([[0.0, 0.0, 3.0], [1.0, 0.0, 0.0], [1.0, 3.0, -9.0]])
    mask = torch.tensor([[True, True, True], [True, False, False], [True, True, False]])
    assert rank_loss(student, teacher, mask).item() == pytest.approx((2 / 3 + 1) / 2)
    # a shift of a query's scores changes nothing: only the differences count
    shifted = student + torch.tensor([[10.0], [-3.0], [100.0]])
    assert rank_loss(shifted, teacher, mask).item() == pytest.approx((2 / 3 + 1) / 2)
    one_each = torch.tensor([[True, False, False]] * 3)
    loss = rank_loss(student.requires_grad_(), teacher, one_each)
    assert loss.item() == 0.0
    loss.backward()  # still a graph: a batch of single candidates trains the other parts


def _features(n: int, hidden: int = 4, seed: int = 0) -> DistillFeatures:
    g = torch.Generator().manual_seed(seed)
    return DistillFeatures(
        query=torch.randn(n, hidden, generator=g),
        document=torch.randn(n, hidden, generator=g),
        teacher=torch.randn(n, hidden, generator=g),
        teacher_logits=torch.randn(n, 2, generator=g),
    )


def test_query_groups_collate_to_padded_batches_with_a_mask():
    f = _features(5)
    data = QueryGroups(f, [[0, 1, 2], [3, 4]])
    batch = collate_groups([data[0], data[1]])
    assert batch["document"].shape == (2, 3, 4) and batch["teacher_logits"].shape == (2, 3, 2)
    assert batch["mask"].tolist() == [[True, True, True], [True, True, False]]
    torch.testing.assert_close(batch["query"], f.query[[0, 3]])  # the group's first row
    torch.testing.assert_close(batch["teacher"][1, :2], f.teacher[[3, 4]])
    assert batch["teacher"][1, 2].abs().sum() == 0
    with pytest.raises(ValueError, match="at least one pair"):
        QueryGroups(f, [[0], []])


@pytest.fixture
def encoder(tiny_llama_dir):
    r = BinaryChoiceReranker.from_pretrained(tiny_llama_dir, device="cpu")
    return RabtrieverEncoder(r.model, r.prompt, batch_size=2)


def test_loss_fn_reads_every_candidate_and_adds_rank_only_when_weighted(encoder):
    f = _features(5, hidden=32)
    data = QueryGroups(f, [[0, 1, 2], [3, 4]])
    batch = collate_groups([data[0], data[1]])
    torch.manual_seed(0)
    predictor = Predictor(PredictorConfig(hidden=32))
    plain = distill_loss_fn(encoder, kl_weight=1.0)(predictor, batch)
    assert set(plain) == {"mse", "reverse_kl"}
    queries = f.query[[0, 0, 0, 3, 3]]  # each pair's query state
    predicted = predictor(queries, f.document)  # (5, 32)
    torch.testing.assert_close(plain["mse"], ((predicted - f.teacher) ** 2).mean())
    ranked = distill_loss_fn(encoder, kl_weight=1.0, rank_weight=0.5)(predictor, batch)
    s = option_margin(encoder.lm_head_options(predicted))
    t = option_margin(f.teacher_logits)
    by_hand = (
        0.5
        * (
            ((s[:3] - s[:3].mean() - (t[:3] - t[:3].mean())) ** 2).mean()
            + ((s[3:] - s[3:].mean() - (t[3:] - t[3:].mean())) ** 2).mean()
        )
        / 2
    )
    torch.testing.assert_close(ranked["rank"], by_hand)


def test_top1_agreement_shares_ties():
    teacher = torch.tensor([0.0, 1.0, 0.0, 2.0, 1.0])
    groups = [[0, 1], [2, 3, 4]]
    assert top1_agreement(torch.tensor([0.0, 5.0, 1.0, 9.0, 0.0]), teacher, groups) == 1.0
    assert top1_agreement(torch.tensor([5.0, 0.0, 1.0, 9.0, 0.0]), teacher, groups) == 0.5
    constant = torch.zeros(5)
    assert top1_agreement(constant, teacher, groups) == pytest.approx((1 / 2 + 1 / 3) / 2)


TURN = (Turn("user", "x"),)


def _pairs(dialogs: int, turns: int, candidates: int) -> list[ChoicePair]:
    return [
        ChoicePair(f"doc{c}", Session(f"d{d}_{t}", TURN, metadata={"dialog": f"d{d}"}), c == 0)
        for d in range(dialogs) for t in range(turns) for c in range(candidates)
    ]  # fmt: skip


def test_split_groups_holds_out_whole_dialogs_deterministically():
    pairs = _pairs(40, 3, 2)
    groups = query_groups(pairs)
    assert len(groups) == 120 and groups[0] == [0, 1] and groups[1] == [2, 3]
    train, val = split_groups(pairs, groups, 0.25)
    dialog = lambda g: pairs[g[0]].session.metadata["dialog"]  # noqa: E731
    assert {dialog(g) for g in train}.isdisjoint({dialog(g) for g in val})
    assert sorted(map(tuple, train + val)) == sorted(map(tuple, groups))
    assert 10 <= len(val) // 3 * 4 <= 90  # about a quarter of 40 dialogs, whole
    # order-free: reversed input, the same dialogs held out
    flipped = split_groups(pairs, groups[::-1], 0.25)[1]
    assert {dialog(g) for g in flipped} == {dialog(g) for g in val}
    assert split_groups(pairs, groups, 0.0) == (groups, [])
    with pytest.raises(ValueError, match="leaves a side empty"):
        split_groups(_pairs(1, 3, 2), query_groups(_pairs(1, 3, 2)), 0.5)


def test_subset_and_renumber_keep_groups_aligned():
    f = _features(6)
    groups = [[4, 5], [0]]
    part = subset(f, groups)
    torch.testing.assert_close(part.teacher, f.teacher[[4, 5, 0]])
    assert renumber(groups) == [[0, 1], [2]]


def test_training_keeps_the_best_validation_state(encoder, tmp_path):
    f = _features(24, hidden=32, seed=1)
    groups = [list(range(i, i + 4)) for i in range(0, 24, 4)]
    val = Validation(subset(f, groups[4:]), renumber(groups[4:]), every=2)
    training = {"max_steps": 7, "per_device_train_batch_size": 2, "logging_steps": 1,
                "learning_rate": 0.05}  # fmt: skip
    trained = train_predictor(encoder, subset(f, groups[:4]), tmp_path / "p",
                              PredictorConfig(hidden=32), 1.0, training, renumber(groups[:4]),
                              rank_weight=1.0, validation=val)  # fmt: skip
    log = [json.loads(x) for x in (tmp_path / "p" / "train_log.jsonl").read_text().splitlines()]
    checks = [row for row in log if "val_agreement" in row]
    assert [row["step"] for row in checks] == [2, 4, 6, 7]  # every 2 steps and the end
    best = [row for row in log if "best_step" in row][-1]
    top = max(row["val_agreement"] for row in checks)
    first_top = next(row["step"] for row in checks if row["val_agreement"] == top)
    assert best["best_step"] == first_top and best["best_val_agreement"] == top
    assert any("loss_rank" in row for row in log)
    # the kept (and saved) state scores the logged best agreement
    with torch.no_grad():
        s = option_margin(
            encoder.lm_head_options(trained(val.features.query, val.features.document))
        )
    teacher = option_margin(val.features.teacher_logits)
    assert top1_agreement(s, teacher, val.groups) == pytest.approx(top, abs=1e-6)
    loaded = load_predictor(tmp_path / "p")
    for k, v in trained.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v)


def test_predictor_dropout_trains_only_and_old_configs_load(tmp_path):
    p = Predictor(PredictorConfig(hidden=4, dropout=0.5))
    assert [type(m).__name__ for m in p.mlp] == ["Dropout", "Linear", "GELU", "Dropout", "Linear"]
    q, d = torch.randn(3, 4), torch.randn(3, 4)
    p.eval()
    torch.testing.assert_close(p(q, d), p(q, d))
    with pytest.raises(ValueError, match="dropout"):
        PredictorConfig(hidden=4, dropout=1.0)
    save_predictor(Predictor(PredictorConfig(hidden=4)), tmp_path)
    config = json.loads((tmp_path / "predictor.json").read_text())
    config.pop("dropout")  # a predictor saved before dropout existed
    (tmp_path / "predictor.json").write_text(json.dumps(config))
    assert load_predictor(tmp_path).config.dropout == 0.0


DATA = {"data": {"files": [{"path": "pairs.jsonl"}]}}


def test_recipe_fields_are_checked(tmp_path, capsys):
    config = DistillConfig.from_dict({**DATA, "rank_weight": 2, "validation": 0.1, "eval_steps": 5,
                                      "predictor": {"dropout": 0.1}})  # fmt: skip
    assert config.predictor.config(8).dropout == 0.1
    assert config.training["per_device_train_batch_size"] == 64  # queries per batch
    for raw, message in [({"rank_weight": -1}, "rank_weight must be a number >= 0"),
                         ({"validation": 1.0}, "validation must be a fraction"),
                         ({"eval_steps": 0}, "eval_steps must be a positive integer"),
                         ({"predictor": {"dropout": 2}}, "dropout must be in")]:  # fmt: skip
        with pytest.raises(ValueError, match=message):
            DistillConfig.from_dict({**DATA, **raw})
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({**DATA, "validation": 0.2}))
    assert main(["rerank-distill", str(recipe), "--set", "validation=2"]) == 2
    assert "validation must be a fraction" in capsys.readouterr().err


def test_refused_training_settings_fail_before_the_teacher_loads(tmp_path, monkeypatch, capsys):
    """A combination TrainingArguments refuses (a plateau schedule without evaluation) stops
    `rerank-distill` before the teacher loads and scores every pair."""
    from chatretriever.methods.rationale import distill_recipe

    def no_teacher(*args, **kwargs):
        raise AssertionError("the teacher loaded before the training arguments were checked")

    monkeypatch.setattr(distill_recipe, "teacher_encoder", no_teacher)
    from chatretriever.methods.rationale.pairs import write_pairs

    write_pairs(tmp_path / "pairs.jsonl", _pairs(2, 1, 2))
    recipe = tmp_path / "r.yaml"
    data = {"files": [{"path": str(tmp_path / "pairs.jsonl")}]}
    recipe.write_text(yaml.safe_dump({"data": data, "output_dir": str(tmp_path / "out")}))
    argv = [
        "rerank-distill",
        str(recipe),
        "--set",
        "training.lr_scheduler_type=reduce_lr_on_plateau",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "requires an eval strategy" in err and "teacher loaded" not in err
