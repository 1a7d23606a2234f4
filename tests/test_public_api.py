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
