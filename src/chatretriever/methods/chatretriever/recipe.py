"""A training recipe: one YAML file that says everything a CSIT run needs, and the run itself.

    model: smollm2-135m-instruct        # base chat LLM (built-in name, HF dir, .gguf) or saved dir
    output_dir: runs/chatretriever-smol
    retriever: {n_emb_tokens: 3, max_session_len: 384, ...}     # RetrieverConfig
    loss: {alpha: 0.3, temperature: 0.01, session_mask: csit}  # LossConfig
    lora: {r: 16, alpha: 32}          # LoraSettings (enabled: false = full fine-tuning)
    data:
      query: session                    # or last_turn (the contrastive-only last-turn ablation)
      files:
        - {path: outputs/train/topiocqa.jsonl}
        - {path: outputs/train/mtrag.jsonl, repeat: 10}
    training: {max_steps: 500, per_device_train_batch_size: 16, ...}  # TrainingArguments

A recipe may start with `base: other.yaml` (a path relative to it): the other recipe is read
first and this one's keys replace or extend it, so an ablation names only what it changes.
Relative data paths are read from the directory the command runs in. `--set key.sub=value`
overrides any field (the value is parsed as YAML). The resolved recipe is saved beside the model
as `train_config.yaml`; the ablations of the paper are recipes that differ in one value.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from chatretriever.config import LoraSettings, LossConfig, RetrieverConfig, _from_dict
from chatretriever.errors import DataFormatError
from chatretriever.io.files import atomic_write

logger = logging.getLogger(__name__)

SAVED_RECIPE = "train_config.yaml"
LOG_FILE = "train_log.jsonl"


@dataclass
class DataFile:
    """One training JSONL file and how many times its examples are listed per epoch."""

    path: str
    repeat: int = 1
    limit: int | None = None  # use only the first `limit` examples

    def __post_init__(self) -> None:
        if self.repeat < 1:
            raise ValueError(f"data file {self.path}: repeat must be >= 1, got {self.repeat}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"data file {self.path}: limit must be >= 1, got {self.limit}")


@dataclass
class DataSettings:
    """Training files and the query side's formulation."""

    files: list[DataFile] = field(default_factory=list)
    query: str = "session"

    def __post_init__(self) -> None:
        self.files = [f if isinstance(f, DataFile) else _from_dict(DataFile, f) for f in self.files]
        if not self.files:
            raise ValueError("data.files must list at least one training JSONL file")
        if self.query not in ("session", "last_turn"):
            raise ValueError(f"data.query must be 'session' or 'last_turn', got {self.query!r}")


@dataclass
class TrainConfig:
    """The whole recipe of one training run (see the module docstring)."""

    model: str
    output_dir: str
    data: DataSettings
    retriever: RetrieverConfig = field(default_factory=RetrieverConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    training: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        d = dict(data)
        for key in ("model", "output_dir", "data"):
            if key not in d:
                raise ValueError(f"missing required key {key!r}")
        parts = {
            "data": DataSettings,
            "retriever": RetrieverConfig,
            "loss": LossConfig,
            "lora": LoraSettings,
        }
        for key, kind in parts.items():
            if key in d:
                if not isinstance(d[key], Mapping):
                    raise ValueError(f"{key} must be a mapping, got {type(d[key]).__name__}")
                d[key] = _from_dict(kind, d[key])
        if "retriever" in d:  # the base model is named once, by `model`
            d["retriever"].base_model = str(d["model"])
        if not isinstance(d.get("training", {}), Mapping):
            raise ValueError("training must be a mapping of TrainingArguments fields")
        return _from_dict(cls, d)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["lora"] = self.lora.to_dict()
        return out


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply `key.sub=value` overrides (values parsed as YAML) to a raw recipe dict."""
    import yaml

    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {item!r}: expected key=value, e.g. loss.alpha=0")
        node = raw
        *path, leaf = key.split(".")
        for part in path:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ValueError(f"--set {item!r}: {part!r} is not a mapping")
            node = child
        node[leaf] = yaml.safe_load(value)
    return raw


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A raw recipe; a `base: other.yaml` key (relative to this file) is merged under it."""
    import yaml

    if path.resolve() in seen:
        raise DataFormatError(path, "recipes include each other in a loop (base:)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = None if mark is None else mark.line + 1
        raise DataFormatError(path, f"not valid YAML: {e}", line=line) from e
    if not isinstance(raw, dict):
        raise DataFormatError(path, "a recipe must be a YAML mapping")
    base = raw.pop("base", None)
    if base is None:
        return raw
    parent = _read_yaml(path.parent / str(base), (*seen, path.resolve()))
    return _deep_merge(parent, raw)


def _deep_merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value  # scalars and lists replace
    return out


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a YAML recipe (and its `base:` chain), apply overrides and validate it.

    Raises:
        DataFormatError: naming the file and what is wrong.
    """
    path = Path(path)
    raw = _read_yaml(path)
    try:
        return TrainConfig.from_dict(apply_overrides(raw, overrides))
    except (TypeError, ValueError) as e:
        raise DataFormatError(path, str(e)) from e


def save_recipe(config: TrainConfig, directory: str | Path) -> Path:
    """Write the resolved recipe as YAML into `directory`."""
    import yaml

    out = Path(directory) / SAVED_RECIPE
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(out) as f:
        yaml.safe_dump(config.to_dict(), f, sort_keys=False)
    return out


def load_examples(settings: DataSettings) -> list[tuple[list[Any], int]]:
    """(examples, repeat) per data file."""
    from itertools import islice

    from chatretriever.methods.chatretriever.data import iter_training_examples

    parts = []
    for f in settings.files:
        examples = list(islice(iter_training_examples(f.path), f.limit))
        logger.info("%s: %d examples x %d", f.path, len(examples), f.repeat)
        parts.append((examples, f.repeat))
    return parts


def run_training(config: TrainConfig, resume: bool = False) -> Path:
    """Train a ChatRetriever with CSIT as the recipe says; returns the saved model dir.

    Args:
        config: The recipe.
        resume: Continue from the newest checkpoint in `output_dir` (a fresh start if none).

    Returns:
        `output_dir`, holding the final model, the resolved recipe and the training log.
    """
    from transformers import set_seed
    from transformers.trainer_utils import get_last_checkpoint

    from chatretriever.methods.chatretriever.model import ChatRetriever
    from chatretriever.methods.chatretriever.train import (
        CsitTrainer,
        TrainingSet,
        make_collator,
        training_arguments,
    )

    out = Path(config.output_dir)
    args = training_arguments(out, config.training)
    checkpoint = get_last_checkpoint(str(out)) if resume and out.is_dir() else None
    if resume and checkpoint is None:
        logger.info("no checkpoint in %s: starting from scratch", out)
    dataset = TrainingSet(load_examples(config.data))
    set_seed(args.seed)  # LoRA's random init comes before the Trainer seeds anything
    retriever = ChatRetriever.from_pretrained(
        config.model, config=config.retriever, lora=config.lora, device="cpu"
    )
    if args.process_index == 0:
        save_recipe(config, out)
    trainer = CsitTrainer(
        model=retriever,
        args=args,
        train_dataset=dataset,
        data_collator=make_collator(retriever, config.loss, config.data.query),
        loss_config=config.loss,
    )
    trainer.train(resume_from_checkpoint=checkpoint)
    if args.process_index == 0:
        trainer.accelerator.unwrap_model(trainer.model).save_pretrained(out)
        save_recipe(config, out)
        write_log(out / LOG_FILE, trainer.state.log_history)
    trainer.accelerator.wait_for_everyone()
    return out


def write_log(path: Path, history: Sequence[Mapping[str, Any]]) -> None:
    """The Trainer's log history as JSON lines (one logged step per line)."""
    with atomic_write(path) as f:
        for row in history:
            f.write(json.dumps(dict(row)) + "\n")
