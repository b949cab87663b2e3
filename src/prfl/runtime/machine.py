"""The kind of machine a run computed on, as far as it decides the run's floating-point history.

A seed fixes a run's history on one machine, whatever executor runs it. Across machines it need
not: PyTorch picks its CPU kernels by the instruction set the processor offers (``AVX2``,
``AVX512``, ...), and kernels of different widths sum in different orders, so the same
configuration on another kind of processor, or with another PyTorch or NumPy release, computes
other roundings and follows another trajectory of the same quality. Records of long runs name the
machine they ran on (:func:`fingerprint`) so that runs can be compared line for line only where
that is meaningful.
"""

from __future__ import annotations

import platform
from functools import cache
from pathlib import Path
from typing import Any


def _cpuinfo(path: Path = Path("/proc/cpuinfo")) -> dict[str, str]:
    """``model name`` and ``vendor_id`` of the first processor in ``path`` (empty where absent)."""
    out: dict[str, str] = {}
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return out
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        key = key.strip()
        if sep and key in ("model name", "vendor_id") and key not in out:
            out[key] = value.strip()
        if len(out) == 2:
            break
    return out


def fingerprint() -> dict[str, Any]:
    """This machine: processor (vendor, model), the kernel level PyTorch dispatches to on it, and
    the releases of PyTorch, NumPy and Python, as a new JSON-ready dict."""
    return dict(_fingerprint())


@cache
def _fingerprint() -> dict[str, Any]:
    import numpy as np
    import torch

    info = _cpuinfo()
    return {
        "cpu_vendor": info.get("vendor_id") or platform.processor() or None,
        "cpu_model": info.get("model name") or None,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def describe(m: dict[str, Any]) -> str:
    """``AMD EPYC, AVX2, torch 2.13.0+cpu, numpy 2.4.6``: a fingerprint in words (runs whose words
    agree share a processor kind and the releases that decide their roundings)."""
    cpu = m.get("cpu_model") or m.get("cpu_vendor") or "unknown processor"
    return f"{cpu}, {m.get('cpu_capability') or '?'}, torch {m.get('torch') or '?'}, numpy {m.get('numpy') or '?'}"
