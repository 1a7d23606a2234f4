"""Other runtimes for the encoder body (issue 22): the OpenVINO and ONNX Runtime rows of
benchmarks/encode_speed.py.

The retriever's merged fp32 decoder body (LoRA merged into a copy, EMB rows kept, no LM head;
inputs input_ids, attention_mask, position_ids -> last_hidden_state) is converted once, with
dynamic batch and sequence dimensions:
- OpenVINO: `openvino.convert_model` (TorchScript tracing), compiled for "CPU" with an
  INFERENCE_PRECISION_HINT of "bf16" or "f32";
- ONNX Runtime: `torch.onnx.export` (the TorchScript exporter), CPUExecutionProvider, fp32.
Passages are then encoded with the batching of the `bf16-once` torch row (length-sorted, 16 texts
a batch, right padding), pooled at the last EMB token and L2-normalised (when the retriever
normalises). Conversion and compilation are timed apart from encoding.

Optional extras: `pip install chatretriever[openvino]` / `chatretriever[onnx]`.
"""

from __future__ import annotations

import logging
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

# row -> (runtime, precision); the precision is OpenVINO's INFERENCE_PRECISION_HINT.
RUNTIME_ROWS: dict[str, tuple[str, str]] = {
    "ov-bf16": ("openvino", "bf16"),
    "ov-fp32": ("openvino", "f32"),
    "ort-fp32": ("onnxruntime", "f32"),
}
EXTRA = {"openvino": "openvino", "onnxruntime": "onnx"}  # runtime -> the extra that installs it
INPUTS = ("input_ids", "attention_mask", "position_ids")
NO_BUDGET = 10**9  # batches of `batch_size` texts, as the bf16-once row

# A runner maps a right-padded batch {input: (B, L) int64} to hidden states (B, L, H) float32.
Runner = Callable[[dict[str, np.ndarray]], np.ndarray]


def body_module(retriever: Any) -> Any:
    """The retriever's decoder body as a plain `torch.nn.Module` in fp32 with LoRA merged (a
    copy: the retriever is not touched).

    Returns:
        A module: forward(input_ids (B, L), attention_mask (B, L), position_ids (B, L)) ->
        last_hidden_state (B, L, H) float32.
    """
    import torch

    from chatretriever.modeling.fast_encode import InferenceBody

    decoder = InferenceBody(retriever.model, torch.float32).decoder  # merged, fp32, eval

    class Body(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.decoder = decoder

        def forward(
            self,
            input_ids: torch.Tensor,
            attention_mask: torch.Tensor,
            position_ids: torch.Tensor,
        ) -> torch.Tensor:
            return self.decoder(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=False,
            ).last_hidden_state

    return Body().eval()


def example_batch(pad_id: int) -> dict[str, Any]:
    """The tracing example: two rows of different lengths, so that the traced graph keeps the
    padding mask (an all-ones mask lets transformers drop it, and a padded batch would then be
    traced wrong).

    Returns:
        {"input_ids", "attention_mask", "position_ids"}: (2, 8) int64 tensors.
    """
    from chatretriever.modeling.collate import encode_batch

    return encode_batch([list(range(1, 9)), list(range(1, 6))], pad_id, "right")


def _threads() -> int:
    import torch

    return torch.get_num_threads()  # as many threads as the torch rows


def openvino_runner(module: Any, example: dict[str, Any], precision: str) -> tuple[Runner, dict]:
    """Converts `module` with OpenVINO (dynamic batch and sequence) and compiles it for "CPU".

    The converted model goes through its IR files (`save_model`, `read_model`), as optimum-intel
    does: the in-memory conversion tags the rotary `neg` as a dequantization node, which keeps
    the CPU plugin from fusing RoPE, and under bf16 that cost cosine (min 0.9976 against
    0.99994 through the files, 48 MTRAG passages, chatretriever-smol).

    Args:
        module: From `body_module`.
        example: From `example_batch`.
        precision: INFERENCE_PRECISION_HINT, "bf16" or "f32".

    Returns:
        (runner, {"convert_s", "compile_s", "runtime", "runtime_threads", "runtime_precision"}).
    """
    import openvino as ov
    import torch

    core = ov.Core()
    core.set_property({"ENABLE_MMAP": False})  # weights read into memory: the files go away
    start = time.perf_counter()
    with torch.no_grad(), warnings.catch_warnings():
        # Tracing warns at every shape-dependent branch of the mask code; the example batch
        # is padded, so the traced branches are those of every padded batch.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        model = ov.convert_model(module, example_input=dict(example))
    model.reshape({name: ov.PartialShape([-1, -1]) for name in INPUTS})  # (B, L) dynamic
    with tempfile.TemporaryDirectory() as tmp:
        ov.save_model(model, Path(tmp) / "body.xml", compress_to_fp16=False)
        del model
        model = core.read_model(Path(tmp) / "body.xml")
        converted = time.perf_counter()
        config = {"INFERENCE_PRECISION_HINT": precision, "INFERENCE_NUM_THREADS": _threads()}
        compiled = core.compile_model(model, "CPU", config)
    request = compiled.create_infer_request()
    info = {
        "convert_s": round(converted - start, 2),
        "compile_s": round(time.perf_counter() - converted, 2),
        "runtime": f"openvino {ov.__version__.split('-')[0]}",
        "runtime_threads": int(compiled.get_property("INFERENCE_NUM_THREADS")),
        "runtime_precision": compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name(),
    }

    def run(batch: dict[str, np.ndarray]) -> np.ndarray:
        request.infer(batch)
        return request.get_output_tensor(0).data.copy()  # (B, L, H)

    return run, info


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
        options.intra_op_num_threads = _threads()
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
    module = body_module(retriever)
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
    from chatretriever.modeling.collate import encode_batch, last_token_positions
    from chatretriever.modeling.fast_encode import budget_batches

    out: np.ndarray | None = None
    for idx in budget_batches([len(s) for s in seqs], NO_BUDGET, batch_size):
        batch = encode_batch([seqs[i] for i in idx], pad_id, "right")
        hidden = run({name: batch[name].numpy() for name in INPUTS})  # (B, L, H)
        pos = last_token_positions(batch["input_ids"], batch["attention_mask"], pool_id).numpy()
        if out is None:
            out = np.empty((len(seqs), hidden.shape[-1]), dtype=np.float32)  # (N, H)
        out[idx] = hidden[np.arange(len(idx)), pos]
    if out is None:
        raise ValueError("no texts to encode")
    return out


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
