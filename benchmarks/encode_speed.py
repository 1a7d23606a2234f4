"""Encoding and search speed: the encoder path, one ablation row per change, and Faiss exact
(Flat) against HNSW32.

(a) tokens/s of `ChatRetriever.encode_passages` on the same N real MTRAG passages for each row
    of ROWS: the training forward (v1: fp32, or bf16 autocast with LoRA unmerged, 16 texts a
    batch), the inference copy (`modeling.fast_encode`: LoRA merged, bf16 cast once, first
    layer fp32), token-budget batches, packed rows, torch.compile, and optionally a plain
    transformers loop (`--rows plain-fp32 ...`: the same weights, corpus order, LM head).
    Each row's embeddings are compared (cosine) with the fp32 inference copy's, which equals the
    fp32 training forward. Rows are written to the JSON as they finish. Optional runtime rows
    (issue 22; `--rows ov-bf16 ov-fp32 ort-fp32`, extras `openvino` and `onnx`): the merged
    fp32 decoder body converted to OpenVINO (bf16 or f32 precision hint) or ONNX Runtime, with
    the batches of bf16-once (`_ov_runtime.py`); conversion is timed apart, not in tokens/s.
(b) queries/s of a Faiss Flat (exact inner product) index against HNSW32 at several efSearch
    values, with HNSW's recall@10 against the exact top 10, at the MTRAG corpus size and at
    `--n-random` vectors. Vectors are random unit Gaussians of the model's dimension (queries
    drawn the same way): a hard case for HNSW, whose recall on real, clustered embeddings is
    much higher. `--emb DIR` uses real corpus embeddings for the MTRAG-size index instead.

    python benchmarks/encode_speed.py --skip-faiss              # N=2000, every row
    python benchmarks/encode_speed.py --n 64 --n-random 20000   # a smoke run

Writes OUT/encode_speed.{json,md} (the JSON after every row); those of a run with other options
are kept as OUT/encode_speed.prev[-N].*. Its parts are in _encode_speed/: encoder_rows.py (the
rows of (a)), reference.py (the --reference cache), faiss_rows.py (part (b)) and report.py (the
markdown and the targets).
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from chatretriever.io.atomic import atomic_write
from chatretriever.io.mtrag import iter_mtrag_corpus, load_mtrag
from chatretriever.retrieval.evaluate import write_json
from chatretriever.types import Passage

# The helper module beside this script: on sys.path when the script runs, not when it is imported
# from its file (tests/test_benchmarks.py).
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _ov_runtime  # noqa: E402, F401  (tests reach it as encode_speed._ov_runtime)
from _conversational import script  # noqa: E402
from _encode_speed.encoder_rows import (  # noqa: E402, F401  (plain_*: tests use them from here)
    OPTIONAL_ROWS,
    ROWS,
    padding_efficiency,
    plain_encode,
    plain_model,
    run_row,
    timed,
)
from _encode_speed.faiss_rows import bench_faiss, random_unit, run_faiss  # noqa: E402, F401
from _encode_speed.reference import check_reference, save_reference  # noqa: E402
from _encode_speed.report import (  # noqa: E402, F401
    REFERENCE,
    TARGET_COSINE,
    TARGET_COSINE_MEAN,
    TARGET_FP32_SPEEDUP,
    TARGET_SPEEDUP,
    TARGET_TOKENS_PER_S,
    _ratio,
    markdown,
)
from _shared.machine import cpu_model  # noqa: E402
from _shared.paths import keep_previous, repo_path, require_model, run_settings  # noqa: E402


def environment() -> dict[str, Any]:
    """What else ran: thread counts and the load average (other processes busy?)."""
    import torch

    from chatretriever.modeling.backbones import native_bf16

    load = os.getloadavg()
    return {
        "cpu_model": cpu_model(),
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
def bench_encoders(
    args: argparse.Namespace, passages: list[Passage], on_row: Any = None
) -> tuple[dict, int]:
    """Part (a): every requested ablation row on the same passages; returns (results, dim)."""
    import torch

    from chatretriever.methods.chatretriever.model import ChatRetriever
    from chatretriever.modeling.fast_encode import hardware_kind

    retriever = ChatRetriever.from_pretrained(args.model, device=args.device)
    seqs, tokenize_s = timed(retriever.template.passage_ids_batch, passages)
    lengths = [len(s) for s in seqs]
    n_tokens = sum(lengths)
    result: dict[str, Any] = {
        "model": args.model,
        "device": str(retriever.device),
        "hardware": hardware_kind(retriever.device),
        "n_passages": len(passages),
        "n_tokens": n_tokens,
        "tokens_mean": float(np.mean(lengths)),
        "tokens_max": int(max(lengths)),
        "tokenize_s": round(tokenize_s, 3),
        "padding_efficiency_16_sorted": round(padding_efficiency(lengths, 16, True), 3),
        "rows": [],
    }
    reference, cache = None, getattr(args, "reference", None)
    key = {"weights": retriever.weights_fingerprint(), "ids": [p.id for p in passages]}
    if cache and Path(cache).exists():
        check_reference(cache, key)  # another model's reference is refused, not replaced
        reference = np.load(cache)  # the fp32 reference of an earlier run: not timed again
        result["reference_from"] = str(cache)
    rows = (
        list(args.rows)
        if reference is not None
        else [REFERENCE] + [r for r in args.rows if r != REFERENCE]
    )
    for row in tqdm(rows, desc="ablation rows", unit="row"):
        measured = run_row(retriever, row, passages, n_tokens, min(64, len(passages)))
        emb = measured.pop("_emb")
        if reference is None:
            reference = emb
            if cache:
                save_reference(Path(cache), emb, key)
        cosine = np.sum(emb * reference, axis=1)  # unit vectors
        measured["cosine_min"] = float(cosine.min())
        measured["cosine_mean"] = float(cosine.mean())
        result["rows"].append(measured)
        _speedups(result)
        if on_row is not None:
            on_row(result)  # partial results survive a long run stopped midway
    dim = retriever.dim
    del retriever
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result, dim


def _speedups(result: dict) -> None:
    """Ratios against today's path (v1-autocast) and judgement of the targets."""
    by = {r["row"]: r for r in result["rows"]}
    for r in result["rows"]:
        for base in ("v1-autocast", "v1-fp32"):
            if base in by:
                r[f"speedup_vs_{base}"] = round(by[base]["seconds"] / r["seconds"], 3)
    accurate = [
        r
        for r in result["rows"]
        if r["cosine_min"] >= TARGET_COSINE and r["cosine_mean"] >= TARGET_COSINE_MEAN
    ]
    best = max(accurate, key=lambda r: r["tokens_per_s"], default=None)
    result["best_row"] = best["row"] if best else None
    result["best_tokens_per_s"] = best["tokens_per_s"] if best else None
    result["meets_bf16_target"] = bool(best and best["tokens_per_s"] >= TARGET_TOKENS_PER_S)
    fp32 = [r for r in accurate if r["dtype"] == "float32" and r["row"] != "v1-fp32"]
    if "v1-fp32" in by and fp32:
        gain = max(r["tokens_per_s"] for r in fp32) / by["v1-fp32"]["tokens_per_s"]
        result["fp32_speedup"] = round(gain, 3)
        result["meets_fp32_target"] = gain >= TARGET_FP32_SPEEDUP


# ------------------------------------------------------------------------------ command line
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--data", default=repo_path("../shared/data/mtrag"), help="the MTRAG directory")
    p.add_argument("--out", default=repo_path("outputs/encode_speed"), help="output directory")
    p.add_argument("--model", default="chatretriever-smol", help="retriever or base chat LLM")
    p.add_argument("--n", type=int, default=2000, help="MTRAG passages to encode")
    p.add_argument(
        "--rows",
        nargs="+",
        choices=sorted(ROWS),
        default=[r for r in ROWS if r not in OPTIONAL_ROWS],
        help="ablation rows (fast-fp32, the cosine reference, always runs first; "
        f"{', '.join(OPTIONAL_ROWS)} only when named)",
    )
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
        "--reference",
        metavar="NPY",
        help="cache of the fp32 reference embeddings: written by a run, read (and the "
        "reference row not timed again) by a later run on the same passages and model",
    )
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for name in ("n", "n_random", "queries"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if min(args.ef_search) < 1:
        p.error(f"--ef-search values must be positive, got {min(args.ef_search)}")
    if args.emb and not Path(args.emb).is_dir():  # before minutes of encoder rows
        p.error(f"--emb {args.emb}: no such directory")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    require_model(args.model)  # before the corpus is read
    env = environment()  # first: the load average before this process works
    passages, corpus_size = sample_passages(args.data, args.n, args.seed)
    if args.reference and Path(args.reference).exists():  # before the model loads
        check_reference(args.reference, {"ids": [p.id for p in passages]})
    out = Path(args.out)
    result: dict[str, Any] = {
        "command": shlex.join(["python", "benchmarks/encode_speed.py", *argv]),
        "environment": env,
        "settings": run_settings(args),
        "encoders": {},
        "faiss": [],
    }
    # before the first row is saved: the JSON is rewritten as the rows finish
    keep_previous([out / "encode_speed.json", out / "encode_speed.md"], result["settings"])

    def save(encoders: dict) -> None:
        result["encoders"] = encoders
        write_json(out / "encode_speed.json", result)

    _, dim = bench_encoders(args, passages, on_row=save)
    if not args.skip_faiss:
        import faiss

        result["faiss_threads"] = faiss.omp_get_max_threads()
        result["faiss"] = run_faiss(args, corpus_size, dim)
    env["loadavg_1_5_15_at_end"] = [round(x, 2) for x in os.getloadavg()]
    write_json(out / "encode_speed.json", result)
    text = markdown(result)
    with atomic_write(out / "encode_speed.md") as f:
        f.write(text)
    print(text)
    print(f"-> {out / 'encode_speed'}.{{json,md}}")
    return 0


if __name__ == "__main__":
    script.run(main)
