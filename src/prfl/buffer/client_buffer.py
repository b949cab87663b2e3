"""The per-client latest-model buffer, :class:`ClientBuffer` (see :mod:`prfl.buffer`)."""

from __future__ import annotations

import os
import weakref
from typing import Any

import torch

from prfl.aggregation import Staleness
from prfl.buffer.aggregate import FullAggregation
from prfl.buffer.arena import VALUE_DTYPE as _DTYPE
from prfl.buffer.arena import SlotArena
from prfl.buffer.checkpoint import BufferCheckpoint
from prfl.buffer.running import RunningAggregation
from prfl.buffer.slots import STORAGE_KINDS, _Slot
from prfl.incremental import DEFAULT_RECOMPUTE_EVERY, RunningMaskFedAvg


class ClientBuffer(FullAggregation, RunningAggregation, BufferCheckpoint):
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
        self._prefix_checked: dict[tuple[int, int, int], tuple[Any, int, Any, int]] = {}  # see _is_prefix
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

    def copy(self) -> ClientBuffer:
        """An independent in-memory copy of the buffer: the same slots, in its storage kind, with
        its running sums recomputed from them (as a checkpoint's reader recomputes them). This
        buffer is left as it is, sums included. A file-backed buffer is not copied (ValueError)."""
        if self.path is not None:
            raise ValueError("a file-backed buffer (buffer_dir) is not copied in memory")
        other = self.empty_like()
        other.load_state_dict({k: v.clone() for k, v in self._contents().items()})  # type: ignore[union-attr]
        return other

    def empty_like(self) -> ClientBuffer:
        """An empty in-memory buffer with this one's sizes, storage kind and running sums."""
        return ClientBuffer(self.num_clients, self.total, self.num_prunable, storage=self.storage, frozen=self.frozen,
                            recompute_every=self.recompute_every)

    def put(
        self, client: int, weights: torch.Tensor, mask: torch.Tensor | None, num_samples: int, sent_round: int,
        order: torch.Tensor | None = None, arrival_round: int | None = None, zero_outside_mask: bool = False,
        take: bool = False,
    ) -> None:
        """Store ``client``'s latest model (copied, as fp32), replacing its previous slot.

        ``order`` (prefix storage): a ranking whose first ``mask.sum()`` entries are exactly the
        mask's positions (the buffer keeps a reference to it: do not modify it in place).
        ``arrival_round``: the server round at which the update arrived (default ``sent_round``);
        frozen staleness is s(arrival_round - sent_round). With running sums, the old
        contribution leaves them and the new one enters. ``zero_outside_mask``: the caller vouches
        that ``weights`` are 0 outside ``mask`` (an update that passed
        :func:`prfl.validation.check_mask`), so they are stored as they are, neither multiplied by
        the mask nor checked. ``take``: the caller hands ``weights`` over (it keeps no other use of
        them and never writes to them), so a dense slot in memory keeps them rather than a copy."""
        slot = self._make_slot(client, weights, mask, num_samples, sent_round, order, arrival_round,
                               zero_outside_mask, take)
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
