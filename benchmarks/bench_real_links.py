"""The virtual clock against real links: a shaped Flower deployment, predicted by the simulator.

For each policy (FedAsync and PR-FL) the benchmark runs one SuperLink and N SuperNodes on this
machine with every node's download and upload, and the server's shared sending and receiving
capacity, shaped to a fleet file's speeds (``tc`` htb on the loopback interface, see
``prfl.flower.shaping``), until K server updates. Every task is split with stamps from both
sides (server: dispatch, reply; SuperNode log: transfer begun and done each way; ClientApp:
message in, training done). Then the simulator runs the same experiment (the fleet file, the
same policy and seed, ``sim.compute_time: measured`` with each task's device time taken from the
deployment, ``sim.piece_relay: false``) and the benchmark compares per task (paired by client and
the task's number on it) and the time to K updates (see ``prfl.linkcheck``).

Compute is measured, not negligible: on this 2-CPU machine, shared with other work, a node
needs tens of seconds per task to start the ClientApp process and load Python, torch and the
data before its milliseconds of training, and that device time is fed to the simulator. The
links are slow enough (10-30 kB/s per node, 400 kB models) that transfers take as long.

Needs root and ``tc`` with htb (Linux). Writes ``benchmarks/results/real_links.json`` (figures
per policy and per task), ``real_links.png`` (predicted against real per-task times, per
client) and ``real_links_fleet.yaml`` (the link speeds).

    sudo python benchmarks/bench_real_links.py                 # both policies, 5 nodes, K = 15
    python benchmarks/bench_real_links.py --policies fedasync --updates 6 --nodes 4
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from prfl.config import ExperimentConfig  # noqa: E402
from prfl import linkcheck as lc  # noqa: E402
from prfl.policies.prfl import preset_densities  # noqa: E402
from prfl.run import build_scenario  # noqa: E402
from prfl.flower.shaping import PAYLOAD_EFFICIENCY, LinkSpeeds, shaping_unavailable, terminate_on_sigterm  # noqa: E402

log = logging.getLogger("bench_real_links")

KB = 1000.0
# Five devices, fast to slow, and a server whose links are shared (its capacity is below the
# sum of the nodes' speeds, so concurrent transfers split it max-min fairly). Uploads are not
# slower: Flower 1.41's HTTP client gives up on a request 30 s after handing its body to the
# kernel, whose send buffer holds up to ~200 kB, so every concurrent upload (PR-FL pushes its
# values and its squared gradients at once) must move at 8 kB/s or more.
DOWN = (30 * KB, 25 * KB, 20 * KB, 16 * KB, 13 * KB)
UP = (40 * KB, 32 * KB, 25 * KB, 22 * KB, 20 * KB)
SERVER_UP = 60 * KB  # the server's sending side: client downloads share it
SERVER_DOWN = 100 * KB  # its receiving side: client uploads share it
POLICY_OPTIONS: dict[str, dict[str, Any]] = {
    "fedasync": {"alpha": 0.6, "staleness": "poly"},
    "prfl": {"interval": 3, "window": 0.5, "min_density": 0.2},
}
GOAL_TASK_MARE = 0.15  # median absolute relative error of per-task durations
GOAL_TIME_TO_K = 0.10  # relative error of the time to K server updates


def speeds_for(nodes: int) -> LinkSpeeds:
    if not 1 <= nodes <= len(DOWN):
        raise SystemExit(f"--nodes must be between 1 and {len(DOWN)}")
    return LinkSpeeds(DOWN[:nodes], UP[:nodes], SERVER_UP, SERVER_DOWN)


def experiment(policy: str, nodes: int, updates: int, fleet_file: Path, hidden: list[int], seed: int) -> ExperimentConfig:
    """The experiment both sides run. PR-FL's initial densities are written out: the paper's
    preset mapped onto the fleet file by nominal round time (what the simulator's PR-FL derives
    from the fleet), because the Flower ServerApp's policy does not see the fleet file (its
    devices are real) and would start every client dense."""
    data: dict[str, Any] = {
        "name": f"real-links-{policy}",
        "seed": seed,
        "data": {"dataset": "digits", "num_clients": nodes, "partition": "iid"},
        "model": {"name": "mlp", "options": {"hidden": hidden}},
        "train": {"lr": 0.25, "local_steps": 10, "batch_size": 20},
        "fleet": {"file": str(fleet_file)},
        "policy": {"name": policy, "options": dict(POLICY_OPTIONS[policy])},
        "sim": {"max_rounds": updates, "eval_every_rounds": updates},
    }
    if policy == "prfl":
        times = build_scenario(ExperimentConfig.model_validate(data)).nominal_round_times()
        floor = POLICY_OPTIONS["prfl"]["min_density"]
        data["policy"]["options"]["initial_densities"] = [max(floor, d) for d in preset_densities(list(times))]
    return ExperimentConfig.model_validate(data)


def deploy(policy: str, exp: ExperimentConfig, args: argparse.Namespace, work: Path) -> tuple[lc.Deployment, list[str]]:
    """Run the shaped deployment, again if the machine lost it (up to ``--attempts`` times)."""
    attempts: list[str] = []
    for attempt in range(1, args.attempts + 1):
        try:
            return lc.run_deployment(work / f"{policy}-{attempt}", exp, timeout=args.timeout), attempts
        except (RuntimeError, TimeoutError) as exc:  # an overloaded machine can lose a run
            log.warning("%s, attempt %d: %s", policy, attempt, exc)
            attempts.append(str(exc))
    raise RuntimeError(f"{policy}: every attempt failed: {attempts}")


def finished_deployment(policy: str, work: Path) -> lc.Deployment:
    """The last finished deployment of ``policy`` under ``work`` (``--reanalyze``)."""
    for run in sorted(work.glob(f"{policy}-*"), reverse=True):
        dep = lc.load_deployment(run)
        if any(r["event"] == "end" for r in dep.records):
            return dep
    raise SystemExit(f"no finished {policy} deployment under {work}")


def run_policy(policy: str, args: argparse.Namespace, fleet_file: Path, work: Path) -> dict[str, Any]:
    exp = experiment(policy, args.nodes, args.updates, fleet_file, args.hidden, args.seed)
    if args.reanalyze is not None:
        dep, attempts = finished_deployment(policy, args.reanalyze), []
    else:
        dep, attempts = deploy(policy, exp, args, work)
    real = lc.real_tasks(dep.records, dep.transfers)
    log.info("%s: %d tasks measured; simulating", policy, len(real))
    records, summary = lc.simulate(exp, lc.device_times(real))
    sim = lc.sim_tasks(records)
    result = lc.compare(real, sim, lc.update_times(dep.records), lc.update_times(records), args.updates)
    payload_down = [0] * args.nodes
    payload_up = [0] * args.nodes
    for a in dep.records:
        if a["event"] == "arrival":
            payload_down[a["client"]] += a["bytes_down"]
            payload_up[a["client"]] += a["bytes_up"]
    failed = [r for r in dep.records if r["event"] == "task_failed"]
    result.update(
        policy=policy,
        failed_attempts=attempts,
        real_failed_tasks=[{"client": r["client"], "task": r["task"], "reason": r["reason"]} for r in failed],
        real_tasks_without_stamps=sum(1 for r in dep.records if r["event"] == "arrival") - len(real),
        deployment_wall_seconds=dep.wall_seconds,
        real_server_updates=len(lc.update_times(dep.records)),
        simulated_server_updates=len(lc.update_times(records)),
        compute_fallbacks=summary.get("compute_fallbacks"),
        real_final_accuracy=dep.summary.get("final_accuracy"),
        simulated_final_accuracy=summary.get("final_accuracy"),
        bytes={
            "payload_arrived_tasks": {"down": payload_down, "up": payload_up},
            "relay_application_bytes": dep.relay_bytes,
            "link_packet_bytes": dep.link_bytes,
            "note": ("relay and link bytes cover the whole run (describe queries, polls, heartbeats, tasks "
                     "still out at the end); payload only the tasks that arrived"),
        },
        update_times={"real": lc.update_times(dep.records), "simulated": lc.update_times(records)},
    )
    return result


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float as None (JSON has no NaN)."""
    if isinstance(value, float):
        return lc.finite(value)
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def plot(results: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phases = [("download", "download (s)"), ("upload", "upload (s)"), ("duration", "whole task (s)")]
    fig, axes = plt.subplots(len(results), 4, figsize=(17, 4.2 * len(results)), squeeze=False)
    for row, (policy, res) in enumerate(results.items()):
        pairs = res["pairs_detail"]
        clients = sorted({p["client"] for p in pairs})
        colors = {c: plt.cm.viridis(i / max(1, len(clients) - 1)) for i, c in enumerate(clients)}
        for col, (phase, label) in enumerate(phases):
            ax = axes[row][col]
            xs = [p[phase][0] for p in pairs]
            ys = [p[phase][1] for p in pairs]
            hi = max(xs + ys) * 1.08 if xs else 1.0
            ax.fill_between([0, hi], [0, hi * (1 - GOAL_TASK_MARE)], [0, hi * (1 + GOAL_TASK_MARE)], color="0.9",
                            label=f"±{GOAL_TASK_MARE:.0%}")
            ax.plot([0, hi], [0, hi], color="0.5", lw=1)
            for c in clients:
                mine = [p for p in pairs if p["client"] == c]
                ax.scatter([p[phase][0] for p in mine], [p[phase][1] for p in mine], s=28, color=colors[c],
                           label=f"client {c}", zorder=3)
            mare = res["median_abs_rel_error"][phase]
            ax.set_title(f"{policy}: {label.split(' (')[0]}, median |error| {mare:.1%}" if mare is not None else policy)
            ax.set_xlabel(f"real {label}")
            ax.set_ylabel(f"predicted {label}")
            ax.set_xlim(0, hi)
            ax.set_ylim(0, hi)
            if col == 0:
                ax.legend(fontsize=7, loc="upper left")
        ax = axes[row][3]
        for name, style in (("real", "-"), ("simulated", "--")):
            times = res["update_times"][name]
            ax.step([0.0, *times], range(len(times) + 1), where="post", ls=style, label=name)
        t = res["time_to_updates"]
        err = t["rel_error"]
        ax.set_title(f"{policy}: server updates, time to {t['updates']}: "
                     + (f"{err:+.1%}" if err is not None else "n/a"))
        ax.set_xlabel("seconds since start")
        ax.set_ylabel("server updates")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policies", nargs="+", default=["fedasync", "prfl"], choices=sorted(POLICY_OPTIONS))
    ap.add_argument("--nodes", type=int, default=5, help="SuperNodes, one per client (4 or more)")
    ap.add_argument("--updates", type=int, default=15, help="K: server updates per run")
    ap.add_argument("--hidden", type=int, nargs="+", default=[512, 128], help="MLP hidden sizes (digits, 8x8)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds one deployment may take")
    ap.add_argument("--attempts", type=int, default=2, help="deployments tried per policy (a loaded machine can lose one)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "real_links.json")
    ap.add_argument("--workdir", type=Path, default=None, help="keep the runs' files here (default: a temporary directory)")
    ap.add_argument("--reanalyze", type=Path, default=None, metavar="WORKDIR",
                    help="no new deployments: simulate and compare again those a --workdir run kept")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    reason = shaping_unavailable() if args.reanalyze is None else None
    if reason is not None:
        raise SystemExit(f"cannot shape the loopback interface: {reason}")
    speeds = speeds_for(args.nodes)
    out: Path = args.out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    fleet_file = out.with_name(out.stem + "_fleet.yaml")
    fleet_file.write_text(lc.fleet_yaml(speeds, "real-links"), encoding="utf-8")
    work = args.workdir.resolve() if args.workdir else Path(tempfile.mkdtemp(prefix="prfl-real-links-"))
    if args.reanalyze is not None:
        args.reanalyze = args.reanalyze.resolve()
    t0 = time.monotonic()
    results: dict[str, dict[str, Any]] = {}
    try:
        with terminate_on_sigterm():
            for policy in args.policies:
                results[policy] = run_policy(policy, args, fleet_file, work)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    rel = lambda p: p.relative_to(ROOT).as_posix() if p.is_relative_to(ROOT) else p.name  # noqa: E731
    cmd = ["python", "benchmarks/bench_real_links.py"]  # the options that change the experiment
    for name in ("policies", "nodes", "updates", "hidden", "seed"):
        value = getattr(args, name)
        if value != ap.get_default(name):
            cmd += [f"--{name}", *map(str, value if isinstance(value, list) else [value])]
    verdict = {
        p: {"task_duration_mare": r["median_abs_rel_error"]["duration"],
            "time_to_updates_rel_error": r["time_to_updates"]["rel_error"],
            "task_goal_met": (r["median_abs_rel_error"]["duration"] or 1.0) <= GOAL_TASK_MARE,
            "time_goal_met": abs(r["time_to_updates"]["rel_error"] or 1.0) <= GOAL_TIME_TO_K}
        for p, r in results.items()
    }
    doc = {
        "benchmark": "The virtual clock against real links: a shaped Flower deployment, predicted by the simulator",
        "command": " ".join(cmd),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "load_average_1_5_15": [round(x, 1) for x in os.getloadavg()],
                    "python": platform.python_version(), "kernel": platform.release()},
        "workload": {"dataset": "digits", "model": f"mlp {args.hidden}", "nodes": args.nodes,
                     "server_updates": args.updates, "policies": args.policies, "seed": args.seed},
        "links": {"fleet_file": rel(fleet_file), "down_bps": list(speeds.down_bps), "up_bps": list(speeds.up_bps),
                  "server_up_bps": speeds.server_up_bps, "server_down_bps": speeds.server_down_bps,
                  "payload_efficiency": PAYLOAD_EFFICIENCY,
                  "shaping": "tc htb on lo: a class per node and direction under the server's two classes, each at "
                             f"the payload speed / {PAYLOAD_EFFICIENCY:.3f} in packets (headers included); relay on "
                             "127.77.S.x, 1460-byte MSS, at most four segments per packet"},
        "compute": "measured: each task's device time (SuperNode received -> sending) is fed to the simulator",
        "deployments": "new" if args.reanalyze is None else "re-analysed: the deployments of an earlier run, kept with --workdir",
        "goals": {"task_duration_median_abs_rel_error": GOAL_TASK_MARE, "time_to_updates_abs_rel_error": GOAL_TIME_TO_K},
        "verdict": verdict,
        "wall_seconds": time.monotonic() - t0,
        "policies": results,
    }
    out.write_text(json.dumps(json_safe(doc), indent=1) + "\n", encoding="utf-8")
    plot(results, out.with_suffix(".png"))
    for p, v in verdict.items():
        log.info("%s: per-task median |error| %.1f%%, time to %d updates %+.1f%%", p,
                 100 * (v["task_duration_mare"] or float("nan")), args.updates,
                 100 * (v["time_to_updates_rel_error"] or float("nan")))
    log.info("wrote %s", rel(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
