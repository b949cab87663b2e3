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
    if layer_cost is not None and len(layer_cost) != len(layer_bounds):
        raise ValueError("layer_cost needs one coefficient per prunable layer")
    covered = sum(b - a for a, b in layer_bounds)
    if covered != n:
        raise ValueError(f"layer bounds cover {covered} weights, scores have {n}")

    scores = scores.detach().to(torch.float64).clone()
    mags = magnitudes.detach().abs().to(torch.float64)
    if layer_cost is not None:
        for (a, b), c in zip(layer_bounds, layer_cost):
            if c <= 0:
                raise ValueError(f"layer cost coefficients must be positive, got {c}")
            scores[a:b] /= c

    in_floor = torch.zeros(n, dtype=torch.bool)
    for a, b in layer_bounds:
        k = math.ceil(floor * (b - a))
        if k == 0:
            continue
        # Top-k by magnitude with ties broken by lower index: stable descending sort.
        top = torch.sort(mags[a:b], descending=True, stable=True).indices[:k]
        in_floor[a + top] = True

    by_score = torch.sort(scores, descending=True, stable=True).indices
    keep_first = in_floor[by_score]
    order = torch.cat([by_score[keep_first], by_score[~keep_first]])
    return Ranking(order=order.to(torch.int64), floor_count=int(in_floor.sum()))


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
