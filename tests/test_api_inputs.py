"""The Python API refuses a user's mistakes with a ValueError or TypeError naming the argument,
before any model loads where it can, and stays light to inspect."""

from __future__ import annotations

import numpy as np
import pytest
from fakes import HashEncoder

from chatretriever.io.embeddings import EmbeddingMeta, write_embeddings
from chatretriever.modeling.backbones import checked_device
from chatretriever.types import Passage

pytest.importorskip("faiss")


def test_a_device_this_machine_lacks_is_named_before_loading(monkeypatch):
    import chatretriever.modeling.emb_llm_io as io

    def never(*args, **kwargs):
        raise AssertionError("the model must not load for a bad device")

    monkeypatch.setattr(io, "load_new", never)
    monkeypatch.setattr(io, "load_saved", never)
    from chatretriever import ChatRetriever

    with pytest.raises(ValueError, match=r"device 'gpu' is not a device name"):
        ChatRetriever.from_pretrained("smollm2-135m-instruct", device="gpu")
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"device 'cuda' is not on this machine"):
            ChatRetriever.from_pretrained("smollm2-135m-instruct", device="cuda")
    assert checked_device("cpu") == torch.device("cpu")


def _index(tmp_path):
    from chatretriever.retrieval.index import DenseIndex

    rng = np.random.default_rng(0)
    emb = rng.standard_normal((5, 4)).astype(np.float32)
    meta = EmbeddingMeta(model="m", dim=4)
    ids = [f"d{i}" for i in range(5)]
    return DenseIndex.build([write_embeddings(tmp_path / "s", ids, emb, meta)]), emb


@pytest.mark.parametrize("k", [0, -1, 2.5, True, "3"])
def test_dense_index_search_checks_k(tmp_path, k):
    index, emb = _index(tmp_path)
    with pytest.raises(ValueError, match="k must be an integer of at least 1"):
        index.search(emb[:1], k=k)
    assert len(index.search(emb[:1], k=np.int64(2))[0]) == 2


def test_corpus_index_repr_is_short_and_a_list_corpus_is_named(tmp_path):
    from chatretriever.retrieval.corpus_index import CorpusIndex, build_corpus_index

    index, _ = _index(tmp_path)
    passages = {f"d{i}": Passage(f"d{i}", "word " * 5000) for i in range(5)}
    assert len(repr(CorpusIndex(index, "m", passages))) < 500  # not the whole corpus
    with pytest.raises(TypeError, match="corpus must be a corpus file's path, got a list"):
        build_corpus_index(HashEncoder(), "m", list(passages.values()), tmp_path / "idx")
    assert not (tmp_path / "idx").exists()


def test_package_lists_its_lazy_models():
    import chatretriever

    assert {"ChatRetriever", "UniConv", "Session"} <= set(dir(chatretriever))
