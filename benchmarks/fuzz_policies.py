"""Event-order fuzzing at scale: random event sequences for every policy and the Flower driver.

Each policy case of ``tests/policies/event_fuzz.py`` (FedAvg, FedAsync, FedBuff, FedFix, HeteroFL
in both forms, PR-FL with its main option sets) is driven through ``--sequences`` sequences of
``--steps`` random driver moves (results in any order and malformed, failures, timers,
evaluations, availability churn, checkpoint-and-restore, undeliverable events), each checked by
the fuzzer's invariants; the Flower driver runs ``--flower`` sequences against the hostile grid
of ``tests/flower/driver_fuzz.py``. Sequence ``i`` of a case is fully determined by ``i``: the seed
of every failure is printed, and ``--cases NAME --first SEED --sequences 1 --show`` replays it
with its event log.

Usage (from the repository root)::

    .venv/bin/python benchmarks/fuzz_policies.py                      # 10,000 per policy and Flower
    .venv/bin/python benchmarks/fuzz_policies.py --sequences 200 --flower 50 --no-write
    .venv/bin/python benchmarks/fuzz_policies.py --cases prfl-sync --first 17 --sequences 1 --show

Writes benchmarks/results/fuzz.json (unless --no-write). Exit code 1 if any sequence failed.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import platform
import subprocess
import sys
import time
import traceback
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path[:0] = [str(ROOT / "tests" / "policies"), str(ROOT / "tests" / "flower")]

from event_fuzz import CASES, FuzzFailure, run_random  # noqa: E402


CHUNK = 250  # sequences per unit of work (a worker's share with --jobs)


def policy_chunk(name: str, first: int, count: int, steps: int, show: bool) -> dict:
    """Sequences ``first .. first + count - 1`` of one policy case."""
    case = CASES[name]
    out: dict = {"sequences": count, "failures": [], "events": Counter(), "stopped_by_policy": 0}
    t0 = time.process_time()
    for seed in range(first, first + count):
        try:
            fz = run_random(case, seed, steps=steps)
        except Exception as exc:  # noqa: BLE001 - a failed check, or a crash of the harness's own checks
            text = str(exc) if isinstance(exc, FuzzFailure) else f"[{name}] {type(exc).__name__}: {exc}\n{traceback.format_exc()}"
            out["failures"].append({"seed": seed, "error": text.splitlines()[0]})
            print(f"FAIL {name} seed {seed}: {text.splitlines()[0]}", flush=True)
            if show:
                print(text, flush=True)
            continue
        out["events"].update(fz.counts)
        out["stopped_by_policy"] += fz.stopped
        if show:
            print("\n".join(fz.log), flush=True)
    out["cpu_seconds"] = time.process_time() - t0
    return out


def flower_chunk(first: int, count: int, show: bool) -> dict:
    """Flower driver sequences ``first .. first + count - 1``."""
    from driver_fuzz import DriverFuzzFailure, run_driver

    logging.disable(logging.CRITICAL)  # the driver logs every failure it handles
    out: dict = {"sequences": count, "failures": [], "grid_events": Counter(), "stop_reasons": Counter(),
                 "policies": Counter()}
    t0 = time.process_time()
    for seed in range(first, first + count):
        try:
            run = run_driver(seed)
        except DriverFuzzFailure as exc:
            text = str(exc)
            out["failures"].append({"seed": seed, "error": text.splitlines()[0]})
            print(f"FAIL flower seed {seed}: {text.splitlines()[0]}", flush=True)
            if show:
                print(text, flush=True)
            continue
        out["grid_events"].update(run["grid"])
        out["stop_reasons"][run["stopped"].split(":")[0].split("=")[0]] += 1
        out["policies"][run["case"]] += 1
    out["cpu_seconds"] = time.process_time() - t0
    return out


def run_job(job: tuple) -> tuple[str, dict]:
    name, first, count, steps, show = job
    if name == FLOWER:
        return name, flower_chunk(first, count, show)
    return name, policy_chunk(name, first, count, steps, show)


def merge(parts: list[dict]) -> dict:
    """Sum the chunks of one case (counters added, failures in seed order, at most 50 kept)."""
    total: dict = {}
    for part in parts:
        for key, value in part.items():
            if isinstance(value, Counter):
                total.setdefault(key, Counter()).update(value)
            elif isinstance(value, list):
                total.setdefault(key, []).extend(value)
            else:
                total[key] = total.get(key, 0) + value
    failures = sorted(total.pop("failures", []), key=lambda f: f["seed"])
    out = {"sequences": total.pop("sequences"), "failed": len(failures), "failures": failures[:50],
           "cpu_seconds": round(total.pop("cpu_seconds"), 1)}
    for key, value in total.items():
        out[key] = dict(sorted(value.items())) if isinstance(value, Counter) else value
    return out


FLOWER = "flower driver"


def git_commit() -> str | None:
    """The checked-out commit, with ``+changes`` when the working tree differs from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return f"{head}+changes" if dirty else head


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sequences", type=int, default=10_000, help="sequences per policy case")
    ap.add_argument("--steps", type=int, default=60, help="driver moves per sequence")
    ap.add_argument("--first", type=int, default=0, help="seed of the first sequence")
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated policy cases ({', '.join(CASES)}); '' for none")
    ap.add_argument("--flower", type=int, default=None, help="Flower driver sequences (default: --sequences)")
    ap.add_argument("--jobs", type=int, default=1, help="worker processes (chunks of 250 sequences each)")
    ap.add_argument("--show", action="store_true", help="print every sequence's event log (for replaying one seed)")
    ap.add_argument("--no-write", action="store_true", help="do not write benchmarks/results/fuzz.json")
    args = ap.parse_args()
    names = [n for n in args.cases.split(",") if n]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        ap.error(f"unknown case {unknown[0]!r}; valid cases: {', '.join(CASES)}")
    flower = args.sequences if args.flower is None else args.flower
    commit = git_commit()  # the code under test, read before the run (it may take hours)
    jobs = [(name, first, min(CHUNK, args.first + args.sequences - first), args.steps, args.show)
            for name in names for first in range(args.first, args.first + args.sequences, CHUNK)]
    jobs += [(FLOWER, first, min(CHUNK, args.first + flower - first), 0, args.show)
             for first in range(args.first, args.first + flower, CHUNK)]
    t0 = time.perf_counter()
    parts: dict[str, list[dict]] = {}
    if args.jobs > 1:
        with multiprocessing.get_context("fork").Pool(args.jobs) as pool:
            for name, part in pool.imap_unordered(run_job, jobs):
                parts.setdefault(name, []).append(part)
    else:
        for job in jobs:
            name, part = run_job(job)
            parts.setdefault(name, []).append(part)
    wall = time.perf_counter() - t0
    policies = {name: {**merge(parts[name]), "steps": args.steps} for name in names}
    driver = merge(parts[FLOWER]) if flower else None
    for name, r in [*policies.items(), *([(FLOWER, driver)] if driver else [])]:
        print(f"{name:16s} {r['sequences']:6d} sequences  {r['failed']} failed  {r['cpu_seconds']:7.1f} cpu s")
    failed = sum(p["failed"] for p in policies.values()) + (driver["failed"] if driver else 0)
    total = sum(p["sequences"] for p in policies.values()) + (driver["sequences"] if driver else 0)
    print(f"{total} sequences, {failed} failed, {wall:.0f} s wall with {args.jobs} job(s)")
    if not args.no_write:
        cmd = " ".join(["benchmarks/fuzz_policies.py", *sys.argv[1:]])
        result = {
            "benchmark": "fuzz_policies",
            "command": f".venv/bin/python {cmd}",
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "commit": commit,
            "python": platform.python_version(),
            "jobs": args.jobs,
            "wall_seconds": round(wall, 1),
            "sequences": total,
            "failed": failed,
            "policies": policies,
            "flower_driver": driver,
        }
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "fuzz.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {(RESULTS / 'fuzz.json').relative_to(ROOT)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
