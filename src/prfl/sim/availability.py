"""Client availability: on/off periods on the simulator's clock.

A model answers two questions for client ``c`` at time ``t >= 0``: ``is_online(c, t)`` and
``next_change(c, t)``, the first time ``s > t`` at which the state flips (``inf`` if never).
States are right-continuous: at a change time ``s`` the client already has its new state, i.e. a
client is online on ``[s_on, s_off)``.

Models:

* :class:`AlwaysOn` - every client is online at all times.
* :class:`OnOffAvailability` - alternating online / offline periods with exponential lengths of
  means ``mean_on`` and ``mean_off``. In the long run the online fraction is
  ``mean_on / (mean_on + mean_off)``; with ``start_online_prob`` equal to that fraction the
  process is stationary from ``t = 0`` (exponential periods are memoryless).
* :class:`TraceAvailability` - offline intervals ``[t_off, t_on)`` given per client, e.g. from a
  YAML or CSV trace (:meth:`TraceAvailability.load`).
"""

from __future__ import annotations

import bisect
import csv
import math
from collections.abc import Iterable, Mapping
from numbers import Real
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import yaml

from prfl.seeding import rng_for

__all__ = [
    "AvailabilityError",
    "AvailabilityModel",
    "AlwaysOn",
    "OnOffAvailability",
    "TraceAvailability",
    "PERIOD_BLOCK",
]

PERIOD_BLOCK = 64
"""Exponential period lengths drawn per generator (see :class:`OnOffAvailability`)."""


class AvailabilityError(ValueError):
    """Raised for bad availability parameters, bad periods and malformed trace files."""


@runtime_checkable
class AvailabilityModel(Protocol):
    """When each client is online."""

    def is_online(self, client: int, t: float) -> bool:
        """Whether ``client`` is online at time ``t`` (state after any change at exactly ``t``)."""
        ...

    def next_change(self, client: int, t: float) -> float:
        """The first time ``s > t`` at which ``client``'s state flips, ``inf`` if never."""
        ...


def _check_time(t: float) -> None:
    if math.isnan(t) or t < 0:
        raise AvailabilityError(f"availability is defined for times t >= 0, got {t!r}")


def _state_at(initial: bool, changes: list[float], t: float) -> bool:
    """State at ``t`` given the initial state and sorted change times: flips = #{s <= t}."""
    return initial ^ (bisect.bisect_right(changes, t) % 2 == 1)


class AlwaysOn:
    """Every client is online at every time."""

    def is_online(self, client: int, t: float) -> bool:
        """Always True."""
        return True

    def next_change(self, client: int, t: float) -> float:
        """Always ``inf``."""
        return math.inf


class OnOffAvailability:
    """Alternating online / offline periods with exponential lengths, drawn by address.

    Client ``c`` starts online iff ``U < start_online_prob`` with ``U ~ Uniform[0, 1)`` from
    address ``(run_seed, "availability", c, 0)``. Period ``k = 0, 1, ...`` (period 0 starts at
    ``t = 0`` in the initial state, states alternate) has length ``L_k = m_k * E_k`` where
    ``m_k`` is ``mean_on`` for an online period and ``mean_off`` for an offline one and
    ``E_k ~ Exp(1)`` is draw ``k mod 64`` of the generator at address
    ``(run_seed, "availability", c, 1 + k // 64)``. Change times are ``s_k = L_0 + ... + L_k``.

    The change points are random-access (any order of queries gives the same answers); they are
    generated lazily and cached per client. ``mean_on`` or ``mean_off`` may be ``inf``
    (the client never leaves that state).
    """

    def __init__(
        self, mean_on: float, mean_off: float, run_seed: int, start_online_prob: float = 1.0
    ) -> None:
        for name, value in (("mean_on", mean_on), ("mean_off", mean_off)):
            bad_type = isinstance(value, bool) or not isinstance(value, Real)
            if bad_type or math.isnan(value) or value <= 0:
                raise AvailabilityError(f"{name} must be a positive number of seconds, got {value!r}")
        if not 0.0 <= start_online_prob <= 1.0:
            raise AvailabilityError(f"start_online_prob must be in [0, 1], got {start_online_prob!r}")
        if isinstance(run_seed, bool) or not isinstance(run_seed, int) or run_seed < 0:
            raise AvailabilityError(f"run_seed must be a non-negative integer, got {run_seed!r}")
        self.mean_on = float(mean_on)
        self.mean_off = float(mean_off)
        self.run_seed = run_seed
        self.start_online_prob = float(start_online_prob)
        self._initial: dict[int, bool] = {}
        self._changes: dict[int, list[float]] = {}
        self._blocks: dict[int, int] = {}

    @property
    def online_fraction(self) -> float:
        """Long-run fraction of time online: ``mean_on / (mean_on + mean_off)``."""
        if math.isinf(self.mean_on):
            return 1.0 if not math.isinf(self.mean_off) else math.nan
        return self.mean_on / (self.mean_on + self.mean_off)

    def initial_state(self, client: int) -> bool:
        """Whether ``client`` is online at ``t = 0``."""
        if client < 0:
            raise AvailabilityError(f"client must be >= 0, got {client}")
        if client not in self._initial:
            u = float(rng_for(self.run_seed, "availability", client, 0).random())
            self._initial[client] = u < self.start_online_prob
            self._changes[client] = []
            self._blocks[client] = 0
        return self._initial[client]

    def _extend_past(self, client: int, t: float) -> list[float]:
        """The cached change times of ``client``, extended until one exceeds ``t`` (or is inf)."""
        initial = self.initial_state(client)
        changes = self._changes[client]
        while not changes or (changes[-1] <= t and not math.isinf(changes[-1])):
            block = self._blocks[client]
            rng = rng_for(self.run_seed, "availability", client, 1 + block)
            draws = rng.standard_exponential(PERIOD_BLOCK)
            last = changes[-1] if changes else 0.0
            for j, e in enumerate(draws.tolist()):
                k = block * PERIOD_BLOCK + j
                online = initial ^ (k % 2 == 1)
                last = last + (self.mean_on if online else self.mean_off) * e
                changes.append(last)
                if math.isinf(last):
                    break
            self._blocks[client] = block + 1
        return changes

    def change_times(self, client: int, until: float) -> list[float]:
        """All change times of ``client`` up to and including the first one after ``until``."""
        _check_time(until)
        changes = self._extend_past(client, until)
        return changes[: bisect.bisect_right(changes, until) + 1]

    def is_online(self, client: int, t: float) -> bool:
        """Whether ``client`` is online at ``t``."""
        _check_time(t)
        changes = self._extend_past(client, t)
        return _state_at(self._initial[client], changes, t)

    def next_change(self, client: int, t: float) -> float:
        """The first change time ``> t`` (``inf`` if the client stays in its state for ever)."""
        _check_time(t)
        changes = self._extend_past(client, t)
        i = bisect.bisect_right(changes, t)
        return changes[i] if i < len(changes) else math.inf


class TraceAvailability:
    """Availability given as offline intervals ``[t_off, t_on)`` per client.

    ``periods[c]`` is a list of ``(t_off, t_on)`` pairs with ``0 <= t_off < t_on`` (``t_on`` may
    be ``inf``: offline for ever), sorted and non-overlapping; touching intervals are merged.
    Clients absent from ``periods`` are always online.
    """

    def __init__(self, periods: Mapping[int, Iterable[tuple[float, float]]], source: str = "") -> None:
        prefix = f"{source}: " if source else ""
        self._changes: dict[int, list[float]] = {}
        for client, intervals in periods.items():
            if isinstance(client, bool) or not isinstance(client, int) or client < 0:
                raise AvailabilityError(f"{prefix}client ids must be integers >= 0, got {client!r}")
            changes: list[float] = []
            prev_on = -math.inf
            for k, pair in enumerate(intervals):
                where = f"{prefix}client {client}, period {k}"
                try:
                    t_off, t_on = (float(x) for x in pair)
                except (TypeError, ValueError):
                    raise AvailabilityError(
                        f"{where}: expected a pair (t_off, t_on) of numbers, got {pair!r}"
                    ) from None
                if not (math.isfinite(t_off) and t_off >= 0):
                    raise AvailabilityError(f"{where}: t_off must be a finite time >= 0, got {t_off!r}")
                if not t_on > t_off:
                    raise AvailabilityError(f"{where}: t_on must be after t_off, got ({t_off!r}, {t_on!r})")
                if t_off < prev_on:
                    raise AvailabilityError(
                        f"{where}: overlaps or precedes the previous period ending at {prev_on!r}; "
                        "sort the periods and keep them disjoint"
                    )
                if changes and t_off == prev_on:
                    changes[-1] = t_on  # touching: merge with the previous offline period
                else:
                    changes.extend([t_off, t_on])
                prev_on = t_on
            if changes and math.isinf(changes[-1]):
                changes.pop()
            self._changes[client] = changes

    @property
    def periods(self) -> dict[int, list[tuple[float, float]]]:
        """The (merged) offline intervals per client."""
        out = {}
        for client, ch in self._changes.items():
            padded = ch + ([math.inf] if len(ch) % 2 else [])
            out[client] = [(padded[i], padded[i + 1]) for i in range(0, len(padded), 2)]
        return out

    def is_online(self, client: int, t: float) -> bool:
        """False iff ``t`` lies in one of ``client``'s offline intervals."""
        _check_time(t)
        return _state_at(True, self._changes.get(client, []), t)

    def next_change(self, client: int, t: float) -> float:
        """The first interval boundary ``> t``, ``inf`` if none."""
        _check_time(t)
        changes = self._changes.get(client, [])
        i = bisect.bisect_right(changes, t)
        return changes[i] if i < len(changes) else math.inf

    @classmethod
    def load(cls, path: str | Path) -> TraceAvailability:
        """Read a trace from YAML or CSV.

        YAML: a mapping ``client -> [[t_off, t_on], ...]``, optionally under a top-level
        ``clients:`` key; ``t_on`` may be ``.inf`` or ``null`` (offline for ever).
        CSV: header ``client,t_off,t_on``, one offline interval per row (empty ``t_on``: for ever).
        """
        path = Path(path)
        if not path.is_file():
            raise AvailabilityError(f"availability trace {path} does not exist")
        suffix = path.suffix.lower()
        if suffix in (".yaml", ".yml"):
            return cls(_read_yaml_trace(path), source=str(path))
        if suffix == ".csv":
            return cls(_read_csv_trace(path), source=str(path))
        raise AvailabilityError(f"{path}: unknown trace file type {suffix!r}; use .yaml, .yml or .csv")


def _read_yaml_trace(path: Path) -> dict[int, list[tuple[float, float]]]:
    try:
        doc: Any = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise AvailabilityError(f"{path}: not valid YAML: {exc}") from None
    if isinstance(doc, Mapping) and set(doc) == {"clients"}:
        doc = doc["clients"]
    if not isinstance(doc, Mapping):
        raise AvailabilityError(f"{path}: expected a mapping client -> [[t_off, t_on], ...]")
    out: dict[int, list[tuple[float, float]]] = {}
    for key, intervals in doc.items():
        try:
            client = int(key)
        except (TypeError, ValueError):
            raise AvailabilityError(f"{path}: client key {key!r} is not an integer") from None
        if not isinstance(intervals, list):
            raise AvailabilityError(f"{path}: client {client}: expected a list of [t_off, t_on] pairs")
        pairs = []
        for k, pair in enumerate(intervals):
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise AvailabilityError(
                    f"{path}: client {client}, period {k}: expected [t_off, t_on], got {pair!r}"
                )
            t_on = math.inf if pair[1] is None else pair[1]
            pairs.append((_num(path, f"client {client}, period {k}", "t_off", pair[0]),
                          _num(path, f"client {client}, period {k}", "t_on", t_on)))
        out[client] = pairs
    return out


def _num(path: Path, where: str, name: str, raw: Any) -> float:
    try:
        if isinstance(raw, bool):
            raise ValueError
        return float(raw)
    except (TypeError, ValueError):
        raise AvailabilityError(f"{path}: {where}: field {name!r} is not a number: {raw!r}") from None


def _read_csv_trace(path: Path) -> dict[int, list[tuple[float, float]]]:
    with path.open(newline="", encoding="utf-8") as fh:
        rows = [
            (line, [c.strip() for c in row])
            for line, row in enumerate(csv.reader(fh), start=1)
            if row and any(c.strip() for c in row) and not row[0].strip().startswith("#")
        ]
    expected = ["client", "t_off", "t_on"]
    if not rows or rows[0][1] != expected:
        raise AvailabilityError(f"{path}: the header must be {','.join(expected)}")
    out: dict[int, list[tuple[float, float]]] = {}
    for line, row in rows[1:]:
        if len(row) != 3:
            raise AvailabilityError(
                f"{path}: line {line}: expected 3 cells client,t_off,t_on, got {len(row)}"
            )
        try:
            client = int(row[0])
        except ValueError:
            raise AvailabilityError(
                f"{path}: line {line}: field 'client' is not an integer: {row[0]!r}"
            ) from None
        t_off = _num(path, f"line {line}", "t_off", row[1])
        t_on = math.inf if row[2] == "" else _num(path, f"line {line}", "t_on", row[2])
        out.setdefault(client, []).append((t_off, t_on))
    return out
