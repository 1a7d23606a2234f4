"""Large-index benchmark with real structure: Faiss Flat, HNSW, IVF-PQ re-ranked from an on-disk
store, and the Milvus backend, over millions of vectors made from real passage embeddings.

Vectors. The real corpus embeddings (`--emb`: an `encode_corpus` output such as the
conversational benchmark's outputs/benchmark/emb/<model>) are split, seeded, into `--queries`
held-out passages and P base passages. Base vector j is base passage (j mod P) plus Gaussian
noise, renormalised; query i is held-out passage i plus noise drawn the same way, so no query is
in the base set. The noise follows the real vectors' covariance (`--noise-shape covariance`:
samples of a Gaussian kernel density estimate of the corpus, which stay in the directions the
model uses) or is isotropic; its expected norm is `--noise` times the median distance from a
base passage to its nearest other base passage. Block b (`--block` rows) depends on (seed, b)
only: a set is streamed block by block, never held whole (10M x 576 fp32 is 23 GB), and the
first rows of a larger set are the smaller set.

Structure kept (per size, from the exact search): `copy_rate`, the share of a base vector's k
nearest other vectors that are copies of its own passage (at most (copies - 1) / k), and
`real_neighbour_rate`, the share of a query's exact top k whose passage is among the k nearest
real base passages of its held-out passage (1.0: the neighbours are the real neighbours' copies).
On the chatretriever-smol MTRAG embeddings at 200k vectors (5.4 copies a passage), noise 0.25,
0.5, 1.0 gives a real-neighbour rate of 0.98, 0.86, 0.50 with covariance noise (the default,
0.5) and 1.0, 0.99, 0.87 with isotropic noise, which mostly lands in directions the model does
not use; the copy rate is at its maximum except for covariance noise 1.0 (0.34 of 0.43).

Measured per system and setting: build seconds (train + add; generating the vectors is timed
apart), the RSS change of this process and its children (a Milvus Lite server) over the build,
the bytes/vector model, queries/s with all queries in one call (`--threads`) and one query a call
(the first `--single` queries), and recall@k against the exact top k (a blocked fp32 scan over
the generated vectors). IVF-PQ re-ranking reads the candidates' vectors from an on-disk .npy
memmap (`--rerank-dtype`, fp16 by default: 11.5 GB at 10M) and orders them by inner product;
rerank depth 0 is IVF-PQ alone. A row whose model needs more than 80% of the available memory
is skipped and says so (Flat and HNSW32 at 10M). HNSW and IVF indexes, the store and the exact
top k are cached in OUT/cache/ and reused when their settings match (delete it to rebuild).

    python benchmarks/index_scale.py                     # 1M and 10M, every system: hours
    python benchmarks/index_scale.py --sizes 200000 --systems hnsw ivfpq-rerank

Writes OUT/index_scale.{json,md,png} (JSON and markdown after every system); those of a run with
other options are kept as OUT/index_scale.prev[-N].*. The parts live in benchmarks/_index_scale/:
vectors (the real and synthetic vectors, the exact search), memory (RSS and the bytes/vector
models), systems (what is built and measured), report (targets, JSON, markdown, plot).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

# The helper package beside this script: on sys.path when the script runs, not when it is imported
# from its file (tests/test_index_scale.py).
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _conversational.script import run  # noqa: E402
from _index_scale import report, systems, vectors  # noqa: E402
from _shared.paths import keep_previous, repo_path, run_settings  # noqa: E402


def _positive_ints(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name in ("sizes", "hnsw_m", "ef_construction", "ef_search", "pq_m", "nprobe"):
        if any(v < 1 for v in getattr(args, name)):
            p.error(f"--{name.replace('_', '-')} must be positive")
    if any(v < 0 for v in args.rerank) or any(0 < d < args.k for d in args.rerank):
        p.error("--rerank depths are 0 (no re-ranking) or at least --k")
    if not args.noise > 0:  # also refuses nan
        p.error("--noise must be positive (0 would make exact duplicates)")
    for name in ("queries", "k", "block", "threads", "kmeans_iters", "train_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if args.single < 0:
        p.error("--single must be 0 or more")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument(
        "--emb",
        metavar="DIR",
        default=repo_path("outputs/benchmark/emb"),
        help="real embeddings: an encode output dir, or a folder holding exactly one",
    )
    p.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    p.add_argument("--systems", nargs="+", choices=systems.SYSTEMS, default=list(systems.SYSTEMS))
    p.add_argument("--queries", type=int, default=1000, help="held-out query sample")
    p.add_argument("--single", type=int, default=200, help="queries timed one a call")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--out", default=repo_path("outputs/index_scale"), help="output directory")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="Faiss threads")
    _add_index_args(p)
    p.add_argument("--noise", type=float, default=0.5, help="noise norm / median NN distance")
    p.add_argument("--noise-shape", choices=["covariance", "isotropic"], default="covariance")
    p.add_argument("--block", type=int, default=100_000, help="vectors per generated block")
    p.add_argument("--no-index-cache", action="store_true", help="do not keep built indexes")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    _positive_ints(p, args)
    return args


def _add_index_args(p: argparse.ArgumentParser) -> None:
    """The settings of the indexes: HNSW, IVF-PQ and its re-ranking, Milvus."""
    p.add_argument("--hnsw-m", type=int, nargs="+", default=[32], help="HNSW M (one graph each)")
    p.add_argument("--ef-construction", type=int, nargs="+", default=[100], help="HNSW")
    p.add_argument("--ef-search", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    p.add_argument(
        "--hnsw-storage", nargs="+", choices=["Flat", "SQfp16", "SQ8"], default=["Flat"],
        help="how HNSW stores the vectors (SQ8 fits 10M in RAM)",
    )  # fmt: skip
    p.add_argument("--nlist", type=int, nargs="+", help="IVF lists (default 4 sqrt(n), power of 2)")
    p.add_argument(
        "--ivf-quantizer", choices=["auto", "flat", "hnsw"], default="auto",
        help="coarse quantizer (auto: HNSW32 from 8192 lists on, to assign 10M vectors fast)",
    )  # fmt: skip
    p.add_argument("--pq-m", type=int, nargs="+", default=[64], help="PQ sub-quantizers")
    p.add_argument("--pq-nbits", type=int, choices=[8, 4], default=8, help="4: fast-scan PQ")
    p.add_argument("--nprobe", type=int, nargs="+", default=[8, 16, 32, 64, 128])
    p.add_argument(
        "--rerank", type=int, nargs="+", default=[0, 100, 300, 1000],
        help="candidates re-ranked exactly (0: IVF-PQ scores alone)",
    )  # fmt: skip
    p.add_argument("--rerank-dtype", choices=["float16", "float32"], default="float16")
    p.add_argument(
        "--train-size", type=int, help="training vectors (default IVF: max(50k, 30 nlist))"
    )
    p.add_argument("--kmeans-iters", type=int, default=10, help="IVF coarse k-means iterations")
    p.add_argument(
        "--milvus-index", default="HNSW:M=32,efConstruction=100", help="Milvus index spec"
    )
    p.add_argument("--milvus-params", nargs="*", default=["ef=64", "ef=128"], help="one row each")
    p.add_argument("--milvus-uri", help="default OUT/cache/milvus.db (Milvus Lite)")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    env = report.environment()  # first: the load average before this process works
    systems.load_faiss().omp_set_num_threads(args.threads)
    out = Path(args.out)
    real = vectors.load_real(args.emb, args.queries, args.seed)
    sset = vectors.make_set(real, args.noise, args.noise_shape, args.seed, args.block)
    result: dict[str, Any] = {
        "command": shlex.join(["python", "benchmarks/index_scale.py", *argv]),
        "environment": env,
        "settings": run_settings(args),
        "k": args.k,
        "set": {
            "key": sset.key,
            "model": real.model,
            "dim": sset.dim,
            "base_passages": len(real.base),
            "queries": len(real.held_out),
            "noise": args.noise,
            "noise_shape": args.noise_shape,
            "nn_distance": round(sset.noise_norm / args.noise, 6) if args.noise else None,
            "rerank_dtype": args.rerank_dtype,
        },
        "faiss_threads": args.threads,
        "sizes": [],
    }
    # before the first system is saved: the files are rewritten as the systems finish
    keep_previous([out / f"index_scale.{ext}" for ext in ("json", "md", "png")], result["settings"])
    start = time.perf_counter()
    for n in args.sizes:
        run_size(args, sset, n, out, result)
    env["loadavg_1_5_15_at_end"] = [round(x, 2) for x in os.getloadavg()]
    env["wall_s"] = round(time.perf_counter() - start, 1)
    text = report.save(result, out)
    print(text)
    drawn = report.plot(result, out / "index_scale.png")
    print(f"-> {out / 'index_scale'}.{{json,md{',png' if drawn else ''}}}")
    return 0


def run_size(
    args: argparse.Namespace, sset: vectors.SyntheticSet, n: int, out: Path, result: dict
) -> None:
    """Every system over the first n vectors of the set, into `result` (saved after each)."""
    cache = out / "cache"
    needs_store = "ivfpq-rerank" in args.systems and any(args.rerank)
    store_path = cache / f"store-{sset.key}-n{n}-{args.rerank_dtype}.npy" if needs_store else None
    truth = vectors.ground_truth(sset, n, args.k, cache, store_path, args.rerank_dtype)
    kept = vectors.structure(sset, n, truth)
    size = {"n": n, "exact_s": round(truth.seconds, 1), "structure": kept}
    size["rows"] = rows = []
    result["sizes"].append(size)
    store = np.load(store_path, mmap_mode="r") if store_path else None
    index_cache = None if args.no_index_cache else cache
    ctx = systems.Context(
        sset, n, sset.queries(), truth.top, args.k, args.single, index_cache, store
    )
    for system in args.systems:
        rows += systems.RUNNERS[system](args, ctx)
        report.save(result, out)


if __name__ == "__main__":
    run(main)
