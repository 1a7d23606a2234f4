"""Other runtimes for the encoder body (issue 22): the OpenVINO and ONNX Runtime rows of
benchmarks/encode_speed.py.

The retriever's merged fp32 decoder body (LoRA merged into a copy, EMB rows kept, no LM head;
inputs input_ids, attention_mask, position_ids -> last_hidden_state) is converted once, with
dynamic batch and sequence dimensions:
- OpenVINO: the library's runtime (`chatretriever.modeling.ov_runtime`: `convert_model`, saved
  and read back so RoPE fuses, compiled for "CPU" with an INFERENCE_PRECISION_HINT of "bf16" or
  "f32"), which `FastEncodeSettings(runtime="openvino")` runs too;
- ONNX Runtime (benchmark only): `torch.onnx.export` (the TorchScript exporter),
  CPUExecutionProvider, fp32.
Passages are then encoded with the batching of the `bf16-once` torch row (length-sorted, 16 texts
a batch, right padding: `fast_encode.encode_ids` with an unbounded token budget), pooled at the
last EMB token and L2-normalised (when the retriever normalises). Conversion and compilation are
timed apart from encoding.

Optional extras: `pip install chatretriever[openvino]` / `chatretriever[onnx]`.
"""

from __future__ import annotations

import logging
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from chatretriever.modeling.ov_runtime import (
    INPUTS,
    Runner,
    RunnerBody,
    body_module,
    default_threads,
    example_batch,
    openvino_runner,
)

logger = logging.getLogger(__name__)

# row -> (runtime, precision); the precision is OpenVINO's INFERENCE_PRECISION_HINT.
RUNTIME_ROWS: dict[str, tuple[str, str]] = {
    "ov-bf16": ("openvino", "bf16"),
    "ov-fp32": ("openvino", "f32"),
    "ort-fp32": ("onnxruntime", "f32"),
}
EXTRA = {"openvino": "openvino", "onnxruntime": "onnx"}  # runtime -> the extra that installs it
NO_BUDGET = 10**9  # batches of `batch_size` texts, as the bf16-once row


def onnxruntime_runner(module: Any, example: dict[str, Any]) -> tuple[Runner, dict]:
    """Exports `module` to ONNX (TorchScript exporter, dynamic batch and sequence) and opens an
    fp32 ONNX Runtime session on the CPUExecutionProvider.

    Returns:
        (runner, {"convert_s", "compile_s", "runtime", "runtime_threads"}).
    """
    import onnxruntime as ort
    import torch

    axes = {name: {0: "batch", 1: "length"} for name in (*INPUTS, "hidden")}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "body.onnx"
        start = time.perf_counter()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            torch.onnx.export(
                module,
                tuple(example[name] for name in INPUTS),
                str(path),
                input_names=list(INPUTS),
                output_names=["hidden"],
                dynamic_axes=axes,
                opset_version=17,
                dynamo=False,
            )
        converted = time.perf_counter()
        options = ort.SessionOptions()
        options.intra_op_num_threads = default_threads()
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    info = {
        "convert_s": round(converted - start, 2),
        "compile_s": round(time.perf_counter() - converted, 2),
        "runtime": f"onnxruntime {ort.__version__}",
        "runtime_threads": options.intra_op_num_threads,
    }

    def run(batch: dict[str, np.ndarray]) -> np.ndarray:
        return session.run(["hidden"], batch)[0]  # (B, L, H)

    return run, info


def make_runner(retriever: Any, row: str) -> tuple[Runner, dict]:
    """Converts the retriever's merged body for one of RUNTIME_ROWS.

    Raises:
        SystemExit: The runtime is not installed (names the extra).
    """
    runtime, precision = RUNTIME_ROWS[row]
    try:
        __import__(runtime)
    except ImportError as exc:
        raise SystemExit(
            f"row {row} needs {runtime}: pip install 'chatretriever[{EXTRA[runtime]}]'"
        ) from exc
    module = body_module(retriever.model)
    example = example_batch(retriever.pad_id)
    if runtime == "openvino":
        run, info = openvino_runner(module, example, precision)
    else:
        run, info = onnxruntime_runner(module, example)
    logger.info(
        "%s: converted in %.1f s, compiled in %.1f s", row, info["convert_s"], info["compile_s"]
    )
    return run, info


def encode_seqs(
    run: Runner, seqs: Sequence[Sequence[int]], pad_id: int, pool_id: int, batch_size: int
) -> np.ndarray:
    """Hidden states (N, H) float32 at each text's last `pool_id` token, texts in input order.

    Batches as the torch fast path does with an unbounded token budget: longest first,
    `batch_size` texts a batch, right padding.

    Args:
        run: Maps {"input_ids", "attention_mask", "position_ids"}: (B, L) int64 to (B, L, H).
        seqs: N token id lists, each holding its pooling token.
        pad_id: Padding id.
        pool_id: The token whose last occurrence is pooled (the last EMB token).
        batch_size: Texts per forward.

    Returns:
        (N, H) float32, not normalised.
    """
    import torch

    from chatretriever.modeling.fast_encode import FastEncodeSettings, encode_ids

    if not seqs:
        raise ValueError("no texts to encode")
    settings = FastEncodeSettings(token_budget=NO_BUDGET, max_batch=batch_size)
    with torch.inference_mode():
        out = encode_ids(RunnerBody(run), seqs, pad_id, pool_id, settings, batch_size)
    return out.numpy()  # (N, H)


def encode_passages(
    retriever: Any, run: Runner, passages: Sequence[Any], batch_size: int = 16
) -> np.ndarray:
    """(N, H) embeddings of passages through `run` (tokenization included, as the torch rows'
    `encode_passages`), unit vectors when the retriever normalises."""
    seqs = retriever.template.passage_ids_batch(passages)
    emb = encode_seqs(run, seqs, retriever.pad_id, retriever.emb_ids[-1], batch_size)
    if retriever.normalize:
        emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    return emb
