"""Mixed precision for model code: the compute dtype of a precision setting, and modules kept in
fp32 inside a bf16 autocast region."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from chatretriever.modeling.backbones import native_bf16


def resolve_dtype(setting: str, device: torch.device) -> torch.dtype:
    """Torch dtype of a config dtype: "auto" = bf16 on a bf16-capable GPU or CPU, else fp32."""
    if setting == "fp32":
        return torch.float32
    if setting == "bf16":
        return torch.bfloat16
    return torch.bfloat16 if native_bf16(device) else torch.float32


def dtype_name(setting: str | None, device: torch.device | str | None = None) -> str:
    """The NAME of the dtype a model load gets (what cache keys and reports record): "auto" is
    `resolve_dtype`'s choice on `device` (default: the accelerator, else the CPU) as "bf16" or
    "float32"; None or "" is "float32"; any other name is kept as given, once known (an
    unknown one is a ValueError here, not when a model loads hours of cached work later)."""
    if not setting:
        return "float32"
    from chatretriever.modeling.backbones import _torch_dtype, default_device

    if setting != "auto":
        _torch_dtype(setting)  # ValueError naming the known dtypes
        return setting

    dev = torch.device(device) if device else default_device()
    return "bf16" if resolve_dtype("auto", dev) == torch.bfloat16 else "float32"


def keep_fp32(modules: Sequence[torch.nn.Module]) -> list[Any]:
    """Runs each module with autocast off (fp32 math) even inside a bf16 autocast region.

    Its bf16/fp16 tensor inputs are cast to fp32 and autocast is restored after it, also when it
    raises. Returns the hook handles: `handle.remove()` undoes it.
    """
    handles = []
    for module in modules:
        handles.append(module.register_forward_pre_hook(_autocast_off, with_kwargs=True))
        handles.append(module.register_forward_hook(_autocast_restore, always_call=True))
    return handles


def _to_fp32(x: Any) -> Any:
    if isinstance(x, torch.Tensor) and x.dtype in (torch.bfloat16, torch.float16):
        return x.float()
    if isinstance(x, tuple):
        return tuple(_to_fp32(v) for v in x)
    return x


def _autocast_off(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple | None:
    device_type = next(module.parameters()).device.type
    module._autocast_was_on = torch.is_autocast_enabled(device_type)
    if not module._autocast_was_on:
        return None
    torch.set_autocast_enabled(device_type, False)
    return _to_fp32(args), {k: _to_fp32(v) for k, v in kwargs.items()}


def _autocast_restore(module: torch.nn.Module, args: tuple, output: Any) -> None:
    if getattr(module, "_autocast_was_on", False):
        torch.set_autocast_enabled(next(module.parameters()).device.type, True)
        module._autocast_was_on = False
