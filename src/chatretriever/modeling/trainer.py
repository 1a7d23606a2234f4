"""The one trainer of every method: a transformers `Trainer` whose loss is a sum of named parts.

A method supplies a loss function `(model, inputs) -> {name: weighted part}` (a `NamedLossFn`):
it runs the model's forward on the collated batch and returns each already-weighted part of its
loss. `NamedLossTrainer` backpropagates their sum and logs every part as `loss_<name>`, averaged
over the micro-batches of the logging window, beside the Trainer's own `loss`.

Checkpoints hold only what trains plus the Trainer's optimizer, scheduler and RNG state, so a
resumed run continues exactly where a killed run stopped. The model says what trains through the
`TrainableModel` protocol: `save_pretrained(dir)` writes it (e.g. a LoRA adapter and new token
rows, or the full model under full fine-tuning) and `load_trainable_state(dir)` reads it back in
place. A model without them gets the Trainer's default checkpoints.

Also here: the TrainingArguments defaults shared by the recipes (`training_arguments`), a
weighted concatenation of example lists (`TrainingSet`), and, for in-batch negatives under DDP
(torchrun / accelerate launch), a cross-process gather that keeps the local shard's gradient.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from transformers import Trainer, TrainingArguments

from chatretriever.modeling.recipe import LOG_FILE, RecipeConfig, save_recipe, write_log

logger = logging.getLogger(__name__)

NamedLossFn = Callable[[Any, Mapping[str, Any]], Mapping[str, torch.Tensor]]
"""(model, collated batch) -> {part name: already-weighted scalar loss}; the loss is their sum."""


@runtime_checkable
class TrainableModel(Protocol):
    """A model that saves and reloads only what it trains (checkpoints and the final model)."""

    def save_pretrained(self, directory: str | Path) -> Any:
        """Write the trainable state (and what is needed to load the model) into `directory`."""

    def load_trainable_state(self, directory: str | Path) -> None:
        """Load the state a `save_pretrained` dir holds into this model, in place."""


class NamedLossTrainer(Trainer):
    """A Trainer whose loss is the sum of the named parts of `loss_fn`; each part is logged.

    Args:
        loss_fn: `(model, inputs) -> {name: part}` (see `NamedLossFn`).
        *args, **kwargs: `transformers.Trainer`'s.

    `compute_loss(..., return_outputs=True)` returns `(loss, parts)`.
    """

    def __init__(self, *args: Any, loss_fn: NamedLossFn, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.loss_fn = loss_fn
        self._part_sums: dict[str, float] = defaultdict(float)
        self._part_count = 0

    def compute_loss(
        self,
        model: Any,
        inputs: Mapping[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        parts = self.loss_fn(model, inputs)
        if not parts:
            raise ValueError("the loss function returned no loss parts")
        total = sum(parts.values())
        if model.training:
            for name, value in parts.items():
                self._part_sums[name] += float(value.detach())
            self._part_count += 1
        return (total, parts) if return_outputs else total

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if self._part_count and "loss" in logs:
            for name, value in self._part_sums.items():
                logs[f"loss_{name}"] = round(value / self._part_count, 6)
            self._part_sums.clear()
            self._part_count = 0
        super().log(logs, *args, **kwargs)

    def _save(self, output_dir: str | None = None, state_dict: Any = None) -> None:
        model = self.accelerator.unwrap_model(self.model)
        if not isinstance(model, TrainableModel):
            super()._save(output_dir, state_dict)
            return
        out = Path(output_dir or self.args.output_dir)
        model.save_pretrained(out)
        torch.save(self.args, out / "training_args.bin")

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        target = self.accelerator.unwrap_model(model or self.model)
        if not isinstance(target, TrainableModel):
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            return
        target.load_trainable_state(resume_from_checkpoint)
        logger.info("resumed trainable weights from %s", resume_from_checkpoint)

    def train_and_save(self, checkpoint: str | None, recipe: RecipeConfig) -> Path:
        """Train (from `checkpoint` if given); then the main process saves the final model, the
        resolved recipe and the log history into `output_dir`, which is returned."""
        out = Path(self.args.output_dir)
        self.train(resume_from_checkpoint=checkpoint)
        if self.args.process_index == 0:
            self.accelerator.unwrap_model(self.model).save_pretrained(out)
            save_recipe(recipe, out)
            write_log(out / LOG_FILE, self.state.log_history)
        self.accelerator.wait_for_everyone()
        return out


def training_arguments(
    output_dir: str | Path,
    settings: Mapping[str, Any],
    precision_setting: str = "retriever.dtype",
) -> TrainingArguments:
    """TrainingArguments with this project's defaults under the user's `training:` settings.

    Args:
        output_dir: Checkpoints and the final model.
        settings: The recipe's `training:` mapping (any TrainingArguments field).
        precision_setting: The recipe field that sets the precision (named in the error raised
            for `bf16`/`fp16`: the model runs its own autocast).
    """
    defaults: dict[str, Any] = {
        "max_steps": 200,
        "per_device_train_batch_size": 8,
        "learning_rate": 1e-4,
        "lr_scheduler_type": "linear",
        "warmup_steps": 10,
        "weight_decay": 0.0,
        "logging_steps": 10,
        "save_strategy": "steps",
        "save_steps": 50,
        "save_total_limit": 2,
        "seed": 42,
        "report_to": [],
        "dataloader_drop_last": True,  # equal batch shapes on every process (gathering)
        "remove_unused_columns": False,
        "ddp_find_unused_parameters": False,
    }
    merged = {**defaults, **dict(settings), "output_dir": str(output_dir)}
    if merged.get("bf16") or merged.get("fp16"):
        raise ValueError(
            f"training.bf16/fp16: precision is set by {precision_setting} "
            "(bf16 autocast by default)"
        )
    return TrainingArguments(**merged)


class TrainingSet(torch.utils.data.Dataset):
    """Training examples, each listed `repeat` times (to up-weight a small source)."""

    def __init__(self, parts: Sequence[tuple[Sequence[Any], int]]) -> None:
        self.examples: list[Any] = []
        for examples, repeat in parts:
            if repeat < 1:
                raise ValueError(f"repeat must be >= 1, got {repeat}")
            self.examples.extend(list(examples) * repeat)
        if not self.examples:
            raise ValueError("no training examples")

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Any:
        return self.examples[i]


@dataclass
class TrainResult:
    """What a training run produced."""

    output_dir: Path
    steps: int
    log_history: list[dict[str, Any]] = field(default_factory=list)


def steps_per_epoch(n_examples: int, batch_size: int, world: int, accumulation: int) -> int:
    """Optimizer steps in one epoch with drop_last batches."""
    return max(1, (n_examples // (batch_size * world)) // accumulation)


def gather(t: torch.Tensor) -> torch.Tensor:
    """Concatenate a tensor over all processes (rank order), keeping gradients for the local
    part; needs an initialised process group."""
    import torch.distributed as dist
    from torch.distributed.nn.functional import all_gather

    if t.requires_grad:
        return torch.cat(all_gather(t))
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def rank_and_world() -> tuple[int, int]:
    """(this process's rank, number of processes); (0, 1) without an initialised process group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
