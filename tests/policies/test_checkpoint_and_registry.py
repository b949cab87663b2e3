"""All baselines: checkpoint round trip mid-run, stopping on a budget, the registry."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from policy_script import MiniLoop, checkpoint, make_ctx
from prfl.policies import (
    POLICIES,
    FedAsync,
    FedAvg,
    FedAvgConfig,
    Policy,
    build_policy,
    register_policy,
)
from prfl.policies.base import Start, Stop

OPTIONS = {
    "fedavg": {"fraction": 0.5, "min_clients": 1},
    "fedasync": {"alpha": 0.5, "staleness": "hinge", "a": 0.5, "b": 1.0},
    "fedbuff": {"k": 3, "server_lr": 0.8},
    "fedfix": {"dt": 1.5, "eta_g": 0.9},
}
DURATIONS = [1.0, 1.7, 2.9, 4.3]
FAIL = frozenset({5, 11})  # a few tasks fail; their clients come back later


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_checkpoint_midway_resumes_identically(name):
    ctx = make_ctx((5, 10, 15, 20), seed=3)
    a = build_policy(name, ctx, **OPTIONS[name])
    loop_a = MiniLoop(a, DURATIONS, FAIL)
    loop_a.feed(Start(0.0))
    loop_a.run(23)
    assert a.version > 0

    b = build_policy(name, ctx, **OPTIONS[name])
    b.load_state_dict(checkpoint(a))
    loop_b = loop_a.clone_for(b)
    loop_a.log.clear()
    loop_a.run(40)
    loop_b.run(40)

    assert loop_a.log and loop_a.log == loop_b.log
    assert torch.equal(a.weights, b.weights)
    assert a.version == b.version and a.participation == b.participation
    assert a.version > 3


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_stops_after_max_rounds_and_goes_quiet(name):
    ctx = make_ctx((5, 10, 15, 20), max_rounds=3)
    pol = build_policy(name, ctx, **OPTIONS[name])
    loop = MiniLoop(pol, DURATIONS, FAIL)
    loop.feed(Start(0.0))
    loop.run(500)
    kinds = [entry[0] for entry in loop.log]
    assert kinds.count("Stop") == 1 and kinds[-1] == "Stop"
    assert sum(1 for e in loop.log if e[0] == "Record" and "server_update" in e[1]) == 3
    assert pol.version == 3
    assert not loop.queue or all(pol.on_event(ev) == [] for _, _, ev in loop.queue)


def test_stop_at_start_when_budget_is_zero():
    pol = FedAvg(make_ctx((1, 1), max_rounds=0))
    assert pol.on_event(Start(0.0)) == [Stop("reached max_rounds=0")]


def test_start_weights_are_released():
    pol = build_policy("fedbuff", make_ctx((5, 10, 15, 20)), k=2)
    loop = MiniLoop(pol, DURATIONS)
    loop.feed(Start(0.0))
    loop.run(60)
    in_flight_versions = {t.version for t in pol.in_flight.values()}
    assert set(pol.start_weights) == in_flight_versions


def test_registry_names_and_errors():
    assert set(POLICIES) >= {"fedavg", "fedasync", "fedbuff", "fedfix"}
    ctx = make_ctx()
    pol = build_policy("fedavg", ctx, fraction=0.5)
    assert isinstance(pol, FedAvg) and pol.config == FedAvgConfig(fraction=0.5)
    assert isinstance(build_policy("fedasync", ctx), FedAsync)
    with pytest.raises(ValueError, match="unknown policy 'fedprox'; valid policies: fedasync, fedavg, fedbuff, fedfix"):
        build_policy("fedprox", ctx)
    with pytest.raises(ValueError, match="unknown option 'lr' for policy 'fedbuff'; valid options: k, server_lr"):
        build_policy("fedbuff", ctx, lr=0.1)
    with pytest.raises(ValueError, match="policy 'fedfix' needs option 'dt'"):
        build_policy("fedfix", ctx)
    with pytest.raises(ValueError, match="policy 'fedasync': option alpha must be <= 1"):
        build_policy("fedasync", ctx, alpha=2)
    with pytest.raises(ValueError, match="option k must be an integer"):
        build_policy("fedbuff", ctx, k="10")


def test_register_policy_extends_the_registry():
    @dataclasses.dataclass(frozen=True)
    class EchoConfig:
        fraction: float = 1.0

    class Echo(Policy):
        name = "echo"
        config_cls = EchoConfig

        def __init__(self, ctx, config=None):  # noqa: D107
            super().__init__(ctx)
            self.config = config

    with pytest.raises(TypeError, match="config_cls"):
        register_policy("no-config", Policy)
    register_policy("echo-test", Echo)
    try:
        echo = build_policy("echo-test", make_ctx(), fraction=0.5)
        assert isinstance(echo, Echo) and echo.config == EchoConfig(fraction=0.5)
        with pytest.raises(ValueError, match="already registered"):
            register_policy("echo-test", Echo)
    finally:
        del POLICIES["echo-test"]


def test_prfl_resumes_a_checkpoint_that_kept_its_piece_ledger_apart():
    """Checkpoints of earlier versions kept PR-FL's piece holdings as separate entries (held,
    held_index, published_index, publisher, structure_key, structure_id): they still resume
    into the same run."""
    from event_fuzz import CASES  # PR-FL on the tiny model (it needs the model's prunable layers)

    case = CASES["prfl"]
    a = case.build(3)
    loop_a = MiniLoop(a, DURATIONS, FAIL)
    loop_a.feed(Start(0.0))
    loop_a.run(23)
    state = checkpoint(a)
    ledger = state.pop("ledger")
    assert any(ledger["values"]) and ledger["published_index"]  # pieces were handed out
    state.update(held=ledger["values"], held_index=ledger["index"], publisher=ledger["publisher"],
                 published_index=ledger["published_index"], structure_id=ledger["structure"],
                 structure_key=ledger["structure_key"])
    b = case.build(3)
    b.load_state_dict(state)
    loop_b = loop_a.clone_for(b)
    loop_a.log.clear()
    loop_a.run(40)
    loop_b.run(40)
    assert loop_a.log and loop_a.log == loop_b.log and torch.equal(a.weights, b.weights)
