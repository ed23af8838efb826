"""Process-wide allocator tuning applied by `loraplex serve` (and the benchmarks, to match it).

glibc serves allocations above its mmap threshold (128 KiB, rising to at most 32 MiB) with a
fresh mmap and gives them back on free; it also trims the heap top once more than the trim
threshold is free. A decode step allocates and frees tensors of megabytes every few
milliseconds (logits [rows, vocab], the sampler's float64 CDF, K/V gathers), so each step
page-faults them in again: measured, the sampler's inverse-CDF draw over a 49k vocab at 16 rows
takes ~5.7 ms that way and ~0.9 ms with both thresholds raised. Raising them keeps those pages
in the heap for reuse, as jemalloc or tcmalloc would. The cost: freed memory returns to the OS
later (resident size stays near its peak). Set LORAPLEX_MALLOC_TUNING=0 to leave glibc alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Mapping

M_TRIM_THRESHOLD = -1       # glibc mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
THRESHOLD_BYTES = 1 << 30


def tune_malloc(environ: Mapping[str, str] = os.environ) -> str:
    """Raise glibc's mmap and trim thresholds; returns what was done, for the start-up log."""
    if environ.get("LORAPLEX_MALLOC_TUNING", "1") == "0":
        return "malloc tuning off (LORAPLEX_MALLOC_TUNING=0)"
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return "malloc tuning skipped (no glibc mallopt on this platform)"
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if mallopt(M_MMAP_THRESHOLD, THRESHOLD_BYTES) != 1 or mallopt(M_TRIM_THRESHOLD, THRESHOLD_BYTES) != 1:
        return "malloc tuning refused by mallopt"
    return "malloc: large per-step buffers stay in the heap (mmap/trim thresholds raised)"
