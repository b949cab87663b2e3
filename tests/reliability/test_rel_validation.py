"""prfl.validation: every check by hand, then a fuzz of the whole decoder path.

The fuzz feeds :func:`prfl.validation.validate_update` random shapes, every dtype torch has,
NaN / inf / huge / tiny values, non-tensors, sparse tensors, wrong and odd versions, bad sample
counts and values outside the mask. It must never raise, must always answer with a reason from
the documented list, and must accept exactly the updates an independent oracle calls valid.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from prfl.validation import (
    CHECKS,
    RejectedUpdate,
    Rejection,
    UpdateChecks,
    check_dtype,
    check_finite,
    check_importance,
    check_mask,
    check_norm,
    check_num_samples,
    check_shape,
    check_tensor,
    check_version,
    update_norm,
    validate_update,
)

N, TOTAL = 6, 8  # 6 prunable weights, 2 in the suffix
LIKE = torch.zeros(TOTAL)
MASK = torch.tensor([True, False, True, True, False, False])


def ok_weights() -> torch.Tensor:
    return torch.tensor([1.0, 0.0, 2.0, -3.0, 0.0, 0.0, 0.5, -0.5])


def run(weights, **kw):
    args = dict(claimed_version=4, expected_version=4, like=LIKE, mask=MASK, num_prunable=N, num_samples=10)
    args.update(kw)
    return validate_update(weights, **args)


# --------------------------------------------------------------------------- by hand
def test_a_good_update_passes() -> None:
    assert run(ok_weights()) is None
    assert run(ok_weights().double()) is None  # cast to the model's dtype later
    assert run(ok_weights().half(), grad_sq=torch.rand(N)) is None
    assert run(torch.randn(TOTAL), mask=None) is None  # dense task


@pytest.mark.parametrize(
    "weights, kw, check, words",
    [
        ([0.0] * TOTAL, {}, "type", "must be a torch tensor, got list"),
        (np.zeros(TOTAL, dtype=np.float32), {}, "type", "got ndarray"),
        (None, {}, "type", "got NoneType"),
        (torch.zeros(TOTAL).to_sparse(), {}, "type", "dense tensor"),
        (torch.zeros(TOTAL, dtype=torch.int64), {}, "dtype", "got torch.int64"),
        (torch.zeros(TOTAL, dtype=torch.bool), {}, "dtype", "got torch.bool"),
        (torch.zeros(TOTAL, dtype=torch.complex64), {}, "dtype", "got torch.complex64"),
        (torch.zeros(TOTAL + 1), {}, "shape", "have shape (9,), expected (8,)"),
        (torch.zeros(2, 4), {}, "shape", "have shape (2, 4), expected (8,)"),
        (torch.zeros(()), {}, "shape", "have shape (), expected (8,)"),
        (torch.zeros(TOTAL), {"claimed_version": 3}, "version", "claims model version 3, but the task was dispatched at version 4"),
        (torch.zeros(TOTAL), {"claimed_version": 5}, "version", "claims model version 5"),
        (torch.zeros(TOTAL), {"claimed_version": -1}, "version", "claims model version -1"),
        (torch.zeros(TOTAL), {"claimed_version": 4.0}, "version", "must be an integer, got 4.0"),
        (torch.zeros(TOTAL), {"claimed_version": True}, "version", "must be an integer, got True"),
        (torch.zeros(TOTAL), {"claimed_version": "4"}, "version", "must be an integer, got '4'"),
        (torch.zeros(TOTAL), {"num_samples": -1}, "samples", "integer >= 0, got -1"),
        (torch.zeros(TOTAL), {"num_samples": 2.5}, "samples", "got 2.5"),
        (torch.zeros(TOTAL), {"num_samples": None}, "samples", "got None"),
        (torch.tensor([math.nan] + [0.0] * 7), {}, "finite", "1 NaN and 0 infinite values"),
        (torch.tensor([math.inf, -math.inf] + [0.0] * 6), {}, "finite", "0 NaN and 2 infinite values"),
        (torch.tensor([1e300] + [0.0] * 7, dtype=torch.float64), {}, "finite", "1 values too large for torch.float32"),
        (torch.tensor([0.0, 1.0] + [0.0] * 6), {}, "mask", "1 non-zero values outside the assigned mask"),
        (torch.tensor([0.0, 1e-30, 0, 0, -2.0, 7.0, 0, 0]), {}, "mask", "3 non-zero values outside"),
        (ok_weights(), {"grad_sq": torch.ones(N + 1)}, "importance", "grad_sq have shape (7,), expected (6,)"),
        (ok_weights(), {"grad_sq": -torch.ones(N)}, "importance", "6 negative values"),
        (ok_weights(), {"grad_sq": torch.full((N,), math.nan)}, "importance", "6 NaN"),
        (ok_weights(), {"grad_sq": [1.0] * N}, "importance", "must be a torch tensor"),
        (ok_weights(), {"grad_sq": torch.ones(N, dtype=torch.int32)}, "importance", "floating-point"),
    ],
)
def test_each_bad_update_gets_its_reason(weights, kw, check, words) -> None:
    rej = run(weights, **kw)
    assert isinstance(rej, Rejection) and rej.check == check, rej
    assert words in rej.reason, rej.reason
    assert str(rej).startswith(f"{check}: ")


def test_single_checks_by_hand() -> None:
    w = ok_weights()
    assert check_tensor(w) is None and check_dtype(w) is None and check_shape(w, (TOTAL,)) is None
    assert check_version(np.int64(4), 4) is None  # numpy integers are integers
    assert check_num_samples(np.int32(0)) is None and check_num_samples(0) is None
    assert check_finite(torch.tensor([3e38]), torch.float32) is None
    assert "too large for torch.float16" in check_finite(torch.tensor([1e5]), torch.float16)
    assert check_mask(w, None, N) is None and check_mask(w, MASK, N) is None
    assert check_importance(None, N) is None
    # the norm is taken over held weights only: outside the mask W_i is 0, not an update
    start = torch.arange(TOTAL, dtype=torch.float32)
    held = torch.tensor([0, 2, 3, 6, 7])
    assert update_norm(w, start, MASK, N) == pytest.approx(float(torch.linalg.vector_norm((w - start)[held])))
    assert update_norm(w, start, None, N) == pytest.approx(float(torch.linalg.vector_norm(w - start)))


def test_norm_check_by_hand() -> None:
    recent = [1.0, 2.0, 3.0, 10.0]  # median of the last 3 = 3
    assert check_norm(100.0, recent[:2], 2.0, 3) is None  # fewer than M norms seen: off
    assert check_norm(100.0, recent, None, 3) is None  # no factor: off
    assert check_norm(6.0, recent, 2.0, 3) is None  # 6 <= 2 * 3
    reason = check_norm(6.5, recent, 2.0, 3)
    assert reason is not None and "6.5 exceeds 2 x the median 3 of the last 3" in reason
    assert "nan" in check_norm(math.nan, recent, 2.0, 3)
    assert check_norm(5.0, [0.0, 0.0, 0.0], 2.0, 3) is None  # nothing to compare against
    with pytest.raises(ValueError, match="norm_factor must be a finite number > 0"):
        UpdateChecks(norm_factor=0.0)
    with pytest.raises(ValueError, match="norm_window must be an integer >= 1"):
        UpdateChecks(norm_factor=3.0, norm_window=0)
    with pytest.raises(ValueError, match="max_rejections must be an integer >= 1"):
        UpdateChecks(max_rejections=0)
    assert UpdateChecks().max_rejections == 5 and UpdateChecks(max_rejections=None).max_rejections is None


def test_validate_update_runs_the_norm_check_with_a_start() -> None:
    start = torch.zeros(TOTAL)
    w = ok_weights()
    checks = UpdateChecks(norm_factor=2.0, norm_window=2)
    norm = update_norm(w, start, MASK, N)
    assert run(w, start=start, recent_norms=[norm, norm], checks=checks) is None
    rej = run(w, start=start, recent_norms=[norm / 3, norm / 3], checks=checks)
    assert rej is not None and rej.check == "norm"
    assert run(w, start=start, recent_norms=[norm / 3], checks=checks) is None  # not yet M norms


def test_rejected_update_message() -> None:
    err = RejectedUpdate(Rejection("finite", "weights have 1 NaN and 0 infinite values"), task_id=7, client=2)
    assert str(err) == "result of task 7 (client 2) rejected: finite: weights have 1 NaN and 0 infinite values"


# --------------------------------------------------------------------------- fuzz
DTYPES = [
    torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64, torch.int8, torch.uint8,
    torch.int16, torch.int32, torch.int64, torch.bool,
]
SPECIAL = [math.nan, math.inf, -math.inf, 1e300, -1e300, 3.5e38, 1e-300, -0.0, 0.0, 1.0, 65504.0, 70000.0]


@st.composite
def tensors(draw):
    """Random tensors: mostly the right length, any dtype, special values sprinkled in."""
    shape = draw(st.one_of(
        st.just((TOTAL,)), st.just((TOTAL,)), st.just((TOTAL,)),
        st.lists(st.integers(0, 9), min_size=0, max_size=3).map(tuple),
    ))
    dtype = draw(st.sampled_from(DTYPES))
    n = int(np.prod(shape)) if shape else 1
    values = draw(st.lists(st.one_of(st.sampled_from(SPECIAL), st.floats(-1e6, 1e6, allow_nan=False)),
                           min_size=n, max_size=n))
    base = torch.tensor(values, dtype=torch.float64).reshape(shape)
    if dtype.is_floating_point or dtype.is_complex:
        t = base.to(dtype)
    else:
        t = torch.nan_to_num(base, nan=0.0, posinf=0.0, neginf=0.0).clamp(-100, 100).to(dtype)
    if draw(st.booleans()) and shape == (TOTAL,):  # respect the mask sometimes
        t = t.clone()
        t[:N][~MASK] = 0
    return t


ODD = st.one_of(st.none(), st.text(max_size=3), st.lists(st.floats(), max_size=3), st.just(np.zeros(TOTAL)),
                st.just(torch.zeros(TOTAL).to_sparse()), st.dictionaries(st.text(max_size=2), st.integers(), max_size=2))
VERSIONS = st.one_of(st.integers(-3, 10), st.just(4), st.just(4), st.booleans(), st.floats(), st.none(),
                     st.text(max_size=2), st.just(np.int64(4)))
SAMPLES = st.one_of(st.integers(-5, 100), st.floats(), st.none(), st.booleans(), st.just(np.int64(3)))
GRADS = st.one_of(st.none(), st.none(), tensors().map(lambda t: t[:N] if t.dim() == 1 else t), ODD)


def oracle(w, version, samples, grad) -> bool:
    """Independently: is this update acceptable?"""
    if not isinstance(w, torch.Tensor) or w.layout != torch.strided:
        return False
    if w.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64) or tuple(w.shape) != (TOTAL,):
        return False
    if isinstance(version, (bool, np.bool_)) or not isinstance(version, (int, np.integer)) or version != 4:
        return False
    if isinstance(samples, (bool, np.bool_)) or not isinstance(samples, (int, np.integer)) or samples < 0:
        return False
    if not all(math.isfinite(float(v)) for v in w.to(torch.float32).tolist()):
        return False
    if any(float(w[i]) != 0.0 for i in range(N) if not MASK[i]):
        return False
    if grad is None:
        return True
    if not isinstance(grad, torch.Tensor) or grad.layout != torch.strided or not grad.is_floating_point():
        return False
    if tuple(grad.shape) != (N,):
        return False
    g = grad.to(torch.float32).tolist()
    return all(math.isfinite(v) and v >= 0 for v in g)


@st.composite
def near_valid(draw):
    """A valid update with zero to two of its parts replaced by something wild."""
    dtype = draw(st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64]))
    w = torch.tensor(draw(st.lists(st.floats(-1e3, 1e3), min_size=TOTAL, max_size=TOTAL)), dtype=dtype)
    w[:N][~MASK] = 0
    parts = {
        "w": w,
        "version": 4,
        "samples": draw(st.integers(0, 10**6)),
        "grad": draw(st.one_of(st.none(), st.lists(st.floats(0, 1e30), min_size=N, max_size=N).map(torch.tensor))),
    }
    parts_to_spoil = ["w", "version", "samples", "grad", "poke", "outside", "outside", "shape"]
    for part in draw(st.lists(st.sampled_from(parts_to_spoil), max_size=2)):
        if part == "shape":
            parts["w"] = torch.ones(draw(st.integers(0, 12)), dtype=dtype)
        elif part == "w":
            parts["w"] = draw(st.one_of(tensors(), ODD))
        elif part == "version":
            parts["version"] = draw(VERSIONS)
        elif part == "samples":
            parts["samples"] = draw(SAMPLES)
        elif part == "grad":
            parts["grad"] = draw(GRADS)
        elif (isinstance(parts["w"], torch.Tensor) and parts["w"].layout == torch.strided
              and parts["w"].shape == (TOTAL,) and parts["w"].is_floating_point()):
            i = draw(st.sampled_from([1, 4, 5] if part == "outside" else list(range(TOTAL))))
            parts["w"] = parts["w"].clone()
            parts["w"][i] = torch.tensor(draw(st.sampled_from(SPECIAL)), dtype=torch.float64).to(parts["w"].dtype)
    return parts["w"], parts["version"], parts["samples"], parts["grad"]


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=st.one_of(near_valid(), near_valid(), st.tuples(st.one_of(tensors(), ODD), VERSIONS, SAMPLES, GRADS)))
def test_fuzz_never_crashes_and_always_names_a_reason(case) -> None:
    w, version, samples, grad = case
    rej = validate_update(w, claimed_version=version, expected_version=4, like=LIKE, mask=MASK, num_prunable=N,
                          num_samples=samples, grad_sq=grad)
    event("accepted" if rej is None else f"rejected: {rej.check}")
    if rej is not None:
        assert rej.check in CHECKS and rej.reason and isinstance(rej.reason, str)
    assert (rej is None) == oracle(w, version, samples, grad), (rej, w, version, samples, grad)


@settings(max_examples=150, deadline=None)
@given(w=tensors(), start=tensors(), norms=st.lists(st.floats(0, 1e6), max_size=6),
       factor=st.one_of(st.none(), st.floats(0.1, 10)))
def test_fuzz_with_the_norm_check(w, start, norms, factor) -> None:
    start = start.to(torch.float32) if start.shape == (TOTAL,) and start.is_floating_point() else torch.zeros(TOTAL)
    rej = validate_update(w, claimed_version=4, expected_version=4, like=LIKE, mask=MASK, num_prunable=N,
                          num_samples=1, start=start, recent_norms=norms,
                          checks=UpdateChecks(norm_factor=factor, norm_window=3))
    assert rej is None or (rej.check in CHECKS and rej.reason)
