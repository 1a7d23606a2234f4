"""Adapting a pretrained causal LM: new token rows in the vocabulary, LoRA via peft, and loading
a saved peft adapter."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from chatretriever.config import LoraSettings


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
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError("LoRA needs peft: pip install chatretriever[train]") from e
    peft_config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        trainable_token_indices=list(emb_ids),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, peft_config)


def load_adapter(model: Any, path: Path, is_trainable: bool) -> Any:
    """Wraps `model` with the peft adapter saved in `path` (trainable when `is_trainable`)."""
    try:
        from peft import PeftModel
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError("a LoRA retriever needs peft: pip install chatretriever[train]") from e
    return PeftModel.from_pretrained(model, path, is_trainable=is_trainable)
