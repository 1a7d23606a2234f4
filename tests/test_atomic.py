"""Saves that are whole or absent: a ChatRetriever's save_pretrained and training checkpoints.

Each test kills a save midway with a patched writer that raises after writing part of its file,
then checks that the previous copy is intact (same bytes, loads, same embeddings) and that no
temporary directory is left behind. The torch-free primitives (`atomic_write`, `atomic_dir`,
`atomic_files`, `atomic_path`) are tested in test_io.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from chatretriever.config import LoraSettings, RetrieverConfig
from chatretriever.methods.chatretriever.model import SAVED_CONFIG, ChatRetriever
from chatretriever.modeling.run_dir import resume_checkpoint
from chatretriever.modeling.trainer import NamedLossTrainer, TrainingSet, training_arguments
from chatretriever.types import Passage

pytest.importorskip("peft")

PASSAGES = [
    Passage(id="p1", title="Paris", text="paris is the capital of france."),
    Passage(id="p2", text="open settings and choose reset to reset your password."),
]
SESSIONS = [[{"role": "user", "content": "what is the capital of france?"}]]


def _tree(root: Path) -> dict[str, bytes]:
    """{relative path: bytes} of every file under `root`."""
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _retriever(model_dir: Path, lora: bool = True, seed: int = 0) -> ChatRetriever:
    """A tiny retriever whose trainable weights are perturbed by `seed` (distinct saves)."""
    config = RetrieverConfig(n_emb_tokens=2, dtype="fp32", max_session_len=64, max_passage_len=32)
    settings = LoraSettings(enabled=lora, r=4, alpha=8, dropout=0.0)
    r = ChatRetriever.from_pretrained(model_dir, config=config, lora=settings, device="cpu")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in r.model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return r


def _half_then_raise(real):
    """A safetensors writer that writes the first half of the real file, then 'dies'."""

    def write(tensors, filename, *args, **kwargs):
        real(tensors, filename, *args, **kwargs)
        data = Path(filename).read_bytes()
        Path(filename).write_bytes(data[: len(data) // 2])
        raise KeyboardInterrupt("killed while writing the weights")

    return write


@pytest.mark.parametrize("lora", [True, False], ids=["adapter", "full"])
def test_a_save_killed_midway_leaves_the_previous_save_intact(
    tiny_llama_dir, tmp_path, monkeypatch, lora
):
    import peft.peft_model
    import transformers.modeling_utils

    out = tmp_path / "ret"
    first = _retriever(tiny_llama_dir, lora=lora, seed=1)
    first.save_pretrained(out)
    (tmp_path / "ret" / "train_log.jsonl").write_text("{}\n")  # another file of the run dir
    before = _tree(out)
    expected = first.encode_passages(PASSAGES)

    second = _retriever(tiny_llama_dir, lora=lora, seed=2)
    module = peft.peft_model if lora else transformers.modeling_utils
    monkeypatch.setattr(module, "safe_save_file", _half_then_raise(module.safe_save_file))
    with pytest.raises(KeyboardInterrupt):
        second.save_pretrained(out)
    assert _tree(out) == before  # same files, same bytes
    assert sorted(os.listdir(tmp_path)) == ["ret"]
    assert not [n for n in os.listdir(out) if n.startswith(".")]  # no staging dir left
    monkeypatch.undo()
    loaded = ChatRetriever.from_pretrained(out, device="cpu")
    np.testing.assert_allclose(loaded.encode_passages(PASSAGES), expected, atol=1e-6)


def test_a_save_killed_after_the_weights_changes_nothing(tiny_llama_dir, tmp_path, monkeypatch):
    out = tmp_path / "ret"
    first = _retriever(tiny_llama_dir, seed=1)
    first.save_pretrained(out)
    before = _tree(out)
    second = _retriever(tiny_llama_dir, seed=2)

    def tokenizer_dies(*args, **kwargs):  # the weights are written by now
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(second.tokenizer, "save_pretrained", tokenizer_dies)
    with pytest.raises(OSError, match="No space"):
        second.save_pretrained(out)
    assert _tree(out) == before
    assert sorted(os.listdir(tmp_path)) == ["ret"]


def test_saving_into_a_run_dir_keeps_its_other_files(tiny_llama_dir, tmp_path):
    out = tmp_path / "run"
    (out / "checkpoint-2").mkdir(parents=True)
    (out / "checkpoint-2" / "optimizer.pt").write_bytes(b"state")
    (out / "train_config.yaml").write_text("model: x\n")
    r = _retriever(tiny_llama_dir)
    r.save_pretrained(out)
    r.save_pretrained(out)  # again, over the previous save
    assert (out / "checkpoint-2" / "optimizer.pt").read_bytes() == b"state"
    assert (out / "train_config.yaml").read_text() == "model: x\n"
    assert json.loads((out / SAVED_CONFIG).read_text())["format"] == "adapter"
    assert not [n for n in os.listdir(out) if n.startswith(".")]


def test_saving_another_format_over_a_save_loads_the_new_one(tiny_llama_dir, tmp_path):
    out = tmp_path / "ret"
    _retriever(tiny_llama_dir, seed=1).save_pretrained(out)  # an adapter save ...
    full = _retriever(tiny_llama_dir, lora=False, seed=2)
    full.save_pretrained(out)  # ... replaced by a full one: no adapter file may remain
    assert not (out / "adapter_config.json").exists()
    assert not (out / "adapter_model.safetensors").exists()
    loaded = ChatRetriever.from_pretrained(out, device="cpu")
    np.testing.assert_allclose(
        loaded.encode_passages(PASSAGES), full.encode_passages(PASSAGES), atol=1e-6
    )


# --- checkpoints -------------------------------------------------------------------------------


class _Scalar(torch.nn.Module):
    """y ~ w * x with the TrainableModel protocol; its save can be told to die at a step."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.5, dtype=torch.float64))
        self.die_at: int | None = None
        self.saves = 0

    def save_pretrained(self, directory) -> None:
        self.saves += 1
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / "w.json").write_text(json.dumps(self.w.item())[:3])
        if self.saves == self.die_at:
            raise KeyboardInterrupt("killed while writing the checkpoint")
        (Path(directory) / "w.json").write_text(json.dumps(self.w.item()))

    def load_trainable_state(self, directory) -> None:
        with torch.no_grad():
            self.w.fill_(json.loads((Path(directory) / "w.json").read_text()))


def _trainer(out: Path, model: _Scalar, **settings) -> NamedLossTrainer:
    rows = [{"x": torch.tensor(x), "y": torch.tensor(y)} for x, y in ((1.0, 2.0), (2.0, 3.0))]
    defaults = {
        "max_steps": 4,
        "per_device_train_batch_size": 2,
        "learning_rate": 0.05,
        "optim": "sgd",
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "logging_steps": 2,
        "save_steps": 2,
        "use_cpu": True,
    }
    return NamedLossTrainer(
        model=model,
        args=training_arguments(out, {**defaults, **settings}),
        train_dataset=TrainingSet([(rows, 1)]),
        data_collator=lambda b: {k: torch.stack([r[k] for r in b]) for k in ("x", "y")},
        loss_fn=lambda m, i: {"fit": ((i["x"] * m.w - i["y"]) ** 2).mean()},
    )


CHECKPOINT_FILES = {
    "w.json",
    "training_args.bin",
    "optimizer.pt",
    "scheduler.pt",
    "rng_state.pth",
    "trainer_state.json",
}


def test_a_checkpoint_killed_midway_is_never_resumed_from(tmp_path):
    run = tmp_path / "run"
    model = _Scalar()
    model.die_at = 2  # the step-4 checkpoint
    with pytest.raises(KeyboardInterrupt):
        _trainer(run, model).train()
    assert sorted(os.listdir(run)) == ["checkpoint-2"]  # no checkpoint-4, no staging dir
    assert set(os.listdir(run / "checkpoint-2")) >= CHECKPOINT_FILES
    assert resume_checkpoint(run, resume=True) == str(run / "checkpoint-2")
    resumed = _Scalar()
    trainer = _trainer(run, resumed)
    trainer.train(resume_from_checkpoint=resume_checkpoint(run, resume=True))
    assert trainer.state.global_step == 4
    assert set(os.listdir(run / "checkpoint-4")) >= CHECKPOINT_FILES
    state = json.loads((run / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    assert json.loads((run / "checkpoint-4" / "w.json").read_text()) == resumed.w.item()


def test_checkpoints_are_renamed_into_place_and_rotated(tmp_path):
    run = tmp_path / "run"
    _trainer(run, _Scalar(), save_steps=1, save_total_limit=2).train()
    assert sorted(os.listdir(run)) == ["checkpoint-3", "checkpoint-4"]
    for name in ("checkpoint-3", "checkpoint-4"):
        assert set(os.listdir(run / name)) >= CHECKPOINT_FILES
    # saving a step again (a rerun into the same dir) replaces that checkpoint whole
    model = _Scalar()
    with torch.no_grad():
        model.w.fill_(7.0)
    trainer = _trainer(run, model, save_only_model=True)
    trainer.state.global_step = trainer.state.best_global_step = 4  # also the best one
    trainer._save_checkpoint(model, trial=None)
    assert json.loads((run / "checkpoint-4" / "w.json").read_text()) == 7.0
    assert sorted(os.listdir(run)) == ["checkpoint-3", "checkpoint-4"]
    # the best checkpoint is named by its final path, not the staging one it was written in
    assert trainer.state.best_model_checkpoint == str(run / "checkpoint-4")
    state = json.loads((run / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["best_model_checkpoint"] == str(run / "checkpoint-4")


_DDP_SCRIPT = """
import json, os, sys
from pathlib import Path

import torch

from chatretriever.modeling.trainer import NamedLossTrainer, TrainingSet, training_arguments


class Scalar(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.5, dtype=torch.float64))

    def save_pretrained(self, directory):
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / "w.json").write_text(json.dumps(self.w.item()))
        with open(Path(sys.argv[2]) / f"saves-rank{os.environ['RANK']}", "a") as f:
            f.write(str(directory) + "\\n")

    def load_trainable_state(self, directory):
        with torch.no_grad():
            self.w.fill_(json.loads((Path(directory) / "w.json").read_text()))

    def forward(self, x):
        return x * self.w


rows = [{"x": torch.tensor(x), "y": torch.tensor(y)} for x, y in ((1.0, 2.0), (2.0, 3.0))]
settings = {
    "max_steps": 2, "per_device_train_batch_size": 1, "learning_rate": 0.05, "optim": "sgd",
    "warmup_steps": 0, "logging_steps": 1, "save_steps": 1, "use_cpu": True,
    "ddp_backend": "gloo",
}
NamedLossTrainer(
    model=Scalar(),
    args=training_arguments(sys.argv[1], settings),
    train_dataset=TrainingSet([(rows, 1)]),
    data_collator=lambda b: {k: torch.stack([r[k] for r in b]) for k in ("x", "y")},
    loss_fn=lambda m, i: {"fit": ((m(i["x"]) - i["y"]) ** 2).mean()},
).train()
# an orderly gloo shutdown: without it a process can abort at exit ("terminate called ...")
if torch.distributed.is_initialized():
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
"""


@pytest.mark.slow
def test_ddp_checkpoints_have_one_writer_and_every_process_part(tmp_path):
    import socket
    import subprocess
    import sys

    script = tmp_path / "train_ddp.py"
    script.write_text(_DDP_SCRIPT)
    run, marks = tmp_path / "run", tmp_path / "marks"
    marks.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
    with socket.socket() as sock:  # a free port: a fixed one may still be held by an earlier run
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd += [f"--master_port={port}", str(script), str(run), str(marks)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(os.listdir(run)) == ["checkpoint-1", "checkpoint-2"]  # no staging dir left
    for name in ("checkpoint-1", "checkpoint-2"):
        files = set(os.listdir(run / name))
        assert {"w.json", "rng_state_0.pth", "rng_state_1.pth", "trainer_state.json"} <= files
    assert sorted(os.listdir(marks)) == ["saves-rank0"]  # the model is written once per save
    assert len((marks / "saves-rank0").read_text().splitlines()) == 2


def test_gzip_output_is_byte_reproducible(tmp_path):
    from chatretriever.io.atomic import atomic_write

    blobs = []
    for name in ("a", "b"):
        path = tmp_path / name / "rows.jsonl.gz"
        path.parent.mkdir()
        with atomic_write(path) as f:
            f.write('{"id": "1"}\n')
        blobs.append(path.read_bytes())
    assert blobs[0] == blobs[1]  # no random temporary name, no time in the header
    assert b"rows.jsonl\x00" in blobs[0]  # the header names the file the data is
