"""The same FedAvg workload in prfl's simulator and in Flower's Simulation Engine: wall-time ratio.

Workload (both sides): Fashion-MNIST, ``conv2``, ``--clients`` IID clients, ``--rounds`` rounds
of synchronous FedAvg with every client in every round, 5 local SGD steps of batch 20 at lr 0.1
(no momentum), weighted by sample counts; the global model is evaluated on the same test subset
before the first and after the last round. Both sides start from the same initial weights and
train on the same partitions.

- prfl: ``run_policy`` with policy ``fedavg`` on the process-pool executor (``--workers``
  processes) and inline.
- Flower: ``flwr.simulation.run_simulation`` with Flower's own ``FedAvg`` strategy
  (``flwr.serverapp.strategy``) and a ClientApp written as a Flower user would: load the state
  dict, ``torch.optim.SGD`` for 5 steps, return the state dict and ``num-examples``. The Ray
  backend gets ``--workers`` CPUs, one per ClientApp.

Wall times include starting workers (processes or Ray actors). Usage:
  .venv/bin/python benchmarks/bench_flower_sim.py [--rounds 10] [--clients 10] [--workers 2]
Writes benchmarks/results/flower_sim.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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
    cfg = load_config(overrides=overrides(args, executor))
    sc = build_scenario(cfg)
    t0 = time.perf_counter()
    s = run_policy(sc)
    wall = time.perf_counter() - t0
    return {"wall": wall, "final_accuracy": s["final_accuracy"], "server_rounds": s["server_rounds"],
            "train_seconds": s["train_seconds"]}


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

    args_json = json.dumps(vars(args))
    client_app = ClientApp()

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        st = _client_state(args_json)
        model = st["model"]
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        pid = int(context.node_config["partition-id"])
        idx = torch.from_numpy(st["parts"][pid])
        seed = int(msg.content["config"]["seed"]) * 1000 + pid
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

    out: dict[str, Any] = {"accuracy": {}}
    server_app, client_app = make_flower_apps(args, out)
    t0 = time.perf_counter()
    run_simulation(server_app, client_app, num_supernodes=args.clients,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": args.workers}})
    wall = time.perf_counter() - t0
    return {"wall": wall, "final_accuracy": out["accuracy"].get(args.rounds), "initial_accuracy": out["accuracy"].get(0)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--eval-samples", type=int, default=2000)
    args = ap.parse_args()
    os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    torch.set_num_threads(1)

    rows: dict[str, Any] = {}
    for name, fn in (("prfl-process", lambda: run_prfl(args, "process")), ("prfl-inline", lambda: run_prfl(args, "inline")),
                     ("flower", lambda: run_flower(args))):
        rows[name] = fn()
        print(f"{name:<13} wall {rows[name]['wall']:7.1f}s  final accuracy {rows[name]['final_accuracy']}", flush=True)
    result = {
        "benchmark": "FedAvg in prfl's simulator vs Flower's Simulation Engine",
        "command": " ".join([sys.executable.split("/")[-1], *sys.argv]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version()},
        "workload": {"dataset": "fashion-mnist", "model": "conv2", "clients": args.clients, "rounds": args.rounds,
                     "local_steps": 5, "batch_size": 20, "lr": 0.1, "workers": args.workers},
        "runs": rows,
        "wall_ratio_flower_over_prfl_process": rows["flower"]["wall"] / rows["prfl-process"]["wall"],
        "wall_ratio_flower_over_prfl_inline": rows["flower"]["wall"] / rows["prfl-inline"]["wall"],
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "flower_sim.json").write_text(json.dumps(result, indent=2))
    print(f"Flower / prfl wall time: {result['wall_ratio_flower_over_prfl_process']:.2f} (prfl process pool), "
          f"{result['wall_ratio_flower_over_prfl_inline']:.2f} (prfl inline)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
