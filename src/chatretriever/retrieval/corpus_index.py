"""A corpus index: one directory that holds everything needed to search a corpus and show results.

`chatretriever index CORPUS --out DIR` writes it in one step:

    DIR/embeddings/          `encode.encode_corpus` output (chunked, resumable)
    DIR/index/               `index.DenseIndex.save` output (Faiss, the default), or with
                             `backend="milvus"` a `milvus_index.MilvusIndex` descriptor naming
                             its collection; its meta.json `settings` record the model name to
                             load (`model`), that model's `fingerprint` (queries from another
                             model are refused) and the source corpus (`corpus`)
    DIR/milvus.db            the milvus-lite database of a Milvus index without another URI
    DIR/passages.jsonl.gz    a copy of the passages (BEIR JSONL: _id, title, text)
    DIR/bm25/                optional (`index ... --bm25`): a BM25 side for hybrid search,
                             `baselines.BM25Retriever.save` output; its bm25.json records the
                             BM25 settings and the query formulation it is searched with

The passages are copied rather than referenced by path so that the directory is self-contained:
it can be moved or shared, and results still show titles and snippets after the source corpus
has moved. A plain index directory (built from embedding shards) works too; it then knows
neither its model nor its texts, which the caller passes instead. Torch-free: the encoder does
the model work.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chatretriever.errors import DataFormatError
from chatretriever.io.corpus import iter_corpus, read_corpus, write_corpus
from chatretriever.retrieval.bm25 import BM25Config, BM25Retriever
from chatretriever.retrieval.encode import EncodeConfig, encode_corpus, list_shards
from chatretriever.retrieval.encoders import Encoder, fingerprint_of
from chatretriever.retrieval.index import (
    BACKENDS,
    DEFAULT_FACTORY,
    META_FILE,
    DenseIndex,
    VectorIndex,
    check_factory,
    load_index,
)
from chatretriever.retrieval.milvus_index import DEFAULT_BATCH, MilvusIndex
from chatretriever.retrieval.search import Formulation, formulation_of
from chatretriever.types import Passage

logger = logging.getLogger(__name__)

EMBEDDINGS_DIR = "embeddings"
INDEX_DIR = "index"
PASSAGES_FILE = "passages.jsonl.gz"
BM25_DIR = "bm25"
MILVUS_DB = "milvus.db"  # the embedded default of a Milvus index: DIR/milvus.db (milvus-lite)


@dataclass(frozen=True)
class MilvusSettings:
    """Where and how an index directory puts its vectors in Milvus (`build_milvus`).

    Attributes:
        uri: A `.db` file (milvus-lite) or a server URI; None: `DIR/milvus.db`.
        collection: The collection; None: the index directory's name (`default_collection`).
        batch_size: Rows per upsert call.
        overwrite: Drop a collection of the same name that holds another model or corpus,
            instead of refusing to build.
    """

    uri: str | None = None
    collection: str | None = None
    batch_size: int = DEFAULT_BATCH
    overwrite: bool = False


def default_collection(out_dir: str | Path) -> str:
    """A collection name from an index directory's name, under Milvus's rules (letters, digits,
    underscores; a letter or underscore first; at most 255 characters)."""
    name = re.sub(r"[^A-Za-z0-9_]", "_", Path(os.path.abspath(out_dir)).name)
    if not name or not (name[0].isalpha() or name[0] == "_"):
        name = f"cr_{name}"
    return name[:255]


@dataclass
class CorpusIndex:
    """A dense index with what it takes to search it and show results.

    Attributes:
        index: The dense index (`DenseIndex` for Faiss, `MilvusIndex`).
        model: The model name to load for queries (`registry.load_encoder`), or None when unknown.
        passages: Passage id -> passage (titles and texts), or None when unknown.
        directory: Where the index was loaded from.
    """

    index: VectorIndex
    model: str | None = None
    passages: Mapping[str, Passage] | None = field(default=None, repr=False)  # a whole corpus
    directory: Path | None = None

    @classmethod
    def load(
        cls, directory: str | Path, corpus: str | Path | None = None, with_passages: bool = True
    ) -> CorpusIndex:
        """Load a corpus index directory, or a plain index directory.

        Args:
            directory: A `build_corpus_index` output, or an index directory of any backend
                (`DenseIndex.save`, `MilvusIndex.save`).
            corpus: A BEIR corpus whose passages to show (instead of the directory's copy).
            with_passages: Read the passages at all (searching alone does not need them).

        Returns:
            The index with its recorded model name and passages (None where unknown).
        """
        directory = Path(directory)
        index_dir = index_location(directory)
        index = load_index(index_dir)
        settings = _index_settings(index_dir)
        passages = None
        source = Path(corpus) if corpus else directory / PASSAGES_FILE
        if with_passages and (corpus or source.exists()):
            passages = _read_passages(source, index.ids)
        model = settings.get("model")
        return cls(index, model if isinstance(model, str) else None, passages, directory)

    @property
    def bm25_dir(self) -> Path | None:
        """The BM25 side's directory (`index ... --bm25`), or None when the index has none."""
        if self.directory is None:
            return None
        side = self.directory / BM25_DIR
        return side if side.is_dir() else None

    def load_bm25(self) -> BM25Retriever | None:
        """The BM25 side (`search.search_hybrid`'s `sparse`), or None when the index has none.

        Its `info["formulation"]` is the query formulation it was built to be searched with.
        """
        side = self.bm25_dir
        if side is None:
            return None
        bm25 = BM25Retriever.load(side)
        if len(bm25.ids) != len(self.index) or set(bm25.ids) != set(self.index.ids):
            raise DataFormatError(
                side,
                f"holds {len(bm25.ids)} passages that are not the index's {len(self.index)}: "
                "an index rebuilt since; rebuild the side with `index CORPUS --out DIR --bm25`",
            )
        return bm25


def _read_passages(path: Path, ids: Sequence[str]) -> dict[str, Passage]:
    """Passage id -> passage from a corpus that must hold every indexed id."""
    passages = {p.id: p for p in iter_corpus(path)}
    missing = [i for i in ids if i not in passages]
    if missing:
        msg = f"lacks {len(missing)} of the {len(ids)} indexed ids (first: {missing[0]!r})"
        raise DataFormatError(path, msg)
    return passages


def index_location(directory: str | Path) -> Path:
    """The index directory (Faiss files or a Milvus descriptor): DIR/index for a corpus index,
    else DIR."""
    directory = Path(directory)
    inner = directory / INDEX_DIR
    return inner if (inner / META_FILE).exists() else directory


def _index_settings(index_dir: Path) -> dict[str, Any]:
    info = json.loads((index_dir / META_FILE).read_text(encoding="utf-8"))
    settings = info.get("settings") if isinstance(info, dict) else None
    return settings if isinstance(settings, dict) else {}


def build_corpus_index(
    encoder: Encoder,
    model: str,
    corpus: str | Path,
    out_dir: str | Path,
    factory: str = DEFAULT_FACTORY,
    config: EncodeConfig | None = None,
    train_size: int = 100_000,
    backend: str = "faiss",
    milvus: MilvusSettings | None = None,
    bm25: Formulation | str | None = None,
    bm25_config: BM25Config | None = None,
) -> CorpusIndex:
    """Encode a corpus, index it and keep its passages: one directory (see the module docstring).

    Encoding resumes: chunks finished by an earlier (interrupted) call are kept. The index and the
    passage copy are each written atomically.

    Args:
        encoder: The passage encoder.
        model: The name `encoder` was loaded by; recorded so queries can load the same model.
        corpus: A BEIR corpus file (`.jsonl` or `.jsonl.gz`).
        out_dir: The corpus index directory.
        factory: Faiss factory string ("Flat" is exact search); for Milvus its index spec
            (`milvus_spec.parse_index_spec`: "FLAT", "HNSW:M=16"; "Flat" is FLAT).
        config: Encoding settings (batch size, chunk size); the shard must be (0, 1).
        train_size: Vectors sampled to train factories that need training (IVF, PQ).
        backend: "faiss" (in DIR/index) or "milvus" (a collection; DIR/index describes it).
        milvus: Milvus URI, collection and upsert settings (default: `DIR/milvus.db`, a
            collection named after DIR); a re-run resumes an interrupted load.
        bm25: Also build a BM25 side (DIR/bm25) for hybrid search, recording this query
            formulation as its default ("last_turn" is BM25's best on conversations); None:
            none. `CorpusIndex.load_bm25` loads it.
        bm25_config: The BM25 side's settings (default `BM25Config()`).

    Returns:
        The built index with its model name and passages.
    """
    config = config or EncodeConfig()
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r} (known: {', '.join(BACKENDS)})")
    if milvus is not None and backend != "milvus":
        raise ValueError("Milvus settings go with backend='milvus'")
    if config.shard != (0, 1):
        raise ValueError("a one-step index encodes the whole corpus: use `encode --shard` instead")
    bm25_formulation = None if bm25 is None else formulation_of(bm25)  # checked before encoding
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir}: exists and is not a directory; give an index directory")
    if not isinstance(corpus, (str, Path)):
        raise TypeError(
            f"corpus must be a corpus file's path, got a {type(corpus).__name__}: passages held "
            "in memory are indexed with DenseIndex.from_vectors(ids, encoder.encode_passages("
            "passages), encoder)"
        )
    passages = read_corpus(corpus)  # checks the whole file before any encoding
    if not passages:
        raise ValueError(f"{corpus} holds no passages")
    if backend == "faiss":  # a typo in the factory is told now, not after hours of encoding
        check_factory(factory, encoder.dim, len(passages))
    emb_dir = out_dir / EMBEDDINGS_DIR
    encode_corpus(encoder, passages, emb_dir, config)
    shards = list_shards([emb_dir])
    if backend == "milvus":
        index, built_with = build_milvus(shards, out_dir, factory, milvus, config.show_progress)
    else:
        index = DenseIndex.build(
            shards, factory=factory, train_size=train_size, show_progress=config.show_progress
        )
        built_with = {"train_size": train_size}
    write_corpus(out_dir / PASSAGES_FILE, passages)
    settings = {
        "model": model,
        "fingerprint": fingerprint_of(encoder),
        "corpus": str(corpus),
        "embeddings": EMBEDDINGS_DIR,
        "passages": PASSAGES_FILE,
        "batch_size": config.batch_size,
        "chunk_size": config.chunk_size,
        "backend": backend,
        **built_with,
    }
    index.save(out_dir / INDEX_DIR, settings=settings)
    logger.info("%s: %d passages indexed with %s", out_dir, len(index), model)
    by_id = {p.id: p for p in passages}
    if bm25_formulation is not None:
        side = BM25Retriever([by_id[i] for i in index.ids], bm25_config, config.show_progress)
        info = {"formulation": bm25_formulation.value, "corpus": str(corpus)}
        side.save(out_dir / BM25_DIR, info)
        logger.info("%s: BM25 side (%s)", out_dir / BM25_DIR, bm25_formulation.value)
    return CorpusIndex(index, model, by_id, out_dir)


def build_milvus(
    shards: Sequence[Path],
    out_dir: str | Path,
    factory: str = DEFAULT_FACTORY,
    milvus: MilvusSettings | None = None,
    show_progress: bool = False,
) -> tuple[MilvusIndex, dict[str, Any]]:
    """Load embedding shards into Milvus with an index directory's defaults.

    Args:
        shards: Embedding shard directories.
        out_dir: The index directory the defaults derive from (`DIR/milvus.db`, a collection
            named after DIR).
        factory: The Milvus index spec ("Flat", the Faiss default, means FLAT).
        milvus: URI, collection, batch size, overwrite; None fields take the defaults.
        show_progress: A progress bar over the upserted vectors.

    Returns:
        (the index, the settings to record: the URI and collection used, the batch size).
    """
    milvus = milvus or MilvusSettings()
    uri = milvus.uri or str(Path(out_dir) / MILVUS_DB)
    collection = milvus.collection or default_collection(out_dir)
    index = MilvusIndex.build(
        shards,
        uri,
        collection,
        index_spec=factory,
        batch_size=milvus.batch_size,
        show_progress=show_progress,
        overwrite=milvus.overwrite,
    )
    recorded = {"uri": uri, "collection": collection, "upsert_batch_size": milvus.batch_size}
    return index, recorded
