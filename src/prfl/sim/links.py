"""The server's shared links as fluid max-min fair queues.

Each direction of the server link (its sending side, shared by client downloads, and its
receiving side, shared by client uploads) is one :class:`SharedLink` of capacity ``C`` bytes/s.
Every active transfer ``f`` has a cap ``c_f`` (the client's own link speed for this task). Rates
are the max-min fair allocation, computed by water-filling (:func:`prfl.fairshare.water_fill`):
visit the flows by increasing cap with ``R = C`` and ``n`` flows left; the fair share is
``s = R / n``; a flow with ``c_f <= s`` gets ``r_f = c_f`` (then ``R -= c_f``, ``n -= 1``), and
once the smallest remaining cap exceeds ``s`` all remaining flows get ``r_f = s``. Hence
``sum_f r_f = min(C, sum_f c_f)`` and ``r_f <= c_f``.
With unlimited capacity (``None`` or ``inf``) every flow runs at its cap.

Rates are piecewise constant: they change only when a transfer starts, ends or is cancelled, or
when the capacity is reset. Between events a flow's remaining bytes fall as
``b_f(t) = b_f(t0) - r_f (t - t0)``, so it completes at ``t0 + b_f(t0) / r_f``.

Completion detection is robust to rounding: a flow counts as done when it defines the next event
time, or when its remaining bytes are ``<= 1e-9 * nbytes``. A zero-byte flow completes at its start.
Completions that happen while the link is moved forward by :meth:`SharedLink.start`,
:meth:`SharedLink.cancel` or :meth:`SharedLink.set_capacity` are kept and returned by the next
:meth:`SharedLink.advance`.
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from numbers import Real
from typing import Any

import numpy as np

from prfl.fairshare import water_fill

__all__ = ["SharedLink", "transfer_time", "water_fill", "DONE_TOLERANCE"]

DONE_TOLERANCE = 1e-9
"""A flow with ``remaining <= DONE_TOLERANCE * nbytes`` counts as complete."""


def _norm_capacity(capacity: float | None) -> float | None:
    if capacity is None:
        return None
    bad_type = isinstance(capacity, bool) or not isinstance(capacity, Real)
    if bad_type or math.isnan(capacity) or capacity <= 0:
        raise ValueError(f"link capacity must be a positive number or None (unlimited), got {capacity!r}")
    return None if math.isinf(capacity) else float(capacity)


def transfer_time(nbytes: float, cap_bps: float, server_bps: float | None = None) -> float:
    """Seconds to move ``nbytes`` alone on the link: ``nbytes / min(cap_bps, server_bps)``.

    ``server_bps`` ``None`` or ``inf`` means an unlimited server; zero bytes take zero seconds.
    """
    if nbytes < 0:
        raise ValueError(f"nbytes must be >= 0, got {nbytes!r}")
    if not cap_bps > 0:
        raise ValueError(f"cap_bps must be positive, got {cap_bps!r}")
    if nbytes == 0:
        return 0.0
    server = _norm_capacity(server_bps)
    rate = cap_bps if server is None else min(cap_bps, server)
    return nbytes / rate


class SharedLink:
    """One direction of the server link shared max-min fairly by concurrent transfers.

    Times are seconds on the simulator's clock and must never decrease between calls.
    Flow ids are any hashable values (picklable if the link is checkpointed).

    The flows live in NumPy arrays, so an event costs a few vector operations over the active
    flows rather than a Python loop over them (a fleet of 10,000 clients keeps thousands of
    transfers on one link). The arithmetic is the loop's, element by element, in the same
    order (finish times ``now + remaining / rate``, progress ``max(0, remaining - rate dt)``,
    water-filling by increasing cap, ties by start order), so the results are the same to the
    last bit; the slots of the arrays are in no particular order, and every order that matters
    is taken from the flows' start sequence numbers.
    """

    def __init__(self, capacity_bps: float | None) -> None:
        self._capacity = _norm_capacity(capacity_bps)
        self._now = 0.0
        self._seq = 0
        self._ids: list[Hashable] = []  # slot -> flow id
        self._index: dict[Hashable, int] = {}  # flow id -> slot
        self._nbytes = np.empty(0)
        self._rem = np.empty(0)
        self._cap = np.empty(0)
        self._started = np.empty(0)
        self._rate = np.empty(0)
        self._seqs = np.empty(0, dtype=np.int64)
        self._done: list[tuple[float, Hashable]] = []
        self._done_ids: set[Hashable] = set()

    # -- properties ------------------------------------------------------------------------
    @property
    def capacity(self) -> float | None:
        """The capacity in bytes/s (None: unlimited)."""
        return self._capacity

    @property
    def now(self) -> float:
        """The time up to which the flows have progressed."""
        return self._now

    def rates(self) -> dict[Hashable, float]:
        """Current rate (bytes/s) of every active flow, in start order."""
        return {self._ids[i]: float(self._rate[i]) for i in self._in_start_order()}

    def active(self) -> int:
        """Number of flows in progress (not counting completed ones awaiting :meth:`advance`)."""
        return len(self._ids)

    def remaining(self, flow_id: Hashable) -> float:
        """Bytes still to move for ``flow_id`` as of :attr:`now` (0 once it completed)."""
        i = self._index.get(flow_id)
        if i is not None:
            return float(self._rem[i])
        if flow_id in self._done_ids:
            return 0.0
        raise KeyError(f"unknown flow {flow_id!r}")

    def __contains__(self, flow_id: object) -> bool:
        return flow_id in self._index or flow_id in self._done_ids

    # -- events ----------------------------------------------------------------------------
    def start(self, flow_id: Hashable, nbytes: float, cap_bps: float, now: float) -> None:
        """Start moving ``nbytes`` for ``flow_id`` at time ``now``, at most ``cap_bps`` bytes/s."""
        if flow_id in self:
            raise ValueError(f"flow {flow_id!r} is already on the link")
        if not (isinstance(nbytes, Real) and math.isfinite(nbytes) and nbytes >= 0):
            raise ValueError(f"nbytes must be a finite number >= 0, got {nbytes!r}")
        if not (isinstance(cap_bps, Real) and math.isfinite(cap_bps) and cap_bps > 0):
            raise ValueError(f"cap_bps must be a positive finite number, got {cap_bps!r}")
        self._progress(now)
        if nbytes == 0:
            self._finish(flow_id, self._now)
            self._seq += 1
            return
        self._add(flow_id, float(nbytes), float(nbytes), float(cap_bps), self._seq, self._now)
        self._seq += 1
        self._reallocate()

    def cancel(self, flow_id: Hashable, now: float) -> None:
        """Stop ``flow_id`` at time ``now`` (also drops it if it completed but was not yet reported)."""
        self._progress(now)
        i = self._index.get(flow_id)
        if i is not None:
            self._remove([i])
            self._reallocate()
            return
        if flow_id in self._done_ids:
            for k, (_, fid) in enumerate(self._done):
                if fid == flow_id:
                    del self._done[k]
                    self._done_ids.discard(flow_id)
                    return
        raise KeyError(f"unknown flow {flow_id!r}")

    def set_capacity(self, capacity: float | None, now: float) -> None:
        """Progress to ``now`` at the old rates, then share ``capacity`` (None: unlimited)."""
        capacity = _norm_capacity(capacity)
        self._progress(now)
        self._capacity = capacity
        self._reallocate()

    def next_completion(self) -> tuple[float, Hashable] | None:
        """``(time, flow_id)`` of the earliest completion under the current rates, or None.

        Completions already reached but not yet returned by :meth:`advance` come first. Ties go to
        the flow started first.
        """
        if self._done:
            return self._done[0]
        if not self._ids:
            return None
        finish = self._finish_times()
        i = self._earliest(finish)
        return (float(finish[i]), self._ids[i])

    def advance(self, now: float) -> list[Hashable]:
        """Progress all flows to ``now``; return the flows completed at or before ``now``.

        Rates are re-shared after each completion inside the interval. The list is in completion
        order (ties: start order) and each flow is returned once.
        """
        self._progress(now)
        done = [fid for _, fid in self._done]
        self._done = []
        self._done_ids = set()
        return done

    # -- checkpoints -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """A plain-data snapshot (flow ids as they are), flows in start order."""
        return {
            "capacity": self._capacity,
            "now": self._now,
            "seq": self._seq,
            "flows": [
                {
                    "id": self._ids[i],
                    "nbytes": float(self._nbytes[i]),
                    "remaining": float(self._rem[i]),
                    "cap": float(self._cap[i]),
                    "seq": int(self._seqs[i]),
                    "started": float(self._started[i]),
                }
                for i in self._in_start_order()
            ],
            "done": [[t, fid] for t, fid in self._done],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a snapshot from :meth:`state_dict`; rates are recomputed."""
        self._capacity = _norm_capacity(state["capacity"])
        self._now = float(state["now"])
        self._seq = int(state["seq"])
        self._ids, self._index = [], {}
        self._nbytes, self._rem, self._cap, self._started, self._rate = (np.empty(0) for _ in range(5))
        self._seqs = np.empty(0, dtype=np.int64)
        for f in state["flows"]:
            self._add(f["id"], float(f["nbytes"]), float(f["remaining"]), float(f["cap"]), int(f["seq"]),
                      float(f["started"]))
        self._done = [(float(t), fid) for t, fid in state["done"]]
        self._done_ids = {fid for _, fid in self._done}
        self._reallocate()

    # -- internals -------------------------------------------------------------------------
    def _add(self, fid: Hashable, nbytes: float, remaining: float, cap: float, seq: int, started: float) -> None:
        n = len(self._ids)
        if n == self._rem.size:  # grow the arrays geometrically
            size = max(16, 2 * n)
            for name in ("_nbytes", "_rem", "_cap", "_started", "_rate", "_seqs"):
                old = getattr(self, name)
                new = np.zeros(size, dtype=old.dtype)
                new[:n] = old[:n]
                setattr(self, name, new)
        self._nbytes[n], self._rem[n], self._cap[n], self._seqs[n], self._started[n] = nbytes, remaining, cap, seq, started
        self._rate[n] = 0.0
        self._ids.append(fid)
        self._index[fid] = n

    def _remove(self, slots: list[int]) -> None:
        """Drop the flows in ``slots``: each is filled with the last active flow."""
        for i in sorted(slots, reverse=True):
            last = len(self._ids) - 1
            fid = self._ids[i]
            del self._index[fid]
            if i != last:
                moved = self._ids[last]
                self._ids[i] = moved
                self._index[moved] = i
                for arr in (self._nbytes, self._rem, self._cap, self._started, self._rate, self._seqs):
                    arr[i] = arr[last]
            self._ids.pop()

    def _finish(self, fid: Hashable, t: float) -> None:
        self._done.append((t, fid))
        self._done_ids.add(fid)

    def _in_start_order(self) -> list[int]:
        n = len(self._ids)
        return [int(i) for i in np.argsort(self._seqs[:n], kind="stable")]

    def _reallocate(self) -> None:
        n = len(self._ids)
        if n:
            self._rate[:n] = _water_fill_arrays(self._cap[:n], self._seqs[:n], self._capacity)

    def _finish_times(self) -> np.ndarray:
        n = len(self._ids)
        with np.errstate(divide="ignore", invalid="ignore"):
            return self._now + self._rem[:n] / self._rate[:n]

    def _earliest(self, finish: np.ndarray) -> int:
        """The slot of the earliest finish time (ties: the flow started first)."""
        ties = np.flatnonzero(finish == finish.min())
        if ties.size == 1:
            return int(ties[0])
        return int(ties[np.argmin(self._seqs[ties])])

    def _check_time(self, now: float) -> float:
        if math.isnan(now):
            raise ValueError("time must be a number, got nan")
        if now < self._now:
            if self._now - now <= 1e-12 * max(1.0, abs(self._now)):
                return self._now
            raise ValueError(f"time went backwards: {now!r} < {self._now!r}")
        return float(now)

    def _move(self, t: float) -> None:
        dt = t - self._now
        n = len(self._ids)
        if dt > 0 and n:
            left = self._rem[:n] - self._rate[:n] * dt
            self._rem[:n] = np.where(left > 0.0, left, 0.0)  # max(0, .), a negative zero included
        self._now = t

    def _progress(self, now: float) -> None:
        now = self._check_time(now)
        while self._ids:
            finish = self._finish_times()
            t_event = float(finish[self._earliest(finish)])
            if t_event > now:
                break
            self._move(t_event)
            n = len(self._ids)
            done = np.flatnonzero((finish <= t_event) | (self._rem[:n] <= DONE_TOLERANCE * self._nbytes[:n]))
            order = done[np.lexsort((self._seqs[done], finish[done]))]  # by finish time, then start order
            self._complete([int(i) for i in order], t_event)
        self._move(now)
        n = len(self._ids)
        if n:
            done = np.flatnonzero(self._rem[:n] <= DONE_TOLERANCE * self._nbytes[:n])
            if done.size:
                order = done[np.argsort(self._seqs[done], kind="stable")]
                self._complete([int(i) for i in order], now)

    def _complete(self, slots: list[int], t: float) -> None:
        for i in slots:
            self._finish(self._ids[i], t)
        self._remove(slots)
        self._reallocate()


def _water_fill_arrays(caps: np.ndarray, seqs: np.ndarray, capacity: float | None) -> np.ndarray:
    """:func:`water_fill` over arrays: flows visited by increasing cap, ties by start sequence
    number, with the loop's arithmetic (the running remainder ``R`` is a left fold of
    subtractions, the share ``R / left``), so the rates equal the loop's to the last bit."""
    if capacity is None or math.isinf(capacity):
        return caps.copy()
    n = caps.size
    order = np.lexsort((seqs, caps))
    sorted_caps = caps[order]
    remaining = np.subtract.accumulate(np.concatenate(([float(capacity)], sorted_caps)))[:n]
    share = remaining / np.arange(n, 0, -1, dtype=np.float64)
    below = sorted_caps <= share
    stop = n if bool(below.all()) else int(np.argmin(below))  # the first flow that gets the share
    rates = np.empty(n)
    sorted_rates = np.empty(n)
    sorted_rates[:stop] = sorted_caps[:stop]
    if stop < n:
        sorted_rates[stop:] = share[stop]
    rates[order] = sorted_rates
    return rates
