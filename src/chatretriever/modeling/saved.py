"""What a saved ChatRetriever directory pins down: the settings its weights depend on, and the
base model its adapter was trained on.

A saved retriever can be loaded with other settings (a recipe whose `model:` is the saved dir
continues training from it, or `from_pretrained(dir, max_session_len=...)`): the settings that
shape the trained weights must stay as saved, the others follow the caller.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from chatretriever.config import LoraSettings, RetrieverConfig
from chatretriever.modeling.fingerprint import model_fingerprint

logger = logging.getLogger(__name__)

# Fields the trained weights depend on: the number of EMB rows, how the frozen EMB rows start
# (an adapter stores only their trained delta), the pooled position, and the LoRA shape.
WEIGHT_FIELDS = ("n_emb_tokens", "emb_init", "pooling")
LORA_WEIGHT_FIELDS = ("r", "alpha", "target_modules")


def continued_settings(
    path: Path,
    saved: Mapping[str, Any],
    config: RetrieverConfig | None,
    lora: LoraSettings | None,
    overrides: Mapping[str, Any],
) -> tuple[RetrieverConfig, LoraSettings]:
    """The settings of a saved retriever loaded with (a recipe's) `config`, `lora`, `overrides`.

    Args:
        path: The saved directory (for messages).
        saved: Its `chatretriever.json`.
        config: Settings to load it with, or None for the saved ones.
        lora: LoRA settings to load it with, or None for the saved ones.
        overrides: RetrieverConfig fields to change on top.

    Returns:
        (config, lora): `WEIGHT_FIELDS` and, for an adapter, `LORA_WEIGHT_FIELDS` as saved, the
        rest as given; base_model stays the saved one unless `overrides` relocate it. A merged or
        full model has LoRA disabled (its weights train as a whole).

    Raises:
        ValueError: A given field the weights depend on differs from the saved one (one line,
            naming the field as a recipe spells it, e.g. `lora.r`).
    """
    saved_cfg = RetrieverConfig.from_dict(saved["retriever"])
    saved_lora = LoraSettings.from_dict(saved["lora"])
    if saved["format"] != "adapter":
        saved_lora = replace(saved_lora, enabled=False)
    cfg = saved_cfg if config is None else replace(config, base_model=saved_cfg.base_model)
    cfg = replace(cfg, **overrides)
    for name in WEIGHT_FIELDS:
        if name == "emb_init" and saved_cfg.pooling == "eos":
            continue  # no token row is added under eos pooling: nothing was initialised
        _must_agree(path, f"retriever.{name}", getattr(saved_cfg, name), getattr(cfg, name))
    if lora is None:
        return cfg, saved_lora
    _must_agree(path, "lora.enabled", saved_lora.enabled, lora.enabled)
    if saved_lora.enabled:
        for name in LORA_WEIGHT_FIELDS:
            _must_agree(path, f"lora.{name}", getattr(saved_lora, name), getattr(lora, name))
    return cfg, lora


def _must_agree(path: Path, key: str, saved: Any, given: Any) -> None:
    same = sorted(saved) == sorted(given) if isinstance(saved, tuple) else saved == given
    if not same:
        raise ValueError(
            f"{path}: {key} is {saved!r} in the saved retriever but {given!r} here; its trained "
            f"weights depend on it (use {saved!r}, or train from a base model)"
        )


def checked_base_fingerprint(path: Path, base_model: str, recorded: str | None) -> str | None:
    """The weight fingerprint of a saved adapter's base model, checked against the recorded one.

    Args:
        path: The saved adapter directory.
        base_model: The base model it is about to be loaded on.
        recorded: The `base_fingerprint` of its `chatretriever.json` (None when saved before
            fingerprints existed: then nothing is checked).

    Returns:
        The fingerprint (None when the base has no weight files to hash).

    Raises:
        ValueError: The base model's weights differ from those the adapter was trained on.
    """
    found = model_fingerprint(base_model)
    if recorded is None:
        logger.debug("%s records no base fingerprint (saved before they existed): unchecked", path)
        return found
    if found is not None and found != recorded:
        raise ValueError(
            f"{path}: the adapter was trained on a base model with weight fingerprint {recorded}, "
            f"but {base_model} has {found}: pass base_model= the original base, or retrain"
        )
    return recorded
