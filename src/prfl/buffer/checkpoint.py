"""The checkpoint state of :class:`~prfl.buffer.ClientBuffer` (:class:`BufferCheckpoint`): the slots
in their stored form, and loading a state of any storage kind (checked before anything is
installed)."""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import torch

from prfl.buffer.arena import VALUE_DTYPE as _DTYPE
from prfl.buffer.slots import STORAGE_KINDS, SlotStore, _prefix_mask, _Slot
from prfl.distribution import PackedIndex, unpack_bits
from prfl.runtime.checkpoint import Near, Streamed, materialize

_EMPTY = torch.empty(0, dtype=_DTYPE)


class BufferCheckpoint(SlotStore):
    """state_dict / load_state_dict of :class:`~prfl.buffer.ClientBuffer` (a mixin on its state)."""

    _recompute: Callable[[], None]  # prfl.buffer.running.RunningAggregation: the running sums afresh

    def state_dict(self, near: torch.Tensor | None = None) -> dict[str, torch.Tensor | Streamed | Near]:
        """The contents in their stored form (a sparse or prefix buffer stays small), without a copy.

        ``near``: a model-sized tensor of the same checkpoint that the slots are close to (the
        global model); dense and sparse slots are then given as :class:`~prfl.runtime.checkpoint.Near`
        it, which a checkpoint stores as their bit difference from it (about a quarter smaller), and
        which a checkpoint's reader gives back as the plain values.

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
        return self._contents(near)

    def _contents(self, near: torch.Tensor | None = None) -> dict[str, torch.Tensor | Streamed | Near]:
        """The state of :meth:`state_dict` without recomputing the running sums first."""
        ids = self.clients()
        if near is not None and (near.dim() != 1 or near.numel() != self.total or not near.is_floating_point()):
            raise ValueError(f"near must be a 1-D floating-point tensor of {self.total} weights")
        state: dict[str, torch.Tensor | Streamed | Near] = {
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
            values: torch.Tensor | Streamed | Near
            values = Streamed(read=lambda v=s.values: v, release=release) if on_disk else s.values
            if near is not None and s.order_key is not None:  # prefix: at the ranking's first ranks, then the suffix
                values = Near(values, near, self._orders[s.order_key], s.count)
            elif near is not None:  # dense (the values line up) or sparse (at the index, then the suffix)
                values = Near(values, near, None if s.index is None else s.index.data)
            state[f"slot.{c}.values"] = values
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
                    or int(torch.count_nonzero(unpack_bits(data, npr))) != count:
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
