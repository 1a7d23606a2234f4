"""Training: the shared named-loss trainer; CSIT's recipe, collator, trainer steps,
checkpoints and exact resume, DDP. The CSIT loss of a step is checked against one worked out
independently (standalone encodings, the full model's logits, relevance by hand)."""

from __future__ import annotations

import json
import math
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures import write

from chatretriever.cli import main
from chatretriever.errors import DataFormatError
from chatretriever.methods.chatretriever.model import ChatRetriever
from chatretriever.methods.chatretriever.recipe import TrainConfig, load_recipe, run_training
from chatretriever.modeling.trainer import NamedLossTrainer, TrainingSet, training_arguments

X, Y = np.array([[1.0, 2.0], [3.0, -1.0]]), np.array([1.0, 0.0])
W0, LR, DECAY = np.array([0.5, -1.0]), 0.05, 0.1


class _Line(torch.nn.Module):
    """y ~ x @ w, with the TrainableModel protocol: saves and reloads w as JSON."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(W0, dtype=torch.float64))

    def save_pretrained(self, directory) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / "w.json").write_text(json.dumps(self.w.tolist()))

    def load_trainable_state(self, directory) -> None:
        with torch.no_grad():
            w = json.loads((Path(directory) / "w.json").read_text())
            self.w.copy_(torch.tensor(w, dtype=self.w.dtype))


def _two_parts(model, inputs) -> dict[str, torch.Tensor]:
    err = inputs["x"] @ model.w - inputs["y"]
    return {"fit": (err**2).mean(), "l2": DECAY * (model.w**2).sum()}


def _stack(batch: list[dict]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([r[k] for r in batch]) for k in ("x", "y")}


def _line_trainer(out: Path, model: _Line, collator=_stack, **overrides) -> NamedLossTrainer:
    rows = [{"x": torch.tensor(x), "y": torch.tensor(y)} for x, y in zip(X, Y, strict=True)]
    settings = {
        "max_steps": 4,
        "per_device_train_batch_size": 2,  # the whole set: every step sees the same batch
        "learning_rate": LR,
        "optim": "sgd",
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "max_grad_norm": 0.0,
        "logging_steps": 2,
        "save_steps": 2,
        "use_cpu": True,
        **overrides,
    }
    return NamedLossTrainer(
        model=model,
        args=training_arguments(out, settings),
        train_dataset=TrainingSet([(rows, 1)]),
        data_collator=collator,
        loss_fn=_two_parts,
    )


def _hand_sgd(steps: int = 4) -> tuple[list[tuple[float, float]], np.ndarray]:
    """Plain SGD on fit + l2, by hand: the (fit, l2) parts of each step, and the final w."""
    w, parts = W0.copy(), []
    for _ in range(steps):
        err = X @ w - Y
        parts.append((np.mean(err**2), DECAY * np.sum(w**2)))
        w = w - LR * (2 * X.T @ err / len(Y) + 2 * DECAY * w)
    return parts, w


def test_named_loss_trainer_logs_parts_and_descends_their_sum(tmp_path):
    parts, w = _hand_sgd()
    model = _Line()
    trainer = _line_trainer(tmp_path / "run", model)
    trainer.train()
    logged = [r for r in trainer.state.log_history if "loss" in r]
    assert [r["step"] for r in logged] == [2, 4]
    for row, window in zip(logged, (parts[:2], parts[2:]), strict=True):
        fit, l2 = np.mean(window, axis=0)  # each part averaged over its logging window
        assert row["loss_fit"] == pytest.approx(fit, abs=1e-6)
        assert row["loss_l2"] == pytest.approx(l2, abs=1e-6)
        assert row["loss"] == pytest.approx(fit + l2, abs=1e-4)
    np.testing.assert_allclose(model.w.detach().numpy(), w, rtol=1e-12)  # the sum was descended
    # checkpoints go through the model's save_pretrained, resume through load_trainable_state
    saved = json.loads((tmp_path / "run" / "checkpoint-4" / "w.json").read_text())
    np.testing.assert_allclose(saved, w, rtol=1e-12)
    resumed = _Line()
    checkpoint = str(tmp_path / "run" / "checkpoint-2")
    _line_trainer(tmp_path / "run", resumed).train(resume_from_checkpoint=checkpoint)
    np.testing.assert_allclose(resumed.w.detach().numpy(), w, rtol=1e-12)


def test_a_resumed_run_logs_the_losses_of_the_uninterrupted_one(tmp_path):
    """Resumed at a logging step, a run logs the uninterrupted run's losses and parts. Resumed
    inside a logging window, its first log averages only the steps since the resume: the
    Trainer restarts its loss window at the resumed step (`_tr_loss`, `_globalstep_last_logged`
    are set in `_inner_training_loop`, and no checkpoint holds them) and the parts follow it,
    so that each row's parts still sum to its loss."""
    parts, _ = _hand_sgd()
    every_step = {"save_steps": 1, "save_total_limit": None}
    straight = _line_trainer(tmp_path / "run", _Line(), **every_step)
    straight.train()
    keys = ("step", "loss", "loss_fit", "loss_l2", "learning_rate", "grad_norm")
    want = [{k: r[k] for k in keys} for r in straight.state.log_history if "loss" in r]
    assert [r["step"] for r in want] == [2, 4]
    logged = {}
    for step in (2, 3):
        resumed = _line_trainer(tmp_path / "run", _Line(), **every_step)
        resumed.train(resume_from_checkpoint=str(tmp_path / "run" / f"checkpoint-{step}"))
        logged[step] = [{k: r[k] for k in keys} for r in resumed.state.log_history if "loss" in r]
    for got, row in zip(logged[2], want, strict=True):
        assert got == pytest.approx(row, abs=1e-6)
    assert logged[3][0] == pytest.approx(want[0], abs=1e-6)  # logged before checkpoint-3
    fit, l2 = parts[3]  # the step-4 row of a resume at step 3: step 4 alone, not steps 3-4
    assert logged[3][1]["loss_fit"] == pytest.approx(fit, abs=1e-6)
    assert logged[3][1]["loss"] == pytest.approx(fit + l2, abs=1e-4)
    assert want[1]["loss_fit"] == pytest.approx(np.mean([p[0] for p in parts[2:]]), abs=1e-6)


TOPICS = [
    ("volcano", "Volcanoes erupt molten rock called lava from the mantle."),
    ("penguin", "Penguins are flightless birds living in the southern hemisphere."),
    ("violin", "The violin is a string instrument played with a bow."),
    ("glacier", "Glaciers are slow rivers of ice that carve valleys."),
    ("espresso", "Espresso is coffee brewed by forcing hot water through grounds."),
    ("comet", "Comets are icy bodies that grow tails near the sun."),
]


def _examples() -> list[dict]:
    rows = []
    for i, (topic, text) in enumerate(TOPICS):
        negs = [{"text": TOPICS[(i + j) % len(TOPICS)][1]} for j in (1, 2)][: i % 3]
        rows.append(
            {
                "id": f"ex{i}",
                "messages": [
                    {"role": "user", "content": f"tell me about {topic}s"},
                    {"role": "assistant", "content": f"{topic}s are interesting."},
                    {"role": "user", "content": "what are they made of?"},
                ],
                "positives": [{"title": topic, "text": text}],
                "negatives": negs,
                "target": f"They are {topic} things.",
            }
        )
    return rows


def _recipe(
    tmp_path: Path,
    model_dir: Path,
    rows: list[dict] | None = None,
    repeat: int = 2,
    loss: dict | None = None,
    **training,
) -> Path:
    rows = _examples() if rows is None else rows
    data = write(tmp_path / "train.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n")
    settings = {
        "max_steps": 2,
        "per_device_train_batch_size": 3,
        "learning_rate": 5e-3,
        "warmup_steps": 0,
        "save_steps": 2,
        "logging_steps": 1,
        "use_cpu": True,
        "dataloader_num_workers": 0,
        **training,
    }
    settings = {k: v for k, v in settings.items() if v is not None}  # None: leave it out
    recipe = {
        "model": str(model_dir),
        "output_dir": str(tmp_path / "run"),
        "retriever": {"max_session_len": 64, "max_passage_len": 32, "max_response_len": 24},
        "loss": {"alpha": 0.3, "temperature": 0.05, "n_hard_negatives": 2, **(loss or {})},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"files": [{"path": str(data), "repeat": repeat}]},
        "training": settings,
    }
    import yaml

    return write(tmp_path / "recipe.yaml", yaml.safe_dump(recipe))


def _trainable(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


def test_recipe_overrides_and_errors(tmp_path, tiny_llama_dir):
    path = _recipe(tmp_path, tiny_llama_dir)
    cfg = load_recipe(path, ["loss.alpha=0", "retriever.n_emb_tokens=1", "data.query=last_turn"])
    assert isinstance(cfg, TrainConfig)
    assert (cfg.loss.alpha, cfg.retriever.n_emb_tokens, cfg.data.query) == (0, 1, "last_turn")
    assert cfg.retriever.base_model == str(tiny_llama_dir)
    # exponent numbers without a dot are floats (plain PyYAML reads "2e-4" as a string)
    cfg = load_recipe(path, ["training.learning_rate=2e-4", "loss.temperature=1E-2"])
    assert cfg.training["learning_rate"] == pytest.approx(2e-4)
    assert cfg.loss.temperature == pytest.approx(0.01)
    assert load_recipe(path, ["output_dir=2e-4x"]).output_dir == "2e-4x"
    with pytest.raises(DataFormatError, match="recipe.yaml.*LossConfig.*alpah"):
        load_recipe(path, ["loss.alpah=0"])
    with pytest.raises(DataFormatError, match="key=value"):
        load_recipe(path, ["loss.alpha"])
    bad = write(tmp_path / "bad.yaml", "model: x\n  output_dir: [\n")
    with pytest.raises(DataFormatError, match="bad.yaml"):
        load_recipe(bad)
    # values of the wrong type and TrainingArguments typos are named before any model loads
    for override, match in (
        ("loss.alpha=abc", "LossConfig.alpha: expected a number, got 'abc'"),
        ("loss.in_batch=maybe", "LossConfig.in_batch: expected true or false"),
        ("lora.target_modules=q_proj", "target_modules: expected a list of strings"),
        ("training.max_stpes=3", "training.max_stpes: not a TrainingArguments field; did you "
         "mean 'max_steps'"),
        ("training.max_steps=abc", "training.max_steps: expected an integer, got 'abc'"),
        ("training.max_steps=0", r"training.max_steps: expected >= 1 \(or -1"),
        ("training.per_device_train_batch_size=0", "per_device_train_batch_size: expected >= 1"),
        ("retriever.base_model=other-llm", "retriever.base_model .* differs from model"),
    ):  # fmt: skip
        with pytest.raises(DataFormatError, match=match):
            load_recipe(path, [override])


def test_cli_bad_recipe_is_one_line(tmp_path, capsys):
    bad = write(tmp_path / "r.yaml", "model: m\noutput_dir: o\n")
    assert main(["train", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "r.yaml" in err[0] and "data" in err[0]


def test_collator_encodes_only_real_passages(tmp_path, tiny_llama_dir):
    from chatretriever.io.training import example_from_dict
    from chatretriever.methods.chatretriever.recipe import load_recipe
    from chatretriever.methods.chatretriever.train import make_collator

    cfg = load_recipe(_recipe(tmp_path, tiny_llama_dir))
    retriever = ChatRetriever.from_pretrained(
        cfg.model, config=cfg.retriever, lora=cfg.lora, device="cpu"
    )
    collate = make_collator(retriever, cfg.loss, "session")
    examples = [example_from_dict(r) for r in _examples()[:3]]  # 0, 1 and 2 hard negatives
    batch = collate(examples)
    layout = batch["layout"]
    assert layout.valid.tolist() == [[True, False, False], [True, True, False], [True, True, True]]
    # 3 positives + 3 real negatives are encoded: padding slots are not (no re-encoded positive)
    assert batch["passages"]["input_ids"].shape[0] == 6
    assert sorted(layout.rows[layout.valid].tolist()) == list(range(6))
    for i, slot in layout.valid.nonzero().tolist():
        p = ([examples[i].positives[0]] + list(examples[i].negatives))[slot]
        row = layout.rows[i, slot]
        ids = batch["passages"]["input_ids"][row]
        assert ids[batch["passages"]["attention_mask"][row].bool()].tolist() == (
            retriever.template.passage_ids(p.to_dict())
        )
    sessions = batch["sessions"]
    assert sessions["attention_mask"].dim() == 2 and "response_starts" in sessions  # CSIT batch
    # the CSIT sequence ends with the response: its last real token is a trained one
    last = sessions["attention_mask"].sum(dim=1) - 1
    assert (sessions["labels"][torch.arange(3), last] != -100).all()
    last = make_collator(retriever, cfg.loss, "last_turn")([examples[0]])
    assert last["sessions"]["labels"].shape[1] < sessions["labels"].shape[1]  # history dropped


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_two_steps_change_lora_and_emb_rows(tmp_path, arch, tiny_llama_dir, tiny_qwen2_dir):
    model_dir = tiny_llama_dir if arch == "llama" else tiny_qwen2_dir
    cfg = load_recipe(_recipe(tmp_path, model_dir))
    before = ChatRetriever.from_pretrained(
        cfg.model, config=cfg.retriever, lora=cfg.lora, device="cpu"
    )
    emb_ids = list(before.emb_ids)
    emb_before = before._base().get_input_embeddings()(torch.tensor(emb_ids)).detach().clone()
    out = run_training(cfg)
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    steps = [row for row in log if "loss" in row]
    assert len(steps) == 2
    for row in steps:
        assert np.isfinite(row["loss"]) and np.isfinite(row["loss_contrastive"])
        assert np.isfinite(row["loss_session_lm"])
    state = _trainable(out)
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in state.items())  # B starts at 0
    after = ChatRetriever.from_pretrained(out, device="cpu")
    emb_after = after._base().get_input_embeddings()(torch.tensor(emb_ids)).detach()
    assert not torch.allclose(emb_before, emb_after)
    assert (out / "train_config.yaml").is_file()


def test_recipe_continues_from_a_saved_retriever(tmp_path, tiny_llama_dir, capsys):
    first = run_training(load_recipe(_recipe(tmp_path / "a", tiny_llama_dir)))
    saved = _trainable(first)
    # learning rate 0: a run that continues from `first` ends exactly where `first` is (a fresh
    # LoRA would end with B = 0)
    changes = ["retriever.max_session_len=48", "lora.dropout=0.1", "training.learning_rate=0"]
    cfg = load_recipe(_recipe(tmp_path / "b", tiny_llama_dir), [f"model={first}", *changes])
    start = ChatRetriever.from_pretrained(
        cfg.model, config=cfg.retriever, lora=cfg.lora, is_trainable=True, device="cpu"
    )
    assert start.config.max_session_len == 48  # settings the weights do not depend on follow
    assert start.config.base_model == str(tiny_llama_dir.resolve())  # the saved base stays
    assert all(p.requires_grad for n, p in start.named_parameters() if "lora_B" in n)
    dropout = next(m for n, m in start.named_modules() if n.endswith("lora_dropout.default"))
    assert dropout.p == pytest.approx(0.1)
    out = run_training(cfg)
    continued = _trainable(out)
    assert continued.keys() == saved.keys()
    for key in saved:
        torch.testing.assert_close(continued[key], saved[key], rtol=0, atol=0)
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in continued.items())
    meta = json.loads((out / "chatretriever.json").read_text())
    assert meta["retriever"]["base_model"] == str(tiny_llama_dir.resolve())
    assert meta["retriever"]["max_session_len"] == 48

    recipe = str(_recipe(tmp_path / "c", tiny_llama_dir))
    for change, field in (("lora.r=8", "lora.r"), ("retriever.n_emb_tokens=2", "n_emb_tokens")):
        capsys.readouterr()
        assert main(["train", recipe, "--set", f"model={first}", "--set", change]) == 2
        err = capsys.readouterr().err.strip().splitlines()  # log lines, then the one error
        assert err[-1].startswith("error: ") and "Traceback" not in "".join(err)
        assert field in err[-1] and str(first) in err[-1]


def test_gradient_checkpointing_and_accumulation(tmp_path, tiny_llama_dir):
    cfg = load_recipe(
        _recipe(tmp_path, tiny_llama_dir),
        ["training.gradient_checkpointing=true", "training.gradient_accumulation_steps=2"],
    )
    out = run_training(cfg)
    steps = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) for r in steps if "loss" in r)


def test_killed_and_resumed_equals_uninterrupted(tmp_path, tiny_llama_dir):
    from transformers import TrainerCallback

    from chatretriever.methods.chatretriever import train as train_module

    straight = load_recipe(
        _recipe(tmp_path / "a", tiny_llama_dir), ["training.max_steps=4", "lora.dropout=0.1"]
    )
    run_training(straight)

    class Crash(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == 2:
                raise KeyboardInterrupt("killed after the step-2 checkpoint")

    killed = load_recipe(
        _recipe(tmp_path / "b", tiny_llama_dir), ["training.max_steps=4", "lora.dropout=0.1"]
    )
    original_init = train_module.CsitTrainer.__init__

    def init_with_crash(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.add_callback(Crash())

    train_module.CsitTrainer.__init__ = init_with_crash
    try:
        with pytest.raises(KeyboardInterrupt):
            run_training(killed)
    finally:
        train_module.CsitTrainer.__init__ = original_init
    out = Path(killed.output_dir)
    assert (out / "checkpoint-2").is_dir() and not (out / "checkpoint-4").exists()
    other_shape = load_recipe(
        _recipe(tmp_path / "b", tiny_llama_dir), ["training.max_steps=4", "lora.r=2"]
    )
    saved_recipe = (out / "train_config.yaml").read_text()
    with pytest.raises(ValueError, match=r"started with another recipe.*lora\.r: 4 -> 2"):
        run_training(other_shape, resume=True)  # one line, before any model loads
    assert (out / "train_config.yaml").read_text() == saved_recipe  # the run's own recipe kept
    run_training(killed, resume=True)
    a, b = _trainable(Path(straight.output_dir)), _trainable(out)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)


def test_cli_train_dry_run_and_resume_flag(tmp_path, tiny_llama_dir, capsys):
    recipe = _recipe(tmp_path, tiny_llama_dir)
    assert main(["train", str(recipe), "--dry-run", "--set", "loss.alpha=0"]) == 0
    assert "alpha: 0" in capsys.readouterr().out
    assert main(["train", str(recipe), "--dry-run", "--set", "training.lerning_rate=1"]) == 2
    assert "did you mean 'learning_rate'" in capsys.readouterr().err
    assert main(["train", str(recipe), "--resume"]) == 0  # nothing to resume: starts fresh
    assert (tmp_path / "run" / "chatretriever.json").is_file()
    # a fresh run into a dir that holds a run: refused (its checkpoints would be resumed later)
    checkpoints = sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*"))
    assert checkpoints
    capsys.readouterr()
    assert main(["train", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--overwrite" in err and "\n" not in err.strip()
    (tmp_path / "run" / "uniconv.json").write_text("{}")  # another method's marker, left over
    (tmp_path / "run" / "checkpoint-999").mkdir()  # a later step than this run reaches
    assert main(["train", str(recipe), "--overwrite"]) == 0
    assert not (tmp_path / "run" / "checkpoint-999").exists()  # the old run's are gone
    assert not (tmp_path / "run" / "uniconv.json").exists()
    assert (tmp_path / "run" / "chatretriever.json").is_file()


# ------------------------------------------------------------------ the loss of a step, by hand
COMMON_TARGET = "They are things."  # one target: every example has as many LM labels
LAVA = "Lava cools into basalt rock."


def _session(topic: str) -> list[dict]:
    return [
        {"role": "user", "content": f"tell me about {topic}s"},
        {"role": "assistant", "content": f"{topic}s are interesting."},
        {"role": "user", "content": "what are they made of?"},
    ]


def _relevance_rows() -> list[dict]:
    """Four examples whose candidates hold relevant passages under other guises: e0 has two
    positives (v2 is also a hard negative of e1); e3 shares e0's positive v1 (same id), and its
    own hard negative g7 is a near copy of its positive g1; near copies (other case, spacing,
    punctuation, id) of e1's and e3's positives are hard negatives of e0 and e2; e0 and e3 have
    one hard negative of two (padding slots)."""
    text = dict(TOPICS)
    penguin_copy = "PENGUINS   are flightless birds, living in the southern hemisphere"
    glacier = text["glacier"].upper() + "!!"
    rows = [
        ("e0", "volcano", [("v1", text["volcano"]), ("v2", LAVA)], [("x1", penguin_copy)]),
        ("e1", "penguin", [("p1", text["penguin"])], [("v2", LAVA), ("n1", text["violin"])]),
        ("e2", "violin", [("vi1", text["violin"])], [("g9", text["glacier"].lower())]),
        ("e3", "glacier", [("g1", text["glacier"]), ("v1", text["volcano"])], [("g7", glacier)]),
    ]
    return [
        {
            "id": eid,
            "messages": _session(topic),
            "positives": [{"id": i, "text": t} for i, t in pos],
            "negatives": [{"id": i, "text": t} for i, t in neg],
            "target": COMMON_TARGET,
        }
        for eid, topic, pos, neg in rows
    ]


def _words(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.lower()))


def _relevant(p, positives) -> bool:
    """A passage is one of the positives: the same id, or the same words (by hand)."""
    return any(p.id == x.id or _words(p.text) == _words(x.text) for x in positives)


def _initial_retriever(cfg) -> ChatRetriever:
    """The model `run_training` starts from (it seeds before building the LoRA)."""
    from transformers import set_seed

    set_seed(42)
    return ChatRetriever.from_pretrained(
        cfg.model, config=cfg.retriever, lora=cfg.lora, device="cpu"
    )


def _hand_contrastive(r: ChatRetriever, examples, loss, seed: int = 42, epoch: int = 0) -> float:
    """L_C from standalone encodings, with every passage relevant to a session left out."""
    from chatretriever.modeling.candidates import positive_index

    k, temp = loss.n_hard_negatives, loss.temperature
    q = r.encode_sessions([[t.to_dict() for t in ex.messages] for ex in examples])
    cands = []  # (example, slot, passage, embedding)
    for j, ex in enumerate(examples):
        chosen = ex.positives[positive_index(ex.id, len(ex.positives), seed, epoch)]
        ps = [chosen, *ex.negatives[:k]]
        emb = r.encode_passages([p.to_dict() for p in ps])
        cands += [(j, slot, p, e) for slot, (p, e) in enumerate(zip(ps, emb, strict=True))]
    total = 0.0
    for i, ex in enumerate(examples):
        own = next(float(q[i] @ e) / temp for j, slot, _, e in cands if (j, slot) == (i, 0))
        scores = [
            float(q[i] @ e) / temp
            for j, slot, p, e in cands
            if (j, slot) == (i, 0) or ((loss.in_batch or j == i) and not _relevant(p, ex.positives))
        ]
        top = max(scores)
        total += top + math.log(sum(math.exp(x - top) for x in scores)) - own
    return total / len(examples)


def _hand_session_lm(r: ChatRetriever, examples) -> float:
    """L_S from the full model's logits: the logits at position t - 1 predict label t."""
    total, count = 0.0, 0
    for ex in examples:
        p = r.template.csit_pieces([t.to_dict() for t in ex.messages], ex.target_text)
        i = torch.arange(len(p))
        response_row = (i >= p.response_start).view(-1, 1)
        allowed = (i.view(1, -1) <= i.view(-1, 1)) & ~(response_row & (i < p.session_len))
        mask = torch.zeros(len(p), len(p)).masked_fill(~allowed, torch.finfo(torch.float32).min)
        ids = torch.tensor([p.input_ids])
        with torch.no_grad():
            logits = r.model(input_ids=ids, attention_mask=mask[None, None], position_ids=i[None])
        for t in range(p.label_start, p.label_end):
            row = logits.logits[0, t - 1]
            total += float(torch.logsumexp(row, 0) - row[ids[0, t]])
            count += 1
    return total / count


def _hand_loss(cfg) -> dict[str, float]:
    """The weighted loss parts of the first step of `cfg`'s run, worked out independently."""
    from chatretriever.io.training import read_training_examples

    examples = read_training_examples(cfg.data.files[0].path)
    r = _initial_retriever(cfg)
    parts = {"contrastive": _hand_contrastive(r, examples, cfg.loss)}
    if cfg.loss.alpha > 0:
        parts["session_lm"] = cfg.loss.alpha * _hand_session_lm(r, examples)
    return parts


def _first_step(out: Path) -> dict:
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    return next(row for row in log if row.get("step") == 1 and "loss" in row)


@pytest.mark.parametrize(
    "loss", [{}, {"n_hard_negatives": 0}, {"in_batch": False}], ids=["k2", "k0", "own"]
)
def test_first_logged_loss_equals_the_loss_worked_out_by_hand(tmp_path, tiny_llama_dir, loss):
    """One batch of the four examples (the order the sampler picks does not change the loss):
    logged L_C and alpha * L_S at step 1 equal an independent computation. `k0` has no hard
    negatives (it crashed on a reshape); `own` scores each session's own candidates only."""
    recipe = _recipe(tmp_path, tiny_llama_dir, _relevance_rows(), repeat=1, loss=loss, max_steps=1)
    cfg = load_recipe(recipe, ["retriever.dtype=fp32", "training.per_device_train_batch_size=4"])
    row = _first_step(run_training(cfg))
    want = _hand_loss(cfg)
    assert row["loss_contrastive"] == pytest.approx(want["contrastive"], rel=1e-4, abs=1e-4)
    assert row["loss_session_lm"] == pytest.approx(want["session_lm"], rel=1e-4, abs=1e-4)
    assert row["loss"] == pytest.approx(sum(want.values()), rel=1e-4, abs=1e-4)


def test_lm_loss_reads_the_logits_of_the_previous_position(tiny_model_dir):
    """`csit_forward`'s logits and labels are aligned: position t - 1 predicts label t, as in
    the full model's own logits (vanilla: a plain causal call, no mask of ours at all)."""
    from chatretriever.config import LoraSettings, RetrieverConfig
    from chatretriever.modeling.collate import csit_batch
    from chatretriever.modeling.losses import session_masked_lm_loss

    config = RetrieverConfig(dtype="fp32", max_session_len=64, max_response_len=24)
    lora = LoraSettings(r=4, alpha=8, dropout=0.0)
    r = ChatRetriever.from_pretrained(tiny_model_dir, config=config, lora=lora, device="cpu")
    with torch.no_grad():  # LoRA B starts at 0: give the adapter some effect
        g = torch.Generator().manual_seed(0)
        for name, param in r.model.named_parameters():
            if "lora_B" in name:
                param.add_(torch.randn(param.shape, generator=g) * 0.3)
    pieces = [
        r.template.csit_pieces(_session(topic), text) for topic, text in TOPICS[:3]
    ]  # different lengths: the batch is padded
    with torch.no_grad():
        out = r.csit_forward(csit_batch(pieces, r.pad_id, mode="vanilla"))
        got = float(session_masked_lm_loss(out["lm_logits"], out["lm_labels"])["session_lm"])
        previous, same, targets = [], [], []
        for p in pieces:
            ids = torch.tensor(p.input_ids)
            logits = r.model(input_ids=ids[None]).logits[0]  # (L, V)
            labelled = torch.arange(p.label_start, p.label_end)
            previous.append(logits[labelled - 1])
            same.append(logits[labelled])
            targets.append(ids[labelled])
        previous, same, targets = torch.cat(previous), torch.cat(same), torch.cat(targets)
    assert torch.equal(out["lm_labels"], targets)
    torch.testing.assert_close(out["lm_logits"], previous, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(out["lm_logits"], same, atol=1e-2)  # the check tells them apart
    want = float(torch.nn.functional.cross_entropy(previous, targets))
    assert got == pytest.approx(want, rel=1e-5)
    with torch.no_grad():
        csit = r.csit_forward(csit_batch(pieces, r.pad_id))
    csit_loss = float(session_masked_lm_loss(csit["lm_logits"], csit["lm_labels"])["session_lm"])
    examples = [_Ex(_session(topic), text) for topic, text in TOPICS[:3]]
    assert csit_loss == pytest.approx(_hand_session_lm(r, examples), rel=1e-5)


class _Ex:
    """What `_hand_session_lm` reads of an example."""

    def __init__(self, messages: list[dict], target: str) -> None:
        from chatretriever.types import Turn

        self.messages = tuple(Turn(m["role"], m["content"]) for m in messages)
        self.target_text = target


def test_gradient_accumulation_equals_one_big_batch(tmp_path, tiny_llama_dir):
    """2 micro-batches x accumulation 2 == one batch of 4, for one SGD step. Exact here because
    each session is scored against its own candidates only (in_batch: false) and every example
    has as many LM labels (each micro-batch's token mean then weighs as the batch's)."""
    sgd = {
        "max_steps": 1,
        "optim": "sgd",
        "learning_rate": 0.5,
        "lr_scheduler_type": "constant",
        "max_grad_norm": 0.0,
    }
    runs = {}
    for name, bs, accumulation in (("big", 4, 1), ("accumulated", 2, 2)):
        recipe = _recipe(
            tmp_path / name,
            tiny_llama_dir,
            _relevance_rows(),
            repeat=1,
            loss={"in_batch": False},
            per_device_train_batch_size=bs,
            gradient_accumulation_steps=accumulation,
            **sgd,
        )
        runs[name] = _trainable(run_training(load_recipe(recipe, ["retriever.dtype=fp32"])))
    start = _trainable_of(_initial_retriever(load_recipe(recipe, ["retriever.dtype=fp32"])))
    _assert_same_update(runs["accumulated"], runs["big"], start)


def _assert_same_update(got: dict, want: dict, start: dict) -> None:
    """Two runs made the same (non-zero) step from `start`, up to float summation order."""
    assert got.keys() == want.keys() == start.keys()
    moved = max(float((want[k] - start[k]).abs().max()) for k in want)
    assert moved > 1e-3  # the step did something
    for key in want:
        torch.testing.assert_close(
            got[key] - start[key], want[key] - start[key], rtol=1e-3, atol=1e-4 * moved
        )


def _trainable_of(r: ChatRetriever) -> dict[str, torch.Tensor]:
    """The tensors `save_pretrained` would write for the adapter, from a live retriever."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        r.save_pretrained(d)
        return {k: v.clone() for k, v in _trainable(Path(d)).items()}


def test_positive_is_sampled_per_epoch_and_all_positives_are_excluded(tmp_path):
    from chatretriever.io.training import example_from_dict, passage_keys
    from chatretriever.modeling.candidates import candidate_layout

    row = {
        **_relevance_rows()[0],
        "positives": [{"id": f"d{i}", "text": f"t {i}"} for i in range(3)],
    }
    ex = example_from_dict(row)
    picks = []
    for epoch in range(12):
        passages, layout = candidate_layout([ex], n_negatives=2, seed=42, epoch=epoch)
        picks.append(passages[int(layout.rows[0, 0])].id)
        again, _ = candidate_layout([ex], n_negatives=2, seed=42, epoch=epoch)
        assert again[int(layout.rows[0, 0])].id == picks[-1]  # deterministic
        # the keys of every positive are in the layout, whichever is trained
        want = {passage_keys(p) for p in ex.positives}
        assert {tuple(k) for k in layout.positive_keys[0].tolist()} == want
    assert set(picks) == {"d0", "d1", "d2"}  # not always positives[0]
    other_seed = [candidate_layout([ex], 2, seed=7, epoch=e)[0][0].id for e in range(12)]
    assert other_seed != picks


class _EpochRecorder:
    """A data collator that records what the trainer tells it."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def set_epoch(self, epoch: int, seed: int | None = None) -> None:
        self.calls.append((epoch, seed))

    def __call__(self, batch: list[dict]) -> dict[str, torch.Tensor]:
        return _stack(batch)


def test_trainer_tells_the_collator_each_epoch_also_after_resume(tmp_path):
    recorder = _EpochRecorder()
    _line_trainer(tmp_path / "run", _Line(), recorder).train()  # one step per epoch, 4 steps
    assert recorder.calls == [(0, 42), (1, 42), (2, 42), (3, 42)]
    recorder = _EpochRecorder()
    _line_trainer(tmp_path / "run", _Line(), recorder).train(
        resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2")
    )
    assert recorder.calls == [(2, 42), (3, 42)]


def test_loss_parts_are_read_back_only_when_logging(tmp_path, monkeypatch):
    """No device sync per loss part per micro-step: parts stay tensors until a log is made."""
    model = _Line()
    trainer = _line_trainer(tmp_path / "run", model)
    batch = {"x": torch.tensor(X), "y": torch.tensor(Y)}
    reads = []
    real_float, real_item = torch.Tensor.__float__, torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "__float__", lambda t: reads.append(1) or real_float(t))
    monkeypatch.setattr(torch.Tensor, "item", lambda t: reads.append(1) or real_item(t))
    model.train()
    for _ in range(3):
        trainer.compute_loss(model, batch)
    assert reads == []
    monkeypatch.undo()
    logs = {"loss": 0.0}
    trainer.log(logs)
    parts = _two_parts(model, batch)
    assert logs["loss_fit"] == pytest.approx(float(parts["fit"].detach()), abs=1e-6)
    assert logs["loss_l2"] == pytest.approx(float(parts["l2"].detach()), abs=1e-6)


# ------------------------------------------------------------------ DDP
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_step_equals_one_process_over_the_global_batch(tmp_path, tiny_llama_dir):
    """Two processes x 2 examples == one process x 4 examples: the same parameters after one
    SGD step, and the logged loss is the one worked out by hand (relevant passages sit in the
    other process's batch whatever the split: e.g. e0's positive is e3's and e1's hard negative
    is e0's second positive)."""
    sgd = {"max_steps": 1, "optim": "sgd", "learning_rate": 0.5, "max_grad_norm": 0.0}
    common = {"rows": _relevance_rows(), "repeat": 1, **sgd}
    ddp = _recipe(
        tmp_path / "ddp",
        tiny_llama_dir,
        per_device_train_batch_size=2,
        ddp_backend="gloo",
        **common,
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={_free_port()}",
        "-m",
        "chatretriever",
        "train",
        str(ddp),
        "--set",
        "retriever.dtype=fp32",
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    one = _recipe(tmp_path / "one", tiny_llama_dir, per_device_train_batch_size=4, **common)
    cfg = load_recipe(one, ["retriever.dtype=fp32"])
    single = _trainable(run_training(cfg))
    multi = _trainable(tmp_path / "ddp" / "run")
    _assert_same_update(multi, single, _trainable_of(_initial_retriever(cfg)))
    want = _hand_loss(cfg)
    logged = _first_step(tmp_path / "ddp" / "run")["loss"]  # the mean over the processes
    assert logged == pytest.approx(sum(want.values()), rel=1e-4, abs=1e-4)


# The loss level, under a real process group: B = 4 sessions, 1 + K = 3 slots, rank r holds
# rows 2r, 2r + 1. Keys are (id, text). Row 0's positive has a near copy (same text key, other
# id) among row 2's hard negatives and row 1's second positive is row 3's hard negative: both
# across processes. Row 3 has a padding slot.
_POS_KEYS = [[(1, 10), (-1, -1)], [(2, 20), (5, 50)], [(3, 30), (-1, -1)], [(4, 40), (-1, -1)]]
_SLOT_KEYS = [
    [(1, 10), (6, 60), (7, 70)],
    [(2, 20), (8, 80), (9, 90)],
    [(3, 30), (11, 10), (12, 120)],
    [(4, 40), (5, 50), (-1, -1)],
]


def _loss_level_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(4, 8, generator=g), dim=-1)
    slots = torch.nn.functional.normalize(torch.randn(4, 3, 8, generator=g), dim=-1)
    return q, slots


def _local_layout(lo: int, hi: int):
    """Rank-local layout and the embeddings of its real passages (slot order, padding skipped)."""
    from chatretriever.modeling.losses import CandidateLayout

    _, slots = _loss_level_data()
    keys = torch.tensor(_SLOT_KEYS[lo:hi])
    rows = torch.full((hi - lo, 3), -1)
    real = (keys[..., 0] >= 0).nonzero().tolist()
    for n, (i, s) in enumerate(real):
        rows[i, s] = n
    emb = torch.stack([slots[lo + i, s] for i, s in real])
    return CandidateLayout(rows, keys, torch.tensor(_POS_KEYS[lo:hi])), emb


def _gather_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    from chatretriever.config import LossConfig
    from chatretriever.methods.chatretriever.train import csit_losses

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    q, _ = _loss_level_data()
    layout, emb = _local_layout(2 * rank, 2 * rank + 2)
    q = q[2 * rank : 2 * rank + 2].clone().requires_grad_()
    emb.requires_grad_()
    outputs = {"session_emb": q, "passage_emb": emb}
    cfg = LossConfig(alpha=0, temperature=0.5, n_hard_negatives=2)
    loss = csit_losses(outputs, {"layout": layout}, cfg)["contrastive"]
    loss.backward()
    torch.save(
        {"loss": loss.detach(), "q_grad": q.grad, "emb_grad": emb.grad},
        Path(out_dir) / f"rank{rank}.pt",
    )
    dist.destroy_process_group()


def _brute_force_contrastive(q: torch.Tensor, slots: torch.Tensor, temp: float) -> torch.Tensor:
    """Mean InfoNCE over all 4 sessions, candidates filtered by set logic on the keys."""
    losses = []
    for i in range(4):
        relevant = {("id", a) for a, _ in _POS_KEYS[i] if a >= 0}
        relevant |= {("text", b) for _, b in _POS_KEYS[i] if b >= 0}
        scores = []
        for j in range(4):
            for s, (a, b) in enumerate(_SLOT_KEYS[j]):
                if a < 0:
                    continue  # padding
                if (j, s) != (i, 0) and {("id", a), ("text", b)} & relevant:
                    continue  # a passage relevant to session i
                scores.append(q[i] @ slots[j, s] / temp)
        losses.append(torch.logsumexp(torch.stack(scores), 0) - q[i] @ slots[i, 0] / temp)
    return torch.stack(losses).mean()


@pytest.mark.slow
def test_gathered_candidates_give_the_gradients_of_one_process(tmp_path):
    torch.multiprocessing.spawn(_gather_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2)
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    q, slots = _loss_level_data()
    q.requires_grad_()
    slots.requires_grad_()
    full = _brute_force_contrastive(q, slots, temp=0.5)
    full.backward()
    # DDP averages the processes' gradients: each process's loss is the mean over its sessions
    assert float(sum(g["loss"] for g in got)) / 2 == pytest.approx(float(full.detach()), rel=1e-5)
    for rank, g in enumerate(got):
        lo = 2 * rank
        torch.testing.assert_close(g["q_grad"] / 2, q.grad[lo : lo + 2], rtol=1e-4, atol=1e-6)
        real = torch.tensor(_SLOT_KEYS[lo : lo + 2])[..., 0] >= 0
        want = slots.grad[lo : lo + 2][real]  # (R, D) real slots, in slot order
        torch.testing.assert_close(g["emb_grad"] / 2, want, rtol=1e-4, atol=1e-6)


def test_recipe_base_merges_mappings_and_an_empty_one_clears(tmp_path):
    from chatretriever.modeling.recipe import read_recipe

    write(
        tmp_path / "base.yaml",
        "model: m\noutput_dir: o\nloss: {alpha: 0.3, temperature: 0.01}\n"
        "data:\n  caps: {topiocqa: 2000}\n  files: [{path: a.jsonl}, {path: b.jsonl}]\n",
    )
    top = write(
        tmp_path / "top.yaml",
        "base: base.yaml\nloss: {alpha: 0}\ndata:\n  files: [{path: b.jsonl}]\n",
    )
    raw = read_recipe(top)
    assert raw["loss"] == {"alpha": 0, "temperature": 0.01}  # key by key
    assert raw["data"]["files"] == [{"path": "b.jsonl"}]  # lists replace
    assert raw["data"]["caps"] == {"topiocqa": 2000}  # kept from the base
    write(tmp_path / "clear.yaml", "base: top.yaml\ndata: {caps: {}}\n")
    raw = read_recipe(tmp_path / "clear.yaml")
    assert raw["data"]["caps"] == {} and raw["data"]["files"] == [{"path": "b.jsonl"}]


def test_uniconv_mismatched_only_ablation_keeps_the_topiocqa_cap():
    from chatretriever.modeling.recipe import read_recipe

    root = Path(__file__).resolve().parents[1] / "configs"
    full = read_recipe(root / "uniconv-smol.yaml")
    ablation = read_recipe(root / "uniconv-ablations" / "mismatched-only.yaml")
    assert ablation["data"]["caps"] == full["data"]["caps"] == {"topiocqa": 2000}
    assert [f["path"] for f in ablation["data"]["files"]] == ["outputs/train/topiocqa.jsonl.gz"]
    assert {k: v for k, v in ablation.items() if k not in ("data", "output_dir")} == {
        k: v for k, v in full.items() if k not in ("data", "output_dir")
    }


def test_close_process_group_ends_a_launched_group_and_is_a_no_op_without_one(tmp_path):
    import torch.distributed as dist

    from chatretriever.modeling.distributed import close_process_group, rank_and_world

    assert close_process_group() is False
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        assert rank_and_world() == (0, 1)
        assert close_process_group() is True
        assert not dist.is_initialized() and rank_and_world() == (0, 1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_data_files_may_be_paths_alone():
    from chatretriever.modeling.recipe_data import BaseDataSettings, DataFile

    data = BaseDataSettings(files=["a.jsonl", {"path": "b.jsonl", "repeat": 2}])
    assert data.files == [DataFile("a.jsonl"), DataFile("b.jsonl", repeat=2)]
    with pytest.raises(ValueError, match="data.files must be a list of files, got 'a.jsonl'"):
        BaseDataSettings(files="a.jsonl")  # was read as a mapping, one key a character
