"""The model card's parts and its markdown (`render_card`): what a method room says about its
models (`CardSpec`) and what a run knows (`CardFacts`), rendered section by section, each only
where its facts are known. Gathering the facts and writing README.md: `model_card`."""

from __future__ import annotations

import shlex
import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chatretriever.modeling.recipe import LOG_FILE, SAVED_RECIPE

CARD_FILE = "README.md"
MARKER = "<!-- written by chatretriever"
_MARKER_TAIL = (
    "at the end of training; the next run into this directory writes it again: delete this "
    "line to keep your edits -->"
)


@dataclass(frozen=True)
class CardSpec:
    """What a method says about the models its training command saves.

    Attributes:
        what: One sentence on what the model is ("A ChatRetriever (CSIT) session retriever").
        python: A Python snippet that loads the directory: `$dir` is its path and `$KEY` any
            top-level recipe value (`$model`, `$wording`), each as a Python string literal.
        cli: Command lines that load it, with the same fields shell-quoted.
        settings: Dotted recipe keys shown in the training table beside the training arguments
            and LoRA ("loss.temperature"); keys the recipe lacks, or that are null, are left out.
        example_unit: What one training example is ("examples", "pairs", "queries").
    """

    what: str
    python: str
    cli: tuple[str, ...] = ()
    settings: tuple[str, ...] = ()
    example_unit: str = "examples"


@dataclass(frozen=True)
class BaseModelFacts:
    """The base model as the recipe names it.

    Attributes:
        name: The recipe's `model`.
        saved_from: When `name` is a saved run (it holds `train_config.yaml`): the bases it and
            the runs it came from were trained from, nearest first.
        builtin: The built-in model at the end of that chain, if it is one.
        description: That built-in model's description in the registry.
        licence: Its licence, as `chatretriever models` lists it.
    """

    name: str
    saved_from: tuple[str, ...] = ()
    builtin: str | None = None
    description: str | None = None
    licence: str | None = None


@dataclass
class CardFacts:
    """Everything a card says; a field left at its default is left out of the card.

    Attributes:
        output_dir: The model directory (as the recipe gives it: the usage lines load it).
        spec: The method's `CardSpec`.
        recipe: The resolved recipe (`to_dict()`, as `train_config.yaml` holds it).
        training: The training arguments used (TrainingArguments fields; `world_size` too).
        log_history: The Trainer's log rows (as `train_log.jsonl` holds them).
        n_examples: Training examples used (after repeat, limits and caps), in `example_unit`s.
        base: The base model (`base_model_facts`).
        lora: The saved adapter's settings (`r`, `alpha`, `dropout`, `target_modules`), else the
            recipe's `lora` section.
        fingerprint: The model's content fingerprint (what indexes record), if it has one.
        precision: The precision the fingerprint was computed for ("bf16", "fp32").
        versions: {package: version}.
        date: When the card was written (UTC).
    """

    output_dir: str
    spec: CardSpec
    recipe: Mapping[str, Any]
    training: Mapping[str, Any] = field(default_factory=dict)
    log_history: Sequence[Mapping[str, Any]] = ()
    n_examples: int | None = None
    base: BaseModelFacts | None = None
    lora: Mapping[str, Any] | None = None
    fingerprint: str | None = None
    precision: str | None = None
    versions: Mapping[str, str] = field(default_factory=dict)
    date: str | None = None


# --------------------------------------------------------------------------------- rendering


def _fmt(value: Any) -> str:
    """A value as the recipe spells it: floats in their shortest exact form, YAML booleans."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, Mapping):
        return ", ".join(f"{k}: {_fmt(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value)
    return str(value)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def dotted_value(tree: Mapping[str, Any], dotted: str, missing: Any = None) -> Any:
    """The value at `a.b.c` in a nested mapping (a recipe's key as `--set` names it); `missing`
    when any part is absent."""
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return missing
        node = node[part]
    return node


def _base_phrase(base: BaseModelFacts) -> str:
    text = f"`{base.name}`"
    if base.saved_from:
        chain = " <- ".join(f"`{b}`" for b in base.saved_from)
        text += f" (a model saved by an earlier chatretriever run, trained from {chain})"
    elif base.description:
        text += f" (built in: {base.description})"
    return text


def _header(facts: CardFacts) -> list[str]:
    title = Path(facts.output_dir).resolve().name or str(facts.output_dir)
    what = facts.spec.what.rstrip(".")
    if facts.base is not None:
        what += f", trained from {_base_phrase(facts.base)}"
    version = facts.versions.get("chatretriever")
    marker = " ".join(p for p in (MARKER, version, _MARKER_TAIL) if p)
    return [marker, f"# {title}", "", what + "."]


def _template_values(facts: CardFacts, quote: Callable[[str], str]) -> dict[str, str]:
    values = {k: v for k, v in facts.recipe.items() if isinstance(v, (str, int, float))}
    values["dir"] = str(facts.output_dir)
    return {k: quote(str(v)) for k, v in values.items()}


def _usage(facts: CardFacts) -> list[str]:
    """The spec's snippet and command lines with this run's values (KeyError: one it lacks)."""
    python = string.Template(facts.spec.python).substitute(_template_values(facts, repr))
    values = _template_values(facts, shlex.quote)
    cli = [string.Template(line).substitute(values) for line in facts.spec.cli]
    out = ["", "## Usage", "", "```python", python, "```"]
    if cli:
        out += ["", "```bash", *cli, "```"]
    return out


def _lora_text(lora: Mapping[str, Any]) -> str:
    if lora.get("enabled") is False:
        return "off (full fine-tuning)"
    parts = [f"{k} {_fmt(lora[k])}" for k in ("r", "alpha", "dropout") if lora.get(k) is not None]
    targets = lora.get("target_modules")
    if targets:
        targets = [targets] if isinstance(targets, str) else sorted(targets)
        parts.append("on " + ", ".join(targets))
    return ", ".join(parts)


def _training_rows(training: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """The training arguments worth a line (epochs only when they bound the run)."""
    rows = []
    steps = training.get("max_steps")
    if isinstance(steps, int) and steps > 0:
        rows.append(("training.max_steps", steps))
    elif training.get("num_train_epochs") is not None:
        rows.append(("training.num_train_epochs", training["num_train_epochs"]))
    keys = ("per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate",
            "lr_scheduler_type", "warmup_steps", "weight_decay", "seed")  # fmt: skip
    for key in keys:
        value = training.get(key)
        if value is not None and not (key == "gradient_accumulation_steps" and value == 1):
            rows.append((f"training.{key}", getattr(value, "value", value)))  # enums: their value
    if (training.get("world_size") or 1) > 1:
        rows.append(("processes", training["world_size"]))
    return rows


def _data_lines(facts: CardFacts) -> list[str]:
    data = facts.recipe.get("data")
    out = []
    if isinstance(data, Mapping):
        for f in data.get("files") or ():
            f = {"path": f} if isinstance(f, str) else f
            extras = [f"{k}: {f[k]}" for k in ("repeat", "limit") if f.get(k) not in (None, 1)]
            out.append(f"- `{f['path']}`" + (f" ({', '.join(extras)})" if extras else ""))
        for key, value in data.items():
            unset = value is None or (isinstance(value, (str, list, tuple, dict)) and not value)
            if key == "files" or unset or (key == "cap_seed" and not data.get("caps")):
                continue
            out.append(f"- `data.{key}`: {_fmt(value)}")
    if facts.n_examples is not None:
        out.append(f"- Training {facts.spec.example_unit} used: {facts.n_examples}")
    return out


def _training(facts: CardFacts) -> list[str]:
    rows = _training_rows(facts.training)
    if facts.lora is not None:
        rows.append(("LoRA", _lora_text(facts.lora)))
    settings = [(k, dotted_value(facts.recipe, k)) for k in facts.spec.settings]
    rows += [(k, v) for k, v in settings if v is not None]
    out = ["", "## Training", "", "| setting | value |", "|---|---|"]
    out += [f"| `{k}` | {_cell(_fmt(v))} |" for k, v in rows]
    data = _data_lines(facts)
    if data:
        out += ["", "Data:", "", *data]
    return out


def _loss_table(first: Mapping[str, Any], last: Mapping[str, Any]) -> list[str]:
    parts = sorted({k for row in (first, last) for k in row if k.startswith("loss_")})
    columns = ["step", "loss", *parts]
    out = ["| | " + " | ".join(f"`{c}`" for c in columns) + " |",
           "|---" * (len(columns) + 1) + "|"]  # fmt: skip
    pairs = [("first and last", first)] if first is last else [("first", first), ("last", last)]
    for name, row in pairs:
        # six significant digits: a loss is logged with float noise in its last places
        cells = [f"{v:.6g}" if isinstance(v := row.get(c, ""), float) else _fmt(v) for c in columns]
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    return out


def _log(facts: CardFacts) -> list[str]:
    history = list(facts.log_history)
    if not history:
        return []
    end = next((r for r in reversed(history) if "train_runtime" in r), None)
    steps = [r["step"] for r in history if isinstance(r.get("step"), int)]
    out = ["", "## Training log", ""]
    if steps:
        out.append(f"- Steps trained: {max(steps)}")
    if end is not None:
        out.append(f"- `train_runtime`: {_fmt(end['train_runtime'])} s")
    best = next((r for r in reversed(history) if "best_step" in r), None)
    if best is not None:
        kept = ", ".join(f"`{k}` {_fmt(v)}" for k, v in best.items() if k != "step")
        out.append(f"- Kept: {kept}")
    losses = [r for r in history if "loss" in r]
    if losses:
        out += ["", *_loss_table(losses[0], losses[-1])]
    return out


def _provenance(facts: CardFacts) -> list[str]:
    out = ["", "## Provenance", ""]
    if facts.fingerprint:
        precision = f", computed in {facts.precision}" if facts.precision else ""
        out.append(f"- Fingerprint: `{facts.fingerprint}` (what embeddings and indexes made "
                   f"with this model record{precision})")  # fmt: skip
    versions = ", ".join(f"{k} {v}" for k, v in facts.versions.items())
    if versions or facts.date:
        out.append(f"- Trained with {versions or 'chatretriever'}"
                   + (f"; card written {facts.date}" if facts.date else ""))  # fmt: skip
    out.append(f"- The full resolved recipe is `{SAVED_RECIPE}`, the loss log `{LOG_FILE}` "
               "(one logged step a line).")  # fmt: skip
    if facts.base is not None and facts.base.licence:
        source = facts.base.builtin or facts.base.name
        out += [
            "",
            "## Licence",
            "",
            f"The base model's licence: {facts.base.licence} (`{source}`, as "
            "`chatretriever models` lists it). The training data's terms apply too.",
        ]
    return out


def render_card(facts: CardFacts) -> str:
    """The card as markdown: header, usage, training settings and data, log summary,
    provenance and licence; each part only where its facts are known.

    Raises:
        KeyError: The spec's usage lines name a value the recipe does not hold.
    """
    lines = [*_header(facts), *_usage(facts), *_training(facts), *_log(facts),
             *_provenance(facts)]  # fmt: skip
    return "\n".join(lines) + "\n"
