"""PR-FL on a local Deployment Engine: a SuperLink and 3 SuperNodes on loopback (subprocesses).

One run serves both tests (starting a federation costs tens of seconds on a busy machine):
a healthy phase (accuracy rises, every node trains, bytes on the wire match the residual-split
accounting), then SuperNode 2 is killed, its task times out, the others go on, and the node
restarted rejoins and trains again.
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("flwr", reason="Flower is not installed: pip install 'prfl[flower]' to run the deployment tests")

from flower_support import EXAMPLE_APP, SMALL_RUN, events, read_history, wait_for

from prfl.flower.local import LocalFederation

REPLY_TIMEOUT = 25.0  # s; well above a round trip on a loaded 2-CPU machine (a new process per message)
SLOW_NODE_DELAY = 2.0  # s of artificial delay on node 2: PR-FL gives it a sparser sub-model


@dataclass
class DeploymentRun:
    records: list[dict[str, Any]]
    kill_index: int  # records[:kill_index] were written before node 2 was killed
    first_node: int  # node id of client 2 before the kill
    summary: dict[str, Any]
    wall_seconds: float
    workdir: Path


def _server_updates(recs: list[dict[str, Any]]) -> int:
    return len(events(recs, "server_update"))


@pytest.fixture(scope="module")
def deployment_run(tmp_path_factory: pytest.TempPathFactory) -> DeploymentRun:
    work = tmp_path_factory.mktemp("federation")
    out = work / "run"
    stop_file = work / "stop"
    history = out / "history.jsonl"
    fed = LocalFederation(work, 3, delays=(0.0, 0.0, SLOW_NODE_DELAY))
    run_config = {
        **SMALL_RUN,
        "out-dir": str(out),
        "stop-file": str(stop_file),
        "reply-timeout": REPLY_TIMEOUT,
        # shorter than a ClientApp's cold start on a loaded machine (FAB, process, imports): the
        # first describe query may expire, and the next, living twice as long, describes the node
        "hello-timeout": 15.0,
        "probe-interval": 3.0,
        "discover-interval": 1.0,
        "wait-for-nodes": 90.0,
        "idle-timeout": 90.0,
        "prfl.sim.max_rounds": 200,  # the test ends the run with the stop file
        "prfl.sim.eval_every_rounds": 1,
    }
    t0 = time.monotonic()
    with fed:
        fed.flwr_run(EXAMPLE_APP, run_config)

        def healthy(recs: list[dict[str, Any]]) -> bool:
            arr = events(recs, "arrival")
            return (
                _server_updates(recs) >= 4
                and {r["client"] for r in arr} == {0, 1, 2}
                and any(r["density"] < 1.0 for r in arr)
            )

        recs = wait_for(history, healthy, 240, "4 server updates, every client trained, a sparse sub-model arrived")
        start = events(recs, "start")[0]
        first_node = int(start["nodes"]["2"])
        kill_index = len(recs)
        fed.kill_node(2)

        recs = wait_for(
            history,
            lambda r: any(str(e["reason"]).startswith("timeout") for e in events(r[kill_index:], "task_failed", client=2)),
            REPLY_TIMEOUT + 90, "the task of the killed node to time out",
        )

        def outage_seen(r: list[dict[str, Any]]) -> bool:
            # the node stays down until the server has evaluated twice without it, so the test
            # can watch its buffer slot grow stale (restarting at once may leave a single eval)
            after = r[kill_index:]
            fails = [i for i, e in enumerate(after) if e["event"] == "task_failed" and e["client"] == 2]
            return bool(fails) and len(events(after[fails[0]:], "eval")) >= 2

        wait_for(history, outage_seen, 120, "two evaluations while node 2 is down")
        fed.start_node(2)
        wait_for(
            history,
            lambda r: any(e["node"] != first_node for e in events(r[kill_index:], "arrival", client=2)),
            180, "the restarted node to rejoin and deliver a result",
        )
        stop_file.touch()
        recs = wait_for(history, lambda r: bool(events(r, "end")), 60, "the run to end")
        summary_path = out / "summary.json"
        deadline = time.monotonic() + 30
        while not summary_path.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    return DeploymentRun(read_history(history), kill_index, first_node, summary, time.monotonic() - t0, work)


@pytest.mark.slow
def test_prfl_on_loopback_deployment(deployment_run: DeploymentRun) -> None:
    """Accuracy rises, the policy saw all three nodes, wire bytes match the residual-split accounting."""
    recs = deployment_run.records[: deployment_run.kill_index]
    evals = events(recs, "eval")
    assert evals[0]["round"] == 0
    assert max(e["accuracy"] for e in evals[1:]) > evals[0]["accuracy"] + 0.15

    start = events(recs, "start")[0]
    assert sorted(start["nodes"]) == ["0", "1", "2"] and len(set(start["nodes"].values())) == 3
    arrivals = events(recs, "arrival")
    assert {a["client"] for a in arrivals} == {0, 1, 2}
    assert {a["node"] for a in arrivals} == {int(n) for n in start["nodes"].values()}

    # every task: the payload pushed, the payload the node counted and PR-FL's TaskSpec bytes agree
    for a in arrivals:
        assert a["bytes_down"] == a["accounted_down"] == a["received_bytes"], a
        assert a["bytes_up"] == a["accounted_up"], a
        assert a["pieces"], a  # PR-FL distributes residual pieces
    sparse = [a for a in arrivals if a["density"] < 1.0]
    assert sparse and all(a["bytes_down"] < arrivals[0]["bytes_down"] for a in sparse)
    assert any(a["delay"] == pytest.approx(2.0) for a in arrivals if a["client"] == 2)

    s = deployment_run.summary
    assert s["client_download_bytes"] == s["accounted_download_bytes"]
    assert s["client_upload_bytes"] == s["accounted_upload_bytes"]
    assert s["messages_sent"] >= s["tasks_sent"] + 3  # tasks plus at least one describe per node


@pytest.mark.slow
def test_node_killed_and_restarted(deployment_run: DeploymentRun) -> None:
    """A dead node's task times out, the others go on, its buffer slot grows stale, it rejoins."""
    recs = deployment_run.records
    after = recs[deployment_run.kill_index:]
    fail = next(r for r in after if r["event"] == "task_failed" and r["client"] == 2)
    assert str(fail["reason"]).startswith("timeout")
    i_fail = recs.index(fail)
    join = next(r for r in recs[i_fail:] if r["event"] == "node" and r["client"] == 2 and r["status"] == "joined")
    i_join = recs.index(join)
    assert join["node"] != deployment_run.first_node

    outage = recs[i_fail:i_join]
    assert events(outage, "server_update"), "the server stopped while node 2 was down"
    assert {r["client"] for r in events(outage, "arrival")} <= {0, 1}
    stale = [e["buffer_staleness"][2] for e in events(outage, "eval")]
    assert len(stale) >= 2 and all(b > a for a, b in itertools.pairwise(stale)), stale

    back = recs[i_join:]
    assert events(back, "availability", client=2, online=True)
    new_arrivals = [a for a in events(back, "arrival", client=2) if a["node"] == join["node"]]
    assert new_arrivals
    assert all(a["bytes_down"] == a["accounted_down"] == a["received_bytes"] for a in new_arrivals)
    s = deployment_run.summary
    assert s["stopped"].startswith("stop requested")
    assert s["failed_tasks"][2] >= 1
    assert s["nodes"]["2"] == join["node"]
