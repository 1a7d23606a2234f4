"""OpenVINO as a runtime of the encoder fast path (issue 22): the decoder body converted once and
compiled for the CPU.

The retriever's merged fp32 decoder body (LoRA merged into a copy, EMB rows kept, no LM head;
inputs input_ids, attention_mask, position_ids -> last_hidden_state) is converted with
`openvino.convert_model` (TorchScript tracing) with dynamic batch and sequence dimensions, saved
and read back (see `openvino_runner` for why), and compiled for "CPU" with an
INFERENCE_PRECISION_HINT of "bf16" or "f32". `RunnerBody` wraps the compiled model in the call
interface of `fast_encode.InferenceBody`, so `fast_encode.encode_ids` batches both runtimes the
same way (token budget, length-sorted, right padding, last EMB token pooled).

Measured (chatretriever-smol, MTRAG passages, 2-core AMX CPU): the bf16 hint ran about 4.5x the
torch bf16 fast path at cosine min 0.99994 against fp32 (`benchmarks/encode_speed.py`, rows
ov-bf16 / ov-fp32). What it does not do: packing (the converted body takes (B, L) masks),
`fp32_layers` (every layer runs at the precision hint), torch.compile (OpenVINO compiles), KV
caches (incremental session encoding stays on torch), GPUs (a CPU runtime here).

Optional extra: `pip install 'chatretriever[openvino]'`.
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from chatretriever.errors import require_extra

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

INPUTS = ("input_ids", "attention_mask", "position_ids")
PRECISIONS = ("bf16", "f32")  # OpenVINO's INFERENCE_PRECISION_HINT values we compile with

# A runner maps a right-padded batch {input: (B, L) int64} to hidden states (B, L, H) float32.
Runner = Callable[[dict[str, np.ndarray]], np.ndarray]


def require_openvino() -> Any:
    """The `openvino` module, or `MissingExtraError` naming the extra "openvino"."""
    return require_extra("openvino", "openvino", purpose="the OpenVINO runtime")


def check_device(device: torch.device | str) -> None:
    """Raises ValueError unless `device` is a CPU: OpenVINO runs the body on the CPU here.

    Args:
        device: Where the model lives.
    """
    if str(device).split(":")[0] != "cpu":
        raise ValueError(
            f"runtime 'openvino' runs on the CPU, the model is on {device}: "
            "use runtime 'torch' there, or load the model on the CPU"
        )


def precision_hint(dtype: torch.dtype) -> str:
    """OpenVINO's INFERENCE_PRECISION_HINT for a compute dtype: bf16 -> "bf16", else "f32"."""
    import torch

    return "bf16" if dtype == torch.bfloat16 else "f32"


def body_module(model: Any) -> torch.nn.Module:
    """A causal LM's decoder body as a plain `torch.nn.Module` in fp32 with LoRA merged (a copy:
    `model` is not touched).

    Args:
        model: The causal LM (peft-wrapped or not).

    Returns:
        A module: forward(input_ids (B, L), attention_mask (B, L), position_ids (B, L)) ->
        last_hidden_state (B, L, H) float32.
    """
    import torch

    from chatretriever.modeling.fast_encode import InferenceBody, decoder_states

    decoder = InferenceBody(model, torch.float32).decoder  # merged, fp32, eval

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
            return decoder_states(self.decoder, input_ids, attention_mask, position_ids)

    return Body().eval()


def example_batch(pad_id: int) -> dict[str, torch.Tensor]:
    """The tracing example: two rows of different lengths, so that the traced graph keeps the
    padding mask (an all-ones mask lets transformers drop it, and a padded batch would then be
    traced wrong).

    Returns:
        {"input_ids", "attention_mask", "position_ids"}: (2, 8) int64 tensors.
    """
    from chatretriever.modeling.collate import encode_batch

    return encode_batch([list(range(1, 9)), list(range(1, 6))], pad_id, "right")


def default_threads() -> int:
    """As many threads as torch uses (so both runtimes get the same cores)."""
    import torch

    return torch.get_num_threads()


def openvino_runner(
    module: torch.nn.Module,
    example: dict[str, torch.Tensor],
    precision: str,
    threads: int | None = None,
) -> tuple[Runner, dict[str, Any]]:
    """Converts `module` with OpenVINO (dynamic batch and sequence) and compiles it for "CPU".

    The converted model goes through its IR files (`save_model`, `read_model`), as optimum-intel
    does: the in-memory conversion tags the rotary `neg` as a dequantization node, which keeps
    the CPU plugin from fusing RoPE, and under bf16 that cost cosine (min 0.9976 against
    0.99994 through the files, 48 MTRAG passages, chatretriever-smol).

    Args:
        module: From `body_module`.
        example: From `example_batch`.
        precision: INFERENCE_PRECISION_HINT, "bf16" or "f32".
        threads: INFERENCE_NUM_THREADS; default torch's thread count.

    Returns:
        (runner, {"convert_s", "compile_s", "runtime", "runtime_threads", "runtime_precision"}):
        the runner maps {"input_ids", "attention_mask", "position_ids"}: (B, L) int64 arrays to
        (B, L, H) float32; calls are serialized (one inference request).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    ov = require_openvino()
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
        config = {
            "INFERENCE_PRECISION_HINT": precision,
            "INFERENCE_NUM_THREADS": threads or default_threads(),
        }
        compiled = core.compile_model(model, "CPU", config)
    request = compiled.create_infer_request()
    lock = threading.Lock()  # one request: a server's threads take turns
    info = {
        "convert_s": round(converted - start, 2),
        "compile_s": round(time.perf_counter() - converted, 2),
        "runtime": f"openvino {ov.__version__.split('-')[0]}",
        "runtime_threads": int(compiled.get_property("INFERENCE_NUM_THREADS")),
        "runtime_precision": compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name(),
    }

    def run(batch: dict[str, np.ndarray]) -> np.ndarray:
        with lock:
            request.infer(batch)
            return request.get_output_tensor(0).data.copy()  # (B, L, H)

    return run, info


class RunnerBody:
    """A converted body behind the call interface of `fast_encode.InferenceBody`, so that
    `fast_encode.encode_ids` batches it as it batches the torch copy.

    Args:
        run: Maps {"input_ids", "attention_mask", "position_ids"}: (B, L) int64 arrays to
            hidden states (B, L, H) float32.
        dtype: The compute dtype it stands for (recorded in `runtime_info`).
        info: What ran (runtime, precision, threads, conversion times), for metadata.
    """

    fp32_layers = 0  # every layer runs at the runtime's precision
    compiled = False  # torch.compile: never (the runtime compiles its own graph)

    def __init__(
        self, run: Runner, dtype: torch.dtype | None = None, info: dict | None = None
    ) -> None:
        import torch

        self.run = run
        self.dtype = dtype if dtype is not None else torch.float32
        self.info = dict(info or {})
        self.device = torch.device("cpu")

    def __call__(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        """Final hidden states (B, L, H) float32 of a right-padded (B, L) batch."""
        import torch

        tensors = dict(zip(INPUTS, (input_ids, attention_mask, position_ids), strict=True))
        arrays = {k: v.cpu().numpy().astype(np.int64, copy=False) for k, v in tensors.items()}
        return torch.from_numpy(self.run(arrays))  # (B, L, H)


def openvino_body(model: Any, pad_id: int, dtype: torch.dtype) -> RunnerBody:
    """The causal LM's merged decoder body converted and compiled with OpenVINO.

    Args:
        model: The causal LM (peft-wrapped or not), on the CPU; it is not touched.
        pad_id: Padding id (of the tracing example).
        dtype: Compute dtype: bf16 compiles with the "bf16" precision hint, fp32 with "f32".

    Returns:
        A `RunnerBody` for `fast_encode.encode_ids`.

    Raises:
        ValueError: The model is not on the CPU.
        MissingExtraError: openvino is not installed.
    """
    check_device(next(model.parameters()).device)
    require_openvino()
    precision = precision_hint(dtype)
    module = body_module(model)  # an fp32 copy, dropped once converted
    run, info = openvino_runner(module, example_batch(pad_id), precision)
    del module
    logger.info(
        "OpenVINO body (%s): converted in %.1f s, compiled in %.1f s",
        info["runtime_precision"],
        info["convert_s"],
        info["compile_s"],
    )
    return RunnerBody(run, dtype, info)
