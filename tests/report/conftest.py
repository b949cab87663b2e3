"""Hand-made run directories and comparison directories, with numbers chosen for easy checking.

The comparison ``handmade`` has two methods on three clients, two seeds each, targets 0.5 and 0.8
and baseline ``slow``:

======  ====  =============================  ============  ==================
method  seed  evaluations (time, accuracy)   local rounds  server egress (B)
======  ====  =============================  ============  ==================
fast    0     (0, .1) (10, .6) (20, .85)     4 2 2         2e6
fast    1     (0, .1) (20, .6) (30, .85)     3 3 3         4e6
slow    0     (0, .1) (30, .55) (60, .82)    6 1 2         1e6
slow    1     (0, .1) (60, .7) (90, .75)     5 0 1         3e6
======  ====  =============================  ============  ==================
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

EVALS = {
    ("fast", 0): [(0.0, 0.1), (10.0, 0.6), (20.0, 0.85)],
    ("fast", 1): [(0.0, 0.1), (20.0, 0.6), (30.0, 0.85)],
    ("slow", 0): [(0.0, 0.1), (30.0, 0.55), (60.0, 0.82)],
    ("slow", 1): [(0.0, 0.1), (60.0, 0.7), (90.0, 0.75)],
}
LOCAL_ROUNDS = {("fast", 0): [4, 2, 2], ("fast", 1): [3, 3, 3], ("slow", 0): [6, 1, 2], ("slow", 1): [5, 0, 1]}
EGRESS = {("fast", 0): 2e6, ("fast", 1): 4e6, ("slow", 0): 1e6, ("slow", 1): 3e6}
POLICY = {"fast": "prfl", "slow": "fedasync"}
BYTES_UP = 1000.0  # per local round
BYTES_DOWN = 3000.0


def make_history(
    evals: Sequence[tuple[float, float]],
    local_rounds: Sequence[int],
    egress: float,
    densities: bool = False,
) -> list[dict[str, Any]]:
    """A plausible history: evaluations with cumulative bytes, one arrival per local round."""
    n = len(local_rounds)
    end = evals[-1][0]
    recs: list[dict[str, Any]] = [{"event": "start", "time": 0.0, "round": 0, "clients": n, "policy": "x"}]
    arrivals = [(end * (k + 1) / (r + 1), c) for c, r in enumerate(local_rounds) for k in range(r)]
    done = [0] * n
    events: list[tuple[float, int, dict[str, Any]]] = []
    for t, c in arrivals:
        events.append((t, 1, {"event": "arrival", "time": t, "round": 0, "client": c, "density": 1.0, "staleness": 0,
                              "bytes_down": BYTES_DOWN, "bytes_up": BYTES_UP}))
    for i, (t, acc) in enumerate(evals):
        rec = {"event": "eval", "time": t, "round": i, "accuracy": acc, "loss": 1.0 - acc,
               "server_egress": egress * (t / end if end else 1.0), "server_ingress": 0.0}
        if densities:
            rec["density"] = [1.0, 0.5, 0.25][:n]
        events.append((t, 2, rec))
    if densities:
        events.append((end / 2, 0, {"event": "densities", "time": end / 2, "round": 1, "density": [1.0, 0.3, 0.1][:n]}))
        events.append((end / 2, 3, {"event": "recovery", "time": end / 2, "round": 1, "scope": "server"}))
        events.append((end * 0.75, 3, {"event": "recovery", "time": end * 0.75, "round": 1, "scope": "client", "client": 1}))
    for t, _, rec in sorted(events, key=lambda e: (e[0], e[1])):
        if rec["event"] == "arrival":
            done[rec["client"]] += 1
        if rec["event"] == "eval":
            rec["participation"] = list(done)
        recs.append(rec)
    recs.append({"event": "end", "time": end, "round": len(evals) - 1, "reason": "time budget spent"})
    return recs


def make_summary(records: Sequence[dict[str, Any]], local_rounds: Sequence[int], egress: float, seed: int, policy: str) -> dict[str, Any]:
    accs = [r["accuracy"] for r in records if r["event"] == "eval"]
    return {
        "policy": policy, "stopped": "time budget spent", "virtual_seconds": records[-1]["time"],
        "server_rounds": records[-1]["round"], "final_accuracy": accs[-1], "best_accuracy": max(accs),
        "time_to_accuracy": {}, "local_rounds": list(local_rounds), "aggregated_rounds": list(local_rounds),
        "server_egress_bytes": egress, "server_ingress_bytes": BYTES_UP * sum(local_rounds),
        "client_download_bytes": [BYTES_DOWN * r for r in local_rounds],
        "client_upload_bytes": [BYTES_UP * r for r in local_rounds],
        "wall_seconds": 1.0, "train_seconds": 0.5, "name": "handmade", "seed": seed,
    }


def write_run(d: Path, records: Sequence[dict[str, Any]], summary: dict[str, Any] | None, config: dict[str, Any]) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    (d / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    if summary is not None:
        (d / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    return d


def build_handmade(root: Path, with_summary: bool = True) -> Path:
    """Write the ``handmade`` comparison directory into ``root``."""
    manifest = {
        "name": "handmade", "command": "prfl compare handmade.yaml", "seeds": [0, 1], "targets": [0.5, 0.8],
        "baseline": "slow", "methods": {m: {"name": p, "options": {}} for m, p in POLICY.items()},
        "scenario": {"name": "handmade", "sim": {"targets": [0.5, 0.8]}},
    }
    root.mkdir(parents=True, exist_ok=True)
    (root / "comparison.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False), encoding="utf-8")
    for (method, seed), evals in EVALS.items():
        recs = make_history(evals, LOCAL_ROUNDS[method, seed], EGRESS[method, seed], densities=method == "fast")
        summ = make_summary(recs, LOCAL_ROUNDS[method, seed], EGRESS[method, seed], seed, POLICY[method]) if with_summary else None
        cfg = {"name": "handmade", "seed": seed, "policy": {"name": POLICY[method], "options": {}}, "sim": {"targets": [0.5, 0.8]}}
        write_run(root / "runs" / method / f"seed{seed}", recs, summ, cfg)
    return root


@pytest.fixture
def handmade(tmp_path: Path) -> Path:
    return build_handmade(tmp_path / "handmade")


@pytest.fixture(scope="module")
def handmade_module(tmp_path_factory) -> Path:
    return build_handmade(tmp_path_factory.mktemp("cmp") / "handmade")
