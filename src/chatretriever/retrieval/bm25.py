"""BM25 (bm25s): Okapi BM25 over a corpus, searched under any query formulation.

Torch-free, so a corpus index can carry a BM25 side (`corpus_index`) without loading a model.
`baselines` re-exports these names.
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
from chatretriever.io.atomic import atomic_dir
from chatretriever.retrieval.search import (
    Formulation,
    check_k,
    formulate_all,
    formulation_of,
    session_text,
)
from chatretriever.types import Passage, Run, Session, batch, passage_text

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
        if not tokens.vocab:  # bm25s would fail on an empty max() deep inside its index
            raise ValueError(
                f"the {len(passages)} passages hold no term BM25 can index (every word is a "
                "stopword or a single character)"
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

        Passages sharing no term (score 0) are left out; ties are broken by passage id, at the
        k cut too, as in every run file (`types.rank_key`) and the dense backends: a ranking
        depends neither on k, on the corpus order nor on the platform.
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
            out.append(_top_k(scores, k, self._id_ranks()))
        return out

    def _id_ranks(self) -> np.ndarray:
        """(N,) each passage's position in id order (computed once; a Python sort, not a
        fixed-width string array, so long ids cost no extra memory)."""
        if getattr(self, "_ranks", None) is None:
            ranks = np.empty(len(self.ids), dtype=np.int64)
            ranks[sorted(range(len(self.ids)), key=self.ids.__getitem__)] = np.arange(len(self.ids))
            self._ranks = ranks
        return self._ranks

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


def _top_k(scores: np.ndarray, k: int, id_ranks: np.ndarray) -> list[tuple[int, float]]:
    """(position, score) of the k best positive scores of a (N,) vector, ties by `id_ranks`
    (each position's rank in id order)."""
    hits = np.flatnonzero(scores > 0)
    if len(hits) > k:  # keep every position tied with the k-th best, then cut after sorting
        kth = np.partition(scores[hits], len(hits) - k)[len(hits) - k]
        hits = hits[scores[hits] >= kth]
    best = hits[np.lexsort((id_ranks[hits], -scores[hits]))][:k]
    return [(int(i), float(scores[i])) for i in best]


def _bm25s() -> Any:
    return require_extra("bm25s", "baselines", "BM25")


def _load_stemmer(language: str | None) -> Any:
    if language is None:
        return None
    # Required, not optional: a silently unstemmed index would not be the BM25 its settings say.
    return require_extra("Stemmer", "baselines", "BM25 stemming").Stemmer(language)
