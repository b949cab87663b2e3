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
