"""Rejected updates at the policy level: recorded, never aggregated, the client given new work.

Scripted events drive PR-FL and FedAsync by hand; one simulator run checks the path end to end
(a client that uploads NaN every time).
"""

from __future__ import annotations

import dataclasses
import math
from concurrent.futures import Future
from typing import Any

import pytest
import torch

from prfl.checkpoint import dumps, loads
from prfl.client.result import TaskResult
from prfl.policies import build_policy
from prfl.policies.base import ClientIdle, Dispatch, PolicyContext, Record, ResultArrived, Start, TaskFailed

W0 = torch.tensor([1.0, 2.0, 3.0, 4.0, 0.5, 0.5])  # 4 prunable weights (one layer) + 2 biases


def ctx(num_samples=(1, 3)) -> PolicyContext:
    return PolicyContext(num_clients=len(num_samples), num_samples=tuple(num_samples), initial_weights=W0.clone(),
                         num_prunable=4, layer_bounds=((0, 4),))


def prfl(**kw: Any):
    options = dict(window=0.0, interval=1000, recovery=False, importance=False, density_rule="B",
                   initial_densities=(1.0, 0.5))
    options.update(kw)
    return build_policy("prfl", ctx(), **options)


def dispatches(actions) -> dict[int, Any]:
    return {a.task.client: a.task for a in actions if isinstance(a, Dispatch)}


def rejections(actions) -> list[dict[str, Any]]:
    return [a.data for a in actions if isinstance(a, Record) and a.kind == "rejected"]


def result(task, weights, n=3, **kw) -> TaskResult:
    w = weights if isinstance(weights, torch.Tensor) else torch.tensor(weights, dtype=torch.float32)
    fields = dict(task_id=task.task_id, client=task.client, version=task.version, weights=w, num_samples=n,
                  mean_loss=0.0, steps=1, compute_seconds=0.0, density=task.density)
    fields.update(kw)
    return TaskResult(**fields)


def roundtrip(policy):
    """The policy's state through a checkpoint file's format."""
    return loads(dumps(policy.state_dict()))


GOOD_MASKED = [0, 0, 3.5, 4.5, 1.0, 1.0]  # client 1 holds weights 2 and 3 (mask(0.5) of [1, 2, 3, 4])


@pytest.mark.parametrize(
    "change, check",
    [
        ({"weights": torch.tensor([9.0, 0, 3.5, 4.5, 1, 1])}, "mask"),
        ({"weights": torch.tensor([0.0, 0, math.nan, 4.5, 1, 1])}, "finite"),
        ({"weights": torch.tensor([0.0, 0, 1e300, 4.5, 1, 1], dtype=torch.float64)}, "finite"),
        ({"weights": torch.zeros(5)}, "shape"),
        ({"weights": torch.tensor([0, 0, 3, 4, 1, 1])}, "dtype"),
        ({"weights": [0.0] * 6}, "type"),
        ({"version": 7}, "version"),
        ({"num_samples": -3}, "samples"),
        ({"grad_sq": torch.tensor([1.0, -1.0, 0.0, 0.0])}, "importance"),
    ],
)
def test_prfl_rejects_and_redispatches(change, check) -> None:
    pol = prfl()
    tasks = dispatches(pol.on_event(Start(0.0)))
    assert tasks[1].mask.tolist() == [False, False, True, True]
    before = pol.weights.clone()
    bad = dataclasses.replace(result(tasks[1], GOOD_MASKED), **change)
    acts = pol.on_event(ResultArrived(1.0, bad))
    (rej,) = rejections(acts)
    assert rej["check"] == check and rej["client"] == 1 and rej["task"] == tasks[1].task_id and rej["version"] == 0
    assert rej["reason"]
    # nothing of it was used
    assert pol.version == 0 and torch.equal(pol.weights, before) and len(pol.buffer) == 0
    assert pol.participation == [0, 0] and pol.rejected == [0, 1]
    assert tasks[1].task_id not in pol.task_masks and tasks[1].task_id not in pol.in_flight
    # the client was given a new task at once; it is the only dispatch
    again = dispatches(acts)
    assert list(again) == [1] and again[1].task_id != tasks[1].task_id and again[1].version == 0
    # and its next, good result is aggregated
    pol.on_event(ResultArrived(2.0, result(again[1], GOOD_MASKED)))
    assert pol.version == 1 and pol.participation == [0, 1]
    assert pol.weights.tolist() == [1.0, 2.0, 3.5, 4.5, 1.0, 1.0]


def test_driver_errors_still_raise() -> None:
    pol = prfl()
    tasks = dispatches(pol.on_event(Start(0.0)))
    with pytest.raises(ValueError, match="not in flight"):
        pol.on_event(ResultArrived(1.0, dataclasses.replace(result(tasks[1], GOOD_MASKED), task_id=99)))
    with pytest.raises(ValueError, match="names client 0, but it was sent to 1"):
        pol.on_event(ResultArrived(1.0, dataclasses.replace(result(tasks[1], GOOD_MASKED), client=0)))


def test_synchronous_prfl_aggregates_without_the_rejected_client() -> None:
    pol = prfl(synchronous=True)
    tasks = dispatches(pol.on_event(Start(0.0)))
    acts = pol.on_event(ResultArrived(1.0, result(tasks[1], [0, 0, 0, math.inf, 0, 0])))
    assert rejections(acts) and dispatches(acts) == {}  # waits: client 0 still training
    acts = pol.on_event(ResultArrived(2.0, result(tasks[0], [2, 2, 2, 2, 1, 1], n=1)))
    assert pol.version == 1 and pol.participation == [1, 0]
    assert pol.weights.tolist() == [2.0, 2.0, 2.0, 2.0, 1.0, 1.0]
    assert sorted(dispatches(acts)) == [0, 1]  # both in the next round, each once


def test_fedasync_rejects_and_redispatches() -> None:
    pol = build_policy("fedasync", ctx())
    tasks = dispatches(pol.on_event(Start(0.0)))
    acts = pol.on_event(ResultArrived(1.0, result(tasks[0], [math.nan] * 6)))
    assert rejections(acts)[0]["check"] == "finite"
    assert list(dispatches(acts)) == [0] and pol.version == 0 and torch.equal(pol.weights, W0)


def test_repeat_offenders_are_quarantined_and_an_all_bad_fleet_stops() -> None:
    pol = build_policy("fedasync", ctx((1, 1, 1)))
    tasks = dispatches(pol.on_event(Start(0.0)))
    # client 0 recovers in time: a good update resets its count
    for _ in range(4):
        tasks.update(dispatches(pol.on_event(ResultArrived(1.0, result(tasks[0], [math.nan] * 6)))))
    tasks.update(dispatches(pol.on_event(ResultArrived(1.0, result(tasks[0], [1.0] * 6)))))
    assert pol.reject_streak[0] == 0 and pol.version == 1
    # every client keeps sending NaN: each is quarantined after 5, then the run stops
    now, acts = 2.0, []
    while not pol.stopped:
        c = min(t.client for t in tasks.values() if t.task_id in pol.in_flight)
        acts = pol.on_event(ResultArrived(now, result(tasks.pop(c), [math.nan] * 6)))
        tasks.update(dispatches(acts))
        now += 1.0
    kinds = [a.kind if isinstance(a, Record) else type(a).__name__ for a in acts]
    assert kinds == ["rejected", "quarantined", "Stop"]
    assert "every client is quarantined after 5 rejected updates in a row (last: finite:" in acts[-1].reason
    assert pol.reject_streak == [5, 5, 5] and pol.rejected == [9, 5, 5] and pol.online == set()
    # a quarantined client that the driver reports idle gets another chance
    pol2 = build_policy("fedasync", ctx((1, 1)))
    t = dispatches(pol2.on_event(Start(0.0)))
    for _ in range(5):
        t.update(dispatches(pol2.on_event(ResultArrived(1.0, result(t[0], [math.nan] * 6)))))
    assert 0 not in pol2.online and pol2.in_flight and not pol2.stopped
    assert list(dispatches(pol2.on_event(ClientIdle(2.0, 0)))) == [0]


def test_norm_check_rejects_outliers_and_survives_a_checkpoint() -> None:
    pol = prfl(initial_densities=(1.0, 1.0), norm_factor=2.0, norm_window=2)
    tasks = dispatches(pol.on_event(Start(0.0)))
    start = W0.clone()
    # two accepted updates of norm 1 (the check is off until it has seen 2)
    acts = pol.on_event(ResultArrived(1.0, result(tasks[0], start + torch.tensor([1.0, 0, 0, 0, 0, 0]))))
    t0 = dispatches(acts)[0]
    acts = pol.on_event(ResultArrived(1.5, result(tasks[1], start + torch.tensor([0, 1.0, 0, 0, 0, 0]))))
    t1 = dispatches(acts)[1]
    assert pol.version == 2 and list(pol.recent_norms) == [1.0, 1.0]
    # a copy from a checkpoint makes the same decisions
    twin = prfl(initial_densities=(1.0, 1.0), norm_factor=2.0, norm_window=2)
    twin.load_state_dict(roundtrip(pol))
    assert list(twin.recent_norms) == [1.0, 1.0]
    for p in (pol, twin):
        sent = p.task_starts[t0.task_id]
        acts = p.on_event(ResultArrived(2.0, result(t0, sent + torch.tensor([0, 0, 3.0, 0, 0, 0]))))  # 3 > 2 * 1
        (rej,) = rejections(acts)
        assert rej["check"] == "norm" and "3 exceeds 2 x the median 1" in rej["reason"]
        acts = p.on_event(ResultArrived(2.5, result(t1, p.task_starts[t1.task_id] + torch.tensor([0, 0, 0, 0, 1.5, 0]))))
        assert not rejections(acts) and p.version == 3
    assert torch.equal(pol.weights, twin.weights) and pol.rejected == twin.rejected == [1, 0]
    # start weights are released with their tasks
    assert set(pol.task_starts) == set(pol.in_flight) and not pol.start_weights


def test_update_norms_are_taken_against_the_weights_each_task_started_from() -> None:
    """A recovery roll-back changes the model without a new version; a task dispatched after it
    started from the rolled-back weights, and its update is measured (and clipped) against them."""
    from prfl.policies.base import EvaluationDone, RequestEvaluation

    pol = prfl(initial_densities=(1.0, 1.0), recovery=True, interval=1, patience=1, norm_factor=100.0,
               norm_window=50, recovery_arming=False, client_scores=False, counting="server_steps")
    tasks = dispatches(pol.on_event(Start(0.0)))
    acts = pol.on_event(ResultArrived(1.0, result(tasks[0], W0 + 1)))
    t2 = dispatches(acts)[0]
    (ev,) = [a for a in acts if isinstance(a, RequestEvaluation)]
    pol.on_event(EvaluationDone(1.0, ev.tag, accuracy=0.5, loss=1.0))  # best so far: weights A
    a = pol.weights
    acts = pol.on_event(ResultArrived(2.0, result(tasks[1], W0 - 3)))
    (ev,) = [x for x in acts if isinstance(x, RequestEvaluation)]
    acts = pol.on_event(EvaluationDone(2.0, ev.tag, accuracy=0.1, loss=1.0))  # worse: roll back to A
    assert [(x.kind, x.data["scope"]) for x in acts if isinstance(x, Record)] == [("recovery", "server")]
    assert pol.weights is a and pol.version == 2
    pol.on_event(TaskFailed(3.0, 0, t2.task_id, "offline"))
    t4 = dispatches(pol.on_event(ClientIdle(4.0, 0)))[0]
    assert t4.version == 2 and t4.weights is a
    pol.on_event(ResultArrived(5.0, result(t4, a + torch.tensor([0.0, 0, 0, 0, 3, 4]))))
    assert pol.recent_norms[-1] == pytest.approx(5.0)


def test_a_restored_policy_publishes_the_same_pieces() -> None:
    """After a checkpoint, a dispatch without a model change costs what it would have cost."""
    pol = prfl()
    tasks = dispatches(pol.on_event(Start(0.0)))
    pol.on_event(ResultArrived(1.0, result(tasks[0], [2, 2, 2, 2, 1, 1], n=1)))  # new model; client 0 redispatched
    pol.on_event(TaskFailed(1.5, 1, tasks[1].task_id, "offline"))
    twin = prfl()
    twin.load_state_dict(roundtrip(pol))
    a = dispatches(pol.on_event(ClientIdle(2.0, 1)))[1]
    b = dispatches(twin.on_event(ClientIdle(2.0, 1)))[1]
    assert (a.download_bytes, a.server_egress_bytes, a.pieces) == (b.download_bytes, b.server_egress_bytes, b.pieces)
    assert a.server_egress_bytes == 0  # client 0's dispatch already published this version's pieces


# --------------------------------------------------------------------------- in the simulator
class NaNClient:
    """Executor wrapper: client ``bad`` always uploads NaN weights."""

    name = "nan"

    def __init__(self, inner: Any, bad: int) -> None:
        self.inner, self.bad = inner, bad

    def submit(self, job: Any) -> Future:
        fut = self.inner.submit(job)
        if job.client != self.bad:
            return fut
        out = fut.result()
        bad: Future = Future()
        bad.set_result(dataclasses.replace(out, weights=torch.full_like(out.weights, math.nan)))
        return bad

    def close(self) -> None:
        self.inner.close()


def test_simulator_records_rejections_and_keeps_training() -> None:
    from prfl.config import load_config
    from prfl.run import _executor, build_scenario, make_policy, make_simulation
    from prfl.sim.history import HistoryWriter

    cfg = load_config(None, [
        "seed=2", "data.dataset=digits", "data.num_clients=4", "model.name=mlp", "model.options={hidden: [16]}",
        "train.lr=0.1", "fleet.preset=uniform", "policy.name=prfl", "policy.options={interval: 10}",
        "sim.max_rounds=40", "sim.eval_every_rounds=20", "sim.checkpoint_every_rounds=null",
    ])
    sc = build_scenario(cfg)
    history = HistoryWriter(None)
    executor = NaNClient(_executor(sc), bad=2)
    try:
        summary = make_simulation(sc, make_policy(sc, cfg.policy), None, history, executor).run()
    finally:
        executor.close()
    rejected = [r for r in history.records if r["event"] == "rejected"]
    assert rejected and {r["client"] for r in rejected} == {2} and {r["check"] for r in rejected} == {"finite"}
    assert summary["server_rounds"] == 40 and summary["aggregated_rounds"][2] == 0
    assert summary["rejected_updates"][2] == len(rejected) == summary["local_rounds"][2]
    assert math.isfinite(summary["final_accuracy"]) and summary["final_accuracy"] > 0.5
