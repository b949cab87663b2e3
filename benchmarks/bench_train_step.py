"""Ways to run one local training task of ``conv2`` on Fashion-MNIST, and one evaluation.

A task is what a FedAvg client runs per round in ``bench_flower_sim.py``: ``LocalTrainer.train``
from the global weights, 5 SGD steps of batch 20 (lr 0.1) on a client's 6,000 samples, one
torch thread. The variants (all in this process, every round runs each variant once in a
freshly shuffled order, so a shared machine's drift hits them alike):

- ``flat-gradient``: the backward pass accumulates into one flat gradient vector, zeroed before
  every step (the trainer's earlier step, and still its importance step).
- ``per-parameter``: autograd hands each parameter's gradient over; the SGD update runs per
  parameter on views of the flat weight vector (the trainer's step).
- ``per-parameter, given output``: the same, training into a vector allocated once instead of
  a fresh one per task (what the process pool's output slots do).
- ``channels-last``: ``per-parameter`` with every convolution's output in channels-last layout
  (oneDNN's preferred layout; the input has one channel, so the first convolution's input is
  unaffected).
- ``compiled``: ``per-parameter`` with the forward pass through ``torch.compile``, where a C++
  compiler is present (else skipped, with the reason). Its first task includes compiling.
- ``two threads``: ``per-parameter`` with two torch threads instead of one.

Reported per variant: the median wall and CPU (thread) seconds per task, the medians of the
per-round paired ratios against ``per-parameter``, and whether its weights equal
``per-parameter``'s bit for bit (else the largest difference). Evaluation: 2,000 test samples
under ``torch.no_grad`` (the simulator's evaluator) and under ``torch.inference_mode``, at
several batch sizes.

The process pool's cost per task (``--pool-rounds`` > 0): two pools of ``--workers`` workers,
one with shared output slots and the caller's data set mapped, one without either (results as
pickled tensors, each worker loading the data set). Their tasks train one step of batch 1, so
what is left is the pool's own work: moving the start weights in and the result out. Each round
submits 10 tasks of a new model version to each pool in shuffled order; reported are the
medians per task of wall time, of CPU seconds in the workers and the caller together, and the
time from creating a pool to its workers being ready.

Usage (from the repository root):
  .venv/bin/python benchmarks/bench_train_step.py [--repeats 21] [--no-compile]
Writes benchmarks/results/train_step.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from prfl.allocator import tune_allocator
from prfl.client.trainer import LocalTrainer, TrainConfig, cxx_compiler, evaluate
from prfl.config import load_config
from prfl.data import load_dataset
from prfl.models import build_model
from prfl.params import ParamLayout
from prfl.run import build_scenario
from prfl.sim.executors import ProcessPoolExecutorAdapter, TrainJob

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
REFERENCE = "per-parameter"


class FlatGradientTrainer(LocalTrainer):
    """The earlier step: every backward pass accumulates into the zeroed flat gradient."""

    def _reset_grads(self, flat: bool) -> None:
        super()._reset_grads(True)


def channels_last_outputs(model: nn.Module) -> nn.Module:
    """Make every convolution of ``model`` return its output in channels-last layout."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            m.register_forward_hook(lambda _m, _i, out: out.contiguous(memory_format=torch.channels_last))
    return model


def build_variants(args: argparse.Namespace, ds: Any, w0: torch.Tensor) -> tuple[dict[str, Callable[[], torch.Tensor]], dict[str, Any]]:
    cfg = TrainConfig(lr=0.1, local_steps=5, batch_size=20)
    idx = np.arange(args.client_samples)
    notes: dict[str, Any] = {}

    def model() -> nn.Module:
        torch.manual_seed(0)
        return build_model("conv2", ds.input_shape, ds.num_classes)

    def trainer(cls: type[LocalTrainer] = LocalTrainer, m: nn.Module | None = None, **kw: Any) -> LocalTrainer:
        m = m if m is not None else model()
        return cls(m, ParamLayout(m), ds.x_train, ds.y_train, cfg, **kw)

    def task(t: LocalTrainer, out: torch.Tensor | None = None, threads: int = 1) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            torch.set_num_threads(threads)
            try:
                return t.train(w0, idx, seed=1, out=out).weights
            finally:
                torch.set_num_threads(1)
        return run

    variants: dict[str, Callable[[], torch.Tensor]] = {
        "flat-gradient": task(trainer(FlatGradientTrainer)),
        REFERENCE: task(trainer()),
        "per-parameter, given output": task(trainer(), out=torch.empty_like(w0)),
        "channels-last": task(trainer(m=channels_last_outputs(model()))),
        "two threads": task(trainer(), threads=2),
    }
    compiler = cxx_compiler()
    if args.no_compile:
        notes["compiled"] = "skipped: --no-compile"
    elif compiler is None:
        notes["compiled"] = "skipped: no C++ compiler on the PATH (torch.compile's CPU backend needs one)"
    else:
        t = trainer(compile=True)
        t0 = time.perf_counter()
        variants["compiled"] = task(t)
        variants["compiled"]()  # the first task compiles
        notes["compiled"] = {"compiler": compiler, "first_task_seconds": time.perf_counter() - t0,
                             "is_compiled": t.forward.is_compiled}  # type: ignore[attr-defined]
    return variants, notes


def time_tasks(variants: dict[str, Callable[[], torch.Tensor]], repeats: int) -> dict[str, Any]:
    ref = variants[REFERENCE]()
    rows: dict[str, Any] = {}
    for name, fn in variants.items():
        out = fn()  # warm-up, and the float check
        rows[name] = {"bit_identical_to_" + REFERENCE.replace("-", "_"): bool(torch.equal(out, ref)),
                      "max_abs_diff": float((out - ref).abs().max()), "wall": [], "cpu": []}
    for _ in range(repeats):
        order = list(variants)
        random.shuffle(order)
        for name in order:
            w0, c0 = time.perf_counter(), time.thread_time()
            variants[name]()
            rows[name]["cpu"].append(time.thread_time() - c0)
            rows[name]["wall"].append(time.perf_counter() - w0)
    base_w = np.asarray(rows[REFERENCE]["wall"])
    base_c = np.asarray(rows[REFERENCE]["cpu"])
    for name, r in rows.items():
        w, c = np.asarray(r.pop("wall")), np.asarray(r.pop("cpu"))
        r.update(median_wall_s=float(np.median(w)), median_cpu_s=float(np.median(c)),
                 p10_wall_s=float(np.percentile(w, 10)), p90_wall_s=float(np.percentile(w, 90)),
                 paired_wall_ratio=float(np.median(w / base_w)), paired_cpu_ratio=float(np.median(c / base_c)))
    return rows


def time_evaluation(ds: Any, w0: torch.Tensor, repeats: int, n: int = 2000) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    model = build_model("conv2", ds.input_shape, ds.num_classes)
    layout = ParamLayout(model)
    bound = layout.flatten(model)
    layout.bind(model, bound)
    x, y = torch.as_tensor(ds.x_test[:n]), torch.as_tensor(ds.y_test[:n], dtype=torch.int64)
    cases = [(mode, bs) for mode in ("no_grad", "inference_mode") for bs in (250, 1000, 2000)]
    times: dict[tuple[str, int], list[float]] = {c: [] for c in cases}
    results: dict[tuple[str, int], tuple[float, float]] = {}

    def run(mode: str, bs: int) -> tuple[float, float]:
        if mode == "inference_mode":
            with torch.inference_mode():
                return evaluate.__wrapped__(model, layout, bound, w0, x, y, "ce", bs)  # type: ignore[attr-defined]
        return evaluate(model, layout, bound, w0, x, y, "ce", bs)

    for _ in range(repeats):
        order = list(cases)
        random.shuffle(order)
        for c in order:
            t0 = time.thread_time()
            results[c] = run(*c)
            times[c].append(time.thread_time() - t0)
    ref = results[("no_grad", 1000)]
    return [{"mode": m, "batch_size": bs, "median_cpu_s": float(np.median(times[(m, bs)])),
             "accuracy": results[(m, bs)][1], "loss_equal_to_no_grad_1000": results[(m, bs)][0] == ref[0]}
            for m, bs in cases]


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def time_pool(workers: int, rounds: int) -> dict[str, Any]:
    """Per-task cost of the process pool with and without output slots and shared data."""
    sc = build_scenario(load_config(overrides=[
        "data.dataset=fashion-mnist", "data.num_clients=10", "model.name=conv2", "train.lr=0.1",
        "train.local_steps=1", "train.batch_size=1"]))
    kinds = {"slots + shared data": {"dataset": sc.dataset, "slots": True},
             "pickled results, own data": {"dataset": None, "slots": False}}
    pools: dict[str, ProcessPoolExecutorAdapter] = {}
    startup: dict[str, float] = {}
    for name, kw in kinds.items():
        t0 = time.perf_counter()
        pools[name] = ProcessPoolExecutorAdapter(sc.worker_spec, workers, **kw)
        for f in pools[name]._started:
            f.result()
        startup[name] = time.perf_counter() - t0
    pids = {name: [p.pid for p in pool.pool._processes.values()] for name, pool in pools.items()}
    wall: dict[str, list[float]] = {name: [] for name in pools}
    cpu: dict[str, list[float]] = {name: [] for name in pools}
    w = sc.initial_weights.clone()
    try:
        for r in range(rounds + 1):  # the first round warms up
            w = w.clone()  # a new model version: jobs map a new shared copy
            order = list(pools)
            random.shuffle(order)
            for name in order:
                jobs = [TrainJob(task_id=i, client=i, weights=w, indices=sc.partition.client_indices[i], seed=r * 10 + i)
                        for i in range(10)]
                c0 = sum(_cpu_seconds(q) for q in pids[name]) + time.process_time()
                t0 = time.perf_counter()
                outs = [f.result() for f in [pools[name].submit(j) for j in jobs]]
                if r > 0:
                    wall[name].append((time.perf_counter() - t0) / len(jobs))
                    cpu[name].append((sum(_cpu_seconds(q) for q in pids[name]) + time.process_time() - c0) / len(jobs))
                assert all(o.weights.numel() == w.numel() for o in outs)
    finally:
        for pool in pools.values():
            pool.close()
    return {name: {"median_wall_per_task_s": float(np.median(wall[name])), "median_cpu_per_task_s": float(np.median(cpu[name])),
                   "startup_s": startup[name]} for name in pools} | {"workers": workers, "rounds": rounds, "tasks_per_round": 10}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=21)
    ap.add_argument("--eval-repeats", type=int, default=7)
    ap.add_argument("--client-samples", type=int, default=6000)
    ap.add_argument("--no-compile", action="store_true", help="leave out the torch.compile variant")
    ap.add_argument("--pool-rounds", type=int, default=8, help="rounds of the process-pool part (0: skip it)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS / "train_step.json")
    args = ap.parse_args()
    tune_allocator()  # as in every worker
    torch.set_num_threads(1)
    ds = load_dataset("fashion-mnist")
    torch.manual_seed(0)
    m = build_model("conv2", ds.input_shape, ds.num_classes)
    w0 = ParamLayout(m).flatten(m)
    variants, notes = build_variants(args, ds, w0)
    tasks = time_tasks(variants, args.repeats)
    for name, r in tasks.items():
        print(f"{name:<28} wall {r['median_wall_s'] * 1e3:7.1f} ms  cpu {r['median_cpu_s'] * 1e3:7.1f} ms  "
              f"paired cpu ratio {r['paired_cpu_ratio']:.3f}  max |diff| {r['max_abs_diff']:.2g}", flush=True)
    evals = time_evaluation(ds, w0, args.eval_repeats)
    for e in evals:
        print(f"evaluate {e['mode']:<15} batch {e['batch_size']:>5}: cpu {e['median_cpu_s']:.3f} s", flush=True)
    pool = time_pool(args.workers, args.pool_rounds) if args.pool_rounds > 0 else None
    if pool is not None:
        for name, r in pool.items():
            if isinstance(r, dict):
                print(f"process pool, {name:<26}: per task wall {r['median_wall_per_task_s'] * 1e3:6.1f} ms, "
                      f"cpu {r['median_cpu_per_task_s'] * 1e3:6.1f} ms; workers ready after {r['startup_s']:.1f} s", flush=True)
    script = Path(__file__).resolve()
    rel = script.relative_to(ROOT) if script.is_relative_to(ROOT) else Path(script.name)
    result = {
        "benchmark": "one local training task of conv2 on Fashion-MNIST: step variants, and evaluation",
        "command": shlex.join(["python", str(rel), *sys.argv[1:]]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
                    "load_average_1min_at_start": os.getloadavg()[0]},
        "workload": {"model": "conv2", "dataset": "fashion-mnist", "client_samples": args.client_samples,
                     "local_steps": 5, "batch_size": 20, "lr": 0.1, "threads": 1, "repeats": args.repeats},
        "reference": REFERENCE,
        "tasks": tasks,
        "notes": notes,
        "evaluation": evals,
        "process_pool": pool,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":  # the process pool's spawned workers import this module
    raise SystemExit(main())
