"""Baselines: BM25 (bm25s) and off-the-shelf sentence embedders behind the `Encoder` protocol.

Both read a session as one text (`search.session_text`), so they take any query formulation:
the whole session, the last turn, all user turns, or a rewrite.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from chatretriever.errors import DataFormatError, require_extra
from chatretriever.io.files import atomic_dir
from chatretriever.modeling.backbones import default_device, native_bf16
from chatretriever.modeling.fingerprint import digest, model_fingerprint, tensors_fingerprint
from chatretriever.retrieval.search import (
    Formulation,
    check_k,
    formulate_all,
    formulation_of,
    session_text,
)
from chatretriever.types import (
    Passage,
    Run,
    Session,
    SessionLike,
    as_sessions,
    batch,
    passage_text,
    passage_texts,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BM25Config:
    """The one BM25 setting of the package: the baselines and hard-negative mining both use it.

    Attributes:
        k1: Term-frequency saturation (Pyserini's BM25 default 0.9, as evaluated in the README).
        b: Length normalisation (Pyserini's default 0.4).
        stemmer: A PyStemmer language ("english"), or None for no stemming.
        stopwords: A bm25s stopword list name ("en"), or None.
    """

    k1: float = 0.9
    b: float = 0.4
    stemmer: str | None = "english"
    stopwords: str | None = "en"


class BM25Retriever:
    """Okapi BM25 (Lucene variant, bm25s) over a corpus, English stemming and stopwords by default.

    Args:
        passages: The corpus; each is read as `passage_text` (title and text).
        config: BM25 settings (default `BM25Config()`).
        show_progress: Show bm25s' progress bars while indexing.
    """

    name = "bm25"

    def __init__(
        self,
        passages: Sequence[Passage],
        config: BM25Config | None = None,
        show_progress: bool = False,
    ) -> None:
        bm25s = _bm25s()
        passages = batch(passages, "passages", "Passages")
        if not passages:
            raise ValueError("BM25 needs at least one passage to index")
        for i, p in enumerate(passages):
            if not isinstance(p, Passage):
                raise TypeError(
                    f"passages[{i}] must be a Passage (its id names it in runs), got a "
                    f"{type(p).__name__}"
                )
        self.config = config or BM25Config()
        self.ids = [p.id for p in passages]
        self.settings = asdict(self.config)
        self.info: dict[str, Any] = {}
        self._stemmer = _load_stemmer(self.config.stemmer)
        self._stopwords = self.config.stopwords or []
        tokens = bm25s.tokenize(
            [passage_text(p) for p in passages],
            stopwords=self._stopwords,
            stemmer=self._stemmer,
            show_progress=show_progress,
        )
        self._bm25 = bm25s.BM25(k1=self.config.k1, b=self.config.b)
        self._bm25.index(tokens, show_progress=show_progress)

    @classmethod
    def from_texts(
        cls, texts: Sequence[str], config: BM25Config | None = None, show_progress: bool = False
    ) -> BM25Retriever:
        """An index over plain texts; their ids are their positions ("0", "1", ...)."""
        return cls([Passage(str(i), t) for i, t in enumerate(texts)], config, show_progress)

    def save(self, directory: str | Path, info: Mapping[str, Any] | None = None) -> Path:
        """Write the index (bm25s arrays, no pickle), its ids, settings and `info`, atomically.

        Args:
            directory: Where (replaced only once the new copy is complete).
            info: Extras recorded in `bm25.json` (e.g. the query formulation of a BM25 side).

        Returns:
            The directory.
        """
        directory = Path(directory)
        meta = {"config": self.settings, "info": dict(info or {})}
        with atomic_dir(directory) as tmp:
            self._bm25.save(str(tmp), show_progress=False)
            (tmp / "ids.txt").write_text("".join(f"{i}\n" for i in self.ids), encoding="utf-8")
            (tmp / "bm25.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> BM25Retriever:
        """Load a `save`d index; its settings come from the directory, `info` from bm25.json."""
        directory = Path(directory)
        meta_path = directory / "bm25.json"
        try:
            meta = json.loads(meta_path.read_text("utf-8"))
            config = BM25Config(**meta["config"])
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise DataFormatError(meta_path, f"not a saved BM25 index: {e}") from None
        out = cls.__new__(cls)  # the arrays are loaded, not indexed again
        out.config, out.settings, out.info = config, asdict(config), dict(meta.get("info") or {})
        out.ids = (directory / "ids.txt").read_text(encoding="utf-8").splitlines()
        out._stemmer = _load_stemmer(config.stemmer)
        out._stopwords = config.stopwords or []
        out._bm25 = _bm25s().BM25.load(str(directory), show_progress=False)
        n_docs = int(out._bm25.scores["num_docs"])
        if n_docs != len(out.ids):
            raise DataFormatError(directory / "ids.txt", f"{len(out.ids)} ids for {n_docs} docs")
        return out

    def top_k(
        self, texts: Sequence[str], k: int = 100, show_progress: bool = False
    ) -> list[list[tuple[int, float]]]:
        """Per query text, its top-k (passage position, score), best first.

        Passages sharing no term (score 0) are left out; ties are broken by position, so a
        ranking never depends on the platform (hard-negative mining needs that).
        """
        texts = batch(texts, "texts", "query texts")
        check_k(k)
        if not texts:
            return []
        queries = _bm25s().tokenize(
            list(texts),
            stopwords=self._stopwords,
            stemmer=self._stemmer,
            return_ids=False,
            show_progress=False,
        )
        out = []
        # Our own top-k over `get_scores`: bm25s' argpartition over mostly-zero score vectors is
        # slow, and its order of tied passages is not specified.
        for tokens in tqdm(queries, desc="BM25 search", disable=not show_progress):
            ids = self._bm25.get_tokens_ids(tokens)  # terms outside the corpus dropped
            scores = self._bm25.get_scores(ids) if ids else np.zeros(len(self.ids))  # (N,)
            out.append(_top_k(scores, k))
        return out

    def search_texts(self, texts: Sequence[str], k: int = 100) -> list[list[tuple[str, float]]]:
        """Top-k (passage id, score) per query text; passages sharing no term are left out."""
        return [[(self.ids[i], s) for i, s in row] for row in self.top_k(texts, k)]

    def search(
        self,
        sessions: Sequence[Session],
        k: int = 100,
        formulation: Formulation | str = Formulation.SESSION,
        missing_rewrite: str = "error",
    ) -> Run:
        """Retrieve for sessions under a query formulation; the Run is named bm25.<formulation>."""
        check_k(k)
        queries = formulate_all(sessions, formulation, missing_rewrite)
        hits = self.search_texts([session_text(s) for s in queries], k)
        scores = {s.id: dict(h) for s, h in zip(queries, hits, strict=True)}
        return Run(scores=scores, name=f"bm25.{formulation_of(formulation).value}")


def _top_k(scores: np.ndarray, k: int) -> list[tuple[int, float]]:
    """(position, score) of the k best positive scores of a (N,) vector, ties by position."""
    hits = np.flatnonzero(scores > 0)
    if len(hits) > k:  # keep every position tied with the k-th best, then cut after sorting
        kth = np.partition(scores[hits], len(hits) - k)[len(hits) - k]
        hits = hits[scores[hits] >= kth]
    best = hits[np.lexsort((hits, -scores[hits]))][:k]
    return [(int(i), float(scores[i])) for i in best]


def _bm25s() -> Any:
    return require_extra("bm25s", "baselines", "BM25")


def _load_stemmer(language: str | None) -> Any:
    if language is None:
        return None
    # Required, not optional: a silently unstemmed index would not be the BM25 its settings say.
    return require_extra("Stemmer", "baselines", "BM25 stemming").Stemmer(language)


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
        from chatretriever.modeling.backbones import load_backbone

        model, tokenizer = load_backbone(name_or_path, kind="encoder")
        model.to(device or default_device())
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
