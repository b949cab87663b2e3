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

glibc trims only the top of the heap by itself. Blocks freed *between* live ones (a server
buffer of a thousand client models interleaved with freed aggregates and updates) stay resident:
a 1,000-client PR-FL run held 1.3 GB of such free heap after 60 updates, with 0.75 GB of live
tensors. :func:`release_free_heap` hands free pages back with ``malloc_trim`` when more than
``TRIM_THRESHOLD`` lies free (``mallinfo2``) and the resident size or the free total has grown by
that much since the last trim (freed blocks keep counting as free after their pages went back,
so the free total alone would trim at every call). The check costs well under a millisecond;
the simulator makes it after every event.
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
_libc: ctypes.CDLL | None = None
trims = 0  # how many times release_free_heap trimmed (benchmarks report it)
_baseline: tuple[int, int] | None = None  # (resident, free heap) bytes right after the last trim
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def tune_allocator() -> bool:
    """Apply the thresholds once per process; True if glibc accepted them."""
    global _done, _libc
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
    if ok:
        _libc = libc
    return ok


def free_heap_bytes() -> int | None:
    """Bytes lying free in glibc's heap arenas (None when the allocator was not tuned or glibc
    is older than 2.33)."""
    if _libc is None:
        return None
    try:
        mallinfo2 = _libc.mallinfo2
    except AttributeError:
        return None
    mallinfo2.restype = _MallInfo2
    return int(mallinfo2().fordblks)


def resident_bytes() -> int:
    """The process's resident set size (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm", "rb") as fh:
            return int(fh.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


def release_free_heap(keep: int = TRIM_THRESHOLD) -> bool:
    """Give free heap pages back to the kernel when more than ``keep`` bytes lie free and, since
    the last trim, either the resident size or the free total has grown by more than ``keep``
    (the first call trims whenever more than ``keep`` lies free).

    Freed blocks keep counting as free after their pages went back, so the free total alone would
    trim at every call; growth since the last trim is what can be handed back.
    Only acts in a process whose allocator :func:`tune_allocator` set up. True if it trimmed.
    """
    global _baseline, trims
    free = free_heap_bytes()
    if free is None or free <= keep:
        return False
    rss = resident_bytes()
    if _baseline is not None and rss <= _baseline[0] + keep and free <= _baseline[1] + keep:
        return False
    assert _libc is not None
    _libc.malloc_trim(0)
    trims += 1
    _baseline = (resident_bytes(), free_heap_bytes() or 0)
    return True
