"""Run fusion (RRF, min-max linear) against hand-worked rankings; BM25 side; hybrid search."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from fakes import HashEncoder
from fixtures import jsonl, write

from chatretriever.apps.registry import register_encoder, unregister_encoder
from chatretriever.retrieval.fusion import (
    FusionConfig,
    fuse_runs,
    linear_fusion,
    min_max,
    reciprocal_rank_fusion,
)
from chatretriever.types import Passage, Run, Session, Turn

DENSE = Run({"q": {"a": 0.9, "b": 0.8, "c": 0.1}}, "dense")
SPARSE = Run({"q": {"c": 12.0, "a": 7.0, "d": 2.0}, "only_bm25": {"x": 1.0}}, "bm25")


def test_rrf_matches_the_hand_worked_scores():
    fused = reciprocal_rank_fusion([DENSE, SPARSE], k=60)
    # dense ranks a1 b2 c3; bm25 ranks c1 a2 d3
    want = {"a": 1 / 61 + 1 / 62, "b": 1 / 62, "c": 1 / 63 + 1 / 61, "d": 1 / 63}
    assert fused.scores["q"] == pytest.approx(want)
    assert [d.doc_id for d in fused.ranked("q")] == ["a", "c", "b", "d"]
    assert fused.scores["only_bm25"] == pytest.approx({"x": 1 / 61})  # a query of one run only


def test_rrf_k_weights_and_depth_change_the_ranking_as_worked_out():
    # k = 0: a = 1 + 1/2 = 1.5, c = 1/3 + 1 = 1.333: a stays first; weights 1:3 for BM25 make
    # c = 1/3 + 3 = 3.33 > a = 1 + 3/2 = 2.5 and d = 3/3 = 1.0 > b = 1/2
    fused = reciprocal_rank_fusion([DENSE, SPARSE], k=0, weights=[1, 3])
    assert [d.doc_id for d in fused.ranked("q")] == ["c", "a", "d", "b"]
    assert fused.scores["q"]["c"] == pytest.approx(1 / 3 + 3)
    top1 = reciprocal_rank_fusion([DENSE, SPARSE], k=60, depth=1)
    assert top1.scores["q"] == pytest.approx({"a": 1 / 61, "c": 1 / 61})
    assert [d.doc_id for d in top1.ranked("q")] == ["a", "c"]  # a tie: the dense run's first


def test_fusion_names_a_run_that_is_not_a_run():
    with pytest.raises(TypeError, match=r"runs\[1\] must be a Run .* got a dict"):
        fuse_runs(DENSE, {"q": {"a": 1.0}})


@pytest.mark.parametrize("method", ["rrf", "linear"])
def test_exact_ties_go_to_the_first_runs_order_not_the_passage_id(method, tmp_path):
    """Equal weights tie the dense top hit and BM25's when neither retrieved the other's (0.5
    each in linear fusion, 0.5/61 each in RRF): the dense run's order decides, whatever the
    ids say, and the scores written carry that order (evaluate and trec_eval read scores)."""
    from chatretriever.io.trec import read_run, write_run

    dense = Run({"q": {"z-dense": 0.9, "m": 0.5}}, "dense")
    sparse = Run({"q": {"a-bm25": 9.0, "b": 3.0}}, "bm25")
    fused = fuse_runs(dense, sparse, FusionConfig(method, weight=0.5))
    ranked = [d.doc_id for d in fused.ranked("q")]
    assert ranked[:2] == ["z-dense", "a-bm25"]  # by id, a-bm25 would come first
    scores = [d.score for d in fused.ranked("q")]
    assert all(x > y for x, y in zip(scores, scores[1:], strict=False))  # strictly decreasing
    assert scores[0] - scores[1] < 1e-12  # a tie, moved by a few units in the last place
    write_run(tmp_path / "f.trec", fused)
    assert [d.doc_id for d in read_run(tmp_path / "f.trec").ranked("q")] == ranked
    swapped = fuse_runs(sparse, dense, FusionConfig(method, weight=0.5))
    assert [d.doc_id for d in swapped.ranked("q")][:2] == ["a-bm25", "z-dense"]


def test_min_max_and_its_all_equal_case():
    assert min_max({"a": 2.0, "b": 4.0, "c": 3.0}) == {"a": 0.0, "b": 1.0, "c": 0.5}
    assert min_max({"a": 5.0, "b": 5.0}) == {"a": 1.0, "b": 1.0}
    assert min_max({}) == {}


def test_linear_fusion_matches_the_hand_worked_scores():
    # dense normalised: a 1, b 0.875, c 0; bm25 normalised: c 1, a 0.5, d 0
    fused = linear_fusion([DENSE, SPARSE], weights=[0.7, 0.3])
    want = {"a": 0.7 + 0.15, "b": 0.7 * 0.875, "c": 0.3, "d": 0.0}
    assert fused.scores["q"] == pytest.approx(want)
    assert [d.doc_id for d in fused.ranked("q")] == ["a", "b", "c", "d"]


def test_fuse_runs_uses_the_weight_for_dense_and_one_minus_it_for_bm25():
    only_bm25 = fuse_runs(DENSE, SPARSE, FusionConfig("linear", weight=0.0))
    assert [d.doc_id for d in only_bm25.ranked("q")][:2] == ["c", "a"]
    only_dense = fuse_runs(DENSE, SPARSE, FusionConfig("linear", weight=1.0))
    assert [d.doc_id for d in only_dense.ranked("q")][:3] == ["a", "b", "c"]
    rrf = fuse_runs(DENSE, SPARSE)
    assert rrf.name == "dense+bm25.rrf"
    assert rrf.scores["q"]["a"] == pytest.approx(0.5 / 61 + 0.5 / 62)


@pytest.mark.parametrize(
    "kwargs", [{"method": "max"}, {"weight": 1.5}, {"rrf_k": -1}, {"depth": 0}]
)
def test_bad_fusion_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        FusionConfig(**kwargs)
    with pytest.raises(ValueError, match="one non-negative weight per run"):
        reciprocal_rank_fusion([DENSE, SPARSE], weights=[1.0])


# ----------------------------------------------------------------------------- BM25 side


PASSAGES = [
    Passage("diet", "jaguars eat deer capybaras and caimans", "Jaguar"),
    Passage("range", "jaguars live in the rainforest of the americas", "Jaguar"),
    Passage("car", "the jaguar car company builds luxury cars", "Jaguar Cars"),
    Passage("pasta", "how to cook pasta with tomato sauce", "Pasta"),
]


def test_bm25_side_saves_and_loads_with_its_settings_and_info(tmp_path):
    pytest.importorskip("bm25s")
    from chatretriever.errors import DataFormatError
    from chatretriever.retrieval.baselines import BM25Config, BM25Retriever

    bm25 = BM25Retriever(PASSAGES, BM25Config(k1=1.2, b=0.75))
    bm25.save(tmp_path / "bm25", {"formulation": "all_user_turns"})
    loaded = BM25Retriever.load(tmp_path / "bm25")
    assert loaded.settings == bm25.settings and loaded.settings["k1"] == 1.2
    assert loaded.info == {"formulation": "all_user_turns"}
    queries = ["what do jaguars eat", "cook pasta"]
    assert loaded.search_texts(queries) == bm25.search_texts(queries)
    (tmp_path / "bm25" / "bm25.json").write_text("{}")
    with pytest.raises(DataFormatError, match="bm25.json: not a saved BM25 index"):
        BM25Retriever.load(tmp_path / "bm25")


def test_search_hybrid_fuses_the_dense_and_bm25_runs_of_the_same_sessions(tmp_path):
    pytest.importorskip("faiss")
    pytest.importorskip("bm25s")
    from chatretriever.retrieval.baselines import BM25Retriever
    from chatretriever.retrieval.encode import EncodeConfig, encode_corpus, list_shards
    from chatretriever.retrieval.index import DenseIndex
    from chatretriever.retrieval.search import search_dense, search_hybrid

    enc = HashEncoder()
    encode_corpus(enc, PASSAGES, tmp_path / "emb", EncodeConfig(show_progress=False))
    index = DenseIndex.build(list_shards([tmp_path / "emb"]))
    bm25 = BM25Retriever(PASSAGES)
    turns = (Turn("user", "tell me about jaguars"), Turn("user", "what do they eat"))
    sessions = [Session("s1", turns)]
    fusion = FusionConfig("rrf", rrf_k=10)
    run = search_hybrid(enc, index, bm25, sessions, k=2, fusion=fusion, show_progress=False)
    dense = search_dense(enc, index, sessions, k=100, show_progress=False)
    sparse = bm25.search(sessions, 100, "last_turn")
    want = fuse_runs(dense, sparse, fusion)
    assert run.name == "fake-hash.session+bm25.last_turn.rrf"
    top2 = [d.doc_id for d in want.ranked("s1")][:2]
    assert [d.doc_id for d in run.ranked("s1")] == top2
    assert run.scores["s1"] == pytest.approx({d: want.scores["s1"][d] for d in top2})


# ----------------------------------------------------------------------------- CLI


CORPUS = [{"_id": p.id, "title": p.title, "text": p.text} for p in PASSAGES]
SESSIONS = [
    {
        "id": "q1",
        "messages": [
            {"role": "user", "content": "tell me about jaguars"},
            {"role": "assistant", "content": "jaguars are big cats"},
            {"role": "user", "content": "what do they eat"},
        ],
    },
    {"id": "q2", "messages": [{"role": "user", "content": "how do I cook pasta"}]},
]


@pytest.fixture
def fake_model():
    register_encoder("fake", lambda rest: HashEncoder(name=rest or "fake-hash"))
    yield
    unregister_encoder("fake")


def test_cli_index_bm25_then_search_hybrid_records_its_settings(tmp_path, fake_model, capsys):
    pytest.importorskip("faiss")
    pytest.importorskip("bm25s")
    from chatretriever.cli import main
    from chatretriever.io.trec import read_run

    (tmp_path / "corpus.jsonl").write_text(jsonl(CORPUS))
    (tmp_path / "sessions.jsonl").write_text(jsonl(SESSIONS))
    idx, out = tmp_path / "idx", tmp_path / "hybrid.trec"
    args = ["index", str(tmp_path / "corpus.jsonl"), "--out", str(idx), "--model", "fake:"]
    assert main([*args, "--bm25", "--bm25-formulation", "all_user_turns"]) == 0
    assert json.loads((idx / "bm25" / "bm25.json").read_text())["info"]["formulation"] == (
        "all_user_turns"
    )
    search = ["search", "--sessions", str(tmp_path / "sessions.jsonl"), "--index", str(idx)]
    hybrid = ["--hybrid", "linear", "--fusion-weight", "0.25", "--k", "3"]
    assert main([*search, "--out", str(out), *hybrid]) == 0
    settings = json.loads(out.with_name(out.name + ".settings.json").read_text())
    assert settings["hybrid"]["fusion"] == {
        "method": "linear",
        "rrf_k": 60,
        "weight": 0.25,
        "depth": None,
        "ties": "first run's order, then id",
    }
    assert settings["hybrid"]["bm25_formulation"] == "all_user_turns"  # the index's record
    assert settings["hybrid"]["fusion_depth"] == 100
    assert main([*search, "--out", str(out), *hybrid, "--fusion-depth", "2"]) == 0
    settings = json.loads(out.with_name(out.name + ".settings.json").read_text())
    assert settings["hybrid"]["fusion_depth"] == 3  # the depth fused: at least --k
    assert settings["hybrid"]["bm25"]["k1"] == 0.9
    run = read_run(out)
    assert run.ranked("q2")[0].doc_id == "pasta" and len(run.scores["q1"]) == 3
    assert set(run.scores["q1"]) >= {"diet"}


def test_python_corpus_index_with_a_bm25_side_searches_hybrid(tmp_path):
    pytest.importorskip("faiss")
    pytest.importorskip("bm25s")
    from chatretriever.errors import DataFormatError
    from chatretriever.retrieval.corpus_index import CorpusIndex, build_corpus_index
    from chatretriever.retrieval.search import search_hybrid
    from chatretriever.types import as_session

    (tmp_path / "corpus.jsonl").write_text(jsonl(CORPUS))
    enc = HashEncoder(name="lib")
    corpus, idx = tmp_path / "corpus.jsonl", tmp_path / "idx"
    with pytest.raises(ValueError, match="formulation must be one of"):
        build_corpus_index(enc, "fake:lib", corpus, idx, bm25="last_question")
    assert not idx.exists()  # refused before any encoding
    built = build_corpus_index(enc, "fake:lib", corpus, idx, bm25="all_user_turns")
    loaded = CorpusIndex.load(idx)
    bm25 = loaded.load_bm25()
    assert bm25 is not None and bm25.info["formulation"] == "all_user_turns"
    assert bm25.ids == built.index.ids  # the index's passages, in its order
    sessions = [as_session(s["messages"], s["id"]) for s in SESSIONS]
    run = search_hybrid(enc, loaded.index, bm25, sessions, k=3, sparse_formulation="last_turn")
    assert run.ranked("q2")[0].doc_id == "pasta" and len(run.scores["q1"]) == 3
    # an index rebuilt on other passages beside an old side: the side is refused, not fused
    (tmp_path / "fewer.jsonl").write_text(jsonl(CORPUS[:3]))
    build_corpus_index(enc, "fake:lib", tmp_path / "fewer.jsonl", tmp_path / "new")
    (tmp_path / "new" / "bm25").symlink_to(idx / "bm25")
    with pytest.raises(DataFormatError, match="not the index's 3"):
        CorpusIndex.load(tmp_path / "new").load_bm25()
    assert CorpusIndex.load(tmp_path / "new").bm25_dir is not None
    # as many passages, but one id differs: the side would fuse a hit the index does not hold
    renamed = [*CORPUS[:-1], {**CORPUS[-1], "_id": "other-id"}]
    (tmp_path / "renamed.jsonl").write_text(jsonl(renamed))
    build_corpus_index(enc, "fake:lib", tmp_path / "renamed.jsonl", tmp_path / "same_n")
    (tmp_path / "same_n" / "bm25").symlink_to(idx / "bm25")
    with pytest.raises(DataFormatError, match=f"not the index's {len(CORPUS)}"):
        CorpusIndex.load(tmp_path / "same_n").load_bm25()
    assert build_corpus_index(enc, "fake:lib", corpus, tmp_path / "plain").load_bm25() is None


def test_cli_hybrid_without_a_bm25_side_is_one_clear_error(
    tmp_path, fake_model, capsys, monkeypatch
):
    pytest.importorskip("faiss")
    from chatretriever.apps import registry
    from chatretriever.cli import main

    (tmp_path / "corpus.jsonl").write_text(jsonl(CORPUS))
    (tmp_path / "sessions.jsonl").write_text(jsonl(SESSIONS))
    idx = tmp_path / "idx"
    assert (
        main(["index", str(tmp_path / "corpus.jsonl"), "--out", str(idx), "--model", "fake:"]) == 0
    )
    search = ["search", "--sessions", str(tmp_path / "sessions.jsonl"), "--index", str(idx)]

    def no_loading(*args, **kwargs):  # told before the (slow) model loads
        raise AssertionError("the model was loaded before the missing BM25 side was told")

    monkeypatch.setattr(registry, "load_encoder", no_loading)
    assert main([*search, "--out", str(tmp_path / "r.trec"), "--hybrid", "rrf"]) == 2
    assert "no BM25 side" in capsys.readouterr().err


def test_chat_hybrid_shows_fused_hits(tmp_path, fake_model, capsys, monkeypatch):
    pytest.importorskip("faiss")
    pytest.importorskip("bm25s")
    import io

    from chatretriever.cli import main

    (tmp_path / "corpus.jsonl").write_text(jsonl(CORPUS))
    idx = tmp_path / "idx"
    args = ["index", str(tmp_path / "corpus.jsonl"), "--out", str(idx), "--model", "fake:"]
    assert main([*args, "--bm25"]) == 0
    capsys.readouterr()
    monkeypatch.setattr(sys, "stdin", io.StringIO("how do I cook pasta\n"))
    assert main(["chat", "--index", str(idx), "--hybrid", "rrf", "--k", "2"]) == 0
    shown = capsys.readouterr().out
    assert "1. [" in shown and "(pasta)" in shown.split("\n")[1]


def test_fusion_module_imports_without_torch():
    code = "import sys; import chatretriever.retrieval.fusion; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_benchmark_hybrid_rows_fuse_the_chatretriever_run_with_bm25(tmp_path, monkeypatch):
    pytest.importorskip("bm25s")
    pytest.importorskip("ir_measures")
    from test_benchmarks import CORPUS as MTRAG_CORPUS
    from test_benchmarks import QRELS, TASKS, load_benchmark

    from chatretriever.io.trec import read_run

    conv = load_benchmark("conversational")
    root = tmp_path / "mtrag"
    write(root / "corpus.jsonl.gz", jsonl(MTRAG_CORPUS))
    write(root / "mtrag-un" / "reference.jsonl", jsonl(TASKS))
    for domain, text in QRELS.items():
        write(root / "mtrag-un" / "qrels" / f"{domain}.tsv", text)
    register_encoder("fake", lambda rest: HashEncoder(dim=32, name=rest))
    monkeypatch.setattr(conv.backends, "have_faiss", lambda: False)
    out = tmp_path / "out"
    argv = ["--data", str(root), "--out", str(out), "--systems", "bm25", "dense", "chatretriever"]
    argv += ["--dense", "fake:hash", "--model", "csit=fake:csit", "--k", "5"]
    argv += ["--hybrid", "rrf", "linear", "--rrf-k", "10", "--fusion-weight", "0.7"]
    try:
        assert conv.main(argv) == 0
    finally:
        unregister_encoder("fake")
    runs, bm25 = out / "runs", read_run(out / "runs" / "bm25.last_turn.trec")
    for base in ("csit.session", "fake_hash.all_user_turns"):
        dense = read_run(runs / f"{base}.trec")
        for method in ("rrf", "linear"):
            cfg = FusionConfig(method, 10, 0.7)
            path = runs / f"{base}_bm25.last_turn.{method}.trec"
            want, got = fuse_runs(dense, bm25, cfg), read_run(path)
            for qid in want.scores:
                assert [d.doc_id for d in got.ranked(qid)] == [d.doc_id for d in want.ranked(qid)][
                    :5
                ]
                top = [d.score for d in want.ranked(qid)][:5]
                assert [d.score for d in got.ranked(qid)] == pytest.approx(top, rel=1e-5)
            settings = json.loads(path.with_name(path.name + ".settings.json").read_text())
            assert settings["fusion"] == cfg.to_dict() == settings["key"]["fusion"]
    results = json.loads((out / "results.json").read_text())
    assert [r["family"] for r in results["systems"]][-4:] == ["hybrid"] * 4
