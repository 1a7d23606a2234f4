"""Adapting a pretrained causal LM: new token rows in the vocabulary, LoRA via peft, and loading
a saved peft adapter."""

from __future__ import annotations

import contextlib
import shutil
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from chatretriever.config import LoraSettings
from chatretriever.errors import require_extra

ADAPTER_WEIGHTS = "adapter_model.safetensors"  # what peft's save_pretrained writes
ADAPTER_CONFIG = "adapter_config.json"


@contextlib.contextmanager
def _peft_quiet() -> Iterator[None]:
    """peft reads transformers' deprecated `is_gradient_checkpointing`: that FutureWarning is
    theirs to fix, not something a user of ours can act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=".*is_gradient_checkpointing", category=FutureWarning
        )
        yield


def adapter_dir_problem(path: str | Path) -> str | None:
    """What keeps `path` from being a saved LoRA adapter dir (None: nothing)."""
    path = Path(path)
    if not path.is_dir():
        return "not a directory"
    if not (path / ADAPTER_CONFIG).is_file():
        return f"not a LoRA adapter dir (no {ADAPTER_CONFIG})"
    return None


def is_peft(model: Any) -> bool:
    """Whether `model` is a peft-wrapped model (LoRA adapter on a base model)."""
    return hasattr(model, "get_base_model") and hasattr(model, "peft_config")


@torch.no_grad()
def resize_and_init(model: Any, tokenizer: Any, emb_ids: Sequence[int], init: str) -> None:
    """Grow the vocabulary to the tokenizer and give the new rows `emb_ids` a deterministic start:
    the eos row (`init="eos"`) or the mean of the other rows, in the input embeddings and in an
    untied LM head.

    Deterministic so that a saved adapter (which stores only the trained EMB rows) reloads onto
    exactly the same frozen matrix.
    """
    old = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > old:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    ids = torch.tensor(list(emb_ids))
    input_weight = model.get_input_embeddings().weight  # (V, H)
    keep = torch.ones(input_weight.shape[0], dtype=torch.bool)
    keep[ids] = False
    if init == "eos":
        if tokenizer.eos_token_id is None:
            raise ValueError("emb_init='eos' but the tokenizer has no eos token")
        input_weight[ids] = input_weight[tokenizer.eos_token_id]
    else:
        input_weight[ids] = input_weight[keep].mean(dim=0)
    output = model.get_output_embeddings()
    if output is not None and output.weight.data_ptr() != input_weight.data_ptr():
        # Untied LM head: the new rows get the mean output row (the token is never a target).
        output.weight[ids] = output.weight[keep].mean(dim=0)


def wrap_lora(model: Any, lora: LoraSettings, emb_ids: Sequence[int]) -> Any:
    """LoRA on `lora.target_modules`; the EMB rows train through peft's trainable tokens."""
    peft = require_extra("peft", "train", "LoRA")
    with _peft_quiet():
        return peft.get_peft_model(model, peft_lora_config(lora, emb_ids))


def peft_lora_config(
    lora: LoraSettings, emb_ids: Sequence[int] = (), task_type: str | None = "CAUSAL_LM"
) -> Any:
    """The peft `LoraConfig` of the project's LoRA settings.

    Args:
        lora: The settings; `target_modules: [all-linear]` is peft's every-linear-layer choice.
        emb_ids: Token rows trained beside the adapter (peft's trainable tokens); none if empty.
        task_type: peft's task type ("CAUSAL_LM"; None for a bare encoder).
    """
    peft = require_extra("peft", "train", "LoRA")
    targets = list(lora.target_modules)
    return peft.LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules="all-linear" if targets == ["all-linear"] else targets,
        trainable_token_indices=list(emb_ids) or None,
        task_type=task_type,
    )


def load_adapter(
    model: Any,
    path: Path,
    is_trainable: bool,
    lora: LoraSettings | None = None,
    emb_ids: Sequence[int] = (),
) -> Any:
    """Wraps `model` with the peft adapter saved in `path` (trainable when `is_trainable`).

    Args:
        model: The base model (vocabulary already resized to the adapter's tokenizer).
        path: A peft adapter directory (`adapter_config.json`, `ADAPTER_WEIGHTS`).
        is_trainable: Load it trainable (to continue training).
        lora: Settings to wrap with instead of the saved `adapter_config.json` (e.g. a recipe's
            dropout); must describe the same weights. `emb_ids` are then its trainable tokens.
        emb_ids: The trainable token ids, with `lora`.

    Raises:
        ValueError: The saved weights lack keys the adapter expects, or hold unknown ones (peft
            itself only warns and leaves such weights at their random start).
    """
    peft = require_extra("peft", "train", "a LoRA retriever")
    config = None if lora is None else peft_lora_config(lora, emb_ids)
    with _peft_quiet():
        wrapped = peft.PeftModel.from_pretrained(
            model, path, is_trainable=is_trainable, config=config
        )
    weights = Path(path) / ADAPTER_WEIGHTS
    if weights.is_file():
        from safetensors import safe_open

        with safe_open(str(weights), "pt") as f:
            check_adapter_keys(wrapped, f.keys(), weights)
    return wrapped


def adapter_state(model: Any) -> dict[str, torch.Tensor]:
    """The trainable state of a peft model as its `save_pretrained` writes it: the LoRA matrices
    and the trainable token rows (never the embedding matrix)."""
    peft = require_extra("peft", "train", "LoRA")
    return peft.get_peft_model_state_dict(model, save_embedding_layers=False)


def check_adapter_keys(model: Any, saved: Iterable[str], where: str | Path) -> None:
    """Raise ValueError unless saved adapter weights have exactly the keys `model` expects.

    Args:
        model: The peft model the weights are loaded into.
        saved: The keys of the saved state (as `adapter_state` names them).
        where: The file, for the message.
    """
    expected, saved = set(adapter_state(model)), set(saved)
    missing, unexpected = sorted(expected - saved), sorted(saved - expected)
    if missing:
        raise ValueError(
            f"{where}: lacks {len(missing)} of the {len(expected)} adapter weights the model "
            f"expects (first: {missing[0]!r}); was it saved with other LoRA settings?"
        )
    if unexpected:
        raise ValueError(
            f"{where}: holds {len(unexpected)} adapter weights the model does not have "
            f"(first: {unexpected[0]!r}); was it saved with other LoRA settings?"
        )


# Files of a sentence-transformers directory that describe its modules (not weights).
ST_FILES = ("modules.json", "sentence_bert_config.json", "1_Pooling/config.json")


def merge_encoder_adapter(base_dir: Path, adapter_dir: Path, st_dir: Path, out: Path) -> Path:
    """Writes a plain sentence-transformers directory: a LoRA adapter merged into an encoder.

    Args:
        base_dir: The base encoder (a Hugging Face or sentence-transformers directory).
        adapter_dir: The peft adapter trained on it (`adapter_config.json`, `ADAPTER_WEIGHTS`).
        st_dir: Where the sentence-transformers module files (`ST_FILES`) are taken from.
        out: The new directory (created).

    Raises:
        ValueError: `adapter_dir` is not an adapter, or its weights do not fit the base.
    """
    from transformers import AutoModel, AutoTokenizer

    problem = adapter_dir_problem(adapter_dir)
    if problem is not None:
        raise ValueError(f"{adapter_dir}: {problem}")
    missing = [name for name in ST_FILES if not (Path(st_dir) / name).is_file()]
    if missing:
        raise ValueError(f"{st_dir}: lacks the sentence-transformers file(s) {missing}")
    model = load_adapter(AutoModel.from_pretrained(base_dir), Path(adapter_dir), False)
    out.mkdir(parents=True, exist_ok=True)
    model.merge_and_unload().save_pretrained(out)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(out)
    for name in ST_FILES:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(st_dir) / name, out / name)
    return out
