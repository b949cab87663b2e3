"""FedAsync driven by hand-scripted events."""

from __future__ import annotations

import pytest
import torch

from policy_script import arrive, make_ctx, stops, task_of, tasks, updates, vec
from prfl.policies import FedAsync, FedAsyncConfig
from prfl.policies.base import ClientIdle, Start, TaskFailed


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
