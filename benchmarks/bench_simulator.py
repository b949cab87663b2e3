"""Simulator overhead and the parallel executors' speed-ups, measured in one run.

Overhead = wall time of a simulated run / sum of the raw local-training seconds of its tasks
(measured inside the trainer), inline executor; goal <= 1.10. Speed-up = wall time inline /
wall time on a process pool of ``--workers`` processes or as many Ray actors, same run (same seed, so the same tasks
and, by construction, the same history; the script checks the histories agree).

Usage: .venv/bin/python benchmarks/bench_simulator.py [--rounds 200] [--policy fedasync]
       [--executors inline process ray]
Writes benchmarks/results/simulator.json (FedAsync) or simulator_<policy>.json, or ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from prfl.config import load_config
from prfl.run import build_scenario, run_policy

RESULTS = Path(__file__).parent / "results"


def comparable(history):
    """History records without wall-clock fields."""
    return [{k: v for k, v in r.items() if k not in ("wall",)} for r in history]


def one_run(sc, executor: str, workers: int):
    sc.cfg.sim.executor = executor
    sc.cfg.sim.workers = workers
    t0 = time.perf_counter()
    summary = run_policy(sc)
    wall = time.perf_counter() - t0
    return wall, summary


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--policy", default="fedasync")
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--model", default="conv2")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--executors", nargs="+", default=["inline", "process", "ray"], choices=["inline", "process", "ray"])
    ap.add_argument("--out", type=Path, default=None,
                    help="result file (default: results/simulator.json for fedasync, simulator_<policy>.json otherwise)")
    args = ap.parse_args()
    out_path = args.out or RESULTS / ("simulator.json" if args.policy == "fedasync" else f"simulator_{args.policy}.json")

    overrides = [
        f"data.dataset={args.dataset}", f"model.name={args.model}", f"policy.name={args.policy}",
        "data.num_clients=10", "fleet.preset=paper10", "train.lr=0.1",
        f"sim.max_rounds={args.rounds}", "sim.max_time=null", "sim.eval_every_rounds=null",
        "sim.eval_every_seconds=null", "sim.checkpoint_every_rounds=null", "data.eval_samples=500",
    ]
    cfg = load_config(overrides=overrides)
    sc = build_scenario(cfg)
    torch.set_num_threads(1)  # one core per trainer, as the pool's workers use
    kinds = ["inline", *[k for k in args.executors if k != "inline"]]
    rows: dict[str, list[dict[str, float]]] = {k: [] for k in kinds}
    histories: dict[str, list] = {}
    for rep in range(args.repeats):  # interleave: the machine is shared and noisy
        for kind in kinds:
            wall, s = one_run(sc, kind, args.workers)
            rows[kind].append({"wall": wall, "train": s["train_seconds"], "overhead": wall / s["train_seconds"]})
            histories[kind] = s["history"]
            print(f"[{rep}] {kind:<8} wall {wall:7.2f}s  train {s['train_seconds']:7.2f}s  ratio {wall / s['train_seconds']:.3f}", flush=True)
    same: dict[str, bool] = {}
    first_difference: dict[str, Any] = {}
    for kind in kinds[1:]:
        a, b = comparable(histories["inline"]), comparable(histories[kind])
        same[kind] = a == b
        for x, y in zip(a, b):
            if x != y:
                first_difference[kind] = {"inline": x, kind: y}
                break
    med = {k: {m: statistics.median(r[m] for r in v) for m in ("wall", "train", "overhead")} for k, v in rows.items()}
    speedups = {k: [i["wall"] / p["wall"] for i, p in zip(rows["inline"], rows[k])] for k in kinds[1:]}
    out = {
        "benchmark": "simulator overhead and parallel executors' speed-ups",
        "command": " ".join([sys.executable.split("/")[-1], *sys.argv]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version()},
        "workload": {"dataset": args.dataset, "model": args.model, "policy": args.policy, "rounds": args.rounds,
                     "clients": 10, "fleet": "paper10", "local_steps": 5, "batch_size": 20, "workers": args.workers},
        "runs": rows,
        "median": med,
        "inline_overhead_median": med["inline"]["overhead"],
        "speedup_median": {k: statistics.median(v) for k, v in speedups.items()},
        "speedup_per_repeat": speedups,
        "histories_identical": same,
        "first_difference": first_difference,
        "goal_overhead": 1.10,
        "notes": "wall includes starting the executor (worker processes / Ray actors that load the data)",
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(out, indent=2))
    print(f"inline overhead (median wall/train): {out['inline_overhead_median']:.3f}  (goal <= 1.10)")
    for kind, value in out["speedup_median"].items():
        print(f"{kind} speed-up on {args.workers} workers (median): {value:.2f}x")
    print(f"histories identical to inline: {same}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
