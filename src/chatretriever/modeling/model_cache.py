"""The model cache: where dequantized GGUF files and unpacked archives are built once.

The cache directory is `$CHATRETRIEVER_CACHE` (default `~/.cache/chatretriever`). Entries are
keyed by a fingerprint of their inputs and written into a temporary directory that is renamed
into place, so an interrupted build never leaves a half-written model behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from chatretriever.io.atomic import fsync_tree

logger = logging.getLogger(__name__)

CACHE_ENV = "CHATRETRIEVER_CACHE"
_CACHE_FORMAT = 1  # bump when the layout of cached model directories changes


def cache_dir() -> Path:
    """Where dequantized/unpacked models live: `$CHATRETRIEVER_CACHE` or ~/.cache/chatretriever."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "chatretriever").expanduser()


def fingerprint(*parts: Any) -> str:
    """A short key for a cache entry built from `parts` (and the cache format)."""
    text = json.dumps([_CACHE_FORMAT, *parts], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def sha256(path: Path) -> str:
    """The hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def safe_unzip(archive: Path, scratch: Path, out: Path) -> None:
    """Extracts `archive`; a single top-level folder becomes `out` itself."""
    with zipfile.ZipFile(archive) as z:
        for member in z.namelist():
            if Path(member).is_absolute() or ".." in Path(member).parts:
                raise ValueError(f"{archive}: unsafe member path {member!r}")
        z.extractall(scratch)
    children = list(scratch.iterdir())
    root = children[0] if len(children) == 1 and children[0].is_dir() else scratch
    if not (root / "config.json").is_file():
        raise FileNotFoundError(f"{archive}: no config.json at the top of the archive")
    os.rename(root, out)


def materialise(target: Path, build: Callable[[Path, Path], None]) -> Path:
    """Builds a cache entry atomically: `build(out, scratch)` fills a temporary `out`, which is
    renamed to `target` only when it succeeded. An existing `target` is reused as is.
    """
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        (tmp / "scratch").mkdir()
        logger.info("building %s once (later loads reuse it)", target)
        build(tmp / "out", tmp / "scratch")
        fsync_tree(tmp / "out")  # durable before it becomes visible under the final name
        try:
            os.rename(tmp / "out", target)
        except OSError:
            if not target.is_dir():
                raise
            logger.info("%s was built concurrently; keeping that copy", target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# ---------------------------------------------------------------------------------------------
# GGUF -> plain Hugging Face directory
# ---------------------------------------------------------------------------------------------

# Gemma GGUF files often carry no chat template (base models); this is Gemma's turn format, with
# system messages folded into the next user turn as Gemma's own template does.
_GEMMA_TEMPLATE = (
    "{{ bos_token }}{% set ns = namespace(prefix='') %}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{% set ns.prefix = ns.prefix + m['content'] | trim + '\\n\\n' %}"
    "{% else %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ ns.prefix + m['content'] | trim }}<end_of_turn>\n{% set ns.prefix = '' %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
# model_type -> (chat template, end-of-turn token that must also stop generation)
FALLBACK_CHAT_TEMPLATES: Mapping[str, tuple[str, str]] = {
    t: (_GEMMA_TEMPLATE, "<end_of_turn>") for t in ("gemma", "gemma2", "gemma3", "gemma3_text")
}


def _add_chat_template_fallback(tokenizer: Any, model: Any) -> None:
    """Gives a template-less tokenizer its architecture's chat format, and stops on end-of-turn."""
    fallback = FALLBACK_CHAT_TEMPLATES.get(model.config.model_type)
    if tokenizer.chat_template is not None or fallback is None:
        return
    template, end_token = fallback
    tokenizer.chat_template = template
    end_id = tokenizer.convert_tokens_to_ids(end_token)
    eos = model.generation_config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    if isinstance(end_id, int) and end_id != tokenizer.unk_token_id and end_id not in eos:
        model.generation_config.eos_token_id = [*eos, end_id]
    logger.info("no chat template in the GGUF: using the %s fallback", model.config.model_type)


def dequantize_gguf(gguf_file: str | Path, out_dir: str | Path) -> Path:
    """Dequantizes a GGUF causal LM to float32 and saves it as a plain safetensors directory.

    Not atomic by itself: `resolve_model_dir` calls it on a temporary directory.

    Args:
        gguf_file: The `.gguf` file.
        out_dir: Where to save the model, its tokenizer and generation config.

    Returns:
        `out_dir`.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file, out_dir = Path(gguf_file), Path(out_dir)
    where = dict(gguf_file=gguf_file.name, local_files_only=True)
    logger.info("dequantizing %s (slow, done once)", gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, **where)
    model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, dtype=torch.float32, **where)
    # The weights are plain float tensors now; the GGUF quantizer would block saving and training.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    _add_chat_template_fallback(tokenizer, model)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def gguf_cache_path(gguf_file: Path) -> Path:
    """The cache entry of a local `.gguf` file (keyed by its path, size and mtime)."""
    stat = gguf_file.stat()
    key = fingerprint(str(gguf_file.resolve()), stat.st_size, stat.st_mtime_ns)
    return cache_dir() / "gguf" / f"{gguf_file.stem}-{key}"
