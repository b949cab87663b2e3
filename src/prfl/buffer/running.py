"""MaskFedAvg from running sums (:class:`RunningAggregation`, frozen staleness; the sums are
:class:`prfl.incremental.RunningMaskFedAvg`): each slot's contribution c_i = s(a_i - n'_i) n_i, and
the sums' exact recomputation from the slots."""

from __future__ import annotations

import math
import weakref

import numpy as np
import torch

from prfl.aggregation import ExactTerms, finish_masked
from prfl.buffer.slots import SlotStore, _blocked_add, _Slot, order_dtype
from prfl.incremental import Contribution

# aggregate_running recomputes only the positions masked arrivals touched while they are at most
# this share of the prunable weights: a mask spread over the model touches most cache lines of the
# model-sized sums already at ~10 % density, so beyond that one streaming pass costs no more
PARTIAL_FRACTION = 1 / 16
# a dense-storage slot whose mask keeps more than this share of the prunable weights enters the
# running sums as a whole vector (streamed block by block) rather than by index operations
STREAM_FRACTION = 1 / 4


class RunningAggregation(SlotStore):
    """The running sums' side of :class:`~prfl.buffer.ClientBuffer` (a mixin on its state)."""

    recompute_every: int
    _since_recompute: int
    _last_output: weakref.ref[torch.Tensor] | None

    def aggregate_running(self, prev: torch.Tensor, eta_g: float = 1.0, masked: bool = True) -> torch.Tensor:
        """MaskFedAvg from the running sums (needs ``frozen=``): with c_i = s(a_i - n'_i) n_i fixed
        on arrival, the rule of :meth:`aggregate` with ``staleness_mode="frozen"`` (equal up to
        rounding and the sums' drift, see :mod:`prfl.incremental`); a new tensor of ``prev``'s dtype.

        One pass over the N weights, independent of the number of buffered clients; after masked
        arrivals that touched at most PARTIAL_FRACTION of them, only those positions are
        recomputed (the rest is ``prev``, which must then be the tensor this method returned last,
        computed with eta_g = 1; otherwise, and after a dense arrival, a recomputation of the
        sums, eta_g != 1 or masked=False, every position is)."""
        if self._running is None:
            raise ValueError("aggregate_running needs running sums: build the buffer with frozen=Staleness(...)")
        if not self._slots:
            raise ValueError("the buffer is empty; put at least one client model first")
        if prev.dim() != 1 or prev.numel() != self.total or not prev.is_floating_point():
            raise ValueError(f"prev must be flat floating-point weights of length {self.total}, "
                             f"got {prev.dtype} {tuple(prev.shape)}")
        if not (math.isfinite(eta_g) and eta_g > 0):
            raise ValueError(f"eta_g must be a finite number > 0, got {eta_g!r}")
        if self._since_recompute >= max(self.recompute_every, 2 * len(self._slots)):
            self._recompute()
        run, npr = self._running, self.num_prunable
        live = [s for _, s in sorted(self._slots.items()) if s.coef != 0.0]
        total_c = math.fsum(s.coef for s in live)
        if not total_c > 0:
            raise ValueError("every buffered client has num_samples == 0; nothing to average")
        dense = [s.coef for s in live if s.mask is None and s.index is None and s.order_key is None]
        touched = run.take_touched(int(npr * PARTIAL_FRACTION))
        last = None if self._last_output is None else self._last_output()
        partial = touched is not None and masked and eta_g == 1.0 and last is prev
        new = prev.clone() if partial else torch.empty_like(prev)
        if masked:
            fused = run.pending and not partial
            if not fused:
                run.flush()
            finish_masked(
                new[:npr], prev[:npr], run.w, run.m if len(dense) < len(live) else None, self._exact_running,
                wmax=max(s.amax for s in live), n_terms=len(live), min_coef=min(s.coef for s in live),
                dense_c=math.fsum(dense), holders=run.h, dense_h=len(dense), drift=run.drift_bound(), eta_g=eta_g,
                positions=touched if partial else None, before_block=run.flush_block if fused else None,
            )
            run.clear_pending()
        else:
            run.flush()
            head = run.w / total_c
            new[:npr] = head if eta_g == 1.0 else torch.lerp(prev[:npr].to(torch.float64), head, eta_g)
        tail = run.s / total_c
        new[npr:] = tail if eta_g == 1.0 else torch.lerp(prev[npr:].to(torch.float64), tail, eta_g)
        # the positions a later masked arrival leaves alone keep this output: valid only if it is W_new itself
        self._last_output = weakref.ref(new) if masked and eta_g == 1.0 else None
        return new

    def _recompute(self) -> None:
        """The running sums afresh from the slots, in ascending client order (no drift). Prefix
        slots are summed per ranking in rank space, as the full aggregation sums them: O(sum of
        their counts + rankings x N) rather than an index operation per slot."""
        run = self._running
        assert run is not None
        run.reset()
        groups: dict[int, list[_Slot]] = {}
        items: list[tuple[Contribution, int]] = []
        for c in self.clients():
            slot = self._slots[c]
            if slot.order_key is not None and slot.coef != 0.0:
                groups.setdefault(slot.order_key, []).append(slot)
            else:
                items.append((self._contribution(slot), 1))
                self._release(slot)
        run.apply(items)
        for key, members in groups.items():
            top = max(slot.count for slot in members)
            w_rank = torch.zeros(top, dtype=torch.float64)
            m_steps = torch.zeros(top + 1, dtype=torch.float64)  # + c_i at rank 0, - c_i at rank count_i
            h_steps = torch.zeros(top + 1, dtype=torch.int64)
            suffix = torch.zeros(self.total - self.num_prunable, dtype=torch.float64)
            for slot in members:
                m_steps[0] += slot.coef
                m_steps[slot.count] -= slot.coef
                h_steps[0] += 1
                h_steps[slot.count] -= 1
                suffix.add_(slot.values[slot.count :], alpha=slot.coef)
            _blocked_add(w_rank, [(slot.coef, slot.values[: slot.count]) for slot in members], self._arena)
            for slot in members:
                self._release(slot)
            run.add_ranked(self._orders[key][:top], w_rank, torch.cumsum(m_steps[:top], 0),
                           torch.cumsum(h_steps[:top], 0), suffix, len(members),
                           math.fsum(slot.coef * slot.amax for slot in members))
        self._since_recompute = 0

    def _contribution(self, slot: _Slot) -> Contribution:
        """A slot's share of the running sums (prfl.incremental.Contribution)."""
        npr = self.num_prunable
        positions: torch.Tensor | None
        if slot.order_key is not None:  # prefix storage: kept values in ranking order, applied in position order
            perm, positions = self._ascending(slot.order_key, slot.count)
            values, suffix = slot.values[: slot.count][perm], slot.values[slot.count :]
        elif slot.index is not None:  # sparse storage: kept values in ascending position order
            positions = slot.index.positions()
            values, suffix = slot.values[: slot.index.count], slot.values[slot.index.count :]
        elif slot.mask is not None:  # dense storage, masked: W ⊙ m, by positions if they are few
            positions = slot.positions if slot.positions is not None else slot.mask.nonzero().view(-1)
            if positions.numel() > npr * STREAM_FRACTION:  # streaming the whole vector is cheaper
                return Contribution(slot.coef, slot.values[:npr], None, slot.values[npr:], slot.amax, slot.mask)
            values, suffix = slot.values[:npr].index_select(0, positions), slot.values[npr:]
        else:  # a dense client
            positions, values, suffix = None, slot.values[:npr], slot.values[npr:]
        return Contribution(slot.coef, values, positions, suffix, slot.amax)

    def _ascending(self, key: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(perm, positions): the first ``count`` ranks of ranking ``key`` in ascending position
        order (positions = order[:count][perm]; int32 where they fit), shared by the slots of one
        ranking and density (at most 8 such pairs are kept).
        Index operations on the model-sized sums run several times faster in ascending order."""
        order = self._orders[key]
        hit = self._ascending_cache.get((key, count))
        if hit is not None and hit[0] is order:
            return hit[1], hit[2]
        if len(self._ascending_cache) >= 8:  # old rankings and densities: keep the cache small
            self._ascending_cache = {k: v for k, v in self._ascending_cache.items() if k[0] in self._orders}
            while len(self._ascending_cache) >= 8:
                del self._ascending_cache[next(iter(self._ascending_cache))]
        small = order_dtype(self.num_prunable)
        perm = torch.from_numpy(np.argsort(order[:count].numpy(), kind="stable")).to(small)
        positions = order[:count][perm].to(small)
        self._ascending_cache[(key, count)] = (order, perm, positions)
        return perm, positions

    def _exact_running(self, positions: torch.Tensor) -> ExactTerms:
        return self._exact_at(positions, {c: s.coef for c, s in sorted(self._slots.items())})
