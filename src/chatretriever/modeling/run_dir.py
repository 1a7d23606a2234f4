"""A training run's output directory: resuming from its checkpoints, the guard against
writing over another run, the check that a resumed run keeps its recipe, and the staged save
of the final model into it (`final_save`).

`prepare_llm_run` (`recipe`) calls these first; the rationale room's tuning does too.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from chatretriever.io.atomic import atomic_files
from chatretriever.modeling.recipe import (
    SAVED_RECIPE,
    TRAINING_DEFAULTS,
    RecipeConfig,
    read_recipe,
)

logger = logging.getLogger(__name__)

# what a resumed run may change: how long it trains, how it saves and logs, how data is loaded
RESUMABLE_TRAINING = frozenset({
    "max_steps", "num_train_epochs", "save_strategy", "save_steps", "save_total_limit",
    "logging_steps", "logging_first_step", "report_to", "disable_tqdm", "dataloader_num_workers",
    "dataloader_persistent_workers", "dataloader_pin_memory", "dataloader_prefetch_factor",
})  # fmt: skip


def resume_checkpoint(output_dir: str | Path, resume: bool) -> str | None:
    """The newest `checkpoint-N` dir in `output_dir` when `resume` (None: start from scratch)."""
    if not resume:
        return None
    from transformers.trainer_utils import get_last_checkpoint

    out = Path(output_dir)
    checkpoint = get_last_checkpoint(str(out)) if out.is_dir() else None
    if checkpoint is None:
        logger.info("no checkpoint in %s: starting from scratch", out)
    return checkpoint


# what a finished run leaves in output_dir: an EmbLLM (ChatRetriever, UniConv) or a LoRA adapter
# (the reranker tuning of `rerank-train`); the method's own marker first, the one named (and
# the one moved in last by `final_save`)
_MODEL_MARKERS = ("chatretriever.json", "uniconv.json", "adapter_config.json")


def check_output_dir(output_dir: str | Path, resume: bool, overwrite: bool) -> list[Path]:
    """What a fresh run would leave behind in `output_dir`: refused unless asked for.

    A fresh run into a directory that holds checkpoints or a saved model would keep the old
    checkpoints (a later `--resume` would continue the OLD run) and could keep another method's
    marker file (a UniConv's `uniconv.json` beside a new ChatRetriever makes it load as a
    UniConv). So: `resume` continues what is there; `overwrite` returns the checkpoints and
    marker files to delete before starting over; otherwise ValueError.
    """
    out = Path(output_dir)
    if not out.is_dir():
        return []
    checkpoints = sorted(p for p in out.glob("checkpoint-*") if p.is_dir())
    markers = [out / m for m in _MODEL_MARKERS if (out / m).is_file()]
    if resume:
        saved = markers or [p for p in save_leftovers(out) for m in _MODEL_MARKERS
                            if p.suffix == ".old" and (p / m).is_file()]  # fmt: skip
        if saved and not checkpoints:
            raise ValueError(
                f"{out} holds a finished model ({saved[0].name}) and no checkpoint: --resume has "
                "nothing to continue (the model is kept); --overwrite starts over, or give "
                "another output_dir"
            )
        return []
    stale = checkpoints + markers
    if stale and not overwrite:
        raise ValueError(
            f"{out} already holds a run ({', '.join(p.name for p in stale[:3])}"
            f"{', ...' if len(stale) > 3 else ''}): --resume (resume=True) continues it, "
            "--overwrite (overwrite=True) starts over (removing its checkpoints), or give "
            "another output_dir"
        )
    return stale


def save_leftovers(output_dir: str | Path) -> list[Path]:
    """The staging (`.NAME.*.tmp`) and set-aside (`.NAME.*.old`) dirs a save of the final model
    into `output_dir` leaves when it is killed (`io.atomic.atomic_files`)."""
    out = Path(output_dir)
    found = [*out.glob(f".{out.name}.*.tmp"), *out.glob(f".{out.name}.*.old")]
    return sorted(p for p in found if p.is_dir())


@contextlib.contextmanager
def final_save(output_dir: str | Path) -> Iterator[Path]:
    """A staging directory for the final model (and its recipe and log), moved into
    `output_dir` as one set once the body returns (`io.atomic.atomic_files`).

    The staging dir is a `.NAME.*.tmp` inside `output_dir` (`save_leftovers`: a killed save's
    is never read as a model, and removed here or by the next run). The set's entries replace
    their namesakes and the run's checkpoints stay. The model markers (`_MODEL_MARKERS`, which
    the guard reads) are moved in after every other file, an EmbLLM's own config after its
    `adapter_config.json` (what makes it load as a retriever comes last): a save killed
    before them leaves no finished run, and `--resume` continues from the last checkpoint and
    saves again. If the body raises, nothing of the set is moved in.

    Args:
        output_dir: The run's output directory (created).

    Yields:
        The empty staging directory to save into.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)  # the staging dir goes inside it, not beside it
    for leftover in save_leftovers(out):  # of an earlier killed save: never moved in
        shutil.rmtree(leftover, ignore_errors=True)
        logger.warning("removed %s (left by a killed save of the model)", leftover)
    with atomic_files(out, last=_MODEL_MARKERS[::-1]) as staging:
        yield staging


def remove_paths(paths: Sequence[Path]) -> None:
    for p in paths:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
        logger.info("removed %s (--overwrite)", p)


def _leaves(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"loss.alpha": 0.3, "data.files": [...]}: the non-mapping values of a nested mapping."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(_leaves(value, f"{name}."))
        else:
            out[name] = value
    return out


def changed_settings(now: Mapping[str, Any], saved: Mapping[str, Any]) -> list[str]:
    """What a resumed run would change of the recipe its run was started with.

    Args:
        now: The resolved recipe (`to_dict()`) of the resume.
        saved: The run's `train_config.yaml`.

    Returns:
        "key: old -> new" for each differing key, sorted; `output_dir`, `RESUMABLE_TRAINING`
        and keys one recipe lacks (written by another version) are not compared; a training
        field left out counts as its default (`TRAINING_DEFAULTS`).
    """
    import yaml

    now = yaml.safe_load(yaml.safe_dump(dict(now), sort_keys=False))  # the saved file's types
    was_training = {**TRAINING_DEFAULTS, **(saved.get("training") or {})}
    new_training = {**TRAINING_DEFAULTS, **(now.get("training") or {})}
    old = _leaves({k: v for k, v in saved.items() if k not in ("output_dir", "training")})
    new = _leaves({k: v for k, v in now.items() if k not in ("output_dir", "training")})
    diffs = [(k, old[k], new[k]) for k in old.keys() & new.keys() if old[k] != new[k]]
    diffs += [
        (f"training.{k}", was_training.get(k), new_training.get(k))
        for k in (was_training.keys() | new_training.keys()) - RESUMABLE_TRAINING
        if was_training.get(k) != new_training.get(k)
    ]
    return [f"{k}: {a!r} -> {b!r}" for k, a, b in sorted(diffs)]


def check_resumed_recipe(config: RecipeConfig, output_dir: str | Path) -> None:
    """Refuse to resume the run in `output_dir` with a recipe that trains differently from the
    one it was started with (its `train_config.yaml`): the saved recipe would claim settings
    the first part was not trained with.

    Raises:
        ValueError: one line naming each differing key.
    """
    saved_path = Path(output_dir) / SAVED_RECIPE
    if not saved_path.is_file():
        return
    changed = changed_settings(config.to_dict(), read_recipe(saved_path))
    if changed:
        raise ValueError(
            f"{output_dir} holds a run started with another recipe ({SAVED_RECIPE}): "
            f"{'; '.join(changed)}; --resume continues it only with that recipe (it may change "
            "how long it trains, saves and logs); --overwrite starts over, or give another "
            "output_dir"
        )
