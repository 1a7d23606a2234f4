"""Encoding and search speed: our passage encoder against a plain transformers loop, and Faiss
exact (Flat) against HNSW32.

(a) passages/s of `ChatRetriever.encode_passages` (bf16 where the device supports it,
    length-sorted batches, decoder body only: no LM head) against a plain loop over the same base
    weights (fp32 `AutoModelForCausalLM`, batches in corpus order, full forward with the LM head
    and `output_hidden_states`), on the same N real MTRAG passages. The plain loop reads the
    hidden state at the last EMB token of the SAME token ids our template produces (and the same
    EMB embedding rows), so the two embeddings must agree: their cosine is reported.
(b) queries/s of a Faiss Flat (exact inner product) index against HNSW32 at several efSearch
    values, with HNSW's recall@10 against the exact top 10, at the MTRAG corpus size and at
    `--n-random` vectors. Vectors are random unit Gaussians of the model's dimension (queries
    drawn the same way): a hard case for HNSW, whose recall on real, clustered embeddings is
    much higher. `--emb DIR` uses real corpus embeddings for the MTRAG-size index instead.

    python benchmarks/encode_speed.py                           # N=2000, 1M random vectors
    python benchmarks/encode_speed.py --n 64 --n-random 20000   # a smoke run
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from chatretriever.io.embeddings import EmbeddingMeta
from chatretriever.io.files import atomic_write
from chatretriever.io.mtrag import iter_mtrag_corpus, load_mtrag
from chatretriever.retrieval.evaluate import write_json
from chatretriever.types import Passage

TARGET_SPEEDUP = 2.5
TARGET_COSINE = 0.999


def environment() -> dict[str, Any]:
    """What else ran: thread counts and the load average (other processes busy?)."""
    import torch

    from chatretriever.modeling.backbones import native_bf16

    load = os.getloadavg()
    return {
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "loadavg_1_5_15": [round(x, 2) for x in load],
        # Measured before this process does any work: load from other processes.
        "other_processes_busy": load[0] >= 0.5,
        "platform": platform.platform(),
        "torch": torch.__version__,
        # AMX / AVX512-BF16: whether the bf16 path is fast here (the machine kind varies).
        "cpu_native_bf16": native_bf16(torch.device("cpu")),
    }


def sample_passages(data: str, n: int, seed: int) -> tuple[list[Passage], int]:
    """n passages drawn at random (seeded) from the MTRAG corpus, kept in corpus order."""
    corpus_path = load_mtrag(data).corpus_path
    if corpus_path is None:
        raise SystemExit(f"{data}: no corpus.jsonl(.gz) found")
    corpus = list(tqdm(iter_mtrag_corpus(corpus_path), desc="read corpus", unit="passage"))
    rows = np.sort(np.random.default_rng(seed).choice(len(corpus), min(n, len(corpus)), False))
    return [corpus[i] for i in rows], len(corpus)


# ------------------------------------------------------------------------------ (a) encoders
def plain_model(retriever: Any, model_name: str) -> Any:
    """fp32 AutoModelForCausalLM of the retriever's base weights, with the same EMB rows."""
    import torch
    from transformers import AutoModelForCausalLM

    from chatretriever.modeling.sources import resolve_model_dir

    model = AutoModelForCausalLM.from_pretrained(
        resolve_model_dir(model_name), dtype=torch.float32, local_files_only=True
    )
    model.resize_token_embeddings(len(retriever.tokenizer), mean_resizing=False)
    emb_ids = torch.tensor(retriever.emb_ids)
    with torch.no_grad():
        rows = retriever.model.get_input_embeddings()(emb_ids.to(retriever.device))  # (t, H)
        model.get_input_embeddings().weight[emb_ids] = rows.float().cpu()
    return model.to(retriever.device).eval()


def plain_encode(
    model: Any, retriever: Any, passages: Sequence[Passage], batch_size: int
) -> np.ndarray:
    """The plain loop: batches in corpus order, full forward; returns (N, H) unit vectors."""
    import torch
    import torch.nn.functional as F

    tokenizer, device = retriever.tokenizer, retriever.device
    out = np.zeros((len(passages), retriever.dim), dtype=np.float32)  # (N, H)
    bar = tqdm(total=len(passages), desc="plain loop", unit="passage")
    with bar, torch.inference_mode():
        for start in range(0, len(passages), batch_size):
            ids = [retriever.template.passage_ids(p) for p in passages[start : start + batch_size]]
            enc = tokenizer.pad(
                {"input_ids": ids}, padding=True, padding_side="right", return_tensors="pt"
            ).to(device)
            hidden = model(**enc, output_hidden_states=True).hidden_states[-1]  # (B, T, H)
            last = enc["attention_mask"].sum(dim=1) - 1  # (B,) the last EMB token
            emb = hidden[torch.arange(len(ids), device=device), last]  # (B, H)
            out[start : start + len(ids)] = F.normalize(emb.float(), dim=-1).cpu().numpy()
            bar.update(len(ids))
    return out


def padding_efficiency(lengths: Sequence[int], batch_size: int, sort: bool) -> float:
    """Real tokens / padded tokens over the batches (length-sorted or in the given order)."""
    seq = sorted(lengths, reverse=True) if sort else list(lengths)
    padded = sum(
        max(seq[i : i + batch_size]) * len(seq[i : i + batch_size])
        for i in range(0, len(seq), batch_size)
    )
    return sum(seq) / padded


def timed(fn, *args) -> tuple[Any, float]:
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start


def bench_encoders(args: argparse.Namespace, passages: list[Passage]) -> tuple[dict, int]:
    """Part (a); returns (results, embedding dim)."""
    import torch

    from chatretriever.methods.chatretriever.model import ChatRetriever

    retriever = ChatRetriever.from_pretrained(args.model, device=args.device)
    if args.fp32_layers is not None:
        retriever.config.fp32_layers = args.fp32_layers
    warm = passages[: args.batch_size]
    retriever.encode_passages(warm, args.batch_size)  # warm-up, not timed

    ours, ours_s = timed(retriever.encode_passages, passages, args.batch_size, True)
    plain = plain_model(retriever, args.model)
    plain_encode(plain, retriever, warm, args.batch_size)  # warm-up, not timed
    base, plain_s = timed(plain_encode, plain, retriever, passages, args.batch_size)
    cosine = np.sum(ours * base, axis=1) / (
        np.linalg.norm(ours, axis=1) * np.linalg.norm(base, axis=1)
    )  # (N,)
    lengths = [len(retriever.template.passage_ids(p)) for p in passages]
    n = len(passages)
    result = {
        "model": args.model,
        "device": str(retriever.device),
        "n_passages": n,
        "batch_size": args.batch_size,
        "tokens_mean": float(np.mean(lengths)),
        "tokens_max": int(max(lengths)),
        "ours": {
            "what": "ChatRetriever.encode_passages: length-sorted batches, no LM head",
            "dtype": str(retriever.compute_dtype).replace("torch.", ""),
            "lora_wrapped": bool(retriever.lora.enabled),
            "fp32_layers": retriever.config.fp32_layers,
            "seconds": round(ours_s, 3),
            "passages_per_s": round(n / ours_s, 2),
            "padding_efficiency": round(padding_efficiency(lengths, args.batch_size, True), 3),
        },
        "plain": {
            "what": "AutoModelForCausalLM fp32, corpus order, LM head + output_hidden_states",
            "dtype": "float32",
            "seconds": round(plain_s, 3),
            "passages_per_s": round(n / plain_s, 2),
            "padding_efficiency": round(padding_efficiency(lengths, args.batch_size, False), 3),
        },
        "speedup": round(plain_s / ours_s, 3),
        "cosine_mean": float(cosine.mean()),
        "cosine_min": float(cosine.min()),
    }
    result["meets_targets"] = (
        result["speedup"] >= TARGET_SPEEDUP and result["cosine_min"] >= TARGET_COSINE
    )
    dim = retriever.dim
    del retriever, plain
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result, dim


# ------------------------------------------------------------------------------ (b) Faiss
def random_unit(n: int, dim: int, seed: int, block: int = 100_000) -> np.ndarray:
    """(n, dim) float32 random unit vectors, made block by block (bounded extra memory)."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, block):
        x = rng.standard_normal((min(block, n - start), dim), dtype=np.float32)
        out[start : start + len(x)] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def build_index(vectors: np.ndarray, factory: str) -> tuple[Any, float]:
    """A `DenseIndex` over the vectors (built as `DenseIndex.build` builds one) and its seconds."""
    import faiss

    from chatretriever.retrieval.index import DenseIndex, add_vectors

    start = time.perf_counter()
    index = faiss.index_factory(vectors.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    with tqdm(total=len(vectors), desc=f"build {factory}", unit="vec") as bar:
        add_vectors(index, vectors, bar)
    seconds = time.perf_counter() - start
    meta = EmbeddingMeta(model="random", dim=vectors.shape[1], normalized=True)
    ids = [str(i) for i in range(len(vectors))]
    return DenseIndex(index, ids, meta, factory), seconds


def search_rate(index: Any, queries: np.ndarray, k: int, params: str | None) -> tuple[list, float]:
    """(top-k ids per query, queries/s) of `DenseIndex.search`."""
    start = time.perf_counter()
    hits = index.search(queries, k, params)
    qps = len(queries) / (time.perf_counter() - start)
    return [[i for i, _ in h] for h in hits], qps


def real_vectors(emb_dir: str, n_queries: int, seed: int) -> tuple[np.ndarray, np.ndarray, str]:
    """(index vectors, held-out query vectors, kind) from an `encode_corpus` output directory."""
    from chatretriever.io.embeddings import read_embeddings
    from chatretriever.retrieval.encode import list_shards

    shards = [read_embeddings(d) for d in list_shards([emb_dir])]
    vectors = np.concatenate([np.asarray(e, dtype=np.float32) for _, e, _ in shards])  # (N, D)
    if len(vectors) <= n_queries:
        raise SystemExit(f"{emb_dir}: {len(vectors)} vectors, not more than --queries")
    rows = np.random.default_rng(seed).permutation(len(vectors))
    kind = f"real {shards[0][2].model} passage embeddings; held-out passages as queries"
    return vectors[rows[n_queries:]], vectors[rows[:n_queries]], kind


def bench_faiss(
    vectors: np.ndarray, queries: np.ndarray, ef_search: Sequence[int], label: str, kind: str
) -> list[dict]:
    """Flat vs HNSW32 rows (one per efSearch value) on (N, D) vectors and (Q, D) queries."""
    k = 10
    n, dim = vectors.shape
    print(f"faiss: {label}: {n:,} vectors of dim {dim} ({kind}), {len(queries)} queries")
    common = {"vectors": label, "n": n, "dim": dim, "kind": kind}
    flat, flat_build = build_index(vectors, "Flat")
    exact, flat_qps = search_rate(flat, queries, k, None)
    del flat
    rows = [{**common, **_measured("Flat", flat_build, flat_qps, 1.0)}]
    hnsw, hnsw_build = build_index(vectors, "HNSW32")
    for ef in ef_search:
        found, qps = search_rate(hnsw, queries, k, f"efSearch={ef}")
        recall = np.mean([len(set(f) & set(e)) / k for f, e in zip(found, exact, strict=True)])
        index = f"HNSW32 efSearch={ef}"
        rows.append({**common, **_measured(index, hnsw_build, qps, float(recall))})
    return rows


def _measured(index: str, build_s: float, qps: float, recall: float) -> dict:
    return {
        "index": index,
        "build_s": round(build_s, 3),
        "queries_per_s": round(qps, 1),
        "recall_at_10": round(recall, 4),
    }


def run_faiss(args: argparse.Namespace, corpus_size: int, dim: int) -> list[dict]:
    """Part (b): the MTRAG-size index (real vectors with --emb, else random) and the large one."""
    rows = []
    random_kind = "random unit Gaussian vectors and queries"
    if args.emb:
        vectors, queries, kind = real_vectors(args.emb, args.queries, args.seed)
    else:
        vectors, kind = random_unit(corpus_size, dim, args.seed), random_kind
        queries = random_unit(args.queries, dim, args.seed + 1)
    rows += bench_faiss(vectors, queries, args.ef_search, "MTRAG corpus size", kind)
    del vectors
    if not args.skip_1m:
        vectors = random_unit(args.n_random, dim, args.seed)
        queries = random_unit(args.queries, dim, args.seed + 1)
        rows += bench_faiss(vectors, queries, args.ef_search, "--n-random", random_kind)
    return rows


# ------------------------------------------------------------------------------ output
def markdown(result: dict) -> str:
    a, env = result["encoders"], result["environment"]
    lines = [
        "# Encoding and search speed",
        "",
        f"device {a['device']}, torch threads {env['torch_threads']} of {env['cpu_count']} CPUs, "
        f"load average at start {env['loadavg_1_5_15']} "
        f"(other processes busy: {env['other_processes_busy']}); faiss threads "
        f"{result.get('faiss_threads', '-')}; CPU with native bf16 (AMX / AVX512-BF16): "
        f"{env.get('cpu_native_bf16', '-')}.",
        "",
        f"## (a) {a['n_passages']} MTRAG passages, {a['model']}, batch {a['batch_size']}, "
        f"{a['tokens_mean']:.0f} tokens on average (max {a['tokens_max']})",
        "",
        "| encoder | dtype | padding efficiency | passages/s | seconds |",
        "|---|---|---|---|---|",
    ]
    for key in ("ours", "plain"):
        e = a[key]
        dtype = e["dtype"]
        if dtype == "bfloat16" and e.get("fp32_layers"):
            dtype += f" (first {e['fp32_layers']} layers fp32)"
        lines.append(
            f"| {e['what']} | {dtype} | {e['padding_efficiency']:.2f} | "
            f"{e['passages_per_s']:.1f} | {e['seconds']:.2f} |"
        )
    lines += [
        "",
        f"speedup {a['speedup']:.2f}x (target >= {TARGET_SPEEDUP}), cosine mean "
        f"{a['cosine_mean']:.5f} min {a['cosine_min']:.5f} (target >= {TARGET_COSINE}); "
        f"targets met: {a['meets_targets']}.",
    ]
    if result["faiss"]:
        lines += [
            "",
            "## (b) Faiss, top 10, inner product",
            "",
            "| vectors | n | dim | kind | index | build s | queries/s | recall@10 vs exact |",
            "|---|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['vectors']} | {r['n']:,} | {r['dim']} | {r['kind']} | {r['index']} | "
            f"{r['build_s']:.2f} | {r['queries_per_s']:.1f} | {r['recall_at_10']:.4f} |"
            for r in result["faiss"]
        ]
    lines += ["", f"`{result['command']}`", ""]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--data", default="../shared/data/mtrag", help="the MTRAG directory")
    p.add_argument("--out", default="outputs/encode_speed", help="output directory")
    p.add_argument("--model", default="smollm2-135m-instruct", help="base chat LLM")
    p.add_argument("--n", type=int, default=2000, help="MTRAG passages to encode")
    p.add_argument("--batch-size", type=int, default=16, help="passages per forward, both loops")
    p.add_argument("--device", help="cpu, cuda, ... (default: the accelerator, else cpu)")
    p.add_argument("--n-random", type=int, default=1_000_000, help="vectors of the large index")
    p.add_argument("--skip-1m", action="store_true", help="skip the --n-random index")
    p.add_argument("--skip-faiss", action="store_true", help="skip part (b)")
    p.add_argument("--queries", type=int, default=1000, help="queries per Faiss measurement")
    p.add_argument("--ef-search", type=int, nargs="+", default=[16, 64, 128, 256], help="HNSW")
    p.add_argument(
        "--emb",
        metavar="DIR",
        help="real embeddings (an encode_corpus output, e.g. a conversational benchmark's "
        "OUT/emb/NAME) for the MTRAG-size index instead of random vectors",
    )
    p.add_argument(
        "--fp32-layers",
        type=int,
        help="first decoder layers kept in fp32 under bf16 (default: the model's config, 1)",
    )
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for name in ("n", "batch_size", "n_random", "queries"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    env = environment()  # first: the load average before this process works
    passages, corpus_size = sample_passages(args.data, args.n, args.seed)
    encoders, dim = bench_encoders(args, passages)
    result: dict[str, Any] = {
        "command": shlex.join(["python", "benchmarks/encode_speed.py", *argv]),
        "environment": env,
        "encoders": encoders,
        "faiss": [],
    }
    if not args.skip_faiss:
        import faiss

        result["faiss_threads"] = faiss.omp_get_max_threads()
        result["faiss"] = run_faiss(args, corpus_size, dim)
    env["loadavg_1_5_15_at_end"] = [round(x, 2) for x in os.getloadavg()]
    out = Path(args.out)
    write_json(out / "encode_speed.json", result)
    text = markdown(result)
    with atomic_write(out / "encode_speed.md") as f:
        f.write(text)
    print(text)
    print(f"-> {out / 'encode_speed'}.{{json,md}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
