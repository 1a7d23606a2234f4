"""The encoder-agnostic retrieval pipeline: the Encoder protocol, encode, index, search, evaluate,
baselines and rewrite. Imports the core and `modeling`, never a method.

The pipeline's entry points are importable from here (loaded on first use, so importing this
package loads neither Faiss nor torch):

    from chatretriever.retrieval import DenseIndex, encode_corpus, evaluate_run, search_dense
"""

from __future__ import annotations

from chatretriever.lazy import lazy_exports

# name -> the module that defines it
_EXPORTS = {
    "Encoder": "encoders",
    "EncodeConfig": "encode",
    "encode_corpus": "encode",
    "list_shards": "encode",
    "DenseIndex": "index",
    "EncoderMismatchError": "index_inputs",
    "load_index": "index",
    "CorpusIndex": "corpus_index",
    "build_corpus_index": "corpus_index",
    "Formulation": "search",
    "formulate": "search",
    "search_dense": "search",
    "search_hybrid": "search",
    "save_run": "search",
    "FusionConfig": "fusion",
    "fuse_runs": "fusion",
    "reciprocal_rank_fusion": "fusion",
    "Evaluation": "evaluate",
    "evaluate_run": "evaluate",
    "compare": "evaluate",
    "BM25Retriever": "bm25",
    "TextEmbedder": "baselines",
}


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
