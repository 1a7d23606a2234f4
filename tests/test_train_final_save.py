"""The final save of a training run (`NamedLossTrainer.train_and_save`) is whole or absent.

A save killed midway (while the model writes its files, or after the model and before the log)
leaves `output_dir` without a model marker and without a staging dir; `--resume` then continues
from the last checkpoint and saves again (removing a killed process's staging dir), and the
saved model loads. While the saved files are moved in, the model markers come last: no moment
shows a marker beside a partial save.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from test_atomic import _Scalar, _trainer
from test_train import _recipe, _trainable

from chatretriever.methods.chatretriever.model import ChatRetriever
from chatretriever.methods.chatretriever.recipe import load_recipe, run_training
from chatretriever.modeling import trainer as trainer_module
from chatretriever.modeling.run_dir import check_output_dir, resume_checkpoint

pytest.importorskip("peft")

MARKERS = {"chatretriever.json", "uniconv.json", "adapter_config.json"}  # run_dir's


class _Recipe:
    def to_dict(self) -> dict:
        return {"model": "scalar", "output_dir": "run"}


class _Marked(_Scalar):
    """A model that writes its files straight into the dir it is given, a marker the run-dir
    guard reads first (as a model without a staged save of its own could)."""

    def save_pretrained(self, directory) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / "adapter_config.json").write_text("{}")
        super().save_pretrained(directory)


def _killed_log_writer(*args, **kwargs) -> None:
    raise KeyboardInterrupt("killed while writing the log")


@pytest.mark.parametrize("kill", ["model", "log"])
def test_a_killed_final_save_is_no_finished_run_and_resume_saves_it(tmp_path, monkeypatch, kill):
    run = tmp_path / "run"
    model = _Marked()
    if kill == "model":
        model.die_at = 3  # checkpoint-2, checkpoint-4, then the final save
    else:
        monkeypatch.setattr(trainer_module, "write_log", _killed_log_writer)
    with pytest.raises(KeyboardInterrupt):
        _trainer(run, model).train_and_save(None, _Recipe())
    assert sorted(os.listdir(run)) == ["checkpoint-2", "checkpoint-4"]  # no marker, no staging
    assert check_output_dir(run, resume=True, overwrite=False) == []  # --resume continues it
    monkeypatch.undo()
    leftover = run / ".run.ab12.tmp"  # what a process killed while saving leaves
    leftover.mkdir()
    (leftover / "adapter_config.json").write_text("{}")
    stale = check_output_dir(run, resume=False, overwrite=True)  # what --overwrite would remove
    assert stale == [run / "checkpoint-2", run / "checkpoint-4"]  # no finished model

    checkpoint = resume_checkpoint(run, resume=True)
    assert checkpoint == str(run / "checkpoint-4")
    out = _trainer(run, _Marked()).train_and_save(checkpoint, _Recipe())
    saved = {"adapter_config.json", "w.json", "train_config.yaml", "train_log.jsonl"}
    assert set(os.listdir(out)) == {"checkpoint-2", "checkpoint-4", *saved}  # leftover removed
    loaded = _Scalar()
    loaded.load_trainable_state(out)
    assert loaded.w.item() == model.w.item()  # the killed run's trained weight
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log if "loss" in row] == [2, 4]


def test_a_final_save_killed_before_its_log_is_resumed_into_a_loadable_retriever(
    tmp_path, tiny_llama_dir, monkeypatch
):
    cfg = load_recipe(_recipe(tmp_path, tiny_llama_dir))  # 2 steps, checkpoint-2
    out = Path(cfg.output_dir)
    monkeypatch.setattr(trainer_module, "write_log", _killed_log_writer)
    with pytest.raises(KeyboardInterrupt):
        run_training(cfg)
    monkeypatch.undo()
    assert not MARKERS & set(os.listdir(out))  # not taken as a finished model
    assert not [n for n in os.listdir(out) if n.startswith(".")]  # no staging dir left
    assert resume_checkpoint(out, resume=True) == str(out / "checkpoint-2")

    seen: list[set[str]] = []  # what a reader of `out` sees after each rename
    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        real_replace(src, dst, *args, **kwargs)
        seen.append({n for n in os.listdir(out) if not n.startswith(".")})

    monkeypatch.setattr(os, "replace", replace)
    run_training(cfg, resume=True)
    monkeypatch.undo()
    final = set(os.listdir(out))
    assert {"chatretriever.json", "train_log.jsonl", "train_config.yaml"} <= final
    for entries in seen:  # a marker only beside every other file of the save
        if entries & MARKERS:
            assert final - MARKERS <= entries, sorted(final - entries)
    assert next(e for e in seen if "chatretriever.json" in e) == final  # its config came last
    loaded = ChatRetriever.from_pretrained(out, device="cpu")
    assert loaded.encode_sessions([[{"role": "user", "content": "why?"}]]).shape[0] == 1
    final_weights, step_2 = _trainable(out), _trainable(out / "checkpoint-2")
    assert final_weights.keys() == step_2.keys()
    for key in step_2:
        torch.testing.assert_close(final_weights[key], step_2[key], rtol=0, atol=0)
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log if "loss" in row] == [1, 2]


def test_a_save_killed_between_the_marker_renames_is_named_as_such(tmp_path):
    """A LoRA retriever's final save killed after `adapter_config.json` and before
    `chatretriever.json` moved in: loading says to resume, not "not a saved ChatRetriever"."""
    from chatretriever.methods.chatretriever.model import ChatRetriever

    run = tmp_path / "run"
    (run / ".run.ab12.tmp").mkdir(parents=True)
    (run / "adapter_config.json").write_text("{}")
    (run / ".run.ab12.tmp" / "chatretriever.json").write_text("{}")
    with pytest.raises(ValueError, match="final save was killed.*--resume"):
        ChatRetriever.from_pretrained(str(run))
    (run / ".run.ab12.tmp" / "chatretriever.json").unlink()  # a plain adapter dir
    with pytest.raises(ValueError, match="LoRA adapter without chatretriever.json"):
        ChatRetriever.from_pretrained(str(run))
