"""Baselines: BM25 (`bm25`, re-exported) and off-the-shelf sentence embedders (`Encoder`s).

Both read a session as one text (`search.session_text`), so they take any query formulation:
the whole session, the last turn, all user turns, or a rewrite.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from chatretriever.modeling.backbones import native_bf16
from chatretriever.modeling.fingerprint import digest, model_fingerprint, tensors_fingerprint
from chatretriever.retrieval.bm25 import BM25Config, BM25Retriever
from chatretriever.retrieval.search import (
    session_text,
)
from chatretriever.types import (
    Passage,
    SessionLike,
    as_sessions,
    batch,
    passage_texts,
)

logger = logging.getLogger(__name__)

__all__ = ["BM25Config", "BM25Retriever", "TextEmbedder", "mean_pool"]


def mean_pool(hidden: Any, mask: Any) -> Any:
    """Mean of the token states where mask is 1.

    Args:
        hidden: (B, T, H) token states.
        mask: (B, T) attention mask, 1 for real tokens (either padding side).

    Returns:
        (B, H) float32.
    """
    m = mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    summed = (hidden * m).sum(dim=1)  # (B, H)
    return (summed / m.sum(dim=1).clamp(min=1e-9)).float()


class TextEmbedder:
    """A sentence embedder (all-MiniLM, all-mpnet, any BERT-like model) as an `Encoder`.

    Mean pooling over tokens, then L2 normalisation, as the sentence-transformers all-* models
    do. A session is read as `session_text(session)`: one text, current question first.

    Args:
        model: A transformers encoder model (returns `last_hidden_state`).
        tokenizer: Its tokenizer.
        name: Model name stored in embedding and index metadata.
        max_length: Tokens per text (longer texts are truncated).
        normalize: L2-normalise the embeddings.
        bf16: Run under bf16 autocast; None picks it when the device supports bf16.
        weights_fingerprint: The fingerprint of the model's weight files (`from_pretrained`
            passes it); None: computed from the weights in memory when first needed.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        name: str,
        max_length: int = 256,
        normalize: bool = True,
        bf16: bool | None = None,
        weights_fingerprint: str | None = None,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.dim = int(model.config.hidden_size)
        self.max_length = max_length
        self.normalize = normalize
        self.bf16 = _bf16_supported(model) if bf16 is None else bf16
        self._weights_fp = weights_fingerprint

    @property
    def fingerprint(self) -> str:
        """A short hex content hash (`encoders.Encoder`): the weights, the tokenizer's size, the
        pooling, max length, normalisation and the compute precision."""
        if self._weights_fp is None:  # built from a model object: hash it once
            self._weights_fp = tensors_fingerprint(self.model.state_dict())
        return digest(
            "text-embedder",
            {
                "weights": self._weights_fp,
                "tokenizer": [type(self.tokenizer).__name__, len(self.tokenizer)],
                "pooling": "mean",
                "max_length": self.max_length,
                "normalize": self.normalize,
                "dtype": "bf16" if self.bf16 else "fp32",
            },
        )

    @classmethod
    def from_pretrained(
        cls, name_or_path: str, device: str | None = None, **kwargs: Any
    ) -> TextEmbedder:
        """Load a built-in name ("minilm-l6", "mpnet-base") or a local sentence-transformers dir.

        Args:
            name_or_path: See `backbones.load_backbone`.
            device: Where to run; default the current accelerator, else the CPU.
            **kwargs: `TextEmbedder` arguments (max_length defaults to the model's own).

        Returns:
            The embedder.
        """
        from chatretriever.modeling.backbones import checked_device, load_backbone

        target = checked_device(device)  # before the backbone loads
        model, tokenizer = load_backbone(name_or_path, kind="encoder")
        model.to(target)
        source = Path(str(getattr(model, "name_or_path", "") or name_or_path))
        kwargs.setdefault("max_length", _max_seq_length(source, tokenizer))
        name = name_or_path if not Path(name_or_path).exists() else Path(name_or_path).name
        kwargs.setdefault("weights_fingerprint", model_fingerprint(name_or_path))
        return cls(model, tokenizer, name=name, **kwargs)

    def encode_texts(
        self, texts: Sequence[str], batch_size: int = 32, show_progress: bool = False
    ) -> np.ndarray:
        """Embed texts in length-sorted batches; returns (N, D) float32 in input order."""
        import torch

        texts = batch(texts, "texts", "texts")

        order = np.argsort([-len(t) for t in texts], kind="stable")
        out = np.zeros((len(texts), self.dim), dtype=np.float32)  # (N, D)
        device = next(self.model.parameters()).device
        bar = tqdm(total=len(texts), unit="text", disable=not show_progress, desc=self.name)
        with bar, torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                idx = order[start : start + batch_size]
                enc = self.tokenizer(
                    [texts[i] for i in idx],
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                ).to(device)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.bf16):
                    hidden = self.model(**enc).last_hidden_state  # (B, T, H)
                emb = mean_pool(hidden.float(), enc["attention_mask"])  # (B, H)
                if self.normalize:
                    emb = torch.nn.functional.normalize(emb, dim=-1)
                out[idx] = emb.cpu().numpy()
                bar.update(len(idx))
        return out

    def encode_sessions(
        self, sessions: Sequence[SessionLike], batch_size: int = 16, show_progress: bool = False
    ) -> np.ndarray:
        """(B, D) embeddings of sessions read as one text each."""
        texts = [session_text(s) for s in as_sessions(sessions)]
        return self.encode_texts(texts, batch_size, show_progress)

    def encode_passages(
        self, passages: Sequence[Passage], batch_size: int = 16, show_progress: bool = False
    ) -> np.ndarray:
        """(B, D) embeddings of passages (title and text)."""
        return self.encode_texts(passage_texts(passages), batch_size, show_progress)


def _bf16_supported(model: Any) -> bool:
    return native_bf16(next(model.parameters()).device)


def _max_seq_length(model_dir: Path, tokenizer: Any) -> int:
    """max_seq_length of a sentence-transformers dir, else the tokenizer's limit (at most 512)."""
    config = model_dir / "sentence_bert_config.json"
    if config.is_file():
        value = json.loads(config.read_text(encoding="utf-8")).get("max_seq_length")
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", 512) or 512
    return int(min(limit, 512))
