"""Device and server profiles, fleets of clients, and the per-task speed draws of the simulator.

Units: compute in FLOP/s, links in bytes/s (1 MB = 1e6 bytes, so "20 MB/s" is ``20e6``).

Per-task variability follows the reference setting of the paper: for every (client, task) the
simulator draws a factor

    F = (1/20) * sum_{j=1..20} X_j,   X_j ~ LogNormal(0, sigma) i.i.d.,

and the task's speed is ``mean_speed * F``. Hence ``E[speed] = mean_speed * exp(sigma^2 / 2)`` and
``sigma = 0`` gives exactly the mean speed. Every draw comes from its own generator, seeded by its
address (:func:`prfl.seeding.rng_for`):

* download and upload speeds of task ``task`` on client ``client``: stream ``"link"``, keys
  ``(client, task)`` (the first 20 samples give the download factor, the next 20 the upload factor);
* compute speed: stream ``"compute"``, keys ``(client, task)``;
* server speeds for draw key ``key``: stream ``"link"``, keys ``(SERVER_LINK_KEY, key)``, with
  ``SERVER_LINK_KEY = 2**32 - 1``, which is never a client index.

The sums use :func:`math.fsum` (correctly rounded), so a draw is identical in any process.

Speed changes. A fleet may carry :class:`SpeedChange` entries: from virtual time ``at`` on, the
listed clients get another mean profile (another client's starting device, ``like``, and/or
multipliers of compute and links). A task keeps the profile in force when it was dispatched, and
the per-task factors above keep their addresses, so a run with a change is the run without it up
to the first task dispatched at or after ``at``. For each client the latest change at or before
the dispatch time decides (changes do not compound: a change with no ``like`` and unit
multipliers restores the starting device).

Direction convention. A client *downloads* the model from the server and *uploads* its update to
it. ``ServerProfile.up_bps`` is the server's sending capacity, shared by concurrent client
downloads; ``ServerProfile.down_bps`` is its receiving capacity, shared by concurrent client uploads
(see :mod:`prfl.sim.links`). A server speed of ``math.inf`` means an unlimited server.
"""

from __future__ import annotations

import bisect
import csv
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from numbers import Real
from pathlib import Path
from typing import Any, Literal

import yaml

from prfl.seeding import rng_for

__all__ = [
    "FleetError",
    "DeviceProfile",
    "ServerProfile",
    "Fleet",
    "SpeedChange",
    "TaskSpeeds",
    "PRESETS",
    "SAMPLES_PER_DRAW",
    "SERVER_LINK_KEY",
    "MB",
    "PAPER_DOWN_MBPS",
    "PAPER_UP_MBPS",
    "PAPER_SERVER_DOWN_MBPS",
    "PAPER_SERVER_UP_MBPS",
    "UNLIMITED_SERVER",
    "draw_factor",
    "draw_task_speeds",
    "draw_server_speeds",
    "make_fleet",
    "parse_changes",
    "load_fleet",
    "save_fleet",
    "fleet_summary",
    "describe_change",
]

MB = 1e6
"""Bytes in one MB (decimal megabyte)."""

SAMPLES_PER_DRAW = 20
"""Number of LogNormal(0, sigma) samples averaged into one speed factor (paper)."""

SERVER_LINK_KEY = 2**32 - 1
"""First key of the server's draw addresses on stream ``"link"`` (never a client index)."""

PAPER_DOWN_MBPS: tuple[float, ...] = (20.0, 18.0, 12.0, 10.0, 6.0, 4.0, 2.5, 2.0, 2.0, 1.5)
PAPER_UP_MBPS: tuple[float, ...] = (5.0, 4.0, 3.0, 2.5, 1.5, 1.0, 0.6, 0.5, 0.5, 0.4)
PAPER_SERVER_DOWN_MBPS = 50.0
PAPER_SERVER_UP_MBPS = 10.0
PAPER_CLIENT_SIGMA = 0.3
PAPER_SERVER_SIGMA = 0.1

_CSV_COLUMNS = ("client", "compute_flops", "down_bps", "up_bps", "sigma")
_CLIENT_FIELDS = ("compute_flops", "down_bps", "up_bps", "sigma")
_SERVER_FIELDS = ("down_bps", "up_bps", "sigma")


class FleetError(ValueError):
    """Raised for bad profiles, unknown presets, bad preset options and malformed fleet files."""


def _check_speed(name: str, value: float, *, allow_inf: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise FleetError(f"{name} must be a number, got {value!r}")
    if math.isnan(value) or value <= 0 or (math.isinf(value) and not allow_inf):
        what = "a positive number" if allow_inf else "a positive finite number"
        raise FleetError(f"{name} must be {what}, got {value!r}")


def _check_sigma(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise FleetError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise FleetError(f"{name} must be a finite number >= 0, got {value!r}")


@dataclass(frozen=True)
class DeviceProfile:
    """A client's mean capabilities.

    ``compute_flops``: mean FLOP/s of local training; ``down_bps`` / ``up_bps``: mean download and
    upload speeds in bytes/s; ``sigma``: per-task variability, each task's speed being
    ``mean * mean_of_20(LogNormal(0, sigma))``.
    """

    compute_flops: float
    down_bps: float
    up_bps: float
    sigma: float = PAPER_CLIENT_SIGMA

    def __post_init__(self) -> None:
        _check_speed("compute_flops", self.compute_flops)
        _check_speed("down_bps", self.down_bps)
        _check_speed("up_bps", self.up_bps)
        _check_sigma("sigma", self.sigma)
        for name in ("compute_flops", "down_bps", "up_bps", "sigma"):
            object.__setattr__(self, name, float(getattr(self, name)))


@dataclass(frozen=True)
class ServerProfile:
    """The server's mean link capacities in bytes/s (``math.inf``: unlimited).

    ``up_bps`` is shared by client downloads, ``down_bps`` by client uploads; ``sigma`` is the
    variability of each server draw (same mean-of-20 LogNormal law as the clients).
    """

    down_bps: float
    up_bps: float
    sigma: float = PAPER_SERVER_SIGMA

    def __post_init__(self) -> None:
        _check_speed("server down_bps", self.down_bps, allow_inf=True)
        _check_speed("server up_bps", self.up_bps, allow_inf=True)
        _check_sigma("server sigma", self.sigma)
        for name in ("down_bps", "up_bps", "sigma"):
            object.__setattr__(self, name, float(getattr(self, name)))

    @property
    def unlimited(self) -> bool:
        """True when both directions have infinite capacity."""
        return math.isinf(self.down_bps) and math.isinf(self.up_bps)


UNLIMITED_SERVER = ServerProfile(down_bps=math.inf, up_bps=math.inf, sigma=0.0)
"""A server whose links never limit the clients (the default of fleet files without a server)."""


@dataclass(frozen=True)
class SpeedChange:
    """From virtual time ``at`` on, new mean speeds for some clients.

    ``clients``: the clients that change (None: every client). ``like``: the client whose starting
    device each of them takes, one per entry of ``clients`` in the same order (None: its own;
    ``"reversed"``, with every client changing: client i takes client n-1-i's device).
    ``compute``, ``down``, ``up``: multipliers of that device's compute and link means (its
    ``sigma`` is kept). Tasks dispatched at or after ``at`` use the new profile.
    """

    at: float
    clients: tuple[int, ...] | None = None
    like: tuple[int, ...] | Literal["reversed"] | None = None
    compute: float = 1.0
    down: float = 1.0
    up: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.at, bool) or not isinstance(self.at, Real) or not math.isfinite(self.at) or self.at < 0:
            raise FleetError(f"speed change: 'at' must be a finite number of virtual seconds >= 0, got {self.at!r}")
        object.__setattr__(self, "at", float(self.at))
        for name in ("compute", "down", "up"):
            _check_speed(f"speed change at {self.at:g} s: multiplier {name!r}", getattr(self, name))
            object.__setattr__(self, name, float(getattr(self, name)))
        if self.like == "reversed" and self.clients is not None:
            raise FleetError(f"speed change at {self.at:g} s: 'like: reversed' applies to every client; leave 'clients' out")
        for name in ("clients", "like"):
            ids = getattr(self, name)
            if ids is None or ids == "reversed":
                continue
            if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
                raise FleetError(f"speed change at {self.at:g} s: {name!r} must be a list of client indices, got {ids!r}")
            ids = tuple(ids)
            if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in ids):
                raise FleetError(f"speed change at {self.at:g} s: {name!r} must list client indices >= 0, got {list(ids)}")
            object.__setattr__(self, name, ids)
        if self.clients is not None:
            if not self.clients:
                raise FleetError(f"speed change at {self.at:g} s: 'clients' is empty; list at least one client or leave it out")
            if len(set(self.clients)) != len(self.clients):
                raise FleetError(f"speed change at {self.at:g} s: 'clients' names a client twice: {list(self.clients)}")
            if self.like is not None and len(self.like) != len(self.clients):
                raise FleetError(f"speed change at {self.at:g} s: 'like' has {len(self.like)} entries for "
                                 f"{len(self.clients)} clients; give one starting device per changed client")

    def targets(self, num_clients: int) -> tuple[int, ...]:
        """The clients this change applies to in a fleet of ``num_clients``."""
        return tuple(range(num_clients)) if self.clients is None else self.clients

    def as_dict(self) -> dict[str, Any]:
        """The change as the mapping :func:`parse_changes` reads (defaults left out)."""
        out: dict[str, Any] = {"at": self.at}
        if self.clients is not None:
            out["clients"] = list(self.clients)
        if self.like is not None:
            out["like"] = self.like if self.like == "reversed" else list(self.like)
        for name in ("compute", "down", "up"):
            if getattr(self, name) != 1.0:
                out[name] = getattr(self, name)
        return out


_CHANGE_FIELDS = ("at", "clients", "like", "compute", "down", "up")


def parse_changes(raw: Any, where: str = "fleet changes") -> tuple[SpeedChange, ...]:
    """Speed changes from plain data: a list of mappings with keys ``at`` (virtual s), optional
    ``clients`` (a list of client indices; default every client), ``like`` (one client index per
    changed client, or ``reversed``: client i takes the starting device of client n-1-i, with
    ``clients`` left out) and the multipliers ``compute``, ``down``, ``up`` (default 1)."""
    if raw is None:
        return ()
    if not isinstance(raw, (list, tuple)):
        raise FleetError(f"{where}: expected a list of changes such as [{{at: 3000, like: reversed}}], got {raw!r}")
    out = []
    for k, entry in enumerate(raw):
        here = f"{where}[{k}]"
        entry = _check_keys(here, entry, _CHANGE_FIELDS)
        if "at" not in entry:
            raise FleetError(f"{here}: field 'at' missing; give the virtual second the change takes effect")
        try:
            out.append(SpeedChange(at=entry["at"], clients=entry.get("clients"), like=entry.get("like"),
                                   **{m: entry[m] for m in ("compute", "down", "up") if m in entry}))
        except FleetError as exc:
            raise FleetError(f"{here}: {exc}") from None
    return tuple(out)


@dataclass(frozen=True)
class Fleet:
    """The clients' starting profiles (client ``i`` is ``clients[i]``), the server, a display
    name, and the clients' speed changes over time (see :class:`SpeedChange`)."""

    clients: tuple[DeviceProfile, ...]
    server: ServerProfile
    name: str = ""
    changes: tuple[SpeedChange, ...] = ()

    def __post_init__(self) -> None:
        clients = tuple(self.clients)
        if not clients:
            raise FleetError("a fleet needs at least one client")
        for i, c in enumerate(clients):
            if not isinstance(c, DeviceProfile):
                raise FleetError(f"client {i} is a {type(c).__name__}, expected a DeviceProfile")
        if not isinstance(self.server, ServerProfile):
            raise FleetError(f"server is a {type(self.server).__name__}, expected a ServerProfile")
        object.__setattr__(self, "clients", clients)
        n = len(clients)
        changes = []
        for ch in self.changes:
            if not isinstance(ch, SpeedChange):
                raise FleetError(f"a speed change is a {type(ch).__name__}, expected a SpeedChange")
            if ch.like == "reversed":
                ch = SpeedChange(ch.at, None, tuple(range(n - 1, -1, -1)), ch.compute, ch.down, ch.up)
            if ch.clients is None and ch.like is not None and len(ch.like) != n:
                raise FleetError(f"speed change at {ch.at:g} s: 'like' has {len(ch.like)} entries for the fleet's "
                                 f"{n} clients; give one starting device per client")
            bad = [i for i in (*(ch.clients or ()), *(ch.like or ())) if i >= n]
            if bad:
                raise FleetError(f"speed change at {ch.at:g} s names client {bad[0]}, but the fleet has {n} "
                                 f"clients (0..{n - 1})")
            changes.append(ch)
        seen: set[tuple[float, int]] = set()
        for ch in changes:
            for c in ch.targets(n):
                if (ch.at, c) in seen:
                    raise FleetError(f"two speed changes of client {c} at {ch.at:g} s; merge them into one")
                seen.add((ch.at, c))
        # stable by time: for each client the latest change at or before a dispatch decides
        changes.sort(key=lambda ch: ch.at)
        object.__setattr__(self, "changes", tuple(changes))
        timeline: dict[int, tuple[list[float], list[DeviceProfile]]] = {}
        for ch in changes:
            for k, c in enumerate(ch.targets(n)):
                base = clients[c] if ch.like is None else clients[ch.like[k]]
                times, profiles = timeline.setdefault(c, ([], []))
                times.append(ch.at)
                profiles.append(DeviceProfile(base.compute_flops * ch.compute, base.down_bps * ch.down,
                                              base.up_bps * ch.up, sigma=base.sigma))
        object.__setattr__(self, "_timeline", timeline)

    def __len__(self) -> int:
        return len(self.clients)

    def profile_at(self, client: int, t: float) -> DeviceProfile:
        """Client ``client``'s mean profile for a task dispatched at virtual time ``t``."""
        entry = self._timeline.get(client)  # type: ignore[attr-defined]
        if entry is not None:
            k = bisect.bisect_right(entry[0], t)
            if k:
                return entry[1][k - 1]
        return self.clients[client]


@dataclass(frozen=True)
class TaskSpeeds:
    """The speeds a client has during one task: FLOP/s and bytes/s."""

    compute_flops: float
    down_bps: float
    up_bps: float


# ----------------------------------------------------------------------------------------------
# Per-task draws
# ----------------------------------------------------------------------------------------------


def draw_factor(rng: Any, sigma: float, count: int = 1) -> list[float]:
    """``count`` factors ``F = fsum(X_1..X_20) / 20``, ``X_j ~ LogNormal(0, sigma)``, from ``rng``.

    ``sigma == 0`` returns exactly 1.0 without consuming draws.
    """
    if sigma == 0:
        return [1.0] * count
    samples = rng.lognormal(0.0, sigma, size=(count, SAMPLES_PER_DRAW))
    return [math.fsum(row.tolist()) / SAMPLES_PER_DRAW for row in samples]


def _check_address(fleet: Fleet, client: int, task: int, run_seed: int) -> None:
    if not 0 <= client < len(fleet):
        raise IndexError(f"client {client} is not in the fleet of {len(fleet)} clients")
    if task < 0 or run_seed < 0:
        raise ValueError(f"task and run_seed must be >= 0, got task={task}, run_seed={run_seed}")


def draw_task_speeds(fleet: Fleet, client: int, task: int, run_seed: int, at: float = 0.0) -> TaskSpeeds:
    """The speeds of ``client`` during its task number ``task``, dispatched at virtual time ``at``.

    ``down = down_bps * F_down``, ``up = up_bps * F_up`` (stream ``"link"``, keys ``(client, task)``),
    ``compute = compute_flops * F_compute`` (stream ``"compute"``, keys ``(client, task)``), each
    ``F`` the mean of 20 LogNormal(0, sigma) samples, and the means those of the profile in force
    at ``at`` (:meth:`Fleet.profile_at`). The result depends only on the address and ``at``.
    """
    _check_address(fleet, client, task, run_seed)
    profile = fleet.profile_at(client, at)
    if profile.sigma == 0:
        return TaskSpeeds(profile.compute_flops, profile.down_bps, profile.up_bps)
    f_down, f_up = draw_factor(rng_for(run_seed, "link", client, task), profile.sigma, 2)
    (f_compute,) = draw_factor(rng_for(run_seed, "compute", client, task), profile.sigma, 1)
    return TaskSpeeds(
        compute_flops=profile.compute_flops * f_compute,
        down_bps=profile.down_bps * f_down,
        up_bps=profile.up_bps * f_up,
    )


def draw_server_speeds(fleet: Fleet, key: int, run_seed: int) -> tuple[float, float]:
    """The server's ``(down_bps, up_bps)`` for draw ``key`` (e.g. a time slot or dispatch index).

    Each is ``mean * F`` with ``F`` the mean of 20 LogNormal(0, server.sigma) samples, drawn at
    stream ``"link"``, keys ``(SERVER_LINK_KEY, key)``. An infinite mean stays infinite.
    """
    if key < 0 or run_seed < 0:
        raise ValueError(f"key and run_seed must be >= 0, got key={key}, run_seed={run_seed}")
    server = fleet.server
    if server.sigma == 0:
        return server.down_bps, server.up_bps
    f_down, f_up = draw_factor(rng_for(run_seed, "link", SERVER_LINK_KEY, key), server.sigma, 2)
    return server.down_bps * f_down, server.up_bps * f_up


# ----------------------------------------------------------------------------------------------
# Presets
# ----------------------------------------------------------------------------------------------

_SERVER_OPTIONS = ("server_down_bps", "server_up_bps", "server_sigma")

PRESETS: dict[str, tuple[str, ...]] = {
    "paper10": ("compute_flops", "compute_spread", "sigma", "links", *_SERVER_OPTIONS),
    "lognormal": ("compute_flops", "down_bps", "up_bps", "spread", "correlated", "sigma", *_SERVER_OPTIONS),
    "uniform": ("compute_flops", "down_bps", "up_bps", "sigma", *_SERVER_OPTIONS),
}
"""Preset names and the options each accepts."""

_DEFAULTS: dict[str, Any] = {
    "compute_flops": 1e10,
    "down_bps": 5.0 * MB,
    "up_bps": 1.25 * MB,
    "sigma": PAPER_CLIENT_SIGMA,
    "spread": 1.0,
    "correlated": False,
    "server_down_bps": PAPER_SERVER_DOWN_MBPS * MB,
    "server_up_bps": PAPER_SERVER_UP_MBPS * MB,
    "server_sigma": PAPER_SERVER_SIGMA,
    "links": "paper",
}
_PAPER_DEFAULTS: dict[str, Any] = {"compute_flops": 2e10, "compute_spread": 10.0, "links": "paper"}
PAPER_LINKS = ("paper", "fastest")
"""Values of the ``paper10`` option ``links``: the paper's per-client links, or the fastest client's for all."""


def _option(preset: str, options: Mapping[str, Any], name: str) -> Any:
    value = options.get(name, _PAPER_DEFAULTS.get(name) if preset == "paper10" else None)
    if value is None:
        value = _DEFAULTS[name]
    label = f"make_fleet({preset!r}) option {name!r}"
    if name == "links":
        if value not in PAPER_LINKS:
            raise FleetError(f"{label} must be one of {', '.join(map(repr, PAPER_LINKS))}, got {value!r}")
    elif name == "correlated":
        if not isinstance(value, bool):
            raise FleetError(f"{label} must be True or False, got {value!r}")
    elif name in ("sigma", "server_sigma", "spread"):
        _check_sigma(label, value)
    elif name == "compute_spread":
        _check_speed(label, value)
        if value < 1:
            raise FleetError(f"{label} is the ratio fastest/slowest and must be >= 1, got {value!r}")
    else:
        _check_speed(label, value, allow_inf=name.startswith("server_"))
    return value


def _paper_ranks(values: tuple[float, ...]) -> list[float]:
    """Fractional ranks of ``values`` sorted descending (0 = largest; ties share their mean rank)."""
    order = sorted(range(len(values)), key=lambda i: -values[i])
    ranks = [0.0] * len(values)
    pos = 0
    while pos < len(order):
        end = pos
        while end + 1 < len(order) and values[order[end + 1]] == values[order[pos]]:
            end += 1
        for k in range(pos, end + 1):
            ranks[order[k]] = (pos + end) / 2
        pos = end + 1
    return ranks


def _paper10(num_clients: int, opts: Mapping[str, Any]) -> tuple[DeviceProfile, ...]:
    n = len(PAPER_DOWN_MBPS)
    if num_clients % n != 0:
        raise FleetError(
            f"make_fleet('paper10') needs num_clients to be a multiple of {n} (the paper's {n} "
            f"clients, repeated), got {num_clients}"
        )
    fastest = _option("paper10", opts, "compute_flops")
    spread = _option("paper10", opts, "compute_spread")
    sigma = _option("paper10", opts, "sigma")
    # links="fastest": every client gets paper client 0's links (compute keeps its spread)
    fast_links = _option("paper10", opts, "links") == "fastest"
    ranks = _paper_ranks(PAPER_DOWN_MBPS)
    base = tuple(
        DeviceProfile(
            compute_flops=fastest * spread ** (-ranks[i] / (n - 1)),
            down_bps=PAPER_DOWN_MBPS[0 if fast_links else i] * MB,
            up_bps=PAPER_UP_MBPS[0 if fast_links else i] * MB,
            sigma=sigma,
        )
        for i in range(n)
    )
    return tuple(base[i % n] for i in range(num_clients))


def _lognormal(num_clients: int, seed: int, opts: Mapping[str, Any]) -> tuple[DeviceProfile, ...]:
    medians = [_option("lognormal", opts, k) for k in ("compute_flops", "down_bps", "up_bps")]
    spread = _option("lognormal", opts, "spread")
    correlated = _option("lognormal", opts, "correlated")
    sigma = _option("lognormal", opts, "sigma")
    clients = []
    for i in range(num_clients):
        z = rng_for(seed, "fleet", i).standard_normal(3)
        if correlated:
            z[1] = z[2] = z[0]
        means = [m * math.exp(spread * float(zk)) for m, zk in zip(medians, z)]
        clients.append(DeviceProfile(*means, sigma=sigma))
    return tuple(clients)


def make_fleet(preset: str, num_clients: int, seed: int = 0, **options: Any) -> Fleet:
    """A fleet of ``num_clients`` clients built from a named preset.

    Presets (every preset also takes ``server_down_bps``, ``server_up_bps``, ``server_sigma``,
    defaulting to the paper's server: 50 MB/s, 10 MB/s, sigma 0.1):

    * ``"paper10"``: the paper's 10 clients, download means [20, 18, 12, 10, 6, 4, 2.5, 2, 2, 1.5]
      MB/s, upload means [5, 4, 3, 2.5, 1.5, 1, .6, .5, .5, .4] MB/s (1 MB = 1e6 bytes), ``sigma``
      0.3. The paper measured compute instead of modelling it, so compute follows the download
      ranking with geometric spacing: ``compute_i = compute_flops * compute_spread^(-r_i / 9)``,
      ``r_i`` the fractional rank of client i's download speed (0 = fastest; the two 2 MB/s
      clients share rank 7.5). Defaults ``compute_flops=2e10`` (the fastest client) and
      ``compute_spread=10`` (fastest / slowest). ``links="fastest"`` gives every client the
      fastest client's links (20 and 5 MB/s; compute keeps its spread, ``compute_spread=1``
      removes that too); the default ``"paper"`` keeps the list above. ``num_clients`` must be a
      multiple of 10: client ``i`` gets the profile of paper client ``i % 10``.
    * ``"lognormal"``: client i's means are ``median_k * exp(spread * z_k)``, ``z ~ N(0, I_3)``
      drawn at address ``(seed, "fleet", i)`` (so the first clients do not change when
      ``num_clients`` grows); with ``correlated=True`` one shared ``z_0`` scales all three.
      Options: medians ``compute_flops`` (1e10), ``down_bps`` (5e6), ``up_bps`` (1.25e6),
      ``spread`` (1.0), ``correlated`` (False), per-task ``sigma`` (0.3).
    * ``"uniform"``: all clients equal: ``compute_flops`` (1e10), ``down_bps`` (5e6), ``up_bps``
      (1.25e6), ``sigma`` (0.3).

    ``seed`` is used by ``"lognormal"`` only.
    """
    if preset not in PRESETS:
        raise FleetError(f"unknown fleet preset {preset!r}; valid presets: {', '.join(PRESETS)}")
    if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
        raise FleetError(f"num_clients must be a positive integer, got {num_clients!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise FleetError(f"seed must be a non-negative integer, got {seed!r}")
    unknown = sorted(set(options) - set(PRESETS[preset]))
    if unknown:
        raise FleetError(
            f"unknown option(s) {', '.join(map(repr, unknown))} for fleet preset {preset!r}; "
            f"valid options: {', '.join(PRESETS[preset])}"
        )
    if preset == "paper10":
        clients = _paper10(num_clients, options)
    elif preset == "lognormal":
        clients = _lognormal(num_clients, seed, options)
    else:
        profile = DeviceProfile(
            *(_option(preset, options, k) for k in ("compute_flops", "down_bps", "up_bps")),
            sigma=_option(preset, options, "sigma"),
        )
        clients = (profile,) * num_clients
    server = ServerProfile(
        down_bps=_option(preset, options, "server_down_bps"),
        up_bps=_option(preset, options, "server_up_bps"),
        sigma=_option(preset, options, "server_sigma"),
    )
    return Fleet(clients=clients, server=server, name=preset)


# ----------------------------------------------------------------------------------------------
# Fleet files
# ----------------------------------------------------------------------------------------------


def _number(where: str, name: str, raw: Any, *, sigma: bool = False, allow_inf: bool = False) -> float:
    """Parse one numeric field of a fleet file, with an error naming its place and the fix."""
    if isinstance(raw, bool):
        value = math.nan
    elif isinstance(raw, Real):
        value = float(raw)
    else:
        try:
            value = float(str(raw).strip())
        except ValueError:
            raise FleetError(
                f"{where}: field {name!r} is not a number: {raw!r}; write a plain number such as 2e10"
            ) from None
    if sigma:
        if not math.isfinite(value) or value < 0:
            raise FleetError(f"{where}: field {name!r} must be a finite number >= 0, got {raw!r}")
    elif math.isnan(value) or value <= 0 or (math.isinf(value) and not allow_inf):
        raise FleetError(
            f"{where}: field {name!r} must be a positive {'number' if allow_inf else 'finite number'}, "
            f"got {raw!r}; speeds are in FLOP/s or bytes/s"
        )
    return value


def _load_csv(path: Path) -> Fleet:
    with path.open(newline="", encoding="utf-8") as fh:
        rows = [
            (line, [cell.strip() for cell in row])
            for line, row in enumerate(csv.reader(fh), start=1)
            if row and any(c.strip() for c in row) and not row[0].strip().startswith("#")
        ]
    if not rows:
        raise FleetError(f"{path}: empty fleet file; expected header {','.join(_CSV_COLUMNS[:4])}[,sigma]")
    header_line, header = rows[0]
    unknown = [h for h in header if h not in _CSV_COLUMNS]
    if unknown:
        raise FleetError(
            f"{path}: line {header_line}: unknown column(s) {', '.join(map(repr, unknown))}; "
            f"valid columns: {','.join(_CSV_COLUMNS)}"
        )
    missing = [c for c in _CSV_COLUMNS[:4] if c not in header]
    if missing:
        raise FleetError(
            f"{path}: missing column(s) {', '.join(map(repr, missing))}; "
            f"the header must be {','.join(_CSV_COLUMNS[:4])}[,sigma]"
        )
    if len(set(header)) != len(header):
        raise FleetError(f"{path}: line {header_line}: duplicate column names in {header}")
    by_id: dict[int, DeviceProfile] = {}
    for line, row in rows[1:]:
        if len(row) != len(header):
            raise FleetError(
                f"{path}: line {line}: {len(row)} cells for {len(header)} columns; "
                f"every row needs {','.join(header)}"
            )
        cells = dict(zip(header, row))
        where = f"{path}: line {line}"
        try:
            cid = int(cells["client"])
        except ValueError:
            raise FleetError(
                f"{where}: field 'client' must be an integer client index, got {cells['client']!r}"
            ) from None
        if cid < 0 or cid in by_id:
            raise FleetError(
                f"{where}: field 'client' must be a new index >= 0, got {cid} (duplicate or negative)"
            )
        values = {k: _number(f"{where} (client {cid})", k, cells[k]) for k in _CLIENT_FIELDS[:3]}
        raw_sigma = cells.get("sigma", "")
        sigma = (
            PAPER_CLIENT_SIGMA
            if raw_sigma == ""
            else _number(f"{where} (client {cid})", "sigma", raw_sigma, sigma=True)
        )
        by_id[cid] = DeviceProfile(**values, sigma=sigma)
    if not by_id:
        raise FleetError(f"{path}: no client rows after the header")
    gaps = sorted(set(range(len(by_id))) - set(by_id))
    if gaps:
        raise FleetError(
            f"{path}: client indices must be 0..{len(by_id) - 1} without gaps; missing {gaps[:5]}"
        )
    return Fleet(clients=tuple(by_id[i] for i in range(len(by_id))), server=UNLIMITED_SERVER, name=path.stem)


def _check_keys(where: str, mapping: Any, allowed: tuple[str, ...]) -> Mapping[str, Any]:
    if not isinstance(mapping, Mapping):
        raise FleetError(f"{where}: expected a mapping with keys {', '.join(allowed)}, got {mapping!r}")
    unknown = [k for k in mapping if k not in allowed]
    if unknown:
        raise FleetError(
            f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; valid keys: {', '.join(allowed)}"
        )
    return mapping


def _load_yaml(path: Path) -> Fleet:
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise FleetError(f"{path}: not valid YAML: {exc}") from None
    doc = _check_keys(str(path), doc, ("name", "server", "defaults", "clients", "changes"))
    defaults = _check_keys(f"{path}: defaults", doc.get("defaults") or {}, _CLIENT_FIELDS)
    defaults = {
        k: _number(f"{path}: defaults", k, v, sigma=k == "sigma") for k, v in defaults.items()
    }
    server = UNLIMITED_SERVER
    if doc.get("server") is not None:
        raw = _check_keys(f"{path}: server", doc["server"], _SERVER_FIELDS)
        for k in ("down_bps", "up_bps"):
            if k not in raw:
                raise FleetError(f"{path}: server: field {k!r} missing; add it (bytes/s, .inf for unlimited)")
        server = ServerProfile(
            down_bps=_number(f"{path}: server", "down_bps", raw["down_bps"], allow_inf=True),
            up_bps=_number(f"{path}: server", "up_bps", raw["up_bps"], allow_inf=True),
            sigma=_number(f"{path}: server", "sigma", raw.get("sigma", PAPER_SERVER_SIGMA), sigma=True),
        )
    entries = doc.get("clients")
    if not isinstance(entries, list) or not entries:
        raise FleetError(f"{path}: 'clients' must be a non-empty list of client mappings")
    clients: list[DeviceProfile] = []
    for i, entry in enumerate(entries):
        where = f"{path}: clients[{i}]"
        entry = _check_keys(where, entry, (*_CLIENT_FIELDS, "count"))
        values: dict[str, float] = {}
        for k in _CLIENT_FIELDS:
            if k in entry:
                values[k] = _number(where, k, entry[k], sigma=k == "sigma")
            elif k in defaults:
                values[k] = defaults[k]
            elif k == "sigma":
                values[k] = PAPER_CLIENT_SIGMA
            else:
                raise FleetError(f"{where}: field {k!r} missing; add it here or under 'defaults'")
        count = entry.get("count", 1)
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise FleetError(f"{where}: field 'count' must be a positive integer, got {count!r}")
        clients.extend([DeviceProfile(**values)] * count)
    name = doc.get("name")
    changes = parse_changes(doc.get("changes"), f"{path}: changes")
    try:
        return Fleet(clients=tuple(clients), server=server, name=str(name) if name is not None else path.stem,
                     changes=changes)
    except FleetError as exc:
        raise FleetError(f"{path}: {exc}") from None


def load_fleet(path: str | Path) -> Fleet:
    """Read a fleet from a ``.csv`` or ``.yaml``/``.yml`` file.

    CSV: header ``client,compute_flops,down_bps,up_bps[,sigma]`` (client indices 0..N-1 in any
    order; blank sigma = 0.3; lines starting with ``#`` are comments). A CSV has no server: the
    server is unlimited (:data:`UNLIMITED_SERVER`).

    YAML::

        name: my-fleet                      # optional (default: the file stem)
        server: {down_bps: 5.0e7, up_bps: 1.0e7, sigma: 0.1}   # optional (default: unlimited)
        defaults: {sigma: 0.3, up_bps: 1.0e6}                  # optional, any client field
        clients:
          - {compute_flops: 2.0e10, down_bps: 2.0e7, up_bps: 5.0e6}
          - {compute_flops: 2.0e9, down_bps: 1.5e6, count: 4}  # count: repeat this entry
        changes:                            # optional speed changes (see SpeedChange)
          - {at: 3000, like: reversed}      # client i takes client n-1-i's device
          - {at: 6000, clients: [0, 1], compute: 0.5, up: 0.25}

    Speeds are FLOP/s and bytes/s; ``.inf`` is allowed for server speeds only.
    """
    path = Path(path)
    if not path.is_file():
        raise FleetError(f"fleet file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _load_csv(path)
    if suffix in (".yaml", ".yml"):
        return _load_yaml(path)
    raise FleetError(f"{path}: unknown fleet file type {suffix!r}; use .csv, .yaml or .yml")


def save_fleet(fleet: Fleet, path: str | Path) -> None:
    """Write ``fleet`` as YAML (the format :func:`load_fleet` reads; floats round-trip exactly)."""
    path = Path(path)
    if path.suffix.lower() not in (".yaml", ".yml"):
        raise FleetError(f"{path}: save_fleet writes YAML; use a .yaml or .yml path")
    doc = {
        "name": fleet.name,
        "server": {
            "down_bps": float(fleet.server.down_bps),
            "up_bps": float(fleet.server.up_bps),
            "sigma": float(fleet.server.sigma),
        },
        "clients": [
            {k: float(getattr(c, k)) for k in _CLIENT_FIELDS} for c in fleet.clients
        ],
    }
    if fleet.changes:
        doc["changes"] = [ch.as_dict() for ch in fleet.changes]
    path.write_text(yaml.safe_dump(doc, sort_keys=False, default_flow_style=None), encoding="utf-8")


# ----------------------------------------------------------------------------------------------
# Summary
# ----------------------------------------------------------------------------------------------


def _mbps(value: float) -> str:
    return "unlimited" if math.isinf(value) else f"{value / MB:.3g} MB/s"


def fleet_summary(fleet: Fleet, max_rows: int = 20) -> str:
    """A small text table of the fleet: one row per client (first ``max_rows``), then
    min / median / max rows when the fleet has more than one client. Compute in GFLOP/s, links in
    MB/s (1 MB = 1e6 bytes)."""
    s = fleet.server
    lines = [
        f"fleet {fleet.name or '(unnamed)'}: {len(fleet)} clients; server down {_mbps(s.down_bps)}, "
        f"up {_mbps(s.up_bps)}, sigma {s.sigma:g}",
        f"{'client':>8} {'GFLOP/s':>10} {'down MB/s':>10} {'up MB/s':>10} {'sigma':>6}",
    ]

    def row(label: str, c: float, d: float, u: float, sg: float) -> str:
        return f"{label:>8} {c / 1e9:>10.3g} {d / MB:>10.3g} {u / MB:>10.3g} {sg:>6.3g}"

    for i, c in enumerate(fleet.clients[:max_rows]):
        lines.append(row(str(i), c.compute_flops, c.down_bps, c.up_bps, c.sigma))
    if len(fleet) > max_rows:
        lines.append(f"{'...':>8} ({len(fleet) - max_rows} more)")
    if len(fleet) > 1:
        cols = [[getattr(c, k) for c in fleet.clients] for k in _CLIENT_FIELDS]
        for label, fn in (("min", min), ("median", statistics.median), ("max", max)):
            lines.append(row(label, *(fn(col) for col in cols)))
    for ch in fleet.changes:
        lines.append(f"from {ch.at:g} s: {describe_change(ch, len(fleet))}")
    return "\n".join(lines)


def describe_change(change: SpeedChange, num_clients: int) -> str:
    """One line saying what a speed change does, e.g. ``every client takes client 9-i's device``."""
    who = "every client" if change.clients is None else f"clients {_id_list(change.clients)}"
    parts = []
    if change.like is not None:
        if change.clients is None and change.like == tuple(range(num_clients - 1, -1, -1)):
            parts.append(f"client i takes client {num_clients - 1}-i's starting device")
        else:
            parts.append(f"take the starting devices of clients {_id_list(change.like)}")
    scales = [f"{name} x{getattr(change, name):g}" for name in ("compute", "down", "up") if getattr(change, name) != 1.0]
    if scales:
        parts.append(", ".join(scales))
    if not parts:
        parts.append("back to the starting device")
    return f"{who}: {'; '.join(parts)}"


def _id_list(ids: Sequence[int], limit: int = 12) -> str:
    shown = ", ".join(map(str, ids[:limit]))
    return f"[{shown}{', ...' if len(ids) > limit else ''}]"
