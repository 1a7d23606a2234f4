"""Item-embedder training: contrastive, 7 hard negatives, in-batch negatives off by default.

The trainer is built on a small protocol, `ItemEmbedder` (embed texts with gradients; save and
reload what trains), so any embedder trains here: `SentenceEmbedder` (a sentence-transformer:
MiniLM, MPNet; mean pooling, L2-normalised; fully fine-tuned, or LoRA on its linear layers) is
the one this method ships; a ChatRetriever-style LLM embedder is built by the apps/CLI layer
(which may import both methods) and passed in as an object (dependency injection): this method
never imports another one.

One step: the collator gives the queries, the unique item texts of the batch (each example's
positive for this epoch and its hard negatives) and their `CandidateLayout`; the loss is the
shared `layout_contrastive_loss` (temperature 0.01): with `in_batch=False` each query's softmax
is over its own positive and 7 negatives only (the paper: in-batch negatives bring false
negatives); `in_batch=True` adds every other example's candidates, minus any item relevant to
the query.
"""

from __future__ import annotations

import copy
import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from chatretriever.config import LoraSettings
from chatretriever.errors import require_extra
from chatretriever.io.atomic import atomic_write
from chatretriever.methods.items.data import ItemExample
from chatretriever.modeling.losses import N_KEYS, CandidateLayout, layout_contrastive_loss

SIDES = ("query", "item")


@runtime_checkable
class ItemEmbedder(Protocol):
    """What the item trainer needs of a model (also a `torch.nn.Module`)."""

    def embed(self, texts: Sequence[str], side: str) -> torch.Tensor:
        """(B, D) L2-normalised embeddings, with gradients; side: "query" or "item"."""

    def save_pretrained(self, directory: str | Path) -> Any:
        """Write the model so that `load_trainable_state` (and inference) can read it."""

    def load_trainable_state(self, directory: str | Path) -> None:
        """Load trained weights from `directory` in place (resume)."""


ADAPTER_SUBDIR = "adapter"  # a LoRA run's adapter alone, beside the merged model


class SentenceEmbedder(torch.nn.Module):
    """A Hugging Face encoder with mean pooling as a trainable `ItemEmbedder`.

    `save_pretrained` writes a sentence-transformers directory (weights, tokenizer,
    `sentence_bert_config.json`, mean-pooling module), which `TextEmbedder.from_pretrained` and
    `apps.registry.load_encoder` load. With LoRA the directory holds the merged weights (so every
    loader reads it unchanged) and `adapter/` the adapter alone (a few MB: what a built-in
    model ships, see `modeling.sources.ShippedEncoderAdapter`).

    Args:
        model: The encoder (returns `last_hidden_state`).
        tokenizer: Its tokenizer.
        query_max_len: Tokens per query.
        item_max_len: Tokens per item.
        lora: LoRA settings; None or `enabled: false` trains every weight.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        query_max_len: int = 512,
        item_max_len: int = 128,
        lora: LoraSettings | None = None,
    ) -> None:
        super().__init__()
        self.lora = lora is not None and lora.enabled
        if self.lora:
            from chatretriever.modeling.adapters import peft_lora_config

            peft = require_extra("peft", "train", "LoRA")
            try:
                model = peft.get_peft_model(model, peft_lora_config(lora, task_type=None))
            except ValueError as e:  # peft: "Target modules {...} not found in the base model"
                raise ValueError(f"lora.target_modules {list(lora.target_modules)}: {e}") from e
        self.model = model
        self.tokenizer = tokenizer
        self.max_len = {"query": query_max_len, "item": item_max_len}

    @classmethod
    def from_pretrained(cls, name_or_path: str, **kwargs: Any) -> SentenceEmbedder:
        """Load a built-in embedder name ("minilm-l6") or a local directory, offline."""
        from chatretriever.modeling.backbones import load_backbone

        model, tokenizer = load_backbone(name_or_path, kind="encoder")
        return cls(model, tokenizer, **kwargs)

    def embed(self, texts: Sequence[str], side: str) -> torch.Tensor:
        """(B, D) mean-pooled, L2-normalised embeddings of texts."""
        if side not in SIDES:
            raise ValueError(f"side must be one of {SIDES}, got {side!r}")
        device = next(self.model.parameters()).device
        enc = self.tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=self.max_len[side],
            return_tensors="pt",
        ).to(device)
        hidden = self.model(**enc).last_hidden_state  # (B, T, H)
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # (B, H)
        return F.normalize(pooled.float(), dim=-1)

    def save_pretrained(self, directory: str | Path) -> Path:
        """A sentence-transformers directory (mean pooling; max_seq_length = the longer of the
        query and item lengths); with LoRA the merged weights, and the adapter alone in
        `adapter/`."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        if self.lora:
            self.model.save_pretrained(out / ADAPTER_SUBDIR)
            merged = copy.deepcopy(self.model).merge_and_unload()  # the live model stays LoRA
            merged.save_pretrained(out)
        else:
            self.model.save_pretrained(out)
        self.tokenizer.save_pretrained(out)
        dim = int(self.model.config.hidden_size)
        st = "sentence_transformers.models."
        modules = [
            {"idx": i, "name": str(i), "path": path, "type": st + kind}
            for i, (path, kind) in enumerate(
                [("", "Transformer"), ("1_Pooling", "Pooling"), ("2_Normalize", "Normalize")]
            )
        ]
        pooling = {"word_embedding_dimension": dim, "pooling_mode_mean_tokens": True}
        files = {
            # one length for both sides (TextEmbedder has one): the longer, as the benchmark
            "sentence_bert_config.json": {"max_seq_length": max(self.max_len.values())},
            "modules.json": modules,
            "1_Pooling/config.json": pooling,
        }
        for name, obj in files.items():
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            with atomic_write(out / name) as f:
                json.dump(obj, f, indent=2)
        return out

    def load_trainable_state(self, directory: str | Path) -> None:
        from safetensors.torch import load_file

        if self.lora:
            from chatretriever.modeling.adapters import ADAPTER_WEIGHTS, check_adapter_keys

            peft = require_extra("peft", "train", "LoRA")
            path = Path(directory) / ADAPTER_SUBDIR / ADAPTER_WEIGHTS
            state = load_file(str(path))
            check_adapter_keys(self.model, state.keys(), path)
            peft.set_peft_model_state_dict(self.model, state)
            return
        state = load_file(str(Path(directory) / "model.safetensors"))
        self.model.load_state_dict(state)


def _key(item_id: str) -> int:
    """A non-negative int64 key of an item id, the same in every process."""
    h = hashlib.blake2b(item_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(h, "big") >> 1


def item_layout(
    examples: Sequence[ItemExample], n_negatives: int, seed: int = 0, epoch: int = 0
) -> tuple[list[str], CandidateLayout]:
    """The unique item texts of a batch and their `CandidateLayout`.

    Each example trains one of its positives (drawn from (seed, epoch, id): every epoch anew)
    and its first `n_negatives` negatives (missing ones are padding). An item shared by two
    examples is encoded once. Every relevant id of an example goes into its positive keys.

    Returns:
        (the R item texts to encode, in row order; the layout: (B, 1 + K) rows).
    """
    b, k = len(examples), n_negatives
    rows = torch.full((b, 1 + k), -1, dtype=torch.long)
    keys = torch.full((b, 1 + k, N_KEYS), -1, dtype=torch.long)
    most = max(len(ex.relevant) for ex in examples)
    positive_keys = torch.full((b, most, N_KEYS), -1, dtype=torch.long)
    texts: list[str] = []
    row_of: dict[str, int] = {}
    for i, ex in enumerate(examples):
        for j, rid in enumerate(ex.relevant):
            positive_keys[i, j, 0] = _key(rid)
        rng = random.Random(f"{seed}\x1f{epoch}\x1f{ex.id}")
        chosen = ex.positives[rng.randrange(len(ex.positives))]
        for slot, (item_id, text) in enumerate([chosen, *ex.negatives[:k]]):
            if item_id not in row_of:
                row_of[item_id] = len(texts)
                texts.append(text)
            rows[i, slot] = row_of[item_id]
            keys[i, slot, 0] = _key(item_id)
    return texts, CandidateLayout(rows, keys, positive_keys)


@dataclass
class ItemCollator:
    """ItemExamples -> {"queries": [str], "items": [str], "layout": CandidateLayout}."""

    n_negatives: int = 7
    seed: int = 0
    epoch: int = 0

    def set_epoch(self, epoch: int, seed: int | None = None) -> None:
        """The epoch (and trainer seed) that choose each example's positive."""
        self.epoch = epoch
        if seed is not None:
            self.seed = seed

    def __call__(self, examples: Sequence[ItemExample]) -> dict[str, Any]:
        texts, layout = item_layout(examples, self.n_negatives, self.seed, self.epoch)
        return {"queries": [ex.query for ex in examples], "items": texts, "layout": layout}


@dataclass
class ItemLoss:
    """The named loss of one batch: {"contrastive": InfoNCE over the layout's candidates}."""

    temperature: float = 0.01
    in_batch: bool = False

    def __call__(self, model: Any, inputs: dict[str, Any]) -> dict[str, torch.Tensor]:
        q = model.embed(inputs["queries"], "query")  # (B, D)
        items = model.embed(inputs["items"], "item")  # (R, D)
        return layout_contrastive_loss(q, items, inputs["layout"], self.temperature, self.in_batch)
