"""Slot storage of :class:`~prfl.buffer.ClientBuffer` (:class:`SlotStore`): a slot per client in
the storage kind's form (dense, sparse or prefix; see :mod:`prfl.buffer`), the rankings prefix
slots share, the held copies of masks, and reading a slot back (whole, or at given positions).
"""

from __future__ import annotations

import hashlib
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from prfl.aggregation import ExactTerms, Staleness, blocks, exact_terms
from prfl.buffer.arena import VALUE_DTYPE as _DTYPE
from prfl.buffer.arena import SlotArena
from prfl.distribution import PackedIndex
from prfl.incremental import RunningMaskFedAvg

STORAGE_KINDS: tuple[str, ...] = ("dense", "sparse", "prefix")


@dataclass
class BufferEntry:
    """One client's latest model as handed out by :meth:`ClientBuffer.get`."""

    client: int
    weights: torch.Tensor
    mask: torch.Tensor | None
    num_samples: int
    sent_round: int


@dataclass
class _Slot:
    """Stored form of an entry. Dense: ``values`` = all weights, ``mask`` bool. Sparse: ``values`` =
    weights at the mask then the suffix, ``index`` = packed mask (both None for a dense client)."""

    values: torch.Tensor
    mask: torch.Tensor | None
    index: PackedIndex | None
    num_samples: int
    sent_round: int
    order_key: int | None = None  # prefix storage: the ranking (key into ClientBuffer._orders)
    count: int = 0  # prefix storage: how many leading ranks the mask keeps
    arrival_round: int = 0  # the server round at which the update arrived (>= sent_round)
    amax: float = 0.0  # max |W_i ⊙ m_i|: scales the zero rule's candidates
    coef: float = 0.0  # running sums only: c_i = s(arrival_round - sent_round) n_i, fixed on entry
    positions: torch.Tensor | None = None  # running sums, dense storage, masked: the mask's positions, ascending


class SlotStore:
    """The slots and what they share: building, installing and dropping slots, the held rankings
    (prefix storage) and masks, reading slots back. A part of :class:`~prfl.buffer.ClientBuffer`
    (a mixin: it works on the buffer's state, which ``ClientBuffer.__init__`` sets up)."""

    num_clients: int
    total: int
    num_prunable: int
    storage: str
    frozen: Staleness | None
    _slots: dict[int, _Slot]
    _orders: dict[int, torch.Tensor]
    _order_refs: dict[int, int]
    _order_alias: dict[int, tuple[weakref.ref[torch.Tensor], int]]
    _next_key: int
    _inverse_cache: dict[int, tuple[torch.Tensor, torch.Tensor]]
    _ascending_cache: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    _mask_cache: dict[int, list[Any]]
    _prefix_checked: dict[tuple[int, int, int], tuple[Any, int, Any, int]]
    _held_masks: dict[tuple[int, bytes], list[Any]]
    _rows: torch.Tensor | None
    _arena: SlotArena | None
    _running: RunningMaskFedAvg | None

    def _make_slot(
        self, client: int, weights: torch.Tensor, mask: torch.Tensor | None, num_samples: int, sent_round: int,
        order: torch.Tensor | None = None, arrival_round: int | None = None, zero_outside_mask: bool = False,
        take: bool = False,
    ) -> _Slot:
        """Validate an entry and build its stored form (no side effects but a new ranking key).
        ``take``: dense storage in memory may keep ``weights`` itself rather than a copy."""
        self._check_client(client)
        if weights.dim() != 1 or weights.numel() != self.total or not weights.is_floating_point():
            raise ValueError(
                f"client {client}: expected flat floating-point weights of length {self.total}, "
                f"got {weights.dtype} {tuple(weights.shape)}"
            )
        if mask is not None and (mask.dtype != torch.bool or mask.shape != (self.num_prunable,)):
            raise ValueError(
                f"client {client}: mask must be a bool tensor of shape ({self.num_prunable},), "
                f"got {mask.dtype} {tuple(mask.shape)}"
            )
        if isinstance(num_samples, bool) or int(num_samples) != num_samples or num_samples < 0:
            raise ValueError(f"client {client}: num_samples must be an integer >= 0, got {num_samples!r}")
        if isinstance(sent_round, bool) or int(sent_round) != sent_round or sent_round < 0:
            raise ValueError(f"client {client}: sent_round must be an integer >= 0, got {sent_round!r}")
        if arrival_round is None:
            arrival_round = sent_round
        if isinstance(arrival_round, bool) or int(arrival_round) != arrival_round or arrival_round < sent_round:
            raise ValueError(f"client {client}: arrival_round must be an integer >= sent_round={sent_round}, "
                             f"got {arrival_round!r}")
        w = weights.detach() if weights.dtype == _DTYPE else weights.detach().to(_DTYPE)
        n, r = int(num_samples), int(sent_round)
        head: torch.Tensor | None = None
        if mask is not None and order is not None:
            count = int(torch.count_nonzero(mask))
            npr = self.num_prunable
            if order.dtype not in (torch.int64, torch.int32) or order.dim() != 1 or not count <= order.numel() <= npr:
                raise ValueError(f"client {client}: order must be an int64 or int32 ranking (or a prefix of one at "
                                 f"least {count} long) of the {npr} prunable weights, got {order.dtype} "
                                 f"{tuple(order.shape)}")
            head = order[:count]
            if count and not self._is_prefix(mask, order, count):
                raise ValueError(f"client {client}: the mask is not the first {count} entries of the given order")
        if self.storage == "dense" or mask is None:
            npr = self.num_prunable
            if take and self._rows is None and w.is_contiguous() and (mask is None or zero_outside_mask):
                values = w  # handed over: the caller keeps no use of it and never writes to it
            elif mask is not None and not zero_outside_mask:  # store W ⊙ m once, not at every aggregation
                values = torch.empty(self.total, dtype=_DTYPE)
                torch.mul(w[:npr], mask, out=values[:npr])
                values[npr:] = w[npr:]
            else:
                values = w.clone(memory_format=torch.contiguous_format)
            slot = _Slot(values, None, None, n, r)
            if mask is not None:
                slot.mask, positions = self._held_mask(mask, self._running is not None)
                slot.positions = positions
            return self._finish_slot(slot, int(arrival_round), values)
        npr = self.num_prunable
        kept = w[:npr].index_select(0, head) if head is not None else w[:npr].masked_select(mask)
        outside = 0 if zero_outside_mask else int(torch.count_nonzero(w[:npr])) - int(torch.count_nonzero(kept))
        if outside:
            raise ValueError(
                f"client {client}: {outside} weights outside the mask are nonzero, so {self.storage} storage would "
                "lose them; send W ⊙ m or use storage='dense'"
            )
        if self.storage == "prefix":
            if head is None:
                raise ValueError(f"client {client}: prefix storage needs the ranking order the mask is a prefix of")
            key = self._order_key(order)
            values = torch.cat([kept, w[npr:]])
            return self._finish_slot(_Slot(values, None, None, n, r, order_key=key, count=int(head.numel())),
                                     int(arrival_round), values)
        values = torch.cat([kept, w[npr:]])
        return self._finish_slot(_Slot(values, None, PackedIndex.from_mask(mask), n, r), int(arrival_round), values)

    def _is_prefix(self, mask: torch.Tensor, order: torch.Tensor, count: int) -> bool:
        """Whether ``mask`` holds the first ``count`` positions of ``order`` (``count`` = its number
        of True entries). The answer is kept for the mask and order objects, unchanged since (torch
        counts in-place edits): a policy hands one mask per density to many clients."""
        key = (id(mask), id(order), count)
        hit = self._prefix_checked.get(key)
        if (hit is not None and hit[0]() is mask and hit[1] == mask._version and hit[2]() is order
                and hit[3] == order._version):
            return True
        if not bool(mask.index_select(0, order[:count]).all()):
            return False
        if len(self._prefix_checked) >= 32:
            self._prefix_checked.clear()
        self._prefix_checked[key] = (weakref.ref(mask), mask._version, weakref.ref(order), order._version)
        return True

    def _finish_slot(self, slot: _Slot, arrival_round: int, values: torch.Tensor) -> _Slot:
        """Set the arrival round, max |value| and (running sums) the frozen coefficient."""
        slot.arrival_round = arrival_round
        if values.numel():
            lo, hi = torch.aminmax(values)
            slot.amax = max(-float(lo), float(hi))
        if self.frozen is not None:
            slot.coef = self.frozen(arrival_round - slot.sent_round) * slot.num_samples
        return slot

    def _held_mask(self, mask: torch.Tensor, positions: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The buffer's copy of ``mask`` and (with ``positions``) its positions, ascending (int32
        where they fit). A policy hands one mask object to every client of a density, so the copy
        and the positions are found once per mask object and version (torch counts the in-place
        edits of a tensor: an edited mask is looked up again) and shared by those clients' slots.

        Held copies are shared by content: a mask equal to one the buffer holds gets that copy,
        whichever object it came in. So whether a client's old and new slot share a mask (the
        running sums' cheaper path, with its own rounding) depends on the masks' values only, and
        a buffer restored from a checkpoint, whose masks are new objects, continues exactly as
        the saved one would have."""
        hit = self._mask_cache.get(id(mask))
        if hit is None or hit[0]() is not mask or hit[1] != mask._version:
            if len(self._mask_cache) >= 64:
                self._mask_cache = {k: v for k, v in self._mask_cache.items() if v[0]() is not None}
                if len(self._mask_cache) >= 64:
                    self._mask_cache.clear()
            hit = [weakref.ref(mask), mask._version, *self._held_copy(mask)]
            self._mask_cache[id(mask)] = hit
        held, entry = hit[2], hit[3]
        if positions and entry[1] is None:
            entry[1] = torch.from_numpy(np.flatnonzero(held.numpy())).to(order_dtype(self.num_prunable))
        return held, entry[1] if positions else None

    def _held_copy(self, mask: torch.Tensor) -> tuple[torch.Tensor, list[Any]]:
        """(held copy, [weak reference to it, its positions or None]) for a mask of these values:
        the copy already held if there is one, else a new one."""
        bits = np.packbits(mask.numpy())
        key = (int(mask.numel()), hashlib.blake2b(bits.tobytes(), digest_size=16).digest())
        entry = self._held_masks.get(key)
        held = entry[0]() if entry is not None else None
        if held is not None and torch.equal(held, mask):
            return held, entry  # type: ignore[return-value]
        if len(self._held_masks) >= 256:
            self._held_masks = {k: v for k, v in self._held_masks.items() if v[0]() is not None}
        held = mask.clone()
        entry = [weakref.ref(held), None]
        self._held_masks[key] = entry
        return held, entry

    def _order_key(self, order: torch.Tensor) -> int:
        """The key of the held ranking ``order`` belongs to. Two rankings are one where their held
        prefixes agree (every slot only uses ranks below its count); a longer prefix replaces a
        shorter one."""
        alias = self._order_alias.get(id(order))
        if alias is not None and alias[0]() is order and alias[1] in self._orders:
            key = alias[1]
        else:
            key = None
            for k, held in self._orders.items():
                n = min(held.numel(), order.numel())
                if held is order or (n > 0 and (held.data_ptr() == order.data_ptr() or torch.equal(held[:n], order[:n]))):
                    key = k
                    break
            if key is None:
                # keys are never reused: an alias of a dropped ranking must not find a new one
                key = self._next_key = max(self._next_key, max(self._orders, default=-1) + 1)
                self._next_key += 1
                self._orders[key] = order
            self._order_alias[id(order)] = (weakref.ref(order), key)
        if order.numel() > self._orders[key].numel():
            self._orders[key] = order
        return key

    def compact_orders(self) -> int:
        """Cut every held ranking to the longest prefix its slots use, as an int32 copy where the
        positions fit (half the bytes; the full ranking can be freed by its owner). Call it when
        the held rankings are old (PR-FL: right after a new ranking is built). Returns the bytes
        the held rankings take afterwards."""
        caps: dict[int, int] = {}
        for slot in self._slots.values():
            if slot.order_key is not None:
                caps[slot.order_key] = max(caps.get(slot.order_key, 0), slot.count)
        for key, held in list(self._orders.items()):
            cap = caps.get(key, 0)
            if cap < held.numel() or held.dtype != order_dtype(self.num_prunable):
                self._orders[key] = held[:cap].to(order_dtype(self.num_prunable), copy=True)
        self._order_alias = {}
        return sum(o.numel() * o.element_size() for o in self._orders.values())

    def _commit(self, client: int, slot: _Slot) -> None:
        """Install a built slot (into the mapped file for a file-backed buffer); count the
        rankings' users and forget a ranking no slot uses any more."""
        old = self._slots.get(client)
        if self._rows is not None:
            self._rows[client].copy_(slot.values)
            slot.values = self._rows[client]
        elif self._arena is not None:
            if old is not None:  # its region takes the new values when the sizes match
                self._arena.free(old.values)
            slot.values = self._arena.store(slot.values)
        self._slots[client] = slot
        if slot.order_key is not None:
            self._order_refs[slot.order_key] = self._order_refs.get(slot.order_key, 0) + 1
        if old is not None and old.order_key is not None:
            left = self._order_refs[old.order_key] - 1
            if left:
                self._order_refs[old.order_key] = left
            else:
                self._drop_order(old.order_key)

    def _drop_order(self, key: int) -> None:
        self._order_refs.pop(key, None)
        self._orders.pop(key, None)
        self._inverse_cache.pop(key, None)
        self._ascending_cache = {k: v for k, v in self._ascending_cache.items() if k[0] != key}
        if len(self._order_alias) > 4 * len(self._orders) + 16:
            self._order_alias = {i: a for i, a in self._order_alias.items() if a[0]() is not None and a[1] in self._orders}

    def get(self, client: int) -> BufferEntry | None:
        """Client's entry, or None if its slot is empty. Dense storage returns the stored tensors
        (treat as read-only); sparse storage returns freshly rebuilt ones."""
        self._check_client(client)
        slot = self._slots.get(client)
        if slot is None:
            return None
        weights, mask = self._dense(slot)
        if self._arena is not None:
            self._arena.release(slot.values)
        return BufferEntry(client, weights, mask, slot.num_samples, slot.sent_round)

    def sent_rounds(self) -> dict[int, int]:
        """client -> the model version its buffered update was trained from (no model is built)."""
        return {c: slot.sent_round for c, slot in self._slots.items()}

    def clients(self) -> list[int]:
        """Occupied slots, ascending."""
        return sorted(self._slots)

    def __len__(self) -> int:
        return len(self._slots)

    def __contains__(self, client: object) -> bool:
        return client in self._slots

    def nbytes(self) -> int:
        """Bytes of model data held (values, masks, indices; the file for a file-backed buffer)."""
        if self._rows is not None:
            masks = sum(s.mask.numel() for s in self._slots.values() if s.mask is not None)
            return self._rows.numel() * self._rows.element_size() + masks
        out = 0
        for s in self._slots.values():
            out += s.values.numel() * s.values.element_size()
            if s.mask is not None:
                out += s.mask.numel() * s.mask.element_size()
            if s.index is not None:
                out += s.index.data.numel() * s.index.data.element_size()
        out += sum(o.numel() * o.element_size() for o in self._orders.values())
        return out

    def _release_all(self) -> None:
        """File-backed prefix storage: hand every slot's pages back to the kernel."""
        if self._arena is not None:
            for slot in self._slots.values():
                self._arena.release(slot.values)

    def _release(self, slot: _Slot | None) -> None:
        """File-backed prefix storage: hand a slot's pages back to the kernel."""
        if self._arena is not None and slot is not None:
            self._arena.release(slot.values)

    def _exact_at(self, positions: torch.Tensor, coeffs: dict[int, float]) -> ExactTerms:
        """The zero rule's terms at ``positions`` (prfl.aggregation.exact_terms), clients in ``coeffs`` order."""
        out = exact_terms(((coef, *self._values_at(self._slots[c], positions)) for c, coef in coeffs.items()),
                          int(positions.numel()))
        if self._arena is not None:
            for c in coeffs:
                self._arena.release(self._slots[c].values)
        return out

    def _values_at(self, slot: _Slot, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(W_i ⊙ m_i at ``positions`` of the prefix, whether the slot holds them; None: all)."""
        if slot.order_key is not None:
            rank = self._inverse(slot.order_key)[positions]
            held = (rank >= 0) & (rank < slot.count)
            values = slot.values[rank.clamp(0, max(slot.count - 1, 0))] if slot.count else torch.zeros(rank.shape)
        elif slot.index is not None:
            kept = slot.index.positions()
            rank = torch.searchsorted(kept, positions).clamp(max=max(kept.numel() - 1, 0))
            held = kept[rank] == positions if kept.numel() else torch.zeros(positions.shape, dtype=torch.bool)
            values = slot.values[rank] if kept.numel() else torch.zeros(positions.shape)
        else:
            return slot.values[positions], None if slot.mask is None else slot.mask[positions]
        return torch.where(held, values, 0.0), held

    def _inverse(self, key: int) -> torch.Tensor:
        """Rank of every prunable weight in the held ranking ``key`` (-1 beyond its held prefix)."""
        order = self._orders[key]
        hit = self._inverse_cache.get(key)
        if hit is not None and hit[0] is order:
            return hit[1]
        inv = torch.full((self.num_prunable,), -1, dtype=torch.int64)
        inv[order.to(torch.int64)] = torch.arange(order.numel(), dtype=torch.int64)
        self._inverse_cache[key] = (order, inv)
        return inv

    def _check_client(self, client: int) -> None:
        if isinstance(client, bool) or int(client) != client or not 0 <= client < self.num_clients:
            raise ValueError(f"client id must be an integer in [0, {self.num_clients}), got {client!r}")

    def _slot_mask(self, slot: _Slot) -> torch.Tensor | None:
        if slot.order_key is not None:
            return _prefix_mask(self._orders[slot.order_key], slot.count, self.num_prunable)
        return slot.index.to_mask() if slot.index is not None else slot.mask

    def _prefix_dense(self, values: torch.Tensor, order: torch.Tensor, count: int,
                      out: torch.Tensor | None = None) -> torch.Tensor:
        npr = self.num_prunable
        out = torch.empty(self.total, dtype=_DTYPE) if out is None else out
        out[:npr].zero_()
        out[:npr][order[:count]] = values[:count]
        out[npr:] = values[count:]
        return out

    def _densify_into(self, slot: _Slot, out: torch.Tensor) -> torch.Tensor:
        """Write a sparse or prefix slot's full weight vector into ``out``."""
        if slot.order_key is not None:
            return self._prefix_dense(slot.values, self._orders[slot.order_key], slot.count, out)
        assert slot.index is not None
        npr, cnt = self.num_prunable, slot.index.count
        out[:npr].zero_().masked_scatter_(slot.index.to_mask(), slot.values[:cnt])
        out[npr:] = slot.values[cnt:]
        return out

    def _dense(self, slot: _Slot) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weights, mask) of a slot in full form."""
        if slot.order_key is not None:
            return self._densify_into(slot, torch.empty(self.total, dtype=_DTYPE)), self._slot_mask(slot)
        if slot.index is None:
            return slot.values, slot.mask
        return self._densify_into(slot, torch.empty(self.total, dtype=_DTYPE)), slot.index.to_mask()



def _blocked_add(acc: torch.Tensor, terms: list[tuple[float, torch.Tensor]], arena: SlotArena | None = None,
                 m_acc: torch.Tensor | None = None, masks: list[torch.Tensor | None] | None = None) -> None:
    """acc[:len(v_i)] += c_i v_i (and m_acc += c_i m_i where ``masks`` has a mask) block by block
    (prfl.aggregation.blocks), each weight taking its terms in order, as the plain loop would; a
    term may be shorter than ``acc`` (a prefix in rank space). File-backed values are handed back
    to the kernel block by block, so reading the buffer never maps it all in."""
    if not terms:
        return
    n = acc.numel()
    spans = blocks(n)
    scratch = torch.empty(spans[0][1], dtype=acc.dtype) if m_acc is not None else None
    for a, b in spans:
        part = acc[a:b]
        for i, (coef, v) in enumerate(terms):
            e = min(v.numel(), b)
            if e <= a:
                continue
            if scratch is not None and masks is not None and masks[i] is not None:
                assert m_acc is not None
                m_acc[a:e].add_(scratch[: e - a].copy_(masks[i][a:e]), alpha=coef)
            part[: e - a].add_(v[a:e], alpha=coef)
            if arena is not None:
                arena.release(v, a, e)


def order_dtype(n: int) -> torch.dtype:
    """The smallest index dtype for positions in ``range(n)``: how old rankings are held."""
    return torch.int32 if n <= torch.iinfo(torch.int32).max else torch.int64


def _prefix_mask(order: torch.Tensor, count: int, n: int) -> torch.Tensor:
    mask = torch.zeros(n, dtype=torch.bool)
    mask[order[:count]] = True
    return mask
