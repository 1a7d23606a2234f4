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


def test_the_version_is_the_installed_packages():
    import importlib.metadata

    import chatretriever

    assert chatretriever.__version__ == importlib.metadata.version("chatretriever")


def test_a_run_is_rebuilt_from_its_scored_docs():
    from chatretriever import Run, ScoredDoc

    run = Run({"q1": {"b": 2.0, "a": 2.0, "c": 0.5}, "q2": {"x": 1.0}}, name="bm25")
    docs = [d for q in run.scores for d in run.ranked(q)]
    assert docs[:2] == [ScoredDoc("q1", "a", 2.0), ScoredDoc("q1", "b", 2.0)]  # tie: by id
    assert Run.from_scored(docs, name="bm25") == run
    back = Run.from_scored(reversed(docs))  # any order; the name defaults as Run's does
    assert back.scores == run.scores and back.name == Run({}).name == "chatretriever"
    (score,) = Run.from_scored([ScoredDoc("q", "d", 3)]).scores["q"].values()
    assert type(score) is float and score == 3.0  # an int score is stored as the float it names
