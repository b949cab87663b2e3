"""Training several clients at once with ``torch.func.vmap`` against one after the other.

The question: local training of a small model is many small steps, each paying Python and
dispatch overhead; do K clients trained together (their weights, masks and batches stacked on
a leading axis, one vmapped forward/backward per step) beat K separate ``LocalTrainer.train``
tasks? The two must compute the same thing: both start from the same weights, use each
client's own mask (a different density per client) and batch schedule, plain SGD. The
benchmark checks that the vmapped weights agree with the sequential ones (max abs difference,
float32 rounding only) before it times anything.

Timing: per model (``conv2``, 6.5 M weights, and ``mlp`` 784-200-200-10, 0.2 M weights) and per
K, every repeat runs both variants in a freshly shuffled order; reported are the medians and the
median of the paired ratios sequential_i / vmapped_i (> 1 means vmap pays). The process uses
``--threads`` torch threads (default 1: the simulator's executors run one task per core).

Usage:
  .venv/bin/python benchmarks/bench_vmap.py [--ks 2 4 8] [--repeats 7] [--threads 1]
Writes benchmarks/results/vmap.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from torch.func import functional_call, grad, vmap

from prfl.client.trainer import LocalTrainer, TrainConfig, batch_schedule, loss_fn
from prfl.data import load_dataset
from prfl.models import build_model
from prfl.params import ParamLayout
from prfl.pruning.ranking import magnitude_ranking

RESULTS = Path(__file__).parent / "results"
MODELS = {"conv2": {}, "mlp": {"hidden": (200, 200)}}


class StackedTrainer:
    """K clients of one architecture trained in lockstep: flat weights of shape (K, N)."""

    def __init__(self, model: torch.nn.Module, layout: ParamLayout, x: torch.Tensor, y: torch.Tensor,
                 cfg: TrainConfig) -> None:
        self.model, self.layout, self.x, self.y, self.cfg = model, layout, x, y, cfg

        def loss_of(params: dict[str, torch.Tensor], xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
            return loss_fn(cfg.loss, functional_call(model, params, (xb,)), yb)

        self._grads = vmap(grad(loss_of))

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        k = flat.shape[0]
        return {e.name: flat[:, e.offset : e.stop].view(k, *e.shape) for e in self.layout.entries}

    def train(self, weights: torch.Tensor, indices: list[np.ndarray], seeds: list[int],
              masks: list[torch.Tensor]) -> torch.Tensor:
        k, npr = len(indices), self.layout.num_prunable
        fmask = torch.stack([m.to(torch.float32) for m in masks])
        w = weights.expand(k, -1).clone()
        w[:, :npr].mul_(fmask)
        g = torch.empty_like(w)
        gviews = self.views(g)
        schedules = [batch_schedule(len(ix), self.cfg, s) for ix, s in zip(indices, seeds)]
        steps = len(schedules[0])
        if any(len(s) != steps for s in schedules):
            raise ValueError("lockstep training needs the same number of steps for every client")
        for step in range(steps):
            sel = torch.stack([torch.from_numpy(ix[s[step]]) for ix, s in zip(indices, schedules)])
            grads = self._grads(self.views(w), self.x[sel], self.y[sel])
            for name, gv in gviews.items():
                gv.copy_(grads[name])
            g[:, :npr].mul_(fmask)
            w.add_(g, alpha=-self.cfg.lr)
        return w


def _script_path() -> str:
    """This script's path relative to the repository (result files name no machine paths)."""
    script = Path(__file__).resolve()
    root = script.parent.parent
    return str(script.relative_to(root)) if script.is_relative_to(root) else script.name


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ks", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=20)
    ap.add_argument("--out", type=Path, default=RESULTS / "vmap.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    ds = load_dataset("fashion-mnist")
    x = torch.as_tensor(np.ascontiguousarray(ds.x_train, dtype=np.float32))
    y = torch.as_tensor(np.asarray(ds.y_train), dtype=torch.int64)
    cfg = TrainConfig(lr=0.1, batch_size=args.batch_size, local_steps=args.steps, momentum=0.0, weight_decay=0.0)
    rng = np.random.default_rng(0)
    report: dict = {
        "benchmark": "K clients trained together with torch.func.vmap vs one after the other",
        "command": " ".join(["python", _script_path(), *sys.argv[1:]]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "threads": args.threads, "torch": torch.__version__,
                    "python": platform.python_version()},
        "steps": args.steps, "batch_size": args.batch_size, "results": [],
    }
    order_rng = random.Random(0)
    for name in args.models:
        torch.manual_seed(0)
        model = build_model(name, (1, 28, 28), 10, **MODELS[name])
        layout = ParamLayout(model)
        w0 = layout.flatten(model).detach().clone()
        ranking = magnitude_ranking(w0[: layout.num_prunable], layout.layer_bounds())
        seq = LocalTrainer(model, layout, x, y, cfg)
        stacked = StackedTrainer(build_model(name, (1, 28, 28), 10, **MODELS[name]), layout, x, y, cfg)
        for k in args.ks:
            indices = [rng.choice(len(x), 600, replace=False) for _ in range(k)]
            seeds = list(range(k))
            masks = [ranking.mask(d) for d in np.linspace(0.1, 1.0, k)]

            def run_seq() -> list[torch.Tensor]:
                return [seq.train(w0, ix, s, mask=m).weights for ix, s, m in zip(indices, seeds, masks)]

            def run_vmap() -> torch.Tensor:
                return stacked.train(w0, indices, seeds, masks)

            diff = max(float((a - b).abs().max()) for a, b in zip(run_seq(), run_vmap()))
            times: dict[str, list[float]] = {"sequential": [], "vmap": []}
            for _ in range(args.repeats):
                variants = [("sequential", run_seq), ("vmap", run_vmap)]
                order_rng.shuffle(variants)
                for label, fn in variants:
                    t0 = time.perf_counter()
                    fn()
                    times[label].append(time.perf_counter() - t0)
            paired = [a / b for a, b in zip(times["sequential"], times["vmap"])]
            row = {"model": name, "weights": layout.total, "k": k, "max_abs_diff": diff,
                   "sequential_median_s": float(np.median(times["sequential"])),
                   "vmap_median_s": float(np.median(times["vmap"])),
                   "paired_speedup_median": float(np.median(paired)),
                   "paired_speedup_p10_p90": [float(np.percentile(paired, 10)), float(np.percentile(paired, 90))]}
            report["results"].append(row)
            print(f"{name:6s} K={k}: sequential {row['sequential_median_s']:.3f} s, vmap {row['vmap_median_s']:.3f} s,"
                  f" speed-up {row['paired_speedup_median']:.2f}x (max |diff| {diff:.1e})", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
