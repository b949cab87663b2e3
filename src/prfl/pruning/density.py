"""Density control: each client's sub-model density from its observed round times.

``Q_i`` is a FIFO of client i's last ``I`` round times and ``t_i = mean(Q_i)``.

- Rule A (default): ``rho_i = max(min_j t_j / t_i, rho_min_i)``.
- Rule B (the PR-FL reference): start from preset densities; at each control step, with
  ``rate = (t_i - t_a) / t_i`` against an anchor client ``a`` (the reference's client 0, its
  fastest device; here ``anchor``, or the client with the smallest mean when no anchor is set), if
  ``|rate| > 0.05`` then ``rho_i <- round(rho_i * (1 - 0.9 * rate), 2)``, never below
  ``rho_min_i`` (nor above 1). A client faster than the anchor (rate < 0) gets a denser model.

A step below ``step_floor`` is not taken (the density stays); one taken below the client's
minimum is clamped to it, and :attr:`DensityController.clamped` names the clients it was. Recoveries raise the
minimums (:meth:`~DensityController.raise_minimum`), and :meth:`~DensityController.lift_minimums`
lets them follow the lowest density upwards, as the reference's global minimum does.

Clients with no observation yet keep their density.

Time basis. The rules compare a client's round time with the fastest client's to find the density
that would make it as fast. A round observed at density rho is faster than the same client's
round at full density, so with ``time_basis="dense"`` (default) each observation is stored as its
dense equivalent ``t / rho``; rule A then gives ``rho_i = t_fastest / (t_i / rho_i)``, a
multiplicative step towards equal round times. ``time_basis="observed"`` uses the raw times, which
makes rule A swing between a density and its reciprocal effect.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

RATE_DEADBAND = 0.05
RATE_GAIN = 0.9


@dataclass
class DensityController:
    """Round-time FIFOs, per-client minimum densities and the densities they imply."""

    num_clients: int
    interval: int = 50
    rule: Literal["A", "B"] = "A"
    global_min: float = 0.1
    initial: Sequence[float] | None = None
    time_basis: Literal["dense", "observed"] = "dense"
    # densities rounded down to multiples of step (None: not rounded). A fleet of thousands of
    # clients then shares a few sub-models (masks, residual pieces) instead of one per client.
    step: float | None = None
    anchor: int | None = None  # rule B's reference client (None: the client with the smallest mean)
    # a rule step below this is not taken: the density stays where it was (the reference's
    # per-dataset floor, R:2332); None: every step is taken. A step taken below a client's
    # minimum is clamped to it, and listed in ``clamped``
    step_floor: float | None = None
    densities: list[float] = field(init=False)
    minimums: list[float] = field(init=False)
    queues: list[deque[float]] = field(init=False)
    clamped: list[int] = field(init=False)  # the clients the last update() clamped to their minimum

    def __post_init__(self) -> None:
        if self.rule not in ("A", "B"):
            raise ValueError(f"density rule must be 'A' or 'B', got {self.rule!r}")
        if self.time_basis not in ("dense", "observed"):
            raise ValueError(f"time_basis must be 'dense' or 'observed', got {self.time_basis!r}")
        if self.interval < 1:
            raise ValueError(f"interval must be at least 1, got {self.interval}")
        if self.step_floor is not None and not 0 <= self.step_floor <= 1:
            raise ValueError(f"step floor must lie in [0, 1], got {self.step_floor}")
        if self.anchor is not None and not 0 <= self.anchor < self.num_clients:
            raise ValueError(f"anchor client {self.anchor} out of range [0, {self.num_clients})")
        if self.step is not None and not 0 < self.step <= 1:
            raise ValueError(f"density step must lie in (0, 1], got {self.step}")
        if not 0 < self.global_min <= 1:
            raise ValueError(f"global minimum density must lie in (0, 1], got {self.global_min}")
        if self.initial is not None:
            if len(self.initial) != self.num_clients:
                raise ValueError(f"{len(self.initial)} initial densities for {self.num_clients} clients")
            if any(not 0 < d <= 1 for d in self.initial):
                raise ValueError(f"initial densities must lie in (0, 1], got {list(self.initial)}")
        start = list(self.initial) if self.initial is not None else [1.0] * self.num_clients
        self.minimums = [self.global_min] * self.num_clients
        self.densities = [max(d, self.global_min) for d in start]
        self.queues = [deque(maxlen=self.interval) for _ in range(self.num_clients)]
        self.clamped = []

    def observe(self, client: int, round_time: float, density: float = 1.0) -> None:
        """Append one round time (dispatch to arrival) of ``client``, trained at ``density``."""
        if round_time < 0:
            raise ValueError(f"round time must be non-negative, got {round_time}")
        if not 0 < density <= 1:
            raise ValueError(f"density must lie in (0, 1], got {density}")
        t = float(round_time) / density if self.time_basis == "dense" else float(round_time)
        self.queues[client].append(t)

    def mean_times(self) -> list[float | None]:
        return [sum(q) / len(q) if q else None for q in self.queues]

    def update(self) -> list[float]:
        """One control step; returns the new densities (``clamped`` lists the clients whose step
        went below their minimum)."""
        self.clamped = []
        t = self.mean_times()
        known = [x for x in t if x is not None and x > 0]
        if not known:
            return list(self.densities)
        fastest = min(known)
        if self.rule == "B" and self.anchor is not None:
            ta = t[self.anchor]
            if ta is None or ta <= 0:
                return list(self.densities)  # the anchor has not reported yet
            fastest = ta
        for i, ti in enumerate(t):
            if ti is None or ti <= 0:
                continue
            if self.rule == "A":
                rho = fastest / ti
            else:
                rate = (ti - fastest) / ti
                rho = self.densities[i]
                if abs(rate) > RATE_DEADBAND:
                    rho = round(rho * (1 - RATE_GAIN * rate), 2)
            if self.step is not None:
                rho = round(self.step * math.floor(rho / self.step + 1e-9), 10)
            if self.step_floor is not None and rho < self.step_floor - 1e-12:
                continue
            if rho < self.minimums[i] - 1e-12:
                self.clamped.append(i)
            self.densities[i] = min(1.0, max(rho, self.minimums[i]))
        return list(self.densities)

    def raise_minimum(self, client: int | None, delta: float) -> None:
        """Recovery: raise ``rho_min`` of one client (or all, ``None``) by ``delta``, capped at 1."""
        for i in range(self.num_clients) if client is None else [client]:
            self.minimums[i] = min(1.0, round(self.minimums[i] + delta, 10))
            self.densities[i] = max(self.densities[i], self.minimums[i])

    def lift_minimums(self, margin: float = 0.01) -> bool:
        """The reference's global minimum that follows the densities (R:1476-1484): when the
        lowest density lies more than ``margin`` above the lowest minimum, every minimum rises to
        that density (none falls). Returns whether they rose."""
        lowest = min(self.densities)
        if not round(lowest - min(self.minimums), 10) > margin:
            return False
        self.minimums = [max(m, lowest) for m in self.minimums]
        return True

    def raise_density(self, client: int, delta: float) -> None:
        """Recovery of one client as the reference code does it: its density itself rises by
        ``delta``, rounded up to the grid of a density ``step``, capped at 1 (its minimum stays; a
        rule still adapting may lower it again)."""
        rho = round(self.densities[client] + delta, 10)
        if self.step is not None:
            rho = round(self.step * math.ceil(rho / self.step - 1e-9), 10)
        self.densities[client] = min(1.0, rho)

    @property
    def all_dense(self) -> bool:
        return all(m >= 1.0 for m in self.minimums)

    def state_dict(self) -> dict[str, Any]:
        return {"densities": list(self.densities), "minimums": list(self.minimums), "queues": [list(q) for q in self.queues]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.densities = list(state["densities"])
        self.minimums = list(state["minimums"])
        self.queues = [deque(q, maxlen=self.interval) for q in state["queues"]]
