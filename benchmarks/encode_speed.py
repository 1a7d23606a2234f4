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
"""

from __future__ import annotations

import argparse
import json
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

from chatretriever.io.files import atomic_write
from chatretriever.io.mtrag import iter_mtrag_corpus, load_mtrag
from chatretriever.retrieval.evaluate import write_json
from chatretriever.types import Passage

# The helper module beside this script: on sys.path when the script runs, not when it is imported
# from its file (tests/test_benchmarks.py).
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _ov_runtime  # noqa: E402
from _conversational import script  # noqa: E402
from _encode_speed.faiss_rows import bench_faiss, random_unit, run_faiss  # noqa: E402, F401
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
from _shared.paths import repo_path, require_model  # noqa: E402


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
def plain_model(retriever: Any) -> Any:
    """An fp32 causal LM with the retriever's weights (LoRA merged into a copy, EMB rows kept),
    run as a plain transformers model."""
    import copy

    import torch

    from chatretriever.modeling.adapters import is_peft

    model = copy.deepcopy(retriever.model)
    model = model.merge_and_unload() if is_peft(model) else model
    return model.to(torch.float32).eval()


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


# One ablation row per change of the encoder path, all on the same passages; each row is
# (what it is, RetrieverConfig changes, FastEncodeSettings fields or None for the training forward).
BIG = 10**9  # a token budget that never binds: batches of max_batch texts
ROWS: dict[str, tuple[str, dict, dict | None]] = {
    "v1-fp32": ("training forward, fp32, 16 texts a batch", {"dtype": "fp32"}, None),
    "v1-autocast": ("training forward, bf16 autocast, LoRA unmerged, 16 a batch", {}, None),
    "fast-fp32": (
        "inference copy (LoRA merged), fp32, token budget 4096",
        {"dtype": "fp32"},
        {"compile": "off"},
    ),
    "bf16-once": (
        "inference copy, bf16 cast once (all layers), 16 a batch",
        {"dtype": "bf16", "fp32_layers": 0},
        {"token_budget": BIG, "max_batch": 16, "compile": "off"},
    ),
    "bf16-once-l0": (
        "+ first layer fp32",
        {"dtype": "bf16", "fp32_layers": 1},
        {"token_budget": BIG, "max_batch": 16, "compile": "off"},
    ),
    "bf16-budget": (
        "+ token budget 4096 (up to 64 a batch)",
        {"dtype": "bf16", "fp32_layers": 1},
        {"compile": "off"},
    ),
    "bf16-packed": (
        "+ packed rows of 1024 tokens (block-diagonal mask)",
        {"dtype": "bf16", "fp32_layers": 1},
        {"pack": True, "pack_len": 1024, "compile": "off"},
    ),
    "bf16-compiled": (
        "+ torch.compile (dynamic shapes), token budget 4096",
        {"dtype": "bf16", "fp32_layers": 1},
        {"compile": "on"},
    ),
    "fp32-compiled": (
        "inference copy, fp32, token budget 4096, torch.compile",
        {"dtype": "fp32"},
        {"compile": "on"},
    ),
}
ROWS["plain-fp32"] = ("plain loop: AutoModelForCausalLM fp32, corpus order, LM head", {}, None)
# Other runtimes (optional extras): the merged fp32 body converted once, batches of bf16-once.
ROWS["ov-bf16"] = ("OpenVINO CPU, merged body, bf16 precision hint, 16 a batch", {}, None)
ROWS["ov-fp32"] = ("OpenVINO CPU, merged body, f32 precision hint, 16 a batch", {}, None)
ROWS["ort-fp32"] = ("ONNX Runtime CPU, merged body, fp32, 16 a batch", {}, None)
RUNTIME_ROWS = _ov_runtime.RUNTIME_ROWS
OPTIONAL_ROWS = ("plain-fp32", *RUNTIME_ROWS)  # run only when asked for (--rows)


def set_row(retriever: Any, row: str) -> None:
    """Configure the retriever for one ablation row (dtype, fp32 layers, fast-path settings)."""
    from chatretriever.modeling.fast_encode import FastEncodeSettings

    _, config, fast = ROWS[row]
    retriever.config.dtype = config.get("dtype", "auto")
    retriever.config.fp32_layers = config.get("fp32_layers", 1)
    retriever.encode_settings = (
        FastEncodeSettings(enabled=False) if fast is None else FastEncodeSettings(**fast)
    )


def run_row(retriever: Any, row: str, passages: list[Passage], n_tokens: int, warm: int) -> dict:
    """Time one row: a warm-up on the first `warm` passages (compiles, when compiling), then
    every passage through `encode_passages` (tokenization included)."""
    import torch

    if row in RUNTIME_ROWS:
        return run_runtime_row(retriever, row, passages, n_tokens, warm)
    if row == "plain-fp32":
        plain = plain_model(retriever)
        _, warm_s = timed(plain_encode, plain, retriever, passages[:warm], 16)
        emb, seconds = timed(plain_encode, plain, retriever, passages, 16)
        info: dict = {}
    else:
        set_row(retriever, row)
        _, warm_s = timed(retriever.encode_passages, passages[:warm], 16)
        emb, seconds = timed(retriever.encode_passages, passages, 16, True)
        info = retriever.runtime_info() if retriever.encode_settings.enabled else {}
    return {
        "row": row,
        "what": ROWS[row][0],
        "dtype": "float32" if row == "plain-fp32" else _dtype(retriever),
        "fp32_layers": retriever.config.fp32_layers,
        "compiled": bool(info.get("compiled", False)),
        "warmup_s": round(warm_s, 2),
        "seconds": round(seconds, 3),
        "tokens_per_s": round(n_tokens / seconds, 1),
        "passages_per_s": round(len(passages) / seconds, 2),
        "torch_threads": torch.get_num_threads(),
        "_emb": emb,
    }


def run_runtime_row(
    retriever: Any, row: str, passages: list[Passage], n_tokens: int, warm: int
) -> dict:
    """Time one of RUNTIME_ROWS: the conversion and compilation (`convert_s`, `compile_s`), a
    warm-up on the first `warm` passages, then every passage (tokenization included)."""
    import torch

    (run, info), make_s = timed(_ov_runtime.make_runner, retriever, row)
    encode = _ov_runtime.encode_passages
    _, warm_s = timed(encode, retriever, run, passages[:warm], 16)
    emb, seconds = timed(encode, retriever, run, passages, 16)
    return {
        "row": row,
        "what": ROWS[row][0],
        "dtype": "bfloat16" if RUNTIME_ROWS[row][1] == "bf16" else "float32",
        "fp32_layers": 0,
        "compiled": False,
        # Like the compile of bf16-compiled, the conversion counts in the warm-up only.
        "warmup_s": round(make_s + warm_s, 2),
        **info,
        "seconds": round(seconds, 3),
        "tokens_per_s": round(n_tokens / seconds, 1),
        "passages_per_s": round(len(passages) / seconds, 2),
        "torch_threads": torch.get_num_threads(),
        "_emb": emb,
    }


def _dtype(retriever: Any) -> str:
    return str(retriever.compute_dtype).replace("torch.", "")


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
                _save_reference(Path(cache), emb, key)
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


def reference_key_file(path: str | Path) -> Path:
    """The key beside a reference cache: <path>.json (never a neighbour's <stem>.json); a cache
    written before that name has its key at <stem>.json, read (never written) for it."""
    new = Path(f"{path}.json")
    legacy = Path(path).with_suffix(".json")
    return new if new.is_file() or not legacy.is_file() else legacy


def check_reference(path: str | Path, key: dict | None) -> None:
    """A --reference file that exists must be a reference this script wrote (its key beside it)
    of the same passages (and, given the weights in `key`, the same model): else ValueError
    (the file is kept; choose another path)."""
    key_file = reference_key_file(path)
    if not key_file.is_file():
        raise ValueError(
            f"--reference {path}: not a reference cache of this script (no {Path(f'{path}.json')}"
            "); it is kept: choose another path"
        )
    saved = json.loads(key_file.read_text())
    key = json.loads(json.dumps(key)) if key is not None else None  # tuples as the file has them
    if saved.get("ids") != (key or {}).get("ids", saved.get("ids")):
        raise ValueError(
            f"--reference {path}: the reference of {len(saved.get('ids', []))} other passages "
            "(another --n, --seed or --data); it is kept: choose another path"
        )
    if key is not None and "weights" in key and saved.get("weights") != key["weights"]:
        raise ValueError(
            f"--reference {path}: the reference of another model's weights; it is kept: "
            "choose another path"
        )


def _save_reference(path: Path, emb: np.ndarray, key: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "wb") as f:
        np.save(f, emb)
    with atomic_write(Path(f"{path}.json")) as f:
        json.dump(key, f)


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


# ------------------------------------------------------------------------------ (b) Faiss
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
        "encoders": {},
        "faiss": [],
    }

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
