"""Masked against dense local training of ``conv2`` on Fashion-MNIST batches.

One local task is what a PR-FL client runs per round: ``LocalTrainer.train`` from the global
weights, ``--steps`` SGD steps of batch 20 on a client's 600 samples. The benchmark times the
dense task and the masked task at densities 0.1, 0.5 and 0.9 (masks from the magnitude ranking
of the initial weights), in one process with a fixed number of torch threads.

Masking does not make the dense kernels cheaper, so a masked task costs the dense task plus the
mask work (building the float mask, zeroing the pruned weights, one multiply of the gradient per
step). The target is an overhead of at most ``--target`` (1.15x) over dense.

The machine may be shared and noisy, so the variants are interleaved: every round runs each
variant once, in a freshly shuffled order, from the same weights and the same batch schedule.
Reported per variant: median, p10 and p90 seconds per task (wall time around ``train`` and the
trainer's own ``compute_seconds``), the ratio of medians masked/dense, and the median of the
per-round paired ratios masked_i / dense_i, which cancels slow drift of the machine's speed. The
verdict uses the paired ratio. The exit code is 0 whether the target is met or not.

Run from the repository root::

    .venv/bin/python benchmarks/bench_masked_training.py            # 1 thread, 15 rounds
    .venv/bin/python benchmarks/bench_masked_training.py --threads 2 --repeats 30
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import gzip
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from prfl.client.trainer import LocalTrainer, TrainConfig, batch_schedule
from prfl.models import build_model, model_cost
from prfl.params import ParamLayout
from prfl.pruning.ranking import magnitude_ranking
from prfl.runtime.machine import fingerprint

MODEL = "conv2"
INPUT_SHAPE = (1, 28, 28)
NUM_CLASSES = 10
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
CONTROL = "dense(A/A)"
EVICT_BYTES = 256 * 2**20  # rewritten before each isolated op: larger than any last-level cache
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "masked_training.json"


# --------------------------------------------------------------------------- data


def _read_idx_gz(path: Path, header_bytes: int) -> np.ndarray:
    """Payload of a gzipped IDX file of unsigned bytes (big-endian header of ``header_bytes``)."""
    with gzip.open(path, "rb") as fh:
        raw = fh.read()
    return np.frombuffer(raw, dtype=np.uint8, offset=header_bytes)


def load_train_split() -> tuple[np.ndarray, np.ndarray, str]:
    """Fashion-MNIST training images (n, 1, 28, 28) float32 in [0, 1] and int64 labels.

    Uses ``prfl.data.load_dataset`` when the package provides it, else parses the two training
    IDX files directly (16-byte image header, 8-byte label header).
    """
    try:
        from prfl.data import load_dataset  # type: ignore[attr-defined]

        ds = load_dataset("fashion-mnist")
        return (
            np.ascontiguousarray(ds.x_train, dtype=np.float32),
            np.asarray(ds.y_train, dtype=np.int64),
            "prfl.data.load_dataset('fashion-mnist')",
        )
    except Exception as exc:  # noqa: BLE001 - any failure falls back to the raw files
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
    images_path = FASHION_DIR / "train-images-idx3-ubyte.gz"
    labels_path = FASHION_DIR / "train-labels-idx1-ubyte.gz"
    with gzip.open(images_path, "rb") as fh:
        header = fh.read(16)
    magic, n, rows, cols = (int.from_bytes(header[i : i + 4], "big") for i in range(0, 16, 4))
    if magic != 2051 or (rows, cols) != INPUT_SHAPE[1:]:
        raise SystemExit(f"{images_path}: unexpected IDX header (magic {magic}, {rows}x{cols})")
    images = _read_idx_gz(images_path, 16)
    labels = _read_idx_gz(labels_path, 8)
    if images.size != n * rows * cols or labels.size != n:
        raise SystemExit(f"{FASHION_DIR}: IDX payload sizes do not match the header ({n} samples)")
    x = (images.astype(np.float32) / 255.0).reshape(n, *INPUT_SHAPE)
    return x, labels.astype(np.int64), f"IDX files in {FASHION_DIR} parsed with numpy ({reason})"


# --------------------------------------------------------------------------- statistics


def summarize(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    return {
        "median": float(np.median(a)),
        "p10": float(np.percentile(a, 10)),
        "p90": float(np.percentile(a, 90)),
        "min": float(a.min()),
        "mean": float(a.mean()),
        "n": int(a.size),
    }


def time_op(fn: Callable[[], Any], repeats: int, before: Callable[[], Any] | None = None) -> float:
    """Median seconds of ``fn`` over ``repeats`` calls (after one untimed call).

    ``before`` runs untimed ahead of every call (used to evict the caches).
    """
    fn()
    times = []
    for _ in range(repeats):
        if before is not None:
            before()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def machine_info(threads: int) -> dict[str, Any]:
    cpu_model = fingerprint()["cpu_model"]
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    return {
        "torch_version": torch.__version__,
        "numpy_version": np.__version__,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        "cpu_affinity_count": affinity,
        "torch_num_threads": torch.get_num_threads(),
        "torch_num_interop_threads": torch.get_num_interop_threads(),
        "threads_requested": threads,
    }


# --------------------------------------------------------------------------- benchmark


def variant_name(density: float | None) -> str:
    return "dense" if density is None else f"masked@{density:g}"


def overhead_breakdown(
    layout: ParamLayout, masks: dict[float, torch.Tensor], steps: int, repeats: int
) -> dict[str, Any]:
    """Median seconds of each piece of mask work a masked task adds over a dense one.

    The pieces, over the prunable prefix of the flat vectors: converting the bool mask to 0/1
    floats (paid per task unless the trainer reuses a cached conversion), zeroing the pruned
    weights once per task (``w.mul_``) and masking the gradient once per step (``g.mul_``).
    Before every timed call a scratch buffer larger than the last-level cache is rewritten,
    since in a real task the forward and backward passes evict the flat vectors between mask
    operations; warm-cache timings understate the cost.
    """
    n = layout.num_prunable
    w = torch.randn(layout.total)[:n]
    g = torch.randn(layout.total)[:n]
    scratch = torch.empty(EVICT_BYTES // 4)
    flush = lambda: scratch.fill_(1.0)  # noqa: E731
    out: dict[str, Any] = {"flat_weights": layout.total, "prunable_weights": layout.num_prunable}
    per_density = {}
    for density, mask in masks.items():
        fmask = mask.to(torch.float32)
        build = time_op(lambda m=mask: m.to(torch.float32), repeats, flush)
        w_mul = time_op(lambda f=fmask: w.mul_(f), repeats, flush)
        g_mul = time_op(lambda f=fmask: g.mul_(f), repeats, flush)
        per_density[f"{density:g}"] = {
            "build_float_mask_s": build,
            "w_mul_s": w_mul,
            "g_mul_per_step_s": g_mul,
            "per_task_total_s": build + w_mul + steps * g_mul,
            "per_task_without_build_s": w_mul + steps * g_mul,
        }
    out["per_density"] = per_density
    return out


def _script_path() -> str:
    """This script's path relative to the repository (result files name no machine paths)."""
    script = Path(__file__).resolve()
    root = script.parent.parent
    return str(script.relative_to(root)) if script.is_relative_to(root) else script.name


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    loadavg_start = list(os.getloadavg())
    densities = [float(d) for d in args.densities.split(",")]
    x, y, data_source = load_train_split()

    torch.manual_seed(args.seed)
    model = build_model(MODEL, INPUT_SHAPE, NUM_CLASSES)
    layout = ParamLayout(model)
    cfg = TrainConfig(lr=args.lr, batch_size=args.batch_size, local_steps=args.steps)
    cost = model_cost(model, INPUT_SHAPE)
    trainer = LocalTrainer(model, layout, x, y, cfg)
    w0 = trainer.w.clone()  # the initial global weights every task starts from
    ranking = magnitude_ranking(w0[: layout.num_prunable], layout.layer_bounds())
    masks = {d: ranking.mask(d) for d in densities}

    rng = np.random.default_rng(args.seed)
    client = np.sort(rng.choice(len(y), size=args.client_size, replace=False))
    variants: list[float | None] = [None, *densities]
    names = [variant_name(v) for v in variants]
    if args.control:  # a second, identical dense variant: its paired ratio is the noise floor
        variants.append(None)
        names.append(CONTROL)

    def task(density: float | None, seed: int) -> tuple[float, float, float]:
        mask = None if density is None else masks[density]
        t0 = time.perf_counter()
        out = trainer.train(w0, client, seed=seed, mask=mask)
        wall = time.perf_counter() - t0
        return wall, out.compute_seconds, out.mean_loss

    # Warm-up: every variant, so allocator, kernels and caches are in their steady state.
    for i in range(args.warmup):
        for v in variants:
            task(v, seed=10_000 + i)

    sequence: list[str] = []  # variants in the order they ran, timed rounds only
    wall: dict[str, list[float]] = {n: [] for n in names}
    compute: dict[str, list[float]] = {n: [] for n in names}
    losses: dict[str, list[float]] = {n: [] for n in names}
    order_rng = np.random.default_rng(args.seed + 1)
    gc_was_enabled = gc.isenabled()
    for r in range(args.repeats):
        gc.collect()
        gc.disable()  # no collector pauses inside a timed task
        try:
            for k in order_rng.permutation(len(variants)):
                # Same seed for every variant in a round: identical batch schedule.
                w_s, c_s, loss = task(variants[k], seed=r)
                sequence.append(names[k])
                wall[names[k]].append(w_s)
                compute[names[k]].append(c_s)
                losses[names[k]].append(loss)
        finally:
            if gc_was_enabled:
                gc.enable()

    results: dict[str, Any] = {}
    for n in names:
        results[n] = {"wall_s": summarize(wall[n]), "compute_s": summarize(compute[n]),
                      "mean_loss_first_round": losses[n][0]}
    ratios: dict[str, Any] = {}
    for d in densities:
        n = variant_name(d)
        entry: dict[str, Any] = {}
        for metric, data in (("wall", wall), ("compute", compute)):
            paired = np.asarray(data[n]) / np.asarray(data["dense"])
            entry[metric] = {
                "ratio_of_medians": float(np.median(data[n]) / np.median(data["dense"])),
                "paired_ratio_median": float(np.median(paired)),
                "paired_ratio_p10": float(np.percentile(paired, 10)),
                "paired_ratio_p90": float(np.percentile(paired, 90)),
            }
        entry["pass"] = entry["wall"]["paired_ratio_median"] <= args.target
        ratios[f"{d:g}"] = entry
    control = None
    if args.control:
        paired = np.asarray(wall[CONTROL]) / np.asarray(wall["dense"])
        control = {
            "ratio_of_medians": float(np.median(wall[CONTROL]) / np.median(wall["dense"])),
            "paired_ratio_median": float(np.median(paired)),
            "paired_ratio_p10": float(np.percentile(paired, 10)),
            "paired_ratio_p90": float(np.percentile(paired, 90)),
        }

    breakdown = None
    if args.breakdown:
        breakdown = overhead_breakdown(layout, masks, args.steps, repeats=args.breakdown_repeats)
    if breakdown is not None:
        dense_median = results["dense"]["wall_s"]["median"]
        for b in breakdown["per_density"].values():
            b["predicted_ratio"] = (dense_median + b["per_task_total_s"]) / dense_median
            b["predicted_ratio_without_build"] = (dense_median + b["per_task_without_build_s"]) / dense_median

    # How often a masked task got the same mask object as the previous masked task: only then
    # can a trainer that caches the last float mask skip the conversion.
    masked_seq = [n for n in sequence if n.startswith("masked@")]
    reuse = {
        "masked_tasks": len(masked_seq),
        "same_mask_as_previous_masked_task": sum(a == b for a, b in zip(masked_seq, masked_seq[1:], strict=False)),
    }
    info = machine_info(args.threads)
    info["loadavg_start"] = loadavg_start
    info["loadavg_end"] = list(os.getloadavg())
    worst = max(ratios.values(), key=lambda e: e["wall"]["paired_ratio_median"])
    return {
        "benchmark": "masked_training",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["python", _script_path(), *sys.argv[1:]]),
        "machine": info,
        "setup": {
            "model": MODEL,
            "input_shape": list(INPUT_SHAPE),
            "num_classes": NUM_CLASSES,
            "flat_params": layout.total,
            "prunable_params": layout.num_prunable,
            "train_step_gflops_dense": cost.train_step_flops(cfg.batch_size) / 1e9,
            "train_config": {"lr": cfg.lr, "batch_size": cfg.batch_size, "local_steps": cfg.local_steps},
            "steps_per_task": len(batch_schedule(args.client_size, cfg, 0)),
            "client_size": args.client_size,
            "densities": densities,
            "mask_source": "magnitude_ranking of the initial weights (floor 0.05)",
            "data_source": data_source,
            "warmup_rounds": args.warmup,
            "repeats": args.repeats,
            "order": "interleaved; variant order shuffled every round; same batch seed within a round",
            "seed": args.seed,
        },
        "variants": results,
        "ratios_vs_dense": ratios,
        "control_dense_vs_dense": control,
        "overhead_breakdown": breakdown,
        "mask_reuse": reuse,
        "target": args.target,
        "verdict_metric": "median of per-round paired wall-time ratios masked/dense, worst density",
        "worst_paired_ratio": worst["wall"]["paired_ratio_median"],
        "verdict": "PASS" if all(e["pass"] for e in ratios.values()) else "MISS",
        "raw": {"wall_s": wall, "compute_s": compute},
    }


def print_report(report: dict[str, Any]) -> None:
    s, m = report["setup"], report["machine"]
    print(
        f"masked vs dense local training: {s['model']} on Fashion-MNIST, {s['steps_per_task']} steps x batch "
        f"{s['train_config']['batch_size']}, client {s['client_size']} samples, {s['repeats']} interleaved rounds"
    )
    print(
        f"torch {m['torch_version']}, {m['torch_num_threads']} thread(s), {m['cpu_count']} CPUs, "
        f"load {m['loadavg_start'][0]:.2f} -> {m['loadavg_end'][0]:.2f}"
    )
    print()
    header = (
        f"{'variant':<12} {'median ms':>10} {'p10 ms':>8} {'p90 ms':>8} {'compute ms':>11} "
        f"{'ratio':>7} {'paired':>7}  verdict"
    )
    print(header)
    print("-" * len(header))
    for name, r in report["variants"].items():
        w, c = r["wall_s"], r["compute_s"]
        if name == "dense":
            tail = f"{'1.000':>7} {'1.000':>7}"
        elif name == CONTROL:
            e = report["control_dense_vs_dense"]
            tail = f"{e['ratio_of_medians']:>7.3f} {e['paired_ratio_median']:>7.3f}  (noise floor)"
        else:
            e = report["ratios_vs_dense"][name.split("@", 1)[1]]
            tail = (
                f"{e['wall']['ratio_of_medians']:>7.3f} {e['wall']['paired_ratio_median']:>7.3f}  "
                + ("PASS" if e["pass"] else "MISS")
            )
        print(
            f"{name:<12} {w['median'] * 1e3:>10.1f} {w['p10'] * 1e3:>8.1f} {w['p90'] * 1e3:>8.1f} "
            f"{c['median'] * 1e3:>11.1f} {tail}"
        )
    b = report["overhead_breakdown"]
    if b:
        print()
        print(f"mask work per task (isolated ops, cold cache, median; {b['prunable_weights']} prunable weights):")
        print(
            f"{'density':<8} {'to float ms':>11} {'w.mul_ ms':>10} {'g.mul_/step ms':>15} {'total ms':>9} "
            f"{'predicted':>10} {'cached':>7}"
        )
        for d, e in b["per_density"].items():
            print(
                f"{d:<8} {e['build_float_mask_s'] * 1e3:>11.2f} {e['w_mul_s'] * 1e3:>10.2f} "
                f"{e['g_mul_per_step_s'] * 1e3:>15.2f} {e['per_task_total_s'] * 1e3:>9.2f} "
                f"{e['predicted_ratio']:>10.3f} {e['predicted_ratio_without_build']:>7.3f}"
            )
        print("(predicted = dense median + this work; cached = the same without the float conversion)")
    u = report["mask_reuse"]
    print(
        f"masked tasks given the same mask object as the previous masked task: "
        f"{u['same_mask_as_previous_masked_task']} of {u['masked_tasks']}"
    )
    print()
    print(
        f"{report['verdict']}: worst paired masked/dense ratio {report['worst_paired_ratio']:.3f} "
        f"(target <= {report['target']:.2f})"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    p.add_argument("--steps", type=int, default=5, help="local SGD steps per task (default 5)")
    p.add_argument("--repeats", type=int, default=15, help="interleaved timed rounds (default 15)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds of every variant first (default 2)")
    p.add_argument("--densities", default="0.1,0.5,0.9", help="comma-separated mask densities")
    p.add_argument("--client-size", type=int, default=600, help="samples on the client (default 600)")
    p.add_argument("--batch-size", type=int, default=20)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--target", type=float, default=1.15, help="max masked/dense ratio (default 1.15)")
    p.add_argument("--control", action="store_true",
                   help="add a second dense variant (A/A) whose ratio to dense shows the noise floor")
    p.add_argument("--no-breakdown", dest="breakdown", action="store_false",
                   help="skip timing the isolated mask operations")
    p.add_argument("--breakdown-repeats", type=int, default=20)
    p.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help=f"JSON file (default {DEFAULT_OUTPUT})")
    args = p.parse_args(argv)
    if args.threads < 1 or args.steps < 1 or args.repeats < 1 or args.warmup < 0:
        p.error("--threads, --steps and --repeats must be >= 1, --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = run(args)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print_report(report)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
