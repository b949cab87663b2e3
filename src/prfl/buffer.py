"""Per-client latest-model buffer: the server's store for PR-FL's asynchronous aggregation.

Slot i holds client i's latest flat model W_i, its mask m_i over the prunable prefix (None =
dense), its sample count n_i, the server round n'_i at which it was sent and the round a_i at
which it arrived. Staleness is either re-aged at every aggregation or frozen on arrival:

    reaged: s_i = staleness_weight(kind, n - n'_i) at round n      frozen: s_i = staleness_weight(kind, a_i - n'_i)
    p_i = s_i / sum_j s_j,   MaskFedAvg with coefficients c_i = p_i n_i   (prfl.aggregation.mask_fedavg)

With ``frozen=`` a :class:`~prfl.aggregation.Staleness`, the buffer also keeps MaskFedAvg's
running sums (:mod:`prfl.incremental`): :meth:`ClientBuffer.put` subtracts the client's old
contribution c_i = s_i n_i and adds the new one, and :meth:`ClientBuffer.aggregate_running`
returns the aggregate in O(N) whatever the number of buffered clients. The sums are recomputed
exactly from the slots every K arrivals and at every :meth:`ClientBuffer.state_dict` (a checkpoint);
a loaded buffer recomputes them, so a resumed run continues from the same sums bit for bit.

or, with ``robust=``, a robust rule over the buffer that respects the masks (prfl.robust):
norm clipping of W_i - W_prev, coordinate-wise trimmed mean (weighted by c_i) or median.

Storage:

- ``"dense"``: each slot keeps the full fp32 vector (4 |W| bytes) and a bool mask (N bytes).
  With ``path`` the vectors live in one memory-mapped file of num_clients x total fp32 instead
  of RAM (the buffer's only I/O; the file is created or overwritten, zero-filled).
- ``"sparse"``: each slot keeps the values at its mask (ascending positions) then the suffix,
  and the mask as a :class:`~prfl.distribution.PackedIndex` (bitmap or int32 positions, the
  cheaper). Lossless because a masked client's weights are exactly zero outside its mask;
  :meth:`ClientBuffer.put` checks this and refuses weights that are not.
- ``"prefix"``: for masks that are prefixes of a ranking (PR-FL's: the first ceil(rho N) weights
  of the current importance order), :meth:`ClientBuffer.put` takes the ranking's ``order`` too.
  A slot keeps only its values in ranking order and the suffix; the mask is (ranking, count), and
  each distinct ranking is held once for all the slots that use it. MaskFedAvg then works per
  ranking in rank space: the kept values of every slot of that ranking are added into one
  accumulator over their prefix (contiguous, no index), the mask weights M form a step function
  (sum of c_i over the slots whose count exceeds the rank: one cumulative sum), and one scatter
  per ranking brings both back to weight positions. An aggregation costs sum_i |m_i| + (rankings
  x N) instead of (clients x N): what lets a buffer of 1,000 sparse clients aggregate at every
  update. Summation order differs from :func:`~prfl.aggregation.mask_fedavg` (equal up to
  rounding, not bit for bit). ``order`` may be a prefix of the ranking (at least as long as the
  slot's count): rankings whose held prefixes agree are one ranking, and :meth:`ClientBuffer.compact_orders`
  cuts every held ranking to the longest prefix its slots use (after a new ranking, the old ones
  are needed only as far as the densities of the slots still holding them).
  With ``path`` (a directory) the slot values live in a file there instead of RAM
  (:class:`SlotArena`): each slot a page-aligned region mapped on its own, whose pages are handed
  back to the kernel as soon as an aggregation has read them, so the server's resident memory does
  not grow with the fleet (the values stay in the page cache, which the kernel may evict).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import mmap
import os
import tempfile
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from prfl.aggregation import (
    ACCUMULATE_DTYPE, ExactTerms, Staleness, blocks, exact_terms, finish_masked, mask_fedavg, staleness_weight,
    weighted_average,
)
from prfl.runtime.checkpoint import Streamed, materialize
from prfl.distribution import PackedIndex, unpack_bits
from prfl.incremental import DEFAULT_RECOMPUTE_EVERY, Contribution, RunningMaskFedAvg
from prfl.robust import check_method, clip_updates, coordinate_median, holders, trimmed_mean

STORAGE_KINDS: tuple[str, ...] = ("dense", "sparse", "prefix")
STALENESS_MODES: tuple[str, ...] = ("frozen", "reaged")
# aggregate_running recomputes only the positions masked arrivals touched while they are at most
# this share of the prunable weights: a mask spread over the model touches most cache lines of the
# model-sized sums already at ~10 % density, so beyond that one streaming pass costs no more
PARTIAL_FRACTION = 1 / 16
# a dense-storage slot whose mask keeps more than this share of the prunable weights enters the
# running sums as a whole vector (streamed block by block) rather than by index operations
STREAM_FRACTION = 1 / 4
_DTYPE = torch.float32
_EMPTY = torch.empty(0, dtype=_DTYPE)


class SlotArena:
    """fp32 vectors in one (unlinked) file: each stored vector is a tensor over its own mapping
    of a page-aligned region; :meth:`release` drops its pages from the process (the data stays in
    the file and the page cache), :meth:`free` returns its region for reuse by a vector of the
    same page count."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        os.makedirs(directory, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix="prfl-buffer-", suffix=".f32", dir=directory)
        os.unlink(name)  # the file goes away with the process
        self._fd = fd
        self.size = 0  # bytes of the file
        self._free: dict[int, list[int]] = {}  # region length -> offsets
        self._maps: dict[int, tuple[mmap.mmap, int, int]] = {}  # data_ptr -> (mapping, offset, length)
        self._finalizer = weakref.finalize(self, os.close, fd)

    def store(self, values: torch.Tensor) -> torch.Tensor:
        """Copy ``values`` (1-D fp32) into the file; the returned tensor reads and writes it."""
        n = int(values.numel())
        length = max(mmap.PAGESIZE, -(-n * _DTYPE.itemsize // mmap.PAGESIZE) * mmap.PAGESIZE)
        spare = self._free.get(length)
        if spare:
            offset = spare.pop()
        else:
            offset = self.size
            self.size += length
            os.ftruncate(self._fd, self.size)
        mapping = mmap.mmap(self._fd, length, offset=offset)
        out = torch.frombuffer(mapping, dtype=_DTYPE, count=n) if n else torch.empty(0, dtype=_DTYPE)
        out.copy_(values)
        self._maps[out.data_ptr()] = (mapping, offset, length)
        mapping.madvise(mmap.MADV_DONTNEED)  # written through to the page cache
        return out

    def release(self, t: torch.Tensor, start: int = 0, stop: int | None = None) -> None:
        """Hand the pages of a stored tensor (of its elements ``start:stop``, widened to whole
        pages) back to the kernel; they are read again on next use."""
        entry = self._maps.get(t.data_ptr())
        if entry is None:
            return
        if start == 0 and stop is None:
            entry[0].madvise(mmap.MADV_DONTNEED)
            return
        page, length = mmap.PAGESIZE, entry[2]
        lo = start * _DTYPE.itemsize // page * page
        hi = length if stop is None else min(length, -(-stop * _DTYPE.itemsize // page) * page)
        if hi > lo:
            entry[0].madvise(mmap.MADV_DONTNEED, lo, hi - lo)

    def free(self, t: torch.Tensor) -> None:
        """Forget a stored tensor; its region is reused. Do not use ``t`` afterwards."""
        entry = self._maps.pop(t.data_ptr(), None)
        if entry is not None:
            entry[0].madvise(mmap.MADV_DONTNEED)
            self._free.setdefault(entry[2], []).append(entry[1])


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


class ClientBuffer:
    """The latest model of every client, with staleness weights and buffer-wide MaskFedAvg."""

    def __init__(
        self,
        num_clients: int,
        total: int,
        num_prunable: int,
        storage: str = "dense",
        path: str | os.PathLike[str] | None = None,
        frozen: Staleness | None = None,
        recompute_every: int = DEFAULT_RECOMPUTE_EVERY,
    ) -> None:
        if num_clients < 1:
            raise ValueError(f"num_clients must be >= 1, got {num_clients}")
        if not 0 <= num_prunable <= total:
            raise ValueError(f"num_prunable must lie in [0, total={total}], got {num_prunable}")
        if storage not in STORAGE_KINDS:
            raise ValueError(f"unknown storage {storage!r}; valid: {', '.join(STORAGE_KINDS)}")
        if path is not None and storage == "sparse":
            raise ValueError("a file-backed buffer (path=...) needs storage='dense' (one file) or 'prefix' (a directory)")
        if isinstance(recompute_every, bool) or int(recompute_every) != recompute_every or recompute_every < 1:
            raise ValueError(f"recompute_every must be an integer >= 1, got {recompute_every!r}")
        self.num_clients = int(num_clients)
        self.total = int(total)
        self.num_prunable = int(num_prunable)
        self.storage = storage
        self.path = None if path is None else os.fspath(path)
        self._slots: dict[int, _Slot] = {}
        self._orders: dict[int, torch.Tensor] = {}  # prefix storage: ranking key -> order (int64 or int32, <= N)
        self._order_refs: dict[int, int] = {}  # prefix storage: ranking key -> slots using it
        self._inverse_cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # key -> (order, inverse permutation)
        self._ascending_cache: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._mask_cache: dict[int, list[Any]] = {}  # id(mask) -> [ref, version, held copy, content entry]
        self._held_masks: dict[tuple[int, bytes], list[Any]] = {}  # (size, digest) -> [ref to held copy, positions]
        self._rows: torch.Tensor | None = None
        self._arena: SlotArena | None = None
        self._order_alias: dict[int, tuple[weakref.ref[torch.Tensor], int]] = {}  # id(order) -> key
        self._next_key = 0
        self.frozen = frozen
        self.recompute_every = int(recompute_every)
        self._running: RunningMaskFedAvg | None = None
        self._since_recompute = 0  # arrivals since the running sums were last recomputed
        self._last_output: weakref.ref[torch.Tensor] | None = None
        if frozen is not None:
            self._running = RunningMaskFedAvg(self.num_prunable, self.total, self.num_clients)
        if self.path is not None and storage == "prefix":
            self._arena = SlotArena(self.path)
        elif self.path is not None:
            size = self.num_clients * self.total
            with open(self.path, "wb") as f:  # fresh zero-filled (sparse) file of the exact size
                f.truncate(size * _DTYPE.itemsize)
            self._rows = torch.from_file(self.path, shared=True, size=size, dtype=_DTYPE).view(
                self.num_clients, self.total
            )

    # ------------------------------------------------------------------ slots
    def put(
        self, client: int, weights: torch.Tensor, mask: torch.Tensor | None, num_samples: int, sent_round: int,
        order: torch.Tensor | None = None, arrival_round: int | None = None, zero_outside_mask: bool = False,
    ) -> None:
        """Store ``client``'s latest model (copied, as fp32), replacing its previous slot.

        ``order`` (prefix storage): a ranking whose first ``mask.sum()`` entries are exactly the
        mask's positions (the buffer keeps a reference to it: do not modify it in place).
        ``arrival_round``: the server round at which the update arrived (default ``sent_round``);
        frozen staleness is s(arrival_round - sent_round). With running sums, the old
        contribution leaves them and the new one enters. ``zero_outside_mask``: the caller vouches
        that ``weights`` are 0 outside ``mask`` (an update that passed
        :func:`prfl.validation.check_mask`), so they are stored as they are, neither multiplied by
        the mask nor checked."""
        slot = self._make_slot(client, weights, mask, num_samples, sent_round, order, arrival_round,
                               zero_outside_mask)
        old = self._slots.get(client)
        if self._running is not None:
            items = [] if old is None else [(self._contribution(old), -1)]
            # whole-vector terms wait for the next aggregation, which adds them in its own pass over
            # the sums; not when the old values live in a file region the new ones may reuse
            in_ram = self._rows is None and self._arena is None
            self._running.apply([*items, (self._contribution(slot), 1)], defer=in_ram)
            self._since_recompute += 1
            self._release(old)
        self._commit(client, slot)

    def _make_slot(
        self, client: int, weights: torch.Tensor, mask: torch.Tensor | None, num_samples: int, sent_round: int,
        order: torch.Tensor | None = None, arrival_round: int | None = None, zero_outside_mask: bool = False,
    ) -> _Slot:
        """Validate an entry and build its stored form (no side effects but a new ranking key)."""
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
            if count and not bool(mask[head].all()):
                raise ValueError(f"client {client}: the mask is not the first {count} entries of the given order")
        if self.storage == "dense" or mask is None:
            npr = self.num_prunable
            values = torch.empty(self.total, dtype=_DTYPE)
            if mask is not None and not zero_outside_mask:  # store W ⊙ m once, not at every aggregation
                torch.mul(w[:npr], mask, out=values[:npr])
                values[npr:] = w[npr:]
            else:
                values.copy_(w)
            slot = _Slot(values, None, None, n, r)
            if mask is not None:
                slot.mask, positions = self._held_mask(mask, self._running is not None)
                slot.positions = positions
            return self._finish_slot(slot, int(arrival_round), values)
        npr = self.num_prunable
        kept = w[:npr][head] if head is not None else w[:npr].masked_select(mask)
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

    def remove(self, client: int) -> bool:
        """Empty ``client``'s slot (its contribution leaves the running sums); False if it was empty."""
        self._check_client(client)
        slot = self._slots.get(client)
        if slot is None:
            return False
        if self._running is not None:
            self._running.apply([(self._contribution(slot), -1)])
            self._since_recompute += 1
        del self._slots[client]
        if self._arena is not None:
            self._arena.free(slot.values)
        if slot.order_key is not None:
            left = self._order_refs[slot.order_key] - 1
            if left:
                self._order_refs[slot.order_key] = left
            else:
                self._drop_order(slot.order_key)
        return True

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

    # ------------------------------------------------------------------ aggregation
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

    def _release_all(self) -> None:
        """File-backed prefix storage: hand every slot's pages back to the kernel."""
        if self._arena is not None:
            for slot in self._slots.values():
                self._arena.release(slot.values)

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

    def plain_average(self, accumulate_dtype: torch.dtype = ACCUMULATE_DTYPE) -> torch.Tensor:
        """The n_i-weighted average of the buffered models, sum_i n_i W_i / sum_i n_i (masks and
        staleness ignored): PR-FL's server score model. Weighting by n_i, like every average in
        FedAvg-style training, keeps a client with little data from counting as much as a big one."""
        if not self._slots:
            raise ValueError("the buffer is empty; put at least one client model first")
        coeffs = {c: float(s.num_samples) for c, s in sorted(self._slots.items())}
        total_c = sum(coeffs.values())
        if not total_c > 0:
            raise ValueError("every buffered client has num_samples == 0; nothing to average")
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
        dense: list[tuple[float, torch.Tensor]] = []
        groups: dict[int, list[tuple[float, _Slot]]] = {}  # prefix storage: slots by ranking, summed in rank space
        for c, coef in coeffs.items():
            if coef == 0.0:
                continue
            slot = self._slots[c]
            if slot.order_key is not None:
                groups.setdefault(slot.order_key, []).append((coef, slot))
                acc[npr:].add_(slot.values[slot.count :], alpha=coef)
            else:
                dense.append((coef, slot.values))
        _blocked_add(acc, dense, self._arena)
        for key, members in groups.items():
            self._add_prefix_group(self._orders[key], members, acc[:npr], None, dtype, self._arena)
        return acc

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
        for c, coef in coeffs.items():
            if coef == 0.0:
                continue
            slot = self._slots[c]
            if slot.order_key is not None:
                groups.setdefault(slot.order_key, []).append((coef, slot))
                s_acc.add_(slot.values[slot.count :], alpha=coef)
                continue
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

    # ------------------------------------------------------------------ running sums (frozen staleness)
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

    def _release(self, slot: _Slot | None) -> None:
        """File-backed prefix storage: hand a slot's pages back to the kernel."""
        if self._arena is not None and slot is not None:
            self._arena.release(slot.values)

    def _exact_running(self, positions: torch.Tensor) -> ExactTerms:
        return self._exact_at(positions, {c: s.coef for c, s in sorted(self._slots.items())})

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

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, torch.Tensor | Streamed]:
        """The contents in their stored form (a sparse or prefix buffer stays small), without a copy.

        Entries are the buffer's own tensors: do not modify them, and use the state before the
        buffer changes. In a file-backed buffer a slot's values are a
        :class:`~prfl.runtime.checkpoint.Streamed` instead, which reads them from the file when the
        checkpoint writer gets to them and hands their pages back to the kernel right after, so
        writing a checkpoint maps one slot at a time, whatever the fleet (and a checkpoint's
        reader gives them back one at a time too).

        With running sums this is a checkpoint, so they are first recomputed exactly from the
        slots, as :meth:`load_state_dict` recomputes them: the saved buffer and this one continue
        with the same sums, bit for bit (the sums themselves are not saved)."""
        if self._running is not None:
            self._recompute()
        ids = self.clients()
        state: dict[str, torch.Tensor | Streamed] = {
            "config": torch.tensor(
                [self.num_clients, self.total, self.num_prunable, STORAGE_KINDS.index(self.storage)], dtype=torch.int64
            ),
            "clients": torch.tensor(ids, dtype=torch.int64),
            "num_samples": torch.tensor([self._slots[c].num_samples for c in ids], dtype=torch.int64),
            "sent_round": torch.tensor([self._slots[c].sent_round for c in ids], dtype=torch.int64),
            "arrival_round": torch.tensor([self._slots[c].arrival_round for c in ids], dtype=torch.int64),
            "next_order_key": torch.tensor([self._next_key], dtype=torch.int64),
        }
        on_disk = self._arena is not None or self._rows is not None
        release = self._arena.release if self._arena is not None else None
        for c in ids:
            s = self._slots[c]
            state[f"slot.{c}.values"] = Streamed(read=lambda v=s.values: v, release=release) if on_disk else s.values
            if s.mask is not None:
                state[f"slot.{c}.mask"] = s.mask
            if s.index is not None:
                key = "bitmap" if s.index.is_bitmap else "positions"
                state[f"slot.{c}.{key}"] = s.index.data
            if s.order_key is not None:
                state[f"slot.{c}.prefix"] = torch.tensor([s.order_key, s.count], dtype=torch.int64)
        for key, order in self._orders.items():
            state[f"order.{key}"] = order
        return state

    def load_state_dict(self, state: Mapping[str, torch.Tensor | Streamed]) -> None:
        """Replace the contents with a :meth:`state_dict` (from a buffer of any storage kind).

        Every slot is checked before any is installed, and on error the buffer is unchanged. A
        state of this buffer's own storage kind is installed as stored, reading one slot's values
        at a time (into the file, for a file-backed buffer); another kind is converted slot by slot.
        The saved rankings keep their keys: two whose held prefixes have come to agree (after
        compact_orders) stay two groups, so aggregation sums in the same order as before saving.
        Running sums are recomputed from the slots."""
        try:
            n_clients, total, npr, kind = (int(x) for x in _tensor(state["config"]).tolist())
            ids = [int(x) for x in _tensor(state["clients"]).tolist()]
            samples = [int(x) for x in _tensor(state["num_samples"]).tolist()]
            rounds = [int(x) for x in _tensor(state["sent_round"]).tolist()]
            arrivals = [int(x) for x in _tensor(state["arrival_round"]).tolist()] if "arrival_round" in state else rounds
            if (n_clients, total, npr) != (self.num_clients, self.total, self.num_prunable):
                raise ValueError(
                    f"state is for (num_clients, total, num_prunable) = {(n_clients, total, npr)}, "
                    f"this buffer has {(self.num_clients, self.total, self.num_prunable)}"
                )
            if not 0 <= kind < len(STORAGE_KINDS):
                raise ValueError(f"unknown storage code {kind} in state")
            if not len(ids) == len(samples) == len(rounds) == len(arrivals) or len(set(ids)) != len(ids):
                raise ValueError("clients, num_samples, sent_round and arrival_round do not match")
            for c, n, r, a in zip(ids, samples, rounds, arrivals):
                self._check_client(c)
                if n < 0 or r < 0 or a < r:
                    raise ValueError(f"client {c}: num_samples and sent_round must be >= 0 and arrival_round >= "
                                     f"sent_round, got {n}, {r}, {a}")
            orders = {int(k[len("order."):]): _tensor(v) for k, v in state.items() if k.startswith("order.")}
            if STORAGE_KINDS[kind] == self.storage:
                plans: list[Any] = [self._stored_plan(state, c, n, r, orders) for c, n, r in zip(ids, samples, rounds)]
                install: Any = self._install_stored
            else:
                plans = [(c, n, r) for c, n, r in zip(ids, samples, rounds)]
                for c in ids:
                    if f"slot.{c}.values" not in state:
                        raise KeyError(f"slot.{c}.values")
                install = lambda plan, arrived: self._install_converted(  # noqa: E731
                    state, STORAGE_KINDS[kind], orders, *plan, arrived)
        except KeyError as e:
            raise ValueError(f"not a ClientBuffer state dict: missing {e}") from None
        orders_before, alias_before, next_before = dict(self._orders), dict(self._order_alias), self._next_key
        if STORAGE_KINDS[kind] == self.storage == "prefix":
            self._orders = {k: orders[k] for k in orders if any(p[1].order_key == k for p in plans)}
            self._order_alias = {id(o): (weakref.ref(o), k) for k, o in self._orders.items()}
            next_key = _tensor(state["next_order_key"]).tolist()[0] if "next_order_key" in state else 0
            self._next_key = max([self._next_key, int(next_key), *(k + 1 for k in self._orders)])
        new: dict[int, _Slot] = {}
        try:
            for plan, arrived in zip(plans, arrivals):
                c, slot = install(plan, arrived)
                new[c] = slot
        except BaseException:
            if self._arena is not None:
                for slot in new.values():
                    self._arena.free(slot.values)
            self._orders, self._order_alias, self._next_key = orders_before, alias_before, next_before
            raise
        old, self._slots = self._slots, {}
        if self._arena is not None:
            for slot in old.values():
                self._arena.free(slot.values)
        self._order_refs = {}
        self._inverse_cache.clear()
        self._ascending_cache = {}
        for c, slot in new.items():
            if self._rows is not None:
                self._rows[c].copy_(slot.values)
                slot.values = self._rows[c]
            self._slots[c] = slot
            if slot.order_key is not None:
                self._order_refs[slot.order_key] = self._order_refs.get(slot.order_key, 0) + 1
        for key in [k for k in self._orders if k not in self._order_refs]:
            self._drop_order(key)
        if self._running is not None:
            self._recompute()

    def _stored_plan(self, state: Mapping[str, torch.Tensor | Streamed], c: int, n: int, r: int,
                     orders: dict[int, torch.Tensor]) -> tuple[int, _Slot, torch.Tensor | Streamed]:
        """Check one slot of a state of this buffer's storage kind from its metadata; returns
        (client, slot without values, where its values are)."""
        npr, suffix = self.num_prunable, self.total - self.num_prunable
        values = state[f"slot.{c}.values"]
        shape = _shape(values)
        if len(shape) != 1:
            raise ValueError(f"slot.{c}.values must be 1-D, got shape {shape}")
        size = shape[0]
        if self.storage == "dense":
            mask = state.get(f"slot.{c}.mask")
            if size != self.total:
                raise ValueError(f"slot.{c}.values holds {size} values, expected {self.total}")
            if mask is not None:
                mask = _tensor(mask)
                if mask.dtype != torch.bool or tuple(mask.shape) != (npr,):
                    raise ValueError(f"slot.{c}.mask must be a bool tensor of shape ({npr},)")
            return c, _Slot(_EMPTY, mask, None, n, r), values
        if self.storage == "prefix" and f"slot.{c}.prefix" in state:
            key, count = (int(x) for x in _tensor(state[f"slot.{c}.prefix"]).tolist())
            order = orders.get(key)
            if order is None:
                raise KeyError(f"order.{key}")
            if order.dtype not in (torch.int64, torch.int32) or order.dim() != 1 or not 0 <= count <= order.numel() <= npr:
                raise ValueError(f"slot {c}: ranking order.{key} ({order.dtype} {tuple(order.shape)}) does not hold "
                                 f"its {count} kept weights")
            if size != count + suffix:
                raise ValueError(f"slot.{c}.values holds {size} values, expected {count} kept + {suffix} suffix")
            return c, _Slot(_EMPTY, None, None, n, r, order_key=key, count=count), values
        index: PackedIndex | None = None
        if self.storage == "sparse" and f"slot.{c}.bitmap" in state:
            data = _tensor(state[f"slot.{c}.bitmap"])
            count = size - suffix
            if data.dtype != torch.uint8 or data.numel() != (npr + 7) // 8 or count < 0 \
                    or int(unpack_bits(data, npr).sum()) != count:
                raise ValueError(f"slot {c}: its bitmap does not mark its {count} kept weights")
            index = PackedIndex(npr, count, True, data)
        elif self.storage == "sparse" and f"slot.{c}.positions" in state:
            data = _tensor(state[f"slot.{c}.positions"])
            count = int(data.numel())
            pos = data.to(torch.int64)
            if data.dtype != torch.int32 or size != count + suffix or (
                    count and (int(pos[0]) < 0 or int(pos[-1]) >= npr or not bool((pos[1:] > pos[:-1]).all()))):
                raise ValueError(f"slot {c}: its positions are not {size - suffix} ascending indices below {npr}")
            index = PackedIndex(npr, count, False, data)
        elif size != self.total:  # a dense client
            raise ValueError(f"slot.{c}.values holds {size} values, expected {self.total}")
        return c, _Slot(_EMPTY, None, index, n, r), values

    def _install_stored(self, plan: tuple[int, _Slot, torch.Tensor | Streamed], arrived: int) -> tuple[int, _Slot]:
        """Read one planned slot's values into a copy of its own (in RAM, or stored in the file)
        and finish it as :meth:`put` would."""
        c, slot, source = plan
        values = materialize(source)
        if not values.is_floating_point():
            raise ValueError(f"slot.{c}.values must be floating point, got {values.dtype}")
        values = values.to(_DTYPE, copy=self._arena is None)
        slot = dataclasses.replace(slot, values=values)
        if self.storage == "dense" and slot.mask is not None:
            values[: self.num_prunable].mul_(slot.mask)  # W ⊙ m, as put stores it
            slot.mask, slot.positions = self._held_mask(slot.mask, self._running is not None)
        self._finish_slot(slot, arrived, values)
        if self._arena is not None:
            slot.values = self._arena.store(values)
        return c, slot

    def _install_converted(self, state: Mapping[str, torch.Tensor | Streamed], kind: str, orders: dict[int, torch.Tensor],
                           c: int, n: int, r: int, arrived: int) -> tuple[int, _Slot]:
        """One slot of a state of another storage kind, rebuilt through the checks of :meth:`put`."""
        npr, total = self.num_prunable, self.total
        values = materialize(state[f"slot.{c}.values"])
        mask: torch.Tensor | None = None
        order: torch.Tensor | None = None
        if kind == "dense":
            weights, mask = values, state.get(f"slot.{c}.mask")
        elif f"slot.{c}.bitmap" in state:
            index = PackedIndex(npr, values.numel() - (total - npr), True, _tensor(state[f"slot.{c}.bitmap"]))
            weights, mask = self._densify_into(_Slot(values, None, index, n, r), torch.empty(total, dtype=_DTYPE)), index.to_mask()
        elif f"slot.{c}.positions" in state:
            data = _tensor(state[f"slot.{c}.positions"])
            index = PackedIndex(npr, int(data.numel()), False, data)
            weights, mask = self._densify_into(_Slot(values, None, index, n, r), torch.empty(total, dtype=_DTYPE)), index.to_mask()
        elif f"slot.{c}.prefix" in state:
            key, count = (int(x) for x in _tensor(state[f"slot.{c}.prefix"]).tolist())
            if key not in orders:
                raise ValueError(f"not a ClientBuffer state dict: missing 'order.{key}'")
            order = orders[key]
            weights, mask = self._prefix_dense(values, order, count), _prefix_mask(order, count, npr)
        else:
            weights = values
        slot = self._make_slot(c, weights, _tensor(mask) if mask is not None else None, n, r, order, arrived)
        if self._arena is not None:
            slot.values = self._arena.store(slot.values)
        return c, slot

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


def _tensor(value: torch.Tensor | Streamed) -> torch.Tensor:
    """A state entry as a tensor (a Streamed one is read)."""
    t = materialize(value)
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"expected a tensor in the state, got {type(t).__name__}")
    return t


def _shape(value: torch.Tensor | Streamed) -> tuple[int, ...]:
    """The shape of a state entry, read only if it is not known beforehand."""
    if isinstance(value, Streamed) and value.shape is not None:
        return tuple(value.shape)
    return tuple(_tensor(value).shape)


def order_dtype(n: int) -> torch.dtype:
    """The smallest index dtype for positions in ``range(n)``: how old rankings are held."""
    return torch.int32 if n <= torch.iinfo(torch.int32).max else torch.int64


def _prefix_mask(order: torch.Tensor, count: int, n: int) -> torch.Tensor:
    mask = torch.zeros(n, dtype=torch.bool)
    mask[order[:count]] = True
    return mask
