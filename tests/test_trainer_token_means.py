"""The trainer's token-mean parts (`token_counts`): a step's part is the mean over ALL of the
step's tokens, under gradient accumulation and across DDP processes, as one process over the
global batch would take it (not a mean of per-batch or per-process means)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from chatretriever.modeling import trainer as trainer_module
from chatretriever.modeling.trainer import NamedLossTrainer, TrainingSet, training_arguments


class _TokenMean:
    """A loss whose one part is the mean of per-token values over the batch's real tokens."""

    def __call__(self, model, inputs):
        values, mask = inputs["values"] * model.w, inputs["mask"]
        return {"lm": (values * mask).sum() / mask.sum().clamp(min=1)}

    def token_counts(self, inputs):
        return {"lm": inputs["mask"].sum()}


class _Scale(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones((), dtype=torch.float64))


def _batch(values: list[float]) -> dict[str, torch.Tensor]:
    """One row of per-token values padded to 8 tokens (padding masked out)."""
    padded = torch.zeros(1, 8, dtype=torch.float64)
    padded[0, : len(values)] = torch.tensor(values, dtype=torch.float64)
    mask = torch.zeros(1, 8, dtype=torch.float64)
    mask[0, : len(values)] = 1
    return {"values": padded, "mask": mask}


def _trainer(tmp_path) -> NamedLossTrainer:
    args = training_arguments(tmp_path, {"max_steps": 1, "use_cpu": True})
    return NamedLossTrainer(
        model=_Scale(),
        args=args,
        train_dataset=TrainingSet([([{"x": 0}], 1)]),
        data_collator=lambda rows: rows,
        loss_fn=_TokenMean(),
    )


def _step_loss(trainer: NamedLossTrainer, batches: list[dict]) -> float:
    """What the Trainer backpropagates for one optimizer step: each micro-batch's loss divided
    by the number of micro-batches (gradient accumulation), summed."""
    got, _ = trainer.get_batch_samples(iter(batches), len(batches), torch.device("cpu"))
    trainer.model.train()
    return sum(float(trainer.compute_loss(trainer.model, b).detach()) for b in got) / len(got)


def test_accumulated_micro_batches_weigh_each_token_once(tmp_path):
    short, long = _batch([1.0, 1.0]), _batch([4.0] * 6)
    trainer = _trainer(tmp_path)
    # 2 tokens of 1 and 6 of 4: the token mean is 26 / 8, not the mean of means (1 + 4) / 2
    assert _step_loss(trainer, [short, long]) == pytest.approx(26 / 8)
    assert _step_loss(trainer, [long]) == pytest.approx(4.0)  # one batch: its own mean


def test_processes_weigh_each_token_of_the_global_batch_once(tmp_path, monkeypatch):
    """Two processes, one holding 2 short tokens and the other 6: DDP averages their losses'
    gradients, so their average must be the global token mean (26 / 8), as one process over
    both batches takes it; per-process means would give 2.5."""
    batches = [_batch([1.0, 1.0]), _batch([4.0] * 6)]
    counts = [b["mask"].sum() for b in batches]
    monkeypatch.setattr(trainer_module, "_all_part_names", lambda names: names)
    losses = []
    for rank in (0, 1):
        trainer = _trainer(tmp_path / str(rank))
        others = counts[1 - rank]
        trainer.accelerator = SimpleNamespace(  # this process's view of a 2-process group
            num_processes=2,
            device=torch.device("cpu"),
            reduce=lambda local, reduction, o=others: local + torch.stack([o.float()]),
        )
        losses.append(_step_loss(trainer, [batches[rank]]))
    assert sum(losses) / 2 == pytest.approx(26 / 8)
    one = _trainer(tmp_path / "one")
    assert _step_loss(one, batches) == pytest.approx(26 / 8)  # accumulation agrees
