"""Nested masks as prefixes of one ranking of the prunable weights.

Every layer first keeps its top ``floor`` fraction of weights by magnitude (so no layer dies);
the remaining weights follow, ordered by score (PR-FL: squared gradient, optionally divided by a
per-layer cost). The mask at density rho is the first ``ceil(rho * N)`` ranked weights, so masks
of lower density are subsets of masks of higher density, and the residual piece between two
densities is a contiguous slice of the ranking.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch


def kept_count(density: float, n: int) -> int:
    """``ceil(density * n)``, robust to float noise (0.3 * 100 is 30, not 31)."""
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density must lie in [0, 1], got {density}")
    return min(n, math.ceil(round(density * n, 6)))


@dataclass(frozen=True)
class Ranking:
    """A permutation of the prunable weights, most important first.

    ``order[k]`` is the index (into the prunable prefix) of the weight ranked k-th.
    ``floor_count`` is how many leading entries are the per-layer magnitude floor.
    """

    order: torch.Tensor
    floor_count: int = 0

    @property
    def size(self) -> int:
        return int(self.order.numel())

    def count(self, density: float) -> int:
        return kept_count(density, self.size)

    def indices(self, density: float) -> torch.Tensor:
        """Indices of the weights kept at ``density``."""
        return self.order[: self.count(density)]

    def mask(self, density: float) -> torch.Tensor:
        """Bool mask over the prunable weights at ``density`` (exactly ceil(rho*N) True)."""
        m = torch.zeros(self.size, dtype=torch.bool)
        m[self.indices(density)] = True
        return m

    def piece(self, low: float, high: float) -> torch.Tensor:
        """Indices of the residual piece (low, high]: ranks ceil(low*N) .. ceil(high*N)-1."""
        if low > high:
            raise ValueError(f"piece bounds out of order: ({low}, {high}]")
        return self.order[self.count(low) : self.count(high)]

    def pieces(self, densities: Sequence[float]) -> list[torch.Tensor]:
        """Residual pieces between the sorted distinct densities, starting from density 0."""
        levels = sorted(set(float(d) for d in densities))
        bounds = [0.0, *levels]
        return [self.piece(a, b) for a, b in zip(bounds[:-1], bounds[1:])]

    def rank_of(self) -> torch.Tensor:
        """Inverse permutation: rank of every weight (int64, length N)."""
        inv = torch.empty_like(self.order)
        inv[self.order] = torch.arange(self.size, dtype=self.order.dtype)
        return inv


def build_ranking(
    scores: torch.Tensor,
    magnitudes: torch.Tensor,
    layer_bounds: Sequence[tuple[int, int]],
    floor: float = 0.05,
    layer_cost: Sequence[float] | None = None,
) -> Ranking:
    """Rank prunable weights: per-layer magnitude floor first, then the rest by ``score / cost``.

    ``scores`` and ``magnitudes`` are length-N tensors over the prunable prefix; ``layer_bounds``
    gives each layer's ``(start, stop)``. Ties are broken by index, so the ranking is deterministic.
    """
    n = int(scores.numel())
    if magnitudes.numel() != n:
        raise ValueError(f"scores ({n}) and magnitudes ({magnitudes.numel()}) differ in length")
    if not 0.0 <= floor <= 1.0:
        raise ValueError(f"floor must lie in [0, 1], got {floor}")
    s_np = _ranked_scores(scores, layer_bounds, layer_cost)
    m_np = np.abs(_as_numpy(magnitudes))
    if np.isnan(m_np).any():
        raise ValueError("scores and magnitudes must not be NaN (check the importance statistics and the weights)")

    in_floor = np.zeros(n, dtype=bool)
    for a, b in layer_bounds:
        k = math.ceil(floor * (b - a))
        if k:
            in_floor[a:b] = _top_k_mask(m_np[a:b], k)
    order = _rank_descending(s_np, ~in_floor)
    return Ranking(order=torch.from_numpy(order), floor_count=int(in_floor.sum()))


def rank_with_floor(
    scores: torch.Tensor,
    in_floor: torch.Tensor,
    layer_bounds: Sequence[tuple[int, int]],
    layer_cost: Sequence[float] | None = None,
) -> Ranking:
    """The ranking :func:`build_ranking` makes from ``scores`` when its magnitude floor is the
    bool mask ``in_floor``: the same permutation, bit for bit. A checkpoint keeps the floor (one
    bit a weight) and the scores instead of the ranking (three or four bytes a weight)."""
    if in_floor.dtype != torch.bool or in_floor.numel() != scores.numel():
        raise ValueError(f"in_floor must be a bool mask of {scores.numel()} weights")
    s_np = _ranked_scores(scores, layer_bounds, layer_cost)
    floor = in_floor.reshape(-1).numpy()
    order = _rank_descending(s_np, ~floor)
    return Ranking(order=torch.from_numpy(order), floor_count=int(floor.sum()))


def floor_mask(ranking: Ranking) -> torch.Tensor:
    """The magnitude floor of ``ranking`` as a bool mask over the prunable weights."""
    m = torch.zeros(ranking.size, dtype=torch.bool)
    m[ranking.order[: ranking.floor_count]] = True
    return m


def _ranked_scores(scores: torch.Tensor, layer_bounds: Sequence[tuple[int, int]],
                   layer_cost: Sequence[float] | None) -> np.ndarray:
    """What the ranking sorts by: the scores, divided by their layer's cost (in float64) if
    given; checked for NaN."""
    n = int(scores.numel())
    if layer_cost is not None and len(layer_cost) != len(layer_bounds):
        raise ValueError("layer_cost needs one coefficient per prunable layer")
    covered = sum(b - a for a, b in layer_bounds)
    if covered != n:
        raise ValueError(f"layer bounds cover {covered} weights, scores have {n}")
    s_np = _as_numpy(scores)
    if layer_cost is not None:
        s_np = s_np.astype(np.float64)  # a copy: score / cost is taken in float64
        for (a, b), c in zip(layer_bounds, layer_cost):
            if c <= 0:
                raise ValueError(f"layer cost coefficients must be positive, got {c}")
            with np.errstate(over="ignore"):
                s_np[a:b] /= c
    if np.isnan(s_np).any():
        raise ValueError("scores and magnitudes must not be NaN (check the importance statistics and the weights)")
    return s_np


# The ranking is one sort of distinct 64-bit keys, several times faster than a stable argsort of
# float64 (numpy sorts integers with SIMD instructions where the CPU has them). The keys are
# distinct, so any correct sort gives the one order the rule defines, on every platform.
_SIGN64 = np.uint64(1 << 63)
_SIGN32 = np.uint32(1 << 31)


def _as_numpy(t: torch.Tensor) -> np.ndarray:
    """A flat float32 or float64 view (or exact copy) of a tensor's values."""
    t = t.detach().reshape(-1)
    if t.dtype not in (torch.float32, torch.float64):
        t = t.to(torch.float64 if t.dtype.is_floating_point and t.dtype.itemsize > 4 else torch.float32)
    return t.contiguous().numpy()


def _descending_keys(x: np.ndarray) -> np.ndarray:
    """Unsigned keys (uint32 for float32, uint64 for float64) whose ascending order is the
    descending order of ``x``; -0.0 and 0.0 get one key, NaN must be excluded by the caller."""
    utype, sign = (np.uint32, _SIGN32) if x.dtype == np.float32 else (np.uint64, _SIGN64)
    keys = (x + x.dtype.type(0.0)).view(utype)  # + 0.0 turns -0.0 into 0.0
    # ascending key: sign bit set on non-negative values, every bit flipped on negative ones; the
    # descending key is its complement: the low bits flipped on non-negative values, kept on negative ones
    flip = keys >> utype(8 * x.itemsize - 1)
    flip -= utype(1)  # all ones for non-negative values, 0 for negative ones
    flip &= ~sign
    keys ^= flip
    return keys


def _top_k_mask(values: np.ndarray, k: int) -> np.ndarray:
    """Bool mask of the ``k`` largest ``values``, ties broken by lower index: the first ``k``
    entries of a stable descending sort, found by selection in O(n)."""
    n = values.size
    if k >= n:
        return np.ones(n, dtype=bool)
    threshold = np.partition(values, n - k)[n - k]  # the k-th largest value
    out = values > threshold
    ties = np.flatnonzero(values == threshold)
    out[ties[: k - int(out.sum())]] = True
    return out


def _rank_descending(scores: np.ndarray, after: np.ndarray) -> np.ndarray:
    """Indices of ``scores`` ordered by (``after``, descending score, ascending index), the
    entries with ``after`` False first, as int64: one sort of packed uint64 keys with bit 63 =
    ``after``, the low b = bit length of (n - 1) bits = the index, and the score's key between.

    Scores that float32 holds exactly (squared gradients, magnitudes) fit whole: 32 + 31 bits.
    Other float64 scores (divided by a layer cost) keep the top 63 - b bits of their key; where
    two distinct scores share those (within a relative 2^-(51 - b) of each other), the run of
    equal truncated keys is re-sorted on the full keys, ties by index."""
    n = scores.size
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    idx_bits = max(1, int(n - 1).bit_length())
    if idx_bits > 31:
        raise ValueError(f"at most 2^31 weights can be ranked, got {n}")
    shift = np.uint64(idx_bits)
    if scores.dtype == np.float64:
        with np.errstate(over="ignore"):
            narrow = scores.astype(np.float32)
        if np.array_equal(narrow, scores):
            scores = narrow
    full = _descending_keys(scores)
    if full.dtype == np.uint32:
        key = full.astype(np.uint64) << shift
    else:
        key = (full >> np.uint64(idx_bits + 1)) << shift
    key |= np.arange(n, dtype=np.uint64)
    key |= after.astype(np.uint64) << np.uint64(63)
    key.sort()
    order = (key & ((np.uint64(1) << shift) - np.uint64(1))).astype(np.int64)
    if full.dtype == np.uint32:
        return order
    head = key >> shift
    same = head[1:] == head[:-1]
    if same.any():  # runs of equal truncated keys: sort each by its full keys (ties: by index)
        member = np.zeros(n, dtype=bool)
        member[1:] |= same
        member[:-1] |= same
        pos = np.flatnonzero(member)
        fk = full[order[pos]]
        starts = np.ones(pos.size, dtype=bool)  # where a member is not its predecessor's equal neighbour
        starts[1:] = (pos[1:] != pos[:-1] + 1) | ~same[pos[1:] - 1]
        if (fk[1:] < fk[:-1])[~starts[1:]].any():
            perm = np.lexsort((order[pos], fk, np.cumsum(starts)))
            order[pos] = order[pos][perm]
    return order


def magnitude_ranking(weights: torch.Tensor, layer_bounds: Sequence[tuple[int, int]], floor: float = 0.05) -> Ranking:
    """The ranking before any importance is known: by magnitude, with the same floor."""
    w = weights.detach().abs()
    return build_ranking(w, w, layer_bounds, floor=floor)


IMPORTANCE_BYTES = {"float32": 4, "bfloat16": 2}


def importance_for_upload(grad_sq: torch.Tensor, dtype: str = "float32") -> torch.Tensor:
    """Importance scores as they cross the network, returned as float32.

    ``float32`` sends them as they are. ``bfloat16`` halves the upload and keeps float32's range
    (squared gradients span many orders of magnitude, which half precision would flush to zero);
    only the mantissa is rounded, to 8 bits. The function is idempotent, so applying it on both
    ends of a link is harmless.
    """
    if dtype not in IMPORTANCE_BYTES:
        raise ValueError(f"importance dtype must be one of {sorted(IMPORTANCE_BYTES)}, got {dtype!r}")
    g = grad_sq.to(torch.float32)
    return g if dtype == "float32" else g.to(torch.bfloat16).to(torch.float32)
