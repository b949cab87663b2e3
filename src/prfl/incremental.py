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
touched few of them, a pass over those alone: see prfl.buffer.running.PARTIAL_FRACTION); the full rule
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

from typing import NamedTuple

import torch

from prfl.aggregation import UNIT_ROUNDOFF

DEFAULT_RECOMPUTE_EVERY = 1000
BLOCK = 1 << 16  # weights of W_acc per block of the dense sums

class Contribution(NamedTuple):
    """A client's share of the sums, c_i times:

    - ``positions`` given: its kept values W_i at those distinct prefix positions (``values``);
    - ``positions`` None: all N prefix values W_i ⊙ m_i (``values``), with ``mask`` its bool mask
      m_i, or None for a dense client (which enters M_acc and h as a scalar, see the buffer);

    and its suffix values. ``amax`` = max |W_i|."""

    coef: float
    values: torch.Tensor
    positions: torch.Tensor | None
    suffix: torch.Tensor
    amax: float
    mask: torch.Tensor | None = None


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
        # whole-vector terms (c, sign, values, mask) not yet added to the prefix sums: the next
        # read adds them block by block, in the same pass as it reads the sums (flush_block)
        self._pending: list[tuple[float, torch.Tensor, float, int, torch.Tensor | None]] = []  # (c, W, c_M, h, mask)

    def reset(self) -> None:
        """Zero the sums (before an exact recomputation); every position counts as touched."""
        self.w.zero_()
        self.m.zero_()
        self.h.zero_()
        self.s.zero_()
        self.ops = 0
        self.magnitude = 0.0
        self._touched = None
        self._pending = []

    def apply(self, items: list[tuple[Contribution, int]], defer: bool = False) -> None:
        """Add (sign 1) or remove (-1) client contributions. Those given by positions are applied
        with index operations; those given as whole prefix vectors are summed block by block
        (each block of the sums stays in cache while every such term is added to it), now, or with
        ``defer`` at the next read of the sums (:meth:`flush_block`, :meth:`flush`), which then
        reads and writes the model-sized sums once; deferred values must stay unchanged until then.

        A whole-vector term removed and one added with the same mask object (a client whose
        density and ranking did not change) share their mask's work: M_acc += (c_new - c_old) m,
        h unchanged."""
        streamed: list[tuple[float, torch.Tensor, float, int, torch.Tensor | None]] = []
        # a term given by positions that leaves and comes back at the same positions (the same
        # tensor) leaves the holder counts as they were: h - 1 + 1, integers, so both are skipped
        same_h = {i for i in range(len(items) - 1)
                  if items[i][1] == -1 and items[i + 1][1] == 1 and items[i][0].positions is not None
                  and items[i][0].positions is items[i + 1][0].positions and items[i][0].coef != 0.0
                  and items[i + 1][0].coef != 0.0}
        same_h |= {i + 1 for i in same_h}
        for i, ((coef, values, positions, suffix, amax, mask), sign) in enumerate(items):
            if coef == 0.0:
                continue
            c = sign * coef
            if positions is None:
                prior = streamed[-1] if streamed else None
                if (prior is not None and mask is not None and prior[4] is mask and prior[3] == -1 and sign == 1
                        and prior[2] == prior[0]):  # the same mask leaves and comes back
                    streamed[-1] = (prior[0], prior[1], 0.0, 0, None)
                    streamed.append((c, values, c + prior[0], 0, mask))
                else:
                    streamed.append((c, values, c, sign, mask))
                self._touched = None
            elif positions.numel():
                self.w.index_add_(0, positions, values.to(torch.float64), alpha=c)
                n = int(positions.numel())
                self.m.index_add_(0, positions, torch.ones(1, dtype=torch.float64).expand(n), alpha=c)
                if i not in same_h:
                    self.h.index_add_(0, positions, torch.ones(1, dtype=self.h.dtype).expand(n), alpha=sign)
                if self._touched is not None:
                    self._touched.append(positions)
            if self.s.numel():
                self.s.add_(suffix, alpha=c)
            self.ops += 1
            self.magnitude += coef * amax
        self._pending += streamed
        if not defer:
            self.flush()

    @property
    def pending(self) -> bool:
        """True while deferred terms wait to be added."""
        return bool(self._pending)

    def flush_block(self, a: int, b: int) -> None:
        """Add the deferred terms to positions [a, b) of the prefix sums (a caller reading every
        position block by block calls this for each block, then :meth:`clear_pending`)."""
        w, m, h = self.w[a:b], self.m[a:b], self.h[a:b]
        for c, values, c_m, sign, mask in self._pending:
            w.add_(values[a:b], alpha=c)
            if mask is not None:
                if c_m != 0.0:
                    m.add_(mask[a:b], alpha=c_m)
                if sign:
                    h.add_(mask[a:b], alpha=sign)

    def clear_pending(self) -> None:
        self._pending = []

    def flush(self) -> None:
        """Add every deferred term now."""
        if self._pending:
            for a in range(0, self.num_prunable, BLOCK):
                self.flush_block(a, a + BLOCK)
            self._pending = []

    def add_ranked(
        self, positions: torch.Tensor, w_rank: torch.Tensor, m_rank: torch.Tensor, h_rank: torch.Tensor,
        suffix: torch.Tensor, terms: int, magnitude: float,
    ) -> None:
        """Add ``terms`` contributions already summed in rank space (the slots of one ranking):
        W_acc[positions] += w_rank, M_acc[positions] += m_rank, h[positions] += h_rank, and the
        suffix sum; ``magnitude`` = their sum of c_j max|W_j|."""
        self.flush()
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
