"""FedBuff driven by hand-scripted events."""

from __future__ import annotations

import pytest
import torch

from policy_script import arrive, make_ctx, stops, task_of, updates, vec
from prfl.policies import FedBuff, FedBuffConfig
from prfl.policies.base import Start


def test_k2_buffer_with_staleness():
    pol = FedBuff(make_ctx((10, 20)), FedBuffConfig(k=2, server_lr=1.0))
    acts = pol.on_event(Start(0.0))
    slow, fast = task_of(acts, 1), task_of(acts, 0)

    # Client 0 returns six times with deltas 2, 4, 2, 4, 2, 4, all fresh (tau = 0).
    expected = [0.0, 3.0, 3.0, 6.0, 6.0, 9.0]  # after each arrival; x += (2 + 4) / 2 per buffer
    for i, delta in enumerate([2.0, 4.0] * 3):
        start = fast.weights
        acts = arrive(pol, fast, start + delta)
        assert torch.equal(pol.weights, vec(expected[i]))
        fast = task_of(acts, 0)
        # half-full buffer: redispatched on the same version; full: on the new one
        assert fast.version == (i + 1) // 2
    assert pol.version == 3 and torch.equal(slow.weights, vec(0.0))

    # Client 1 started from version 0 (weights 0): delta 12, tau = 3, s = 1/sqrt(4) = 0.5.
    acts = arrive(pol, slow, 12.0)
    assert updates(acts) == [] and torch.equal(pol.weights, vec(9.0))
    assert task_of(acts, 1).version == 3
    # Client 0 (from version 3, weights 9) returns 11: delta 2, tau 0.
    acts = arrive(pol, fast, 11.0)
    (upd,) = updates(acts)
    assert torch.equal(pol.weights, vec(13.0))  # 9 + (0.5 * 12 + 2) / 2
    assert upd["round"] == 4 and upd["clients"] == [1, 0] and upd["staleness"] == [3, 0]
    assert pol.participation == [7, 1]


def test_irrational_staleness_and_server_lr():
    pol = FedBuff(make_ctx((10, 20), init=1.0), FedBuffConfig(k=1, server_lr=0.5))
    acts = pol.on_event(Start(0.0))
    t0, t1 = task_of(acts, 0), task_of(acts, 1)
    arrive(pol, t0, 5.0)  # delta 4, tau 0: x = 1 + 0.5 * 4 = 3
    assert torch.equal(pol.weights, vec(3.0))
    arrive(pol, t1, 9.0)  # delta 8 from weights 1, tau 1: x = 3 + 0.5 * 8 / sqrt(2) = 5.828427...
    assert pol.weights.tolist() == pytest.approx([5.8284271] * 6, rel=1e-6)


def test_stop_after_max_rounds():
    pol = FedBuff(make_ctx((10, 20), max_rounds=1), FedBuffConfig(k=2))
    acts = pol.on_event(Start(0.0))
    t0, t1 = task_of(acts, 0), task_of(acts, 1)
    acts = arrive(pol, t0, 2.0)
    assert stops(acts) == [] and task_of(acts, 0).version == 0
    acts = arrive(pol, t1, 2.0)
    assert [type(a).__name__ for a in acts] == ["Record", "Stop"]


def test_config_validation():
    with pytest.raises(ValueError, match="k must be an integer"):
        FedBuffConfig(k=2.5)
    with pytest.raises(ValueError, match="k must be >= 1"):
        FedBuffConfig(k=0)
    with pytest.raises(ValueError, match="server_lr"):
        FedBuffConfig(server_lr=0.0)
