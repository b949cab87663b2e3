"""Screening of client updates before they touch the server's state.

Every check is a pure function that returns ``None`` when the update passes and otherwise a
short reason a person can act on. They never raise on malformed input (a wrong type, a
sparse or complex tensor, NaN, huge values, a bad version number): a malformed update is
exactly what they are there to catch. :func:`validate_update` runs them in order and returns
the first :class:`Rejection`; policies turn it into :class:`RejectedUpdate` (see
:meth:`prfl.policies.fleet.FleetPolicy.take_result`), which is recorded in the run history as a
``rejected`` event and never aggregated.

The checks, in the order they run:

=============  ==============================================================================
``type``       the weights are a dense (strided) torch tensor
``dtype``      a real floating-point dtype (float16, bfloat16, float32, float64)
``shape``      the shape of the global model's flat vector
``version``    the model version the result claims is the one its task was dispatched at
``samples``    the sample count is an integer >= 0
``finite``     every value is finite once cast to the model's dtype (so 1e300 in float64 fails
               for a float32 model: it would become inf)
``mask``       no non-zero weight in the prunable prefix outside the client's assigned mask
``importance`` PR-FL's squared-gradient statistic, if sent: shape (N,), finite and >= 0
``norm``       ||W_i - W_sent|| over the weights the client holds (its mask and the suffix)
               <= k * median of the last M accepted update norms; off until M norms are seen,
               and off while that median is 0 (nothing to compare against)
=============  ==============================================================================
"""

from __future__ import annotations

import math
import numbers
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch


FLOAT_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
CHECKS: tuple[str, ...] = ("type", "dtype", "shape", "version", "samples", "finite", "mask", "importance", "norm")


@dataclass(frozen=True)
class Rejection:
    """Why an update was refused: ``check`` is one of :data:`CHECKS`, ``reason`` says what was
    wrong in words."""

    check: str
    reason: str

    def __str__(self) -> str:
        return f"{self.check}: {self.reason}"


class RejectedUpdate(Exception):
    """Raised by a policy for a result that failed validation, before any state changed.

    :class:`~prfl.policies.fleet.FleetPolicy` catches it, records ``Record("rejected", ...)``
    and treats the task as failed for that client (the client stays online and is offered
    work again as if it had just become idle).
    """

    def __init__(self, rejection: Rejection, task_id: int | None = None, client: int | None = None) -> None:
        self.rejection = rejection
        self.task_id = task_id
        self.client = client
        where = "" if task_id is None else f"result of task {task_id} (client {client}) rejected: "
        super().__init__(f"{where}{rejection}")


@dataclass(frozen=True)
class UpdateChecks:
    """Settings of the statistical check (the structural checks are always on) and of quarantine.

    ``norm_factor`` (k): reject an update whose norm exceeds k times the median of the last
    ``norm_window`` (M) accepted update norms; None turns the check off. The check starts once
    M norms have been accepted.

    ``max_rejections``: a client whose last ``max_rejections`` results in a row were rejected is
    quarantined: no new work until the driver reports it idle again (``ClientIdle``). Once every
    client is quarantined the run stops with a message, instead of retrying for ever (a bad
    learning rate turning every update into NaN, say). None: never quarantine.
    """

    norm_factor: float | None = None
    norm_window: int = 20
    max_rejections: int | None = 5

    def __post_init__(self) -> None:
        k = self.norm_factor
        if k is not None and (isinstance(k, bool) or not isinstance(k, (int, float)) or not math.isfinite(k) or k <= 0):
            raise ValueError(f"norm_factor must be a finite number > 0 (or None to turn the norm check off), got {k!r}")
        m = self.norm_window
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ValueError(f"norm_window must be an integer >= 1, got {m!r}")
        q = self.max_rejections
        if q is not None and (isinstance(q, bool) or not isinstance(q, int) or q < 1):
            raise ValueError(f"max_rejections must be an integer >= 1 (or None to never quarantine), got {q!r}")

    @property
    def norm_check(self) -> bool:
        return self.norm_factor is not None


# --------------------------------------------------------------------------- single checks
def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"{x.dtype} tensor of shape {tuple(x.shape)}"
    return type(x).__name__


def check_tensor(weights: Any, name: str = "weights") -> str | None:
    """``weights`` must be a dense (strided) torch tensor."""
    if not isinstance(weights, torch.Tensor):
        return f"{name} must be a torch tensor, got {_describe(weights)}"
    if weights.layout != torch.strided:
        return f"{name} must be a dense tensor, got layout {weights.layout}"
    return None


def check_dtype(weights: torch.Tensor, allowed: Sequence[torch.dtype] = FLOAT_DTYPES, name: str = "weights") -> str | None:
    """A real floating-point dtype (integers, bools and complex numbers are refused)."""
    if weights.dtype not in allowed:
        return f"{name} must have a floating-point dtype ({', '.join(str(d) for d in allowed)}), got {weights.dtype}"
    return None


def check_shape(weights: torch.Tensor, expected: tuple[int, ...], name: str = "weights") -> str | None:
    """Exactly ``expected`` (a flat vector of the global model's length)."""
    if tuple(weights.shape) != tuple(expected):
        return f"{name} have shape {tuple(weights.shape)}, expected {tuple(expected)}"
    return None


def check_version(claimed: Any, expected: int) -> str | None:
    """The result claims the model version its task was dispatched at."""
    if isinstance(claimed, bool) or not isinstance(claimed, numbers.Integral):
        return f"model version must be an integer, got {claimed!r}"
    if claimed != expected:
        return f"claims model version {claimed}, but the task was dispatched at version {expected}"
    return None


def check_num_samples(num_samples: Any) -> str | None:
    """The sample count weighting the update is an integer >= 0."""
    if isinstance(num_samples, bool) or not isinstance(num_samples, numbers.Integral) or num_samples < 0:
        return f"num_samples must be an integer >= 0, got {num_samples!r}"
    return None


def check_finite(weights: torch.Tensor, dtype: torch.dtype = torch.float32, name: str = "weights") -> str | None:
    """Every value is finite once cast to ``dtype`` (the model's): no NaN, no inf, no overflow."""
    w = weights.detach()
    # A NaN or inf anywhere makes the sum non-finite: one cheap reduction in the common case (in
    # the tensor's own dtype: converting to float64 first costs 15x more). A sum that overflows
    # although every value is finite only sends the check down the exact path below.
    if bool(torch.isfinite(w.sum())) and (w.dtype == dtype or _fits(w, dtype)):
        return None
    nan = int(torch.isnan(w).sum())
    inf = int(torch.isinf(w).sum())
    if nan or inf:
        return f"{name} have {nan} NaN and {inf} infinite values"
    cast_inf = int(torch.isinf(w.to(dtype)).sum())
    if cast_inf:
        return f"{name} have {cast_inf} values too large for {dtype}"
    return None


def _fits(w: torch.Tensor, dtype: torch.dtype) -> bool:
    """True if the finite tensor ``w`` stays finite when cast to ``dtype``."""
    if w.numel() == 0 or torch.finfo(w.dtype).max <= torch.finfo(dtype).max:
        return True
    return bool(w.abs().max() <= torch.finfo(dtype).max)


def check_mask(weights: torch.Tensor, mask: torch.Tensor | None, num_prunable: int, name: str = "weights") -> str | None:
    """No non-zero prunable weight outside the assigned ``mask`` (None: dense, always passes).

    A masked client trains W ⊙ m; a value outside m is either a bug or an attempt to write
    weights the client was not given.
    """
    if mask is None:
        return None
    head = weights.detach()[:num_prunable]
    # nonzero (NaN too) and not in the mask; ATen's vectorised compare and count_nonzero take about
    # a third of the time of a compiled loop that fuses them (its reduction is not vectorised)
    outside = int(torch.count_nonzero(torch.gt(head != 0, mask)))
    if outside:
        return f"{name} have {outside} non-zero values outside the assigned mask (density {float(mask.float().mean()):.3g})"
    return None


def check_importance(grad_sq: Any, num_prunable: int) -> str | None:
    """PR-FL's squared-gradient statistic: None, or a finite float tensor >= 0 of shape (N,)."""
    if grad_sq is None:
        return None
    reason = check_tensor(grad_sq, "grad_sq") or check_dtype(grad_sq, name="grad_sq")
    reason = reason or check_shape(grad_sq, (num_prunable,), "grad_sq")
    reason = reason or check_finite(grad_sq, torch.float32, "grad_sq")
    if reason:
        return reason
    negative = int((grad_sq < 0).sum()) if grad_sq.numel() and bool(grad_sq.min() < 0) else 0
    if negative:
        return f"grad_sq has {negative} negative values; squared gradients are >= 0"
    return None


def update_norm(weights: torch.Tensor, start: torch.Tensor, mask: torch.Tensor | None, num_prunable: int) -> float:
    """||W_i - W_sent|| over the weights the client holds, in float64:

        sqrt( sum_{k < N, m_k} (W_i,k - W_sent,k)^2 + sum_{k >= N} (W_i,k - W_sent,k)^2 ).

    Outside the mask W_i is 0 by construction, so W_i - W_sent there is not an update.
    """
    diff = weights.detach().to(torch.float64) - start.detach().to(torch.float64)
    if mask is not None:
        diff[:num_prunable].masked_fill_(~mask, 0.0)
    return float(torch.linalg.vector_norm(diff))


def check_norm(norm: float, recent: Sequence[float], factor: float | None, window: int) -> str | None:
    """``norm`` <= factor * median(last ``window`` of ``recent``); off while fewer than ``window``
    norms were seen, when ``factor`` is None, or when that median is 0."""
    if factor is None or len(recent) < window:
        return None
    if not math.isfinite(norm):
        return f"update norm is {norm}"
    med = statistics.median(list(recent)[-window:])
    if med > 0 and norm > factor * med:
        return (f"update norm {norm:.4g} exceeds {factor:g} x the median {med:.4g} of the last {window} "
                f"accepted updates")
    return None


# --------------------------------------------------------------------------- all checks
def validate_update(
    weights: Any,
    *,
    claimed_version: Any,
    expected_version: int,
    like: torch.Tensor,
    mask: torch.Tensor | None = None,
    num_prunable: int = 0,
    num_samples: Any = 0,
    grad_sq: Any = None,
    start: torch.Tensor | None = None,
    recent_norms: Sequence[float] = (),
    checks: UpdateChecks = UpdateChecks(),
) -> Rejection | None:
    """Run every check on one client result; the first failure, or None if it may be used.

    ``like`` is the global model's flat vector (its shape and dtype are expected); ``mask`` the
    bool mask the task was sent with over the first ``num_prunable`` weights (None: dense);
    ``start`` the weights the task started from (needed only for the norm check, which also
    needs ``checks.norm_factor`` and at least ``checks.norm_window`` entries in ``recent_norms``).
    """
    for check, reason in (
        ("type", lambda: check_tensor(weights)),
        ("dtype", lambda: check_dtype(weights)),
        ("shape", lambda: check_shape(weights, tuple(like.shape))),
        ("version", lambda: check_version(claimed_version, expected_version)),
        ("samples", lambda: check_num_samples(num_samples)),
        ("finite", lambda: check_finite(weights, like.dtype)),
        ("mask", lambda: check_mask(weights, mask, num_prunable)),
        ("importance", lambda: check_importance(grad_sq, num_prunable)),
    ):
        text = reason()
        if text is not None:
            return Rejection(check, text)
    if checks.norm_check and start is not None and len(recent_norms) >= checks.norm_window:
        text = check_norm(update_norm(weights, start, mask, num_prunable), recent_norms, checks.norm_factor, checks.norm_window)
        if text is not None:
            return Rejection("norm", text)
    return None
