"""A model card (README.md) in every trained model directory, as sentence-transformers and TRL
write one on save.

A method room describes its models once (`CardSpec`: what they are, a Python snippet and command
lines that load one, its recipe keys worth a line); each training command's final save calls the
shared hook (`write_trainer_card`, or `write_run_card` without a Trainer), which gathers what the
run knows into `CardFacts` (resolved recipe, training arguments used, log, examples used, the
model's fingerprint, the base model's registry entry, versions, date), renders it (`render_card`)
and writes README.md atomically. Checkpoints get none.

Our card's first line is an HTML comment starting with `MARKER`. A README.md without it is someone
else's and is kept (with a warning), except peft's unfilled template ("Model Card for Model ID",
which `PeftModel.save_pretrained` writes beside every adapter); when no card is written, such a
template in the staging dir is dropped too, so the output dir's README.md stays as it was. A card
that fails to render is skipped with a warning: it never costs a trained model.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from chatretriever.errors import DataFormatError
from chatretriever.io.atomic import atomic_write
from chatretriever.io.files import iter_jsonl, read_json
from chatretriever.modeling.card_render import (
    CARD_FILE,
    MARKER,
    BaseModelFacts,
    CardFacts,
    CardSpec,
    render_card,
)
from chatretriever.modeling.recipe import LOG_FILE, SAVED_RECIPE, TRAINING_DEFAULTS, read_recipe

logger = logging.getLogger(__name__)

_MAX_SAVED_BASES = 8  # a saved run's base may itself be a saved run: followed this far


# --------------------------------------------------------------------------------- gathering


def base_model_facts(name: str) -> BaseModelFacts:
    """The base model: a saved run is followed through its `train_config.yaml` to the model it
    was trained from; a built-in one's description and licence come from the registry."""
    from chatretriever.modeling.sources import builtin

    chain: list[str] = []
    current = str(name)
    while len(chain) < _MAX_SAVED_BASES and (Path(current) / SAVED_RECIPE).is_file():
        try:
            parent = read_recipe(Path(current) / SAVED_RECIPE).get("model")
        except (DataFormatError, OSError):
            break
        if not parent or str(parent) in (current, *chain):
            break
        chain.append(str(parent))
        current = str(parent)
    info = builtin(current)
    if info is None:
        return BaseModelFacts(str(name), tuple(chain))
    return BaseModelFacts(str(name), tuple(chain), info.name, info.description, info.licence)


def _saved_lora(directory: Path, recipe: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The saved adapter's LoRA settings (its adapter_config.json: what was trained, also when
    it continued another adapter), else the recipe's `lora` section, else None."""
    from chatretriever.modeling.adapters import ADAPTER_CONFIG

    path = directory / ADAPTER_CONFIG
    if path.is_file():
        saved = read_json(path)
        names = {"r": "r", "alpha": "lora_alpha", "dropout": "lora_dropout",
                 "target_modules": "target_modules"}  # fmt: skip
        return {ours: saved.get(theirs) for ours, theirs in names.items()}
    lora = recipe.get("lora")
    return lora if isinstance(lora, Mapping) else None


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {}  # chatretriever's too: its package root imports the method rooms (lazy exports)
    for package in ("chatretriever", "torch", "transformers"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return out


def _model_identity(model: Any) -> tuple[str | None, str | None]:
    """(fingerprint, precision) of a model that computes one (ChatRetriever, UniConv)."""
    fingerprint = getattr(model, "fingerprint", None)
    if not isinstance(fingerprint, str):
        return None, None
    dtype = str(getattr(model, "compute_dtype", ""))
    return fingerprint, {"torch.bfloat16": "bf16", "torch.float32": "fp32"}.get(dtype)


def _read_log(path: Path) -> list[dict[str, Any]]:
    return [row for _, row in iter_jsonl(path)] if path.is_file() else []


def is_replaceable(path: Path) -> bool:
    """Whether the README at `path` may be written over: our own card (its first line is
    `MARKER`) or peft's unfilled template; one that cannot be read is kept."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    if text.startswith(MARKER):
        return True
    front, _, body = text.partition("\n---\n")
    return (
        text.startswith("---\n")
        and "library_name: peft" in front
        and "# Model Card for Model ID" in body
    )


def write_run_card(
    output_dir: str | Path,
    spec: CardSpec,
    recipe: Any,
    training: Mapping[str, Any],
    log_history: Sequence[Mapping[str, Any]] | None = None,
    n_examples: int | None = None,
    model: Any = None,
    staging: str | Path | None = None,
) -> Path | None:
    """Write the model card of a finished run (the hook of each training command's final save).

    Args:
        output_dir: The run's output directory.
        spec: The method's `CardSpec`.
        recipe: The resolved recipe (a config with `to_dict()`, or its mapping).
        training: The training settings used; missing ones count as `TRAINING_DEFAULTS`.
        log_history: The log rows (default: read from `output_dir`'s `train_log.jsonl`).
        n_examples: Training examples used.
        model: The trained model (its fingerprint, when it has one).
        staging: The final save's staging dir (`run_dir.final_save`), moved into `output_dir`
            with the model: the card is written there.

    Returns:
        The card's path, or None when it was not written (a README.md of someone else's is in
        `output_dir`, or the card failed to render: warned, the old file kept).
    """
    out = Path(output_dir)
    where = Path(staging) if staging is not None else out
    existing = out / CARD_FILE
    if existing.is_file() and not is_replaceable(existing):
        logger.warning("%s was not written by chatretriever: kept, no model card written (move "
                       "it away to get one)", existing)  # fmt: skip
        _drop_staged(staging)
        return None
    try:
        raw = recipe.to_dict() if hasattr(recipe, "to_dict") else dict(recipe)
        fingerprint, precision = _model_identity(model)
        facts = CardFacts(
            output_dir=str(output_dir),
            spec=spec,
            recipe=raw,
            # the trainer fills unset fields from these (`trainer.training_arguments`)
            training={**TRAINING_DEFAULTS, **training},
            log_history=_read_log(out / LOG_FILE) if log_history is None else log_history,
            n_examples=n_examples,
            base=base_model_facts(raw["model"]) if raw.get("model") else None,
            lora=_saved_lora(where, raw),
            fingerprint=fingerprint,
            precision=precision,
            versions=_versions(),
            date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        )
        text = render_card(facts)
        with atomic_write(where / CARD_FILE) as f:
            f.write(text)
    except Exception as e:  # any: a card must never cost the trained model
        logger.warning("no model card written for %s: %s: %s", out, type(e).__name__, e)
        _drop_staged(staging)
        return None
    return where / CARD_FILE


def _drop_staged(staging: str | Path | None) -> None:
    """Remove the README a model's own save (peft's template) put in the staging dir, so that
    the output dir's README.md stays as it is."""
    if staging is not None:
        (Path(staging) / CARD_FILE).unlink(missing_ok=True)


def write_trainer_card(
    output_dir: str | Path, spec: CardSpec, recipe: Any, trainer: Any, staging: str | Path | None
) -> Path | None:
    """`write_run_card` with what a transformers Trainer knows: its arguments, log history,
    training set and (unwrapped) model."""
    args = trainer.args
    dataset = trainer.train_dataset
    return write_run_card(
        output_dir,
        spec,
        recipe,
        {**args.to_dict(), "world_size": args.world_size},
        trainer.state.log_history,
        n_examples=None if dataset is None else len(dataset),
        model=trainer.accelerator.unwrap_model(trainer.model),
        staging=staging,
    )
