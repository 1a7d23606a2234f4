"""The one trainer of every method: a transformers `Trainer` whose loss is a sum of named parts.

A method supplies a loss function `(model, inputs) -> {name: weighted part}` (a `NamedLossFn`):
it runs the model's forward on the collated batch and returns each already-weighted part of its
loss. `NamedLossTrainer` backpropagates their sum and logs every part as `loss_<name>`, averaged
over the micro-batches of the logging window (and, under DDP, over the processes, as `loss` is),
beside the Trainer's own `loss` (the parts stay on
the device until a log is written: no device sync per micro-step). A loss function with a
`token_counts(batch) -> {part name: tokens}` method marks those parts as token means: under
gradient accumulation each is weighted so that a step's part is the mean over all of the step's
tokens, as in one big batch (not the mean of the micro-batches' means). A data collator with a
`set_epoch(epoch, seed)` method is told the epoch and the trainer's seed as each epoch begins (to
vary, reproducibly, what it samples; with `dataloader_persistent_workers` workers keep the epoch
they started with).

Checkpoints hold only what trains plus the Trainer's optimizer, scheduler and RNG state, so a
resumed run continues exactly where a killed run stopped. The model says what trains through the
`TrainableModel` protocol: `save_pretrained(dir)` writes it (e.g. a LoRA adapter and new token
rows, or the full model under full fine-tuning) and `load_trainable_state(dir)` reads it back in
place. A model without them gets the Trainer's default checkpoints.

Also here: the TrainingArguments defaults shared by the recipes (`training_arguments`) and a
weighted concatenation of example lists (`TrainingSet`); the processes of a launched run (the
cross-process gather of in-batch negatives that keeps the local shard's gradient, rank, the
one-group check) are `distributed.py`'s.

Launchers (configs/accelerate/): every process of a torchrun or `accelerate launch` run builds
the same TrainingArguments. Where no accelerator is visible they train on the CPU (`use_cpu`, so
that transformers starts a gloo process group: without it each process would train alone); a
run whose processes did not join one group, or whose launcher asks for a mixed precision (the
model's own autocast sets it), stops with an error before the first step.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from chatretriever.io.atomic import atomic_path, replace_dir
from chatretriever.modeling.distributed import accelerator_visible, check_one_process_group
from chatretriever.modeling.model_card import CardSpec, write_trainer_card
from chatretriever.modeling.recipe import (
    LOG_FILE,
    TRAINING_DEFAULTS,
    RecipeConfig,
    save_recipe,
    write_log,
)
from chatretriever.modeling.run_dir import final_save

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


class _EpochToCollator(TrainerCallback):
    """Calls `collator.set_epoch(epoch, seed)` as each epoch begins, before its batches exist."""

    def __init__(self, collator: Any) -> None:
        self.collator = collator

    def on_epoch_begin(
        self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any
    ) -> None:
        # state.epoch is fractional after a mid-epoch resume; its integer part is the epoch.
        self.collator.set_epoch(int(state.epoch or 0), args.seed)


def _all_part_names(names: list[str]) -> list[str]:
    """The sorted union of every process's loss-part names (a method may leave a part out of a
    batch that lacks its inputs, so processes can differ)."""
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, names)
    return sorted({n for ns in gathered for n in ns})


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
        self._part_sums: dict[str, torch.Tensor] = {}
        self._part_count = 0
        self._step_tokens: dict[str, Any] = {}  # token-mean part -> its tokens in this step
        self._step_batches = 1
        if callable(getattr(self.data_collator, "set_epoch", None)):
            self.add_callback(_EpochToCollator(self.data_collator))

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
        if model.training and self._step_tokens:
            parts = self._as_step_token_means(parts, inputs)
        total = sum(parts.values())
        if model.training:  # detached sums on the device; read (one sync) only when logging
            for name, value in parts.items():
                part = value.detach()
                self._part_sums[name] = (
                    self._part_sums[name] + part if name in self._part_sums else part
                )
            self._part_count += 1
        return (total, parts) if return_outputs else total

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: Any) -> Any:
        """The micro-batches of one optimizer step; also counts, for each token-mean part the
        loss function names (`token_counts`), its tokens over all of them."""
        batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        count = getattr(self.loss_fn, "token_counts", None)
        self._step_tokens = {}
        if callable(count) and batches:
            for batch in batches:
                for name, n in count(batch).items():
                    self._step_tokens[name] = self._step_tokens.get(name, 0) + n
            self._step_batches = len(batches)
            if self.accelerator.num_processes > 1:
                self._step_tokens = self._tokens_of_all_processes(self._step_tokens)
        return batches, num_items

    def _tokens_of_all_processes(self, tokens: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Each token-mean part's tokens summed over the processes (one all-reduce per step):
        DDP averages the processes' gradients, so a part that is each process's sum over the
        step's GLOBAL token count, times the number of processes, is the token mean over the
        global batch, as one process would take it (per-process means would weigh a token of
        a process with short targets more)."""
        names = _all_part_names(sorted(tokens))  # the same names on every process, in order
        device = self.accelerator.device  # a count may already be a tensor on the GPU
        local = torch.stack(
            [torch.as_tensor(tokens.get(n, 0), dtype=torch.float32, device=device) for n in names]
        )
        total = self.accelerator.reduce(local, reduction="sum")
        return dict(zip(names, total, strict=True))

    def _as_step_token_means(
        self, parts: Mapping[str, torch.Tensor], inputs: Mapping[str, Any]
    ) -> dict[str, torch.Tensor]:
        """A token-mean part of this micro-batch rescaled so that, once the Trainer divides by
        the number of micro-batches, the step's parts sum to the token mean over ALL of the
        step's tokens (a short target weighs as in one big batch: gradient accumulation then
        equals the big batch; under DDP the tokens of every process count, and the part is
        scaled by the number of processes, which DDP's gradient average divides out)."""
        out = dict(parts)
        scale = self._step_batches * self.accelerator.num_processes
        for name, n in self.loss_fn.token_counts(inputs).items():  # type: ignore[attr-defined]
            total = self._step_tokens.get(name)
            if name in out and total is not None:
                dev = out[name].device
                mine = torch.as_tensor(n, dtype=torch.float32, device=dev) * scale
                all_ = torch.as_tensor(total, dtype=torch.float32, device=dev).clamp(min=1)
                out[name] = out[name] * (mine / all_)
        return out

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if self._part_count and "loss" in logs:
            names = sorted(self._part_sums)
            if self.accelerator.num_processes > 1:  # every process the same names, in order
                names = _all_part_names(names)
            zero = next(iter(self._part_sums.values())).new_zeros(())
            sums = [self._part_sums.get(n, zero) for n in names]  # a part absent here adds 0
            means = torch.stack(sums) / self._part_count
            if self.accelerator.num_processes > 1:  # as `loss` is: the mean over processes
                means = self.accelerator.reduce(means, reduction="mean")
            for name, value in zip(names, means.tolist(), strict=True):
                logs[f"loss_{name}"] = round(float(value), 6)
            self._part_sums.clear()
            self._part_count = 0
        super().log(logs, *args, **kwargs)

    def _save(self, output_dir: str | None = None, state_dict: Any = None) -> None:
        model = self.accelerator.unwrap_model(self.model)
        if not isinstance(model, TrainableModel):
            super()._save(output_dir, state_dict)
            return
        if not self.args.should_save:  # one writer per checkpoint (every DDP process gets here)
            return
        out = Path(output_dir or self.args.output_dir)
        model.save_pretrained(out)
        with atomic_path(out / "training_args.bin") as tmp:
            torch.save(self.args, tmp)

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        """Write `checkpoint-N` whole or not at all.

        The Trainer writes every part of the checkpoint (the model through `_save`, optimizer,
        scheduler, RNG of each process, trainer state) into `tmp-checkpoint-N/checkpoint-N`;
        once all processes are done, the main one renames it to `checkpoint-N` (`replace_dir`)
        and only then rotates old checkpoints. A killed save leaves no `checkpoint-N` that
        `--resume` would pick (the `tmp-` name matches no checkpoint pattern).
        """
        from transformers.trainer import TRAINER_STATE_NAME
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        run_dir = Path(self._get_output_dir(trial=trial))
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging = run_dir / f"tmp-{name}"  # the same on every process: each writes its part
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)  # left by a killed run
        self.accelerator.wait_for_everyone()
        self._staging_run_dir = str(staging)
        try:
            super()._save_checkpoint(model, trial)
        except BaseException:
            if self.args.should_save:
                shutil.rmtree(staging, ignore_errors=True)
            raise
        finally:
            self._staging_run_dir = None
        if self.state.best_model_checkpoint == str(staging / name):  # named inside staging
            self.state.best_model_checkpoint = str(run_dir / name)
            if self.args.should_save:
                self.state.save_to_json(str(staging / name / TRAINER_STATE_NAME))
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            replace_dir(staging / name, run_dir / name)
            shutil.rmtree(staging, ignore_errors=True)
            self._rotate_checkpoints_in(run_dir)
        self.accelerator.wait_for_everyone()

    def _get_output_dir(self, trial: Any) -> str:
        # While `_save_checkpoint` runs, the Trainer's run dir is the checkpoint's staging dir.
        return getattr(self, "_staging_run_dir", None) or super()._get_output_dir(trial)

    def _rotate_checkpoints_in(self, run_dir: Path) -> None:
        """Delete checkpoints beyond `save_total_limit` (the Trainer's rotation ran on the
        staging dir, where the new checkpoint was alone)."""
        legacy = getattr(super(), "_rotate_checkpoints", None)  # transformers < 5
        if legacy is not None:
            legacy(use_mtime=False, output_dir=str(run_dir))
            return
        from transformers.trainer_utils import rotate_checkpoints

        rotate_checkpoints(
            output_dir=str(run_dir),
            save_total_limit=self.args.save_total_limit,
            best_model_checkpoint=self.state.best_model_checkpoint,
            use_mtime=True,
        )

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        target = self.accelerator.unwrap_model(model or self.model)
        if not isinstance(target, TrainableModel):
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            return
        try:
            target.load_trainable_state(resume_from_checkpoint)
        except RuntimeError as e:
            if "size mismatch" not in str(e) and "Missing key" not in str(e):
                raise
            raise ValueError(
                f"{resume_from_checkpoint} was trained with other model settings than this "
                "recipe's (e.g. lora.r, retriever.n_emb_tokens): resume with the recipe it was "
                "trained with (its train_config.yaml), or start over with --overwrite"
            ) from None
        logger.info("resumed trainable weights from %s", resume_from_checkpoint)

    def _already_done(self, checkpoint: str) -> bool:
        """Whether `checkpoint`'s step is at or past a positive `max_steps` (its state and log
        become this trainer's)."""
        from transformers import TrainerState
        from transformers.trainer import TRAINER_STATE_NAME

        path = Path(checkpoint) / TRAINER_STATE_NAME
        if self.args.max_steps <= 0 or not path.is_file():
            return False
        state = TrainerState.load_from_json(str(path))
        if state.global_step < self.args.max_steps:
            return False
        self.state = state
        return True

    def train_and_save(
        self, checkpoint: str | None, recipe: RecipeConfig, card: CardSpec | None = None
    ) -> Path:
        """Train (from `checkpoint` if given); then the main process saves the final model, the
        resolved recipe, the log history and, given the method's `card`, the model card
        (README.md, `model_card`) into `output_dir`, which is returned.

        They are written into a staging dir and moved in together, the model's marker
        files last (`run_dir.final_save`): a save killed midway leaves `output_dir` without a
        finished model, so `--resume` continues from the last checkpoint and saves again.
        """
        out = Path(self.args.output_dir)
        if checkpoint is not None and self._already_done(checkpoint):
            # The Trainer would run one more step before it checks max_steps: finalise instead.
            self._load_from_checkpoint(checkpoint)
            logger.info("%s already reached max_steps=%d: saving it", checkpoint,
                        self.args.max_steps)  # fmt: skip
        else:
            self.train(resume_from_checkpoint=checkpoint)
        if self.args.process_index == 0:
            with final_save(out) as staging:
                self.accelerator.unwrap_model(self.model).save_pretrained(staging)
                save_recipe(recipe, staging)
                write_log(staging / LOG_FILE, self.state.log_history)
                if card is not None:
                    write_trainer_card(out, card, recipe, self, staging)
            logger.info("saved the final model to %s", out)
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
            for `bf16`/`fp16`, or a launcher's mixed precision: the model runs its own autocast).

    Returns:
        The arguments; `use_cpu` defaults to True where no accelerator is visible.

    Raises:
        ValueError: `bf16`/`fp16` set, accelerate's `mixed_precision` not "no", or a launcher's
            processes (`WORLD_SIZE`) that did not form one process group.
    """
    merged = {**TRAINING_DEFAULTS, **dict(settings), "output_dir": str(output_dir)}
    if merged.get("bf16") or merged.get("fp16"):
        raise ValueError(
            f"training.bf16/fp16: precision is set by {precision_setting} "
            "(bf16 autocast by default)"
        )
    launcher_precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if launcher_precision != "no":
        raise ValueError(
            f"accelerate's mixed_precision={launcher_precision}: precision is set by "
            f"{precision_setting}; launch with mixed_precision 'no' (configs/accelerate/)"
        )
    if merged.get("use_cpu") is None:  # no GPU: a CPU process group (gloo) under a launcher
        merged["use_cpu"] = not accelerator_visible()
    args = TrainingArguments(**merged)
    check_one_process_group(args)
    return args


def check_fills_a_batch(n_examples: int, args: TrainingArguments) -> None:
    """Raise when `n_examples` fill no whole batch of every process: with the forced
    `dataloader_drop_last` such a run would take no step and save the untrained model.

    Raises:
        ValueError: naming the counts and the recipe keys that change them.
    """
    batch, world = args.per_device_train_batch_size, args.world_size
    if args.dataloader_drop_last and n_examples < batch * world:
        raise ValueError(
            f"{n_examples} training examples (after data.files limit/repeat and data.caps) fill "
            f"no batch of training.per_device_train_batch_size={batch} x {world} process(es): "
            "the run would take 0 steps; lower the batch size or add examples"
        )


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
