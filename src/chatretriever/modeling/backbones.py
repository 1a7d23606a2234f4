"""Load base models offline: a causal LM or an encoder and its tokenizer, from anything
`sources.resolve_model_dir` turns into a local Hugging Face directory (a local directory, a local
`.gguf` file or a built-in name), plus the device and precision defaults for running them and a
greedy chat reply whose prompt is fitted to the model's context (`keep_prompt_end`).
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chatretriever.modeling.sources import ModelInfo, builtin, resolve_model_dir

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def default_device() -> torch.device:
    """The current accelerator (CUDA, MPS, XPU, ...) when there is one, else the CPU."""
    import torch

    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6
    if accelerator is not None and accelerator.is_available():
        return accelerator.current_accelerator()
    return torch.device("cpu")


def checked_device(device: str | torch.device | None) -> torch.device:
    """`device` as a torch device, checked before a model loads onto it (`default_device` when
    None).

    Raises:
        ValueError: Not a device name, or a device this machine does not have (naming what it
            has), instead of torch's error after the whole model has loaded.
    """
    import torch

    if device is None:
        return default_device()
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"device {device!r} is not a device name (cpu, cuda, cuda:1, mps, xpu, ...)"
        ) from None
    if d.type == "cpu":
        return d
    accelerator = getattr(torch, "accelerator", None)
    here = accelerator.current_accelerator() if accelerator and accelerator.is_available() else None
    count = accelerator.device_count() if here is not None else 0
    if here is None or here.type != d.type or (d.index is not None and d.index >= count):
        has = f"{here.type} x {count}" if here is not None else "no accelerator"
        raise ValueError(f"device {device!r} is not on this machine (it has: cpu, {has})")
    return d


def native_bf16(device: torch.device) -> bool:
    """Whether `device` runs bf16 matmuls natively (a bf16 GPU; a CPU with AMX or AVX512-BF16).

    On a CPU without them bf16 is emulated and far slower than fp32, so "auto" precision and the
    embedders' bf16 autocast use it only where this is True.
    """
    import torch

    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        cpu = torch.cpu
        amx = getattr(cpu, "_is_amx_tile_supported", lambda: False)()
        avx = getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
        return bool(amx or avx)
    return False


_DTYPE_NAMES = {
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
}


def _torch_dtype(dtype: torch.dtype | str | None) -> torch.dtype | str:
    """None -> float32 (predictable on CPU); "auto" -> the checkpoint's own dtype."""
    import torch

    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPE_NAMES:
        return getattr(torch, _DTYPE_NAMES[dtype.lower()])
    raise ValueError(f"unknown dtype {dtype!r}: use one of {sorted(_DTYPE_NAMES)} or 'auto'")


_CHAT_HINT = "give a causal chat LLM, e.g. smollm2-135m-instruct (`chatretriever models`)"


def is_chat_llm(name_or_path: str | Path) -> bool:
    """Whether a model name or directory is a causal chat LLM (a built-in one, a trained
    ChatRetriever on one, or a directory whose config names a causal LM architecture)."""
    info = builtin(name_or_path)
    if info is not None:
        return info.kind in ("causal", "chatretriever")
    directory = Path(name_or_path)
    if (directory / "chatretriever.json").is_file():
        return True
    if not (directory / "config.json").is_file():
        return False
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(directory, local_files_only=True)
    return any(a.endswith(_CAUSAL_SUFFIXES) for a in config.architectures or [])


def _resolve_kind(kind: str, info: ModelInfo | None, model_dir: Path, remote: bool) -> str:
    if kind not in ("auto", "causal", "encoder"):
        raise ValueError(f"kind must be 'auto', 'causal' or 'encoder', got {kind!r}")
    if info is not None and info.kind == "chatretriever":
        raise ValueError(
            f"'{info.name}' is a trained ChatRetriever, not a backbone: load it with "
            "chatretriever.methods.chatretriever.model"
        )
    if info is not None and info.kind not in ("causal", "encoder"):
        raise ValueError(
            f"'{info.name}' is a trained {info.kind} model (an adapter or predictor), not a "
            "backbone: pass it as the reranker's adapter or load it with its method's loader"
        )
    if info is not None:
        return info.kind if kind == "auto" else kind
    if kind == "encoder":
        return kind
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir, local_files_only=True, trust_remote_code=remote)
    archs = config.architectures or []
    causal = any(a.endswith(_CAUSAL_SUFFIXES) for a in archs)
    if kind == "causal" and archs and not causal:
        raise ValueError(f"{model_dir} holds a {archs[0]}, not a chat (causal) LLM: {_CHAT_HINT}")
    return kind if kind != "auto" else ("causal" if causal else "encoder")


def load_backbone(
    name_or_path: str | Path,
    *,
    kind: str = "auto",
    dtype: torch.dtype | str | None = None,
    attn_implementation: str = "sdpa",
    trust_remote_code: bool = False,
) -> tuple[Any, Any]:
    """Loads a base model and its tokenizer from local files only.

    Args:
        name_or_path: See `resolve_model_dir`.
        kind: "causal" (AutoModelForCausalLM), "encoder" (AutoModel) or "auto" (the built-in
            entry's kind, else "causal" when the config's architectures name a causal LM).
        dtype: None (float32), "auto" (as stored), a torch dtype or a name ("bf16", "float16").
        attn_implementation: "sdpa" (falls back to "eager" for models without it) or "eager".
        trust_remote_code: Run model code shipped with the checkpoint; only when you trust it.

    Returns:
        (model in eval mode, tokenizer). A tokenizer without a pad token gets its eos token.
    """
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    info = builtin(name_or_path)
    if kind == "causal" and info is not None and info.kind == "encoder":
        raise ValueError(f"'{info.name}' is an encoder (an embedder), not a chat LLM: {_CHAT_HINT}")
    model_dir = resolve_model_dir(name_or_path)
    kind = _resolve_kind(kind, info, model_dir, trust_remote_code)
    cls = AutoModelForCausalLM if kind == "causal" else AutoModel
    common = dict(local_files_only=True, trust_remote_code=trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, **common)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    torch_dtype = _torch_dtype(dtype)
    try:
        model = cls.from_pretrained(
            model_dir, dtype=torch_dtype, attn_implementation=attn_implementation, **common
        )
    except ValueError as e:
        if attn_implementation != "sdpa" or "scaled_dot_product_attention" not in str(e):
            raise
        logger.info("%s has no sdpa attention; using eager", model_dir)
        model = cls.from_pretrained(
            model_dir, dtype=torch_dtype, attn_implementation="eager", **common
        )
    return model.eval(), tokenizer


def context_length(model: Any) -> int | None:
    """The most positions a model takes: its text config's `max_position_embeddings` (GPT-2's
    `n_positions` answers to that name too), or None where the config names none."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    ctx = getattr(text, "max_position_embeddings", None)
    return ctx if isinstance(ctx, int) and ctx > 0 else None


# Models already warned of a prompt cut to their context: once per model, not once per call.
_WARNED_CUT: weakref.WeakSet[Any] = weakref.WeakSet()


def keep_prompt_end(
    enc: Mapping[str, torch.Tensor], model: Any, max_new_tokens: int
) -> Mapping[str, torch.Tensor]:
    """Prompt tensors cut from their start so that they and `max_new_tokens` more fit the
    model's context (`context_length`). Past it, learned positions (GPT-2) raise IndexError and
    rotary ones (Llama) run on positions never trained; a prompt's end holds the question and
    the generation prompt, so that is what is kept. A warning is logged once per model.

    Args:
        enc: The tokenizer's tensors, (B, T) each, one row or padded on the LEFT (the last
            columns then hold every row's end).
        model: The causal LM.
        max_new_tokens: The positions still needed after the prompt.

    Returns:
        `enc` itself when it fits (or the model names no context), else every tensor's last
        (context - max_new_tokens) columns.

    Raises:
        ValueError: `max_new_tokens` alone fills the context.
    """
    ctx = context_length(model)
    width = enc["input_ids"].shape[1]
    if ctx is None or width + max_new_tokens <= ctx:
        return enc
    room = ctx - max_new_tokens
    if room < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} fills the model's context of {ctx}")
    if model not in _WARNED_CUT:
        _WARNED_CUT.add(model)
        logger.warning(
            "a prompt of %d tokens and %d new ones pass the context of %s (%d tokens): the "
            "prompt's start was cut, its end kept",
            width,
            max_new_tokens,
            getattr(model.config, "name_or_path", "") or type(model).__name__,
            ctx,
        )
    return {k: v[:, -room:] for k, v in enc.items()}


def generate_reply(
    model: Any,
    tokenizer: Any,
    prompt: str | Sequence[Mapping[str, str]],
    max_new_tokens: int = 64,
) -> str:
    """Greedy-generates the assistant's reply to a chat (a quick check that a backbone works).

    Args:
        model: A causal LM.
        tokenizer: Its tokenizer, with a chat template.
        prompt: A user message, or a list of {"role", "content"} messages.
        max_new_tokens: The most tokens to generate.

    Returns:
        The reply text, without special tokens. A prompt that does not fit the model's context
        beside `max_new_tokens` keeps its end (`keep_prompt_end`).
    """
    import torch

    if tokenizer.chat_template is None:
        raise ValueError("the tokenizer has no chat template")
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    # The template already holds every special token (BOS included where the model wants one).
    enc = tokenizer(text, add_special_tokens=False, return_tensors="pt").to(model.device)
    enc = keep_prompt_end(enc, model, max_new_tokens)
    with torch.no_grad():
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    new = out[0, enc["input_ids"].shape[1] :].tolist()  # (T_new,)
    eos = model.generation_config.eos_token_id
    stops = {eos} if isinstance(eos, int) else set(eos or [])
    cut = next((i for i, t in enumerate(new) if t in stops), len(new))
    return tokenizer.decode(new[:cut], skip_special_tokens=True).strip()
