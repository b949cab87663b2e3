"""The headline comparison: PR-FL against tuned baselines over a paper-length horizon, under both
accountings, on Fashion-MNIST / conv2 / the paper10 fleet (10 clients).

The sweep is a plan of cells (group x method x seed, see ``plan_cells``) run in priority order:

1. honest/paper10/dirichlet: PR-FL and the FedAsync grid (alpha 0.1, 0.3, 0.6 x poly, hinge);
2. honest/paper10/dirichlet: HeteroFL (mask, width), FedBuff (K 5, 10), FedFix, FedAvg;
3. reference/paper10/dirichlet: PR-FL and the FedAsync grid;
4. honest/allfast/dirichlet: PR-FL and the FedAsync grid, every client on the fastest client's links;
5. honest/paper10/dirichlet: the PR-FL ablations;
6.-10. the same five for the IID split;
11. honest/reversed/dirichlet: a fleet whose speeds change during the run (the paper10 devices,
    whose order reverses at 2,400 virtual s): PR-FL, its adaptive variant, HeteroFL (mask,
    width), FedBuff K=5 and the FedAsync grid;
12. honest/paper10/dirichlet: PR-FL with recovery patience 3 (the reference's 10 never runs out
    within 12,000 virtual s there, so this shows what recovery does when it fires).

The protocol (``Sweep.protocol``) runs part of that plan: the FedAsync grid is tuned on seed 0 of
honest/paper10/<split>; its other seeds, the reference accounting and the all-fast fleet run the
configurations best at some target there; the ablations, PR-FL's adaptive variant and the
recovery probe run on seed 0. The manifest marks the other
cells ``skipped`` (with the reason) and those waiting for the tuning ``waiting``.

Each run has its own directory under ``--runs`` (git-ignored; full history and checkpoints) and,
once finished, a compact record under ``--out/records`` (committed; :mod:`prfl.report.sweep`).
A cell with a record is done and skipped; a cell with a checkpoint is resumed. ``--budget-minutes``
ends the invocation cleanly: after the deadline the current run goes on until it next writes a
checkpoint (at most ``--grace-minutes`` more), then stops, and no new run starts; the next
invocation resumes it. SIGTERM or SIGINT (Ctrl-C) spends the budget at once, so the run pauses
the same way at its next checkpoint; a second one stops it at its next step, losing the work since
the last checkpoint, and a third is not caught. ``manifest.json`` lists every cell with its state; ``cells.csv`` has one
row per finished run. docs/RESULTS.md is built from these files by scripts/make_results_md.py.

Several invocations may run side by side on one ``--out`` and ``--runs`` (say two with
``--set sim.executor=inline`` on two cores, which trains about 1.6x more per hour than one run on
the process pool: the server's work no longer waits for the workers): each claims a cell by
creating ``claim`` in its run directory, skips cells another live process has claimed, and takes
over a claim whose process has ended.

Evaluation: the full 10,000-image test set every 60 virtual s; time to a target is the first
evaluation at or above it (``--eval-samples 2000 --consecutive 3``: the first 2,000 images, and the
first of three evaluations in a row at or above it). Levelling off: the last 20% of a run raised its best accuracy by at
most 0.5 points (see prfl.report.sweep). A finished run that has not levelled off keeps its last
checkpoint, and ``extend --extend-to T`` takes such runs on to T virtual s from it (the history a
run to T would have had from the start; the record is written again and RESULTS.md lists them).
``extend --rerun`` runs those that kept no checkpoint again from the start to T, keeps their earlier
run directory beside the new one, and checks that the new history repeats the earlier one.

Usage (from the repository root):
  .venv/bin/python benchmarks/headline.py plan
  nice .venv/bin/python benchmarks/headline.py run --budget-minutes 100
  nice .venv/bin/python benchmarks/headline.py run --budget-minutes 120 --fit   # only cells that will finish
  .venv/bin/python benchmarks/headline.py run --tiers 1 --seeds 0
  .venv/bin/python benchmarks/headline.py collect
  .venv/bin/python benchmarks/headline.py status --runs <scratch>/headline   # where started cells stand
  nice .venv/bin/python benchmarks/headline.py estimate --probe-time 300
  nice .venv/bin/python benchmarks/headline.py extend --extend-to 18000 --tiers 1 --budget-minutes 100
  nice .venv/bin/python benchmarks/headline.py extend --extend-to 18000 --tiers 1 --rerun --budget-minutes 100
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import fnmatch
import itertools
import json
import logging
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prfl.config import ConfigError, ExperimentConfig, PolicyConfig, SimConfig, load_config, load_run_config
from prfl.policies import POLICIES
from prfl.report.sweep import Paces, Run, best_tuned, compact_run
from prfl.run import build_scenario, resume_run, run_policy
from prfl.runtime.checkpoint import CHECKPOINT, PREVIOUS_CHECKPOINT
from prfl.runtime.machine import fingerprint
from prfl.sim.executors import process_alive

log = logging.getLogger("headline")

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = Path("benchmarks/results/headline")
DEFAULT_RUNS = Path("runs/headline")
TARGETS = (0.80, 0.85, 0.87)
SEEDS = (0, 1, 2)
MAX_TIME = 12000.0
EVAL_EVERY = 60.0

BASES: dict[str, list[str]] = {
    # the paper's Fashion-MNIST setting; accuracy on the whole test set
    "fmnist": [
        "name=headline", "data.dataset=fashion-mnist", "data.num_clients=10", "data.eval_samples=null",
        "model.name=conv2", "train.lr=0.1", "train.batch_size=20", "train.local_steps=5",
        "sim.executor=process", "sim.workers=2", "sim.max_rounds=null", "sim.eval_every_rounds=null",
    ],
    # a seconds-long stand-in for tests of the machinery
    "digits": [
        "name=headline-digits", "data.dataset=digits", "data.num_clients=10", "data.eval_samples=null",
        "model.name=mlp", "train.lr=0.1", "train.batch_size=20", "train.local_steps=5",
        "sim.executor=inline", "sim.max_rounds=null", "sim.eval_every_rounds=null",
    ],
}
REVERSE_AT = 2400.0  # virtual s at which the `reversed` fleet's device order reverses
FLEETS: dict[str, list[str]] = {
    "paper10": ["fleet.preset=paper10"],
    "allfast": ["fleet.preset=paper10", "fleet.options={links: fastest}"],  # the all-fast limit
    # speeds that change: from REVERSE_AT on, client i has the starting device of client 9-i, so
    # the devices a preset fitted to the starting fleet no longer match. REVERSE_AT is a fifth of
    # the horizon, before any method reaches 0.85 on the steady fleet (the earliest, HeteroFL
    # (mask), at 2,820 s on seed 0), so the 0.85 and 0.87 targets measure how a method copes.
    "reversed": ["fleet.preset=paper10", f"fleet.changes=[{{at: {REVERSE_AT:g}, like: reversed}}]"],
}
PARTITIONS: dict[str, list[str]] = {
    "iid": ["data.partition=iid"],
    "dirichlet": ["data.partition=dirichlet", "data.partition_options={alpha: 1.0}"],
}
ACCOUNTINGS = ("honest", "reference")

FEDASYNC_GRID: dict[str, dict[str, Any]] = {
    f"fedasync-a{a:g}-{s}": {"name": "fedasync", "options": {"alpha": a, "staleness": s}}
    for a in (0.1, 0.3, 0.6) for s in ("poly", "hinge")
}
BASELINES: dict[str, dict[str, Any]] = {
    "heterofl-mask": {"name": "heterofl", "options": {"mode": "mask"}},  # the paper's comparator
    "heterofl-width": {"name": "heterofl", "options": {"mode": "width"}},
    "fedbuff-k5": {"name": "fedbuff", "options": {"k": 5}},
    "fedbuff-k10": {"name": "fedbuff", "options": {"k": 10}},
    "fedfix": {"name": "fedfix", "options": {"dt": 20.0}},
    "fedavg": {"name": "fedavg", "options": {}},
}
PRFL: dict[str, dict[str, Any]] = {"prfl": {"name": "prfl", "options": {}}}
ABLATIONS: dict[str, dict[str, Any]] = {
    # the earlier importance rule: squared gradients of all weights with every update, plain mean
    "prfl-oldimportance": {"name": "prfl", "options": {
        "importance_scope": "all", "importance_requests": "every", "importance_average": "all"}},
    "prfl-serversteps": {"name": "prfl", "options": {"counting": "server_steps"}},
    "prfl-norecovery": {"name": "prfl", "options": {"recovery": False}},
    "prfl-noresidual": {"name": "prfl", "options": {"residual_split": False}},
    "prfl-reaged": {"name": "prfl", "options": {"staleness_mode": "reaged"}},
}
# PR-FL adapting its densities for the whole run (rule A: t_fastest / t_i on dense-equivalent
# round times, not only until the first recovery), for fleets whose speeds change
ADAPTIVE: dict[str, dict[str, Any]] = {
    "prfl-adaptive": {"name": "prfl", "options": {"density_rule": "A", "adapt_after_recovery": True}},
}
# PR-FL with a recovery monitor that fires on this horizon: under the reference's patience (10
# checks of I = 50 fastest-client rounds, about 540 virtual s each) it never runs out in 12,000 s,
# so the default's figures are those of PR-FL without recovery; patience 3 shows what recovery does
RECOVERY_PROBE: dict[str, dict[str, Any]] = {"prfl-patience3": {"name": "prfl", "options": {"patience": 3}}}
# PR-FL with the two rules whose defaults still differ from the reference code: minimums that
# follow the lowest density (a clamp to one ends the first stage) and client recoveries that raise
# the density itself. They become the defaults once the table is complete; this cell shows what
# the switch changes on the Dirichlet split
REFERENCE_MINIMUMS: dict[str, dict[str, Any]] = {
    "prfl-refminimums": {"name": "prfl", "options": {"minimum_rule": "follow", "client_recovery": "density"}},
}
METHODS: dict[str, dict[str, Any]] = {**PRFL, **FEDASYNC_GRID, **BASELINES, **ABLATIONS, **ADAPTIVE, **RECOVERY_PROBE,
                                      **REFERENCE_MINIMUMS}
METHOD_ORDER = tuple(METHODS)
HEAD = (*PRFL, *FEDASYNC_GRID)

# Server updates between checkpoints, by policy: about 30 checkpoints in 12,000 virtual s at the
# update rates of the committed 3,000 s runs (FedAsync ~350, PR-FL 330-850, FedBuff K=5 ~70,
# HeteroFL ~70, FedFix ~50, FedAvg ~10 per 1,000 s), so a paused run loses little.
CHECKPOINT_ROUNDS = {"prfl": 300, "fedasync": 150, "fedbuff": 25, "heterofl": 25, "fedfix": 20, "fedavg": 4}


@dataclass(frozen=True)
class Group:
    """One scenario under one accounting."""

    accounting: str
    fleet: str
    partition: str

    @property
    def name(self) -> str:
        return f"{self.accounting}/{self.fleet}/{self.partition}"

    @classmethod
    def parse(cls, name: str) -> "Group":
        parts = name.split("/")
        if len(parts) != 3 or parts[0] not in ACCOUNTINGS or parts[1] not in FLEETS or parts[2] not in PARTITIONS:
            raise ConfigError(f"group {name!r} must be <{'|'.join(ACCOUNTINGS)}>/<{'|'.join(FLEETS)}>/"
                              f"<{'|'.join(PARTITIONS)}>")
        return cls(*parts)


@dataclass(frozen=True)
class Cell:
    tier: int
    group: Group
    method: str
    seed: int

    @property
    def key(self) -> str:
        return f"{self.group.name}/{self.method}/seed{self.seed}"

    def as_dict(self) -> dict[str, Any]:
        return {"tier": self.tier, "group": self.group.name, "method": self.method, "seed": self.seed}


def plan_cells(seeds: Sequence[int] = SEEDS) -> list[Cell]:
    """Every cell of the sweep in run order: by tier, then seed, then method."""
    tiers: list[tuple[str, Sequence[str]]] = []
    for part in ("dirichlet", "iid"):
        tiers += [
            (f"honest/paper10/{part}", HEAD),
            (f"honest/paper10/{part}", tuple(BASELINES)),
            (f"reference/paper10/{part}", HEAD),
            (f"honest/allfast/{part}", HEAD),
            (f"honest/paper10/{part}", tuple(ABLATIONS)),
        ]
    tiers.append(("honest/reversed/dirichlet",
                  ("prfl", "heterofl-mask", *FEDASYNC_GRID, "heterofl-width", "fedbuff-k5", *ADAPTIVE)))
    tiers.append(("honest/paper10/dirichlet", tuple(RECOVERY_PROBE)))
    tiers.append(("honest/paper10/dirichlet", tuple(REFERENCE_MINIMUMS)))
    cells = []
    for tier, (group, methods) in enumerate(tiers, start=1):
        for seed in seeds:
            cells += [Cell(tier, Group.parse(group), m, seed) for m in methods]
    return cells


def select(cells: Iterable[Cell], tiers: Sequence[int] | None, groups: Sequence[str] | None,
           methods: Sequence[str] | None, seeds: Sequence[int] | None) -> list[Cell]:
    """The cells matching every filter given (groups and methods are shell patterns)."""
    out = []
    for c in cells:
        if tiers and c.tier not in tiers:
            continue
        if groups and not any(fnmatch.fnmatchcase(c.group.name, g) for g in groups):
            continue
        if methods and not any(fnmatch.fnmatchcase(c.method, m) for m in methods):
            continue
        if seeds is not None and c.seed not in seeds:
            continue
        out.append(c)
    return out


# ---------------------------------------------------------------------------- configs
def accounting_known() -> bool:
    """Does this build's config have ``sim.accounting``?"""
    return "accounting" in SimConfig.model_fields


def unavailable(cell: Cell) -> str | None:
    """Why this build cannot run the cell (an option or setting it does not have), or None."""
    if cell.group.accounting != "honest" and not accounting_known():
        return "sim.accounting is not in this build"
    spec = METHODS[cell.method]
    cls = POLICIES[spec["name"]].config_cls  # type: ignore[attr-defined]
    fields = {f.name for f in dataclasses.fields(cls)}
    missing = sorted(set(spec["options"]) - fields)
    if missing:
        return f"{spec['name']} has no option {', '.join(missing)} in this build"
    try:
        cls(**spec["options"])
    except (TypeError, ValueError) as exc:
        return f"{spec['name']} options refused: {exc}"
    return None


@dataclass(frozen=True)
class Settings:
    """What every run of an invocation shares."""

    base: str = "fmnist"
    max_time: float = MAX_TIME
    eval_every: float = EVAL_EVERY
    targets: tuple[float, ...] = TARGETS
    checkpoint_every: int | None = None  # None: CHECKPOINT_ROUNDS by policy
    extra: tuple[str, ...] = ()
    eval_samples: int | None = None  # None: the whole test set
    consecutive: int = 1  # evaluations in a row at or above a target that time to target asks for

    def overrides(self, group: Group, seed: int, policy: str) -> list[str]:
        out = list(BASES[self.base]) + FLEETS[group.fleet] + PARTITIONS[group.partition]
        if group.accounting != "honest":  # honest is the default; only a build that knows the field gets it
            out.append(f"sim.accounting={group.accounting}")
        out += [
            f"data.eval_samples={self.eval_samples if self.eval_samples is not None else 'null'}",
            f"seed={seed}", f"sim.max_time={self.max_time:g}", f"sim.eval_every_seconds={self.eval_every:g}",
            f"sim.targets=[{', '.join(f'{t:g}' for t in self.targets)}]",
            f"sim.checkpoint_every_rounds={self.checkpoint_every or CHECKPOINT_ROUNDS.get(policy, 100)}",
        ]
        return out + list(self.extra)

    def whole_test_set(self) -> bool:
        """Do the runs evaluate on the whole test set (no ``data.eval_samples`` limit)?"""
        last = [o for o in self.overrides(Group("honest", "paper10", "iid"), 0, "prfl") if o.startswith("data.eval_samples=")]
        return bool(last) and last[-1] == "data.eval_samples=null"

    def time_to_target_rule(self) -> str:
        if self.consecutive == 1:
            return "the first evaluation at or above the target"
        return f"the first of {self.consecutive} evaluations in a row at or above the target"

    def config(self, cell: Cell) -> ExperimentConfig:
        spec = METHODS[cell.method]
        cfg = load_config(overrides=self.overrides(cell.group, cell.seed, spec["name"]))
        return cfg.with_policy(PolicyConfig.model_validate(spec))


# Fields that do not change a run's history (executors agree record for record) and may differ
# between the pieces of a run.
_FREE = {("sim", "executor"), ("sim", "workers"), ("sim", "checkpoint_every_rounds"), ("sim", "ray_address"),
         ("sim", "spill_dir")}


def config_differences(saved: dict[str, Any], wanted: dict[str, Any], prefix: tuple[str, ...] = ()) -> list[str]:
    """Dotted keys where two config dumps differ, ignoring :data:`_FREE` fields."""
    out = []
    for k in sorted(set(saved) | set(wanted)):
        path = (*prefix, k)
        if path in _FREE:
            continue
        a, b = saved.get(k), wanted.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, path)
        elif a != b:
            out.append(".".join(path))
    return out


# ---------------------------------------------------------------------------- pieces
class PieceEnded(Exception):
    """The wall-time budget is spent; the run stopped right after a checkpoint (or at the grace limit)."""


class WallBudget:
    """``on_progress`` hook that ends a run cleanly once ``clock() >= deadline``.

    Past the deadline, the first evaluation notes the run's checkpoint file; the run is stopped
    at the first evaluation after a newer checkpoint was written (losing under one evaluation
    period of work), or at ``deadline + grace`` whatever the checkpoint (losing the work since it).
    """

    def __init__(self, deadline: float, grace: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.deadline, self.grace, self.clock = deadline, grace, clock
        self.run_dir: Path | None = None
        self._mark: tuple[int, int] | None | bool = False  # False: not noted yet
        self.virtual = 0.0

    def expired(self) -> bool:
        return self.clock() >= self.deadline

    def left(self) -> float:
        """Wall seconds to the deadline (negative past it)."""
        return self.deadline - self.clock()

    def stop(self) -> str:
        """Spend the budget now: the run pauses at its next checkpoint (within the grace). Called
        again, the grace goes too: the run stops at its next step. Returns what it did."""
        now = self.clock()
        if now < self.deadline:
            self.deadline = now
            return "pausing at the next checkpoint"
        self.deadline, self.grace = min(self.deadline, now), 0.0
        return "stopping at the next step (resumes from the last checkpoint)"

    def start(self, run_dir: Path) -> None:
        self.run_dir, self._mark, self.virtual = run_dir, False, 0.0

    def _checkpoint(self) -> tuple[int, int] | None:
        assert self.run_dir is not None
        try:
            st = (self.run_dir / CHECKPOINT).stat()
        except FileNotFoundError:
            return None
        return st.st_mtime_ns, st.st_ino

    def __call__(self, rec: dict[str, Any]) -> None:
        self.virtual = float(rec.get("time") or 0.0)
        now = self.clock()
        if now < self.deadline:
            return
        sig = self._checkpoint()
        if self._mark is False:
            self._mark = sig
        elif sig is not None and sig != self._mark:
            raise PieceEnded(f"paused after the checkpoint at {self.virtual:.0f} virtual s")
        if now >= self.deadline + self.grace:
            raise PieceEnded(f"grace spent at {self.virtual:.0f} virtual s; resumes from the last checkpoint")


def stop_on_signals(budget: WallBudget) -> Callable[[], None]:
    """Let SIGTERM and SIGINT spend ``budget`` (:meth:`WallBudget.stop`) instead of killing the
    process, which would leave no piece record and lose the work since the last checkpoint. The
    third signal is not caught. Returns a function that puts the earlier handlers back."""
    signals = (signal.SIGTERM, signal.SIGINT)
    earlier = {sig: signal.getsignal(sig) for sig in signals}
    caught = 0

    def restore() -> None:
        for sig, handler in earlier.items():
            signal.signal(sig, handler)

    def handler(signum: int, frame: Any) -> None:
        nonlocal caught
        caught += 1
        what = budget.stop()
        log.warning("%s: %s; the next invocation resumes it", signal.Signals(signum).name, what)
        if caught >= 2:
            restore()

    for sig in signals:
        signal.signal(sig, handler)
    return restore


def _git_commit() -> str | None:
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return rev + ("+dirty" if dirty else "")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _read_pieces(rd: Path) -> list[dict[str, Any]]:
    p = rd / "pieces.jsonl"
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]


def _append_piece(rd: Path, piece: dict[str, Any]) -> None:
    rd.mkdir(parents=True, exist_ok=True)
    with open(rd / "pieces.jsonl", "a", encoding="utf-8") as fh:
        fh.write(json.dumps(piece) + "\n")


CLAIM = "claim"  # a run directory's claim file: the pid of the invocation running the cell


def _claim_holder(path: Path) -> int | None:
    try:
        return int(path.read_text(encoding="utf-8").strip())
    except (OSError, ValueError):
        return None


@dataclass
class Sweep:
    """Paths and settings of one invocation."""

    out: Path
    runs: Path
    settings: Settings
    seeds: tuple[int, ...] = SEEDS
    command: str = ""
    _scenario: tuple[tuple[str, int], Any] | None = None
    _tuned: dict[Group, set[str]] = dataclasses.field(default_factory=dict)  # complete grids only: fixed

    def run_dir(self, cell: Cell) -> Path:
        return self.runs / cell.group.name / cell.method / f"seed{cell.seed}"

    def record_path(self, cell: Cell) -> Path:
        return self.out / "records" / cell.group.name / cell.method / f"seed{cell.seed}.json"

    # -- claims: side-by-side invocations share the plan
    def claim(self, cell: Cell) -> bool:
        """Claim ``cell`` for this process: False if a live process holds it already."""
        path = self.run_dir(cell) / CLAIM
        path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _claim_holder(path)
                if holder is not None and holder != os.getpid() and process_alive(holder):
                    return False
                path.unlink(missing_ok=True)  # a claim left by a process that has ended
                continue
            with os.fdopen(fd, "w") as fh:
                fh.write(f"{os.getpid()}\n")
            return True
        return False

    def release(self, cell: Cell) -> None:
        path = self.run_dir(cell) / CLAIM
        if _claim_holder(path) == os.getpid():
            path.unlink(missing_ok=True)

    # -- the protocol: which cells of the full plan are run
    def protocol(self, cell: Cell) -> tuple[str, str] | None:
        """("skipped", why) for a cell the protocol leaves out, ("waiting", why) for one that
        waits for the FedAsync tuning it depends on, None for a cell to run. The FedAsync grid is
        tuned on seed 0 of honest/paper10/<split>; every other FedAsync cell of that split (seeds
        1 and 2, the reference accounting, the all-fast fleet) runs the configurations best at
        some target there (:meth:`tuned`). Ablations and the other PR-FL variants run on seed 0."""
        if cell.method in ABLATIONS and cell.seed != 0:
            return "skipped", "ablations run on seed 0 only"
        if cell.method in ADAPTIVE and cell.seed != 0:
            return "skipped", "PR-FL's adaptive variant runs on seed 0 only"
        if cell.method in RECOVERY_PROBE and cell.seed != 0:
            return "skipped", "the recovery probe runs on seed 0 only"
        if cell.method in REFERENCE_MINIMUMS and cell.seed != 0:
            return "skipped", "the reference's minimum rule runs on seed 0 only"
        if cell.method not in FEDASYNC_GRID:
            return None
        tuning = Group("honest", "paper10", cell.group.partition)
        if cell.group == tuning and cell.seed == 0:
            return None
        best = self.tuned(tuning)
        if best is None:
            return "waiting", f"for the seed-0 FedAsync grid of {tuning.name}"
        if cell.method not in best:
            return "skipped", f"not best at any target on seed 0 of {tuning.name} (best: {', '.join(sorted(best))})"
        return None

    def tuned(self, group: Group) -> set[str] | None:
        """The FedAsync configurations best at some target on seed 0 of ``group`` (the one with
        the best final accuracy if none reaches a target), or None until every one has a record."""
        if group in self._tuned:
            return self._tuned[group]
        runs: dict[str, list[Run]] = {}
        for m in FEDASYNC_GRID:
            rp = self.record_path(Cell(0, group, m, 0))
            if not rp.is_file():
                return None
            runs[m] = [Run.from_record(json.loads(rp.read_text(encoding="utf-8")))]
        best = {b.method for t in self.settings.targets
                if (b := best_tuned(runs, "fedasync", t, [0], self.settings.consecutive)).method is not None}
        if not best:
            best = {max(runs, key=lambda m: (runs[m][0].summary.get("final_accuracy") or 0.0, m))}
        self._tuned[group] = best
        return best

    # -- state
    def status(self, cell: Cell) -> dict[str, Any]:
        """The cell's state: done, finished (not collected), partial, failed, unavailable or pending."""
        d = cell.as_dict()
        rp = self.record_path(cell)
        if rp.is_file():
            rec = json.loads(rp.read_text(encoding="utf-8"))
            s = rec.get("summary") or {}
            return {**d, "status": "done", "virtual_seconds": s.get("virtual_seconds"),
                    "wall_seconds": rec.get("wall_seconds_total"), "pieces": rec.get("pieces")}
        why = unavailable(cell)
        if why:
            return {**d, "status": "unavailable", "reason": why}
        rd = self.run_dir(cell)
        rule = self.protocol(cell)
        if rule is not None and not (rd / "config.yaml").is_file():  # a cell already started is finished
            return {**d, "status": rule[0], "reason": rule[1]}
        if (rd / "summary.json").is_file():
            return {**d, "status": "finished"}
        pieces = _read_pieces(rd)
        wall = sum(p.get("wall_seconds", 0.0) for p in pieces)
        if pieces and str(pieces[-1].get("ended", "")).startswith("failed"):
            return {**d, "status": "failed", "reason": pieces[-1]["ended"], "wall_seconds": wall}
        if (rd / CHECKPOINT).is_file() or (rd / PREVIOUS_CHECKPOINT).is_file():
            return {**d, "status": "partial", "virtual_seconds": pieces[-1].get("virtual_to") if pieces else None,
                    "wall_seconds": wall, "pieces": len(pieces)}
        return {**d, "status": "pending"}

    def write_manifest(self, cells: Sequence[Cell]) -> dict[str, Any]:
        """``manifest.json``: the plan's settings and every cell's state."""
        states = [self.status(c) for c in cells]
        counts: dict[str, int] = {}
        for s in states:
            counts[s["status"]] = counts.get(s["status"], 0) + 1
        s = self.settings
        manifest = {
            "benchmark": "headline",
            "updated": _now(),
            "command": self.command,
            "settings": {
                "base": s.base, "base_overrides": BASES[s.base], "max_time": s.max_time, "eval_every_seconds": s.eval_every,
                "targets": list(s.targets), "seeds": list(self.seeds), "extra_overrides": list(s.extra),
                "time_to_target": self.settings.time_to_target_rule(),
                "consecutive": self.settings.consecutive,
                "evaluated_on": ("the whole test set" if self.settings.whole_test_set()
                                 else f"the first {self.settings.eval_samples} test images"),
                "levelled_off": "the last 20% of the run raised the best accuracy by at most 0.005",
                "accounting_in_this_build": accounting_known(),
                "methods": METHODS, "fleets": FLEETS, "partitions": PARTITIONS,
            },
            "counts": counts,
            "cells": states,
        }
        self.out.mkdir(parents=True, exist_ok=True)
        tmp = self.out / f"manifest.json.{os.getpid()}.tmp"  # sweeps of disjoint cells may share ``out``
        head = json.dumps({k: v for k, v in manifest.items() if k != "cells"}, indent=1)
        body = ",\n".join("  " + json.dumps(c) for c in states)  # one line per cell: readable diffs
        tmp.write_text(f'{head[:-2]},\n "cells": [\n{body}\n ]\n}}\n', encoding="utf-8")
        os.replace(tmp, self.out / "manifest.json")
        return manifest

    # -- running
    def _scenario_for(self, cfg: ExperimentConfig, cell: Cell) -> Any:
        key = (cell.group.name, cell.seed)
        if self._scenario is None or self._scenario[0] != key:
            self._scenario = None  # free the previous data set first
            self._scenario = (key, build_scenario(cfg))
        return self._scenario[1]

    def collect(self, cell: Cell, keep_checkpoints: bool = False) -> dict[str, Any]:
        """Write the cell's compact record from its finished run directory; drop its checkpoints,
        but for the last one of a run that has not levelled off (the criterion of the records):
        ``prfl run --resume <run dir> --extend-to <s>`` can take such a run on to a longer horizon."""
        rd = self.run_dir(cell)
        rec = compact_run(rd, cell.as_dict())
        pieces = _read_pieces(rd)
        rec["pieces"] = len(pieces)
        rec["wall_seconds_total"] = sum(p.get("wall_seconds", 0.0) for p in pieces) or rec["summary"].get("wall_seconds")
        rec["commits"] = sorted({p["commit"] for p in pieces if p.get("commit")})
        # the machines the pieces computed on (a seed fixes the history on one kind of machine only)
        machines = [p["machine"] for p in pieces if isinstance(p.get("machine"), dict)]
        rec["machines"] = [m for i, m in enumerate(machines) if m not in machines[:i]]
        rec["overrides"] = self.settings.overrides(cell.group, cell.seed, METHODS[cell.method]["name"])
        # whether every policy's models were relayed (sim.model_relay; absent before the option: no)
        rec["model_relay"] = load_run_config(rd / "config.yaml").sim.model_relay
        horizon = _horizon(rd)
        if horizon is not None and horizon != self.settings.max_time:  # taken on by `extend`
            rec["overrides"] = [f"sim.max_time={horizon:g}" if o.startswith("sim.max_time=") else o
                                for o in rec["overrides"]]
            rec["extended_to"] = horizon
        earlier = earlier_run(rd)
        if earlier is not None:  # run again from the start by `extend --rerun`
            rec["rerun"] = {"earlier_run_dir": earlier.name, "earlier_end": _horizon(earlier),
                            "history_continues_earlier": history_continues(earlier, rd)}
        # where the full history is kept (a path in the repository; none for a directory outside it)
        rec["run_dir"] = rd.relative_to(ROOT).as_posix() if rd.is_relative_to(ROOT) else None
        rp = self.record_path(cell)
        rp.parent.mkdir(parents=True, exist_ok=True)
        tmp = rp.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(rec, indent=None, separators=(",", ":")) + "\n", encoding="utf-8")
        os.replace(tmp, rp)
        if not keep_checkpoints:
            extendable = Run.from_record(rec).levelled() is False
            for name in (PREVIOUS_CHECKPOINT, CHECKPOINT + ".tmp") if extendable else (CHECKPOINT, PREVIOUS_CHECKPOINT,
                                                                                      CHECKPOINT + ".tmp"):
                (rd / name).unlink(missing_ok=True)
        return rec

    def extend_cell(self, cell: Cell, to: float, budget: WallBudget) -> str:
        """Take a finished cell's run on to ``to`` virtual s from the checkpoint it kept (or go on
        with such an extension the budget paused): "complete" or "paused"."""
        rd = self.run_dir(cell)
        horizon = _horizon(rd)
        later = to if horizon is None or horizon < to else None
        return _piece(rd, budget, {"resumed": True, "extend_to": to},
                      lambda: resume_run(rd, on_progress=budget, max_time=later))

    def rerun_cell(self, cell: Cell, to: float, budget: WallBudget) -> str:
        """Run a finished cell again from the start to ``to`` virtual s: for a run that has not
        levelled off and kept no checkpoint to be taken on from. Nothing is deleted: what its run
        directory held moves to ``<dir>.before-rerun`` (numbered if taken), and the new record
        says whether the new history repeats the earlier one up to its end (:func:`history_continues`).
        A rerun the budget pauses goes on from its checkpoints as an extension does. "complete" or "paused"."""
        rd = self.run_dir(cell)
        aside = _aside_dir(rd)
        aside.mkdir(parents=True)
        for entry in sorted(rd.iterdir()) if rd.is_dir() else []:
            if entry.name != CLAIM:  # the claim stays: this process holds the cell
                entry.rename(aside / entry.name)
        log.info("%s: the earlier run moved to %s", cell.key, aside.name)
        cfg = self.settings.config(cell).with_max_time(to)
        sc = dataclasses.replace(self._scenario_for(cfg, cell), cfg=cfg)  # the same data, fleet and model
        return _piece(rd, budget, {"resumed": False, "rerun_to": to},
                      lambda: run_policy(sc, cfg.policy, rd, on_progress=budget))

    def run_cell(self, cell: Cell, budget: WallBudget) -> str:
        """Run or resume one cell until it finishes or the budget pauses it: "complete" or "paused"."""
        rd = self.run_dir(cell)
        cfg = self.settings.config(cell)
        if (rd / "summary.json").is_file():
            return "complete"
        resuming = (rd / "config.yaml").is_file() and ((rd / CHECKPOINT).is_file() or (rd / PREVIOUS_CHECKPOINT).is_file())
        if resuming:
            saved = load_run_config(rd / "config.yaml").model_dump(mode="json")  # as it was started
            diff = config_differences(saved, cfg.model_dump(mode="json"))
            if diff:
                raise ConfigError(f"{rd} was started with other settings ({', '.join(diff)}); delete the directory to "
                                  "start the cell again, or resume it with the settings it was started with")
        if resuming:
            return _piece(rd, budget, {"resumed": True}, lambda: resume_run(rd, on_progress=budget))
        return _piece(rd, budget, {"resumed": False},
                      lambda: run_policy(self._scenario_for(cfg, cell), cfg.policy, rd, on_progress=budget))


def _piece(rd: Path, budget: WallBudget, fields: dict[str, Any], run: Callable[[], Any]) -> str:
    """One piece of a cell's run (``run()``, which the budget may pause), recorded in
    ``pieces.jsonl`` whatever its end: "complete" or "paused" (a failure is raised)."""
    budget.start(rd)
    piece = {"started": _now(), "commit": _git_commit(), "machine": fingerprint(), **fields}
    t0 = time.perf_counter()
    ended = "complete"
    try:
        run()
    except PieceEnded as exc:
        ended = f"paused: {exc}"
    except Exception as exc:
        ended = f"failed: {type(exc).__name__}: {exc}"
        raise
    finally:
        piece.update(wall_seconds=round(time.perf_counter() - t0, 3), virtual_to=budget.virtual, ended=ended)
        _append_piece(rd, piece)
    return "complete" if ended == "complete" else "paused"


RERUN_SUFFIX = ".before-rerun"


def _aside_dirs(rd: Path) -> Iterator[Path]:
    """The names beside ``rd`` for what it held before a rerun, in order: ``<dir>.before-rerun``,
    then ``-2``, ``-3``..."""
    yield rd.with_name(rd.name + RERUN_SUFFIX)
    for k in itertools.count(2):
        yield rd.with_name(f"{rd.name}{RERUN_SUFFIX}-{k}")


def _aside_dir(rd: Path) -> Path:
    """The first free name of :func:`_aside_dirs`."""
    return next(p for p in _aside_dirs(rd) if not p.exists())


def earlier_run(rd: Path) -> Path | None:
    """The first finished run a rerun moved aside from ``rd`` (see :meth:`Sweep.rerun_cell`), if any."""
    for path in itertools.takewhile(Path.exists, _aside_dirs(rd)):
        if (path / "summary.json").is_file():
            return path
    return None


def _horizon(rd: Path) -> float | None:
    return load_config(rd / "config.yaml").sim.max_time


def history_continues(earlier: Path, later: Path) -> bool:
    """Whether the history of run directory ``later`` holds the lines of ``earlier``'s history,
    in order and to the letter, for every event before ``earlier``'s end (its horizon), and no
    other line before it: a longer run from the same seed repeats a shorter one."""
    end = _horizon(earlier)
    if end is None:
        raise ValueError(f"{earlier} has no time limit to compare up to")

    def before_end(path: Path) -> Iterator[str]:
        with (path / "history.jsonl").open(encoding="utf-8") as fh:
            for line in fh:
                if float(json.loads(line).get("time") or 0.0) >= end:
                    return
                yield line.rstrip("\n")

    return all(a == b for a, b in itertools.zip_longest(before_end(earlier), before_end(later)))


# ---------------------------------------------------------------------------- outputs
def write_cells_csv(out: Path, targets: Sequence[float], consecutive: int = 1) -> Path:
    """``cells.csv``: one row per compact record (the numbers RESULTS.md starts from)."""
    rows = []
    for p in sorted((out / "records").glob("**/seed*.json")):
        run = Run.from_record(json.loads(p.read_text(encoding="utf-8")))
        s = run.summary
        row = {"group": run.group, "method": run.method, "seed": run.seed,
               "final_accuracy": s.get("final_accuracy"), "best_accuracy": s.get("best_accuracy"),
               "virtual_seconds": s.get("virtual_seconds"), "server_rounds": s.get("server_rounds"),
               "local_rounds": " ".join(str(x) for x in s.get("local_rounds") or []),
               "server_egress_bytes": s.get("server_egress_bytes"), "server_ingress_bytes": s.get("server_ingress_bytes"),
               "levelled": run.levelled(), "wall_seconds_total": run.record.get("wall_seconds_total")}
        for t in targets:
            row[f"time_to_{t:g}"] = run.time_to(t, consecutive)
        rows.append(row)
    path = out / "cells.csv"
    if rows:
        tmp = out / f"cells.csv.{os.getpid()}.tmp"
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]), lineterminator="\n")
            w.writeheader()
            w.writerows({k: ("" if v is None else v) for k, v in r.items()} for r in rows)
        os.replace(tmp, path)
    return path


def run_sweep(sweep: Sweep, cells: Sequence[Cell], budget: WallBudget, all_cells: Sequence[Cell],
              keep_checkpoints: bool = False, fit: float | None = None) -> dict[str, int]:
    """Run ``cells`` in order until they are done or the budget is spent; returns counts by outcome.

    With ``fit`` (a margin, e.g. 1.15), a cell is started or resumed only if ``fit`` times the wall
    time it is expected to take (:func:`expected_wall`) is left in the budget; the others are passed
    over for a later invocation, so that an invocation finishes the cells it starts instead of
    leaving them paused."""
    counts = {"complete": 0, "paused": 0, "failed": 0, "skipped": 0, "claimed elsewhere": 0, "does not fit": 0}
    paces: Paces | None = None

    def work(cell: Cell) -> str:
        st = sweep.status(cell)  # as it is now that the cell is ours
        if st["status"] == "done":
            counts["skipped"] += 1
            return "skipped"
        if st["status"] == "finished":
            sweep.collect(cell, keep_checkpoints)
            counts["complete"] += 1
            return "complete"
        log.info("%s: %s", cell.key, "resuming" if st["status"] == "partial" else "starting")
        try:
            outcome = sweep.run_cell(cell, budget)
        except Exception:
            log.exception("%s failed", cell.key)
            counts["failed"] += 1
            return "failed"
        counts[outcome] += 1
        if outcome == "complete":
            rec = sweep.collect(cell, keep_checkpoints)
            log.info("%s: done, final accuracy %.4f, %s server updates", cell.key,
                     rec["summary"].get("final_accuracy") or float("nan"), rec["summary"].get("server_rounds"))
        return outcome

    for cell in cells:
        st = sweep.status(cell)
        if st["status"] in ("done", "unavailable", "skipped", "waiting"):
            counts["skipped"] += 1
            continue
        if st["status"] != "finished" and budget.expired():
            log.info("budget spent: %s and later cells wait for the next invocation", cell.key)
            break
        if fit is not None and st["status"] != "finished":
            if paces is None:  # read again once a cell has finished and added its record
                paces = recorded_paces(sweep)
            need = expected_wall(sweep, cell, st, paces)
            if need is None or need * fit > budget.left():
                log.info("%s: does not fit, left for a later invocation (%s; %.0f wall min left)", cell.key,
                         "no finished run to go by" if need is None else f"expected {need / 60:.0f} wall min",
                         budget.left() / 60)
                counts["does not fit"] += 1
                continue
        outcome = _claimed(sweep, cell, all_cells, counts, work)
        if outcome == "paused":
            log.info("%s: paused; run the same command again to resume", cell.key)
            break
        if outcome == "complete":
            paces = None
    _sweep_written(sweep, all_cells)
    return counts


def recorded_paces(sweep: Sweep) -> Paces:
    """The paces of the finished runs recorded under ``sweep.out`` (:class:`Paces`)."""
    return Paces(Run.from_record(json.loads(p.read_text(encoding="utf-8")))
                 for p in sorted((sweep.out / "records").glob("**/seed*.json")))


def expected_wall(sweep: Sweep, cell: Cell, status: Mapping[str, Any] | None = None,
                  paces: Paces | None = None) -> float | None:
    """Wall seconds ``cell`` is expected to take to the horizon (the rest of it, for a partial
    cell), at ``paces`` (default: :func:`recorded_paces`); ``None`` when no finished run stands
    for it."""
    st = sweep.status(cell) if status is None else status
    done = float(st.get("virtual_seconds") or 0.0) if st.get("status") == "partial" else 0.0
    paces = recorded_paces(sweep) if paces is None else paces
    return paces.wall_seconds(cell.group.name, cell.method, sweep.settings.max_time - done)


def extend_sweep(sweep: Sweep, cells: Sequence[Cell], budget: WallBudget, all_cells: Sequence[Cell], to: float,
                 keep_checkpoints: bool = False, rerun: bool = False) -> dict[str, int]:
    """Take the finished cells of ``cells`` that have not levelled off (by the records' criterion)
    on to ``to`` virtual s, from the last checkpoint their run directories kept, in order, until
    done or the budget is spent; each one's record is then written again. A cell that kept no
    checkpoint is skipped, or with ``rerun`` run again from the start to ``to``
    (:meth:`Sweep.rerun_cell`). Returns counts."""
    counts = {"extended": 0, "paused": 0, "failed": 0, "levelled or long enough": 0, "not done": 0,
              "no checkpoint": 0, "claimed elsewhere": 0}

    def work(cell: Cell) -> str:
        try:
            if (sweep.run_dir(cell) / CHECKPOINT).is_file():
                outcome = sweep.extend_cell(cell, to, budget)
            else:
                outcome = sweep.rerun_cell(cell, to, budget)
        except Exception:
            log.exception("%s failed", cell.key)
            counts["failed"] += 1
            return "failed"
        if outcome == "complete":
            counts["extended"] += 1
            rec = sweep.collect(cell, keep_checkpoints)
            log.info("%s: taken on to %g s, final accuracy %.4f", cell.key, to,
                     rec["summary"].get("final_accuracy") or float("nan"))
        else:
            counts["paused"] += 1
        return outcome

    for cell in cells:
        rp = sweep.record_path(cell)
        if not rp.is_file():
            counts["not done"] += 1
            continue
        run = Run.from_record(json.loads(rp.read_text(encoding="utf-8")))
        if run.levelled() is not False or run.end >= to:
            counts["levelled or long enough"] += 1
            continue
        kept = (sweep.run_dir(cell) / CHECKPOINT).is_file()
        if not kept and not rerun:
            log.info("%s: no checkpoint kept (finished before unlevelled runs kept one); `extend --rerun` runs it "
                     "again from the start", cell.key)
            counts["no checkpoint"] += 1
            continue
        if budget.expired():
            log.info("budget spent: %s and later cells wait for the next invocation", cell.key)
            break
        if kept:
            log.info("%s: taking it on from %g to %g virtual s", cell.key, run.end, to)
        else:
            log.info("%s: no checkpoint kept; running it again from the start to %g virtual s", cell.key, to)
        if _claimed(sweep, cell, all_cells, counts, work) == "paused":
            log.info("%s: paused; run the same command again to go on", cell.key)
            break
    _sweep_written(sweep, all_cells)
    return counts


def _claimed(sweep: Sweep, cell: Cell, all_cells: Sequence[Cell], counts: dict[str, int],
             work: Callable[[Cell], str]) -> str:
    """``work(cell)`` with the cell claimed for this process, then the manifest written; its
    outcome, or "" (counted) when another live process holds the cell."""
    if not sweep.claim(cell):
        counts["claimed elsewhere"] += 1
        return ""
    try:
        return work(cell)
    finally:
        sweep.release(cell)
        sweep.write_manifest(all_cells)


def _sweep_written(sweep: Sweep, all_cells: Sequence[Cell]) -> None:
    """At the end of an invocation: the manifest and cells.csv."""
    sweep.write_manifest(all_cells)
    write_cells_csv(sweep.out, sweep.settings.targets, sweep.settings.consecutive)


# ---------------------------------------------------------------------------- estimate
def _cpu_seconds() -> float:
    """CPU seconds (user + system) of this process and of its children that have ended."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def estimate(sweep: Sweep, cells: Sequence[Cell], probe_time: float, scratch: Path,
             on_probe: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run each distinct (accounting, fleet, policy configuration) of ``cells`` for ``probe_time``
    virtual s on seed 0 of the Dirichlet split and project the cost of every cell.

    Measured per probe: wall seconds and CPU seconds (this process and its worker processes,
    which the process executor joins at the end of a run). An evaluation's cost ``e`` (wall and
    CPU) is the median of three evaluations of the initial weights on the test set. Per probe,
    ``rate = (measured - evaluations * e) / probe_time`` per virtual second outside evaluation; a
    cell of horizon ``T`` is projected at ``rate * T + (T / eval_every + 2) * e``. CPU seconds do
    not grow with the machine's load as wall seconds do: on a machine whose two cores are free
    the sweep's wall time lies between CPU / 2 (perfect overlap) and CPU (none). The FedAsync grid
    shares one probe (alpha and the staleness function do not change what an update costs).
    ``on_probe`` gets the projection so far (``complete`` False) after every probe, so a cut
    estimate leaves what it measured.
    """
    s = sweep.settings
    short = dataclasses.replace(s, max_time=probe_time)
    commit = _git_commit()  # the code the probes run

    def probe_key(c: Cell) -> tuple[str, str, str]:
        return c.group.accounting, c.group.fleet, "fedasync-a0.6-poly" if c.method in FEDASYNC_GRID else c.method

    probes: dict[tuple[str, str, str], Cell] = {}
    for c in cells:
        if not unavailable(c):
            k = probe_key(c)
            probes.setdefault(k, Cell(0, Group(k[0], k[1], "dirichlet"), k[2], 0))
    measured: dict[tuple[str, str, str], dict[str, Any]] = {}
    cost: dict[str, float] = {}
    for key, probe in probes.items():
        cfg = short.config(probe)
        sc = sweep._scenario_for(cfg, probe)
        if not cost:
            ev = sc.evaluator()
            ev(sc.initial_weights)
            walls, cpus = [], []
            for _ in range(3):
                w, c0 = time.perf_counter(), _cpu_seconds()
                ev(sc.initial_weights)
                walls.append(time.perf_counter() - w)
                cpus.append(_cpu_seconds() - c0)
            cost = {"wall": statistics.median(walls), "cpu": statistics.median(cpus)}
            log.info("one evaluation (%s test samples): %.2f s wall, %.2f s CPU", cfg.data.eval_samples or "all",
                     cost["wall"], cost["cpu"])
        w, c0 = time.perf_counter(), _cpu_seconds()
        summary = run_policy(sc, cfg.policy, scratch / probe.key)
        wall, cpu = time.perf_counter() - w, _cpu_seconds() - c0
        n_evals = sum(1 for r in summary["history"] if r.get("event") == "eval")
        measured[key] = {
            "group": probe.group.name, "method": probe.method, "virtual_seconds": summary["virtual_seconds"],
            "server_rounds": summary["server_rounds"], "evaluations": n_evals, "final_accuracy": summary["final_accuracy"],
            "wall_seconds": round(wall, 2), "cpu_seconds": round(cpu, 2),
            "wall_per_virtual_second": round(max(0.0, wall - n_evals * cost["wall"]) / probe_time, 5),
            "cpu_per_virtual_second": round(max(0.0, cpu - n_evals * cost["cpu"]) / probe_time, 5),
            "load_average": round(os.getloadavg()[0], 2),
        }
        log.info("%s %s: %.0f s wall, %.0f s CPU for %.0f virtual s (%d updates)", probe.group.name, probe.method,
                 wall, cpu, probe_time, summary["server_rounds"])
        if on_probe is not None:
            on_probe(_projection(sweep, cells, probe_time, measured, cost, probe_key, commit, complete=False))
    return _projection(sweep, cells, probe_time, measured, cost, probe_key, commit, complete=True)


def _projection(sweep: Sweep, cells: Sequence[Cell], probe_time: float, measured: dict[tuple[str, str, str], dict[str, Any]],
                cost: dict[str, float], probe_key: Callable[[Cell], tuple[str, str, str]], commit: str | None,
                complete: bool) -> dict[str, Any]:
    """The estimate's file: what the probes measured and every measured cell's projected cost."""
    s = sweep.settings
    evals_per_run = s.max_time / s.eval_every + 2
    per_cell = []
    for c in cells:
        m = measured.get(probe_key(c))
        if m is None:
            continue
        per_cell.append({**c.as_dict(), **{
            f"projected_{kind}_seconds": round(m[f"{kind}_per_virtual_second"] * s.max_time + evals_per_run * cost[kind], 1)
            for kind in ("wall", "cpu")}})

    def hours(kind: str, tier: int | None = None) -> float:
        return round(sum(p[f"projected_{kind}_seconds"] for p in per_cell if tier in (None, p["tier"])) / 3600, 2)

    tiers = sorted({p["tier"] for p in per_cell})
    return {
        "benchmark": "headline-estimate",
        "date": _now(),
        "command": sweep.command,
        "commit": commit,
        "machine": {"cpu_count": os.cpu_count(), "load_average_at_end": [round(x, 2) for x in os.getloadavg()]},
        "complete": complete,
        "probe_virtual_seconds": probe_time,
        "horizon_virtual_seconds": s.max_time,
        "evaluation": {"test_samples": "all" if s.whole_test_set() else s.eval_samples,
                       "wall_seconds": round(cost.get("wall", 0.0), 3), "cpu_seconds": round(cost.get("cpu", 0.0), 3),
                       "per_run": evals_per_run},
        "measured": list(measured.values()),
        "cells_projected": len(per_cell),
        "cells_not_measured": sum(1 for c in cells if not unavailable(c) and probe_key(c) not in measured),
        "cells_unavailable": [c.key for c in cells if unavailable(c)],
        "cpu_hours_by_tier": {str(t): hours("cpu", t) for t in tiers},
        "cpu_hours_total": hours("cpu"),
        "wall_hours_at_measured_load_total": hours("wall"),
        "wall_hours_two_free_cores": [round(hours("cpu") / 2, 2), hours("cpu")],
        "per_cell": per_cell,
    }


# ---------------------------------------------------------------------------- command line
def _last_time(history: Path, tail_bytes: int = 1 << 16) -> float | None:
    """The virtual time of the last event of a history that has one (read from its end: a long
    run's history is hundreds of megabytes)."""
    try:
        with history.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - tail_bytes))
            lines = fh.read().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            event = json.loads(line)
        except ValueError:  # the first, cut line of the tail, or a line being written
            continue
        if isinstance(event, dict) and isinstance(event.get("time"), (int, float)):
            return float(event["time"])
    return None


def progress(sweep: Sweep, cell: Cell, now: float | None = None) -> dict[str, Any] | None:
    """Where a started, unrecorded cell stands: ``None`` for a cell with a record or not started.
    ``state`` is "running" (a live process holds its claim), "finished" (not collected yet) or
    "paused"; ``virtual`` the time its history has reached; for a running cell, ``pace`` (virtual
    s per wall s since its current piece started, i.e. since the claim was written) and ``eta_s``
    (wall seconds to the horizon at that pace)."""
    rd = sweep.run_dir(cell)
    if sweep.record_path(cell).is_file() or not (rd / "config.yaml").is_file():
        return None
    pieces = _read_pieces(rd)
    out: dict[str, Any] = {"cell": cell.key, "pieces": len(pieces),
                           "wall_seconds": round(sum(p.get("wall_seconds", 0.0) for p in pieces), 1),
                           "virtual": _last_time(rd / "history.jsonl")}
    claim = rd / CLAIM
    holder = _claim_holder(claim)
    if holder is not None and process_alive(holder):
        out["state"] = "running"
        out["pid"] = holder
        start_v = float(pieces[-1].get("virtual_to") or 0.0) if pieces else 0.0
        try:
            claimed = claim.stat().st_mtime
            # a run resumed from a piece that left no record: where this piece started is unknown
            unknown = not pieces and (rd / "config.yaml").stat().st_mtime < claimed - 60.0
        except OSError:
            claimed, unknown = time.time(), True
        since = (time.time() if now is None else now) - claimed
        if not unknown and out["virtual"] is not None and since > 0 and out["virtual"] > start_v:
            pace = (out["virtual"] - start_v) / since
            out["pace"] = round(pace, 3)
            out["eta_s"] = round(max(0.0, sweep.settings.max_time - out["virtual"]) / pace)
    elif (rd / "summary.json").is_file():
        out["state"] = "finished"
    else:
        out["state"] = "paused" if pieces or (rd / CHECKPOINT).is_file() else "started"
    return out


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["plan", "run", "collect", "estimate", "extend", "status"])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="committed results (records, manifest)")
    ap.add_argument("--runs", type=Path, default=DEFAULT_RUNS, help="run directories (histories, checkpoints)")
    ap.add_argument("--base", choices=list(BASES), default="fmnist")
    ap.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    ap.add_argument("--tiers", type=int, nargs="+", help="only these tiers of the plan")
    ap.add_argument("--groups", nargs="+", help="only these groups (shell patterns, e.g. 'honest/*/dirichlet')")
    ap.add_argument("--methods", nargs="+", help="only these methods (shell patterns, e.g. 'fedasync-*')")
    ap.add_argument("--max-time", type=float, default=MAX_TIME, help="virtual seconds per run")
    ap.add_argument("--probe-time", type=float, default=300.0, help="estimate: virtual seconds of each measured run")
    ap.add_argument("--eval-every", type=float, default=EVAL_EVERY, help="virtual seconds between evaluations")
    ap.add_argument("--targets", type=float, nargs="+", default=list(TARGETS))
    ap.add_argument("--eval-samples", type=int, help="evaluate on the first N test images (default: all of them)")
    ap.add_argument("--consecutive", type=int, default=1,
                    help="time to target: the first of this many evaluations in a row at or above it")
    ap.add_argument("--checkpoint-every", type=int, help="server updates between checkpoints (default: by policy)")
    ap.add_argument("--budget-minutes", type=float, default=100.0, help="wall minutes before the sweep pauses")
    ap.add_argument("--fit", action="store_true",
                    help="start or resume only cells expected to finish within the budget (at the finished runs' "
                         "paces, times --fit-margin); pass over the others")
    ap.add_argument("--fit-margin", type=float, default=1.15, help="--fit: margin on the expected wall time")
    ap.add_argument("--grace-minutes", type=float, default=15.0, help="longest wait for a checkpoint past the budget")
    ap.add_argument("--keep-checkpoints", action="store_true", help="keep the checkpoints of finished runs")
    ap.add_argument("--extend-to", type=float, help="extend: take finished runs that have not levelled off on to "
                                                    "this virtual time (s)")
    ap.add_argument("--rerun", action="store_true", help="extend: run a cell that kept no checkpoint again from the "
                                                         "start to --extend-to (its earlier run directory is kept)")
    ap.add_argument("--set", dest="extra", action="append", default=[], help="extra config override for every run")
    return ap


def _shown_path(arg: str) -> str:
    """An argument as result files record it: paths relative to the repository; a path outside it
    (a scratch folder) is named by its last part only, so no machine's layout is recorded."""
    if not (os.path.isabs(arg) or arg.startswith("..")):
        return arg
    full = Path(arg) if os.path.isabs(arg) else (Path.cwd() / arg)
    rel = os.path.relpath(full.resolve(), ROOT.resolve())
    return rel if not rel.startswith("..") else f"<scratch>/{full.name}"


def main(argv: Sequence[str] | None = None, clock: Callable[[], float] = time.monotonic) -> int:
    args = _parser().parse_args(list(argv) if argv is not None else None)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    out = args.out if args.out.is_absolute() else ROOT / args.out
    runs = args.runs if args.runs.is_absolute() else ROOT / args.runs
    settings = Settings(base=args.base, max_time=args.max_time,
                        eval_every=args.eval_every, targets=tuple(args.targets),
                        checkpoint_every=args.checkpoint_every, extra=tuple(args.extra),
                        eval_samples=args.eval_samples, consecutive=args.consecutive)
    shown = [_shown_path(a) for a in (argv if argv is not None else sys.argv[1:])]
    # the manifest lists the whole plan (every seed), whichever seeds this invocation runs
    plan_seeds = tuple(sorted(set(SEEDS) | set(args.seeds)))
    sweep = Sweep(out, runs, settings, plan_seeds, command="python benchmarks/headline.py " + " ".join(shown))
    all_cells = plan_cells(plan_seeds)
    cells = select(all_cells, args.tiers, args.groups, args.methods, args.seeds)
    if args.command == "plan":
        manifest = sweep.write_manifest(all_cells)
        chosen = {c.key for c in cells}
        for st in manifest["cells"]:
            if f"{st['group']}/{st['method']}/seed{st['seed']}" in chosen:
                extra = st.get("reason") or ""
                print(f"tier {st['tier']}  {st['group']}/{st['method']}/seed{st['seed']}: {st['status']} {extra}")
        print(json.dumps(manifest["counts"]))
        return 0
    if args.command == "status":  # read-only: where the started cells stand
        for c in cells:
            st = progress(sweep, c)
            if st is None:
                continue
            line = f"{st['cell']}: {st['state']}"
            if st.get("virtual") is not None:
                line += f" at {st['virtual']:.0f} of {settings.max_time:g} virtual s"
            if st.get("pid"):
                line += f" (pid {st['pid']})"
            if st.get("pace"):
                line += f", {st['pace'] * 60:.0f} virtual s per wall minute, done in about {st['eta_s'] / 60:.0f} min"
            line += f"; {st['pieces']} earlier pieces, {st['wall_seconds'] / 60:.0f} wall min"
            print(line)
        return 0
    if args.command == "collect":
        for c in cells:
            if sweep.status(c)["status"] == "finished":
                sweep.collect(c, args.keep_checkpoints)
        manifest = sweep.write_manifest(all_cells)
        write_cells_csv(out, settings.targets, settings.consecutive)
        print(json.dumps(manifest["counts"]))
        return 0
    if args.command == "estimate":
        out.mkdir(parents=True, exist_ok=True)

        def write(est: dict[str, Any]) -> None:
            (out / "estimate.json").write_text(json.dumps(est, indent=1) + "\n", encoding="utf-8")

        with tempfile.TemporaryDirectory(prefix="headline-estimate-") as scratch:
            est = estimate(sweep, cells, args.probe_time, Path(scratch), on_probe=write)
        write(est)
        print(json.dumps({k: v for k, v in est.items() if k not in ("per_cell", "measured")}, indent=1))
        return 0
    budget = WallBudget(clock() + args.budget_minutes * 60.0, args.grace_minutes * 60.0, clock)
    if not args.fit_margin > 0:
        raise SystemExit(f"--fit-margin must be a positive factor on the expected wall time, got {args.fit_margin:g}")
    if args.command == "extend" and (args.extend_to is None or not args.extend_to > args.max_time):
        raise SystemExit(f"extend needs --extend-to, a time after the plan's horizon of {args.max_time:g} s")
    restore = stop_on_signals(budget)
    try:
        if args.command == "extend":
            counts = extend_sweep(sweep, cells, budget, all_cells, args.extend_to, args.keep_checkpoints, args.rerun)
        else:
            counts = run_sweep(sweep, cells, budget, all_cells, args.keep_checkpoints, args.fit_margin if args.fit else None)
    finally:
        restore()
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    print(json.dumps({"this invocation": counts, "cells": manifest["counts"]}))
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
