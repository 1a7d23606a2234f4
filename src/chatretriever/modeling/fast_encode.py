"""The inference fast path of decoder-body encoders (no gradients, many texts).

Where the time went (SmolLM2-135M, bf16 autocast, CPU): a third in dtype copies (autocast casts
every weight on every call, LoRA layers run unmerged), and most of the rest in small elementwise
ops (RMSNorm, rotary, SiLU), not in matmuls. So the fast path
- runs an INFERENCE COPY of the model: LoRA merged, attention and MLP weights cast to the
  compute dtype ONCE, inputs cast at each block by hooks; the embeddings, the norms, the
  residual stream and the first `fp32_layers` decoder layers stay fp32, as autocast keeps them
  (`InferenceBody`; whole layers in bf16 moved MTRAG-UN nDCG@3 by 0.009, this by 0.0003);
- batches by a TOKEN BUDGET (padded tokens per forward) over length-sorted texts rather than a
  text count (`collate.budget_batches`), or packs several texts into one row with a
  block-diagonal causal mask and restarting positions (`collate.pack_rows`, `packed_batch`;
  pooling reads each text's own last token);
- optionally compiles the body with `torch.compile` (dynamic shapes: one graph for every batch
  shape), which fuses the elementwise ops: measured 1.14x over the eager bf16 copy for a 77 s
  compile on a 2-core AMX CPU, which pays back after about 3M tokens, so "auto" compiles only
  once a model has encoded `compile_min_tokens` tokens (a large corpus, never a query);
- or runs the body in another RUNTIME: "openvino" (`ov_runtime`: the merged body converted and
  compiled for the CPU once, batched by `encode_ids` as the torch copy is).
The defaults per hardware kind come from `benchmarks/encode_speed.py` (see the README table).
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import torch

from chatretriever.modeling.adapters import is_peft
from chatretriever.modeling.backbones import native_bf16
from chatretriever.modeling.collate import (
    budget_batches,
    encode_batch,
    last_token_positions,
    pack_rows,
    packed_batch,
)

logger = logging.getLogger(__name__)

COMPILE_MODES = ("auto", "on", "off")
RUNTIMES = ("torch", "openvino")  # what runs the body: the inference copy, or `ov_runtime`


@dataclass(frozen=True)
class FastEncodeSettings:
    """How the fast path batches and runs.

    Attributes:
        enabled: Use the fast path at all (False: the training forward, batch_size texts a batch).
        token_budget: Padded tokens per forward (batch rows x longest row).
        max_batch: At most this many texts per forward (the caller's batch_size caps it too).
        pack: Pack several texts into each row (block-diagonal mask) instead of padding.
        pack_len: Row length when packing (a longer text gets a row of its own).
        compile: "on", "off" or "auto" (compile once `compile_min_tokens` tokens were encoded and
            a C++ compiler exists on a CPU).
        compile_min_tokens: The "auto" threshold.
        runtime: One of RUNTIMES. "openvino" (CPU only) converts the merged body once and
            compiles it with the precision of the compute dtype; `compile` and `fp32_layers`
            do not apply to it, and it does not pack. Incremental session encoding (KV caches)
            always runs the torch copy.
    """

    enabled: bool = True
    token_budget: int = 4096
    max_batch: int = 64
    pack: bool = False
    pack_len: int = 1024
    compile: str = "auto"
    compile_min_tokens: int = 3_000_000
    runtime: str = "torch"

    def __post_init__(self) -> None:
        if self.compile not in COMPILE_MODES:
            raise ValueError(f"compile must be one of {COMPILE_MODES}, got {self.compile!r}")
        if self.runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {RUNTIMES}, got {self.runtime!r}")
        if self.pack and self.runtime != "torch":
            raise ValueError(f"runtime {self.runtime!r} does not pack (its body takes 2D masks)")
        for name in ("token_budget", "max_batch", "pack_len", "compile_min_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def hardware_kind(device: torch.device) -> str:
    """ "cuda", "cpu-amx", "cpu-avx512-bf16" or "cpu" (no native bf16): what picks the defaults."""
    if device.type != "cpu":
        return device.type
    cpu = torch.cpu
    if getattr(cpu, "_is_amx_tile_supported", lambda: False)():
        return "cpu-amx"
    if getattr(cpu, "_is_avx512_bf16_supported", lambda: False)():
        return "cpu-avx512-bf16"
    return "cpu"


def default_settings(device: torch.device) -> FastEncodeSettings:
    """The defaults for this device, as `benchmarks/encode_speed.py` measured them.

    CPU: a 4,096-token budget (larger brought nothing measurable, smaller starved the matmuls);
    a GPU takes far larger batches. Packing stays off by default: texts are length-sorted, so
    padding is already small, and a packed row's attention is quadratic in the row length.
    """
    if device.type == "cuda":
        return FastEncodeSettings(token_budget=65_536, max_batch=512, compile="off")
    return FastEncodeSettings()


def have_compiler() -> bool:
    """Whether inductor can build CPU kernels here (it needs a C++ compiler)."""
    return any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "c++", "clang++"))


# ------------------------------------------------------------------------------ the model copy
class EncodeBody(Protocol):
    """What `encode_ids` runs: `InferenceBody`, or a converted body (`ov_runtime.RunnerBody`)."""

    device: torch.device
    dtype: torch.dtype
    fp32_layers: int
    compiled: bool

    def __call__(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor: ...


class InferenceBody:
    """A frozen inference copy of a causal LM's decoder body.

    LoRA is merged into the copy, its attention and MLP weights are cast to `dtype` once, and
    the embeddings, the rotary frequencies, the norms, the residual stream and the first
    `fp32_layers` decoder layers stay fp32; each cast block's floating inputs are cast to its
    dtype by a forward pre-hook. The original model is not touched.

    Args:
        model: The causal LM (peft-wrapped or not).
        dtype: Compute dtype of the other layers (bf16 or fp32).
        fp32_layers: Decoder layers kept in fp32 under bf16.
        compile: Wrap the forward in `torch.compile(dynamic=True)`; on a compile error it falls
            back to eager (logged once).
    """

    def __init__(
        self, model: Any, dtype: torch.dtype, fp32_layers: int = 0, compile: bool = False
    ) -> None:
        base = copy.deepcopy(model)
        if is_peft(base):
            base = base.merge_and_unload()
        self.decoder = base.get_decoder().eval().requires_grad_(False)
        self.dtype = dtype
        self.fp32_layers = fp32_layers if dtype != torch.float32 else 0
        layers = list(getattr(self.decoder, "layers", []))
        if dtype != torch.float32:
            # Only the later layers are cast (a cast to bf16 and back would not restore the
            # fp32 ones); the embeddings (EMB rows), rotary frequencies and final norm cost
            # little and stay in fp32 too.
            self.decoder.float()
            cast = layers[self.fp32_layers :]
            whole = [layer for layer in cast if not _cast_layer(layer, dtype)]
            norm = getattr(self.decoder, "norm", None)
            for module in [*layers[: self.fp32_layers], *whole, norm]:
                if module is not None:
                    module.register_forward_pre_hook(_cast_inputs, with_kwargs=True)
        self.compiled = False
        self._forward = self._eager
        if compile:
            self._forward = torch.compile(self._eager, dynamic=True)
            self.compiled = True

    @property
    def device(self) -> torch.device:
        return next(self.decoder.parameters()).device

    def _eager(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        return decoder_states(self.decoder, input_ids, attention_mask, position_ids)

    def __call__(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        """Final hidden states (B, L, H), fp32 (the final norm stays fp32)."""
        try:
            return self._forward(input_ids, attention_mask, position_ids)
        except Exception as exc:  # an inductor/compiler failure: eager is always correct
            if not self.compiled:
                raise
            logger.warning("torch.compile failed (%s); encoding without it", str(exc)[:200])
            self._forward, self.compiled = self._eager, False
            return self._eager(input_ids, attention_mask, position_ids)


def decoder_states(
    decoder: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
) -> torch.Tensor:
    """One no-cache forward of a decoder body: its final hidden states (B, L, H)."""
    return decoder(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=False,
    ).last_hidden_state


def _cast_layer(layer: torch.nn.Module, dtype: torch.dtype) -> bool:
    """Casts a decoder layer's attention and MLP to `dtype` and keeps its norms and residual
    stream in fp32, as autocast does: the residual adds then promote to fp32, and the norms
    see fp32 inputs. A layer without `self_attn` and `mlp` children is cast whole.

    Returns:
        True when the layer was split (its blocks cast their own inputs), False when cast whole.

    Why: casting whole layers ran the residual stream through 30 bf16 additions, which moved
    the MTRAG-UN nDCG@3 of the shipped model by 0.009 against the training forward (autocast).
    """
    blocks = [getattr(layer, name, None) for name in ("self_attn", "mlp")]
    if any(b is None for b in blocks):
        layer.to(dtype)
        return False
    for block in blocks:
        block.to(dtype)
        block.register_forward_pre_hook(_cast_inputs, with_kwargs=True)
    return True


def _layer_dtype(module: torch.nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


def _cast_inputs(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Casts floating inputs (hidden states, rotary cos/sin, additive masks) to the module's
    dtype; an additive mask's most negative value is clamped first (fp32's min is -inf in
    bf16, and a fully blocked row would then give NaN)."""
    dtype = _layer_dtype(module)

    def cast(x: Any) -> Any:
        if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != dtype:
            narrowing = torch.finfo(x.dtype).max > torch.finfo(dtype).max
            return (x.clamp(min=torch.finfo(dtype).min) if narrowing else x).to(dtype)
        if isinstance(x, tuple):
            return tuple(cast(v) for v in x)
        return x

    return tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}


def encode_ids(
    body: EncodeBody,
    seqs: Sequence[Sequence[int]],
    pad_id: int,
    pool_id: int,
    settings: FastEncodeSettings,
    max_batch: int,
    bar: Any = None,
) -> torch.Tensor:
    """Hidden states (N, H) float32 at each text's last `pool_id` token, texts in input order.

    Args:
        body: The inference copy, or a converted body (`ov_runtime.RunnerBody`).
        seqs: N token id lists, each ending with its pooling token.
        pad_id: Padding id.
        pool_id: The token whose last occurrence is pooled (the last EMB token).
        settings: Budget, packing.
        max_batch: Texts per forward at most (with `settings.max_batch`).
        bar: A tqdm bar to update per text, or None.
    """
    device = body.device
    lengths = [len(s) for s in seqs]
    cap = max(1, min(max_batch, settings.max_batch))
    out: torch.Tensor | None = None
    if settings.pack:
        groups = pack_rows(lengths, settings.pack_len)
        batches = budget_batches(
            [sum(lengths[i] for i in g) for g in groups], settings.token_budget, cap
        )
        plan = [[groups[b] for b in batch] for batch in batches]
    else:
        plan = [
            [[i] for i in batch] for batch in budget_batches(lengths, settings.token_budget, cap)
        ]
    for rows in plan:
        pooled = _forward_rows(
            body, [[seqs[i] for i in row] for row in rows], pad_id, pool_id, device
        )
        idx = torch.tensor([i for row in rows for i in row], device=device)
        if out is None:
            out = torch.empty((len(seqs), pooled.shape[-1]), dtype=torch.float32, device=device)
        out[idx] = pooled
        if bar is not None:
            bar.update(len(idx))
    assert out is not None
    return out


def _forward_rows(
    body: EncodeBody,
    rows: list[list[Sequence[int]]],
    pad_id: int,
    pool_id: int,
    device: torch.device,
) -> torch.Tensor:
    """Pooled (T, H) float32 of the texts of `rows` (one text per row unless packed)."""
    if all(len(row) == 1 for row in rows):
        batch = encode_batch([row[0] for row in rows], pad_id, "right")
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        hidden = body(ids, mask, batch["position_ids"].to(device))  # (B, L, H)
        pos = last_token_positions(ids, mask, pool_id)  # (B,)
        return hidden[torch.arange(len(rows), device=device), pos].float()
    packed = packed_batch(rows, pad_id)
    ids = packed["input_ids"].to(device)
    r, p = packed["last"].to(device).unbind(-1)  # (T,), (T,)
    if not bool((ids[r, p] == pool_id).all()):
        raise ValueError(f"a packed text does not end with the pooling token {pool_id}")
    hidden = body(ids, packed["attention_mask"].to(device), packed["position_ids"].to(device))
    return hidden[r, p].float()


def resolved(settings: FastEncodeSettings | None, device: torch.device) -> FastEncodeSettings:
    """`settings`, or the device's defaults when None."""
    return settings if settings is not None else default_settings(device)


def want_compile(settings: FastEncodeSettings, device: torch.device, tokens_seen: int) -> bool:
    """Whether to compile now: "on"; or "auto" on a CPU with a compiler past the threshold."""
    if settings.compile == "on":
        return True
    if settings.compile == "off" or device.type != "cpu":
        return False
    return tokens_seen >= settings.compile_min_tokens and have_compiler()


def runtime_info(settings: FastEncodeSettings, body: EncodeBody | None, device: Any) -> dict:
    """What ran, for embeddings metadata: hardware kind, native bf16, settings, runtime (with
    what a converted body reports: version, precision, threads, conversion times), compiled."""
    dev = torch.device(device)
    detail = getattr(body, "info", None)
    return {
        "runtime": settings.runtime,
        **({"runtime_detail": dict(detail)} if detail else {}),
        "hardware": hardware_kind(dev),
        "native_bf16": native_bf16(dev),
        "torch_threads": torch.get_num_threads(),
        "fast_encode": settings.to_dict(),
        "dtype": str(body.dtype).replace("torch.", "") if body else None,
        "fp32_layers": body.fp32_layers if body else None,
        "compiled": bool(body and body.compiled),
    }
