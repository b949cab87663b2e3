import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prfl.pruning.ranking import build_ranking, floor_mask, kept_count, magnitude_ranking, rank_with_floor


def test_kept_count_is_exact_ceil_without_float_noise():
    assert kept_count(0.3, 100) == 30  # 0.3*100 = 30.000000000000004 in floats
    assert kept_count(0.301, 100) == 31
    assert kept_count(0.0, 100) == 0
    assert kept_count(1.0, 7) == 7
    assert kept_count(0.1, 7) == 1
    with pytest.raises(ValueError):
        kept_count(1.5, 10)


def test_small_hand_ranking():
    # two layers: [0,4) and [4,10); floor 0.25 keeps ceil(0.25*4)=1 and ceil(0.25*6)=2 by magnitude
    mags = torch.tensor([0.1, 0.9, 0.2, 0.3, 5.0, 0.0, 4.0, 0.1, 0.2, 0.3])
    scores = torch.tensor([9.0, 0.0, 8.0, 7.0, 0.0, 6.0, 0.5, 5.0, 4.0, 3.0])
    r = build_ranking(scores, mags, [(0, 4), (4, 10)], floor=0.25)
    # floor = {1 (layer 0), 4, 6 (layer 1)}, ordered among themselves by score: 6 (0.5), then 1, 4 (0, ties by index)
    assert r.floor_count == 3
    assert r.order.tolist() == [6, 1, 4, 0, 2, 3, 5, 7, 8, 9]
    assert r.mask(0.5).nonzero().flatten().tolist() == sorted([6, 1, 4, 0, 2])
    assert r.piece(0.3, 0.5).tolist() == [0, 2]  # ranks 3 and 4


def test_layer_cost_divides_scores():
    mags = torch.ones(4)
    scores = torch.tensor([1.0, 1.0, 3.0, 3.0])
    r = build_ranking(scores, mags, [(0, 2), (2, 4)], floor=0.0, layer_cost=[1.0, 10.0])
    assert r.order.tolist() == [0, 1, 2, 3]


@st.composite
def layered(draw):
    sizes = draw(st.lists(st.integers(1, 40), min_size=1, max_size=5))
    n = sum(sizes)
    seed = draw(st.integers(0, 2**31 - 1))
    bounds, a = [], 0
    for s in sizes:
        bounds.append((a, a + s))
        a += s
    return bounds, n, seed


@settings(max_examples=60, deadline=None)
@given(layered(), st.lists(st.floats(0.0, 1.0), min_size=1, max_size=6))
def test_masks_nested_counts_exact_pieces_partition(spec, densities):
    bounds, n, seed = spec
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, generator=g)
    # repeated values exercise the tie-breaking
    scores = torch.randint(0, 4, (n,), generator=g).float()
    r = build_ranking(scores, w.abs(), bounds, floor=0.05)
    assert sorted(r.order.tolist()) == list(range(n))
    ds = sorted(densities)
    masks = [r.mask(d) for d in ds]
    for d, m in zip(ds, masks):
        assert int(m.sum()) == math.ceil(round(d * n, 6))
    for small, big in zip(masks, masks[1:]):
        assert not (small & ~big).any()  # nested
    pieces = r.pieces(ds)
    allidx = torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.int64)
    assert len(set(allidx.tolist())) == len(allidx)  # disjoint
    assert set(allidx.tolist()) == set(masks[-1].nonzero().flatten().tolist())  # cover the largest mask
    # floor: every layer keeps its top ceil(5%) by magnitude once the mask is at least the floor
    if r.count(ds[-1]) >= r.floor_count:
        m = masks[-1]
        for a, b in bounds:
            k = math.ceil(0.05 * (b - a))
            top = torch.sort(w.abs()[a:b], descending=True, stable=True).indices[:k] + a
            assert m[top].all()


def test_magnitude_ranking_prefers_large_weights():
    w = torch.tensor([0.5, -3.0, 0.1, 2.0])
    r = magnitude_ranking(w, [(0, 4)], floor=0.0)
    assert r.order.tolist() == [1, 3, 0, 2]
    assert r.rank_of().tolist() == [2, 0, 3, 1]


def test_bad_ranking_inputs():
    with pytest.raises(ValueError, match="cover"):
        build_ranking(torch.ones(4), torch.ones(4), [(0, 3)])
    with pytest.raises(ValueError, match="differ"):
        build_ranking(torch.ones(4), torch.ones(3), [(0, 4)])
    with pytest.raises(ValueError, match="NaN"):
        build_ranking(torch.tensor([1.0, float("nan")]), torch.ones(2), [(0, 2)])


def reference_ranking(scores, magnitudes, bounds, floor, layer_cost=None):
    """The rule written as two stable float64 sorts (what build_ranking must reproduce)."""
    s = scores.to(torch.float64).clone()
    if layer_cost is not None:
        for (a, b), c in zip(bounds, layer_cost):
            s[a:b] /= c
    mags = magnitudes.abs().to(torch.float64)
    in_floor = torch.zeros(s.numel(), dtype=torch.bool)
    for a, b in bounds:
        k = math.ceil(floor * (b - a))
        if k:
            in_floor[a + torch.sort(mags[a:b], descending=True, stable=True).indices[:k]] = True
    by_score = torch.sort(s, descending=True, stable=True).indices
    first = in_floor[by_score]
    return torch.cat([by_score[first], by_score[~first]]), int(in_floor.sum())


SPECIAL = [0.0, -0.0, 1.0, -1.0, float("inf"), -float("inf"), 5e-324, -5e-324, 1e308, 3.0e38, 1e-45]


@settings(max_examples=150, deadline=None)
@given(layered(), st.sampled_from(["ties", "normal", "float32", "near", "special"]), st.booleans(),
       st.sampled_from([0.0, 0.05, 0.3, 1.0]))
def test_fast_ranking_equals_the_stable_sort_rule(spec, kind, cost, floor):
    """Packed-key sorting gives exactly the order of the stable sorts, including ties, -0.0, infinities,
    float64 scores that agree in their leading bits (a layer cost) and float32 magnitudes."""
    bounds, n, seed = spec
    g = torch.Generator().manual_seed(seed)
    if kind == "ties":
        s = torch.randint(0, 4, (n,), generator=g).to(torch.float64)
    elif kind == "normal":
        s = torch.randn(n, generator=g, dtype=torch.float64)
    elif kind == "float32":
        s = torch.rand(n, generator=g) ** 3
    elif kind == "near":  # distinct float64 values sharing every bit a packed key keeps
        base = torch.randn(4, generator=g, dtype=torch.float64)
        s = base[torch.randint(0, 4, (n,), generator=g)] * (1 + torch.randint(-3, 4, (n,), generator=g) * 2.0**-45)
    else:
        s = torch.tensor(SPECIAL, dtype=torch.float64)[torch.randint(0, len(SPECIAL), (n,), generator=g)]
    mags = torch.randn(n, generator=g) if seed % 2 else torch.randint(-2, 3, (n,), generator=g).float()
    layer_cost = (torch.rand(len(bounds), generator=g, dtype=torch.float64) + 0.1).tolist() if cost else None
    order, floor_count = reference_ranking(s, mags, bounds, floor, layer_cost)
    r = build_ranking(s, mags, bounds, floor, layer_cost)
    assert r.floor_count == floor_count
    assert torch.equal(r.order, order)


@pytest.mark.parametrize("cost", [None, (1.0, 3.7, 0.25)])
def test_a_ranking_is_rebuilt_from_its_scores_and_floor_bit_for_bit(cost):
    """A checkpoint keeps the scores and the floor instead of the ranking: the rebuild must be the
    same permutation, ties (repeated scores, zeros) and per-layer costs included."""
    g = torch.Generator().manual_seed(4)
    bounds = ((0, 300), (300, 1000), (1000, 1200))
    scores = torch.rand(1200, generator=g) ** 3
    scores[::5] = scores[1::5]  # ties, broken by index
    scores[100:140] = 0.0
    weights = torch.randn(1200, generator=g)
    r = build_ranking(scores, weights, bounds, floor=0.1, layer_cost=cost)
    again = rank_with_floor(scores, floor_mask(r), bounds, layer_cost=cost)
    assert torch.equal(again.order, r.order) and again.floor_count == r.floor_count
    other = floor_mask(r)
    other[int(r.order[-1])] = True  # another floor: another ranking
    assert not torch.equal(rank_with_floor(scores, other, bounds, layer_cost=cost).order, r.order)
    with pytest.raises(ValueError, match="bool mask"):
        rank_with_floor(scores, floor_mask(r)[:-1], bounds)
