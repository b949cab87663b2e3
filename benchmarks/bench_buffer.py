"""MaskFedAvg over a buffer of 1,000 sparse conv2 models: time and resident memory per storage,
and the cost of one update with the full sum against the running sums of frozen staleness.

The buffer holds ``--clients`` slots of ``conv2``'s size (6.5 M weights, 6,495,008 prunable) at
density ``--density``, their masks prefixes of ``--rankings`` different rankings (a new ranking
every interval leaves slots of older ones in the buffer). Variants: ``prefix`` storage with the
values in RAM, and ``prefix`` with the values in a file (PR-FL's ``buffer_dir``; each slot's
pages handed back after the aggregation reads them). ``dense`` storage would need
clients x 26 MB and is only reported as that number. Per variant: seconds per ``aggregate``
(median of ``--repeats``, after one untimed call), resident memory of the process after filling
and after aggregating (anonymous and file pages, read from /proc/self/status, after handing free
heap back), and the buffer's ``nbytes``. Each variant runs in a fresh subprocess.

Per update (``--updates`` of them, median): one client's new model enters the buffer and the
server model is aggregated, with the full MaskFedAvg over the whole buffer (``memory``, ``file``)
or from the running sums of frozen staleness (``running``, ``running-file``: put subtracts the old
contribution and adds the new one, :meth:`ClientBuffer.aggregate_running` recomputes only the
positions they touched). The running variants keep 18 bytes per prunable weight of sums.

Usage:
  .venv/bin/python benchmarks/bench_buffer.py [--clients 1000] [--density 0.1] [--repeats 3] [--updates 20]
Writes benchmarks/results/buffer.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
TOTAL, PRUNABLE = 6_497_162, 6_495_008  # conv2 on 28x28 inputs


def rss() -> dict[str, int]:
    with open("/proc/self/status", encoding="ascii") as fh:
        return {ln.split(":")[0]: int(ln.split()[1]) * 1024 for ln in fh if ln.startswith(("RssAnon:", "RssFile:"))}


def child(args: argparse.Namespace) -> None:
    import numpy as np
    import torch

    from prfl.aggregation import Staleness
    from prfl.allocator import release_free_heap, tune_allocator
    from prfl.buffer import ClientBuffer
    from prfl.pruning.ranking import kept_count

    torch.set_num_threads(1)
    tune_allocator()
    gen = torch.Generator().manual_seed(0)
    orders = [torch.randperm(PRUNABLE, generator=gen) for _ in range(args.rankings)]
    count = kept_count(args.density, PRUNABLE)
    masks = []
    for order in orders:
        m = torch.zeros(PRUNABLE, dtype=torch.bool)
        m[order[:count]] = True
        masks.append(m)
    w = torch.randn(TOTAL, generator=gen)
    directory = tempfile.mkdtemp(prefix="prfl-bench-buffer-") if args.variant.endswith("file") else None
    running = args.variant.startswith("running")
    buf = ClientBuffer(args.clients, TOTAL, PRUNABLE, storage="prefix", path=directory,
                       frozen=Staleness() if running else None)
    release_free_heap(keep=0)
    before = rss()
    t0 = time.perf_counter()
    for c in range(args.clients):
        k = c % args.rankings
        wc = w.clone()
        wc[:PRUNABLE].mul_(masks[k])
        buf.put(c, wc, masks[k], 600, c % 50, order=orders[k], arrival_round=50 + c % 10)
        release_free_heap()
    fill_seconds = time.perf_counter() - t0
    release_free_heap(keep=0)
    filled = rss()
    prev = torch.randn(TOTAL, generator=gen)

    def aggregate(prev: torch.Tensor, now: int = 60) -> torch.Tensor:
        if running:
            return buf.aggregate_running(prev)
        return buf.aggregate(prev, now, accumulate_dtype=torch.float32)

    prev = aggregate(prev)
    times = []
    peak = rss()
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        aggregate(prev if not running else torch.randn(TOTAL, generator=gen))  # a new prev: every weight
        times.append(time.perf_counter() - t0)
        now = rss()
        peak = {k: max(peak[k], now[k]) for k in now}
    prev = aggregate(prev)
    updates = []
    for u in range(args.updates):  # client u's new model (a newer ranking's mask) enters, then the step
        k = (u + 1) % args.rankings
        wc = w.clone()
        wc[:PRUNABLE].mul_(masks[k])
        t0 = time.perf_counter()
        buf.put(u, wc, masks[k], 600, 60 + u, order=orders[k], arrival_round=61 + u)
        prev = aggregate(prev, 61 + u)
        updates.append(time.perf_counter() - t0)
        release_free_heap()
    release_free_heap(keep=0)
    after = rss()
    print(json.dumps({
        "variant": args.variant, "aggregate_seconds_median": float(np.median(times)), "aggregate_seconds": times,
        "update_seconds_median": float(np.median(updates)), "update_seconds": updates,
        "fill_seconds": fill_seconds, "buffer_nbytes": buf.nbytes(),
        "rss_before": before, "rss_filled": filled, "rss_after_aggregations": after,
        "rss_peak_during_aggregations": peak,
    }))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=1000)
    ap.add_argument("--density", type=float, default=0.1)
    ap.add_argument("--rankings", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--updates", type=int, default=20)
    ap.add_argument("--variants", nargs="+", default=["memory", "file", "running", "running-file"],
                    choices=["memory", "file", "running", "running-file"])
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=RESULTS / "buffer.json")
    args = ap.parse_args()
    if args.variant:
        child(args)
        return 0
    runs = []
    for variant in args.variants:
        cmd = [sys.executable, __file__, "--variant", variant, "--clients", str(args.clients), "--density",
               str(args.density), "--rankings", str(args.rankings), "--repeats", str(args.repeats),
               "--updates", str(args.updates)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        run = json.loads(out.stdout.strip().splitlines()[-1])
        runs.append(run)
        mib = 2**20
        grown = (run["rss_filled"]["RssAnon"] + run["rss_filled"]["RssFile"]
                 - run["rss_before"]["RssAnon"] - run["rss_before"]["RssFile"])
        print(f"{variant:12s}: aggregate {run['aggregate_seconds_median']:.2f} s, update {run['update_seconds_median']:.3f} s, "
              f"resident growth after filling "
              f"{grown / mib:.0f} MiB, buffer holds {run['buffer_nbytes'] / mib:.0f} MiB", flush=True)
    report = {
        "benchmark": "MaskFedAvg over a buffer of sparse conv2 models: time and resident memory",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load_average": os.getloadavg()},
        "workload": {"clients": args.clients, "total": TOTAL, "prunable": PRUNABLE, "density": args.density,
                     "rankings": args.rankings, "storage": "prefix", "updates": args.updates},
        "dense_storage_would_need_bytes": args.clients * TOTAL * 4,
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
