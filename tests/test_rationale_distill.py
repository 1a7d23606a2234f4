"""Rabtriever distillation: both losses by hand, the predictor, the frozen LLM's readings, the
`rerank-distill` recipe and command (features cached), and the saved student reloaded."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from transformers import set_seed

from chatretriever.cli import main
from chatretriever.methods.rationale import distill_recipe
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
)
from chatretriever.methods.rationale.distill_recipe import spread_pairs
from chatretriever.methods.rationale.distill_train import train_predictor
from chatretriever.methods.rationale.pairs import ChoicePair, choice_pairs, write_pairs
from chatretriever.methods.rationale.reranker import BinaryChoiceReranker
from chatretriever.methods.rationale.student import RabtrieverStudent
from chatretriever.types import Passage, Session, Turn

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
    config = PredictorConfig(hidden=32)
    set_seed(42)  # train_predictor seeds the initialisation with the training seed
    before = Predictor(config).state_dict()
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


def test_states_read_each_distinct_sequence_once_in_input_order(encoder):
    _, enc = encoder
    calls = []
    hook = enc.model.register_forward_hook(lambda _m, a, kw, _o: calls.append(kw), with_kwargs=True)
    repeated = enc.query_states([SESSIONS[1], SESSIONS[0], SESSIONS[1]])  # (3, 32)
    hook.remove()
    assert sum(kw["input_ids"].shape[0] for kw in calls) == 2  # the repeat is not re-read
    single = enc.query_states(SESSIONS)  # (2, 32)
    torch.testing.assert_close(repeated, single[[1, 0, 1]], atol=1e-5, rtol=0)


def test_spread_pairs_keeps_whole_sessions_evenly_spaced():
    pairs = [ChoicePair(f"d{j}", Session(f"s{i}", (Turn("user", "x"),)), j == 0)
             for i in range(6) for j in range(3)]  # fmt: skip
    picked = spread_pairs(pairs, 7)  # 7 pairs at 3 per session: 2 sessions, spread
    assert [(p.session.id, p.relevant) for p in picked] == [
        ("s0", True), ("s0", False), ("s0", False), ("s3", True), ("s3", False), ("s3", False),
    ]  # fmt: skip
    assert spread_pairs(pairs, 100) == pairs
    assert len(spread_pairs(pairs, 2)) == 2


def _adapter(model_dir, out):
    """A LoRA adapter with non-zero B matrices (it changes the LLM's states)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    peft = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    for name, param in peft.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)
    peft.save_pretrained(out)
    return out


@pytest.fixture
def recipe(tmp_path, tiny_llama_dir):
    passages = [Passage("q", "ask a question"), Passage("r", "mirror feelings"),
                Passage("s", "give advice")]  # fmt: skip
    write_pairs(tmp_path / "pairs.jsonl", choice_pairs(SESSIONS, passages, {"a": "r", "b": "s"}, 2))
    raw = {
        "model": str(tiny_llama_dir),
        "adapter": str(_adapter(tiny_llama_dir, tmp_path / "adapter")),
        "output_dir": str(tmp_path / "student"),
        "max_document_tokens": 16,
        "max_query_tokens": 48,
        "batch_size": 2,
        "data": {"files": [{"path": str(tmp_path / "pairs.jsonl")}]},
        "predictor": {"inner": 16},
        "training": {"max_steps": 3, "per_device_train_batch_size": 2, "logging_steps": 1},
    }
    (tmp_path / "distill.yaml").write_text(yaml.safe_dump(raw))
    return tmp_path / "distill.yaml"


def test_distill_dry_run_prints_the_resolved_recipe(recipe, capsys):
    assert main(["rerank-distill", str(recipe), "--dry-run", "--set", "kl_weight=0.25"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["kl_weight"] == 0.25 and printed["predictor"]["inner"] == 16
    assert printed["training"]["max_steps"] == 3  # the recipe's, over the defaults
    assert printed["training"]["learning_rate"] == 1e-3 and printed["wording"] == "ab"
    assert not (recipe.parent / "student").exists()  # nothing ran


def test_distill_bad_recipe_names_the_problem(recipe, tmp_path, capsys):
    cases = [
        (["--set", "predictor.layer=3"], "unknown field(s) ['layer']"),
        (["--set", "training.lr=3"], "training.lr: not a TrainingArguments field"),
        (["--set", "wording=xy"], "wording must be one of"),
        (["--set", "data.limit=0"], "data.limit must be a positive integer"),
        (["--set", "kl_weight=-1"], "kl_weight must be a number >= 0"),
        (["--set", f"data.files=[{{path: {tmp_path}/none.jsonl}}]"], "none.jsonl: file not found"),
        (["--set", f"adapter={tmp_path}"], "field 'adapter': adapter "),
        (["--set", f"adapter={tmp_path}"], "not a LoRA adapter dir (no adapter_config.json)"),
    ]
    for overrides, message in cases:
        assert main(["rerank-distill", str(recipe), *overrides]) == 2, overrides
        err = capsys.readouterr().err
        assert message in err, (overrides, err)
    assert not (tmp_path / "student").exists()


def test_distill_command_caches_features_and_the_student_reloads(
    recipe, tiny_llama_dir, monkeypatch, capsys
):
    computed = []
    real = distill_recipe.distill_features

    def counting(encoder, documents, sessions, show_progress=False):
        computed.append(len(documents))
        return real(encoder, documents, sessions, show_progress)

    monkeypatch.setattr(distill_recipe, "distill_features", counting)
    out = recipe.parent / "student"
    assert main(["rerank-distill", str(recipe)]) == 0
    assert f"saved {out}" in capsys.readouterr().out
    names = {"features.safetensors", "predictor.safetensors", "predictor.json",
             "train_config.yaml", "train_log.jsonl"}  # fmt: skip
    assert names <= {p.name for p in out.iterdir()}
    assert computed == [6]
    features_mtime = (out / "features.safetensors").stat().st_mtime_ns
    first = load_predictor(out).state_dict()
    # the same recipe: the features are read back, and training (seeded) gives the same predictor
    assert main(["rerank-distill", str(recipe)]) == 0
    assert computed == [6]
    assert (out / "features.safetensors").stat().st_mtime_ns == features_mtime
    second = load_predictor(out).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    # other data: recomputed (whole sessions: 3 pairs of one session)
    assert main(["rerank-distill", str(recipe), "--set", "data.limit=4"]) == 0
    assert computed == [6, 3]
    saved = yaml.safe_load((out / "train_config.yaml").read_text())
    assert saved["data"]["limit"] == 4 and saved["adapter"].endswith("adapter")
    logs = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert sum("loss_mse" in row for row in logs) == 3

    student = RabtrieverStudent.from_pretrained(out, device="cpu")
    tuned = BinaryChoiceReranker.from_pretrained(
        tiny_llama_dir, adapter=recipe.parent / "adapter", device="cpu",
        max_document_tokens=16, max_query_tokens=48,
    )  # fmt: skip
    enc = RabtrieverEncoder(tuned.model, tuned.prompt)
    docs = DOCS + ["share a story", "reflect the feeling back"]
    d = student.document_states(docs)  # (4, 32)
    torch.testing.assert_close(d, enc.document_states(docs), atol=1e-5, rtol=0)
    plain = BinaryChoiceReranker.from_pretrained(tiny_llama_dir, device="cpu",
                                                 max_document_tokens=16)  # fmt: skip
    assert not torch.allclose(d, RabtrieverEncoder(plain.model, plain.prompt).document_states(docs))
    q = student.query_states(SESSIONS)  # (2, 32)
    predictor = load_predictor(out)
    expected = torch.stack([student_scores(enc, predictor, q[i], d) for i in range(2)])  # (2, 4)
    torch.testing.assert_close(student.score(q, d), expected, atol=1e-5, rtol=0)
    for chunk in (1, 3, 5):  # documents split across calls, one query per call, queries grouped
        small = RabtrieverStudent(student.encoder, student.predictor, chunk=chunk)
        torch.testing.assert_close(small.score(q, d), expected, atol=1e-5, rtol=0)


def test_student_from_a_dir_that_is_not_one(tmp_path):
    with pytest.raises(ValueError, match="train_config.yaml: not found"):
        RabtrieverStudent.from_pretrained(tmp_path)


def test_distill_command_with_validation_and_rank(recipe):
    # sessions "a" and "b" are their own dialogs; sha1("a") falls at 0.53, sha1("b") at 0.91
    out = recipe.parent / "student"
    args = ["--set", "validation=0.6", "--set", "rank_weight=1", "--set", "eval_steps=1"]
    assert main(["rerank-distill", str(recipe), *args]) == 0
    logs = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in logs if "val_agreement" in row] == [1, 2, 3]
    assert any("loss_rank" in row for row in logs) and any("best_step" in row for row in logs)
    saved = yaml.safe_load((out / "train_config.yaml").read_text())
    assert saved["validation"] == 0.6 and saved["rank_weight"] == 1
    assert main(["rerank-distill", str(recipe), "--set", "validation=0.1"]) == 2  # none held out


def test_benchmark_students_of_one_teacher_share_their_readings(recipe, monkeypatch):
    import shutil

    from test_benchmarks import load_benchmark

    bench = load_benchmark("rationale")
    out = recipe.parent / "student"
    assert main(["rerank-distill", str(recipe)]) == 0
    shutil.copytree(out, recipe.parent / "twin")
    calls = []
    real = RabtrieverEncoder.query_states

    def counting(self, sessions, show_progress=False):
        calls.append(len(sessions))
        return real(self, sessions, show_progress)

    monkeypatch.setattr(RabtrieverEncoder, "query_states", counting)
    docs = [Passage("p1", "ask a question"), Passage("p2", "give advice")]
    readings = {}
    first = bench.student_runs(str(out), "a", SESSIONS, {"t": (docs, 2)}, 2, readings)
    second = bench.student_runs(str(recipe.parent / "twin"), "b", SESSIONS, {"t": (docs, 2)}, 2,
                                readings)  # fmt: skip
    assert calls == [2]  # the twin reused the first student's query states
    assert first["t"][0].scores == second["t"][0].scores  # the same predictor, the same run
    assert first["t"][1]["document_states_s"] == second["t"][1]["document_states_s"]  # reused
