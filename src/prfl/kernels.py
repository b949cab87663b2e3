"""MaskFedAvg's finishing pass (:func:`prfl.aggregation.finish_masked`) as a compiled loop.

Per block of weights the pass computes, in float64,

    M = m + c_dense,   W_new = W_acc / M,   W = W_new where the weight has a holder, else prev,

rounds W once to the model's dtype and flags the block when some held |W_new| lies within the
zero rule's candidate bound. Eagerly that is about ten passes over memory per block (a temporary
per operation); :func:`torch.compile` fuses them into one loop, about twice as fast on conv2's
6.5 M prunable weights. Every operation in it (division, comparison, selection, one rounding) is
correctly rounded in IEEE arithmetic, so the compiled loop's results equal the eager ones bit for
bit (``tests/test_kernels.py`` checks it); the flag uses twice the bound, and the caller finds the
flagged weights eagerly, so the set of weights decided on their terms is the eager one too.

The loop is compiled when a C++ compiler is on the PATH (torch.compile's CPU backend needs one)
and the model has at least ``COMPILE_MIN`` prunable weights (below that the pass is cheap and
compiling would cost more than it saves); ``PRFL_COMPILE=0`` turns it off. A failure to compile
is logged once and the eager path takes over for the rest of the process.

The mask check of an arriving update (:func:`prfl.validation.check_mask`) is not compiled: the
compiled count of non-zero values outside the mask took about three times as long as ATen's
vectorised comparison and ``count_nonzero`` on conv2's weights.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger(__name__)

COMPILE_MIN = 1 << 20  # prunable weights from which the finishing pass is compiled
ENV = "PRFL_COMPILE"  # "0": never compile


def _held_block(w: torch.Tensor, m: torch.Tensor, h: torch.Tensor, prev: torch.Tensor, dense_c: torch.Tensor,
                flag_at: torch.Tensor, add_dense: bool, out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    big_m = m + dense_c if add_dense else m
    val = w / big_m
    held = h > 0
    res = torch.where(held, val, prev.to(val.dtype)).to(out_dtype)
    flag = ((val.abs() <= flag_at) & held).any()
    return res, flag


def _everyone_block(w: torch.Tensor, m: torch.Tensor | None, dense_c: torch.Tensor, flag_at: torch.Tensor,
                    add_dense: bool, out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    if m is None:
        val = w / dense_c
    else:
        val = w / (m + dense_c if add_dense else m)
    res = val.to(out_dtype)
    flag = (res.abs() <= flag_at).any()
    return res, flag


def cxx_compiler() -> str | None:
    """The C++ compiler torch.compile's CPU backend would call ($CXX, else g++, c++ or clang++
    on the PATH), or None."""
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


class ServerKernels:
    """The compiled functions, built on first use. :meth:`held` and :meth:`everyone` return
    (block rounded to ``out_dtype``, flag); each returns None when the
    eager path is to be taken (compiling failed)."""

    def __init__(self) -> None:
        self._compiled: dict[str, Callable[..., Any]] | None = None
        self._failed = False

    def enabled(self, n: int) -> bool:
        if self._failed or n < COMPILE_MIN or os.environ.get(ENV, "1") == "0":
            return False
        if self._compiled is None:
            if cxx_compiler() is None:
                log.info("no C++ compiler found (set CXX or install g++): MaskFedAvg's finishing pass runs eagerly")
                self._failed = True
                return False
            self._compiled = {
                "held": torch.compile(_held_block, dynamic=True),
                "everyone": torch.compile(_everyone_block, dynamic=True),
            }
        return True

    def _call(self, kind: str, *args: Any) -> tuple[torch.Tensor, bool] | None:
        assert self._compiled is not None
        try:
            res, flag = self._compiled[kind](*args)
        except Exception as exc:  # a backend failure: the eager path computes the same values
            log.warning("torch.compile failed for MaskFedAvg's finishing pass (%s: %s); it runs eagerly from now on",
                        type(exc).__name__, exc)
            self._failed = True
            return None
        return res, bool(flag)

    def held(self, w: torch.Tensor, m: torch.Tensor, h: torch.Tensor, prev: torch.Tensor, dense_c: float,
             flag_at: float, out_dtype: torch.dtype) -> tuple[torch.Tensor, bool] | None:
        return self._call("held", w, m, h, prev, _scalar(dense_c, w), _scalar(flag_at, w), dense_c != 0.0, out_dtype)

    def everyone(self, w: torch.Tensor, m: torch.Tensor | None, dense_c: float, flag_at: float,
                 out_dtype: torch.dtype) -> tuple[torch.Tensor, bool] | None:
        return self._call("everyone", w, m, _scalar(dense_c, w), _scalar(flag_at, w), dense_c != 0.0, out_dtype)


def _scalar(x: float, like: torch.Tensor) -> torch.Tensor:
    # a 0-dim tensor rather than a Python float: one compiled graph serves every value
    return _scalar_of(float(x), like.dtype)


@functools.lru_cache(maxsize=8)
def _scalar_of(x: float, dtype: torch.dtype) -> torch.Tensor:
    # one tensor per value for all the blocks of a pass (read only: the kernels never write it)
    return torch.tensor(x, dtype=dtype)


KERNELS = ServerKernels()
