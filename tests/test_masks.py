"""prfl.masks: cached mask positions give the same values as bool-mask indexing."""

from __future__ import annotations

import gc

import pytest
import torch

from prfl import masks


def test_positions_are_cached_per_object_and_version():
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(1000, generator=g) < 0.3
    assert masks.cached_positions(mask) is None
    pos = masks.positions(mask)
    assert torch.equal(pos, mask.nonzero().view(-1)) and pos.dtype == torch.int64
    assert masks.positions(mask) is pos and masks.count(mask) == int(mask.sum())
    mask[0] = not bool(mask[0])  # an in-place edit: looked up again
    assert masks.cached_positions(mask) is None
    assert torch.equal(masks.positions(mask), mask.nonzero().view(-1))
    twin = mask.clone()  # equal content, another object: not shared
    assert masks.cached_positions(twin) is None


def test_cache_entry_goes_with_its_mask():
    mask = torch.ones(10, dtype=torch.bool)
    masks.positions(mask)
    key = id(mask)
    assert key in masks._CACHE
    del mask
    gc.collect()
    assert key not in masks._CACHE


@pytest.mark.parametrize("cached", [True, False])
def test_select_and_scatter_match_bool_indexing(cached):
    g = torch.Generator().manual_seed(1)
    mask = torch.rand(5000, generator=g) < 0.4
    w = torch.randn(5000, generator=g)
    w[::7] = -0.0
    if cached:
        masks.positions(mask)
    vals = masks.select(w, mask)
    assert torch.equal(vals, w[mask])
    assert torch.equal(torch.signbit(vals), torch.signbit(w[mask]))  # the values themselves, -0.0 kept
    out = torch.full((5000,), 9.0)
    masks.scatter_into(out, mask, vals)
    ref = torch.zeros(5000).masked_scatter_(mask, vals)
    assert torch.equal(out, ref) and torch.equal(torch.signbit(out), torch.signbit(ref))


def test_positions_refuse_a_non_bool_mask():
    with pytest.raises(ValueError, match="1-D bool"):
        masks.positions(torch.ones(4))
