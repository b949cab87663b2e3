"""The virtual clock of prfl.sim.engine.Simulation on a hand-computed two-client fleet.

Every time asserted here is derived by hand in the comments. The fleet has sigma = 0 everywhere,
so every task sees exactly its profile's mean speeds, and ``step_flops`` is a constant, so a task's
compute time is ``local_steps * STEP_FLOPS / compute_flops`` exactly. Local training really runs
(InlineExecutor, a tiny MLP on digits), but its result has no influence on the clock.

The reference scenario (used by most tests):

* clients: 0 = (compute 100 FLOP/s, down 8 B/s, up 4 B/s), 1 = (compute 25, down 6, up 3);
* server: up 10 B/s (shared by client downloads), down 5 B/s (shared by client uploads);
* tasks: client 0 downloads 20 B and uploads 24 B, client 1 downloads 32 B and uploads 10 B;
* training: 2 local steps of 50 FLOPs -> 100 FLOPs per task, i.e. 1 s on client 0, 4 s on 1.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch

from prfl.client.trainer import TrainConfig
from prfl.data import load_dataset
from prfl.models import build_model
from prfl.params import ParamLayout
from prfl.policies.base import (
    Action,
    ClientIdle,
    Dispatch,
    EvaluationDone,
    Event,
    Policy,
    PolicyContext,
    ResultArrived,
    SetTimer,
    Start,
    Stop,
    TaskFailed,
    TaskSpec,
    TimerFired,
)
from prfl.sim.devices import DeviceProfile, Fleet, ServerProfile
from prfl.sim.engine import SimSettings, Simulation
from prfl.sim.executors import InlineExecutor, WorkerSpec
from prfl.runtime.history import HistoryWriter, observed_transfers

REL = 1e-9
STEP_FLOPS = 50.0
LOCAL_STEPS = 2
DOWN = {0: 20, 1: 32}  # bytes each client downloads per task
UP = {0: 24, 1: 10}  # bytes each client uploads per task


def approx(x: float) -> Any:
    return pytest.approx(x, rel=REL, abs=1e-12)


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def executor(digits):
    train = TrainConfig(lr=0.1, batch_size=10, local_steps=LOCAL_STEPS)
    spec = WorkerSpec(dataset="digits", model="mlp", train=train, model_options={"hidden": [8]})
    ex = InlineExecutor(spec, dataset=digits)
    yield ex
    ex.close()


@pytest.fixture(scope="module")
def initial_weights(digits) -> tuple[torch.Tensor, int]:
    torch.manual_seed(0)
    model = build_model("mlp", digits.input_shape, digits.num_classes, hidden=[8])
    layout = ParamLayout(model)
    return layout.flatten(model), layout.num_prunable


def two_client_fleet(server_up: float = 10.0, server_down: float = 5.0) -> Fleet:
    return Fleet(
        clients=(
            DeviceProfile(compute_flops=100.0, down_bps=8.0, up_bps=4.0, sigma=0.0),
            DeviceProfile(compute_flops=25.0, down_bps=6.0, up_bps=3.0, sigma=0.0),
        ),
        server=ServerProfile(down_bps=server_down, up_bps=server_up, sigma=0.0),
        name="hand",
    )


class Scripted(Policy):
    """A scripted policy: on Start it dispatches one dense task to each client in ``start_clients``
    (bytes from DOWN / UP); it logs every event; it stops after ``stop_after`` arrivals.

    ``redispatch``: send the client a new task when its result arrives.
    ``idle_redispatch``: send a client a new task when it comes back online (ClientIdle).
    ``bump``: each arrival is a server update (version += 1), which drives evaluation.
    ``timers``: SetTimer actions returned on Start; ``on_timer``: key -> actions for TimerFired.
    """

    name = "scripted"

    def __init__(
        self,
        ctx: PolicyContext,
        *,
        stop_after: int = 2,
        start_clients: tuple[int, ...] = (0, 1),
        redispatch: bool = False,
        idle_redispatch: bool = False,
        bump: bool = False,
        timers: tuple[SetTimer, ...] = (),
        on_timer: dict[str, list[Action]] | None = None,
        egress: dict[int, int] | None = None,
        upload_parts: dict[int, tuple[int, int]] | None = None,
    ) -> None:
        super().__init__(ctx)
        self.egress = egress or {}
        self.upload_parts = upload_parts or {}  # client -> (index, importance) bytes of its upload
        self.stop_after = stop_after
        self.start_clients = start_clients
        self.redispatch = redispatch
        self.idle_redispatch = idle_redispatch
        self.bump = bump
        self.timers = timers
        self.on_timer = on_timer or {}
        self.log: list[Event] = []
        self.arrivals: list[tuple[float, int]] = []  # (now, client)
        self.dispatched: dict[int, TaskSpec] = {}

    def task(self, client: int) -> Dispatch:
        spec = TaskSpec(
            task_id=self.new_task_id(),
            client=client,
            version=self.version,
            weights=self.weights,
            mask=None,
            density=1.0,
            download_bytes=DOWN[client],
            upload_bytes=UP[client],
            server_egress_bytes=self.egress.get(client),
            upload_index_bytes=self.upload_parts.get(client, (0, 0))[0],
            upload_importance_bytes=self.upload_parts.get(client, (0, 0))[1],
        )
        self.dispatched[spec.task_id] = spec
        return Dispatch(spec)

    def on_event(self, event: Event) -> list[Action]:
        self.log.append(event)
        if isinstance(event, Start):
            return [*self.timers, *(self.task(c) for c in self.start_clients)]
        if isinstance(event, ResultArrived):
            self.arrivals.append((event.now, event.result.client))
            actions: list[Action] = []
            if self.bump:
                self.weights = event.result.weights
                self.version += 1
                self.participation[event.result.client] += 1
            if len(self.arrivals) >= self.stop_after:
                return [Stop("scripted stop")]
            if self.redispatch:
                actions.append(self.task(event.result.client))
            return actions
        if isinstance(event, ClientIdle):
            return [self.task(event.client)] if self.idle_redispatch else []
        if isinstance(event, TimerFired):
            return list(self.on_timer.get(event.key, []))
        return []


class OfflineWindow:
    """Availability: ``client`` is offline on ``[t_off, t_on)``, everyone else always online."""

    def __init__(self, client: int, t_off: float, t_on: float) -> None:
        self.client, self.t_off, self.t_on = client, t_off, t_on

    def is_online(self, client: int, t: float) -> bool:
        return not (client == self.client and self.t_off <= t < self.t_on)

    def next_change(self, client: int, t: float) -> float:
        if client != self.client:
            return math.inf
        if t < self.t_off:
            return self.t_off
        if t < self.t_on:
            return self.t_on
        return math.inf


def make_sim(
    executor,
    initial_weights,
    *,
    # the scripted tasks of one version differ in size (DOWN), so they are not one published model:
    # no model relay unless a test asks for it
    settings: SimSettings = SimSettings(eval_every_rounds=None, model_relay=False),
    fleet: Fleet | None = None,
    availability: Any = None,
    evaluator=None,
    **policy_kw: Any,
) -> Simulation:
    w0, num_prunable = initial_weights
    ctx = PolicyContext(num_clients=2, num_samples=(50, 50), initial_weights=w0, num_prunable=num_prunable)
    policy = Scripted(ctx, **policy_kw)
    calls: list[float] = []

    def default_evaluator(weights: torch.Tensor) -> tuple[float, float]:
        calls.append(float(weights.sum()))
        return 1.0, 0.5

    flops_calls: list[tuple[Any, int, float]] = []

    def step_flops(mask: torch.Tensor | None, batch_size: int, width: float = 1.0) -> float:
        flops_calls.append((mask, batch_size, width))
        return STEP_FLOPS

    sim = Simulation(
        policy=policy,
        fleet=fleet or two_client_fleet(),
        executor=executor,
        client_indices=[np.arange(0, 50), np.arange(50, 100)],
        train_cfg=executor.workspace.trainer.cfg,
        step_flops=step_flops,
        evaluator=evaluator or default_evaluator,
        settings=settings,
        seed=0,
        history=HistoryWriter(None),
        availability=availability,
    )
    sim.flops_calls = flops_calls  # type: ignore[attr-defined]
    return sim


def records(sim: Simulation, event: str) -> list[dict[str, Any]]:
    return [r for r in sim.history.records if r["event"] == event]


# ---------------------------------------------------------------------------- the clock
def test_shared_server_link_hand_computed_times(executor, initial_weights) -> None:
    sim = make_sim(executor, initial_weights)
    summary = sim.run()
    # Downloads share the server's uplink (10 B/s) max-min fairly from t = 0.
    #   caps 8 and 6, fair share 10/2 = 5 < both caps -> 5 B/s each.
    #   client 0 (20 B) is done at t = 20/5 = 4; client 1 has 32 - 4*5 = 12 B left,
    #   now alone: min(6, 10) = 6 B/s -> done at 4 + 12/6 = 6.
    # Compute: 2 steps * 50 FLOPs = 100 FLOPs.
    #   client 0: 100/100 = 1 s -> upload starts at 5; client 1: 100/25 = 4 s -> at 10.
    # Uploads share the server's downlink (5 B/s).
    #   client 0 alone from 5: min(4, 5) = 4 B/s; by t = 10 it moved 20 of 24 B (4 left).
    #   from 10 both: caps 3 and 4, share 5/2 = 2.5 < both -> 2.5 B/s each.
    #   client 0 is done at 10 + 4/2.5 = 11.6; client 1 moved 1.6*2.5 = 4 B by then (6 left),
    #   now alone: min(3, 5) = 3 B/s -> done at 11.6 + 6/3 = 13.6.
    assert sim.policy.arrivals == [(approx(11.6), 0), (approx(13.6), 1)]
    assert summary["stopped"] == "scripted stop"
    assert summary["virtual_seconds"] == approx(13.6)

    arrivals = records(sim, "arrival")
    assert [r["client"] for r in arrivals] == [0, 1]
    assert [r["time"] for r in arrivals] == [approx(11.6), approx(13.6)]
    assert [r["duration"] for r in arrivals] == [approx(11.6), approx(13.6)]  # both dispatched at 0
    assert [r["compute"] for r in arrivals] == [approx(1.0), approx(4.0)]
    # the transfers as observed on the clock (own link + wait on the server's link)
    assert [observed_transfers(r) for r in arrivals] == [(approx(4.0), approx(11.6 - 5.0)),
                                                         (approx(6.0), approx(13.6 - 10.0))]
    assert [(r["bytes_down"], r["bytes_up"]) for r in arrivals] == [(20, 24), (32, 10)]
    # step_flops is asked for the task's mask, batch size min(batch_size, client samples), width
    assert sim.flops_calls == [(None, 10, 1.0), (None, 10, 1.0)]  # type: ignore[attr-defined]

    assert summary["server_egress_bytes"] == 20 + 32
    assert summary["server_ingress_bytes"] == 24 + 10
    assert summary["client_download_bytes"] == [20, 32]
    assert summary["client_upload_bytes"] == [24, 10]
    assert summary["local_rounds"] == [1, 1]


def test_result_event_carries_the_trained_weights(executor, initial_weights) -> None:
    sim = make_sim(executor, initial_weights)
    sim.run()
    results = [ev.result for ev in sim.policy.log if isinstance(ev, ResultArrived)]
    assert [r.client for r in results] == [0, 1]
    for r in results:
        assert r.steps == LOCAL_STEPS and r.num_samples == 50
        assert not torch.equal(r.weights, initial_weights[0])  # training really ran
        assert math.isfinite(r.mean_loss)


def test_unshared_server_link_gives_each_client_min_of_caps(executor, initial_weights) -> None:
    sim = make_sim(executor, initial_weights, settings=SimSettings(model_relay=False, eval_every_rounds=None, shared_server_link=False))
    sim.run()
    # Every transfer sees the whole server link: rate = min(client cap, server).
    #   client 0: download 20 B at min(8, 10) = 8 -> 2.5; compute 1 s -> 3.5;
    #             upload 24 B at min(4, 5) = 4 -> 6 s -> 9.5.
    #   client 1: download 32 B at min(6, 10) = 6 -> 16/3; compute 4 s -> 28/3;
    #             upload 10 B at min(3, 5) = 3 -> 10/3 s -> 38/3.
    assert sim.policy.arrivals == [(approx(9.5), 0), (approx(38 / 3), 1)]


def test_unshared_server_link_still_caps_by_the_server(executor, initial_weights) -> None:
    # A slow server (up 2 B/s, down 1 B/s) binds each transfer alone, but transfers do not share it.
    fleet = two_client_fleet(server_up=2.0, server_down=1.0)
    sim = make_sim(executor, initial_weights, fleet=fleet,
                   settings=SimSettings(model_relay=False, eval_every_rounds=None, shared_server_link=False))
    sim.run()
    #   client 0: 20/2 = 10, +1 -> 11, 24/1 = 24 -> 35.
    #   client 1: 32/2 = 16, +4 -> 20, 10/1 = 10 -> 30.
    assert sim.policy.arrivals == [(approx(30.0), 1), (approx(35.0), 0)]


def test_slow_shared_server_link_is_split(executor, initial_weights) -> None:
    # Same slow server (up 2, down 1), shared: downloads get 1 B/s each (share 2/2 = 1 < caps).
    #   client 0 (20 B) is done at 20; client 1 has 32 - 20 = 12 B left, alone at
    #   min(6, 2) = 2 B/s -> done at 26.
    #   client 0 computes 1 s and uploads alone from 21 at min(4, 1) = 1 B/s; client 1 computes
    #   4 s and starts uploading at 30. By 30 client 0 moved 9 of 24 B (15 left).
    #   From 30 both get 1/2 = 0.5 B/s: client 1's 10 B take 20 s -> done at 50; client 0 moved
    #   10 B more by then (5 left), alone again at 1 B/s -> done at 55.
    fleet = two_client_fleet(server_up=2.0, server_down=1.0)
    sim = make_sim(executor, initial_weights, fleet=fleet)
    sim.run()
    assert sim.policy.arrivals == [(approx(50.0), 1), (approx(55.0), 0)]


# ---------------------------------------------------------------------------- timers
def test_timer_fires_at_its_time_and_replaced_timer_fires_once(executor, initial_weights) -> None:
    # Start sets "a" at 1.5 and "b" at 7; when "a" fires it moves "b" to 2.25 (replacing 7) and
    # sets "c" at 3; the task traffic is the reference scenario (arrivals 11.6 and 13.6).
    sim = make_sim(
        executor,
        initial_weights,
        timers=(SetTimer(at=1.5, key="a"), SetTimer(at=7.0, key="b")),
        on_timer={"a": [SetTimer(at=2.25, key="b"), SetTimer(at=3.0, key="c")]},
    )
    sim.run()
    fired = [(ev.now, ev.key) for ev in sim.policy.log if isinstance(ev, TimerFired)]
    assert fired == [(1.5, "a"), (2.25, "b"), (3.0, "c")]
    # timers do not disturb the transfers
    assert sim.policy.arrivals == [(approx(11.6), 0), (approx(13.6), 1)]


def test_timer_replaced_in_the_same_action_list_fires_once(executor, initial_weights) -> None:
    sim = make_sim(
        executor,
        initial_weights,
        timers=(SetTimer(at=5.0, key="t"), SetTimer(at=2.0, key="t"), SetTimer(at=3.0, key="u")),
    )
    sim.run()
    fired = [(ev.now, ev.key) for ev in sim.policy.log if isinstance(ev, TimerFired)]
    assert fired == [(2.0, "t"), (3.0, "u")]


def test_timer_in_the_past_is_rejected(executor, initial_weights) -> None:
    sim = make_sim(executor, initial_weights, timers=(SetTimer(at=1.0, key="a"),),
                   on_timer={"a": [SetTimer(at=0.5, key="b")]})
    with pytest.raises(RuntimeError, match="in the past"):
        sim.run()


# ---------------------------------------------------------------------------- availability
def test_client_offline_mid_task_fails_and_comes_back(executor, initial_weights) -> None:
    # Client 1 is offline on [3, 20). At t = 3 it is mid-download -> TaskFailed(now=3).
    #   Until 3 both download at 5 B/s: client 0 has 20 - 15 = 5 B left; cancelling client 1
    #   gives client 0 min(8, 10) = 8 B/s -> download done at 3 + 5/8 = 3.625, compute 1 s ->
    #   4.625, upload 24 B alone at min(4, 5) = 4 -> 6 s -> arrival at 10.625.
    # At t = 20 client 1 is back -> ClientIdle(now=20); the policy re-dispatches:
    #   download 32 B alone at 6 B/s -> 16/3 s, compute 4 s, upload 10 B at 3 B/s -> 10/3 s,
    #   arrival at 20 + 16/3 + 4 + 10/3 = 98/3 (client 0 is done by then: the link is free).
    sim = make_sim(executor, initial_weights, availability=OfflineWindow(1, 3.0, 20.0), idle_redispatch=True)
    summary = sim.run()
    log = sim.policy.log
    failed = [ev for ev in log if isinstance(ev, TaskFailed)]
    assert [(ev.now, ev.client, ev.task_id, ev.reason) for ev in failed] == [(3.0, 1, 1, "offline")]
    idle = [ev for ev in log if isinstance(ev, ClientIdle)]
    assert [(ev.now, ev.client) for ev in idle] == [(20.0, 1)]
    # the failure comes before the comeback, and the comeback before client 1's next result
    kinds = [type(ev).__name__ for ev in log if not isinstance(ev, ResultArrived) or ev.result.client == 1]
    assert kinds == ["Start", "TaskFailed", "ClientIdle", "ResultArrived"]
    assert sim.policy.arrivals == [(approx(10.625), 0), (approx(98 / 3), 1)]
    assert summary["local_rounds"] == [1, 1]
    # the cancelled download is counted as sent (it was dispatched), then the retry
    assert summary["client_download_bytes"] == [20, 64]

    hist = sim.history.records
    tf = [r for r in hist if r["event"] == "task_failed"]
    assert [(r["time"], r["client"], r["task"], r["reason"]) for r in tf] == [(3.0, 1, 1, "offline")]
    av = [(r["time"], r["client"], r["online"]) for r in hist if r["event"] == "availability"]
    assert av == [(3.0, 1, False), (20.0, 1, True)]
    assert sim.busy == {} and sim.inflight == {}


def test_dispatch_to_offline_client_fails_at_once(executor, initial_weights) -> None:
    # Client 1 is offline from the start until 2: the Start dispatch fails at t = 0 and the
    # client comes back at 2; client 0's task is then alone on the link:
    #   20 B at min(8, 10) = 8 -> 2.5, compute 1 -> 3.5, 24 B at 4 -> 9.5.
    sim = make_sim(executor, initial_weights, availability=OfflineWindow(1, 0.0, 2.0), stop_after=1)
    sim.run()
    failed = [(ev.now, ev.client, ev.reason) for ev in sim.policy.log if isinstance(ev, TaskFailed)]
    assert failed == [(0.0, 1, "offline")]
    assert [(ev.now, ev.client) for ev in sim.policy.log if isinstance(ev, ClientIdle)] == [(2.0, 1)]
    assert sim.policy.arrivals == [(approx(9.5), 0)]


# ---------------------------------------------------------------------------- evaluation
def test_evaluation_every_k_rounds(executor, initial_weights) -> None:
    # Each arrival is a server update; the policy re-dispatches and stops at the 6th update.
    # eval_every_rounds=2 -> evaluations at rounds 0 (start), 2, 4, 6 and no extra final one.
    seen: list[torch.Tensor] = []

    def evaluator(weights: torch.Tensor) -> tuple[float, float]:
        seen.append(weights)
        return 0.25, 0.75

    sim = make_sim(executor, initial_weights, settings=SimSettings(model_relay=False, eval_every_rounds=2), evaluator=evaluator,
                   redispatch=True, bump=True, stop_after=6)
    summary = sim.run()
    evals = records(sim, "eval")
    assert [e["round"] for e in evals] == [0, 2, 4, 6]
    # each evaluation happens at the time of the arrival that made its round
    arrival_times = [t for t, _ in sim.policy.arrivals]
    assert [e["time"] for e in evals] == [0.0, arrival_times[1], arrival_times[3], arrival_times[5]]
    assert evals[0]["participation"] == [0, 0]
    assert sum(evals[-1]["participation"]) == 6
    assert all(e["accuracy"] == 0.75 and e["loss"] == 0.25 for e in evals)
    # it evaluated the weights the policy held at that point
    assert torch.equal(seen[0], initial_weights[0])
    assert seen[-1] is sim.policy.weights
    assert summary["server_rounds"] == 6
    assert summary["final_accuracy"] == 0.75


def test_final_evaluation_when_last_round_is_not_a_multiple(executor, initial_weights) -> None:
    sim = make_sim(executor, initial_weights, settings=SimSettings(model_relay=False, eval_every_rounds=2),
                   redispatch=True, bump=True, stop_after=5)
    sim.run()
    assert [e["round"] for e in records(sim, "eval")] == [0, 2, 4, 5]


def test_evaluation_every_seconds(executor, initial_weights) -> None:
    # eval_every_seconds=4 -> timed evaluations at 4, 8, 12 after the one at the start (0). The
    # run stops at 13.6 with the model unchanged (version 0, already evaluated): no final one.
    sim = make_sim(executor, initial_weights, settings=SimSettings(model_relay=False, eval_every_rounds=None, eval_every_seconds=4.0))
    sim.run()
    assert [e["time"] for e in records(sim, "eval")] == [0.0, 4.0, 8.0, 12.0]
    assert sim.policy.arrivals == [(approx(11.6), 0), (approx(13.6), 1)]


def test_request_evaluation_is_answered(executor, initial_weights) -> None:
    from prfl.policies.base import RequestEvaluation

    w0 = initial_weights[0]
    sim = make_sim(executor, initial_weights, timers=(SetTimer(at=1.0, key="e"),),
                   on_timer={"e": [RequestEvaluation(weights=w0, tag="probe")]})
    sim.run()
    answers = [ev for ev in sim.policy.log if isinstance(ev, EvaluationDone)]
    assert [(ev.now, ev.tag, ev.accuracy, ev.loss) for ev in answers] == [(1.0, "probe", 0.5, 1.0)]


# ---------------------------------------------------------------------------- budget
def test_max_time_stops_the_run(executor, initial_weights) -> None:
    # Arrivals would be at 11.6 and 13.6; a 13 s budget lets only the first one through and the
    # clock stops at exactly 13.
    sim = make_sim(executor, initial_weights, settings=SimSettings(model_relay=False, eval_every_rounds=None, max_time=13.0))
    summary = sim.run()
    assert sim.policy.arrivals == [(approx(11.6), 0)]
    assert summary["stopped"] == "time budget spent"
    assert summary["virtual_seconds"] == 13.0
    end = records(sim, "end")
    assert len(end) == 1 and end[0]["time"] == 13.0 and end[0]["reason"] == "time budget spent"
    assert summary["local_rounds"] == [1, 0]


def test_max_time_before_anything_arrives(executor, initial_weights) -> None:
    sim = make_sim(executor, initial_weights, settings=SimSettings(model_relay=False, eval_every_rounds=None, max_time=5.0))
    summary = sim.run()
    assert sim.policy.arrivals == []
    assert summary["virtual_seconds"] == 5.0
    assert summary["stopped"] == "time budget spent"


def test_idle_run_ends_by_itself(executor, initial_weights) -> None:
    # Nothing dispatched, nothing scheduled: the run ends at once, at t = 0.
    sim = make_sim(executor, initial_weights, start_clients=())
    summary = sim.run()
    assert summary["stopped"].startswith("idle")
    assert summary["virtual_seconds"] == 0.0


def test_mismatched_fleet_is_rejected(executor, initial_weights) -> None:
    w0, num_prunable = initial_weights
    ctx = PolicyContext(num_clients=3, num_samples=(1, 1, 1), initial_weights=w0, num_prunable=num_prunable)
    with pytest.raises(ValueError, match="must agree"):
        Simulation(Scripted(ctx), two_client_fleet(), executor, [np.arange(1)] * 3,
                   executor.workspace.trainer.cfg, lambda m, b, w=1.0: 1.0, lambda w: (0.0, 0.0))


def test_without_piece_relay_every_downloaded_byte_crosses_the_shared_uplink(executor, initial_weights) -> None:
    # The same pieces as below, on a deployment without a relay (Flower: every node pulls its
    # message from the SuperLink): client 1's 32 B all cross the shared uplink, as if nothing
    # had been published, and the times are those of the plain two-client run. model_relay (on
    # by default) has nothing to publish through then.
    sim = make_sim(executor, initial_weights, egress={0: 20, 1: 12},
                   settings=SimSettings(eval_every_rounds=None, piece_relay=False))
    summary = sim.run()
    assert sim.policy.arrivals == [(approx(11.6), 0), (approx(13.6), 1)]
    assert [observed_transfers(r)[0] for r in records(sim, "arrival")] == [approx(4.0), approx(6.0)]
    assert summary["server_egress_bytes"] == 20 + 32


def test_published_pieces_are_relayed_at_the_clients_own_speed(executor, initial_weights) -> None:
    # Client 1 needs 32 B of which 20 B were already published (egress 12 B): only 12 B cross the
    # shared server uplink; the other 20 B come from the publication point at its own 6 B/s.
    sim = make_sim(executor, initial_weights, egress={0: 20, 1: 12})
    summary = sim.run()
    # Shared uplink (10 B/s) from t = 0: flows of 20 B (cap 8) and 12 B (cap 6), 5 B/s each.
    #   client 1's 12 B are done at 12/5 = 2.4; client 0 has 8 B left at min(8, 10) = 8 -> 3.4.
    #   client 1 then relays 20 B at 6 B/s: done at 2.4 + 20/6 = 5.7333...
    # Compute: client 0 1 s -> upload from 4.4; client 1 4 s -> upload from 9.7333...
    # Uploads (server downlink 5 B/s): client 0 alone at 4 B/s moves 5.3333*4 = 21.333 B by
    #   9.7333 (2.6667 left); then 2.5 B/s each: client 0 done at 9.7333 + 2.6667/2.5 = 10.8;
    #   client 1 has 10 - 2.6667 = 7.3333 B left at 3 B/s -> 10.8 + 7.3333/3 = 13.2444...
    assert sim.policy.arrivals == [(approx(10.8), 0), (approx(10.8 + 22 / 9), 1)]
    assert summary["server_egress_bytes"] == 20 + 12
    assert summary["client_download_bytes"] == [20, 32]


def test_model_relay_serves_a_version_already_sent_from_the_relay(executor, initial_weights) -> None:
    # Both clients start from version 0 with the dense model and no egress of their own. With
    # model_relay client 0's 20 B cross the shared uplink alone (its own 8 B/s: done at 2.5);
    # client 1's copy of the same version comes whole from the relay at its 6 B/s: 32/6 s.
    # Compute 1 s and 4 s: uploads from 3.5 (client 0) and 9.3333 (client 1) on the 5 B/s
    # server downlink: client 0 alone at 4 B/s has 24 - 5.8333 * 4 = 0.6667 B left at 9.3333,
    # then 2.5 B/s each: done at 9.6; client 1's 10 - 0.6667 B then at 3 B/s: 9.6 + 9.3333/3.
    sim = make_sim(executor, initial_weights, settings=SimSettings(eval_every_rounds=None, model_relay=True))
    summary = sim.run()
    assert sim.policy.arrivals == [(approx(9.6), 0), (approx(9.6 + 28 / 9), 1)]
    assert summary["server_egress_bytes"] == 20
    assert summary["client_download_bytes"] == [20, 32]
    second = [r for r in records(sim, "arrival") if r["client"] == 1][0]
    assert second["link_wait_down"] == approx(0.0) and second["download"] == approx(32 / 6)
    # without it both copies cross the uplink (the first test of this file: 4 s and 6 s)
    plain = make_sim(executor, initial_weights, settings=SimSettings(eval_every_rounds=None, model_relay=False))
    assert plain.run()["server_egress_bytes"] == 20 + 32


def test_model_relay_publishes_every_new_version_again(executor, initial_weights) -> None:
    # Each arrival is a server update and the client is sent the new version: nothing of it was
    # published, so every task after the first wave crosses the uplink whole, and the first
    # wave's second copy is the only one relayed.
    sim = make_sim(executor, initial_weights, settings=SimSettings(eval_every_rounds=None, model_relay=True),
                   redispatch=True, bump=True, stop_after=6)
    summary = sim.run()
    crossed = [r["client"] for r in records(sim, "arrival")]
    assert len(crossed) == 6
    relayed = DOWN[1]  # the first wave's copy for client 1
    assert summary["server_egress_bytes"] == sum(summary["client_download_bytes"]) - relayed


# ---------------------------------------------------------------------------- where the time goes
def test_arrivals_split_their_time_into_download_link_wait_compute_upload(executor, initial_weights) -> None:
    # The first scenario (see test_shared_server_link_hand_computed_times), split by hand:
    #   client 0: download 20 B at its own 8 B/s = 2.5 s, observed 4 s -> waited 1.5 s;
    #             compute 1 s; upload 24 B at its own 4 B/s = 6 s, observed 5 -> 11.6 = 6.6 s
    #             -> waited 0.6 s. link_wait = 2.1; 2.5 + 2.1 + 1 + 6 = 11.6 = duration.
    #   client 1: download 32/6 = 16/3 s, observed 6 -> waited 2/3; compute 4 s; upload
    #             10/3 s, observed 10 -> 13.6 = 3.6 -> waited 0.6 - 1/3 = 4/15.
    #             link_wait = 2/3 + 4/15 = 14/15; 16/3 + 14/15 + 4 + 10/3 = 13.6.
    sim = make_sim(executor, initial_weights, upload_parts={0: (4, 6), 1: (0, 3)})
    summary = sim.run()
    a0, a1 = records(sim, "arrival")
    assert (a0["download"], a0["link_wait"], a0["compute"], a0["upload"]) == (approx(2.5), approx(2.1), approx(1.0), approx(6.0))
    assert (a1["download"], a1["link_wait"], a1["compute"], a1["upload"]) == (
        approx(16 / 3), approx(14 / 15), approx(4.0), approx(10 / 3))
    for a in (a0, a1):
        assert a["download"] + a["link_wait"] + a["compute"] + a["upload"] == approx(a["duration"])
    # the download's part of the wait: 1.5 s and 2/3 s; the observed transfers follow
    assert [a["link_wait_down"] for a in (a0, a1)] == [approx(1.5), approx(2 / 3)]
    assert [observed_transfers(a) for a in (a0, a1)] == [(approx(4.0), approx(6.6)), (approx(6.0), approx(3.6))]
    # upload parts: client 0 sent 24 B = 14 values + 4 index + 6 importance; client 1 10 = 7 + 0 + 3
    assert [(a["bytes_up_values"], a["bytes_up_index"], a["bytes_up_importance"]) for a in (a0, a1)] == [(14, 4, 6), (7, 0, 3)]
    assert [a["bytes_up"] for a in (a0, a1)] == [24, 10]  # honest: every byte is charged
    assert summary["accounting"] == "honest"
    assert summary["upload_bytes_split"] == {"values": 21, "index": 4, "importance": 9}
    br = summary["round_time_breakdown"]
    assert br["download"] == [approx(2.5), approx(16 / 3)] and br["link_wait"] == [approx(2.1), approx(14 / 15)]
    assert br["compute"] == [approx(1.0), approx(4.0)] and br["upload"] == [approx(6.0), approx(10 / 3)]


def test_a_client_alone_on_a_fast_server_waits_for_nothing(executor, initial_weights) -> None:
    fleet = two_client_fleet(server_up=1e6, server_down=1e6)
    sim = make_sim(executor, initial_weights, fleet=fleet, start_clients=(0,), stop_after=1)
    sim.run()
    (a,) = records(sim, "arrival")
    # 20 B at 8 B/s, 1 s compute, 24 B at 4 B/s: 2.5 + 1 + 6 = 9.5, nothing waited
    assert (a["download"], a["link_wait"], a["compute"], a["upload"], a["duration"]) == (
        approx(2.5), approx(0.0), approx(1.0), approx(6.0), approx(9.5))


# ---------------------------------------------------------------------------- reference accounting
def test_reference_accounting_by_hand(executor, initial_weights) -> None:
    # The digits MLP (hidden 8): N = 592 prunable weights, M = 18 biases. Reference download of a
    # dense task: 592 * 20 + 18 * 4 = 11,912 B, whatever the task's own download_bytes say.
    # Fleet: server up 10,000 B/s, down 10,000 B/s; client 0 (100 FLOP/s, down 8,000, up 4,000),
    # client 1 (25 FLOP/s, down 6,000, up 3,000).
    #   Both tasks start from version 0: the step's model crosses the uplink once. Client 0 pushes
    #   it at min(8,000, 10,000) = 8,000 B/s -> 1.489 s; client 1 gets it relayed at its own
    #   6,000 B/s -> 11,912 / 6,000 = 1.985333 s.
    #   Compute: the same for both, 2 steps * 50 FLOPs of the dense model at the fastest device's
    #   100 FLOP/s = 1 s (client 1 would take 4 s under honest accounting).
    #   Uploads: values only. Client 0: 24 - 4 index - 6 importance = 14 B at 4,000 B/s = 0.0035 s
    #   -> 2.4925; client 1: 10 - 3 importance = 7 B at 3,000 B/s -> 2.985333 + 7/3,000.
    fleet = Fleet(
        clients=(DeviceProfile(compute_flops=100.0, down_bps=8000.0, up_bps=4000.0, sigma=0.0),
                 DeviceProfile(compute_flops=25.0, down_bps=6000.0, up_bps=3000.0, sigma=0.0)),
        server=ServerProfile(down_bps=10_000.0, up_bps=10_000.0, sigma=0.0),
    )
    sim = make_sim(executor, initial_weights, fleet=fleet, upload_parts={0: (4, 6), 1: (0, 3)},
                   settings=SimSettings(model_relay=False, eval_every_rounds=None, accounting="reference"))
    summary = sim.run()
    d = 592 * 20 + 18 * 4
    assert d == 11_912
    assert sim.policy.arrivals == [(approx(d / 8000 + 1 + 14 / 4000), 0), (approx(d / 6000 + 1 + 7 / 3000), 1)]
    a0, a1 = records(sim, "arrival")
    assert [a["compute"] for a in (a0, a1)] == [approx(1.0), approx(1.0)]
    assert sim.flops_calls == [(None, 10, 1.0), (None, 10, 1.0)]  # type: ignore[attr-defined]
    assert [(a["bytes_down"], a["bytes_up"]) for a in (a0, a1)] == [(d, 14), (d, 7)]
    assert [a["link_wait"] for a in (a0, a1)] == [approx(0.0), approx(0.0)]
    assert summary["accounting"] == "reference"
    assert summary["server_egress_bytes"] == d  # once per step, not once per client
    assert summary["client_download_bytes"] == [d, d]
    assert summary["server_ingress_bytes"] == 14 + 7
    # what the uploads held is recorded as sent; only the values were charged
    assert summary["upload_bytes_split"] == {"values": 21, "index": 4, "importance": 9}
