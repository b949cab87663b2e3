"""Keep freed tensor memory in the process instead of handing it back to the kernel.

A simulation allocates and frees vectors the size of the model thousands of times (aggregates,
received updates, evaluation copies). glibc serves such blocks with ``mmap`` and returns them
with ``munmap`` on free, so every new vector starts with tens of thousands of page faults: an
out-of-place ``torch.lerp`` over conv2's 6.5 M weights took 14 ms against 3.4 ms once freed
blocks stay in the heap. :func:`tune_allocator` sets glibc's thresholds with ``mallopt``: blocks
up to ``MMAP_THRESHOLD`` come from the heap and are reused, and at most ``TRIM_THRESHOLD`` of free
memory at the top of the heap is kept rather than returned. The bound matters: without it a
run's resident memory stays at its peak plus whatever it freed (a 10-client PR-FL run on
conv2 sat at 4 GB). Set ``PRFL_MALLOC_TUNING=0`` to leave the allocator alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 64 << 20  # bytes: a model vector of up to 16 M float32 weights comes from the heap
TRIM_THRESHOLD = 256 << 20  # bytes of free heap kept for reuse
_done = False


def tune_allocator() -> bool:
    """Apply the thresholds once per process; True if glibc accepted them."""
    global _done
    if _done:
        return True
    if os.environ.get("PRFL_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    _done = ok
    return ok
