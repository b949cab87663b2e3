"""The full aggregation of :class:`~prfl.buffer.ClientBuffer` over its slots
(:class:`FullAggregation`): staleness weights re-aged to the current round or frozen on arrival,
MaskFedAvg (per ranking in rank space for prefix slots), the robust rules of :mod:`prfl.robust`,
and the plain n_i-weighted average."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from prfl.aggregation import (
    ACCUMULATE_DTYPE, finish_masked, mask_fedavg, staleness_weight, weighted_average,
)
from prfl.buffer.arena import VALUE_DTYPE as _DTYPE
from prfl.buffer.arena import SlotArena
from prfl.buffer.slots import SlotStore, _blocked_add, _Slot
from prfl.robust import check_method, clip_updates, coordinate_median, holders, trimmed_mean

STALENESS_MODES: tuple[str, ...] = ("frozen", "reaged")


class FullAggregation(SlotStore):
    """Aggregation over every slot, in ascending client order. A part of
    :class:`~prfl.buffer.ClientBuffer` (a mixin on its state)."""

    def staleness_weights(
        self, now_round: int, kind: str = "poly", a: float = 0.6, b: float = 2.0, mode: str = "reaged"
    ) -> dict[int, float]:
        """p_i = s_i / sum_j s_j over occupied slots: s_i = staleness_weight(kind, now_round - n'_i)
        (``mode`` = "reaged") or staleness_weight(kind, a_i - n'_i), a_i the arrival round ("frozen")."""
        if not self._slots:
            raise ValueError("the buffer is empty; put at least one client model first")
        if mode not in STALENESS_MODES:
            raise ValueError(f"staleness mode must be one of {', '.join(STALENESS_MODES)}, got {mode!r}")
        s: dict[int, float] = {}
        for c in self.clients():
            slot = self._slots[c]
            tau = (now_round if mode == "reaged" else slot.arrival_round) - slot.sent_round
            if tau < 0:
                raise ValueError(f"client {c} was sent at round {slot.sent_round}, after now_round={now_round}")
            s[c] = staleness_weight(kind, tau, a, b)
        total = math.fsum(s.values())
        return {c: v / total for c, v in s.items()}

    def coefficients(
        self, now_round: int, kind: str = "poly", a: float = 0.6, b: float = 2.0, mode: str = "reaged"
    ) -> dict[int, float]:
        """Aggregation coefficients c_i = p_i n_i."""
        p = self.staleness_weights(now_round, kind, a, b, mode)
        return {c: p[c] * self._slots[c].num_samples for c in p}

    def aggregate(
        self,
        prev: torch.Tensor,
        now_round: int,
        kind: str = "poly",
        a: float = 0.6,
        b: float = 2.0,
        eta_g: float = 1.0,
        masked: bool = True,
        accumulate_dtype: torch.dtype = ACCUMULATE_DTYPE,
        robust: str = "none",
        trim: float = 0.1,
        clip_norm: float | None = None,
        staleness_mode: str = "reaged",
    ) -> torch.Tensor:
        """MaskFedAvg over the whole buffer with c_i = p_i n_i; a new tensor of ``prev``'s dtype.
        The staleness s_i in p_i is re-aged to ``now_round`` or frozen on arrival (``staleness_mode``).

        masked (the PR-FL rule; equals :func:`prfl.aggregation.mask_fedavg` on the same inputs):
            W_acc = sum_i c_i (W_i ⊙ m_i),  M_acc = sum_i c_i m_i,  W_new = W_acc / M_acc on the prefix,
            keeping ``prev`` where M_acc == 0 or the holders' sum is zero (decided on the terms:
            prfl.aggregation); suffix: sum_i c_i W_i / sum_i c_i;
            then W = (1 - eta_g) prev + eta_g W_new.
        masked=False (ablation; equals :func:`prfl.aggregation.weighted_average`):
            W_new = sum_i c_i W_i / sum_i c_i on the whole vector, then the same server step.
        Accumulates slot by slot into W_acc and M_acc (in ``accumulate_dtype``, like
        prfl.aggregation), so a sparse buffer is never densified all at once.

        robust (see :mod:`prfl.robust`; clients with c_i = 0 take no part; with masked=False every
        client counts as holding every weight):
            ``clip``: W_i' = W_prev + (W_i - W_prev) min(1, clip_norm / ||W_i - W_prev||_held),
            then the rule above; ``trimmed_mean``: per weight, drop the floor(trim h) highest
            and lowest of its h holders and average the rest with weights c_i; ``median``: the
            median over its holders. A weight with no holder keeps ``prev``. These stack the
            buffer into one (K, total) tensor.
        """
        if prev.dim() != 1 or prev.numel() != self.total or not prev.is_floating_point():
            raise ValueError(
                f"prev must be flat floating-point weights of length {self.total}, got {prev.dtype} {tuple(prev.shape)}"
            )
        if not (math.isfinite(eta_g) and eta_g > 0):
            raise ValueError(f"eta_g must be a finite number > 0, got {eta_g!r}")
        coeffs = self.coefficients(now_round, kind, a, b, staleness_mode)
        total_c = sum(coeffs.values())
        if not total_c > 0:
            raise ValueError("every buffered client has num_samples == 0; nothing to average")
        check_method(robust, trim, clip_norm)
        try:
            if robust != "none":
                return self._robust(prev, coeffs, eta_g, masked, accumulate_dtype, robust, trim, clip_norm)
            if masked:
                return self._mask_fedavg(prev, coeffs, total_c, eta_g, accumulate_dtype)
            new = self._weighted_sum(coeffs, accumulate_dtype).div_(total_c).to(prev.dtype)
            return new if eta_g == 1.0 else torch.lerp(prev, new, eta_g)
        finally:
            self._release_all()

    def stacked(self, clients: list[int] | None = None) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """The models of ``clients`` (default: every occupied slot, ascending) as one (K, total)
        fp32 tensor (W_i ⊙ m_i rows), with their masks."""
        ids = self.clients() if clients is None else clients
        rows = torch.empty(len(ids), self.total, dtype=_DTYPE)
        masks: list[torch.Tensor | None] = []
        for r, c in enumerate(ids):
            slot = self._slots[c]
            if slot.index is None and slot.order_key is None:
                rows[r].copy_(slot.values)
                masks.append(slot.mask)
            else:
                self._densify_into(slot, rows[r])
                if self._arena is not None:
                    self._arena.release(slot.values)
                masks.append(self._slot_mask(slot))
        return rows, masks

    def _robust(
        self, prev: torch.Tensor, coeffs: dict[int, float], eta_g: float, masked: bool, dtype: torch.dtype,
        method: str, trim: float, clip_norm: float | None,
    ) -> torch.Tensor:
        """The robust rules of :meth:`aggregate` over the clients with c_i > 0."""
        ids = [c for c, v in coeffs.items() if v > 0]
        cs = [coeffs[c] for c in ids]
        rows, masks = self.stacked(ids)
        if not masked:
            masks = [None] * len(ids)
        held = holders(masks, self.num_prunable, self.total)
        if method == "clip":
            assert clip_norm is not None
            clipped, _ = clip_updates(rows, prev, held, clip_norm)
            if masked:
                return mask_fedavg(prev, list(clipped), masks, cs, self.num_prunable, eta_g, dtype)
            new = weighted_average(list(clipped), cs, dtype).to(prev.dtype)
        elif method == "trimmed_mean":
            new = trimmed_mean(rows, held, prev, trim, cs)
        else:
            new = coordinate_median(rows, held, prev)
        return new if eta_g == 1.0 else torch.lerp(prev, new, eta_g)

    def plain_average(
        self, accumulate_dtype: torch.dtype = ACCUMULATE_DTYPE, coefficients: dict[int, float] | None = None
    ) -> torch.Tensor:
        """The weighted average of the buffered models as they are held, sum_i c_i W_i / sum_i c_i
        (masks ignored: a weight a client did not keep counts as its zero): PR-FL's server score
        model. c_i = n_i by default; weighting by n_i, like every average in FedAvg-style training,
        keeps a client with little data from counting as much as a big one. ``coefficients`` (one
        per buffered client, e.g. :meth:`coefficients`' s_i n_i) replaces them."""
        if not self._slots:
            raise ValueError("the buffer is empty; put at least one client model first")
        if coefficients is None:
            coeffs = {c: float(s.num_samples) for c, s in sorted(self._slots.items())}
        else:
            if sorted(coefficients) != self.clients():
                raise ValueError(f"coefficients must name exactly the buffered clients {self.clients()}, "
                                 f"got {sorted(coefficients)}")
            bad = {c: v for c, v in coefficients.items() if not (math.isfinite(v) and v >= 0)}
            if bad:
                raise ValueError(f"coefficients must be finite and non-negative, got {bad}")
            coeffs = {c: float(coefficients[c]) for c in sorted(coefficients)}
        total_c = sum(coeffs.values())
        if not total_c > 0:
            raise ValueError("every buffered client has a zero coefficient (num_samples == 0?); nothing to average")
        try:
            return self._weighted_sum(coeffs, accumulate_dtype).div_(total_c).to(_DTYPE)
        finally:
            self._release_all()

    def _weighted_sum(self, coeffs: dict[int, float], dtype: torch.dtype) -> torch.Tensor:
        """sum_i c_i W_i over the slots in ``coeffs``, accumulated in ``dtype``."""
        acc = torch.zeros(self.total, dtype=dtype)
        npr = self.num_prunable
        if self.storage == "sparse":
            scratch = torch.empty(self.total, dtype=_DTYPE)
            for c, coef in coeffs.items():
                if coef != 0.0:
                    slot = self._slots[c]
                    acc.add_(slot.values if slot.index is None else self._densify_into(slot, scratch), alpha=coef)
            return acc
        groups: dict[int, list[tuple[float, _Slot]]] = {}  # prefix storage: slots by ranking, summed in rank space
        dense = [(coef, slot.values) for coef, slot in self._live_slots(coeffs, groups, acc[npr:])]
        _blocked_add(acc, dense, self._arena)
        for key, members in groups.items():
            self._add_prefix_group(self._orders[key], members, acc[:npr], None, dtype, self._arena)
        return acc

    def _live_slots(self, coeffs: dict[int, float], groups: dict[int, list[tuple[float, _Slot]]],
                    suffix: torch.Tensor) -> Iterator[tuple[float, _Slot]]:
        """The slots of ``coeffs`` with a non-zero coefficient, in order. A prefix-stored slot is not
        yielded: it is filed under its ranking in ``groups`` (summed in rank space later) and its
        dense suffix is added to ``suffix`` here, in the same order as the caller's own adds."""
        for c, coef in coeffs.items():
            if coef == 0.0:
                continue
            slot = self._slots[c]
            if slot.order_key is not None:
                groups.setdefault(slot.order_key, []).append((coef, slot))
                suffix.add_(slot.values[slot.count :], alpha=coef)
                continue
            yield coef, slot

    def _mask_fedavg(
        self, prev: torch.Tensor, coeffs: dict[int, float], total_c: float, eta_g: float, dtype: torch.dtype
    ) -> torch.Tensor:
        """MaskFedAvg accumulation, in the operation order of prfl.aggregation.mask_fedavg (so the
        results agree bit for bit)."""
        npr = self.num_prunable
        w_acc = torch.zeros(npr, dtype=dtype)
        m_acc = torch.zeros(npr, dtype=dtype)
        s_acc = torch.zeros(self.total - npr, dtype=dtype)
        dense_total = 0.0  # coefficient mass of dense clients, added to m_acc once at the end
        groups: dict[int, list[tuple[float, _Slot]]] = {}  # prefix storage: slots by ranking
        terms: list[tuple[float, torch.Tensor]] = []  # dense storage: W_i ⊙ m_i, summed block by block
        masks: list[torch.Tensor | None] = []
        buf = torch.empty(npr, dtype=dtype) if self.storage == "sparse" else None  # m_i, then W_i ⊙ m_i
        for coef, slot in self._live_slots(coeffs, groups, s_acc):
            if slot.mask is None and slot.index is None:
                dense_total += coef
            if buf is None:  # the slot holds W ⊙ m (see _make_slot)
                terms.append((coef, slot.values[:npr]))
                masks.append(slot.mask)
            elif slot.index is not None:  # sparse storage, masked client: scatter its kept values
                mask = slot.index.to_mask()
                cnt = slot.index.count
                m_acc.add_(buf.copy_(mask), alpha=coef)
                w_acc.add_(buf.zero_().masked_scatter_(mask, slot.values[:cnt].to(dtype)), alpha=coef)
                s_acc.add_(slot.values[cnt:], alpha=coef)
                continue
            else:
                w_acc.add_(slot.values[:npr], alpha=coef)
            s_acc.add_(slot.values[npr:], alpha=coef)
        _blocked_add(w_acc, terms, self._arena, m_acc, masks)
        for key, members in groups.items():
            self._add_prefix_group(self._orders[key], members, w_acc, m_acc, dtype, self._arena)
        if dense_total:
            m_acc.add_(dense_total)
        live = [c for c, v in coeffs.items() if v != 0.0]
        new = torch.empty_like(prev)
        finish_masked(new[:npr], prev[:npr], w_acc, m_acc, lambda pos: self._exact_at(pos, coeffs),
                      wmax=max((self._slots[c].amax for c in live), default=0.0), n_terms=len(live),
                      min_coef=min(coeffs[c] for c in live), eta_g=eta_g)
        tail = s_acc.div_(total_c)
        if eta_g != 1.0:
            tail = torch.lerp(prev[npr:].to(dtype), tail, eta_g)
        new[npr:] = tail
        return new

    @staticmethod
    def _add_prefix_group(
        order: torch.Tensor, members: list[tuple[float, _Slot]], w_acc: torch.Tensor, m_acc: torch.Tensor | None,
        dtype: torch.dtype, arena: SlotArena | None = None,
    ) -> None:
        """Add the slots of one ranking to W_acc (and M_acc unless None), working in rank space:
        O(sum_i count_i + top) instead of a dense vector per slot."""
        top = max(slot.count for _, slot in members)
        if top == 0:
            return
        acc = torch.zeros(top, dtype=dtype)
        steps = torch.zeros(top + 1, dtype=dtype)  # M in rank space: + c_i at rank 0, - c_i at rank count_i
        for coef, slot in members:
            steps[0] += coef
            steps[slot.count] -= coef
        _blocked_add(acc, [(coef, slot.values[: slot.count]) for coef, slot in members], arena)
        if arena is not None:
            for _, slot in members:
                arena.release(slot.values)  # the suffix too
        positions = order[:top]
        w_acc.index_add_(0, positions, acc)
        if m_acc is not None:
            m_acc.index_add_(0, positions, torch.cumsum(steps[:top], 0))
