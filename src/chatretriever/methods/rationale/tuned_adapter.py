"""A tuned reranker adapter (a LoRA directory, or a built-in name such as "rahore-smol"):
resolving it, checking it against the backbone and wording it was tuned on and its weights file
before anything loads, loading it, and the prompt budgets it was tuned with (its saved recipe):
what `BinaryChoiceReranker.from_pretrained` and the distillation teacher rely on.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from chatretriever.errors import DataFormatError
from chatretriever.methods.rationale.prompts import BUDGETS, BinaryChoicePrompt
from chatretriever.modeling.adapters import adapter_dir_problem
from chatretriever.modeling.recipe import SAVED_RECIPE, read_recipe
from chatretriever.modeling.sources import BUILTIN_MODELS, builtin, resolve_model_dir

logger = logging.getLogger(__name__)

ADAPTER_KIND = "rahore"  # the `ModelInfo.kind` of built-in tuned reranker adapters


def resolve_adapter(adapter: str | Path, base: Path | None = None) -> Path:
    """The LoRA adapter directory `adapter` names: a path or a built-in name ("rahore-smol").

    An existing path wins over a built-in of the same name (as `sources.builtin`). With `base`
    (the directory of a saved recipe that names the adapter), a relative path is looked up under
    `base` first, then under the current directory.

    Args:
        adapter: A directory (`rerank-train` output) or a built-in adapter name.
        base: Where a relative path is looked up first.

    Returns:
        A directory holding `adapter_config.json`.

    Raises:
        FileNotFoundError: A built-in adapter that this install does not ship.
        ValueError: Nothing of that name, a built-in model of another kind, or a directory
            that is not a LoRA adapter.
    """
    path = Path(adapter).expanduser()
    tried = [base / path] if base is not None and not path.is_absolute() else []
    found = next((p for p in (*tried, path) if p.exists()), None)
    if found is None:
        info = builtin(adapter)
        if info is None or info.kind != ADAPTER_KIND:
            names = [n for n, i in BUILTIN_MODELS.items() if i.kind == ADAPTER_KIND]
            what = "no such directory" if info is None else f"a built-in {info.kind} model"
            looked = " or ".join(str(p) for p in (*tried, path))
            raise ValueError(
                f"adapter '{adapter}': {what} ({looked}), not a reranker adapter dir or one of "
                f"the built-in adapters {names}"
            )
        found = resolve_model_dir(info.name)  # FileNotFoundError when not shipped
    problem = adapter_dir_problem(found)
    if problem is not None:
        raise ValueError(f"adapter {found}: {problem}")
    return found


def _same_model(a: str | Path, b: str | Path) -> bool:
    if str(a) == str(b):
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def check_adapter_recipe(adapter_dir: Path, model: str | Path, wording: str) -> None:
    """Compare the backbone and wording an adapter was tuned with (its saved recipe's `model`
    and `wording`) with the ones it is about to be used with.

    Two different built-in backbones cannot share an adapter: refused. Any other difference
    (a local copy of the backbone, another wording) is logged as a warning, since a path may
    hold the same weights under another name.

    Raises:
        ValueError: The adapter was tuned on another built-in backbone than `model`.
    """
    recipe = adapter_dir / SAVED_RECIPE
    if not recipe.is_file():
        return
    saved = read_recipe(recipe)
    tuned_on, tuned_wording = saved.get("model"), saved.get("wording")
    if isinstance(tuned_on, str) and not _same_model(tuned_on, model):
        message = f"adapter {adapter_dir} was tuned on '{tuned_on}' ({recipe}), not on '{model}'"
        if builtin(tuned_on) is not None and builtin(model) is not None:
            raise ValueError(f"{message}: load it with model '{tuned_on}'")
        logger.warning("%s: its scores are only valid on the same weights", message)
    if isinstance(tuned_wording, str) and tuned_wording != wording:
        logger.warning(
            "adapter %s was tuned with wording '%s', used with '%s'",
            adapter_dir, tuned_wording, wording,
        )  # fmt: skip


def tuned_budgets(adapter_dir: Path) -> dict[str, int]:
    """The prompt budgets an adapter was tuned with, as its saved recipe records them.

    Args:
        adapter_dir: A LoRA adapter dir (`resolve_adapter`).

    Returns:
        {budget name: tokens} for each of `BUDGETS` the recipe records as a positive integer;
        empty without a recipe (an adapter tuned elsewhere).
    """
    recipe = adapter_dir / SAVED_RECIPE
    saved = read_recipe(recipe) if recipe.is_file() else {}
    return {k: saved[k] for k in BUDGETS if _positive_int(saved.get(k))}


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def resolve_budgets(
    adapter_dir: Path | None,
    max_document_tokens: int | None = None,
    max_query_tokens: int | None = None,
) -> dict[str, int]:
    """The prompt budgets to score with: each one given (not None), else the adapter's tuned one
    (`tuned_budgets`), else left out so that `BinaryChoicePrompt`'s default applies.

    Args:
        adapter_dir: The adapter scored with; None: no adapter.
        max_document_tokens: The document budget given by the caller; None: not given.
        max_query_tokens: The conversation budget given by the caller; None: not given.

    Returns:
        {budget name: tokens}, keyword arguments of `BinaryChoicePrompt`.
    """
    given = {"max_document_tokens": max_document_tokens, "max_query_tokens": max_query_tokens}
    explicit = {k: v for k, v in given.items() if v is not None}
    tuned = {} if adapter_dir is None else tuned_budgets(adapter_dir)
    taken = {k: v for k, v in tuned.items() if k not in explicit}
    if taken:  # the prompts the adapter saw in tuning, not the prompt's generic defaults
        logger.info("adapter %s: prompt budgets from its recipe: %s", adapter_dir, taken)
    return {**tuned, **explicit}


def check_adapter_budgets(adapter_dir: Path, prompt: BinaryChoicePrompt) -> None:
    """Warn when `prompt` cuts documents or conversations at other lengths than the adapter's
    saved recipe did in tuning (its scores were learnt on prompts of those lengths): a budget
    given explicitly wins over the tuned one (`resolve_budgets`), but not silently."""
    tuned = tuned_budgets(adapter_dir)
    other = [f"{k} {v} (tuned) vs {getattr(prompt, k)}" for k, v in tuned.items()
             if v != getattr(prompt, k)]  # fmt: skip
    if other:
        logger.warning(
            "adapter %s scores with other prompt budgets than it was tuned with: %s",
            adapter_dir, ", ".join(other),
        )  # fmt: skip


def check_adapter_weights(adapter_dir: Path) -> None:
    """Refuse an adapter dir whose weights file is missing or unreadable, before any load.

    Raises:
        DataFormatError: Naming the weights file: not found, or truncated / not safetensors.
    """
    from chatretriever.modeling.adapters import ADAPTER_WEIGHTS

    weights = adapter_dir / ADAPTER_WEIGHTS
    if not weights.is_file():
        if (adapter_dir / "adapter_model.bin").is_file():  # peft's older format
            return
        raise DataFormatError(weights, "not found (the adapter's weights)")
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(weights), "pt") as f:
            list(f.keys())
    except (SafetensorError, OSError) as e:
        raise DataFormatError(weights, f"truncated or not a safetensors file ({e})") from None


_SIZE_MISMATCH = re.compile(
    r"size mismatch for (\S+): copying a param with shape (torch\.Size\(\[[^\]]*\]\)) from "
    r"checkpoint, the shape in current model is (torch\.Size\(\[[^\]]*\]\))"
)


def load_checked_adapter(model: Any, adapter_dir: Path, name_or_path: str | Path) -> Any:
    """`model` with the adapter in `adapter_dir` loaded for inference.

    Raises:
        ValueError: One line when its weights have other shapes than this backbone's (an
            adapter tuned on another model).
    """
    from chatretriever.modeling.adapters import load_adapter

    try:
        return load_adapter(model, adapter_dir, is_trainable=False)
    except RuntimeError as e:
        found = _SIZE_MISMATCH.search(str(e))
        if found is None:
            raise
        param, saved, here = found.groups()
        raise ValueError(
            f"adapter {adapter_dir} does not fit the backbone '{name_or_path}': it was tuned on "
            f"a model of other sizes ({param.removeprefix('base_model.model.')}: "
            f"{saved.removeprefix('torch.Size')} in the adapter, "
            f"{here.removeprefix('torch.Size')} here)"
        ) from None
