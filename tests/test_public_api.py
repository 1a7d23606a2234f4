"""The pipeline's entry points importable from `chatretriever.retrieval` and `chatretriever.io`,
without loading Faiss or torch until one is used."""

from __future__ import annotations

import subprocess
import sys

import pytest


def test_retrieval_and_io_export_the_pipeline_lazily():
    code = (
        "import sys, chatretriever.retrieval as r, chatretriever.io as io\n"
        "heavy = [m for m in ('torch', 'faiss', 'transformers') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "print(sorted(r.__all__) == r.__all__, callable(io.read_conversations))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "True"]


def test_every_exported_name_resolves_to_its_definition():
    import chatretriever.io as io
    import chatretriever.retrieval as retrieval
    from chatretriever.retrieval.search import search_dense

    pytest.importorskip("faiss")
    for name in retrieval.__all__:
        assert getattr(retrieval, name).__name__ == name
    for name in io.__all__:
        assert hasattr(io, name), name
    assert retrieval.search_dense is search_dense and "DenseIndex" in dir(retrieval)
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        retrieval.nope  # noqa: B018


def test_records_refuse_ids_that_are_not_strings():
    from chatretriever.types import Passage, Qrel, Session, Turn

    turn = (Turn("user", "q"),)
    with pytest.raises(TypeError, match="Session.id must be a string, got int 1"):
        Session(1, turn)  # a run keyed "1" would never meet qrels keyed 1
    with pytest.raises(TypeError, match="Qrel.doc_id must be a string"):
        Qrel("q1", 7, 1)
    with pytest.raises(TypeError, match="Qrel.relevance must be an int"):
        Qrel("q1", "d1", "2")
    with pytest.raises(TypeError, match="Passage.id must be a string"):
        Passage(3, "text")
    with pytest.raises(TypeError, match="text and title must be strings"):
        Passage("p", None)
    with pytest.raises(TypeError, match="turns must be a tuple of Turn"):
        Session("q", ({"role": "user", "content": "q"},))
    assert Session("q", [Turn("user", "q")]).turns == turn  # a list is kept as a tuple
    with pytest.raises(ValueError, match="non-empty"):
        Qrel("", "d", 1)
