"""Part (a) of `encode_speed.py`: the ablation rows of the encoder path (`ROWS`), each one timed
on the same passages: the training forward, the inference copy and its settings, a plain
transformers loop and the other runtimes of `_ov_runtime.py`."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import _ov_runtime
import numpy as np
from tqdm.auto import tqdm

from chatretriever.types import Passage


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
