"""Incremental MaskFedAvg: running float64 sums over a buffer whose coefficients are fixed on entry.

With staleness frozen when an update arrives (PR-FL's reference rule), client i's coefficient
c_i = s(tau_i) n_i no longer changes while its update sits in the buffer, so the sums

    W_acc = sum_i c_i (W_i ⊙ m_i),   M_acc = sum_i c_i m_i,   h = sum_i [c_i > 0] m_i,
    S_acc = sum_i c_i W_i (suffix),  C = sum_i c_i

can be kept up to date: an arrival subtracts its client's old contribution and adds the new one,
O(|m_old| + |m_new|) index operations for a masked client and O(N) for a dense one, whatever the
number of buffered clients. The normalisation p_i = s_i / sum_j s_j of the full rule cancels in
W_acc / M_acc and S_acc / C, so c_i stays unnormalised. Dense clients (no mask) enter M_acc and h
as one scalar each (their coefficient total and count), summed afresh from the slots. The server
model W_acc / M_acc is then one streaming pass over the N weights (or, after masked arrivals that
touched few of them, a pass over those alone: see prfl.buffer.PARTIAL_FRACTION); the full rule
would instead add up every buffered model at every step.

Drift. Float64 sums that are added to and subtracted from drift away from the sum of their
current terms: every operation rounds, and the rounding of a term that was added and later
removed stays behind. Each operation on W_acc[k] errs by at most u |partial sum| (u = 2^-53), and
every partial sum is bounded by the magnitudes applied since the sums were last recomputed, so

    |W_acc[k] - sum_i c_i W_i[k] m_i[k]| <= ops u B,    B = sum over the applied terms of c_j max|W_j|,

with ops = the contributions applied since then (the slots at the recomputation plus two per
arrival); likewise for M_acc with the c_j. :meth:`RunningMaskFedAvg.drift_bound` returns 2 ops u B
(a factor 2 for the (1 + u) terms). The buffer recomputes the sums exactly from its slots every
K = max(``recompute_every``, 2 x slots) arrivals (default ``recompute_every`` = 1,000, so the
recomputation, one contribution per slot, costs at most half an arrival's work per arrival) and
at every checkpoint; then ops <= slots + 2K <= 2.5 K and the bound is 5 K u B, about 6e-13 B for
K = 1,000: for a weight whose holders' values are of the size of the largest weight, a relative
error of 1e-12, far below float32's 6e-8. The holder counts h are integers and exact: "nobody
holds this weight" never depends on rounding.

The zero rule (prfl.aggregation): where a running W_acc lies within its error bound of zero, the
weight's holders' sum is formed again from the buffered terms (:func:`prfl.aggregation.exact_terms`)
and decided exactly as the full computation decides it, so drift cannot turn an exact zero into a
tiny weight or the reverse.
"""

from __future__ import annotations

import torch

from prfl.aggregation import UNIT_ROUNDOFF

DEFAULT_RECOMPUTE_EVERY = 1000
BLOCK = 1 << 16  # weights of W_acc per block of the dense sums

Contribution = tuple[float, torch.Tensor, "torch.Tensor | None", torch.Tensor, float]
"""(c_i, prefix values, their positions or None for all N, suffix values, max |W_i|): a client's
share of the sums: W_i ⊙ m_i (all N values for a dense client, else the kept values at the
given distinct positions) and its suffix."""


def holder_dtype(max_holders: int) -> torch.dtype:
    """The smallest signed integer dtype that counts ``max_holders`` holders."""
    return torch.int16 if max_holders <= torch.iinfo(torch.int16).max else torch.int32


class RunningMaskFedAvg:
    """The running sums of MaskFedAvg over the prunable prefix (``num_prunable`` weights) and the
    suffix, and which prefix positions changed since the last :meth:`take_touched`."""

    def __init__(self, num_prunable: int, total: int, max_holders: int) -> None:
        self.num_prunable = int(num_prunable)
        self.total = int(total)
        self.w = torch.zeros(self.num_prunable, dtype=torch.float64)
        self.m = torch.zeros(self.num_prunable, dtype=torch.float64)
        self.h = torch.zeros(self.num_prunable, dtype=holder_dtype(max_holders))
        self.s = torch.zeros(self.total - self.num_prunable, dtype=torch.float64)
        self.ops = 0  # contributions applied since the last reset
        self.magnitude = 0.0  # B: sum of c_j max|W_j| over them
        self._touched: list[torch.Tensor] | None = []  # None: every position (a dense contribution)

    def reset(self) -> None:
        """Zero the sums (before an exact recomputation); every position counts as touched."""
        self.w.zero_()
        self.m.zero_()
        self.h.zero_()
        self.s.zero_()
        self.ops = 0
        self.magnitude = 0.0
        self._touched = None

    def apply(self, items: list[tuple[Contribution, int]]) -> None:
        """Add (sign 1) or remove (-1) client contributions. The dense ones are summed block by
        block (each block of W_acc stays in cache while every dense term is added to it)."""
        dense: list[tuple[float, torch.Tensor]] = []
        for (coef, values, positions, suffix, amax), sign in items:
            if coef == 0.0:
                continue
            c = sign * coef
            if positions is None:
                dense.append((c, values))
                self._touched = None
            elif positions.numel():
                self.w.index_add_(0, positions, values.to(torch.float64), alpha=c)
                n = int(positions.numel())
                self.m.index_add_(0, positions, torch.ones(1, dtype=torch.float64).expand(n), alpha=c)
                self.h.index_add_(0, positions, torch.ones(1, dtype=self.h.dtype).expand(n), alpha=sign)
                if self._touched is not None:
                    self._touched.append(positions)
            if self.s.numel():
                self.s.add_(suffix, alpha=c)
            self.ops += 1
            self.magnitude += coef * amax
        if dense:
            for a in range(0, self.num_prunable, BLOCK):
                part = self.w[a : a + BLOCK]
                for c, values in dense:
                    part.add_(values[a : a + BLOCK], alpha=c)

    def add_ranked(
        self, positions: torch.Tensor, w_rank: torch.Tensor, m_rank: torch.Tensor, h_rank: torch.Tensor,
        suffix: torch.Tensor, terms: int, magnitude: float,
    ) -> None:
        """Add ``terms`` contributions already summed in rank space (the slots of one ranking):
        W_acc[positions] += w_rank, M_acc[positions] += m_rank, h[positions] += h_rank, and the
        suffix sum; ``magnitude`` = their sum of c_j max|W_j|."""
        self.w.index_add_(0, positions, w_rank)
        self.m.index_add_(0, positions, m_rank)
        self.h.index_add_(0, positions, h_rank.to(self.h.dtype))
        if self.s.numel():
            self.s.add_(suffix)
        self.ops += terms
        self.magnitude += magnitude
        self._touched = None

    def drift_bound(self) -> float:
        """2 ops u B: a bound on |W_acc[k] - its current terms' sum| for every k (module docstring)."""
        return 2.0 * self.ops * UNIT_ROUNDOFF * self.magnitude

    def take_touched(self, limit: int) -> torch.Tensor | None:
        """The prefix positions changed since the last call (may repeat), or None when every
        position changed or more than ``limit`` did; clears the record."""
        touched, self._touched = self._touched, []
        if touched is None or sum(int(t.numel()) for t in touched) > limit:
            return None
        if not touched:
            return torch.zeros(0, dtype=torch.int64)
        return torch.cat([t.to(torch.int64) for t in touched])

    def nbytes(self) -> int:
        """Bytes of the sums: 8 N (W_acc) + 8 N (M_acc) + 2 or 4 N (h) + 8 x suffix."""
        return sum(t.numel() * t.element_size() for t in (self.w, self.m, self.h, self.s))
