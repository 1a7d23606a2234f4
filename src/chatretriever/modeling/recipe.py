"""The recipe machinery every training method shares: YAML recipes, `--set`, run files, resume.

A recipe is one YAML mapping that says everything a run needs; each method turns the raw mapping
into its own validated config (`load_config(path, TrainConfig.from_dict, overrides)`).

- `base: other.yaml` (a path relative to the recipe): the other recipe is read first and this
  one's keys replace or extend it (mappings merge key by key; scalars and lists replace), so an
  ablation names only what it changes. A loop of bases is an error.
- `--set key.sub=value` overrides any field (the value is parsed as YAML).
- Numbers in exponent form without a dot (`2e-4`, `1E5`) are floats, in recipes and in `--set`
  (plain PyYAML follows YAML 1.1 and reads them as strings).
- A key given twice in one mapping (two `loss:` sections) is an error naming its line (plain
  PyYAML keeps the last one and drops the first without a word).
- The resolved recipe is saved beside the model as `train_config.yaml` (`save_recipe`) and the
  Trainer's log history as `train_log.jsonl` (`write_log`).
- `data.files` lists the training JSONL files: `DataFile` (path, repeat, limit), read by the
  method's own example reader (`load_examples`); the `data:` section is `recipe_data`'s.
- `resume_checkpoint`: the newest `checkpoint-N` in the output dir when resuming.

Torch-free: yaml and transformers are imported only where they are needed.
"""

from __future__ import annotations

import functools
import json
import logging
import shutil
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

from chatretriever.config import _from_dict
from chatretriever.errors import DataFormatError
from chatretriever.io.atomic import atomic_write
from chatretriever.modeling.recipe_data import cap_sources, load_examples

logger = logging.getLogger(__name__)

SAVED_RECIPE = "train_config.yaml"
LOG_FILE = "train_log.jsonl"

T = TypeVar("T")

# this project's TrainingArguments defaults, under a recipe's `training:` (`training_arguments`)
TRAINING_DEFAULTS: dict[str, Any] = {
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


class RecipeConfig(Protocol):
    """A validated recipe: `to_dict()` gives the mapping `save_recipe` writes."""

    def to_dict(self) -> dict[str, Any]: ...


# YAML 1.1 (PyYAML) only reads "2.0e-4" as a float; YAML 1.2 also reads "2e-4", "1E5", "+3e2".
_EXPONENT_FLOAT = r"^[-+]?[0-9]+(?:\.[0-9]*)?[eE][-+]?[0-9]+$"


@functools.cache
def _loader() -> type:
    """A SafeLoader that also reads exponent numbers without a dot as floats and refuses a key
    given twice in one mapping (built once)."""
    import re

    import yaml

    class _Loader(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
            # PyYAML keeps the last of two equal keys: a recipe's second `loss:` section (or a
            # key written twice in one) would silently drop the first one's values
            seen: set[Any] = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<:` merges, it may repeat keys
                    continue
                key = self.construct_object(key_node, deep=True)
                if not isinstance(key, Hashable):
                    continue  # the base constructor refuses it, with its own message
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        "while reading a mapping",
                        node.start_mark,
                        f"the key {key!r} is given twice (the first would be ignored)",
                        key_node.start_mark,
                    )
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    _Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float", re.compile(_EXPONENT_FLOAT), list("-+0123456789")
    )
    return _Loader


def yaml_load(text: str) -> Any:
    """`yaml.safe_load`, reading exponent numbers without a dot ("2e-4") as floats.

    Raises:
        yaml.YAMLError: not valid YAML, or a key given twice in one mapping.
    """
    import yaml

    return yaml.load(text, Loader=_loader())  # noqa: S506 (a SafeLoader subclass)


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply `key.sub=value` overrides (values parsed as YAML) to a raw recipe dict.

    Raises:
        ValueError: naming the `--set` item (no `=`, a path through a scalar, invalid YAML).
    """
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
        try:
            node[leaf] = yaml_load(value)
        except yaml.YAMLError as e:
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ValueError(f"--set {item!r}: the value is not valid YAML ({problem})") from None
    return raw


def read_recipe(path: str | Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A raw recipe; a `base: other.yaml` key (relative to this file) is merged under it.

    Raises:
        DataFormatError: not valid YAML, not a mapping, or a loop of bases.
    """
    import yaml

    path = Path(path)
    if path.resolve() in seen:
        raise DataFormatError(path, "recipes include each other in a loop (base:)")
    try:
        raw = yaml_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = None if mark is None else mark.line + 1
        raise DataFormatError(path, f"not valid YAML: {e}", line=line) from e
    if not isinstance(raw, dict):
        raise DataFormatError(path, "a recipe must be a YAML mapping")
    base = raw.pop("base", None)
    if base is None:
        return raw
    parent = read_recipe(path.parent / str(base), (*seen, path.resolve()))
    return deep_merge(parent, raw)


def deep_merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """`base` updated by `top`: nested mappings merge key by key; scalars, lists and an EMPTY
    mapping replace (`caps: {}` clears the base's caps; merged key by key it would do nothing)."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and value and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value  # scalars and lists replace
    return out


def recipe_from_dict(cls: type[T], data: Mapping[str, Any], sections: Mapping[str, type]) -> T:
    """Build a recipe dataclass: `model`, `output_dir` and `data` required, each of `sections`
    ({key: dataclass}) parsed from its mapping, `training` a mapping of TrainingArguments, and a
    `retriever` section (when present) told the base model (named once, by `model`).

    Raises:
        ValueError: naming the missing or malformed key.
    """
    d = dict(data)
    for key in ("model", "output_dir", "data"):
        if key not in d:
            raise ValueError(f"missing required key {key!r}")
    if not isinstance(d["output_dir"], str) or not d["output_dir"].strip():
        # an empty one (`--set output_dir=$OUT` with OUT unset) would train into the cwd
        raise ValueError(f"output_dir must be a directory path, got {d['output_dir']!r}")
    retriever = d.get("retriever")
    named = retriever.get("base_model") if isinstance(retriever, Mapping) else None
    if named is not None and str(named) != str(d["model"]):
        raise ValueError(
            f"retriever.base_model ({named!r}) differs from model ({d['model']!r}): the base "
            "model is named once, by `model:`"
        )
    for key, kind in sections.items():
        if key in d:
            if not isinstance(d[key], Mapping):
                raise ValueError(f"{key} must be a mapping, got {type(d[key]).__name__}")
            d[key] = _from_dict(kind, d[key])
    if "retriever" in d and hasattr(d["retriever"], "base_model"):
        d["retriever"].base_model = str(d["model"])
    if not isinstance(d.get("training", {}), Mapping):
        raise ValueError("training must be a mapping of TrainingArguments fields")
    check_training_settings(d.get("training", {}))
    return _from_dict(cls, d)


def check_training_settings(settings: Mapping[str, Any]) -> None:
    """The `training:` section against transformers' TrainingArguments, before any model loads
    (and in `--dry-run`): unknown fields (with the closest name), values of the wrong simple type,
    and step and batch counts that train nothing.

    Raises:
        ValueError: naming `training.<field>`.
    """
    import dataclasses
    import difflib
    import typing

    from transformers import TrainingArguments

    from chatretriever.config import check_value

    known = {f.name for f in dataclasses.fields(TrainingArguments) if f.init}
    try:
        hints = typing.get_type_hints(TrainingArguments)
    except (NameError, TypeError):
        hints = {}
    for key, value in settings.items():
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"training.{key}: not a TrainingArguments field{hint}")
        if key in _NOT_TRAINING_SETTINGS and value not in (None, False):
            raise ValueError(f"training.{key}: {_NOT_TRAINING_SETTINGS[key]}")
        _check_choice_field(f"training.{key}", value, hints.get(key))
        check_value(f"training.{key}", value, hints.get(key))
    steps = settings.get("max_steps")
    if isinstance(steps, int) and (steps == 0 or steps < -1):
        raise ValueError(f"training.max_steps: expected >= 1 (or -1: train by epochs), got {steps}")
    for key in ("per_device_train_batch_size", "gradient_accumulation_steps"):
        value = settings.get(key)
        if isinstance(value, int) and value < 1:
            raise ValueError(f"training.{key}: expected >= 1, got {value}")
    rate = settings.get("learning_rate")
    if isinstance(rate, (int, float)) and not isinstance(rate, bool) and rate < 0:
        # AdamW refuses it too, but only once the model has loaded
        raise ValueError(f"training.learning_rate: expected >= 0, got {rate}")


# TrainingArguments fields a recipe sets elsewhere (the trainer would override or refuse them)
_NOT_TRAINING_SETTINGS = {
    "output_dir": "the output directory is the recipe's top-level `output_dir`",
    "bf16": "precision is set by the recipe's dtype (bf16 autocast by default), not training.bf16",
    "fp16": "precision is set by the recipe's dtype (bf16 autocast by default), not training.fp16",
}


def _check_choice_field(name: str, value: Any, hint: Any) -> None:
    """Raise ValueError when `value` is not one of the choices of an enum-typed field
    (`optim`, `lr_scheduler_type`, `save_strategy`, ...); a YAML 1.1 boolean (a bare `no`
    reads as false) is named as such."""
    import enum
    import typing

    kinds = typing.get_args(hint) or (hint,)
    choices = next(
        ([e.value for e in k] for k in kinds if isinstance(k, type) and issubclass(k, enum.Enum)),
        None,
    )
    if choices is None or value is None or value in choices:
        return
    if isinstance(value, bool):
        raise ValueError(
            f"{name}: got {str(value).lower()} (YAML reads a bare no/yes/off/on as a boolean): "
            f"quote it in YAML, e.g. --set \"{name}='no'\" (the shell keeps the inner quotes); "
            f"one of {choices}"
        )
    if not isinstance(value, enum.Enum):
        raise ValueError(f"{name}: {value!r} is not one of {choices}")


def load_config(
    path: str | Path, build: Callable[[dict[str, Any]], T], overrides: Sequence[str] = ()
) -> T:
    """Read a YAML recipe (and its `base:` chain), apply overrides and validate it with `build`.

    Raises:
        DataFormatError: naming the file and what is wrong (`build`'s TypeError/ValueError too).
    """
    path = Path(path)
    raw = resolved_recipe(path, overrides)
    try:
        return build(raw)
    except (TypeError, ValueError) as e:
        raise DataFormatError(path, str(e)) from e


def resolved_recipe(path: str | Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The raw recipe (its `base:` chain read) with the `--set` overrides applied, unvalidated
    (e.g. to read its `method:` before choosing the config class).

    Raises:
        DataFormatError: naming the file (and the `--set` item) that is wrong.
    """
    path = Path(path)
    raw = read_recipe(path)
    try:
        return apply_overrides(raw, overrides)
    except ValueError as e:
        raise DataFormatError(path, str(e)) from e


def save_recipe(config: RecipeConfig, directory: str | Path) -> Path:
    """Write the resolved recipe as YAML into `directory`."""
    import yaml

    out = Path(directory) / SAVED_RECIPE
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(out) as f:
        yaml.safe_dump(config.to_dict(), f, sort_keys=False)
    return out


def write_log(path: Path, history: Sequence[Mapping[str, Any]]) -> None:
    """The Trainer's log history as JSON lines (one logged step per line)."""
    with atomic_write(path) as f:
        for row in history:
            f.write(json.dumps(dict(row)) + "\n")


# files that make an output dir a saved model (ChatRetriever, UniConv)
def prepare_llm_run(
    config: Any,
    resume: bool,
    model_cls: Any,
    overwrite: bool = False,
    read: Callable[[str], Iterable[Any]] | None = None,
) -> tuple[Any, str | None, Any, Any]:
    """What every EmbLLM training run does first: the TrainingArguments, the checkpoint to
    resume from, the training set (files x repeat, per-source caps), the seed, the trainable
    model (a saved dir: its weights, trainable) and the resolved recipe saved beside it.

    Args:
        config: A recipe with `output_dir`, `training`, `data` (`DataSettings`), `model`,
            `retriever` and `lora`.
        resume: Continue from the newest checkpoint in `output_dir`.
        model_cls: The `EmbLLM` subclass to load (`ChatRetriever`, `UniConv`).
        overwrite: Start over in an `output_dir` that holds another run (`check_output_dir`).
        read: The reader of one training file (default `io.training.iter_training_examples`).

    Returns:
        (TrainingArguments, checkpoint or None, the TrainingSet, the model on the CPU).

    Raises:
        ValueError: before the model loads or anything is written: an `output_dir` that holds
            another run, a resume with another recipe, bad data or caps, no batch to train on.
    """
    from transformers import set_seed

    from chatretriever.io.training import iter_training_examples
    from chatretriever.modeling.run_dir import (
        check_output_dir,
        check_resumed_recipe,
        remove_paths,
        resume_checkpoint,
        save_leftovers,
    )
    from chatretriever.modeling.trainer import TrainingSet, check_fills_a_batch, training_arguments

    out = Path(config.output_dir)
    stale = check_output_dir(out, resume, overwrite)  # every process, before anyone writes
    args = training_arguments(out, config.training)
    checkpoint = resume_checkpoint(out, resume)
    if checkpoint is not None:
        check_resumed_recipe(config, out)
    parts = load_examples(config.data, read or iter_training_examples)
    dataset = TrainingSet(cap_sources(parts, config.data.caps, config.data.cap_seed))
    check_fills_a_batch(len(dataset), args)
    if args.process_index == 0:
        remove_paths(stale)
        for leftover in save_leftovers(out):  # of a killed final save: never read again
            shutil.rmtree(leftover, ignore_errors=True)
            logger.warning("removed %s (left by a killed save of the model)", leftover)
    set_seed(args.seed)  # LoRA's random init comes before the Trainer seeds anything
    model = model_cls.from_pretrained(
        config.model, config=config.retriever, lora=config.lora, is_trainable=True, device="cpu"
    )
    if args.process_index == 0 and checkpoint is None:
        # a resumed run keeps the recipe it was started with until it finishes (a resume that
        # fails, e.g. with other adapter settings, must not overwrite it)
        save_recipe(config, out)
    return args, checkpoint, dataset, model
