"""FedFix driven by hand-scripted events."""

from __future__ import annotations

import pytest
import torch

from policy_script import arrive, make_ctx, stops, task_of, tasks, updates, vec
from prfl.policies import FedFix, FedFixConfig
from prfl.policies.base import ClientIdle, SetTimer, Start, TimerFired


def _timers(actions):
    return [a for a in actions if isinstance(a, SetTimer)]


def test_timer_aggregation_with_period_weights():
    # p = n / sum(n) = (0.1, 0.3, 0.6)
    pol = FedFix(make_ctx((10, 30, 60)), FedFixConfig(dt=1.0))
    acts = pol.on_event(Start(0.0))
    assert [t.client for t in tasks(acts)] == [0, 1, 2]
    assert _timers(acts) == [SetTimer(1.0, "aggregate")]
    t0, t1, t2 = (task_of(acts, c) for c in range(3))

    assert arrive(pol, t0, 2.0, now=0.5) == []  # waits for the aggregation time
    assert pol.on_event(ClientIdle(0.6, 0)) == []  # finished clients wait, not redispatched
    assert arrive(pol, t1, 10.0, now=0.8) == []
    assert pol.version == 0 and torch.equal(pol.weights, vec(0.0))

    acts = pol.on_event(TimerFired(1.0, "aggregate"))
    # d_0 = ceil(0.5 / 1) * 0.1 = 0.1, d_1 = ceil(0.8 / 1) * 0.3 = 0.3; x = 0.1 * 2 + 0.3 * 10 = 3.2
    assert pol.weights.tolist() == pytest.approx([3.2] * 6, rel=1e-6)
    (upd,) = updates(acts)
    assert upd["clients"] == [0, 1] and upd["d"] == pytest.approx([0.1, 0.3]) and upd["round"] == 1
    assert [t.client for t in tasks(acts)] == [0, 1]
    assert all(t.version == 1 for t in tasks(acts))
    assert _timers(acts) == [SetTimer(2.0, "aggregate")]
    u0 = task_of(acts, 0)

    acts = pol.on_event(TimerFired(2.0, "aggregate"))  # nobody finished: no update
    assert updates(acts) == [] and tasks(acts) == [] and pol.version == 1
    assert _timers(acts) == [SetTimer(3.0, "aggregate")]

    arrive(pol, u0, 4.2, now=2.2)  # delta 1 (from 3.2), took 1.2: ceil -> 2 periods
    arrive(pol, t2, 5.0, now=2.5)  # delta 5 (from 0), took 2.5: ceil -> 3 periods
    acts = pol.on_event(TimerFired(3.0, "aggregate"))
    # d_0 = 2 * 0.1 = 0.2, d_2 = 3 * 0.6 = 1.8; x = 3.2 + 0.2 * 1 + 1.8 * 5 = 12.4
    assert pol.weights.tolist() == pytest.approx([12.4] * 6, rel=1e-6)
    (upd,) = updates(acts)
    assert upd["clients"] == [0, 2] and upd["d"] == pytest.approx([0.2, 1.8])
    assert upd["staleness"] == [0, 1]
    assert pol.version == 2 and pol.participation == [2, 1, 1]


def test_server_lr_and_exact_period_boundaries():
    pol = FedFix(make_ctx((10, 30)), FedFixConfig(dt=0.1, eta_g=0.5))
    acts = pol.on_event(Start(0.0))
    t0, t1 = task_of(acts, 0), task_of(acts, 1)
    arrive(pol, t0, 8.0, now=0.1)  # exactly one period
    acts = pol.on_event(TimerFired(0.1, "aggregate"))
    # d_0 = 1 * 0.25; x = 0 + 0.5 * 0.25 * 8 = 1
    assert pol.weights.tolist() == pytest.approx([1.0] * 6)
    t0 = task_of(acts, 0)
    arrive(pol, t0, 2.0, now=0.1 + 0.3)  # 0.30000000000000004 counts as 3 periods, not 4
    acts = pol.on_event(TimerFired(0.4, "aggregate"))
    assert updates(acts)[0]["d"] == pytest.approx([0.75])  # 3 * 0.25
    assert pol.weights.tolist() == pytest.approx([1.375] * 6)  # 1 + 0.5 * 0.75 * 1


def test_stop_after_max_rounds():
    pol = FedFix(make_ctx((10, 30), max_rounds=1), FedFixConfig(dt=1.0))
    acts = pol.on_event(Start(0.0))
    arrive(pol, task_of(acts, 0), 1.0, now=0.5)
    acts = pol.on_event(TimerFired(1.0, "aggregate"))
    assert len(stops(acts)) == 1 and tasks(acts) == [] and _timers(acts) == []
    assert pol.on_event(TimerFired(2.0, "aggregate")) == []


def test_errors():
    with pytest.raises(ValueError, match="dt"):
        FedFix(make_ctx((1, 1)))
    with pytest.raises(ValueError, match="dt must be > 0"):
        FedFixConfig(dt=0.0)
    pol = FedFix(make_ctx((1, 1)), FedFixConfig(dt=1.0))
    pol.on_event(Start(0.0))
    with pytest.raises(ValueError, match="aggregate"):
        pol.on_event(TimerFired(1.0, "other"))
