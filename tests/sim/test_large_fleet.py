"""A fleet of 1,000 clients runs end to end: LEAF Synthetic with one device per client, the
``lognormal`` fleet with on/off availability, PR-FL with the buffer in ``prefix`` storage and
densities on a grid. (The memory figure for ``conv2`` at this scale is a benchmark:
``benchmarks/bench_scale.py``.)"""

from __future__ import annotations

import numpy as np
import pytest

from prfl.config import PolicyConfig, load_config
from prfl.run import build_scenario, run_policy

CLIENTS = 1000
UPDATES = 600


@pytest.fixture(scope="module")
def large_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("large")
    cfg = load_config(overrides=[
        "name=large", "seed=3", "data.dataset=synthetic",
        f"data.options={{num_groups: {CLIENTS}, alpha: 0.0, beta: 0.0, iid: true}}",
        f"data.num_clients={CLIENTS}", "data.partition=natural", "data.eval_samples=2000",
        "model.name=mlp", "model.options={hidden: [64]}", "train.lr=0.2", "train.batch_size=10",
        "train.local_steps=5", "fleet.preset=lognormal",
        "fleet.availability={mean_on: 600, mean_off: 200, start_online_prob: 0.8}",
        "sim.executor=inline", f"sim.max_rounds={UPDATES}", "sim.max_time=null",
        f"sim.eval_every_rounds={UPDATES // 4}", "sim.eval_every_seconds=null", "sim.checkpoint_every_rounds=null",
    ])
    sc = build_scenario(cfg)
    policy = PolicyConfig(name="prfl", options={
        "buffer_storage": "prefix", "density_step": 0.1, "initial_densities": 0.2, "window": 0.0, "interval": 100})
    summary = run_policy(sc, policy, out)
    return sc, summary


def test_a_thousand_clients_run_end_to_end(large_run) -> None:
    _, summary = large_run
    hist = summary["history"]
    assert summary["server_rounds"] == UPDATES
    arrivals = [r for r in hist if r["event"] == "arrival"]
    assert len(arrivals) >= UPDATES
    # hundreds of different clients contribute, and clients that went offline lost their tasks
    assert len({r["client"] for r in arrivals}) >= 300
    assert any(r["event"] == "task_failed" and r["reason"] == "offline" for r in hist)
    assert len(summary["local_rounds"]) == CLIENTS


def test_a_thousand_clients_learn_on_a_shared_density_grid(large_run) -> None:
    _, summary = large_run
    hist = summary["history"]
    densities = {round(r["density"], 9) for r in hist if r["event"] == "arrival"}
    assert densities and all(abs(d * 10 - round(d * 10)) < 1e-6 for d in densities if d < 1.0)
    evals = [r for r in hist if r["event"] == "eval"]
    assert evals[-1]["round"] == UPDATES
    assert evals[-1]["accuracy"] > evals[0]["accuracy"] + 0.1
    assert np.isfinite(summary["final_accuracy"])
