"""Not collected on its own (no ``test_`` prefix): a loopback deployment that
``test_interrupt.py`` runs in a pytest process of its own and then interrupts or kills."""

from __future__ import annotations

import time
from pathlib import Path

from flower_support import EXAMPLE_APP, SMALL_RUN, events, wait_for

from prfl.flower.local import LocalFederation


def test_deployment_until_killed(tmp_path: Path) -> None:
    out = tmp_path / "run"
    with LocalFederation(tmp_path / "fed", 2) as fed:
        fed.flwr_run(EXAMPLE_APP, {**SMALL_RUN, "prfl.data.num_clients": 2, "out-dir": str(out),
                                   "prfl.sim.max_rounds": 100000, "wait-for-nodes": 120.0, "idle-timeout": 600.0,
                                   "reply-timeout": 120.0})
        wait_for(out / "history.jsonl", lambda r: bool(events(r, "arrival")), 400, "a first result")
        (tmp_path / "READY").touch()  # the deployment trains: kill me now
        time.sleep(900)
