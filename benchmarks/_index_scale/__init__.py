"""Helper modules of benchmarks/index_scale.py (the large-index benchmark), by concern.

    vectors   real embeddings, the streamed synthetic set, the exact top k, the structure kept
    memory    the RSS over a build, the memory available, the bytes/vector models of the indexes
    systems   Faiss Flat / HNSW / IVF-PQ re-ranked, Milvus: build, search, measure, table rows
    report    the targets, the JSON / markdown / PNG results, the environment

The script puts benchmarks/ on sys.path, so these import as `_index_scale.<module>`.
"""
