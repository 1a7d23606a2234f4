"""Content fingerprints: short hex digests of what a model computes with, not of where it lives.

A model directory can be retrained in place or copied under another name; embeddings, indexes
and cached runs record the fingerprint of the model that made them, so vectors of two different
models are never mixed, and the same model is recognised wherever it is saved.

One digest for tensors wherever they are: a tensor's digest is the sha256 of its dtype (in
safetensors' names: "F32", "BF16", ...), shape and raw bytes, and a set of tensors is digested as
the sorted (name, tensor digest) pairs. So a state dict in memory and the same tensors in
`.safetensors` files (however sharded, whatever the header metadata) get the same fingerprint.
Other weight files (`.bin`) are digested as raw bytes.

Hashing a large file once is enough: the digest is cached in the model cache
(`model_cache.cache_dir()/fingerprints/`), keyed by the file's path, size and mtime.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from chatretriever.io.atomic import atomic_write
from chatretriever.modeling import model_cache

logger = logging.getLogger(__name__)

FINGERPRINT_CHARS = 16  # 64 bits: no accidental collision among a user's models
CACHE_MIN_BYTES = 32 << 20  # smaller files are hashed again each time (fast; keeps cache small)
WEIGHT_SUFFIXES = (".safetensors", ".bin")
_BLOCK = 1 << 20
_TORCH_DTYPES = {  # torch dtype name -> safetensors dtype name
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
}


def digest(*parts: Any) -> str:
    """A fingerprint of JSON-able parts (dict keys sorted; other objects by `str`)."""
    text = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:FINGERPRINT_CHARS]


def _combine(entries: Iterable[tuple[str, str]]) -> str:
    """The fingerprint of (name, digest) pairs, independent of their order."""
    return digest(sorted(entries))


def tensors_fingerprint(tensors: Mapping[str, Any]) -> str:
    """The fingerprint of named torch tensors (a state dict), wherever they are stored.

    Equal to `files_fingerprint` of safetensors files holding the same names and tensors.
    """
    return _combine((name, _tensor_digest(t)) for name, t in tensors.items())


def _tensor_digest(tensor: Any) -> str:
    import torch

    t = tensor.detach().to("cpu").contiguous().reshape(-1)
    dtype = _TORCH_DTYPES.get(str(t.dtype).removeprefix("torch."), str(t.dtype))
    h = hashlib.sha256(f"{dtype}{list(tensor.shape)}".encode())
    if t.numel():
        h.update(memoryview(t.view(torch.uint8).numpy()))
    return h.hexdigest()


def _safetensors_digests(path: Path) -> dict[str, str]:
    """{tensor name: digest} of one `.safetensors` file, read in blocks (no torch needed)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        out = {}
        for name, info in sorted(header.items(), key=lambda kv: kv[1].get("data_offsets", [0])):
            if name == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            h = hashlib.sha256(f"{info['dtype']}{list(info['shape'])}".encode())
            f.seek(8 + n + begin)
            left = end - begin
            while left > 0:
                block = f.read(min(_BLOCK, left))
                if not block:
                    raise ValueError(f"{path}: truncated safetensors file")
                h.update(block)
                left -= len(block)
            out[name] = h.hexdigest()
    return out


def _file_entries(path: Path) -> dict[str, str]:
    """(name, digest) entries of one weight file: one per tensor for safetensors, else one."""
    if path.suffix == ".safetensors":
        return _safetensors_digests(path)
    return {f"file:{path.name}": model_cache.sha256(path)}


def _cached_file_entries(path: Path) -> dict[str, str]:
    """`_file_entries`, cached in the model cache for large files (keyed by path, size, mtime)."""
    stat = path.stat()
    if stat.st_size < CACHE_MIN_BYTES:
        return _file_entries(path)
    key = model_cache.fingerprint("digest", str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    entry = model_cache.cache_dir() / "fingerprints" / f"{key}.json"
    try:
        return dict(json.loads(entry.read_text(encoding="utf-8")))
    except (OSError, ValueError):
        pass
    entries = _file_entries(path)
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(entry) as f:
            json.dump(entries, f)
    except OSError as e:  # a read-only cache only costs the hashing next time
        logger.debug("cannot cache the digest of %s: %s", path, e)
    return entries


def weight_files(directory: str | Path) -> list[Path]:
    """The weight files of a model directory: its `.safetensors` files, else its `.bin` files."""
    directory = Path(directory)
    for suffix in WEIGHT_SUFFIXES:
        files = sorted(p for p in directory.glob(f"*{suffix}") if p.is_file())
        if files:
            return files
    return []


def files_fingerprint(files: Iterable[str | Path]) -> str:
    """The fingerprint of the tensors in weight files (see the module docstring)."""
    entries: dict[str, str] = {}
    for file in map(Path, files):
        entries.update(_cached_file_entries(file))
    return _combine(entries.items())


def directory_fingerprint(directory: str | Path) -> str:
    """The fingerprint of a model directory's weights (`weight_files`).

    Raises:
        FileNotFoundError: The directory holds no weight files.
    """
    files = weight_files(directory)
    if not files:
        raise FileNotFoundError(f"{directory}: no weight files ({', '.join(WEIGHT_SUFFIXES)})")
    return files_fingerprint(files)


def model_fingerprint(name_or_path: str | Path) -> str | None:
    """The weight fingerprint of a model given as built-in name, directory or `.gguf` file.

    Args:
        name_or_path: See `sources.resolve_model_dir` (a GGUF model is its dequantized copy).

    Returns:
        The fingerprint, or None (with a warning) for a directory without weight files.
    """
    from chatretriever.modeling.sources import resolve_model_dir

    model_dir = resolve_model_dir(name_or_path)
    files = weight_files(model_dir)
    if not files:
        logger.warning("%s: no weight files to fingerprint; its identity is unknown", model_dir)
        return None
    return files_fingerprint(files)
