"""The same ServerApp and ClientApp on Flower's Simulation Engine (Ray backend), small and CPU only.

``run_simulation`` runs in a child process so that Ray's workers and state go away with it; the
child and everything it starts are ended at the end of the test, whatever ends it.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("flwr", reason="Flower is not installed: pip install 'prfl[flower]' to run the simulation test")
pytest.importorskip("ray", reason="Ray is not installed: pip install 'flwr[simulation]' for the Simulation Engine")

from flower_support import SMALL_RUN, events, read_history

from prfl.flower.processes import ManagedProcesses

SCRIPT = textwrap.dedent(
    """
    import json, sys
    from flwr.simulation import run_simulation
    from prfl.flower.client_app import make_client_app
    from prfl.flower.server_app import make_server_app

    defaults = json.loads(sys.argv[1])  # run_simulation passes an empty run config: the apps carry it
    run_simulation(
        server_app=make_server_app(defaults),
        client_app=make_client_app(defaults),
        num_supernodes=3,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": 2}},
    )
    """
)


@pytest.mark.slow
def test_prfl_on_the_simulation_engine(tmp_path: Path) -> None:
    out = tmp_path / "run"
    defaults = {**SMALL_RUN, "out-dir": str(out), "client-delays": "0,0,0.5", "prfl.sim.max_rounds": 6,
                "prfl.sim.eval_every_rounds": 2, "reply-timeout": 150.0}
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "RAY_DEDUP_LOGS": "0"}
    # the child and every process it starts (Ray's head and workers) end with this test, however it ends
    with ManagedProcesses() as procs:
        done = procs.run([sys.executable, "-c", SCRIPT, json.dumps(defaults)], cwd=tmp_path, capture_output=True,
                         text=True, timeout=480, env=env)
    summary_path = out / "summary.json"
    assert summary_path.exists(), f"no summary; exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    summary = json.loads(summary_path.read_text())
    recs = read_history(out / "history.jsonl")

    assert summary["server_rounds"] == 6
    arrivals = events(recs, "arrival")
    assert {a["client"] for a in arrivals} == {0, 1, 2}  # node config partition-id from the engine
    for a in arrivals:
        assert a["bytes_down"] == a["accounted_down"] == a["received_bytes"]
    assert any(a["delay"] == pytest.approx(0.5) for a in arrivals if a["client"] == 2)
    evals = events(recs, "eval")
    assert evals[-1]["accuracy"] > evals[0]["accuracy"] + 0.15
