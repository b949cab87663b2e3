"""PR-FL with a large fleet: peak resident memory of the server process, checkpoints, exact resume.

Workload: Fashion-MNIST, ``conv2`` (6.5 M weights), ``--clients`` clients from the ``lognormal``
fleet preset with on/off availability periods, PR-FL with the buffer in ``prefix`` storage,
densities on a grid of ``--density-step`` starting at ``--initial-density`` (a large fleet starts
sparse: a client's first model stays in the buffer until its next arrival), one server update
per arrival (window 0), run for ``--updates`` server updates, with a checkpoint every
``--checkpoint-every`` updates (0: none). The buffer's values live in a file (PR-FL's
``buffer_dir``; ``--buffer-in-memory`` keeps them in RAM). The executor is inline with its
waiting jobs spilled to disk (``sim.spill_dir``): the start models of thousands of tasks in flight
are the clients' memory, not the server's. A thread samples the process's resident set (``VmRSS``
in /proc/self/status) every 0.2 s; ``ru_maxrss`` gives the kernel's peak. Every checkpoint is
timed and its size and the resident peak while it was written are recorded.

Long runs go in pieces: ``--resume`` continues the run in ``--out`` from its last checkpoint (after
a crash, a kill or a reboot); each piece appends its figures to ``bench-pieces.json`` there, and
the piece that finishes writes the result with all of them (peak: the highest piece's).

``--kill-check`` instead checks exact resume at this scale, in three processes: an uninterrupted
``prfl run`` of the workload (the reference), the same run killed with SIGKILL at a random
point after its first checkpoint (when its history reaches a random line between the one it had
then and the last 5% of the reference's, so that load does not move the point), and ``prfl run
--resume`` of the killed run. The resumed history must equal the reference line for line and the
summaries field for field (apart from measured seconds).

Usage (from the repository root):
  .venv/bin/python benchmarks/bench_scale.py --clients 10000 --updates 2000 --checkpoint-every 500 --out runs/scale-10000
  .venv/bin/python benchmarks/bench_scale.py --clients 10000 --updates 2000 --checkpoint-every 500 --out runs/scale-10000 --resume
  .venv/bin/python benchmarks/bench_scale.py --clients 10000 --updates 300 --checkpoint-every 100 --out runs/scale-kill --kill-check
Writes benchmarks/results/scale-<clients>.json (or scale-kill-<clients>.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from prfl import allocator
from prfl.config import PolicyConfig, load_config, save_config
from prfl.models import build_model
from prfl.run import build_scenario, resume_run, run_policy
from prfl.sim import engine

RESULTS = Path(__file__).parent / "results"
PIECES = "bench-pieces.json"
WALL_FIELDS = ("wall_seconds", "train_seconds")
GIB = 2**30


def rss_bytes() -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class RssSampler(threading.Thread):
    """Samples VmRSS every ``every`` seconds; ``window_peak`` is the peak since :meth:`mark`."""

    def __init__(self, every: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.every = every
        self.peak = 0
        self.window_peak = 0
        self._halt = threading.Event()

    def mark(self) -> None:
        self.window_peak = rss_bytes()

    def run(self) -> None:
        while not self._halt.is_set():
            r = rss_bytes()
            self.peak = max(self.peak, r)
            self.window_peak = max(self.window_peak, r)
            self._halt.wait(self.every)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def command() -> str:
    """This invocation, relative to the repository (no machine paths)."""
    return " ".join(["python", "benchmarks/bench_scale.py", *sys.argv[1:]])


def workload(args: argparse.Namespace, run_dir: Path) -> tuple[list[str], dict[str, Any]]:
    """Config overrides and PR-FL options of the benchmark's run in ``run_dir``."""
    overrides = [
        "name=scale", "seed=0", "data.dataset=fashion-mnist", f"data.num_clients={args.clients}", "data.partition=iid",
        "data.eval_samples=1000", "model.name=conv2", "train.lr=0.1", "train.batch_size=20", "train.local_steps=5",
        "fleet.preset=lognormal", "fleet.availability={mean_on: 600, mean_off: 120, start_online_prob: 0.83}",
        "sim.executor=inline", f"sim.max_rounds={args.updates}", "sim.max_time=null",
        f"sim.eval_every_rounds={max(1, args.updates // 10)}", "sim.eval_every_seconds=null",
        f"sim.checkpoint_every_rounds={args.checkpoint_every or 'null'}", f"sim.spill_dir={run_dir / 'spill'}",
    ]
    options: dict[str, Any] = {"buffer_storage": "prefix", "density_step": args.density_step,
                               "initial_densities": args.initial_density, "window": 0.0}
    if not args.buffer_in_memory:
        options["buffer_dir"] = str(run_dir / "buffer")
    return overrides, options


def machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "load_average": os.getloadavg()}


def commit() -> str | None:
    """The checked-out commit the benchmark ran (None outside a git checkout)."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


# ---------------------------------------------------------------------------------- one run (a piece)
def run_piece(args: argparse.Namespace) -> int:
    out: Path = args.out
    overrides, options = workload(args, out)
    sampler = RssSampler()
    sampler.start()
    t0 = time.perf_counter()
    checkpoints: list[dict[str, Any]] = []
    original_save = engine.Simulation.save_checkpoint

    def timed_save(sim: engine.Simulation) -> Path:  # the benchmark's probe around every checkpoint
        sampler.mark()
        rss_before = rss_bytes()
        c0 = time.perf_counter()
        path = original_save(sim)
        checkpoints.append({"round": sim.policy.version, "seconds": time.perf_counter() - c0,
                            "bytes": path.stat().st_size, "rss_before_bytes": rss_before,
                            "peak_rss_while_writing_bytes": sampler.window_peak})
        print(f"checkpoint at update {sim.policy.version}: {path.stat().st_size / 1e9:.2f} GB in "
              f"{checkpoints[-1]['seconds']:.0f} s, peak RSS while writing {sampler.window_peak / GIB:.2f} GiB", flush=True)
        return path

    engine.Simulation.save_checkpoint = timed_save  # type: ignore[method-assign]
    pieces_file = out / PIECES

    def progress(rec: dict[str, Any]) -> None:
        print(f"update {rec.get('round')}: t={rec.get('time', 0):.0f} virtual s, accuracy {rec.get('accuracy')}, "
              f"{time.perf_counter() - t0:.0f} s wall, RSS {rss_bytes() / GIB:.2f} GiB (peak {sampler.peak / GIB:.2f})",
              flush=True)

    if args.resume:
        summary = resume_run(out, on_progress=progress)
        rss_scenario = None
    else:
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        sc = build_scenario(load_config(overrides=overrides))
        rss_scenario = rss_bytes()
        summary = run_policy(sc, PolicyConfig(name="prfl", options=options), out, on_progress=progress)
    wall = time.perf_counter() - t0
    sampler.stop()
    peak_kernel = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    hist = summary.pop("history", [])
    piece = {"command": command(), "commit": commit(), "resumed": bool(args.resume), "wall_seconds": wall,
             "peak_rss_bytes": max(sampler.peak, peak_kernel), "peak_rss_sampled_bytes": sampler.peak,
             "peak_rss_kernel_bytes": peak_kernel, "rss_after_scenario_bytes": rss_scenario,
             "checkpoints": checkpoints, "machine": machine()}
    pieces = json.loads(pieces_file.read_text()) if pieces_file.exists() and args.resume else []
    pieces.append(piece)
    pieces_file.write_text(json.dumps(pieces, indent=2))

    evals = [r for r in hist if r.get("event") == "eval"]
    densities = sorted({round(r["density"], 6) for r in hist if r.get("event") == "arrival"})
    n_total = sum(p.numel() for p in build_model("conv2", (1, 28, 28), 10).parameters())
    all_checkpoints = [c for p in pieces for c in p["checkpoints"]]
    result = {
        "benchmark": "PR-FL with a large fleet: server peak RSS and checkpoints",
        "command": " ".join(dict.fromkeys(p["command"] for p in pieces)),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "commits": sorted({p.get("commit") or "?" for p in pieces}),
        "machine": machine(),
        "workload": {"clients": args.clients, "updates": args.updates, "model": "conv2", "weights": n_total,
                     "fleet": "lognormal + availability (mean_on 600 s, mean_off 120 s)", "storage": "prefix",
                     "density_step": args.density_step, "initial_density": args.initial_density,
                     "executor": "inline (waiting jobs spilled to disk)", "checkpoint_every": args.checkpoint_every,
                     "buffer_values": "in memory" if args.buffer_in_memory else "in a file (buffer_dir)"},
        "pieces": len(pieces),
        "server_rounds": summary["server_rounds"],
        "virtual_seconds": summary["virtual_seconds"],
        "wall_seconds": sum(p["wall_seconds"] for p in pieces),
        "train_seconds": summary["train_seconds"],
        "wall_over_train": sum(p["wall_seconds"] for p in pieces) / summary["train_seconds"],
        "final_accuracy": summary["final_accuracy"],
        "accuracy_curve": [(r["round"], r["accuracy"]) for r in evals],
        "clients_that_arrived": sum(1 for x in summary["local_rounds"] if x > 0),
        "failed_tasks": sum(1 for r in hist if r.get("event") == "task_failed"),
        "distinct_densities": densities,
        "heap_trims": allocator.trims,
        "peak_rss_bytes": max(p["peak_rss_bytes"] for p in pieces),
        "rss_after_scenario_bytes": pieces[0]["rss_after_scenario_bytes"],
        "checkpoints": all_checkpoints,
        "checkpoint_max_bytes": max((c["bytes"] for c in all_checkpoints), default=None),
        "checkpoint_max_seconds": max((c["seconds"] for c in all_checkpoints), default=None),
        "dense_buffer_would_need_bytes": args.clients * n_total * 4,
        "target_peak_rss_bytes": 4 * GIB,
        "target_wall_over_train": 2.0,
    }
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"scale-{args.clients}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"{args.clients} clients, {summary['server_rounds']} updates in {result['wall_seconds']:.0f} s wall "
          f"({result['wall_over_train']:.2f}x the {summary['train_seconds']:.0f} s of training); peak RSS "
          f"{result['peak_rss_bytes'] / GIB:.2f} GiB (target 4 GiB); {len(all_checkpoints)} checkpoints, the largest "
          f"{(result['checkpoint_max_bytes'] or 0) / 1e9:.2f} GB; wrote {path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path.name}")
    return 0


# ---------------------------------------------------------------------------------- kill check
def _history(run_dir: Path) -> list[str]:
    return (run_dir / "history.jsonl").read_text(encoding="utf-8").splitlines()


def _prfl(*a: str) -> list[str]:
    return [sys.executable, "-m", "prfl", *a]


def kill_check(args: argparse.Namespace) -> int:
    root: Path = args.out
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    seed = args.kill_seed if args.kill_seed is not None else random.randrange(2**32)
    rng = random.Random(seed)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log: dict[str, Any] = {}

    def config_for(name: str) -> Path:
        run_root = root / name
        overrides, options = workload(args, run_root / "prfl")
        cfg = load_config(overrides=overrides).with_policy(PolicyConfig(name="prfl", options=options))
        path = root / f"{name}.yaml"
        save_config(cfg, path)
        return path

    t0 = time.perf_counter()
    ref = subprocess.run(_prfl("run", str(config_for("reference")), "--out", str(root / "reference"), "--no-baselines",
                               "-q"), env=env, capture_output=True, text=True)
    if ref.returncode != 0:
        raise SystemExit(f"reference run failed:\n{ref.stderr[-4000:]}")
    log["reference_wall_seconds"] = time.perf_counter() - t0
    ref_dir = root / "reference" / "prfl"
    print(f"reference run: {log['reference_wall_seconds']:.0f} s", flush=True)

    killed_dir = root / "killed" / "prfl"
    t0 = time.perf_counter()
    proc = subprocess.Popen(_prfl("run", str(config_for("killed")), "--out", str(root / "killed"), "--no-baselines", "-q"),
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    while not (killed_dir / "checkpoint.pt").exists():
        if proc.poll() is not None:
            raise SystemExit(f"the run ended before its first checkpoint: {proc.stderr.read()[-4000:]!r}")
        time.sleep(0.5)
    first = time.perf_counter() - t0
    # Kill at a random point of the run's progress after its first checkpoint, before the last 5%
    # of the lines the reference wrote after that point (a line count, so the moment does not
    # depend on the machine's load).
    start, total = len(_history(killed_dir)), len(_history(ref_dir))
    target = rng.randint(start + 1, max(start + 1, total - (total - start) // 20))
    while len(_history(killed_dir)) < target:
        if proc.poll() is not None:
            raise SystemExit(f"the run finished before reaching history line {target}; run again with another --kill-seed")
        time.sleep(0.2)
    delay = time.perf_counter() - t0 - first
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()  # type: ignore[union-attr]
    state_round = None
    checkpoints = [json.loads(line) for line in _history(killed_dir) if '"event":"checkpoint"' in line]
    if checkpoints:
        state_round = checkpoints[-1]["round"]
    written = len(_history(killed_dir))
    log.update(kill_after_first_checkpoint_seconds=delay, killed_at_wall_seconds=time.perf_counter() - t0,
               kill_at_history_line=target,
               last_checkpoint_round_before_kill=state_round, history_lines_when_killed=written,
               summary_written_before_kill=(killed_dir / "summary.json").exists())
    print(f"killed {delay:.0f} s after the first checkpoint (last checkpoint at update {state_round})", flush=True)

    t0 = time.perf_counter()
    res = subprocess.run(_prfl("run", "--resume", str(killed_dir), "-q"), env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"resume failed:\n{res.stderr[-4000:]}")
    log["resume_wall_seconds"] = time.perf_counter() - t0

    ref_lines, got_lines = _history(ref_dir), _history(killed_dir)
    differ = next((i for i, (a, b) in enumerate(zip(ref_lines, got_lines)) if a != b), None)
    s_ref = json.loads((ref_dir / "summary.json").read_text())
    s_got = json.loads((killed_dir / "summary.json").read_text())
    strip = lambda s: {k: v for k, v in s.items() if k not in WALL_FIELDS}  # noqa: E731
    identical = differ is None and len(ref_lines) == len(got_lines) and strip(s_ref) == strip(s_got)
    result = {
        "benchmark": "PR-FL with a large fleet: SIGKILL and resume give the uninterrupted history",
        "command": command(),
        "commit": commit(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "workload": {"clients": args.clients, "updates": args.updates, "checkpoint_every": args.checkpoint_every,
                     "model": "conv2", "fleet": "lognormal + availability (mean_on 600 s, mean_off 120 s)",
                     "storage": "prefix", "buffer_values": "in memory" if args.buffer_in_memory else "in a file"},
        "kill_seed": seed,
        **log,
        "history_lines": len(ref_lines),
        "resumed_history_lines": len(got_lines),
        "first_differing_line": differ,
        "summary_fields_compared": sorted(strip(s_ref)),
        "identical": identical,
        "server_rounds": s_got["server_rounds"],
    }
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"scale-kill-{args.clients}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"{'IDENTICAL' if identical else 'DIFFERENT'}: {len(got_lines)} history lines against {len(ref_lines)} "
          f"(first difference: {differ}); wrote {path.name}")
    return 0 if identical else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=1000)
    ap.add_argument("--updates", type=int, default=2000)
    ap.add_argument("--checkpoint-every", type=int, default=500, help="server updates between checkpoints (0: none)")
    ap.add_argument("--initial-density", type=float, default=0.1)
    ap.add_argument("--density-step", type=float, default=0.05)
    ap.add_argument("--out", type=Path, default=Path("runs/bench-scale"), help="the run directory")
    ap.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    ap.add_argument("--buffer-in-memory", action="store_true",
                    help="keep the buffer's values in RAM (default: in a file under --out, buffer_dir)")
    ap.add_argument("--kill-check", action="store_true", help="check that SIGKILL + resume gives the uninterrupted run")
    ap.add_argument("--kill-seed", type=int, default=None, help="seed of the kill moment (default: random, reported)")
    args = ap.parse_args()
    return kill_check(args) if args.kill_check else run_piece(args)


if __name__ == "__main__":
    raise SystemExit(main())
