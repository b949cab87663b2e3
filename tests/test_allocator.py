"""The allocator tuning: applied once, opt-out by environment, harmless where unsupported."""

import subprocess
import sys

import pytest

CHECK = """
import ctypes, ctypes.util, sys
from prfl.allocator import tune_allocator
ok = tune_allocator()
assert tune_allocator() == ok  # idempotent
info = ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim  # glibc is present on this platform
print(ok)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is a glibc (Linux) interface")
@pytest.mark.parametrize(("env", "expected"), [({}, "True"), ({"PRFL_MALLOC_TUNING": "0"}, "False")])
def test_tuning_applies_unless_switched_off(env, expected):
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, env={**_base_env(), **env})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == expected


def _base_env():
    import os

    return {k: v for k, v in os.environ.items() if k != "PRFL_MALLOC_TUNING"}


RELEASE = """
import torch
from prfl.allocator import free_heap_bytes, release_free_heap, tune_allocator

def rss_anon():
    with open("/proc/self/status") as fh:
        return next(int(l.split()[1]) * 1024 for l in fh if l.startswith("RssAnon:"))

assert tune_allocator()
release_free_heap(keep=0)  # the first call trims whatever lies free
assert not release_free_heap(keep=64 << 20)  # nothing grew since
blocks = [torch.ones(1 << 20) for _ in range(200)]  # 4 MiB each, below the mmap threshold: heap
kept = blocks[1::2]  # free every other block: holes between live blocks, not at the top
del blocks
free = free_heap_bytes()
assert free is not None and free >= 100 * (4 << 20), free
assert not release_free_heap(keep=free + 1)  # not that much free: nothing done
before = rss_anon()
assert release_free_heap(keep=64 << 20)
after = rss_anon()
assert before - after >= 300 << 20, (before, after)
assert all(float(b[0]) == 1.0 and float(b[-1]) == 1.0 for b in kept)  # live blocks untouched
# the pages are back, though the blocks still count as free: no trim until the process grows again
assert free_heap_bytes() >= 100 * (4 << 20) and not release_free_heap(keep=64 << 20)
print("ok")
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallinfo2/malloc_trim are glibc (Linux) interfaces")
def test_free_heap_between_live_blocks_is_released():
    out = subprocess.run([sys.executable, "-c", RELEASE], capture_output=True, text=True, env=_base_env())
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
