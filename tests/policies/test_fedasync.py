"""FedAsync driven by hand-scripted events."""

from __future__ import annotations

import pytest
import torch

from policy_script import MiniLoop, arrive, checkpoint, make_ctx, stops, task_of, tasks, updates, vec
from prfl.policies import FedAsync, FedAsyncConfig
from prfl.policies.base import ClientIdle, SetTimer, Start, StepTiming, TaskFailed, TimerFired
from prfl.policies.fedasync import STEP_TIMER


def _three_fresh_updates(pol: FedAsync):
    """Client 0 returns three times while client 1 trains on version 0; weights end at 6."""
    acts = pol.on_event(Start(0.0))
    slow = task_of(acts, 1)
    fast = task_of(acts, 0)
    for value, expected in ((4.0, 2.0), (6.0, 4.0), (8.0, 6.0)):  # tau = 0, alpha_t = 0.5
        acts = arrive(pol, fast, value)
        assert torch.equal(pol.weights, vec(expected))
        fast = task_of(acts, 0)
        assert fast.version == pol.version
    return slow


@pytest.mark.parametrize(
    "kind, a, b, alpha_t, expected",
    [
        ("const", 0.6, 2.0, 0.5, 8.0),  # 0.5 * 6 + 0.5 * 10
        ("poly", 0.5, 2.0, 0.25, 7.0),  # alpha_t = 0.5 * (3 + 1)^-0.5; 0.75 * 6 + 0.25 * 10
        ("hinge", 0.5, 2.0, 1 / 3, 22 / 3),  # alpha_t = 0.5 / (0.5 * (3 - 2) + 1); 6 * 2/3 + 10/3
        ("hinge", 0.5, 3.0, 0.5, 8.0),  # tau = 3 <= b: no discount
    ],
)
def test_staleness_discounts_the_mixing_weight(kind, a, b, alpha_t, expected):
    pol = FedAsync(make_ctx((10, 20)), FedAsyncConfig(alpha=0.5, staleness=kind, a=a, b=b))
    slow = _three_fresh_updates(pol)
    acts = arrive(pol, slow, 10.0)  # version 3 - 0: tau = 3
    (upd,) = updates(acts)
    assert upd["staleness"] == [3] and upd["clients"] == [1] and upd["round"] == 4
    assert upd["alpha_t"] == pytest.approx(alpha_t)
    assert pol.weights.tolist() == pytest.approx([expected] * 6, rel=1e-6)
    (t,) = tasks(acts)
    assert t.client == 1 and t.version == 4
    assert pol.participation == [3, 1]


def test_failure_then_idle_redispatches():
    pol = FedAsync(make_ctx((10, 20)))
    acts = pol.on_event(Start(0.0))
    t1 = task_of(acts, 1)
    assert pol.on_event(TaskFailed(1.0, 1, t1.task_id, "offline")) == []
    assert pol.on_event(ClientIdle(1.0, 0)) == []  # client 0 is busy
    acts = pol.on_event(ClientIdle(2.0, 1))
    (t,) = tasks(acts)
    assert t.client == 1 and t.version == 0 and t.task_id != t1.task_id


def test_stop_after_max_rounds_and_no_more_dispatch():
    pol = FedAsync(make_ctx((10, 20), max_rounds=2))
    acts = pol.on_event(Start(0.0))
    t0, t1 = task_of(acts, 0), task_of(acts, 1)
    assert stops(arrive(pol, t0, 1.0)) == []
    acts = arrive(pol, t1, 1.0)
    assert len(stops(acts)) == 1 and tasks(acts) == [] and pol.version == 2
    assert pol.on_event(ClientIdle(3.0, 1)) == []


def test_stop_at_max_time():
    pol = FedAsync(make_ctx((10, 20), max_time=5.0))
    acts = pol.on_event(Start(0.0))
    arrive(pol, task_of(acts, 0), 1.0, now=4.0)
    acts = arrive(pol, task_of(acts, 1), 1.0, now=5.0)
    assert [type(a).__name__ for a in acts] == ["Stop"] and "max_time" in acts[0].reason
    assert pol.version == 1


def test_config_validation():
    with pytest.raises(ValueError, match="alpha"):
        FedAsyncConfig(alpha=1.5)
    with pytest.raises(ValueError, match="staleness must be one of const, poly, hinge"):
        FedAsyncConfig(staleness="exp")
    with pytest.raises(ValueError, match="^a must"):
        FedAsyncConfig(a=-0.1)


# ---------------------------------------------------------------------------- reference steps
def _reference_ctx(num_samples=(10, 20, 30), **kw):
    # every download counts 100 B on a 1,000 B/s server uplink: a step that sent a model lasts
    # 100 / 1,000 + 0.1 = 0.2 s; a step that sent nothing the 0.1 s margin
    timing = StepTiming(server_up_bps=1_000.0, download_bytes=lambda task: 100)
    return make_ctx(num_samples, step_timing=timing, **kw)


def test_reference_steps_merge_one_arrival_per_step_round_robin_by_hand():
    pol = FedAsync(_reference_ctx(), FedAsyncConfig(steps="reference", staleness="poly", a=0.6))
    acts = pol.on_event(Start(0.0))
    t0, t1, t2 = (task_of(acts, c) for c in range(3))
    # client 2 arrives at 0.05: nothing is merged yet; the step that started at 0 closes at 0.2
    acts = arrive(pol, t2, 3.0, now=0.05)
    assert acts == [SetTimer(pytest.approx(0.2), STEP_TIMER)] and pol.version == 0
    assert arrive(pol, t1, 2.0, now=0.1) == []  # waits for the same close
    # close at 0.2: round robin from client 0 picks client 1 (then 2). Its staleness weight
    # s_1 = (0 + 1)^-0.6 = 1 is the only one so far: p = 1, the model becomes client 1's.
    acts = pol.on_event(TimerFired(0.2, STEP_TIMER))
    (upd,) = updates(acts)
    assert upd["clients"] == [1] and upd["staleness"] == [0] and upd["alpha_t"] == pytest.approx(1.0)
    assert torch.equal(pol.weights, vec(2.0))
    t1 = task_of(acts, 1)
    assert t1.version == 1 and [a for a in acts if isinstance(a, SetTimer)] == [SetTimer(pytest.approx(0.4), STEP_TIMER)]
    # close at 0.4 (0.2 + 0.2: client 1 was sent a model): client 2 waited; tau = 1 - 0 = 1,
    # s_2 = 2^-0.6, p = s_2 / (s_1 + s_2) = 2^-0.6 / (1 + 2^-0.6) = 0.3975
    acts = pol.on_event(TimerFired(0.4, STEP_TIMER))
    (upd,) = updates(acts)
    p = 2**-0.6 / (1 + 2**-0.6)
    assert upd["clients"] == [2] and upd["staleness"] == [1] and upd["alpha_t"] == pytest.approx(p)
    assert pol.weights.tolist() == pytest.approx([2.0 + p * (3.0 - 2.0)] * 6, rel=1e-6)
    assert not [a for a in acts if isinstance(a, SetTimer)]  # nothing waits
    # client 0 (version 0) arrives at 1.0: the step of 0.4 closed at 0.6, empty steps of 0.1 s
    # follow, so 1.0 is a boundary; tau = 2, s_0 = 3^-0.6, p = s_0 / (1 + 2^-0.6 + 3^-0.6)
    before = pol.weights.clone()
    acts = arrive(pol, t0, 5.0, now=1.0)
    assert acts == [SetTimer(pytest.approx(1.0), STEP_TIMER)]
    acts = pol.on_event(TimerFired(1.0, STEP_TIMER))
    p0 = 3**-0.6 / (1 + 2**-0.6 + 3**-0.6)
    assert updates(acts)[0]["alpha_t"] == pytest.approx(p0)
    assert torch.allclose(pol.weights, before + p0 * (vec(5.0) - before))
    assert pol.participation == [1, 1, 1]


def test_reference_steps_take_the_next_client_after_the_last_merged_one():
    pol = FedAsync(_reference_ctx((1, 1, 1, 1)), FedAsyncConfig(steps="reference"))
    acts = pol.on_event(Start(0.0))
    ts = {c: task_of(acts, c) for c in range(4)}
    for c in (3, 0, 2):
        arrive(pol, ts[c], float(c), now=0.1)
    merged = []
    for k in range(3):
        acts = pol.on_event(TimerFired(0.2 * (k + 1), STEP_TIMER))
        merged += updates(acts)[0]["clients"]
    # round robin from 0: 0, then from 1: 2, then from 3: 3
    assert merged == [0, 2, 3]


def test_a_waiting_client_is_not_given_work_when_it_comes_back():
    pol = FedAsync(_reference_ctx((1, 1)), FedAsyncConfig(steps="reference"))
    acts = pol.on_event(Start(0.0))
    arrive(pol, task_of(acts, 1), 1.0, now=0.05)
    assert pol.on_event(ClientIdle(0.1, 1)) == []
    acts = pol.on_event(TimerFired(0.2, STEP_TIMER))
    assert [t.client for t in tasks(acts)] == [1]


def test_reference_steps_need_the_simulators_step_timing():
    with pytest.raises(ValueError, match="sim.accounting: reference"):
        FedAsync(make_ctx((10, 20)), FedAsyncConfig(steps="reference"))
    with pytest.raises(ValueError, match="steps must be one of arrival, reference"):
        FedAsyncConfig(steps="windowed")  # type: ignore[arg-type]


def test_reference_steps_checkpoint_midway_resumes_identically():
    ctx = _reference_ctx((5, 10, 15, 20), seed=3)
    a = FedAsync(ctx, FedAsyncConfig(steps="reference", staleness="hinge", a=0.5, b=1.0))
    loop_a = MiniLoop(a, [0.03, 0.05, 0.11, 0.13], frozenset({5, 11}))
    loop_a.feed(Start(0.0))
    loop_a.run(23)
    assert a.version > 0 and a.waiting  # a result waits for its step at the checkpoint
    b = FedAsync(ctx, FedAsyncConfig(steps="reference", staleness="hinge", a=0.5, b=1.0))
    b.load_state_dict(checkpoint(a))
    loop_b = loop_a.clone_for(b)
    loop_a.log.clear()
    loop_a.run(60)
    loop_b.run(60)
    assert loop_a.log and loop_a.log == loop_b.log
    assert torch.equal(a.weights, b.weights) and a.version == b.version and a.version > 5
