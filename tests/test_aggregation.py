"""Aggregation maths: staleness functions, weighted average, MaskFedAvg (hand numbers + properties)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prfl.aggregation import (
    exact_terms,
    fedbuff_staleness,
    finish_masked,
    mask_fedavg,
    plain_fedavg,
    staleness_weight,
    sum_is_zero,
    weighted_average,
)

T = torch.tensor
F32 = torch.float32


# --------------------------------------------------------------------------- staleness
@pytest.mark.parametrize(
    "kind, tau, a, b, expected",
    [
        ("const", 0, 0.6, 2.0, 1.0),
        ("const", 7, 0.6, 2.0, 1.0),
        ("poly", 0, 0.6, 2.0, 1.0),
        ("poly", 3, 0.5, 2.0, 0.5),  # 4^-0.5
        ("poly", 8, 0.5, 2.0, 1 / 3),  # 9^-0.5
        ("poly", 31, 0.2, 2.0, 0.5),  # 32^-0.2
        ("poly", 1, 1.0, 2.0, 0.5),  # 2^-1
        ("hinge", 0, 0.5, 2.0, 1.0),
        ("hinge", 2, 0.5, 2.0, 1.0),  # tau <= b
        ("hinge", 4, 0.5, 2.0, 0.5),  # 1 / (0.5 * 2 + 1)
        ("hinge", 12, 0.6, 2.0, 1 / 7),  # 1 / (0.6 * 10 + 1)
        ("hinge", 2.5, 2.0, 2.0, 0.5),  # 1 / (2 * 0.5 + 1)
    ],
)
def test_staleness_weight_hand_values(kind, tau, a, b, expected):
    assert staleness_weight(kind, tau, a, b) == pytest.approx(expected, rel=1e-12)


def test_staleness_defaults_are_poly_a06_b2():
    assert staleness_weight("poly", 1) == pytest.approx(2 ** -0.6)
    assert staleness_weight("hinge", 2) == 1.0
    assert staleness_weight("hinge", 3) == pytest.approx(1 / 1.6)


def test_staleness_weight_on_tensors():
    taus = T([0, 3, 8])
    assert staleness_weight("poly", taus, a=0.5).tolist() == pytest.approx([1.0, 0.5, 1 / 3])
    assert staleness_weight("hinge", taus, a=0.5, b=2.0).tolist() == pytest.approx([1.0, 1 / 1.5, 1 / 4])
    assert staleness_weight("const", taus).tolist() == [1.0, 1.0, 1.0]


def test_fedbuff_staleness_hand_values():
    assert fedbuff_staleness(0) == 1.0
    assert fedbuff_staleness(3) == 0.5
    assert fedbuff_staleness(8) == pytest.approx(1 / 3)


def test_staleness_errors_name_the_problem():
    with pytest.raises(ValueError, match="const, poly, hinge"):
        staleness_weight("linear", 1)
    with pytest.raises(ValueError, match="tau"):
        staleness_weight("poly", -1)
    with pytest.raises(ValueError, match="tau"):
        staleness_weight("poly", T([0, -2]))
    with pytest.raises(ValueError, match="tau"):
        fedbuff_staleness(-0.5)
    with pytest.raises(ValueError, match="a must"):
        staleness_weight("hinge", 1, a=-1.0)


# --------------------------------------------------------------------------- weighted average
def test_weighted_average_hand_values():
    out = weighted_average([T([1.0, 2.0]), T([3.0, 6.0])], [1.0, 3.0])
    assert out.tolist() == [2.5, 5.0]  # (1 + 9) / 4, (2 + 18) / 4
    assert out.dtype == F32
    assert plain_fedavg is weighted_average


def test_weighted_average_errors():
    with pytest.raises(ValueError, match="at least one"):
        weighted_average([], [])
    with pytest.raises(ValueError, match="positive total"):
        weighted_average([T([1.0])], [0.0])
    with pytest.raises(ValueError, match="weights"):
        weighted_average([T([1.0]), T([2.0])], [1.0])
    with pytest.raises(ValueError, match="shape"):
        weighted_average([T([1.0]), T([2.0, 3.0])], [1.0, 1.0])


# --------------------------------------------------------------------------- MaskFedAvg
PREV = T([10.0, 20.0, 30.0, 40.0, 50.0, 60.0])
# Client A holds prunable weights 0 and 3 (the 99 at index 1 lies outside its mask: ignored);
# client B holds 0, 1 and 3; nobody holds 2. Coefficients c_A = 1, c_B = 2.
W_A = T([1.0, 99.0, 0.0, 2.0, 5.0, 6.0])
M_A = T([True, False, False, True])
W_B = T([4.0, 7.0, 0.0, -1.0, 8.0, 9.0])
M_B = T([True, True, False, True])


def test_mask_fedavg_hand_example():
    out = mask_fedavg(PREV, [W_A, W_B], [M_A, M_B], [1.0, 2.0], num_prunable=4)
    # 0: (1*1 + 2*4) / 3 = 3        both hold it: average weighted by c_i
    # 1: 2*7 / 2 = 7                only B holds it: B's value
    # 2: nobody holds it            previous value 30
    # 3: (1*2 + 2*(-1)) / 3 = 0     exact zero: previous value 40
    # 4, 5 (not prunable): (5 + 16) / 3 = 7, (6 + 18) / 3 = 8
    assert out.tolist() == [3.0, 7.0, 30.0, 40.0, 7.0, 8.0]
    assert out.dtype == F32


def test_mask_fedavg_server_step():
    out = mask_fedavg(PREV, [W_A, W_B], [M_A, M_B], [1.0, 2.0], num_prunable=4, eta_g=0.5)
    # (prev + [3, 7, 30, 40, 7, 8]) / 2
    assert out.tolist() == [6.5, 13.5, 30.0, 40.0, 28.5, 34.0]


def test_mask_fedavg_coeffs_are_p_times_n():
    # p = (0.25, 0.75) (staleness shares), n = (40, 10): c = (10, 7.5)
    p, n = (0.25, 0.75), (40, 10)
    coeffs = [pi * ni for pi, ni in zip(p, n)]
    w1, w2 = T([1.0, 1.0, 1.0]), T([8.0, 8.0, 8.0])
    out = mask_fedavg(T([0.0, 0.0, 0.0]), [w1, w2], [None, T([True, False])], coeffs, num_prunable=2)
    # 0: (10*1 + 7.5*8) / 17.5 = 4;  1: only client 1 (dense) holds it = 1;  2 (suffix): 4
    assert out.tolist() == [4.0, 1.0, 4.0]


def test_mask_fedavg_dense_none_and_no_prunable():
    out = mask_fedavg(T([5.0, 5.0]), [T([2.0, 4.0]), T([4.0, 8.0])], [None, None], [1.0, 1.0], num_prunable=0)
    assert out.tolist() == [3.0, 6.0]


def test_mask_fedavg_does_not_touch_inputs():
    prev, wa, wb = PREV.clone(), W_A.clone(), W_B.clone()
    out = mask_fedavg(prev, [wa, wb], [M_A, M_B], [1.0, 2.0], num_prunable=4)
    assert torch.equal(prev, PREV) and torch.equal(wa, W_A) and torch.equal(wb, W_B)
    assert out.data_ptr() != prev.data_ptr()


def test_single_holder_and_single_model_are_exact():
    # with float32 accumulation 3.3 * 0.1 / 0.1 comes back one ulp off; float64 accumulation is exact
    w = T([0.3, 0.7, 3.3, 0.1, 5.1, 7.7])
    other = T([9.0, 9.0, 9.0, 9.0, 9.0, 9.0])
    only_w = T([True, True, True, True])
    nobody = T([False, False, False, False])
    out = mask_fedavg(torch.zeros(6), [w, other], [only_w, nobody], [0.1, 0.7], num_prunable=4)
    assert torch.equal(out[:4], w[:4])
    assert torch.equal(weighted_average([w], [0.1]), w)
    assert torch.equal(weighted_average([w, w, w], [0.1, 0.3, 0.7]), w)
    loose = weighted_average([w], [0.1], accumulate_dtype=torch.float32)
    assert torch.allclose(loose, w) and loose.dtype == F32


def test_mask_fedavg_errors():
    with pytest.raises(ValueError, match="at least one"):
        mask_fedavg(PREV, [], [], [], num_prunable=4)
    with pytest.raises(ValueError, match="lengths must match"):
        mask_fedavg(PREV, [W_A], [M_A, M_B], [1.0], num_prunable=4)
    with pytest.raises(ValueError, match=r"masks\[0\] must be a bool"):
        mask_fedavg(PREV, [W_A], [M_A.float()], [1.0], num_prunable=4)
    with pytest.raises(ValueError, match=r"masks\[0\] must be a bool"):
        mask_fedavg(PREV, [W_A], [M_A[:3]], [1.0], num_prunable=4)
    with pytest.raises(ValueError, match=r"coeffs\[0\]"):
        mask_fedavg(PREV, [W_A], [M_A], [-1.0], num_prunable=4)
    with pytest.raises(ValueError, match="positive total"):
        mask_fedavg(PREV, [W_A], [M_A], [0.0], num_prunable=4)
    with pytest.raises(ValueError, match="eta_g"):
        mask_fedavg(PREV, [W_A], [M_A], [1.0], num_prunable=4, eta_g=0.0)
    with pytest.raises(ValueError, match=r"models\[0\] has shape"):
        mask_fedavg(PREV, [W_A[:5]], [M_A], [1.0], num_prunable=4)


# --------------------------------------------------------------------------- properties
finite = st.floats(-100, 100, allow_nan=False, width=32)


@st.composite
def fleets(draw):
    dim = draw(st.integers(1, 8))
    npr = draw(st.integers(0, dim))
    k = draw(st.integers(1, 4))
    prev = T(draw(st.lists(finite, min_size=dim, max_size=dim)), dtype=F32)
    models = [T(draw(st.lists(finite, min_size=dim, max_size=dim)), dtype=F32) for _ in range(k)]
    masks = [T(draw(st.lists(st.booleans(), min_size=npr, max_size=npr)), dtype=torch.bool) for _ in range(k)]
    coeffs = draw(st.lists(st.floats(0.01, 100), min_size=k, max_size=k))
    return prev, models, masks, coeffs, npr


@settings(max_examples=150, deadline=None)
@given(fleets())
def test_dense_masks_equal_weighted_average(fleet):
    prev, models, _, coeffs, npr = fleet
    dense = [torch.ones(npr, dtype=torch.bool)] * len(models)
    out = mask_fedavg(prev, models, dense, coeffs, num_prunable=npr)
    avg = weighted_average(models, coeffs)
    # equal, except where the holders' sum is zero (decided on the terms: |S| <= gamma_(h+1) A) or
    # the float64 average underflows to 0: there prev is kept. Where the terms are formed, the
    # average is S / M from them (equal to the blocked sum's up to rounding).
    s, a, m, h = exact_terms(((c, w[:npr], None) for w, c in zip(models, coeffs)), npr)
    zero = sum_is_zero(s, a, h) | (s / m == 0)
    expected = avg.clone()
    expected[:npr] = torch.where(zero, prev[:npr], avg[:npr])
    assert torch.allclose(out, expected, rtol=1e-6, atol=0) and torch.equal(out[:npr] == prev[:npr], expected[:npr] == prev[:npr])
    dense_none = mask_fedavg(prev, models, [None] * len(models), coeffs, num_prunable=npr)
    assert torch.equal(dense_none, expected)


@settings(max_examples=150, deadline=None)
@given(fleets())
def test_each_weight_lies_between_its_holders_or_keeps_prev(fleet):
    prev, models, masks, coeffs, npr = fleet
    out = mask_fedavg(prev, models, masks, coeffs, num_prunable=npr)
    stacked = torch.stack(models)
    held = torch.stack(masks) if npr else torch.zeros(len(models), 0, dtype=torch.bool)
    for j in range(prev.numel()):
        holders = stacked[:, j] if j >= npr else stacked[held[:, j], j]
        if holders.numel() == 0:
            assert out[j] == prev[j]  # nobody holds it
        else:  # an average of the holders (or prev, where that average is exactly zero)
            assert holders.min() <= out[j] <= holders.max() or (j < npr and out[j] == prev[j])


@settings(max_examples=100, deadline=None)
@given(fleets(), st.floats(0.01, 1.0))
def test_server_step_interpolates(fleet, eta):
    prev, models, masks, coeffs, npr = fleet
    full = mask_fedavg(prev, models, masks, coeffs, num_prunable=npr)
    step = mask_fedavg(prev, models, masks, coeffs, num_prunable=npr, eta_g=eta)
    expected = (1 - eta) * prev.double() + eta * full.double()
    assert torch.allclose(step.double(), expected, rtol=1e-5, atol=1e-4)


# --------------------------------------------------------------------------- blocked sums
def _plain_loop(prev, models, masks, coeffs, npr):
    """MaskFedAvg as the textbook loop: every model added whole, in turn, in float64 (the mass
    of the dense models joins M once at the end, as documented)."""
    w_acc, m_acc = torch.zeros(npr, dtype=torch.float64), torch.zeros(npr, dtype=torch.float64)
    s_acc = torch.zeros(prev.numel() - npr, dtype=torch.float64)
    dense = 0.0
    for w, m, c in zip(models, masks, coeffs):
        if m is None:
            dense += c
            w_acc += c * w[:npr].to(torch.float64)
        else:
            m_acc += c * m.to(torch.float64)
            w_acc += c * (m.to(torch.float64) * w[:npr].to(torch.float64))
        s_acc += c * w[npr:].to(torch.float64)
    m_acc += dense
    head = w_acc / m_acc
    out = prev.to(torch.float64).clone()
    take = (m_acc != 0) & (head != 0)
    out[:npr][take] = head[take]
    out[npr:] = s_acc / sum(coeffs)
    return out.to(prev.dtype)


@pytest.mark.parametrize("block", [1, 7, 64, 1 << 18])
def test_blocked_sums_equal_the_plain_loop_bit_for_bit(monkeypatch, block):
    """However the sum is cut into blocks, each weight gets its terms in model order."""
    import prfl.aggregation as agg
    from prfl.buffer import ClientBuffer

    monkeypatch.setattr(agg, "BLOCK", block)
    g = torch.Generator().manual_seed(4)
    total, npr = 300, 290
    models = [torch.randn(total, generator=g) * 10 ** float(i - 2) for i in range(5)]
    masks = [None, torch.rand(npr, generator=g) < 0.3, torch.rand(npr, generator=g) < 0.7, None, torch.rand(npr, generator=g) < 0.5]
    coeffs = [0.1, 0.37, 0.0, 2.5, 1 / 3]
    prev = torch.randn(total, generator=g)
    want = _plain_loop(prev, models, masks, coeffs, npr)
    assert torch.equal(mask_fedavg(prev, models, masks, coeffs, npr), want)
    live = [(m, c) for m, c in zip(models, coeffs) if c]
    plain = sum((c * m.to(torch.float64) for m, c in live), torch.zeros(total, dtype=torch.float64))
    assert torch.equal(weighted_average(models, coeffs), (plain / sum(coeffs)).to(torch.float32))
    # the buffer's dense storage sums block by block too, and agrees with mask_fedavg exactly
    buf = ClientBuffer(len(models), total, npr, storage="dense")
    for i, (w, m) in enumerate(zip(models, masks)):
        buf.put(i, w if m is None else torch.cat([w[:npr] * m, w[npr:]]), m, 1, 0)
    ones = [1.0] * len(models)
    assert torch.equal(buf.aggregate(prev, 0, kind="const"), mask_fedavg(prev, models, masks, ones, npr))


# --------------------------------------------------------------------------- the zero rule
X = 0.7  # not a float32 value times a power of two: c * X is rounded


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("c", [1.0, 1 / 3, 0.1, 12.345])
def test_plus_x_minus_x_at_equal_weight_keeps_prev(dtype, c):
    """+x and -x at equal weight average to exactly 0: prev is kept, in either order and dtype."""
    prev = T([5.0, 6.0, 7.0])
    a, b = T([X, 1.0, 2.0]), T([-X, 3.0, 4.0])
    for models in ([a, b], [b, a]):
        out = mask_fedavg(prev, models, [None, None], [c, c], num_prunable=2, accumulate_dtype=dtype)
        assert out[0] == 5.0  # kept, not 8.3e-18
        assert out[1] == 2.0 and torch.isclose(out[2], torch.tensor(3.0))


def test_a_fused_accumulator_residue_is_still_zero():
    """A fused multiply-add leaves fl(c x) - c x, not 0, in the accumulator; the decision is taken
    on the terms, so the weight keeps prev all the same."""
    from fractions import Fraction

    c = 1 / 3
    x = float(torch.tensor(X))  # the float32 value
    p = c * x  # fl(c x)
    residue = float(Fraction(p) - Fraction(c) * Fraction(x))  # what fma(c, -x, p) leaves
    assert residue != 0.0
    models = [T([X, 1.0]), T([-X, 1.0])]
    out = torch.empty(1)
    finish_masked(out, T([9.0]), torch.tensor([residue], dtype=torch.float64), torch.tensor([2 * c], dtype=torch.float64),
                  lambda pos: exact_terms(((c, w[pos], None) for w in models), int(pos.numel())), wmax=x, n_terms=2,
                  min_coef=c)
    assert out.tolist() == [9.0]


def test_near_cancellation_is_not_zero():
    """What must not count as zero: x and the next float32 below -x, or +x and -x at unequal weights."""
    prev = T([5.0, 6.0])
    below = torch.nextafter(T([-X]), T([-1.0]))[0]
    out = mask_fedavg(prev, [T([X, 0.0]), torch.stack([below, T([0.0])[0]])], [None, None], [1.0, 1.0], num_prunable=1)
    expected = (float(T([X])[0]) + float(below)) / 2  # -2.98e-08
    assert out[0] != 5.0 and out[0] == torch.tensor(expected, dtype=torch.float32)
    out = mask_fedavg(prev, [T([X, 0.0]), T([-X, 0.0])], [None, None], [1.0, 3.0], num_prunable=1)
    assert torch.isclose(out[0], torch.tensor(-X / 2))


def test_a_holder_that_reports_exactly_zero_keeps_prev_and_others_average():
    prev = T([5.0, 6.0, 7.0, 0.0])
    out = mask_fedavg(prev, [T([0.0, 0.0, 1.0, 2.0]), T([0.0, 2.0, 0.0, 2.0])],
                      [T([True, True, True]), T([True, True, False])], [1.0, 1.0], num_prunable=3)
    assert out.tolist() == [5.0, 1.0, 1.0, 2.0]
