"""PR-FL with a large fleet: peak resident memory of the server process and where its time goes.

Workload: Fashion-MNIST, ``conv2`` (6.5 M weights), ``--clients`` clients from the ``lognormal``
fleet preset with on/off availability periods, PR-FL with the buffer in ``prefix`` storage,
densities on a grid of ``--density-step`` starting at ``--initial-density`` (a large fleet starts
sparse: a client's first model stays in the buffer until its next arrival), one server update
per arrival (window 0), run for ``--updates`` server updates. The buffer's values live in a file
(PR-FL's ``buffer_dir``; ``--buffer-in-memory`` keeps them in RAM). The default executor is inline
with its waiting jobs spilled to disk (``sim.spill_dir``): the start models of a thousand tasks
in flight are the clients' memory, not the server's. A thread samples the server process's resident
set (``VmRSS`` in /proc/self/status) every 0.2 s; ``ru_maxrss`` gives the kernel's peak.

Usage:
  .venv/bin/python benchmarks/bench_scale.py [--clients 1000] [--updates 2000] [--workers 2]
Writes benchmarks/results/scale.json (and the run directory under /tmp unless --out is given).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from prfl import allocator
from prfl.config import PolicyConfig, load_config
from prfl.run import build_scenario, run_policy

RESULTS = Path(__file__).parent / "results"


def rss_bytes() -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class RssSampler(threading.Thread):
    def __init__(self, every: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.every = every
        self.peak = 0
        self.samples: list[tuple[float, int]] = []
        self._halt = threading.Event()
        self.t0 = time.perf_counter()

    def run(self) -> None:
        while not self._halt.is_set():
            r = rss_bytes()
            self.peak = max(self.peak, r)
            self.samples.append((time.perf_counter() - self.t0, r))
            self._halt.wait(self.every)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=1000)
    ap.add_argument("--updates", type=int, default=2000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--executor", default="inline", choices=["inline", "process", "ray"])
    ap.add_argument("--initial-density", type=float, default=0.1)
    ap.add_argument("--density-step", type=float, default=0.05)
    ap.add_argument("--storage", default="prefix", choices=["dense", "sparse", "prefix"])
    ap.add_argument("--out", type=Path, default=Path("/tmp/prfl-bench-scale"))
    ap.add_argument("--buffer-in-memory", action="store_true",
                    help="keep the buffer's values in RAM (default: in a file under --out, buffer_dir)")
    args = ap.parse_args()

    overrides = [
        "name=scale", "seed=0", "data.dataset=fashion-mnist", f"data.num_clients={args.clients}", "data.partition=iid",
        "data.eval_samples=1000", "model.name=conv2", "train.lr=0.1", "train.batch_size=20", "train.local_steps=5",
        "fleet.preset=lognormal", "fleet.availability={mean_on: 600, mean_off: 120, start_online_prob: 0.83}",
        f"sim.executor={args.executor}", f"sim.workers={args.workers}", f"sim.max_rounds={args.updates}",
        "sim.max_time=null", f"sim.eval_every_rounds={max(1, args.updates // 10)}", "sim.eval_every_seconds=null",
        "sim.checkpoint_every_rounds=null", f"sim.spill_dir={args.out / 'spill'}",
    ]
    options = {"buffer_storage": args.storage, "density_step": args.density_step,
               "initial_densities": args.initial_density, "window": 0.0}
    if args.storage == "prefix" and not args.buffer_in_memory:
        options["buffer_dir"] = str(args.out / "buffer")
    policy = PolicyConfig(name="prfl", options=options)
    sampler = RssSampler()
    sampler.start()
    t0 = time.perf_counter()
    sc = build_scenario(load_config(overrides=overrides))
    rss_scenario = rss_bytes()
    partial = RESULTS / "scale.partial.json"

    def progress(rec: dict) -> None:  # a cut run still leaves its figures so far
        RESULTS.mkdir(exist_ok=True)
        partial.write_text(json.dumps({
            "command": " ".join([sys.executable.split("/")[-1], *sys.argv]), "complete": False,
            "server_rounds": rec.get("round"), "virtual_seconds": rec.get("time"), "accuracy": rec.get("accuracy"),
            "wall_seconds": time.perf_counter() - t0, "peak_rss_sampled_bytes": sampler.peak,
            "peak_rss_kernel_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "heap_trims": allocator.trims,
        }, indent=2))

    summary = run_policy(sc, policy, args.out, on_progress=progress)
    partial.unlink(missing_ok=True)
    wall = time.perf_counter() - t0
    sampler.stop()
    peak_kernel = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    hist = summary.pop("history", [])
    evals = [r for r in hist if r.get("event") == "eval"]
    densities = sorted({round(d, 6) for r in hist if r.get("event") == "arrival" for d in [r["density"]]})
    failed = sum(1 for r in hist if r.get("event") == "task_failed")
    n_total = sc.initial_weights.numel()
    result = {
        "benchmark": "PR-FL with a large fleet: server peak RSS",
        "command": " ".join([sys.executable.split("/")[-1], *sys.argv]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version()},
        "workload": {"clients": args.clients, "updates": args.updates, "model": "conv2", "weights": n_total,
                     "fleet": "lognormal + availability (mean_on 600 s, mean_off 120 s)", "storage": args.storage,
                     "density_step": args.density_step, "initial_density": args.initial_density,
                     "executor": args.executor, "workers": args.workers,
                     "buffer_values": "in a file (buffer_dir)" if "buffer_dir" in options else "in memory"},
        "server_rounds": summary["server_rounds"],
        "virtual_seconds": summary["virtual_seconds"],
        "wall_seconds": wall,
        "train_seconds": summary["train_seconds"],
        "final_accuracy": summary["final_accuracy"],
        "accuracy_curve": [(r["round"], r["accuracy"]) for r in evals],
        "clients_that_arrived": sum(1 for x in summary["local_rounds"] if x > 0),
        "failed_tasks": failed,
        "distinct_densities": densities,
        "heap_trims": allocator.trims,
        "peak_rss_bytes": max(sampler.peak, peak_kernel),
        "peak_rss_sampled_bytes": sampler.peak,
        "peak_rss_kernel_bytes": peak_kernel,
        "rss_after_scenario_bytes": rss_scenario,
        "dense_buffer_would_need_bytes": args.clients * n_total * 4,
        "target_peak_rss_bytes": 4 * 2**30,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "scale.json").write_text(json.dumps(result, indent=2))
    gib = 2**30
    print(f"{args.clients} clients, {summary['server_rounds']} updates in {wall:.0f} s wall; final accuracy "
          f"{summary['final_accuracy']}; peak RSS {result['peak_rss_bytes'] / gib:.2f} GiB (target 4 GiB); "
          f"a dense buffer would hold {result['dense_buffer_would_need_bytes'] / gib:.1f} GiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
