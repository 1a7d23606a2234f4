"""The model directories of an `emb_llm.EmbLLM`: reading a base model or a saved retriever into
one, and writing one (`EmbLLM.from_pretrained`, `save_pretrained`, `load_trainable_state` call
these functions).

Saved directory layout (`save_pretrained`; the config file's name is the method's `SAVED_CONFIG`):
    <method>.json               resolved RetrieverConfig + LoraSettings + format + EMB token ids
                                + the base model's weight fingerprint (checked on load)
    tokenizer files             the tokenizer with the EMB tokens
    adapter_model.safetensors   format "adapter": LoRA weights + the EMB rows only (peft
    adapter_config.json         `trainable_token_indices`; the embedding matrix is NOT saved)
    model.safetensors           formats "merged" / "full": the whole model
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from chatretriever.config import LoraSettings, RetrieverConfig
from chatretriever.io.atomic import atomic_files, atomic_write
from chatretriever.io.files import read_json
from chatretriever.modeling.adapters import (
    ADAPTER_WEIGHTS,
    check_adapter_keys,
    is_peft,
    load_adapter,
    resize_and_init,
    wrap_lora,
)
from chatretriever.modeling.fingerprint import model_fingerprint
from chatretriever.modeling.saved import checked_base_fingerprint, continued_settings
from chatretriever.modeling.template import add_emb_tokens, pooled_token_ids

if TYPE_CHECKING:
    from chatretriever.modeling.emb_llm import EmbLLM

E = TypeVar("E", bound="EmbLLM")

FORMATS = ("adapter", "merged", "full")
# The weight files of every format: a save removes those an earlier save (in another format, or
# with more shards) left, or a loader could pick them (transformers loads a stale adapter_config).
STALE_WEIGHT_FILES = (
    "adapter_config.json",
    "adapter_model.*",
    "model.safetensors",
    "model.safetensors.index.json",
    "model-*-of-*.safetensors",
)


# ---------------------------------------------------------------------- reading
def load_new(
    cls: type[E],
    base: str,
    config: RetrieverConfig | None,
    lora: LoraSettings | None,
    overrides: Mapping[str, Any],
) -> E:
    """A new, untrained retriever on the base chat LLM `base` (EMB tokens added unless pooling is
    "eos", LoRA wrapped).

    Args:
        cls: The EmbLLM class to build (its `NAME_PREFIX` names the model).
        base: The base model (a resolved local path, or a built-in name / .gguf as given).
        config: Its settings (default RetrieverConfig()); base_model becomes `base`.
        lora: Its LoRA (default LoraSettings(); enabled=False = full fine-tuning).
        overrides: RetrieverConfig fields to change.

    Returns:
        The retriever, on the device the backbone loaded on, weights in fp32.
    """
    cfg = replace(config or RetrieverConfig(), base_model=base, **overrides)
    lora = lora if lora is not None else LoraSettings()
    base_fp = model_fingerprint(cfg.base_model)
    model, tokenizer = load_backbone_fp32(cfg.base_model, cfg)
    new_rows = _new_rows(tokenizer, cfg, add=True)
    if new_rows:
        resize_and_init(model, tokenizer, new_rows, cfg.emb_init)
    if lora.enabled:
        model = wrap_lora(model, lora, new_rows)
    name = f"{cls.NAME_PREFIX}/{Path(base).name}"
    return cls(model, tokenizer, cfg, lora, name=name, base_fingerprint=base_fp)


def load_saved(
    cls: type[E],
    path: Path,
    is_trainable: bool,
    overrides: Mapping[str, Any],
    config: RetrieverConfig | None = None,
    lora: LoraSettings | None = None,
    config_file: str | None = None,
) -> E:
    """The retriever a `save_pretrained` directory holds (see the module's layout).

    Args:
        cls: The EmbLLM class to build (its `SAVED_CONFIG` is read, `NAME_PREFIX` names it).
        path: The saved directory.
        is_trainable: For an adapter: load it trainable (to continue training).
        overrides: RetrieverConfig fields to change (`saved.continued_settings` checks them).
        config: Settings to continue with, or None for the saved ones.
        lora: LoRA settings to continue with, or None for the saved ones.
        config_file: The saved config to read (default `cls.SAVED_CONFIG`; another method's
            on the same body when `cls` starts from that method's model).

    Returns:
        The retriever, weights in fp32.

    Raises:
        ValueError: An unknown format, settings that contradict the saved weights, a tokenizer
            whose EMB ids differ from the saved ones, or an adapter's base model with other
            weights than the one it was trained on.
    """
    config_path = path / (config_file or cls.SAVED_CONFIG)
    saved = read_json(config_path)
    fmt = saved["format"]
    if fmt not in FORMATS:
        raise ValueError(f"{config_path}: unknown format {fmt!r}")
    lora_given = lora is not None
    cfg, lora = continued_settings(path, saved, config, lora, overrides)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    emb_ids = pooled_token_ids(tokenizer, cfg.n_emb_tokens, cfg.pooling)
    if emb_ids != list(saved["emb_token_ids"]):
        raise ValueError(f"{path}: tokenizer EMB ids {emb_ids} != saved {saved['emb_token_ids']}")
    base_fp = saved.get("base_fingerprint")
    if fmt == "adapter":
        base_fp = checked_base_fingerprint(path, cfg.base_model, base_fp)
        model, _ = load_backbone_fp32(cfg.base_model, cfg)
        new_rows = _new_rows(tokenizer, cfg, add=False)
        if new_rows:
            resize_and_init(model, tokenizer, new_rows, cfg.emb_init)
        model = load_adapter(model, path, is_trainable, lora if lora_given else None, new_rows)
    else:
        model, _ = load_backbone_fp32(str(path), cfg)
    name = f"{cls.NAME_PREFIX}/{path.resolve().name}"
    retriever = cls(model, tokenizer, cfg, lora, name=name, base_fingerprint=base_fp)
    if fmt != "adapter":
        retriever.merged_from = saved.get("merged_from")
    return retriever


def _new_rows(tokenizer: Any, cfg: RetrieverConfig, add: bool) -> list[int]:
    """The vocabulary rows the retriever adds and trains: its EMB tokens (added to `tokenizer`
    when `add`), or none under pooling "eos" (the tokenizer's own token is pooled)."""
    if cfg.pooling == "eos":
        return []
    if add:
        return add_emb_tokens(tokenizer, cfg.n_emb_tokens)
    return pooled_token_ids(tokenizer, cfg.n_emb_tokens, cfg.pooling)


def refuse_other_saved(cls: type, path: Path) -> None:
    """Refuse a directory that holds a saved model this class cannot load (another method's
    saved config, or a LoRA adapter without any): it is not a base model either.

    Raises:
        ValueError: Naming the directory, what it holds and the class asked for.
    """
    if not path.is_dir():
        return
    for f in sorted(path.glob("*.json")):
        if f.stat().st_size > 1 << 20:  # a tokenizer, not a saved config (a few hundred bytes)
            continue
        try:
            saved = read_json(f)
        except (OSError, ValueError):
            continue
        if isinstance(saved, dict) and "emb_token_ids" in saved and "format" in saved:
            method = saved.get("method", f.stem)
            raise ValueError(
                f"{path} holds a saved {method} model ({f.name}), not a {cls.__name__} "
                f"({cls.SAVED_CONFIG}): load it with that method's class"
            )
    if (path / "adapter_config.json").is_file():
        from chatretriever.modeling.run_dir import save_leftovers

        if any((p / cls.SAVED_CONFIG).is_file() for p in save_leftovers(path)):
            # killed between the final save's two marker renames (`run_dir.final_save`)
            raise ValueError(
                f"{path}: its final save was killed before {cls.SAVED_CONFIG} was moved in "
                "(it is still in a .tmp/.old directory there): rerun the training with "
                "--resume, which saves the model again"
            )
        raise ValueError(
            f"{path} is a LoRA adapter without {cls.SAVED_CONFIG}: not a saved "
            f"{cls.__name__} and not a base model"
        )


def load_trained_weights(model: Any, directory: Path) -> None:
    """Load the weights a `save_pretrained` dir holds into `model`, in place (resume).

    Args:
        model: The causal LM (peft-wrapped under LoRA: then the adapter and the EMB rows are
            loaded; else the whole model).
        directory: The saved directory.

    Raises:
        ValueError: Weights that do not match the model.
    """
    if is_peft(model):
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        state = load_file(str(directory / ADAPTER_WEIGHTS))
        check_adapter_keys(model, state, directory / ADAPTER_WEIGHTS)  # before loading
        set_peft_model_state_dict(model, state)
        return
    if (directory / "model.safetensors").is_file():
        from safetensors.torch import load_file

        state = load_file(str(directory / "model.safetensors"))
        missing, unexpected = model.load_state_dict(state, strict=False)
    else:  # a sharded save (model.safetensors.index.json)
        missing, unexpected = _load_sharded_checkpoint()(model, str(directory), strict=False)
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    if unexpected or set(missing) - tied - {"lm_head.weight"}:
        raise ValueError(f"{directory}: weights do not match (missing {list(missing)[:5]})")


def _load_sharded_checkpoint() -> Any:
    """transformers' `load_sharded_checkpoint` (in `trainer_utils` since transformers 5,
    `modeling_utils` before)."""
    try:
        from transformers.trainer_utils import load_sharded_checkpoint
    except ImportError:
        from transformers.modeling_utils import load_sharded_checkpoint
    return load_sharded_checkpoint


def load_backbone_fp32(name_or_path: str, cfg: RetrieverConfig) -> tuple[Any, Any]:
    """(causal LM in fp32, tokenizer) via `backbones.load_backbone` (built-in names, GGUF files
    and plain Hugging Face dirs alike)."""
    from chatretriever.modeling.backbones import load_backbone

    return load_backbone(
        name_or_path,
        kind="causal",
        dtype=torch.float32,
        attn_implementation=cfg.attn_implementation,
        trust_remote_code=cfg.trust_remote_code,
    )


# ---------------------------------------------------------------------- writing
def save_retriever(retriever: EmbLLM, target: Path, merged: bool) -> str:
    """Write `retriever` into `target` atomically (`atomic_files`; adapter_config.json, then
    SAVED_CONFIG last).

    Only a previous saved retriever's weight files (`STALE_WEIGHT_FILES`) are removed, never
    those of a base model that shares the directory; its other entries are kept.

    Args:
        retriever: The model to save.
        target: Output directory (created).
        merged: Under LoRA, merge the adapter (and EMB rows) into full weights.

    Returns:
        The saved format ("adapter", "merged" or "full").
    """
    previous = (target / retriever.SAVED_CONFIG).is_file()
    own = previous and not same_dir(target, retriever.config.base_model)
    stale = STALE_WEIGHT_FILES if own else ()
    # adapter_config.json is a finished-run marker too (`run_dir`): it goes in just before
    # SAVED_CONFIG, after the weights and the tokenizer
    last = ("adapter_config.json", retriever.SAVED_CONFIG)
    with atomic_files(target, last=last, stale=stale) as staging:
        fmt = write_saved_files(retriever, staging, merged)
    return fmt


def write_saved_files(retriever: EmbLLM, out: Path, merged: bool) -> str:
    """Write the weights, the tokenizer and SAVED_CONFIG into the empty dir `out`.

    Returns:
        The saved format ("adapter", "merged" or "full").
    """
    model = retriever.model
    if is_peft(model) and not merged:
        # adapter_config.json names the base as the config does (a built-in name stays a name),
        # not the local cache directory the base was loaded from.
        for peft_config in model.peft_config.values():
            peft_config.base_model_name_or_path = retriever.config.base_model
        model.save_pretrained(out, save_embedding_layers=False, safe_serialization=True)
        fmt = "adapter"
    elif is_peft(model):
        merged_model = copy.deepcopy(model).merge_and_unload()
        merged_model.save_pretrained(out)
        merged_from = retriever.merged_identity(merged_model.state_dict())
        fmt = "merged"
    else:
        model.save_pretrained(out)
        fmt = "full"
    retriever.tokenizer.save_pretrained(out)
    meta = {
        "format": fmt,
        "method": retriever.NAME_PREFIX,
        "retriever": retriever.config.to_dict(),
        "lora": retriever.lora.to_dict(),
        "emb_tokens": retriever.tokenizer.convert_ids_to_tokens(list(retriever.emb_ids)),
        "emb_token_ids": list(retriever.emb_ids),
        "dim": retriever.dim,
        # Checked when the adapter is loaded: it must land on the base it was trained on.
        "base_fingerprint": retriever.base_fingerprint,
    }
    if fmt == "merged":  # the adapter's identity, kept while the weights are these (`fingerprint`)
        meta["merged_from"] = merged_from
    elif retriever.merged_from:  # a merged model saved again whole: still the same function
        meta["merged_from"] = retriever.merged_from
    # Written last: a directory without it is not a (complete) saved retriever.
    with atomic_write(out / retriever.SAVED_CONFIG) as f:
        json.dump(meta, f, indent=2)
    return fmt


def same_dir(directory: Path, name_or_path: str) -> bool:
    """Whether `name_or_path` (a model name or path) is `directory`."""
    try:
        return Path(name_or_path).resolve() == directory.resolve()
    except OSError:
        return False
