"""The same FedAvg workload in prfl's simulator and in Flower's Simulation Engine: wall-time ratio.

Workload (every side): Fashion-MNIST, ``conv2``, ``--clients`` IID clients, ``--rounds`` rounds
of synchronous FedAvg with every client in every round, 5 local SGD steps of batch 20 at lr 0.1
(no momentum), weighted by sample counts; the global model is evaluated on the same test subset
before the first and after the last round. Every side starts from the same initial weights and
trains on the same partitions.

- ``prfl-process`` / ``prfl-inline``: ``run_policy`` with policy ``fedavg`` on the process-pool
  executor (``--workers`` processes) and inline.
- ``flower``: ``flwr.simulation.run_simulation`` with Flower's own ``FedAvg`` strategy
  (``flwr.serverapp.strategy``) and a ClientApp written as a Flower user would: load the state
  dict, ``torch.optim.SGD`` for 5 steps, return the state dict and ``num-examples``. The Ray
  backend gets ``--workers`` CPUs, one per ClientApp.
- ``plain-loop``: the floor without any framework: one process, ``--plain-threads`` torch
  threads, a Python loop over rounds and clients (load the global state, ``torch.optim.SGD``
  for 5 steps, add the weighted weights), the same two evaluations.

Each run is a fresh Python process, timed from the configuration to the final evaluation: the
data set is loaded, the workers (processes or Ray actors) are started and the model is
evaluated inside the measured time on every side. ``--repeats`` runs every side that many times
in a freshly shuffled order per repeat (the machine may be shared); reported are the medians and
the ratios of medians. On a loaded machine a wall time says how much of the CPU a side got as
much as what it needs, so every run also reports the CPU seconds of its process and all the
processes it waited for (workers), from ``getrusage``; for Flower that misses Ray's daemonised
processes (GCS, raylet, the ClientApp workers), so its figure is a lower bound and no CPU ratio
is formed with it. Usage:
  .venv/bin/python benchmarks/bench_flower_sim.py [--rounds 20] [--clients 10] [--workers 2] [--repeats 1]
Writes benchmarks/results/flower_sim.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from prfl.client.trainer import batch_schedule
from prfl.config import load_config
from prfl.run import build_scenario, run_policy

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parent.parent
SIDES = ("prfl-process", "prfl-inline", "plain-loop", "flower")


def overrides(args: argparse.Namespace, executor: str) -> list[str]:
    return [
        "name=flower-vs-prfl", "seed=0", "data.dataset=fashion-mnist", f"data.num_clients={args.clients}",
        "data.partition=iid", f"data.eval_samples={args.eval_samples}", "model.name=conv2", "train.lr=0.1",
        "train.batch_size=20", "train.local_steps=5", "train.momentum=0.0", "fleet.preset=uniform",
        "policy.name=fedavg", f"sim.max_rounds={args.rounds}", "sim.max_time=null", "sim.eval_every_rounds=null",
        "sim.eval_every_seconds=null", "sim.checkpoint_every_rounds=null", f"sim.executor={executor}",
        f"sim.workers={args.workers}",
    ]


def run_prfl(args: argparse.Namespace, executor: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    cfg = load_config(overrides=overrides(args, executor))
    sc = build_scenario(cfg)
    s = run_policy(sc)
    wall = time.perf_counter() - t0
    return {"wall": wall, "final_accuracy": s["final_accuracy"], "server_rounds": s["server_rounds"],
            "train_seconds": s["train_seconds"]}


def run_plain(args: argparse.Namespace) -> dict[str, Any]:
    """FedAvg as a bare PyTorch loop in this process: the floor a framework's overhead sits on."""
    from prfl.models import build_model

    t0 = time.perf_counter()
    torch.set_num_threads(args.plain_threads)
    sc = build_scenario(load_config(overrides=overrides(args, "inline")))
    model = build_model("conv2", sc.dataset.input_shape, sc.dataset.num_classes)
    layout = sc.layout
    x = torch.as_tensor(sc.dataset.x_train)
    y = torch.as_tensor(sc.dataset.y_train, dtype=torch.int64)
    parts = [torch.from_numpy(np.asarray(p)) for p in sc.partition.client_indices]
    total = sum(len(p) for p in parts)
    evaluate = sc.evaluator()
    w = sc.initial_weights.clone()
    initial_accuracy = evaluate(w)[1]
    model.train()
    for r in range(args.rounds):
        acc = torch.zeros_like(w, dtype=torch.float64)
        for c, idx in enumerate(parts):
            layout.load(model, w)
            opt = torch.optim.SGD(model.parameters(), lr=sc.train_cfg.lr)
            for pos in batch_schedule(len(idx), sc.train_cfg, r * 1000 + c):
                sel = idx[torch.from_numpy(pos)]
                opt.zero_grad()
                F.cross_entropy(model(x[sel]), y[sel]).backward()
                opt.step()
            acc.add_(layout.flatten(model), alpha=len(idx) / total)
        w = acc.to(torch.float32)
    final_accuracy = evaluate(w)[1]
    wall = time.perf_counter() - t0
    return {"wall": wall, "final_accuracy": final_accuracy, "initial_accuracy": initial_accuracy,
            "threads": args.plain_threads}


# ---------------------------------------------------------------------------------- Flower side
_CLIENT: dict[str, Any] = {}  # per ClientApp process: model and data, built once


def _client_state(args_json: str) -> dict[str, Any]:
    if not _CLIENT:
        from prfl.models import build_model

        args = argparse.Namespace(**json.loads(args_json))
        torch.set_num_threads(1)
        sc = build_scenario(load_config(overrides=overrides(args, "inline")))
        model = build_model("conv2", sc.dataset.input_shape, sc.dataset.num_classes)
        _CLIENT.update(
            model=model, x=torch.as_tensor(sc.dataset.x_train), y=torch.as_tensor(sc.dataset.y_train, dtype=torch.int64),
            parts=[np.asarray(p) for p in sc.partition.client_indices], train_cfg=sc.train_cfg,
        )
    return _CLIENT


def make_flower_apps(args: argparse.Namespace, out: dict[str, Any]):
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg

    args_json = json.dumps(vars(args), default=str)  # --out is a Path
    client_app = ClientApp()

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        st = _client_state(args_json)
        model = st["model"]
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        pid = int(context.node_config["partition-id"])
        idx = torch.from_numpy(st["parts"][pid])
        seed = (int(msg.content["config"]["server-round"]) - 1) * 1000 + pid  # a new batch order every round, as prfl's tasks
        opt = torch.optim.SGD(model.parameters(), lr=st["train_cfg"].lr)
        model.train()
        for pos in batch_schedule(len(idx), st["train_cfg"], seed):
            sel = idx[torch.from_numpy(pos)]
            opt.zero_grad()
            F.cross_entropy(model(st["x"][sel]), st["y"][sel]).backward()
            opt.step()
        content = RecordDict({"arrays": ArrayRecord(model.state_dict()),
                              "metrics": MetricRecord({"num-examples": len(idx)})})
        return Message(content=content, reply_to=msg)

    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        from prfl.models import build_model

        sc = build_scenario(load_config(overrides=overrides(args, "inline")))
        model = build_model("conv2", sc.dataset.input_shape, sc.dataset.num_classes)
        sc.layout.load(model, sc.initial_weights)
        evaluate = sc.evaluator()

        def central(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            if server_round not in (0, args.rounds):
                return None
            model.load_state_dict(arrays.to_torch_state_dict())
            loss, acc = evaluate(sc.layout.flatten(model))
            out["accuracy"][server_round] = acc
            return MetricRecord({"accuracy": acc, "loss": loss})

        strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=args.clients,
                          min_available_nodes=args.clients)
        strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=args.rounds,
                       train_config=ConfigRecord({"seed": 0}), evaluate_fn=central)

    return server_app, client_app


def run_flower(args: argparse.Namespace) -> dict[str, Any]:
    from flwr.simulation import run_simulation

    t0 = time.perf_counter()
    out: dict[str, Any] = {"accuracy": {}}
    server_app, client_app = make_flower_apps(args, out)
    run_simulation(server_app, client_app, num_supernodes=args.clients,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": args.workers}})
    wall = time.perf_counter() - t0
    return {"wall": wall, "final_accuracy": out["accuracy"].get(args.rounds), "initial_accuracy": out["accuracy"].get(0)}


def run_side(args: argparse.Namespace, side: str) -> dict[str, Any]:
    if side == "prfl-process":
        return run_prfl(args, "process")
    if side == "prfl-inline":
        return run_prfl(args, "inline")
    if side == "plain-loop":
        return run_plain(args)
    return run_flower(args)


def median(xs: list[float]) -> float:
    return float(np.median(np.asarray(xs, dtype=np.float64)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--plain-threads", type=int, default=2, help="torch threads of the plain loop")
    ap.add_argument("--eval-samples", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES))
    ap.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)  # one run, in this process
    ap.add_argument("--out", type=Path, default=RESULTS / "flower_sim.json")
    args = ap.parse_args()
    os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    torch.set_num_threads(1)
    if args.side is not None:
        print(json.dumps(run_side(args, args.side)))
        return 0

    forwarded = [f"--rounds={args.rounds}", f"--clients={args.clients}", f"--workers={args.workers}",
                 f"--plain-threads={args.plain_threads}", f"--eval-samples={args.eval_samples}"]
    runs: dict[str, list[dict[str, Any]]] = {side: [] for side in args.sides}
    for _ in range(args.repeats):
        order = list(args.sides)
        random.shuffle(order)
        for side in order:
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *forwarded, f"--side={side}"],
                                  capture_output=True, text=True, cwd=ROOT)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            if proc.returncode != 0:
                raise SystemExit(f"{side} failed:\n{proc.stderr[-4000:]}")
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            row["cpu_seconds"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
            row["load_average_1min_at_end"] = os.getloadavg()[0]
            runs[side].append(row)
            print(f"{side:<13} wall {row['wall']:7.1f}s  cpu {row['cpu_seconds']:7.1f}s  final accuracy {row['final_accuracy']}",
                  flush=True)
    walls = {side: median([r["wall"] for r in rows]) for side, rows in runs.items()}
    cpus = {side: median([r["cpu_seconds"] for r in rows]) for side, rows in runs.items()}
    script = Path(__file__).resolve().relative_to(ROOT) if Path(__file__).resolve().is_relative_to(ROOT) else Path(__file__).name
    result: dict[str, Any] = {
        "benchmark": "FedAvg in prfl's simulator vs Flower's Simulation Engine and a plain PyTorch loop",
        "command": " ".join(["python", str(script), *sys.argv[1:]]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version()},
        "workload": {"dataset": "fashion-mnist", "model": "conv2", "clients": args.clients, "rounds": args.rounds,
                     "local_steps": 5, "batch_size": 20, "lr": 0.1, "workers": args.workers,
                     "plain_loop_threads": args.plain_threads},
        "repeats": args.repeats,
        "median_wall": walls,
        "median_cpu_seconds": cpus,
        "runs": {side: rows[-1] | {"walls": [r["wall"] for r in rows], "wall": walls[side]} for side, rows in runs.items()},
        "goal_flower_over_prfl": 5.0,
    }
    for side in ("prfl-process", "prfl-inline", "plain-loop"):
        if "flower" in walls and side in walls:
            result[f"wall_ratio_flower_over_{side.replace('-', '_')}"] = walls["flower"] / walls[side]
    if "flower" in cpus:  # Ray's daemons are not this process's children: their CPU is not counted
        result["flower_cpu_seconds_undercounted"] = True
    if "plain-loop" in walls:
        for side in ("prfl-process", "prfl-inline"):
            if side in walls:
                result[f"wall_ratio_plain_loop_over_{side.replace('-', '_')}"] = walls["plain-loop"] / walls[side]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for key, value in result.items():
        if key.startswith(("wall_ratio_", "cpu_ratio_")):
            print(f"{key}: {value:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
