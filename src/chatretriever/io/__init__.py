"""Readers and writers for the standard formats. Torch-free."""

from __future__ import annotations

from chatretriever.io.atomic import atomic_write
from chatretriever.io.conversations import SESSION_FORMATS, read_conversations
from chatretriever.io.corpus import iter_corpus, read_corpus, write_corpus
from chatretriever.io.embeddings import EmbeddingMeta, read_embeddings, write_embeddings
from chatretriever.io.files import iter_jsonl, open_text
from chatretriever.io.sessions import (
    read_sessions,
    session_from_dict,
    session_to_dict,
    write_sessions,
)
from chatretriever.io.trec import (
    read_beir_qrels,
    read_json_qrels,
    read_qrels,
    read_qrels_files,
    read_run,
    read_trec_qrels,
    write_qrels,
    write_run,
)

__all__ = [
    "SESSION_FORMATS",
    "EmbeddingMeta",
    "atomic_write",
    "iter_corpus",
    "iter_jsonl",
    "open_text",
    "read_beir_qrels",
    "read_conversations",
    "read_corpus",
    "read_embeddings",
    "read_json_qrels",
    "read_qrels",
    "read_qrels_files",
    "read_run",
    "read_sessions",
    "read_trec_qrels",
    "session_from_dict",
    "session_to_dict",
    "write_corpus",
    "write_embeddings",
    "write_qrels",
    "write_run",
    "write_sessions",
]
