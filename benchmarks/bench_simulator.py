"""Simulator overhead and the parallel executors' speed-ups, measured in one run.

Overhead = wall time of a simulated run / sum of the raw local-training seconds of its tasks
(measured inside the trainer), inline executor; goal <= 1.10 (FedAsync) or <= 1.20 (PR-FL, whose
server does more per update). For a pool of W workers the figure is also given per worker,
wall / (training seconds / W): 1 means the workers never waited for the server. Speed-up = wall
time inline / wall time on a process pool of ``--workers`` processes or as many Ray actors, same
run (same seed, so the same tasks and, by construction, the same history; the script checks the
histories agree).

``--profile`` adds one inline run under cProfile and splits its wall time into the server's
parts (MaskFedAvg, the buffer, ranking, importance, validation, recovery score, evaluation, the
executor's job packing) and training: where the time goes.

Usage: .venv/bin/python benchmarks/bench_simulator.py [--rounds 200] [--policy fedasync]
       [--executors inline process ray] [--option staleness_mode=reaged] [--profile]
Writes benchmarks/results/simulator.json (FedAsync) or simulator_<policy>.json, or ``--out``.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
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


# where the time of an inline run goes: (label, [(file suffix, function name), ...]); the functions
# of one label never call those of another, so their cumulative times add up
PARTS = (
    ("training (inside the trainer)", [("prfl/client/trainer.py", "train")]),
    ("MaskFedAvg (aggregation)", [("prfl/buffer/running.py", "aggregate_running"), ("prfl/buffer/aggregate.py", "aggregate")]),
    ("buffer put (store + running sums)", [("prfl/buffer/client_buffer.py", "put")]),
    ("ranking", [("prfl/pruning/ranking.py", "build_ranking")]),
    ("importance statistics", [("prfl/pruning/importance.py", "add")]),
    ("validation of updates", [("prfl/validation.py", "validate_update")]),
    ("recovery score model", [("prfl/buffer/aggregate.py", "plain_average")]),
    ("evaluation", [("prfl/client/trainer.py", "evaluate")]),
    ("executor job packing", [("prfl/sim/executors.py", "pack"), ("prfl/sim/executors.py", "unpacked_weights")]),
    ("dispatch (masks, pieces, bytes)", [("prfl/policies/prfl.py", "dispatch"), ("prfl/policies/fleet.py", "dispatch")]),
)


def profile_run(sc, workers: int) -> dict[str, Any]:
    """One inline run under cProfile: seconds and share of the wall time per part."""
    prof = cProfile.Profile()
    sc.cfg.sim.executor = "inline"
    sc.cfg.sim.workers = workers
    t0 = time.perf_counter()
    prof.enable()
    summary = run_policy(sc)
    prof.disable()
    wall = time.perf_counter() - t0
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    parts: dict[str, float] = {}
    for label, funcs in PARTS:
        parts[label] = sum(ct for (file, _, name), (_, _, _, ct, _) in stats.items()
                           if name in {f for suffix, f in funcs if file.replace("\\", "/").endswith(suffix)})
    parts["other (engine, links, history, Python)"] = wall - sum(parts.values())
    return {"wall": wall, "train": summary["train_seconds"], "seconds": parts,
            "share": {k: v / wall for k, v in parts.items()},
            "note": "cProfile adds a little overhead to every Python call; shares are of this run's wall time"}


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
    ap.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                    help="a policy option (policy.options.KEY=VALUE), e.g. staleness_mode=reaged; repeatable")
    ap.add_argument("--profile", action="store_true", help="add one inline run under cProfile: where the time goes")
    ap.add_argument("--out", type=Path, default=None,
                    help="result file (default: results/simulator.json for fedasync, simulator_<policy>.json otherwise)")
    args = ap.parse_args()
    out_path = args.out or RESULTS / ("simulator.json" if args.policy == "fedasync" else f"simulator_{args.policy}.json")

    overrides = [
        f"data.dataset={args.dataset}", f"model.name={args.model}", f"policy.name={args.policy}",
        "data.num_clients=10", "fleet.preset=paper10", "train.lr=0.1",
        f"sim.max_rounds={args.rounds}", "sim.max_time=null", "sim.eval_every_rounds=null",
        "sim.eval_every_seconds=null", "sim.checkpoint_every_rounds=null", "data.eval_samples=500",
        *[f"policy.options.{o}" for o in args.option],
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
    for kind in kinds[1:]:  # a pool trains on several workers at once: wall / (training / workers)
        for r in rows[kind]:
            r["overhead_per_worker"] = r["wall"] / (r["train"] / args.workers)
    med = {k: {m: statistics.median(r[m] for r in v) for m in v[0]} for k, v in rows.items()}
    speedups = {k: [i["wall"] / p["wall"] for i, p in zip(rows["inline"], rows[k])] for k in kinds[1:]}
    out = {
        "benchmark": "simulator overhead and parallel executors' speed-ups",
        "command": " ".join([sys.executable.split("/")[-1], *sys.argv]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
                    "load_average_at_end": [round(x, 1) for x in os.getloadavg()]},
        "workload": {"dataset": args.dataset, "model": args.model, "policy": args.policy, "rounds": args.rounds,
                     "clients": 10, "fleet": "paper10", "local_steps": 5, "batch_size": 20, "workers": args.workers,
                     "policy_options": args.option},
        "runs": rows,
        "median": med,
        "inline_overhead_median": med["inline"]["overhead"],
        "speedup_median": {k: statistics.median(v) for k, v in speedups.items()},
        "speedup_per_repeat": speedups,
        "histories_identical": same,
        "first_difference": first_difference,
        "goal_overhead": 1.20 if args.policy == "prfl" else 1.10,
        "per_worker_overhead_median": {k: med[k]["overhead_per_worker"] for k in kinds[1:]},
        "profile": profile_run(sc, args.workers) if args.profile else None,
        "notes": "wall includes starting the executor (worker processes / Ray actors that load the data)",
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(out, indent=2))
    print(f"inline overhead (median wall/train): {out['inline_overhead_median']:.3f}  (goal <= {out['goal_overhead']:.2f})")
    for kind, value in out["per_worker_overhead_median"].items():
        print(f"{kind}: wall / (train / {args.workers} workers) (median): {value:.3f}")
    if out["profile"]:
        for label, share in out["profile"]["share"].items():
            print(f"  {share:6.1%}  {label}")
    for kind, value in out["speedup_median"].items():
        print(f"{kind} speed-up on {args.workers} workers (median): {value:.2f}x")
    print(f"histories identical to inline: {same}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
