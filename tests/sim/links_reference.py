"""The reference implementation of ``prfl.sim.links.SharedLink`` as it was before its flows moved
into NumPy arrays: a loop over a dict of flows. ``test_links_oracle.py`` checks that the array
version gives the same results to the last bit; nothing else uses this module."""

from __future__ import annotations

import math
from collections.abc import Hashable
from dataclasses import dataclass
from numbers import Real
from typing import Any

from prfl.sim.links import DONE_TOLERANCE, _norm_capacity


def water_fill(caps: list[float], capacity: float | None) -> list[float]:
    """Max-min fair rates for flows with caps ``caps`` sharing ``capacity`` (None: unlimited).

    Flows whose cap is below the running fair share ``R / n`` keep their cap; the rest split the
    remainder ``R`` equally. Ties in caps are visited in list order, so the result is deterministic.
    """
    if capacity is None or math.isinf(capacity):
        return list(caps)
    rates = [0.0] * len(caps)
    order = sorted(range(len(caps)), key=lambda i: caps[i])
    remaining = float(capacity)
    left = len(caps)
    for pos, i in enumerate(order):
        share = remaining / left
        if caps[i] <= share:
            rates[i] = caps[i]
            remaining -= caps[i]
            left -= 1
        else:
            for j in order[pos:]:
                rates[j] = share
            break
    return rates


@dataclass
class _Flow:
    nbytes: float
    remaining: float
    cap: float
    seq: int
    started: float
    rate: float = 0.0


class ReferenceLink:
    """The pure-Python link (prfl before its flows moved into arrays), kept as the oracle.

    Times are seconds on the simulator's clock and must never decrease between calls.
    Flow ids are any hashable values (picklable if the link is checkpointed).
    """

    def __init__(self, capacity_bps: float | None) -> None:
        self._capacity = _norm_capacity(capacity_bps)
        self._now = 0.0
        self._seq = 0
        self._flows: dict[Hashable, _Flow] = {}
        self._done: list[tuple[float, Hashable]] = []

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
        """Current rate (bytes/s) of every active flow."""
        return {fid: f.rate for fid, f in self._flows.items()}

    def active(self) -> int:
        """Number of flows in progress (not counting completed ones awaiting :meth:`advance`)."""
        return len(self._flows)

    def remaining(self, flow_id: Hashable) -> float:
        """Bytes still to move for ``flow_id`` as of :attr:`now` (0 once it completed)."""
        if flow_id in self._flows:
            return self._flows[flow_id].remaining
        if any(fid == flow_id for _, fid in self._done):
            return 0.0
        raise KeyError(f"unknown flow {flow_id!r}")

    def __contains__(self, flow_id: object) -> bool:
        return flow_id in self._flows or any(fid == flow_id for _, fid in self._done)

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
            self._done.append((self._now, flow_id))
            self._seq += 1
            return
        self._flows[flow_id] = _Flow(float(nbytes), float(nbytes), float(cap_bps), self._seq, self._now)
        self._seq += 1
        self._reallocate()

    def cancel(self, flow_id: Hashable, now: float) -> None:
        """Stop ``flow_id`` at time ``now`` (also drops it if it completed but was not yet reported)."""
        self._progress(now)
        if flow_id in self._flows:
            del self._flows[flow_id]
            self._reallocate()
            return
        for k, (_, fid) in enumerate(self._done):
            if fid == flow_id:
                del self._done[k]
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
        nxt = self._earliest()
        return None if nxt is None else (nxt[0], nxt[2])

    def advance(self, now: float) -> list[Hashable]:
        """Progress all flows to ``now``; return the flows completed at or before ``now``.

        Rates are re-shared after each completion inside the interval. The list is in completion
        order (ties: start order) and each flow is returned once.
        """
        self._progress(now)
        done = [fid for _, fid in self._done]
        self._done = []
        return done

    # -- checkpoints -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """A plain-data snapshot (flow ids as they are)."""
        return {
            "capacity": self._capacity,
            "now": self._now,
            "seq": self._seq,
            "flows": [
                {
                    "id": fid,
                    "nbytes": f.nbytes,
                    "remaining": f.remaining,
                    "cap": f.cap,
                    "seq": f.seq,
                    "started": f.started,
                }
                for fid, f in self._flows.items()
            ],
            "done": [[t, fid] for t, fid in self._done],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a snapshot from :meth:`state_dict`; rates are recomputed."""
        self._capacity = _norm_capacity(state["capacity"])
        self._now = float(state["now"])
        self._seq = int(state["seq"])
        self._flows = {
            f["id"]: _Flow(
                float(f["nbytes"]), float(f["remaining"]), float(f["cap"]), int(f["seq"]), float(f["started"])
            )
            for f in state["flows"]
        }
        self._done = [(float(t), fid) for t, fid in state["done"]]
        self._reallocate()

    # -- internals -------------------------------------------------------------------------
    def _reallocate(self) -> None:
        flows = list(self._flows.values())
        for f, r in zip(flows, water_fill([f.cap for f in flows], self._capacity)):
            f.rate = r

    def _finish_time(self, f: _Flow) -> float:
        return self._now + f.remaining / f.rate

    def _earliest(self) -> tuple[float, int, Hashable] | None:
        best: tuple[float, int, Hashable] | None = None
        for fid, f in self._flows.items():
            cand = (self._finish_time(f), f.seq, fid)
            if best is None or cand[:2] < best[:2]:
                best = cand
        return best

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
        if dt > 0:
            for f in self._flows.values():
                f.remaining = max(0.0, f.remaining - f.rate * dt)
        self._now = t

    def _progress(self, now: float) -> None:
        now = self._check_time(now)
        while self._flows:
            nxt = self._earliest()
            assert nxt is not None
            t_event = nxt[0]
            if t_event > now:
                break
            finish = {fid: self._finish_time(f) for fid, f in self._flows.items()}
            self._move(t_event)
            finished = [
                fid
                for fid, f in self._flows.items()
                if finish[fid] <= t_event or f.remaining <= DONE_TOLERANCE * f.nbytes
            ]
            self._complete(sorted(finished, key=lambda fid: (finish[fid], self._flows[fid].seq)), t_event)
        self._move(now)
        finished = [fid for fid, f in self._flows.items() if f.remaining <= DONE_TOLERANCE * f.nbytes]
        if finished:
            self._complete(sorted(finished, key=lambda fid: self._flows[fid].seq), now)

    def _complete(self, finished: list[Hashable], t: float) -> None:
        for fid in finished:
            del self._flows[fid]
            self._done.append((t, fid))
        self._reallocate()
