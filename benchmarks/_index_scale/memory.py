"""Memory: the RSS measured over a build, the memory available, and the bytes/vector models
of the Faiss indexes (a row whose model does not fit is skipped)."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os

GIB = 2**30
MEMORY_SHARE = 0.8  # skip a row whose model needs more than this share of the available memory


def rss_bytes() -> int:
    """Resident memory of this process and its children (psutil), else of this process;
    freed memory is handed back to the system first (garbage collection, malloc_trim)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # glibc only
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        import psutil
    except ImportError:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    proc = psutil.Process()
    total = proc.memory_info().rss
    for child in proc.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.Error:  # exited meanwhile
            pass
    return total


def available_bytes() -> int | None:
    """MemAvailable of /proc/meminfo (None where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            line = next(x for x in f if x.startswith("MemAvailable:"))
        return int(line.split()[1]) * 1024
    except (OSError, StopIteration):
        return None


def too_big(model_bytes: float) -> str | None:
    """Why a row is skipped (its model does not fit in the available memory), or None."""
    free = available_bytes()
    if free is None or model_bytes <= MEMORY_SHARE * free:
        return None
    return f"needs {model_bytes / GIB:.1f} GiB by the model, {free / GIB:.1f} GiB available"


def hnsw_bytes_per_vector(dim: int, m: int, code_bytes: int) -> float:
    """Faiss HNSW: the code, 2M neighbour ids (int32) on level 0, M on each upper level (a
    vector reaches level l >= 1 with probability M^-l: M/(M-1) ids expected), its level
    (int32) and its offset (int64)."""
    return code_bytes + 4 * (2 * m + m / (m - 1)) + 4 + 8


def ivfpq_bytes(n: int, dim: int, nlist: int, m: int, nbits: int, hnsw_quantizer: bool) -> float:
    """Faiss IVF-PQ: per vector its code (m x nbits bits) and its id (int64); once the coarse
    centroids, the PQ codebooks (2^nbits x D floats) and an HNSW32 quantizer's graph."""
    fixed = 4 * dim * (nlist + 2**nbits)
    if hnsw_quantizer:
        fixed += nlist * hnsw_bytes_per_vector(dim, 32, 0)
    return n * (m * nbits / 8 + 8) + fixed
