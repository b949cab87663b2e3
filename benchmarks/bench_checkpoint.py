"""How big the demo's checkpoints are, part by part: every checkpoint of `prfl run`'s default job.

The workload is the `demo` preset (Fashion-MNIST, conv2, the paper10 fleet, 1,200 virtual s)
with its checkpoint interval; each policy of the preset (PR-FL and its FedAsync baseline) is run
to the end, and every checkpoint it writes is measured as it is written: its size, against the
model's float32 bytes, and the seconds the write took. For the largest checkpoint and the last
one of each policy the file is taken apart: the bytes of every stored tensor are credited to the
part of the state that refers to it first (the buffer's slots, the start models of the tasks in
flight, the importance scores, ...), and the table says how each part is stored (plain, the high
bytes through zlib, or as a delta from the model). Sizes do not depend on the machine or its load:
the runs are deterministic. Usage:
  .venv/bin/python benchmarks/bench_checkpoint.py [--policies prfl fedasync] [--set KEY=VALUE ...]
Writes benchmarks/results/demo_checkpoints.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from prfl.config import load_config
from prfl.run import build_scenario, run_policy
from prfl.sim import engine

RESULTS = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scale import commit  # noqa: E402  (the checked-out commit, as every benchmark records it)


def _part(path: str) -> str:
    """The part of the state a tensor belongs to, from its path (indexes and ids dropped)."""
    p = re.sub(r"/\d+(?=/|$)", "/*", path)
    p = re.sub(r"slot\.\d+\.", "slot.*.", p)
    return p


def breakdown(path: Path) -> dict[str, dict[str, Any]]:
    """Bytes per part of the state of a checkpoint file, with how its floats are stored."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    begin, end = header["prfl.state"]["data_offsets"]
    doc = json.loads(data[8 + n + begin : 8 + n + end])
    table = doc["tensors"]
    size: dict[int, int] = {}
    for name, meta in header.items():
        m = re.fullmatch(r"t(\d+)(\.\d+)?(\.pad)?", name)
        if m:
            i = int(m.group(1))
            size[i] = size.get(i, 0) + meta["data_offsets"][1] - meta["data_offsets"][0]
    first: dict[int, str] = {}

    def walk(x: Any, where: str) -> None:
        if isinstance(x, dict) and len(x) == 1 and ("$t" in x or "$s" in x):
            first.setdefault(x.get("$t", x.get("$s")), where)
        elif isinstance(x, dict) and "$dict" in x:
            for k, v in x["$dict"]:
                walk(v, f"{where}/{k if not isinstance(k, (dict, list)) else '*'}")
        elif isinstance(x, dict) and "$dc" in x:
            walk(x["fields"], where)
        elif isinstance(x, dict):
            for k, v in x.items():
                walk(v, f"{where}/{k}" if where else k)
        elif isinstance(x, list):
            for k, v in enumerate(x):
                walk(v, f"{where}/{k}")

    walk(doc["state"], "")
    parts: dict[str, dict[str, Any]] = {}
    for i, b in size.items():
        part = _part(first.get(i, "?"))
        row = table[i]
        how = row.get("values") or row["enc"]
        entry = parts.setdefault(part, {"bytes": 0, "tensors": 0, "stored_as": []})
        entry["bytes"] += b
        entry["tensors"] += 1
        kind = "delta" if str(how).startswith("delta") else str(how)
        if kind not in entry["stored_as"]:
            entry["stored_as"].append(kind)
    return dict(sorted(parts.items(), key=lambda kv: -kv[1]["bytes"]))


def run(policy: str, extra: list[str], model_bytes_out: list[int]) -> dict[str, Any]:
    cfg = load_config(preset="demo", overrides=extra)
    pcfg = cfg.policy if policy == cfg.policy.name else next(b for b in cfg.baselines if b.name == policy)
    sc = build_scenario(cfg)
    model_bytes = sc.initial_weights.numel() * 4
    model_bytes_out.append(model_bytes)
    found: list[dict[str, Any]] = []
    kept: dict[str, Path] = {}
    original = engine.Simulation.save_checkpoint

    with tempfile.TemporaryDirectory(prefix="prfl-ckbench-") as tmp:
        def measured(sim: engine.Simulation) -> Path:
            t0 = time.perf_counter()
            path = original(sim)
            seconds = time.perf_counter() - t0
            size = path.stat().st_size
            found.append({"round": sim.policy.version, "virtual_seconds": round(sim.now, 3), "bytes": size,
                          "x_model": size / model_bytes, "seconds": seconds})
            print(f"{policy}: checkpoint at update {sim.policy.version} ({sim.now:.0f} virtual s): "
                  f"{size / 1e6:.1f} MB = {size / model_bytes:.2f}x the model, {seconds:.1f} s", flush=True)
            if size >= max(f["bytes"] for f in found):  # keep a copy of the largest one
                largest = Path(tmp) / "largest.pt"
                largest.write_bytes(path.read_bytes())
                kept["largest"] = largest
            return path

        engine.Simulation.save_checkpoint = measured  # type: ignore[method-assign]
        try:
            t0 = time.perf_counter()
            summary = run_policy(sc, pcfg, Path(tmp) / "run")
            wall = time.perf_counter() - t0
        finally:
            engine.Simulation.save_checkpoint = original  # type: ignore[method-assign]
        last = Path(tmp) / "run" / "checkpoint.pt"
        big = max(found, key=lambda f: f["bytes"]) if found else None
        return {
            "policy": policy,
            "options": pcfg.options,
            "wall_seconds": wall,
            "final_accuracy": summary.get("final_accuracy"),
            "checkpoints": found,
            "largest": big,
            "last": found[-1] if found else None,
            "largest_parts": breakdown(kept["largest"]) if "largest" in kept else None,
            "last_parts": breakdown(last) if last.is_file() else None,
        }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--policies", nargs="+", default=["prfl", "fedasync"])
    ap.add_argument("--set", dest="extra", action="append", default=[], help="config override (KEY=VALUE)")
    ap.add_argument("--out", type=Path, default=RESULTS / "demo_checkpoints.json")
    args = ap.parse_args()
    model_bytes: list[int] = []
    runs = [run(p, args.extra, model_bytes) for p in args.policies]
    command = "python benchmarks/bench_checkpoint.py" + "".join(
        [" --policies " + " ".join(args.policies)] + [f" --set {e}" for e in args.extra])
    result = {
        "benchmark": "the demo's checkpoints: size against the model, part by part",
        "command": command,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "commit": commit(),
        "machine": {"torch": torch.__version__, "python": platform.python_version()},
        "workload": {"preset": "demo", "overrides": args.extra},
        "model_bytes": model_bytes[0] if model_bytes else None,
        "goal_x_model": 10.0,
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    for r in runs:
        if r["largest"]:
            print(f"{r['policy']}: {len(r['checkpoints'])} checkpoints, largest {r['largest']['x_model']:.2f}x, "
                  f"last {r['last']['x_model']:.2f}x the model")
    return 0


if __name__ == "__main__":
    sys.exit(main())
