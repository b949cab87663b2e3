"""Event orders the fuzzer (``event_fuzz.py``) found breaking a policy, each as its minimal sequence."""

from __future__ import annotations

import pytest
import torch
from event_fuzz import CASES, NUM_PRUNABLE, PolicyFuzz, make_ctx, make_result, run_random

from prfl.policies import build_policy
from prfl.policies.base import (
    ClientIdle, Dispatch, Record, ResultArrived, SetTimer, Start, TimerFired,
)
from prfl.policies.prfl import SERVER_SCORE, WINDOW_TIMER


def dispatched(actions) -> list[int]:
    return [a.task.client for a in actions if isinstance(a, Dispatch)]


def records(actions, kind: str) -> list[dict]:
    return [a.data for a in actions if isinstance(a, Record) and a.kind == kind]


def tasks_by_client(actions) -> dict:
    return {a.task.client: a.task for a in actions if isinstance(a, Dispatch)}


# --------------------------------------------------------------------------- PR-FL: a client twice in one window
def test_prfl_client_back_while_its_result_waits_in_the_window_is_sent_one_task():
    """Shrunk from the stateful test: Start; client 0's result opens the window; ClientIdle(0)
    (it went offline and came back) dispatched it again, its second result joined the same
    window, and closing the window dispatched client 0 twice: RuntimeError "client 0 already
    holds task 5". Now the client waits for the window like every client whose result is in it."""
    pol = CASES["prfl"].build()
    tasks = tasks_by_client(pol.on_event(Start(0.0)))
    acts = pol.on_event(ResultArrived(0.0, make_result(tasks[0], "ok", 0)))
    assert acts == [SetTimer(0.5, WINDOW_TIMER)]
    assert pol.on_event(ClientIdle(0.0, 0)) == []  # before: a second task for client 0
    acts = pol.on_event(TimerFired(0.5, WINDOW_TIMER))
    assert dispatched(acts) == [0]
    assert records(acts, "server_update")[0]["clients"] == [0]


def test_prfl_offline_and_back_during_the_window_through_the_driver_model():
    """The issue's sequence with availability churn, checked by the fuzzer's invariants."""
    fz = PolicyFuzz(CASES["prfl"])
    fz.start()
    fz.arrive(0)  # client 0's result opens the window
    fz.offline(0)
    fz.online_(0)  # ClientIdle(0) while its result waits
    assert fz.holder(0) is None  # before: a second task, whose result joined the same window
    fz.fire(0)  # the window closes: one aggregation, one new task for client 0
    assert fz.holder(0) is not None and fz.policy.version == 1
    fz.finish()


# --------------------------------------------------------------------------- zero-sample results
def test_fedavg_round_of_zero_sample_results_is_rejected_not_raised():
    """Start; the only result of the round reports num_samples = 0. Before: ValueError "every
    result of the round reports num_samples = 0" after the task was already retired."""
    pol = CASES["fedavg"].build()
    tasks = tasks_by_client(pol.on_event(Start(0.0)))
    acts = []
    for i, t in enumerate(sorted(tasks.values(), key=lambda t: t.task_id)):
        acts = pol.on_event(ResultArrived(1.0 + i, make_result(t, "zero_samples", 0)))
        assert [r["check"] for r in records(acts, "rejected")] == ["samples"]
    assert pol.version == 0 and records(acts, "round_failed")
    assert torch.equal(pol.weights, CASES["fedavg"].build().weights)


def test_heterofl_zero_sample_result_is_rejected():
    for name in ("heterofl-width", "heterofl-mask"):
        pol = CASES[name].build()
        task = min(tasks_by_client(pol.on_event(Start(0.0))).values(), key=lambda t: t.task_id)
        acts = pol.on_event(ResultArrived(1.0, make_result(task, "zero_samples", 0)))
        assert [r["check"] for r in records(acts, "rejected")] == ["samples"], name


def test_prfl_window_of_zero_sample_results_is_rejected():
    """Start; client 0's result reports num_samples = 0; the window closes. Before: ValueError
    "every buffered client has num_samples == 0" from the buffer."""
    pol = CASES["prfl"].build()
    tasks = tasks_by_client(pol.on_event(Start(0.0)))
    acts = pol.on_event(ResultArrived(0.0, make_result(tasks[0], "zero_samples", 0)))
    assert [r["check"] for r in records(acts, "rejected")] == ["samples"] and dispatched(acts) == [0]
    assert not pol.window and len(pol.buffer) == 0


def test_policies_that_do_not_average_by_samples_accept_zero_samples():
    for name in ("fedasync", "fedbuff"):
        pol = CASES[name].build()
        task = tasks_by_client(pol.on_event(Start(0.0)))[0]
        acts = pol.on_event(ResultArrived(1.0, make_result(task, "zero_samples", 0)))
        assert not records(acts, "rejected"), name


# --------------------------------------------------------------------------- huge but finite updates
def huge(task, sign: float = 1.0):
    """A result whose every weight is 3e38 (finite in fp32, but two of them overflow a sum)."""
    res = make_result(task, "ok", 0)
    w = torch.full_like(res.weights, 3e38 * sign)
    if task.mask is not None:
        w[:NUM_PRUNABLE] *= task.mask
    res.weights = w
    return res


@pytest.mark.parametrize("mode", ["reaged", "frozen"])
def test_prfl_window0_overflowing_sum_keeps_the_weights_finite(mode):
    """Start; client 0 sends 3e38 everywhere (finite in fp32). Before: the buffer's fp32 sum
    c_0 W_0 (c_0 = n_0 = 5) overflowed and the global weights became inf, and so did every task.
    Re-aged staleness sums in fp32: the overflow is caught and the weights stay. Frozen staleness
    keeps float64 running sums, which do not overflow: the weights become the finite 3e38."""
    pol = build_policy("prfl", make_ctx(0), **{**CASES["prfl-window0"].options, "staleness_mode": mode})
    before = pol.weights.clone()
    tasks = tasks_by_client(pol.on_event(Start(0.0)))
    acts = pol.on_event(ResultArrived(1.0, huge(tasks[0])))
    assert pol.version == 1 and bool(torch.isfinite(pol.weights).all())
    if mode == "reaged":
        assert records(acts, "server_update")[0]["non_finite"] > 0
        assert torch.equal(pol.weights, before)
    else:
        assert torch.equal(pol.weights[:NUM_PRUNABLE], torch.full((NUM_PRUNABLE,), 3e38))
    assert dispatched(acts) == [0] and all(bool(torch.isfinite(a.task.weights).all()) for a in acts
                                           if isinstance(a, Dispatch))


def test_fedbuff_overflowing_buffer_keeps_the_weights():
    """FedBuff (k = 3): three deltas of about 3e38 sum to inf; the weights stay as they were."""
    pol = CASES["fedbuff"].build()
    before = pol.weights.clone()
    tasks = tasks_by_client(pol.on_event(Start(0.0)))
    acts = []
    for c in (0, 1, 2):
        acts = pol.on_event(ResultArrived(1.0 + c, huge(tasks[c])))
    assert records(acts, "server_update")[0]["non_finite"] == before.numel()
    assert pol.version == 1 and torch.equal(pol.weights, before)


def test_prfl_score_model_of_an_overflowing_buffer_is_the_global_model():
    """The recovery monitor's score model (the buffer's plain fp32 average) overflows with huge
    slots; the server then scores its own (finite) weights."""
    from prfl.policies.base import RequestEvaluation

    pol = build_policy("prfl", make_ctx(0), **{**CASES["prfl-window0"].options, "counting": "server_steps"})
    tasks = tasks_by_client(pol.on_event(Start(0.0)))
    pol.on_event(ResultArrived(1.0, huge(tasks[0])))
    acts = pol.on_event(ResultArrived(2.0, huge(tasks[1])))  # version 2: a control step (interval 2)
    (req,) = [a for a in acts if isinstance(a, RequestEvaluation) and a.tag == SERVER_SCORE]
    assert bool(torch.isfinite(req.weights).all()) and torch.equal(req.weights, pol.weights)


# --------------------------------------------------------------------------- PR-FL synchronous: a round that all failed
def test_prfl_sync_round_whose_tasks_all_fail_starts_the_next_round():
    """Shrunk from the stateful test: Start (4 tasks); client 1 goes offline (task 1 fails);
    tasks 2 and 3 fail; client 1 comes back (ClientIdle: it waits for the next round, task 0
    being in flight); task 0 fails. Before: nothing was dispatched, and client 1, online and free,
    waited for ever (the Flower driver does not repeat ClientIdle)."""
    from prfl.policies.base import TaskFailed

    pol = CASES["prfl-sync"].build()
    tasks = tasks_by_client(pol.on_event(Start(0.0)))
    for c in (1, 2, 3):
        assert pol.on_event(TaskFailed(0.0, c, tasks[c].task_id, "offline")) == []
    assert pol.on_event(ClientIdle(0.0, 1)) == []  # joins at the next round
    acts = pol.on_event(TaskFailed(0.0, 0, tasks[0].task_id, "timeout"))
    assert dispatched(acts) == [1] and pol.version == 0


def test_prfl_sync_stall_through_the_driver_model():
    fz = PolicyFuzz(CASES["prfl-sync"])
    fz.start()
    fz.offline(1)
    fz.fail_task(2)
    fz.fail_task(3)
    fz.online_(1)
    fz.fail_task(0)  # before: FuzzFailure "stall: clients [1] are online and free ..."
    fz.finish()
    assert fz.holder(1) is not None


def test_a_quarantined_clients_score_asked_in_the_same_event_is_of_its_model_as_it_was():
    """prfl-sync seed 281 of the fuzz run: a rejected result closes a synchronous round, whose
    control step asks for every buffered client's score (each model built when evaluated), and the
    rejection then quarantines the client and removes its slot. Before: building that client's
    model found its slot gone (AssertionError). Now the request is built before the slot goes, so
    it evaluates the model as it was when the score was asked for, as it did before requests
    were built on demand."""
    fz = run_random(CASES["prfl-sync"], 281, steps=60)
    assert fz.counts["arrive:nan"] >= 1  # the sequence holds the rejected result
