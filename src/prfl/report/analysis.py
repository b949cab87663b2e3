"""Numbers computed from run histories: time to accuracy, statistics over seeds, participation,
bytes, curves on a common time grid, densities and recovery events.

Everything here is a pure function of the files a run directory holds (``history.jsonl``,
``summary.json``, ``config.yaml``), so tables and plots can be rebuilt at any time.

Conventions:

* **time to accuracy**: the virtual time of the first ``eval`` event whose accuracy is at least the
  target (the engine's own ``time_to_accuracy`` uses the same rule);
* **spread**: the sample standard deviation over seeds (``n - 1`` in the denominator), ``None``
  with fewer than two values;
* **speed-up** of a method against a baseline at a target: mean time of the baseline / mean time of
  the method, given only when every seed of both reached the target (a mean over the seeds that
  happened to reach it would flatter the slower method);
* **participation imbalance** of one run: ``max / min`` of the local rounds per client (``inf`` when
  some client never finished a round) and the coefficient of variation ``pstdev / mean`` (all
  clients are the population); over seeds, their mean and spread.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from prfl.runtime.rundir import RunDirectory

MB = 1e6


# ---------------------------------------------------------------------------- one run
@dataclass
class RunData:
    """The files of one run directory, parsed."""

    path: Path | None
    records: list[dict[str, Any]]
    summary: dict[str, Any] | None = None
    config: dict[str, Any] | None = None

    @property
    def complete(self) -> bool:
        """A run is complete when its ``summary.json`` was written (the run reached its end)."""
        return self.summary is not None

    @property
    def seed(self) -> int | None:
        if self.summary is not None and "seed" in self.summary:
            return int(self.summary["seed"])
        if self.config is not None and "seed" in self.config:
            return int(self.config["seed"])
        return None


def is_run_dir(path: str | Path) -> bool:
    """Does ``path`` look like a run directory (``config.yaml`` and ``history.jsonl``)?"""
    return RunDirectory(path).is_run()


def load_run(path: str | Path) -> RunData:
    """Read a run directory; ``summary`` is ``None`` when the run did not finish."""
    rd = RunDirectory(path)
    records = list(rd.records()) if rd.history.is_file() else []
    summary = rd.read_summary() if rd.is_finished() else None
    config = None
    if rd.config.is_file():
        config = yaml.safe_load(rd.config.read_text(encoding="utf-8")) or {}
    return RunData(rd.path, records, summary, config)


def evals(records: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The ``eval`` events that carry an accuracy, in order."""
    return [r for r in records if r.get("event") == "eval" and r.get("accuracy") is not None]


def time_to_accuracy(records: Iterable[Mapping[str, Any]], target: float) -> float | None:
    """Virtual time of the first evaluation with accuracy >= ``target``; ``None`` if never."""
    for r in evals(records):
        if float(r["accuracy"]) >= target:
            return float(r["time"])
    return None


def target_key(target: float) -> str:
    """How a target accuracy is spelled in keys and column names (``0.8`` -> ``"0.8"``)."""
    return f"{target:g}"


@dataclass
class RunMetrics:
    """The headline numbers of one run."""

    final_accuracy: float | None
    best_accuracy: float | None
    virtual_seconds: float
    server_rounds: int
    time_to: dict[float, float | None]
    local_rounds: list[int]
    server_egress_bytes: float
    server_ingress_bytes: float
    client_upload_bytes: list[float]
    client_download_bytes: list[float]
    wall_seconds: float | None = None

    @property
    def imbalance_ratio(self) -> float | None:
        return imbalance(self.local_rounds)[0]

    @property
    def imbalance_cv(self) -> float | None:
        return imbalance(self.local_rounds)[1]


def _num_clients(records: Sequence[Mapping[str, Any]]) -> int:
    for r in records:
        if r.get("event") == "start" and r.get("clients") is not None:
            return int(r["clients"])
    n = 0
    for r in records:
        if r.get("event") == "eval" and r.get("participation") is not None:
            n = max(n, len(r["participation"]))
        elif r.get("event") == "arrival" and r.get("client") is not None:
            n = max(n, int(r["client"]) + 1)
    return n


def run_metrics(
    records: Sequence[Mapping[str, Any]],
    summary: Mapping[str, Any] | None = None,
    targets: Iterable[float] = (),
) -> RunMetrics:
    """Metrics of one run from its history; totals come from ``summary`` when it is given.

    Without a summary, local rounds and client bytes are summed over ``arrival`` events and the
    server's bytes are read from the last ``eval`` event.
    """
    ev = evals(records)
    accs = [float(r["accuracy"]) for r in ev]
    times = [float(r["time"]) for r in records if r.get("time") is not None]
    rounds = [int(r["round"]) for r in records if r.get("round") is not None]
    tt = {float(t): time_to_accuracy(records, t) for t in targets}
    if summary is not None:
        return RunMetrics(
            final_accuracy=summary.get("final_accuracy"),
            best_accuracy=summary.get("best_accuracy"),
            virtual_seconds=float(summary.get("virtual_seconds", max(times, default=0.0))),
            server_rounds=int(summary.get("server_rounds", max(rounds, default=0))),
            time_to=tt,
            local_rounds=[int(x) for x in summary.get("local_rounds", [])],
            server_egress_bytes=float(summary.get("server_egress_bytes", 0.0)),
            server_ingress_bytes=float(summary.get("server_ingress_bytes", 0.0)),
            client_upload_bytes=[float(x) for x in summary.get("client_upload_bytes", [])],
            client_download_bytes=[float(x) for x in summary.get("client_download_bytes", [])],
            wall_seconds=summary.get("wall_seconds"),
        )
    n = _num_clients(records)
    local = [0] * n
    up = [0.0] * n
    down = [0.0] * n
    for r in records:
        if r.get("event") == "arrival":
            c = int(r["client"])
            local[c] += 1
            up[c] += float(r.get("bytes_up") or 0.0)
            down[c] += float(r.get("bytes_down") or 0.0)
    last = ev[-1] if ev else {}
    return RunMetrics(
        final_accuracy=accs[-1] if accs else None,
        best_accuracy=max(accs) if accs else None,
        virtual_seconds=max(times, default=0.0),
        server_rounds=max(rounds, default=0),
        time_to=tt,
        local_rounds=local,
        server_egress_bytes=float(last.get("server_egress") or 0.0),
        server_ingress_bytes=float(last.get("server_ingress") or 0.0),
        client_upload_bytes=up,
        client_download_bytes=down,
    )


def imbalance(local_rounds: Sequence[float]) -> tuple[float | None, float | None]:
    """(max / min, coefficient of variation) of the local rounds per client.

    ``max / min`` is ``inf`` when some client has no round but another has; both are ``None`` for
    an empty list or when nobody trained.
    """
    if not local_rounds:
        return None, None
    lo, hi = min(local_rounds), max(local_rounds)
    mean = statistics.fmean(local_rounds)
    if hi == 0:
        return None, None
    ratio = math.inf if lo == 0 else hi / lo
    cv = statistics.pstdev(local_rounds) / mean
    return ratio, cv


# ---------------------------------------------------------------------------- over seeds
@dataclass(frozen=True)
class Stat:
    """Mean and spread of the values that exist (``None`` values are counted as missing)."""

    mean: float | None
    std: float | None
    n: int
    total: int
    min: float | None = None
    max: float | None = None

    @property
    def all_present(self) -> bool:
        return self.total > 0 and self.n == self.total

    def fmt(self, digits: int | None = None, scale: float = 1.0) -> str:
        """``mean ± std`` (``mean`` for one value), ``-`` when nothing is there.

        ``digits`` decimals, or (``None``) enough for three significant digits of the mean.
        """
        if self.mean is None:
            return "-"
        m = self.mean * scale
        d = auto_digits(m) if digits is None else digits
        if self.std is None or self.n < 2:
            return f"{m:.{d}f}"
        return f"{m:.{d}f} ± {self.std * scale:.{d}f}"


def auto_digits(x: float, significant: int = 3, most: int = 4) -> int:
    """Decimals that show ``significant`` digits of ``x`` (none for large numbers, at most ``most``)."""
    if x == 0 or not math.isfinite(x):
        return 0
    return int(min(most, max(0, significant - 1 - math.floor(math.log10(abs(x))))))


def describe(values: Iterable[float | None]) -> Stat:
    """Mean, sample standard deviation, min and max of the finite values among ``values``."""
    vals = list(values)
    present = [float(v) for v in vals if v is not None and math.isfinite(float(v))]
    if not present:
        return Stat(None, None, 0, len(vals))
    std = statistics.stdev(present) if len(present) > 1 else None
    return Stat(statistics.fmean(present), std, len(present), len(vals), min(present), max(present))


@dataclass
class TargetResult:
    """Time to one target accuracy for one method, over seeds, and its speed-up."""

    target: float
    time: Stat
    speedup: float | None = None

    def cell(self) -> str:
        """The Markdown cell: ``mean ± sd``, with ``(k/n)`` when only some seeds reached it."""
        if self.time.n == 0:
            return f"not reached (0/{self.time.total})"
        text = self.time.fmt()
        if not self.time.all_present:
            text += f" ({self.time.n}/{self.time.total} reached)"
        return text


@dataclass
class MethodSummary:
    """Everything the tables say about one method (over its seeds)."""

    method: str
    policy: str
    seeds: list[int]
    runs: list[RunMetrics]
    final_accuracy: Stat
    best_accuracy: Stat
    virtual_seconds: Stat
    server_rounds: Stat
    targets: list[TargetResult]
    local_rounds_per_client: list[Stat]
    local_rounds_total: Stat
    imbalance_ratio: Stat
    imbalance_cv: Stat
    server_egress_mb: Stat
    server_ingress_mb: Stat
    client_upload_mb: list[Stat]
    client_download_mb: list[Stat]
    wall_seconds: Stat = field(default_factory=lambda: Stat(None, None, 0, 0))

    def target(self, t: float) -> TargetResult | None:
        for r in self.targets:
            if r.target == t:
                return r
        return None


def _per_client(rows: list[list[float]], scale: float = 1.0) -> list[Stat]:
    n = max((len(r) for r in rows), default=0)
    return [describe(r[c] / scale if c < len(r) else None for r in rows) for c in range(n)]


def summarise_method(method: str, policy: str, runs: Sequence[RunData], targets: Sequence[float]) -> MethodSummary:
    """Aggregate the runs (one per seed) of one method."""
    metrics = [run_metrics(r.records, r.summary, targets) for r in runs]
    ratios = [m.imbalance_ratio for m in metrics]
    return MethodSummary(
        method=method,
        policy=policy,
        seeds=[r.seed if r.seed is not None else i for i, r in enumerate(runs)],
        runs=metrics,
        final_accuracy=describe(m.final_accuracy for m in metrics),
        best_accuracy=describe(m.best_accuracy for m in metrics),
        virtual_seconds=describe(m.virtual_seconds for m in metrics),
        server_rounds=describe(m.server_rounds for m in metrics),
        targets=[TargetResult(float(t), describe(m.time_to.get(float(t)) for m in metrics)) for t in targets],
        local_rounds_per_client=_per_client([[float(x) for x in m.local_rounds] for m in metrics]),
        local_rounds_total=describe(sum(m.local_rounds) for m in metrics),
        # an infinite ratio (a client that never trained) is reported as missing in the mean
        imbalance_ratio=describe(ratios),
        imbalance_cv=describe(m.imbalance_cv for m in metrics),
        server_egress_mb=describe(m.server_egress_bytes / MB for m in metrics),
        server_ingress_mb=describe(m.server_ingress_bytes / MB for m in metrics),
        client_upload_mb=_per_client([m.client_upload_bytes for m in metrics], MB),
        client_download_mb=_per_client([m.client_download_bytes for m in metrics], MB),
        wall_seconds=describe(m.wall_seconds for m in metrics),
    )


def add_speedups(summaries: Sequence[MethodSummary], baseline: str | None) -> None:
    """Fill ``speedup`` of every target: baseline mean time / method mean time (all seeds reached)."""
    base = next((s for s in summaries if s.method == baseline), None)
    for s in summaries:
        for tr in s.targets:
            tr.speedup = None
            if base is None:
                continue
            ref = base.target(tr.target)
            if ref is None or not ref.time.all_present or not tr.time.all_present:
                continue
            if ref.time.mean is not None and tr.time.mean:
                tr.speedup = ref.time.mean / tr.time.mean


# ---------------------------------------------------------------------------- curves
def series(records: Iterable[Mapping[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(time, value) of ``key`` over the ``eval`` events that carry it."""
    ts, vs = [], []
    for r in records:
        if r.get("event") == "eval" and r.get(key) is not None and r.get("time") is not None:
            ts.append(float(r["time"]))
            vs.append(float(r[key]))
    return np.asarray(ts, dtype=float), np.asarray(vs, dtype=float)


def on_grid(ts: np.ndarray, vs: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Linear interpolation of (ts, vs) at ``grid``; NaN outside the run's time span."""
    out = np.full(grid.shape, np.nan)
    if ts.size == 0:
        return out
    order = np.argsort(ts, kind="stable")
    ts, vs = ts[order], vs[order]
    inside = (grid >= ts[0]) & (grid <= ts[-1])
    out[inside] = np.interp(grid[inside], ts, vs)
    return out


def time_grid(runs: Iterable[Sequence[Mapping[str, Any]]], points: int = 200) -> np.ndarray:
    """``points`` evenly spaced virtual times from 0 to the end of the longest run."""
    end = 0.0
    for records in runs:
        for r in records:
            if r.get("time") is not None:
                end = max(end, float(r["time"]))
    return np.linspace(0.0, end if end > 0 else 1.0, points)


def band(curves: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, mean - sd, mean + sd) across curves at each grid point, ignoring NaNs.

    Where only one curve is defined the band collapses onto it; where none is, all are NaN.
    """
    stack = np.vstack(curves) if curves else np.full((1, 1), np.nan)
    count = np.sum(~np.isnan(stack), axis=0)
    safe = np.where(np.isnan(stack), 0.0, stack)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(count > 0, safe.sum(axis=0) / np.maximum(count, 1), np.nan)
        dev = np.where(np.isnan(stack), 0.0, stack - mean) ** 2
        var = np.where(count > 1, dev.sum(axis=0) / np.maximum(count - 1, 1), 0.0)
    sd = np.sqrt(var)
    return mean, mean - sd, mean + sd


def density_series(records: Iterable[Mapping[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """(times, densities[time, client]) from ``eval.density`` and ``densities`` events.

    Densities change at ``densities`` events and are sampled at every evaluation; both are merged
    in time order (a step function: a density holds until the next change).
    """
    points: list[tuple[float, list[float]]] = []
    for r in records:
        ev = r.get("event")
        if ev in ("eval", "densities") and r.get("density") is not None and r.get("time") is not None:
            points.append((float(r["time"]), [float(d) for d in r["density"]]))
    if not points:
        return np.zeros(0), np.zeros((0, 0))
    points.sort(key=lambda p: p[0])
    width = max(len(p[1]) for p in points)
    mat = np.full((len(points), width), np.nan)
    for i, (_, ds) in enumerate(points):
        mat[i, : len(ds)] = ds
    return np.asarray([p[0] for p in points]), mat


@dataclass(frozen=True)
class RecoveryEvent:
    """A recovery step of PR-FL: ``scope`` is ``server`` (every minimum raised), ``client`` or ``stop``."""

    time: float
    scope: str
    client: int | None = None


def recovery_events(records: Iterable[Mapping[str, Any]]) -> list[RecoveryEvent]:
    """The ``recovery`` events of a history."""
    out = []
    for r in records:
        if r.get("event") == "recovery" and r.get("time") is not None:
            c = r.get("client")
            out.append(RecoveryEvent(float(r["time"]), str(r.get("scope", "server")), None if c is None else int(c)))
    return out
