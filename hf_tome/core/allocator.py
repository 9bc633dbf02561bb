"""Keep freed memory inside the process (glibc malloc), so CPU forward passes stop page-faulting.

glibc's malloc hands large blocks (above a threshold that starts at 128 KiB and adapts up to 32 MiB) straight to
the kernel with ``mmap`` and gives them back on ``free``, and it trims the top of the heap back to the kernel as
soon as 128 KiB+ are free there. A PyTorch forward pass on the CPU allocates and frees every activation, so each
pass touches fresh pages: the embedded DINOv2-S at batch 16 took about 80,000 page faults per forward, and a
forward without them ran 21 to 25% more images/s (full and half budgets, bf16, 2 cores; ``python
benchmarks/batch_efficiency.py --threads 2`` with and without ``--no-keep-freed-memory``).

:func:`keep_freed_memory` raises both thresholds with ``mallopt``: blocks up to 32 MiB come from the heap, and the
heap is not trimmed, so the pages a pass freed serve the next pass. The price is memory: the process keeps its
peak heap instead of returning it, as jemalloc and tcmalloc (the allocators PyTorch's CPU guides suggest) do.
It changes the whole process, so nothing in hf_tome calls it on import: the server's inference worker and the
speed benchmarks call it, each with an option to turn it off.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc refuses more on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD_MAX = 2**31 - 1  # mallopt takes a C int


def keep_freed_memory(mmap_threshold: int = MMAP_THRESHOLD_MAX, trim_threshold: int = TRIM_THRESHOLD_MAX) -> bool:
    """Set glibc malloc's mmap and trim thresholds for this process; True if both were set.

    False (and nothing changed) where the C library has no ``mallopt`` (macOS, Windows, musl) or refuses a value.
    The mmap threshold is set first: a trim threshold alone turns off the adaptive mmap threshold, which leaves
    every block over 128 KiB to ``mmap`` and makes a forward pass fault more, not less.
    """
    if not 0 < mmap_threshold <= MMAP_THRESHOLD_MAX or not 0 < trim_threshold <= TRIM_THRESHOLD_MAX:
        raise ValueError(f"mmap_threshold={mmap_threshold} and trim_threshold={trim_threshold} are invalid: expected "
                         f"1..{MMAP_THRESHOLD_MAX} and 1..{TRIM_THRESHOLD_MAX} bytes")
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, mmap_threshold) == 1 and mallopt(M_TRIM_THRESHOLD, trim_threshold) == 1
