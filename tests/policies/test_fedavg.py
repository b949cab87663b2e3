"""FedAvg driven by hand-scripted events."""

from __future__ import annotations

import pytest
import torch

from policy_script import arrive, make_ctx, stops, task_of, tasks, updates, vec
from prfl.policies import FedAvg, FedAvgConfig
from prfl.policies.base import ClientIdle, Record, Start, TaskFailed


def test_full_cohort_waits_for_all_and_weights_by_samples():
    pol = FedAvg(make_ctx((10, 20, 30)), FedAvgConfig(fraction=1.0))
    acts = pol.on_event(Start(0.0))
    assert [t.client for t in tasks(acts)] == [0, 1, 2]
    assert all(t.version == 0 and t.mask is None and t.density == 1.0 for t in tasks(acts))
    t0, t1, t2 = (task_of(acts, c) for c in range(3))

    assert arrive(pol, t0, 1.0, now=1.0) == []
    assert arrive(pol, t1, 4.0, now=2.0) == []
    assert pol.version == 0 and torch.equal(pol.weights, vec(0.0))  # still waiting for client 2

    acts = arrive(pol, t2, 7.0, now=3.0)
    # (10*1 + 20*4 + 30*7) / 60 = 300 / 60 = 5
    assert torch.equal(pol.weights, vec(5.0))
    assert pol.version == 1 and pol.participation == [1, 1, 1]
    (upd,) = updates(acts)
    assert upd["round"] == 1 and upd["clients"] == [0, 1, 2] and upd["staleness"] == [0, 0, 0]
    nxt = tasks(acts)
    assert [t.client for t in nxt] == [0, 1, 2]
    assert all(t.version == 1 and torch.equal(t.weights, vec(5.0)) for t in nxt)
    # the weights handed out in round 0 were not modified
    assert torch.equal(t0.weights, vec(0.0))


def test_failed_client_is_left_out_and_rejoins_next_round():
    pol = FedAvg(make_ctx((10, 20, 30)))
    acts = pol.on_event(Start(0.0))
    t0, t1, t2 = (task_of(acts, c) for c in range(3))
    assert pol.on_event(TaskFailed(1.0, 1, t1.task_id, "offline")) == []
    arrive(pol, t0, 1.0, now=2.0)
    acts = arrive(pol, t2, 7.0, now=3.0)
    # (10*1 + 30*7) / 40 = 220 / 40 = 5.5
    assert torch.equal(pol.weights, vec(5.5))
    assert updates(acts)[0]["failed"] == [1]
    assert pol.participation == [1, 0, 1]
    assert [t.client for t in tasks(acts)] == [0, 2]  # client 1 is offline

    assert pol.on_event(ClientIdle(3.5, 1)) == []  # mid-round: waits for the next cohort
    u0, u2 = task_of(acts, 0), task_of(acts, 2)
    arrive(pol, u0, 2.0, now=4.0)
    acts = arrive(pol, u2, 2.0, now=5.0)
    assert torch.equal(pol.weights, vec(2.0))
    assert [t.client for t in tasks(acts)] == [0, 1, 2]


def test_round_where_all_fail_keeps_weights_and_resamples():
    pol = FedAvg(make_ctx((10, 20)))
    acts = pol.on_event(Start(0.0))
    t0, t1 = task_of(acts, 0), task_of(acts, 1)
    pol.on_event(TaskFailed(1.0, 0, t0.task_id, "crash"))
    acts = pol.on_event(TaskFailed(1.0, 1, t1.task_id, "crash"))
    assert pol.version == 0 and torch.equal(pol.weights, vec(0.0))
    assert [a.kind for a in acts if isinstance(a, Record)] == ["round_failed"]
    assert tasks(acts) == []  # both are offline
    acts = pol.on_event(ClientIdle(2.0, 1))
    (t,) = tasks(acts)
    assert t.client == 1 and t.version == 0
    acts = arrive(pol, t, 3.0, now=3.0)
    assert torch.equal(pol.weights, vec(3.0)) and pol.version == 1


def test_cohort_fraction_is_deterministic_and_varies_by_round():
    ctx = make_ctx(tuple([5] * 10), seed=7)
    cohorts = []
    for _ in range(2):
        pol = FedAvg(ctx, FedAvgConfig(fraction=0.3))
        acts = pol.on_event(Start(0.0))
        run = []
        for _ in range(6):
            ts = tasks(acts)
            run.append([t.client for t in ts])
            for t in ts:
                acts = arrive(pol, t, 1.0)
        cohorts.append(run)
    assert cohorts[0] == cohorts[1]  # same seed, same cohorts
    assert all(len(c) == 3 and len(set(c)) == 3 for c in cohorts[0])  # ceil(0.3 * 10) = 3
    assert len({tuple(c) for c in cohorts[0]}) > 1  # a fresh draw each round


def test_min_clients_sets_cohort_floor_and_waits_for_enough_clients():
    pol = FedAvg(make_ctx(tuple([5] * 10)), FedAvgConfig(fraction=0.1, min_clients=2))
    assert len(tasks(pol.on_event(Start(0.0)))) == 2  # max(ceil(0.1 * 10), 2)

    pol = FedAvg(make_ctx((10, 20, 30)), FedAvgConfig(fraction=1.0, min_clients=3))
    acts = pol.on_event(Start(0.0))
    t0, t1, t2 = (task_of(acts, c) for c in range(3))
    pol.on_event(TaskFailed(1.0, 1, t1.task_id, "offline"))
    arrive(pol, t0, 1.0)
    acts = arrive(pol, t2, 1.0)
    assert pol.version == 1 and tasks(acts) == []  # only 2 clients online < min_clients
    acts = pol.on_event(ClientIdle(5.0, 1))
    assert [t.client for t in tasks(acts)] == [0, 1, 2]


def test_stop_after_max_rounds():
    pol = FedAvg(make_ctx((10, 20), max_rounds=2))
    acts = pol.on_event(Start(0.0))
    for expected_stop in (False, True):
        for t in tasks(acts)[:-1]:
            arrive(pol, t, 1.0)
        acts = arrive(pol, tasks(acts)[-1], 1.0)
        assert bool(stops(acts)) is expected_stop
    assert pol.version == 2 and tasks(acts) == []
    assert "max_rounds=2" in stops(acts)[0].reason
    assert pol.on_event(ClientIdle(9.0, 0)) == []


def test_bad_config_and_bad_results():
    with pytest.raises(ValueError, match="fraction"):
        FedAvgConfig(fraction=0.0)
    with pytest.raises(ValueError, match="min_clients"):
        FedAvgConfig(min_clients=0)
    with pytest.raises(ValueError, match="min_clients"):
        FedAvg(make_ctx((1, 1)), FedAvgConfig(min_clients=3))
    pol = FedAvg(make_ctx((10, 20)))
    with pytest.raises(RuntimeError, match="before Start"):
        pol.on_event(ClientIdle(0.0, 0))
    acts = pol.on_event(Start(0.0))
    t0, t1 = task_of(acts, 0), task_of(acts, 1)
    # driver errors raise and leave the policy as it was
    with pytest.raises(ValueError, match="names client 1, but it was sent to 0"):
        pol.on_event(TaskFailed(1.0, 1, t0.task_id, "mixed up"))
    # a negative sample count is a bad update like any other: rejected, its task failed
    acts = arrive(pol, t0, 1.0, num_samples=-1)
    assert [a.data["check"] for a in acts if isinstance(a, Record) and a.kind == "rejected"] == ["samples"]
    with pytest.raises(ValueError, match="not in flight"):
        arrive(pol, t0, 1.0)  # its task is gone
    acts = arrive(pol, t1, 4.0)
    assert torch.equal(pol.weights, vec(4.0))  # client 1 alone
    t0, t1 = task_of(acts, 0), task_of(acts, 1)
    arrive(pol, t0, 1.0)
    with pytest.raises(ValueError, match="not in flight"):
        arrive(pol, t0, 1.0)  # the same task twice
    acts = arrive(pol, t1, 4.0)
    assert torch.equal(pol.weights, vec(3.0))  # (10 * 1 + 20 * 4) / 30

    # malformed results are rejected: recorded, never aggregated, their task counts as failed
    for bad, check in ((torch.zeros(3), "shape"), (float("nan"), "finite")):
        t0, t1 = task_of(acts, 0), task_of(acts, 1)
        before = pol.weights
        acts = arrive(pol, t0, bad)
        (rej,) = [a.data for a in acts if isinstance(a, Record) and a.kind == "rejected"]
        assert rej["client"] == 0 and rej["task"] == t0.task_id and rej["check"] == check
        assert tasks(acts) == [] and updates(acts) == []
        assert torch.equal(pol.weights, before)  # waits for client 1; nothing of client 0 is used
        acts = arrive(pol, t1, 5.0)
        (upd,) = updates(acts)
        assert upd["clients"] == [1] and upd["failed"] == [0]
        assert torch.equal(pol.weights, vec(5.0))
        assert [t.client for t in tasks(acts)] == [0, 1]  # the rejected client is in the next cohort
    assert pol.rejected == [3, 0]


def test_one_arrival_is_taken_bit_for_bit():
    pol = FedAvg(make_ctx((7, 20)))
    acts = pol.on_event(Start(0.0))
    pol.on_event(TaskFailed(1.0, 1, task_of(acts, 1).task_id, "offline"))
    w = torch.tensor([0.3, 0.7, 3.3, 0.1, 5.1, 7.7])  # 3.3 * 7 / 7 is off by one ulp in float32
    arrive(pol, task_of(acts, 0), w)
    assert torch.equal(pol.weights, w)
