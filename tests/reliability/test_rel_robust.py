"""prfl.robust by hand and by property, and its wiring into the buffer and PR-FL."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prfl.aggregation import mask_fedavg
from prfl.buffer import ClientBuffer
from prfl.policies import build_policy
from prfl.robust import clip_update, clip_updates, coordinate_median, holders, robust_aggregate, stack, trimmed_mean

T = torch.tensor


# --------------------------------------------------------------------------- by hand
def test_median_by_hand_over_holders_only() -> None:
    # 3 prunable weights + 1 suffix; client 2 does not hold weight 0, nobody holds weight 2
    models = stack([T([1.0, 5.0, 0.0, 1.0]), T([3.0, 1.0, 0.0, 2.0]), T([0.0, 2.0, 0.0, 9.0])])
    masks = [T([True, True, False]), T([True, True, False]), T([False, True, False])]
    prev = T([7.0, 7.0, 7.0, 7.0])
    med = coordinate_median(models, holders(masks, 3, 4), prev)
    # w0: holders {1, 3} -> 2 (mean of the two middle); w1: {5, 1, 2} -> 2; w2: none -> prev; bias: {1, 2, 9} -> 2
    assert med.tolist() == [2.0, 2.0, 7.0, 2.0]


def test_trimmed_mean_by_hand() -> None:
    # 5 dense clients, one weight: values 1, 2, 3, 4, 100; beta 0.2 drops one from each end
    models = T([[1.0], [2.0], [3.0], [4.0], [100.0]])
    held = torch.ones(5, 1, dtype=torch.bool)
    prev = T([0.0])
    assert trimmed_mean(models, held, prev, 0.2).tolist() == [3.0]
    # weighted survivors: (2*1 + 3*1 + 4*2) / 4
    assert trimmed_mean(models, held, prev, 0.2, [9, 1, 1, 2, 9]).tolist() == [13 / 4]
    # beta below 1/5 trims nothing: the plain mean
    assert trimmed_mean(models, held, prev, 0.19).tolist() == [22.0]
    # holders only: with 4 holders floor(0.2 * 4) = 0, so the mean of those 4
    held4 = T([[True], [True], [True], [False], [True]])
    assert trimmed_mean(models, held4, prev, 0.2).tolist() == [26.5]
    assert trimmed_mean(models, torch.zeros(5, 1, dtype=torch.bool), T([-1.0]), 0.2).tolist() == [-1.0]


def test_clip_by_hand_on_the_mask() -> None:
    ref = T([1.0, 1.0, 1.0, 0.0])
    w = T([4.0, 0.0, 5.0, 3.0])  # held: 0, 2 and the suffix; update (3, ., 4, 3) has norm sqrt(34)
    mask = T([True, False, True])
    out, norm = clip_update(w, ref, mask, 3, max_norm=1.0)
    assert norm == pytest.approx(math.sqrt(34))
    s = 1 / math.sqrt(34)
    assert out.tolist() == pytest.approx([1 + 3 * s, 0.0, 1 + 4 * s, 3 * s])
    same, _ = clip_update(w, ref, mask, 3, max_norm=10.0)  # below the bound: unchanged
    assert torch.equal(same, w)


def test_robust_aggregate_errors_name_the_option() -> None:
    prev, m = torch.zeros(4), [torch.ones(4)]
    with pytest.raises(ValueError, match="robust must be one of none, clip, trimmed_mean, median"):
        robust_aggregate(prev, m, [None], [1.0], 3, "mean")
    with pytest.raises(ValueError, match=r"trim must be a fraction in \[0, 0.5\)"):
        robust_aggregate(prev, m, [None], [1.0], 3, "trimmed_mean", trim=0.5)
    with pytest.raises(ValueError, match="robust: clip needs clip_norm"):
        robust_aggregate(prev, m, [None], [1.0], 3, "clip")
    with pytest.raises(ValueError, match="clip_norm must be a finite number > 0"):
        robust_aggregate(prev, m, [None], [1.0], 3, "clip", clip_norm=-1.0)
    with pytest.raises(ValueError, match="robust must be one of"):
        build_policy("prfl", _ctx(), robust="krum")
    with pytest.raises(ValueError, match="clip needs clip_norm"):
        build_policy("prfl", _ctx(), robust="clip")


def _ctx():
    from prfl.policies.base import PolicyContext

    return PolicyContext(num_clients=2, num_samples=(1, 1), initial_weights=torch.ones(6), num_prunable=4,
                         layer_bounds=((0, 4),))


# --------------------------------------------------------------------------- properties
@st.composite
def fleets(draw, min_k: int = 1):
    k = draw(st.integers(min_k, 7))
    n = draw(st.integers(1, 12))
    m = draw(st.integers(0, 3))
    vals = st.floats(-100, 100, allow_nan=False, width=32)
    models = [draw(st.lists(vals, min_size=n + m, max_size=n + m)) for _ in range(k)]
    masks = [draw(st.one_of(st.none(), st.lists(st.booleans(), min_size=n, max_size=n))) for _ in range(k)]
    coeffs = [draw(st.floats(0.01, 10)) for _ in range(k)]
    prev = draw(st.lists(vals, min_size=n + m, max_size=n + m))
    ms = [None if x is None else torch.tensor(x) for x in masks]
    ws = [torch.tensor(x, dtype=torch.float32) for x in models]
    ws = [w if mk is None else torch.cat([w[:n] * mk, w[n:]]) for w, mk in zip(ws, ms)]  # W ⊙ m, as stored
    return ws, ms, coeffs, torch.tensor(prev, dtype=torch.float32), n


def _bounds(ws, ms, n):
    held = holders(ms, n, ws[0].numel())
    x = stack(ws).double()
    lo = torch.where(held, x, torch.tensor(math.inf, dtype=torch.float64)).min(0).values
    hi = torch.where(held, x, torch.tensor(-math.inf, dtype=torch.float64)).max(0).values
    return held.any(0), lo, hi


@settings(max_examples=150, deadline=None)
@given(fleets(), st.sampled_from(["median", "trimmed_mean"]), st.floats(0, 0.49))
def test_coordinatewise_rules_stay_within_their_holders(fleet, method, trim) -> None:
    ws, ms, cs, prev, n = fleet
    out = robust_aggregate(prev, ws, ms, cs, n, method, trim=trim)
    anyone, lo, hi = _bounds(ws, ms, n)
    o = out.double()
    assert torch.equal(out[~anyone], prev[~anyone])  # nobody holds it: previous value
    tol = 1e-5 * (1 + hi.abs())
    assert bool(((o >= lo - tol) & (o <= hi + tol))[anyone].all())


@settings(max_examples=100, deadline=None)
@given(fleets(), st.sampled_from(["median", "trimmed_mean"]), st.randoms(use_true_random=False))
def test_coordinatewise_rules_ignore_client_order(fleet, method, rnd) -> None:
    ws, ms, cs, prev, n = fleet
    order = list(range(len(ws)))
    rnd.shuffle(order)
    a = robust_aggregate(prev, ws, ms, [1.0] * len(ws), n, method, trim=0.2)
    b = robust_aggregate(prev, [ws[i] for i in order], [ms[i] for i in order], [1.0] * len(ws), n, method, trim=0.2)
    assert torch.allclose(a, b, rtol=1e-6, atol=1e-6)


@settings(max_examples=100, deadline=None)
@given(fleets())
def test_identical_models_come_back_exactly(fleet) -> None:
    ws, ms, cs, prev, n = fleet
    same = [ws[0].clone() for _ in ws]
    masks = [ms[0]] * len(ws)
    for method in ("median", "trimmed_mean"):
        out = robust_aggregate(prev, same, masks, cs, n, method, trim=0.3)
        held = holders(masks[:1], n, prev.numel())[0]
        assert torch.equal(out[held], ws[0][held]) and torch.equal(out[~held], prev[~held])


@settings(max_examples=100, deadline=None)
@given(fleets())
def test_trim_zero_is_the_masked_weighted_mean(fleet) -> None:
    """beta = 0 averages each weight over its holders with c_i: MaskFedAvg without its
    "result exactly 0 keeps prev" safeguard."""
    ws, ms, cs, prev, n = fleet
    out = robust_aggregate(prev, ws, ms, cs, n, "trimmed_mean", trim=0.0)
    ref = mask_fedavg(prev, ws, ms, cs, n)
    zero_kept = (ref == prev) & (out == 0)  # MaskFedAvg's safeguard on an exact 0
    assert torch.allclose(out[~zero_kept], ref[~zero_kept], rtol=1e-5, atol=1e-4)


@settings(max_examples=100, deadline=None)
@given(fleets(), st.floats(0.01, 50))
def test_clipped_updates_have_bounded_norm_and_keep_direction(fleet, c) -> None:
    ws, ms, _, prev, n = fleet
    x = stack(ws)
    held = holders(ms, n, prev.numel())
    out, norms = clip_updates(x, prev, held, c)
    d_out = torch.where(held, out.double() - prev.double(), torch.zeros((), dtype=torch.float64))
    d_in = torch.where(held, x.double() - prev.double(), torch.zeros((), dtype=torch.float64))
    new_norms = torch.linalg.vector_norm(d_out, dim=1)
    assert bool((new_norms <= c * (1 + 1e-5) + 1e-4).all())
    assert torch.allclose(norms, torch.linalg.vector_norm(d_in, dim=1))
    for i in range(len(ws)):
        assert not bool(out[i][~held[i]].any())  # W ⊙ m: nothing outside the mask
        if norms[i] <= c:
            assert torch.allclose(out[i][held[i]], x[i][held[i]])
        else:  # same direction, scaled to c
            assert torch.allclose(d_out[i], d_in[i] * (c / norms[i]), rtol=1e-4, atol=1e-4)


@settings(max_examples=60, deadline=None)
@given(fleets(), st.sampled_from(["median", "trimmed_mean", "clip"]), st.sampled_from(["dense", "sparse"]),
       st.integers(0, 5))
def test_buffer_robust_equals_the_functions(fleet, method, storage, now) -> None:
    ws, ms, _, prev, n = fleet
    total = prev.numel()
    buf = ClientBuffer(len(ws), total, n, storage=storage)
    samples = [i + 1 for i in range(len(ws))]
    for i, (w, m) in enumerate(zip(ws, ms)):
        buf.put(i, w, m, samples[i], sent_round=min(i, now))
    coeffs = buf.coefficients(now)
    cs = [coeffs[i] for i in range(len(ws))]
    got = buf.aggregate(prev, now, robust=method, trim=0.2, clip_norm=1.0)
    want = robust_aggregate(prev, ws, ms, cs, n, method, trim=0.2, clip_norm=1.0)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    plain = buf.aggregate(prev, now)  # robust defaults to none: MaskFedAvg as before
    assert torch.allclose(plain, mask_fedavg(prev, ws, ms, cs, n), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- PR-FL wiring
def test_prfl_median_outvotes_one_liar_and_clip_bounds_it() -> None:
    from prfl.client.result import TaskResult
    from prfl.policies.base import PolicyContext, ResultArrived, Start

    ctx = PolicyContext(num_clients=3, num_samples=(1, 1, 1), initial_weights=torch.zeros(6), num_prunable=4,
                        layer_bounds=((0, 4),))

    def play(**options):
        pol = build_policy("prfl", ctx, synchronous=True, interval=1000, recovery=False, importance=False,
                           density_rule="B", initial_densities=(1.0, 1.0, 1.0), **options)
        tasks = {a.task.client: a.task for a in pol.on_event(Start(0.0))}
        for c, v in ((0, 1.0), (1, 1.2), (2, -50.0)):
            w = torch.full((6,), v)
            pol.on_event(ResultArrived(1.0 + c, TaskResult(tasks[c].task_id, c, 0, w, 1, 0.0, 1, 0.0)))
        assert pol.version == 1
        return pol.weights

    assert torch.allclose(play(), torch.full((6,), (1.0 + 1.2 - 50.0) / 3))
    assert torch.allclose(play(robust="median"), torch.full((6,), 1.0))
    assert torch.allclose(play(robust="trimmed_mean", trim=0.34), torch.full((6,), 1.0))
    clipped = play(robust="clip", clip_norm=math.sqrt(6) * 1.0)  # every update clipped to per-weight 1
    assert torch.allclose(clipped, torch.full((6,), (1.0 + 1.0 - 1.0) / 3))
