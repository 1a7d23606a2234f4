"""Training: the shared named-loss trainer; CSIT's recipe, collator, trainer steps,
checkpoints and exact resume, DDP."""

from __future__ import annotations

import json
import os
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


def _line_trainer(out: Path, model: _Line) -> NamedLossTrainer:
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
    }
    return NamedLossTrainer(
        model=model,
        args=training_arguments(out, settings),
        train_dataset=TrainingSet([(rows, 1)]),
        data_collator=lambda b: {k: torch.stack([r[k] for r in b]) for k in ("x", "y")},
        loss_fn=_two_parts,
    )


def test_named_loss_trainer_logs_parts_and_descends_their_sum(tmp_path):
    w, parts = W0.copy(), []
    for _ in range(4):  # plain SGD on fit + l2, by hand
        err = X @ w - Y
        parts.append((np.mean(err**2), DECAY * np.sum(w**2)))
        w = w - LR * (2 * X.T @ err / len(Y) + 2 * DECAY * w)
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


def _recipe(tmp_path: Path, model_dir: Path, **training) -> Path:
    data = write(tmp_path / "train.jsonl", "\n".join(json.dumps(r) for r in _examples()) + "\n")
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
    recipe = {
        "model": str(model_dir),
        "output_dir": str(tmp_path / "run"),
        "retriever": {"max_session_len": 64, "max_passage_len": 32, "max_response_len": 24},
        "loss": {"alpha": 0.3, "temperature": 0.05, "n_hard_negatives": 2},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"files": [{"path": str(data), "repeat": 2}]},
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
    with pytest.raises(DataFormatError, match="recipe.yaml.*LossConfig.*alpah"):
        load_recipe(path, ["loss.alpah=0"])
    with pytest.raises(DataFormatError, match="key=value"):
        load_recipe(path, ["loss.alpha"])
    bad = write(tmp_path / "bad.yaml", "model: x\n  output_dir: [\n")
    with pytest.raises(DataFormatError, match="bad.yaml"):
        load_recipe(bad)


def test_cli_bad_recipe_is_one_line(tmp_path, capsys):
    bad = write(tmp_path / "r.yaml", "model: m\noutput_dir: o\n")
    assert main(["train", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "r.yaml" in err[0] and "data" in err[0]


def test_collator_pads_missing_negatives(tmp_path, tiny_llama_dir):
    from chatretriever.methods.chatretriever.data import example_from_dict
    from chatretriever.methods.chatretriever.recipe import load_recipe
    from chatretriever.methods.chatretriever.train import make_collator

    cfg = load_recipe(_recipe(tmp_path, tiny_llama_dir))
    retriever = ChatRetriever.from_pretrained(
        cfg.model, config=cfg.retriever, lora=cfg.lora, device="cpu"
    )
    collate = make_collator(retriever, cfg.loss, "session")
    batch = collate([example_from_dict(r) for r in _examples()[:3]])
    assert batch["neg_valid"].tolist() == [[False, False], [True, False], [True, True]]
    assert batch["passages"]["input_ids"].shape[0] == 3 + 3 * 2
    assert batch["sessions"]["attention_mask"].dim() == 4  # CSIT batch under alpha > 0
    last = make_collator(retriever, cfg.loss, "last_turn")([example_from_dict(_examples()[0])])
    full_len = batch["sessions"]["labels"].shape[1]
    assert last["sessions"]["labels"].shape[1] < full_len  # history dropped


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
    run_training(killed, resume=True)
    a, b = _trainable(Path(straight.output_dir)), _trainable(out)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)


def test_cli_train_dry_run_and_resume_flag(tmp_path, tiny_llama_dir, capsys):
    recipe = _recipe(tmp_path, tiny_llama_dir)
    assert main(["train", str(recipe), "--dry-run", "--set", "loss.alpha=0"]) == 0
    assert "alpha: 0" in capsys.readouterr().out
    assert main(["train", str(recipe), "--resume"]) == 0  # nothing to resume: starts fresh
    assert (tmp_path / "run" / "chatretriever.json").is_file()


@pytest.mark.slow
def test_ddp_two_processes_gloo(tmp_path, tiny_llama_dir):
    recipe = _recipe(tmp_path, tiny_llama_dir, per_device_train_batch_size=2, ddp_backend="gloo")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_port=29531",
        "-m",
        "chatretriever",
        "train",
        str(recipe),
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "run"
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2]
    assert ChatRetriever.from_pretrained(out, device="cpu").encode_sessions(
        [[{"role": "user", "content": "hi"}]]
    ).shape == (1, 32)


def _gather_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    from chatretriever.config import LossConfig
    from chatretriever.methods.chatretriever.train import csit_losses

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    torch.manual_seed(0)
    q, emb = torch.randn(4, 8), torch.randn(4 + 4 * 2, 8)
    keys = torch.arange(4) * 10
    neg_keys, valid = torch.arange(8).reshape(4, 2) + 100, torch.ones(4, 2, dtype=torch.bool)
    lo, hi = 2 * rank, 2 * rank + 2
    local_emb = torch.cat([emb[lo:hi], emb[4:].reshape(4, 2, 8)[lo:hi].reshape(-1, 8)])
    outputs = {"session_emb": q[lo:hi], "passage_emb": local_emb.requires_grad_()}
    inputs = {"pos_keys": keys[lo:hi], "neg_keys": neg_keys[lo:hi], "neg_valid": valid[lo:hi]}
    loss = csit_losses(outputs, inputs, LossConfig(alpha=0, temperature=0.5, n_hard_negatives=2))
    loss["contrastive"].backward()
    torch.save(float(loss["contrastive"]), Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_gathered_in_batch_negatives_equal_one_process(tmp_path):
    from chatretriever.modeling.losses import contrastive_loss

    torch.multiprocessing.spawn(_gather_worker, args=(2, 29533, str(tmp_path)), nprocs=2)
    torch.manual_seed(0)
    q, emb = torch.randn(4, 8), torch.randn(4 + 4 * 2, 8)
    pos, neg = emb[:4], emb[4:].reshape(4, 2, 8)
    # each process averages over its own 2 sessions but scores all 4 + 8 candidates
    expected = [
        float(contrastive_loss(q[i : i + 2], pos, neg, temperature=0.5, offset=i)["contrastive"])
        for i in (0, 2)
    ]
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert got == pytest.approx(expected, rel=1e-5)
    full = float(contrastive_loss(q, pos, neg, temperature=0.5)["contrastive"])
    assert sum(got) / 2 == pytest.approx(full, rel=1e-5)
