"""Paper-style experiment: Fashion-MNIST, conv2, the paper10 fleet, 10 clients, IID and
Dirichlet(1.0); PR-FL against FedAsync, FedFix, FedBuff, HeteroFL and FedAvg.

Every method gets the same virtual-time budget. Each run writes its directory under
``--out/<scenario>/<method>/seed<k>/`` and is skipped when its ``summary.json`` exists, so an
interrupted sweep resumes. At the end (and with ``--table-only``) the script writes
``results.csv`` (one row per run) and ``table.md`` (virtual seconds to each target accuracy,
speed-up against FedAsync, local rounds per client).

Usage:
  .venv/bin/python benchmarks/paper_fmnist.py --seeds 0 --max-time 3000 --targets 0.75 0.8
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import time
from pathlib import Path
from typing import Any

import yaml

from prfl.config import PolicyConfig, load_config
from prfl.run import build_scenario, run_policy

SCENARIOS: dict[str, list[str]] = {
    "iid": ["data.partition=iid"],
    "dirichlet": ["data.partition=dirichlet", "data.partition_options={alpha: 1.0}"],
}
METHODS: dict[str, str] = {
    "prfl": "{name: prfl, options: {}}",
    "fedasync": "{name: fedasync, options: {alpha: 0.6, staleness: poly}}",
    "fedbuff": "{name: fedbuff, options: {k: 5}}",
    "fedfix": "{name: fedfix, options: {dt: 20.0}}",
    "heterofl": "{name: heterofl, options: {mode: width}}",
    "fedavg": "{name: fedavg, options: {}}",
}
# PR-FL with one part switched off, to find what each part buys (run with --methods ...)
ABLATIONS: dict[str, str] = {
    "prfl-norecovery": "{name: prfl, options: {recovery: false}}",
    "prfl-nobuffer": "{name: prfl, options: {buffer: false}}",
    "prfl-nomaskfedavg": "{name: prfl, options: {mask_fedavg: false}}",
    "prfl-noresidual": "{name: prfl, options: {residual_split: false}}",
    "prfl-sync": "{name: prfl, options: {synchronous: true}}",
    "prfl-observedtime": "{name: prfl, options: {time_basis: observed}}",
    "prfl-dense": "{name: prfl, options: {min_density: 1.0}}",
    # the squared gradients' upload: once per client per ranking interval, in bfloat16; or none
    # (rank by magnitude)
    "prfl-lean": "{name: prfl, options: {importance_requests: interval, importance_dtype: bfloat16}}",
    "prfl-magnitude": "{name: prfl, options: {importance: false}}",
}
ALL_METHODS = {**METHODS, **ABLATIONS}
BASE = [
    "name=paper-fmnist",
    "data.dataset=fashion-mnist",
    "data.num_clients=10",
    "data.eval_samples=2000",
    "model.name=conv2",
    "train.lr=0.1",
    "train.batch_size=20",
    "train.local_steps=5",
    "fleet.preset=paper10",
    "sim.executor=process",
    "sim.workers=2",
    "sim.max_rounds=null",
    "sim.eval_every_rounds=null",
    "sim.eval_every_seconds=60",
    "sim.checkpoint_every_rounds=500",
]


def run_dir(out: Path, scenario: str, method: str, seed: int) -> Path:
    return out / scenario / method / f"seed{seed}"


def time_to(history: list[dict[str, Any]], target: float) -> float | None:
    for r in history:
        if r.get("event") == "eval" and r.get("accuracy") is not None and r["accuracy"] >= target:
            return float(r["time"])
    return None


def load_history(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def collect(out: Path, targets: list[float]) -> list[dict[str, Any]]:
    rows = []
    for summary_path in sorted(out.glob("*/*/seed*/summary.json")):
        d = summary_path.parent
        s = json.loads(summary_path.read_text())
        hist = load_history(d / "history.jsonl")
        lr = s["local_rounds"]
        row = {
            "scenario": d.parent.parent.name,
            "method": d.parent.name,
            "seed": int(d.name[4:]),
            "final_accuracy": s["final_accuracy"],
            "best_accuracy": s["best_accuracy"],
            "virtual_seconds": s["virtual_seconds"],
            "server_rounds": s["server_rounds"],
            "local_rounds": " ".join(str(x) for x in lr),
            "local_rounds_min": min(lr),
            "local_rounds_max": max(lr),
            "server_egress_mb": s["server_egress_bytes"] / 1e6,
            "wall_seconds": s["wall_seconds"],
        }
        for t in targets:
            row[f"time_to_{t:g}"] = time_to(hist, t)
        rows.append(row)
    return rows


def fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f}"


def table(rows: list[dict[str, Any]], targets: list[float]) -> str:
    lines = []
    for scenario in sorted({r["scenario"] for r in rows}):
        sub = [r for r in rows if r["scenario"] == scenario]
        lines.append(f"### {scenario}\n")
        head = ["method", "seeds"] + [f"time to {t:g} (s)" for t in targets] + ["final acc", "local rounds min-max", "egress (GB)"]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        ref = {}
        for t in targets:
            vals = [r[f"time_to_{t:g}"] for r in sub if r["method"] == "fedasync" and r[f"time_to_{t:g}"] is not None]
            ref[t] = statistics.mean(vals) if vals else None
        for method in ALL_METHODS:
            rs = [r for r in sub if r["method"] == method]
            if not rs:
                continue
            cells = [method, str(len(rs))]
            for t in targets:
                vals = [r[f"time_to_{t:g}"] for r in rs]
                if any(v is None for v in vals):
                    cells.append(f"not reached ({sum(v is None for v in vals)}/{len(vals)})")
                    continue
                m = statistics.mean(vals)
                sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
                speed = f" ({ref[t] / m:.2f}x)" if ref[t] else ""
                cells.append(f"{m:.0f} ± {sd:.0f}{speed}" if len(vals) > 1 else f"{m:.0f}{speed}")
            cells.append(f"{statistics.mean(r['final_accuracy'] for r in rs):.3f}")
            cells.append(f"{min(r['local_rounds_min'] for r in rs)}-{max(r['local_rounds_max'] for r in rs)}")
            cells.append(f"{statistics.mean(r['server_egress_mb'] for r in rs) / 1e3:.1f}")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description="paper-style Fashion-MNIST comparison")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "paper_fmnist")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--scenarios", nargs="+", default=list(SCENARIOS))
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(ALL_METHODS))
    ap.add_argument("--max-time", type=float, default=3000.0)
    ap.add_argument("--targets", type=float, nargs="+", default=[0.75, 0.8])
    ap.add_argument("--set", dest="extra", action="append", default=[], help="extra config override")
    ap.add_argument("--table-only", action="store_true")
    args = ap.parse_args()

    if not args.table_only:
        for seed in args.seeds:
            for scenario in args.scenarios:
                overrides = BASE + SCENARIOS[scenario] + [f"seed={seed}", f"sim.max_time={args.max_time}",
                                                          f"sim.targets={args.targets}"] + args.extra
                sc = None
                for method in args.methods:
                    d = run_dir(args.out, scenario, method, seed)
                    if (d / "summary.json").exists():
                        print(f"skip {d} (done)", flush=True)
                        continue
                    if sc is None:
                        sc = build_scenario(load_config(overrides=overrides))
                    t0 = time.perf_counter()
                    s = run_policy(sc, PolicyConfig.model_validate(yaml.safe_load(ALL_METHODS[method])), d)
                    print(f"{scenario} {method} seed{seed}: final {s['final_accuracy']:.3f} "
                          f"rounds {s['server_rounds']} wall {time.perf_counter() - t0:.0f}s", flush=True)
    rows = collect(args.out, args.targets)
    args.out.mkdir(parents=True, exist_ok=True)
    if rows:
        with open(args.out / "results.csv", "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        md = table(rows, args.targets)
        (args.out / "table.md").write_text(md)
        print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
