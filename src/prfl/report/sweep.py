"""A sweep of runs as cells, their compact records, and the tables of a headline comparison.

A *group* is one scenario under one accounting, spelled ``<accounting>/<fleet>/<partition>``
(e.g. ``honest/paper10/dirichlet``); a *method* is one policy configuration
(``fedasync-a0.3-hinge``); a *cell* is a (group, method, seed). A *family* is the methods that
share the prefix before their first ``-`` followed by a tuning tag (``fedasync-*``): the
best-tuned member of a family is chosen per target.

A compact record (:func:`compact_run`) holds what the tables need of one finished run directory:
its summary, its evaluation series and, per client, the means of its arrivals' time split. It is
a few kilobytes where a long run's ``history.jsonl`` is megabytes, and it is rebuilt from the run
directory at any time.

Definitions (times are virtual seconds):

* **time to target** with ``consecutive = k``: the time of the first evaluation ``e_i`` such that
  ``e_i, ..., e_{i+k-1}`` all have accuracy ``>= target``; ``k = 1`` is the first evaluation at or
  above the target. ``None`` if there is no such run of evaluations.
* **levelled off**: with ``T`` the run's end and ``tail`` a fraction of it, the *late gain* is
  ``max{acc(t) : t > (1 - tail) T} - max{acc(t) : t <= (1 - tail) T}``; the run has levelled off
  when the late gain is at most ``tolerance`` (defaults: ``tail = 0.2``, ``tolerance = 0.005``,
  i.e. the last 20% of the run raised the best accuracy by at most half a point). A run whose
  accuracy still climbs fails it; one that peaked earlier has a negative gain.
* **statistics over seeds**: mean ± sample sd (:func:`prfl.report.analysis.describe`).
* **best-tuned** member of a family at a target: among the members with a record for every seed
  asked for, the one with the smallest mean time over those seeds among those that reached the
  target at every seed (ties: the smaller name). ``None`` when no member reached it at every seed.
  It is chosen on the same seeds it is compared on, which favours the baseline.
* **speed-up** of a method at a target: mean time of the best-tuned baseline / mean time of the
  method, over the same seeds, given only when both reached the target at every seed.
* **slow clients** of a fleet: the ``ceil(fraction * n)`` clients with the lowest mean download
  speed (ties: lower upload speed, lower compute speed, higher index); ``fraction = 0.4`` is
  clients 6-9 of the ``paper10`` fleet.
* **round time split** of a client: the means over its arrivals of the seconds of ``download``,
  ``link_wait``, ``compute`` and ``upload`` (the arrival records' split, when the history has it)
  and of ``duration`` (dispatch to arrival); ``idle`` = ``T / arrivals - mean duration``, the
  time a client spends between an arrival and its next dispatch, averaged per round.
"""

from __future__ import annotations

import hashlib
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from prfl.report.analysis import Stat, describe, imbalance
from prfl.runtime.rundir import RunDirectory

Table = tuple[list[str], list[list[str]]]

COMPACT_FORMAT = 1
TIME_PARTS = ("download", "link_wait", "compute", "upload")
"""The per-arrival time split (seconds) a history's ``arrival`` records may carry."""
SUMMARY_KEYS = (
    "policy", "stopped", "virtual_seconds", "server_rounds", "final_accuracy", "best_accuracy",
    "local_rounds", "aggregated_rounds", "server_egress_bytes", "server_ingress_bytes",
    "client_download_bytes", "client_upload_bytes", "wall_seconds", "train_seconds", "accounting",
    "round_time_breakdown", "upload_bytes_split", "rejected_updates",
)
EVAL_KEYS = ("time", "round", "accuracy", "loss", "server_egress", "server_ingress")
LEVEL_TAIL = 0.2
LEVEL_TOLERANCE = 0.005
SLOW_FRACTION = 0.4


# ---------------------------------------------------------------------------- one run
def time_to_target(times: Sequence[float], accs: Sequence[float], target: float, consecutive: int = 1) -> float | None:
    """Time of the first of ``consecutive`` evaluations in a row with accuracy >= ``target``."""
    if consecutive < 1:
        raise ValueError(f"consecutive must be at least 1, got {consecutive}")
    run = 0
    for i, a in enumerate(accs):
        run = run + 1 if a >= target else 0
        if run == consecutive:
            return float(times[i - consecutive + 1])
    return None


def late_gain(times: Sequence[float], accs: Sequence[float], end: float, tail: float = LEVEL_TAIL) -> float | None:
    """Best accuracy after ``(1 - tail) * end`` minus the best accuracy up to it; ``None`` when
    either part has no evaluation."""
    if not 0.0 < tail < 1.0:
        raise ValueError(f"tail must lie in (0, 1), got {tail}")
    cut = (1.0 - tail) * end
    early = [a for t, a in zip(times, accs) if t <= cut]
    late = [a for t, a in zip(times, accs) if t > cut]
    if not early or not late:
        return None
    return max(late) - max(early)


def levelled(times: Sequence[float], accs: Sequence[float], end: float,
             tail: float = LEVEL_TAIL, tolerance: float = LEVEL_TOLERANCE) -> bool | None:
    """Has the run levelled off (late gain <= ``tolerance``)? ``None`` if it cannot be told."""
    gain = late_gain(times, accs, end, tail)
    return None if gain is None else gain <= tolerance + 1e-12


def late_climb(times: Sequence[float], accs: Sequence[float], end: float, tail: float = LEVEL_TAIL) -> float | None:
    """How fast a run was still rising at its end: its mean accuracy over the last ``tail`` of the
    run minus its mean over the ``tail`` before that, per 1,000 virtual s. A mean over a window
    averages out the noise of single evaluations, which a best-so-far reading (:func:`late_gain`)
    picks up: a run on a plateau climbs about 0 by this measure whatever its noise. ``None`` when
    either window has no evaluation."""
    if not 0.0 < tail < 0.5:
        raise ValueError(f"tail must lie in (0, 0.5), got {tail}")
    cut, start = (1.0 - tail) * end, (1.0 - 2.0 * tail) * end
    late = [a for t, a in zip(times, accs) if t > cut]
    before = [a for t, a in zip(times, accs) if start < t <= cut]
    if not late or not before:
        return None
    return (statistics.fmean(late) - statistics.fmean(before)) / (tail * end) * 1000.0


def slow_clients(clients: Sequence[Any], fraction: float = SLOW_FRACTION) -> list[int]:
    """Indices of the ``ceil(fraction * n)`` slowest clients (by mean download, then upload, then
    compute speed; equal profiles: the higher index first), in ascending order."""
    n = len(clients)
    k = max(1, math.ceil(fraction * n)) if n else 0
    order = sorted(range(n), key=lambda i: (clients[i].down_bps, clients[i].up_bps, clients[i].compute_flops, -i))
    return sorted(order[:k])


def _fleet_of(config: Mapping[str, Any]) -> Any:
    from prfl.sim.devices import load_fleet, make_fleet

    fleet = config.get("fleet") or {}
    if fleet.get("file"):
        return load_fleet(fleet["file"])
    return make_fleet(fleet.get("preset", "paper10"), int(config["data"]["num_clients"]),
                      seed=int(config.get("seed", 0)), **(fleet.get("options") or {}))


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def compact_run(run_dir: str | Path, cell: Mapping[str, Any] | None = None, slow_fraction: float = SLOW_FRACTION) -> dict[str, Any]:
    """The compact record of a finished run directory (``summary.json`` must exist).

    Keeps the summary's scalar and per-client fields, the evaluation series (:data:`EVAL_KEYS`)
    and per client the arrival count and the mean seconds of each :data:`TIME_PARTS` part and of
    the whole task (``duration``); a part the history does not record is ``None`` and listed in
    ``timing_missing``; PR-FL's recovery events by scope (count and first time) and its densities
    at the last evaluation (``recoveries``). ``cell`` (group, method, seed, ...) is stored as given.
    """
    rd = RunDirectory(run_dir)
    d = rd.path
    if not rd.is_finished():
        raise FileNotFoundError(f"{d} has no summary.json: the run has not finished (resume it first)")
    summary = rd.read_summary()
    config = yaml.safe_load(rd.config.read_text(encoding="utf-8")) or {}
    n = int(config["data"]["num_clients"])
    series: dict[str, list[Any]] = {k: [] for k in EVAL_KEYS}
    sums = {p: [0.0] * n for p in (*TIME_PARTS, "duration")}
    seen = {p: 0 for p in (*TIME_PARTS, "duration")}
    count = [0] * n
    staleness = [0.0] * n
    records = 0
    recoveries: dict[str, int] = {}  # PR-FL's recovery events by scope (armed, server, client, stop)
    first_recovery: dict[str, float] = {}
    final_density = None  # PR-FL's densities at the last evaluation
    for r in rd.records():
        records += 1
        ev = r.get("event")
        if ev == "eval" and r.get("accuracy") is not None:
            for k in EVAL_KEYS:
                series[k].append(r.get(k))
            final_density = r.get("density", final_density)
        elif ev == "recovery":
            scope = str(r.get("scope"))
            recoveries[scope] = recoveries.get(scope, 0) + 1
            first_recovery.setdefault(scope, float(r.get("time", 0.0)))
        elif ev == "arrival":
            c = int(r["client"])
            count[c] += 1
            staleness[c] += float(r.get("staleness") or 0)
            for p in (*TIME_PARTS, "duration"):
                v = r.get(p)
                if v is not None:
                    sums[p][c] += float(v)
                    seen[p] += 1
    arrivals = sum(count)
    missing = [p for p in (*TIME_PARTS, "duration") if arrivals and seen[p] < arrivals]
    means = {
        p: [sums[p][c] / count[c] if count[c] and p not in missing else None for c in range(n)]
        for p in (*TIME_PARTS, "duration")
    }
    try:
        slow = slow_clients(_fleet_of(config).clients, slow_fraction)
    except (ValueError, OSError, KeyError, TypeError) as exc:  # e.g. a fleet file that moved: say so, do not fail
        slow, slow_error = [], f"{type(exc).__name__}: {exc}"
    else:
        slow_error = None
    out: dict[str, Any] = {
        "format": COMPACT_FORMAT,
        "cell": dict(cell or {}),
        "policy": config.get("policy"),
        "seed": int(config.get("seed", 0)),
        "summary": {k: summary[k] for k in SUMMARY_KEYS if k in summary},
        "evals": series,
        "arrivals": {
            "count": count,
            "mean_staleness": [staleness[c] / count[c] if count[c] else None for c in range(n)],
            "mean_seconds": means,
        },
        "timing_missing": missing,
        "slow_clients": slow,
        "slow_fraction": slow_fraction,
        "history": {"records": records, "sha256": _file_sha256(rd.history)},
        "recoveries": {"count": recoveries, "first_time": first_recovery, "final_density": final_density},
    }
    if slow_error:
        out["slow_clients_error"] = slow_error
    return out


# ---------------------------------------------------------------------------- many runs
@dataclass(frozen=True)
class Run:
    """A compact record, read: where it belongs and what the tables use."""

    group: str
    method: str
    seed: int
    times: tuple[float, ...]
    accs: tuple[float, ...]
    record: Mapping[str, Any] = field(repr=False)

    @classmethod
    def from_record(cls, rec: Mapping[str, Any]) -> "Run":
        cell = rec.get("cell") or {}
        ev = rec.get("evals") or {}
        return cls(
            group=str(cell.get("group", "")),
            method=str(cell.get("method", "")),
            seed=int(cell.get("seed", rec.get("seed", 0))),
            times=tuple(float(t) for t in ev.get("time", [])),
            accs=tuple(float(a) for a in ev.get("accuracy", [])),
            record=rec,
        )

    @property
    def summary(self) -> Mapping[str, Any]:
        return self.record.get("summary") or {}

    @property
    def end(self) -> float:
        return float(self.summary.get("virtual_seconds") or (self.times[-1] if self.times else 0.0))

    def time_to(self, target: float, consecutive: int = 1) -> float | None:
        return time_to_target(self.times, self.accs, target, consecutive)

    def levelled(self, tail: float = LEVEL_TAIL, tolerance: float = LEVEL_TOLERANCE) -> bool | None:
        return levelled(self.times, self.accs, self.end, tail, tolerance)

    def late_climb(self, tail: float = LEVEL_TAIL) -> float | None:
        return late_climb(self.times, self.accs, self.end, tail)

    def slow_split(self) -> dict[str, float | None]:
        """Mean seconds per local round of the slow clients, by part (the clients' means averaged
        with equal weight): :data:`TIME_PARTS`, ``duration``, ``idle`` and ``round``."""
        arr = self.record.get("arrivals") or {}
        means = arr.get("mean_seconds") or {}
        count = arr.get("count") or []
        slow = [c for c in self.record.get("slow_clients") or [] if c < len(count) and count[c]]
        out: dict[str, float | None] = {}
        for p in (*TIME_PARTS, "duration"):
            vals = [means.get(p, [None] * len(count))[c] for c in slow]
            out[p] = statistics.fmean(vals) if vals and all(v is not None for v in vals) else None
        rounds = [self.end / count[c] for c in slow]
        out["round"] = statistics.fmean(rounds) if rounds else None
        out["idle"] = None if out["round"] is None or out["duration"] is None else max(0.0, out["round"] - out["duration"])
        return out


def by_group(runs: Iterable[Run]) -> dict[str, dict[str, list[Run]]]:
    """group -> method -> runs (by seed)."""
    out: dict[str, dict[str, list[Run]]] = {}
    for r in runs:
        out.setdefault(r.group, {}).setdefault(r.method, []).append(r)
    for methods in out.values():
        for rs in methods.values():
            rs.sort(key=lambda r: r.seed)
    return out


def family(method: str) -> str:
    """``fedasync-a0.3-hinge`` -> ``fedasync``; a name without ``-`` is its own family."""
    return method.split("-", 1)[0]


def seed_times(runs: Sequence[Run], target: float, seeds: Sequence[int], consecutive: int = 1) -> Stat:
    """Time to ``target`` over ``seeds`` (a seed without a run counts as not reached)."""
    by_seed = {r.seed: r for r in runs}
    return describe(by_seed[s].time_to(target, consecutive) if s in by_seed else None for s in seeds)


@dataclass(frozen=True)
class BestTuned:
    """The best-tuned member of a family at one target (``method`` None: none reached it at every seed)."""

    method: str | None
    time: Stat | None
    members: int  # members with a record for every seed
    planned: int  # members of the family in the group at all


def best_tuned(methods: Mapping[str, Sequence[Run]], fam: str, target: float, seeds: Sequence[int],
               consecutive: int = 1) -> BestTuned:
    """The member of family ``fam`` (e.g. the FedAsync grid) fastest to ``target`` over ``seeds``."""
    members = {m: rs for m, rs in methods.items() if family(m) == fam}
    complete = {m: rs for m, rs in members.items() if set(seeds) <= {r.seed for r in rs}}
    best: tuple[float, str, Stat] | None = None
    for m, rs in sorted(complete.items()):
        st = seed_times(rs, target, seeds, consecutive)
        if st.all_present and st.mean is not None and (best is None or (st.mean, m) < best[:2]):
            best = (st.mean, m, st)
    if best is None:
        return BestTuned(None, None, len(complete), len(members))
    return BestTuned(best[1], best[2], len(complete), len(members))


def speedup(base: Stat | None, st: Stat) -> float | None:
    """``base.mean / st.mean`` when both reached at every seed."""
    if base is None or not base.all_present or not st.all_present or not st.mean or base.mean is None:
        return None
    return base.mean / st.mean


def missing_cells(planned: Iterable[Mapping[str, Any]], runs: Iterable[Run]) -> list[Mapping[str, Any]]:
    """The planned cells (dicts with group, method, seed) that have no record, in plan order."""
    have = {(r.group, r.method, r.seed) for r in runs}
    return [c for c in planned if (c["group"], c["method"], int(c["seed"])) not in have]


def _wall_pace(run: Run) -> float | None:
    """Wall seconds per virtual second of a finished run, over all its pieces; ``None`` when the
    record's wall time is below its training time (which a checkpoint carries across pieces): such
    a record lost the wall time of a piece that ended without leaving its own record."""
    wall = run.record.get("wall_seconds_total") or run.summary.get("wall_seconds")
    if not isinstance(wall, (int, float)) or wall <= 0 or run.end <= 0:
        return None
    train = run.summary.get("train_seconds")
    if isinstance(train, (int, float)) and train > wall:
        return None
    return float(wall) / run.end


def _pace_keys(group: str, method: str) -> list[tuple[str, str]]:
    """Where a cell's expected pace is looked up, most specific first: the same accounting and fleet
    (the data split changes little of the cost), then the same accounting, then the method alone;
    then the same three for the method's family (``name*``: an ablation of PR-FL, another K of
    FedBuff)."""
    acc, fleet = (group.split("/") + ["", ""])[:2]
    return [(where, name) for name in (method, family(method) + "*") for where in (f"{acc}/{fleet}", acc, "")]


class Paces:
    """Wall seconds per virtual second of finished runs, and the pace a cell is expected to run at.

    A cell takes the median pace of the finished runs of its method under the same accounting and
    fleet, else the same accounting, else any; failing those, of its family the same way
    (:func:`_pace_keys`). Runs whose recorded wall time is incomplete (:func:`_wall_pace`) are left
    out and named in ``short``. Wall time is what the runs took where they ran (one core each,
    often beside another run): a pace, not a CPU measurement."""

    def __init__(self, runs: Iterable[Run]) -> None:
        self.by_key: dict[tuple[str, str], list[float]] = {}
        short = []
        for r in runs:
            pace = _wall_pace(r)
            if pace is None:
                short.append(f"{r.group} {r.method} seed {r.seed}")
                continue
            for key in _pace_keys(r.group, r.method):
                self.by_key.setdefault(key, []).append(pace)
        self.short = tuple(short)

    def expected(self, group: str, method: str) -> float | None:
        """Wall seconds per virtual second for a cell of ``method`` in ``group``; ``None`` when no
        finished run stands for it."""
        return next((statistics.median(self.by_key[k]) for k in _pace_keys(group, method) if k in self.by_key), None)

    def wall_seconds(self, group: str, method: str, virtual_seconds: float) -> float | None:
        """The expected wall time of ``virtual_seconds`` of such a cell (``None``: no basis)."""
        pace = self.expected(group, method)
        return None if pace is None else pace * max(0.0, virtual_seconds)


@dataclass(frozen=True)
class Projection:
    """What the missing cells would take at the pace the finished ones ran (wall hours of one core)."""

    hours: float  # sum over the cells with a basis
    cells: int  # cells projected
    no_basis: tuple[str, ...]  # "group method seed" of cells whose method has no finished run
    short: tuple[str, ...]  # "group method seed" of finished runs left out: their wall time is incomplete
    waiting_cells: int = 0  # of ``cells``, those whose tuning grid is not finished (status ``waiting``)
    waiting_hours: float = 0.0  # of ``hours``, theirs
    kept_cells: int = 0  # the waiting cells left if each tuning keeps one configuration per group and seed
    kept_hours: float = 0.0  # their hours (each the mean over the configurations it stands for)


def cost_projection(runs: Iterable[Run], missing: Iterable[Mapping[str, Any]], horizon: float) -> tuple[Table, Projection]:
    """Per accounting/fleet and method, the wall time the finished runs took (median and range,
    scaled to ``horizon`` virtual s: runs taken further cost more), and the wall hours the
    ``missing`` cells would take at the paces :class:`Paces` expects of them. A ``partial`` cell
    (with ``virtual_seconds`` reached) is charged the rest of the horizon."""
    paces = Paces(runs)
    # the table's rows: the most specific keys (an accounting/fleet and a method, not a family)
    rows = [[where, method, str(len(ps)), f"{statistics.median(ps) * horizon / 3600:.2f}",
             f"{min(ps) * horizon / 3600:.2f}-{max(ps) * horizon / 3600:.2f}"]
            for (where, method), ps in sorted(paces.by_key.items()) if "/" in where and not method.endswith("*")]
    hours, cells, none = 0.0, 0, []
    waiting: dict[tuple[str, str, str], list[float]] = {}  # (group, family, seed) -> hours of its configurations
    for c in missing:
        group, method = str(c["group"]), str(c["method"])
        done = float(c.get("virtual_seconds") or 0.0) if c.get("status") == "partial" else 0.0
        wall = paces.wall_seconds(group, method, horizon - done)
        if wall is None:
            none.append(f"{group} {method} seed {c['seed']}")
            continue
        h = wall / 3600
        hours += h
        cells += 1
        if c.get("status") == "waiting":
            waiting.setdefault((group, family(method), str(c["seed"])), []).append(h)
    headers = ["accounting/fleet", "method", "finished runs", f"wall h per {horizon:g} virtual s (median)", "range"]
    return (headers, rows), Projection(
        hours, cells, tuple(none), paces.short,
        waiting_cells=sum(len(v) for v in waiting.values()), waiting_hours=sum(sum(v) for v in waiting.values()),
        kept_cells=len(waiting), kept_hours=sum(statistics.fmean(v) for v in waiting.values()))


# ---------------------------------------------------------------------------- tables
def _time_cell(st: Stat, ran: Sequence[int] | None = None) -> str:
    """A time to target over seeds; ``ran``: the seeds with a run, when some of ``st``'s have none
    (a seed not run is named as such, not counted as a seed that missed the target)."""
    if ran is None or len(ran) >= st.total:
        if st.n == 0:
            return f"not reached (0/{st.total})"
        text = st.fmt(0)
        return text if st.all_present else f"{text} ({st.n}/{st.total} reached)"
    if not ran:
        return "no run"
    where = ("seed " if len(ran) == 1 else "seeds ") + ", ".join(str(s) for s in ran) + " only"
    if st.n == 0:
        return f"not reached ({where})"
    if st.n == len(ran):
        return f"{st.fmt(0)} ({where})"
    return f"{st.fmt(0)} ({st.n}/{len(ran)} reached, {where})"


def _ran(runs: Sequence[Run], seeds: Sequence[int]) -> list[int]:
    """The seeds of ``seeds`` that ``runs`` hold a run for (what :func:`_time_cell` names)."""
    return sorted({r.seed for r in runs} & set(seeds))


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _levelled_cell(runs: Sequence[Run], tail: float, tolerance: float) -> str:
    flags = [r.levelled(tail, tolerance) for r in runs]
    yes = sum(1 for f in flags if f)
    text = f"{yes}/{len(flags)}"
    unknown = sum(1 for f in flags if f is None)
    return text + (f" ({unknown} too short)" if unknown else "")


def time_table(methods: Mapping[str, Sequence[Run]], order: Sequence[str], targets: Sequence[float],
               seeds: Sequence[int], baseline: str = "fedasync", consecutive: int = 1,
               tail: float = LEVEL_TAIL, tolerance: float = LEVEL_TOLERANCE) -> Table:
    """Per method: time to each target (mean ± sd over ``seeds``), the speed-up against the
    best-tuned member of family ``baseline`` at that target, final and best accuracy and how many
    seeds levelled off. The baseline family gets one row, its best-tuned member per target
    (named in the cell); its whole grid is :func:`grid_table`."""
    headers = ["method", "seeds"]
    for t in targets:
        headers += [f"time to {t:g} (s)", f"speed-up vs best {baseline}"]
    headers += ["final accuracy", "best accuracy", "levelled off"]
    best = {t: best_tuned(methods, baseline, t, seeds, consecutive) for t in targets}
    rows: list[list[str]] = []
    listed = [m for m in order if m in methods and family(m) != baseline]
    listed += sorted(m for m in methods if m not in listed and family(m) != baseline)
    if any(family(m) == baseline for m in methods):
        row = [f"{baseline} (best per target)", str(len(seeds))]
        for t in targets:
            b = best[t]
            grid = f"{b.members}/{b.planned} configs"
            if b.method is None or b.time is None:
                row += [f"none reached at every seed ({grid})", "-"]
            else:
                row += [f"{_time_cell(b.time)} [{b.method[len(baseline) + 1:] or b.method}; {grid}]", "1.00x"]
        chosen = {b.method for b in best.values() if b.method is not None}
        if len(chosen) == 1:  # one configuration is best at every target: its accuracy is the row's
            rs = [r for r in methods[chosen.pop()] if r.seed in seeds]
            row += [describe(r.summary.get("final_accuracy") for r in rs).fmt(3),
                    describe(r.summary.get("best_accuracy") for r in rs).fmt(3), _levelled_cell(rs, tail, tolerance)]
        else:
            row += ["see the grid"] * 3
        rows.append(row)
    for m in listed:
        rs = [r for r in methods[m] if r.seed in seeds]
        row = [m, str(len(rs))]
        for t in targets:
            st = seed_times(rs, t, seeds, consecutive)
            row += [_time_cell(st, _ran(rs, seeds)), _x(speedup(best[t].time, st))]
        row += [describe(r.summary.get("final_accuracy") for r in rs).fmt(3),
                describe(r.summary.get("best_accuracy") for r in rs).fmt(3), _levelled_cell(rs, tail, tolerance)]
        rows.append(row)
    return headers, rows


def grid_table(methods: Mapping[str, Sequence[Run]], fam: str, targets: Sequence[float], seeds: Sequence[int],
               consecutive: int = 1, tail: float = LEVEL_TAIL, tolerance: float = LEVEL_TOLERANCE) -> Table:
    """Every member of family ``fam``: time to each target, final and best accuracy, levelling;
    ``*`` marks the best-tuned member at a target."""
    headers = ["configuration", "seeds"] + [f"time to {t:g} (s)" for t in targets]
    headers += ["final accuracy", "best accuracy", "levelled off"]
    best = {t: best_tuned(methods, fam, t, seeds, consecutive).method for t in targets}
    rows = []
    for m in sorted(x for x in methods if family(x) == fam):
        rs = [r for r in methods[m] if r.seed in seeds]
        row = [m, str(len(rs))]
        for t in targets:
            row.append(_time_cell(seed_times(rs, t, seeds, consecutive), _ran(rs, seeds)) + (" *" if best[t] == m else ""))
        row += [describe(r.summary.get("final_accuracy") for r in rs).fmt(3),
                describe(r.summary.get("best_accuracy") for r in rs).fmt(3), _levelled_cell(rs, tail, tolerance)]
        rows.append(row)
    return headers, rows


def climb_table(groups: Mapping[str, Mapping[str, Sequence[Run]]], seeds: Sequence[int],
                tail: float = LEVEL_TAIL, tolerance: float = LEVEL_TOLERANCE) -> Table:
    """Per group and method: how many seeds levelled off (best accuracy, :func:`levelled`), how
    fast the runs were still climbing at their end (:func:`late_climb`, in accuracy points per
    1,000 virtual s, mean ± sd over seeds) and where they ended (final accuracy, horizon)."""
    headers = ["group", "method", "seeds", "levelled off", "late climb (points per 1,000 s)", "final accuracy", "horizon (s)"]
    rows = []
    for group in sorted(groups):
        for m in sorted(groups[group], key=lambda x: (family(x) != "prfl", x)):
            rs = [r for r in groups[group][m] if r.seed in seeds]
            if not rs:
                continue
            climb = describe(None if (c := r.late_climb(tail)) is None else 100.0 * c for r in rs)
            ends = sorted({r.end for r in rs})
            rows.append([group, m, str(len(rs)), _levelled_cell(rs, tail, tolerance), climb.fmt(2),
                         describe(r.summary.get("final_accuracy") for r in rs).fmt(3),
                         " / ".join(f"{e:,.0f}" for e in ends)])
    return headers, rows


def _ratio_cell(values: Sequence[float | None]) -> str:
    """Mean ± sd of the finite max/min ratios; ``∞`` counts runs where a client never arrived."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    inf = sum(1 for v in values if v is not None and math.isinf(v))
    if not finite:
        return "∞" if inf else "-"
    return describe(finite).fmt(2) + (f" (∞ in {inf}/{len(values)})" if inf else "")


def cost_table(methods: Mapping[str, Sequence[Run]], order: Sequence[str], seeds: Sequence[int]) -> Table:
    """Per method: server updates, local rounds max/min, server egress and ingress (GB and MB per
    server update), and where the slow clients' local round goes (mean seconds per round:
    download + link wait + compute + upload = task, + idle = round)."""
    headers = ["method", "seeds", "server updates", "local rounds max/min", "egress (GB)", "ingress (GB)",
               "egress per update (MB)", "slow clients' round (s): download + link wait + compute + upload + idle"]
    listed = [m for m in order if m in methods] + sorted(m for m in methods if m not in order)
    rows = []
    for m in listed:
        rs = [r for r in methods[m] if r.seed in seeds]
        if not rs:
            continue
        s = [r.summary for r in rs]
        ratios = [imbalance([float(x) for x in x_.get("local_rounds") or []])[0] for x_ in s]
        per_update = [x.get("server_egress_bytes", 0) / 1e6 / x["server_rounds"] for x in s if x.get("server_rounds")]
        rows.append([
            m, str(len(rs)),
            describe(x.get("server_rounds") for x in s).fmt(0),
            _ratio_cell(ratios),
            describe((x.get("server_egress_bytes") or 0) / 1e9 for x in s).fmt(2),
            describe((x.get("server_ingress_bytes") or 0) / 1e9 for x in s).fmt(2),
            describe(per_update).fmt(1),
            split_cell([r.slow_split() for r in rs], [r.record.get("timing_missing") or [] for r in rs]),
        ])
    return headers, rows


def split_cell(splits: Sequence[Mapping[str, float | None]], missing: Sequence[Sequence[str]]) -> str:
    """``d + w + c + u + i = round`` of the seeds' means, or what is known and which parts the
    histories do not record."""
    if not splits:
        return "-"

    def mean(part: str) -> float | None:
        vals = [s.get(part) for s in splits]
        return statistics.fmean(vals) if all(v is not None for v in vals) else None

    parts = {p: mean(p) for p in (*TIME_PARTS, "idle", "round", "duration")}
    if all(parts[p] is not None for p in (*TIME_PARTS, "idle", "round")):
        return " + ".join(f"{parts[p]:.1f}" for p in (*TIME_PARTS, "idle")) + f" = {parts['round']:.1f}"
    gone = sorted({p for m in missing for p in m if p in TIME_PARTS})
    known = [f"{p.replace('_', ' ')} {parts[p]:.1f}" for p in (*TIME_PARTS, "duration", "idle")
             if parts.get(p) is not None]
    text = ", ".join(known) + (f"; round {parts['round']:.1f}" if parts["round"] is not None else "")
    return f"{text} (not in the histories: {', '.join(p.replace('_', ' ') for p in gone) or 'arrivals'})"


def missing_table(cells: Sequence[Mapping[str, Any]]) -> Table:
    """Missing cells per group and method: the seeds and the reason or state recorded for them."""
    rows: dict[tuple[str, str], list[str]] = {}
    notes: dict[tuple[str, str], set[str]] = {}
    for c in cells:
        key = (str(c["group"]), str(c["method"]))
        rows.setdefault(key, []).append(str(c["seed"]))
        state = str(c.get("status") or "pending")
        if c.get("reason"):
            state += f": {c['reason']}"
        notes.setdefault(key, set()).add(state)
    return ["group", "method", "seeds", "state"], [
        [g, m, ", ".join(seeds), "; ".join(sorted(notes[(g, m)]))] for (g, m), seeds in rows.items()
    ]


def limit_table(slow: Mapping[str, Sequence[Run]], fast: Mapping[str, Sequence[Run]], targets: Sequence[float],
                seeds: Sequence[int], methods: Sequence[str] = ("prfl",), baseline: str = "fedasync",
                consecutive: int = 1) -> Table:
    """Per method, time to each target on the real fleet (``slow``), with every client on the
    fastest links (``fast``), and their ratio (real / all-fast; 1.0 = the fleet costs nothing).
    The family ``baseline`` is compared through its best-tuned member in each group."""
    headers = ["method"]
    for t in targets:
        headers += [f"time to {t:g} (s)", "all-fast (s)", "ratio"]
    rows = []
    for m in [*methods, baseline]:
        row = [m if m != baseline else f"{baseline} (best per target)"]
        for t in targets:
            if m == baseline:
                a, b = best_tuned(slow, baseline, t, seeds, consecutive).time, best_tuned(fast, baseline, t, seeds, consecutive).time
            else:
                a = seed_times(slow[m], t, seeds, consecutive) if m in slow else None
                b = seed_times(fast[m], t, seeds, consecutive) if m in fast else None
            inv = speedup(a, b) if a is not None and b is not None else None  # a.mean / b.mean
            ran = [None if m == baseline or m not in g else _ran(g[m], seeds) for g in (slow, fast)]
            row += [_time_cell(a, ran[0]) if a is not None else "-", _time_cell(b, ran[1]) if b is not None else "-",
                    "-" if inv is None else f"{inv:.2f}"]
        rows.append(row)
    return headers, rows


# ---------------------------------------------------------------------------- the goals
@dataclass(frozen=True)
class Goals:
    """The figures the headline's results are read against (the goals it was set), for one
    data split; every threshold is a parameter so the table states what it checks."""

    speedup_target: float = 0.85
    speedup: float = 3.0  # PR-FL at least this much faster than the best-tuned FedAsync, honest
    ahead_of: tuple[str, ...] = ("heterofl-mask", "heterofl-width")  # PR-FL ahead at every target
    changing_fleets: tuple[str, ...] = ("reversed",)  # fleets that change in a run, read for ``ahead_of`` too
    fairness: float = 1.5  # PR-FL's local rounds max/min at most this
    allfast: float = 1.5  # PR-FL's time on the real fleet at most this x its time on the all-fast fleet
    paper: tuple[float, float] = (2.45, 3.29)  # the paper's speed-ups over FedAsync, reference accounting
    method: str = "prfl"
    baseline: str = "fedasync"


def _seeds_text(have: Sequence[int], seeds: Sequence[int]) -> str:
    if not have:
        return "-"
    if list(have) == list(seeds):
        return f"seeds {', '.join(map(str, have))}"
    return f"seeds {', '.join(map(str, have))} of {', '.join(map(str, seeds))}"


def _common(seeds: Sequence[int], *runs: Sequence[Run]) -> list[int]:
    """The seeds of ``seeds`` every one of ``runs`` has a record for (none if one of them is empty)."""
    return [s for s in seeds if all(any(r.seed == s for r in rs) for rs in runs)]


def _family_seeds(methods: Mapping[str, Sequence[Run]], fam: str, seeds: Sequence[int]) -> list[int]:
    """The seeds some member of family ``fam`` has a record for (the best-tuned one is chosen on them)."""
    return [s for s in seeds if any(r.seed == s for m, rs in methods.items() if family(m) == fam for r in rs)]


def _verdict(ok: bool | None, have: Sequence[int], seeds: Sequence[int]) -> str:
    if ok is None:
        return "no runs yet" if not have else "not measurable yet"
    text = "met" if ok else "not met"
    return text if list(have) == list(seeds) else f"{text} so far ({len(have)} of {len(seeds)} seeds)"


def _versus(methods: Mapping[str, Sequence[Run]], other: str, t: float, seeds: Sequence[int],
            method: str, consecutive: int) -> float | None:
    """How many times sooner ``method`` reaches ``t`` than ``other`` (``inf``: only ``method`` reaches it
    at every seed; ``0``: only ``other`` does; ``None``: neither)."""
    a = seed_times(methods[method], t, seeds, consecutive)
    if other in methods:
        b: Stat | None = seed_times(methods[other], t, seeds, consecutive)
    else:  # a family: its best-tuned member at t
        b = best_tuned(methods, other, t, seeds, consecutive).time
    reached_a = a.all_present
    reached_b = b is not None and b.all_present
    if reached_a and reached_b:
        return speedup(b, a)
    if reached_a:
        return math.inf
    return 0.0 if reached_b else None


def _times_text(values: Sequence[float | None], targets: Sequence[float], method: str, other: str) -> str:
    def one(v: float | None) -> str:
        if v is None:
            return "neither reaches"
        if math.isinf(v):
            return f"only {method} reaches"
        return f"only {other} reaches" if v == 0 else f"{v:.2f}x"
    return " / ".join(one(v) for v in values) + f" to {' / '.join(f'{t:g}' for t in targets)}"


def goals_table(groups: Mapping[str, Mapping[str, Sequence[Run]]], targets: Sequence[float], seeds: Sequence[int],
                split: str = "dirichlet", goals: Goals = Goals(), consecutive: int = 1) -> Table:
    """Each goal of :class:`Goals` on ``split``: what it asks, the figure measured on the seeds
    every run it needs has finished, and whether it holds (``so far`` while seeds are missing)."""
    honest = groups.get(f"honest/paper10/{split}", {})
    fast = groups.get(f"honest/allfast/{split}", {})
    ref = groups.get(f"reference/paper10/{split}", {})
    me = goals.method
    rows: list[list[str]] = []

    # 1. the speed-up over the best-tuned FedAsync, honest accounting
    have = [s for s in _common(seeds, honest.get(me, [])) if s in _family_seeds(honest, goals.baseline, seeds)]
    v = _versus(honest, goals.baseline, goals.speedup_target, have, me, consecutive) if have else None
    reading = "-" if v is None else _times_text([v], [goals.speedup_target], me, goals.baseline)
    rows.append([f"honest/paper10/{split}: {me} at least {goals.speedup:g}x faster than the best-tuned "
                 f"{goals.baseline} to {goals.speedup_target:g}", reading, _seeds_text(have, seeds),
                 _verdict(None if v is None else v >= goals.speedup, have, seeds)])

    # 2. ahead of each form of HeteroFL at every target; on a changing fleet too, where there are runs
    changing = [f for f in goals.changing_fleets if f"honest/{f}/{split}" in groups]
    for fleet in ("paper10", *changing):
        where = groups.get(f"honest/{fleet}/{split}", {})
        for other in goals.ahead_of:
            have = _common(seeds, where.get(me, []), where.get(other, []))
            vals = [_versus(where, other, t, have, me, consecutive) for t in targets] if have else []
            known = [x for x in vals if x is not None]
            ok = None if not known else all(x > 1.0 for x in known)
            rows.append([f"honest/{fleet}/{split}: {me} ahead of {other} at every target"
                         + (" (beyond the headline's goals: the fleet changes during the run)" if fleet != "paper10" else ""),
                         _times_text(vals, targets, me, other) if have else "-", _seeds_text(have, seeds),
                         _verdict(ok, have, seeds)])

    # 3. local rounds max/min
    mine = honest.get(me, [])
    have = sorted(r.seed for r in mine if r.seed in seeds)
    ratios = [imbalance([float(x) for x in r.summary.get("local_rounds") or []])[0] for r in mine if r.seed in seeds]
    finite = [x for x in ratios if x is not None]
    worst = max(finite) if finite else None
    rows.append([f"honest/paper10/{split}: {me}'s local rounds max/min at most {goals.fairness:g}",
                 "-" if worst is None else f"{describe(finite).fmt(2)} (worst seed {worst:.2f})",
                 _seeds_text(have, seeds),
                 _verdict(None if worst is None else worst <= goals.fairness, have, seeds)])

    # 4. the real fleet against its all-fast limit
    have = _common(seeds, honest.get(me, []), fast.get(me, []))
    ratios_t: list[float | None] = []
    for t in targets:
        a = seed_times(honest[me], t, have, consecutive) if have else None
        b = seed_times(fast[me], t, have, consecutive) if have else None
        ratios_t.append(speedup(a, b) if a is not None and b is not None else None)  # real / all-fast
    known = [x for x in ratios_t if x is not None]
    rows.append([f"honest/{{paper10, allfast}}/{split}: {me} on the real fleet within {goals.allfast:g}x of the "
                 "all-fast fleet (time ratio real / all-fast)",
                 (" / ".join("-" if x is None else f"{x:.2f}" for x in ratios_t)
                  + f" to {' / '.join(f'{t:g}' for t in targets)}") if have else "-",
                 _seeds_text(have, seeds),
                 _verdict(None if not known else all(x <= goals.allfast for x in known), have, seeds)])

    # 5. the reference accounting against the paper's range
    have = [s for s in _common(seeds, ref.get(me, [])) if s in _family_seeds(ref, goals.baseline, seeds)]
    vals = [_versus(ref, goals.baseline, t, have, me, consecutive) for t in targets] if have else []
    known = [x for x in vals if x is not None and x != 0.0]
    lo, hi = goals.paper
    rows.append([f"reference/paper10/{split}: {me}'s speed-up over the best-tuned {goals.baseline} within or "
                 f"above the paper's {lo:g}-{hi:g}x", _times_text(vals, targets, me, goals.baseline) if have else "-",
                 _seeds_text(have, seeds),
                 _verdict(None if not known else all(x >= lo for x in known) and 0.0 not in vals, have, seeds)])
    return ["goal", "measured", "on", "verdict"], rows
