"""The simulator and the Flower driver run a policy identically: same replies, same history.

Both drivers hand events to the shared :class:`prfl.runtime.runner.PolicyRunner`; what differs
is their clock and transport. Here they get identical scripted replies: a client answers task
``t`` with its start weights plus ``0.05 * N(0, 1)`` noise drawn from the task's seed (zero
outside the task's mask; importance scores drawn from the same generator when asked), reports
``DURATIONS[client]`` seconds of compute and ``NUM_SAMPLES[client]`` samples, and its reply
reaches the server ``DURATIONS[client]`` seconds after the dispatch. The simulator gets them
from a scripted executor (``compute_time: measured``, links so fast that transfers take no
time); the Flower driver from a grid whose nodes decode every task from the wire (dense, sparse,
or cached residual pieces) and answer after that delay on a virtual clock, which advances only
when the driver sleeps, straight to the next reply or timer.

The histories must agree record for record: the same kinds of record in the same order and,
in every record, the same value of every field both drivers write, except

- :data:`CLOCK_FIELDS`, times and durations (a wall clock's by nature on Flower; here they
  differ in the last bits, the simulator's transfers taking ~1e-16 s);
- nothing else: byte counts agree too, although the simulator charges the policy's accounting
  and the Flower driver measures the messages (downloads and the server's egress, residual
  pieces included, through one :class:`~prfl.distribution.PieceLedger`; uploads carry the values
  at the task's mask, whose positions the server knows);

and a field only one driver writes must be listed in :data:`SIM_ONLY` or :data:`FLOWER_ONLY`
(so a new field is a decision, not an accident).
"""

from __future__ import annotations

import math
import sys
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("flwr", reason="Flower is not installed: pip install 'prfl[flower]' to run the Flower tests")

from flwr.app import ConfigRecord, Context, Message, RecordDict  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "policies"))  # the tiny-model policy cases

from event_fuzz import CASES, NUM_CLIENTS, NUM_PRUNABLE, NUM_SAMPLES, Case  # noqa: E402
from flower_fakegrid import FakeGrid  # noqa: E402

from prfl.client.trainer import TrainConfig, TrainOutput  # noqa: E402
from prfl.flower import codec  # noqa: E402
from prfl.flower.client_app import start_model  # noqa: E402
from prfl.flower.driver import FlowerDriver  # noqa: E402
from prfl.flower.pieces import NodeCache  # noqa: E402
from prfl.flower.settings import DriverSettings  # noqa: E402
from prfl.runtime.history import HistoryWriter  # noqa: E402
from prfl.sim.devices import DeviceProfile, Fleet, ServerProfile  # noqa: E402
from prfl.sim.engine import SimSettings, Simulation  # noqa: E402

SEED = 7
DURATIONS = (0.731, 1.173, 1.619, 2.297)  # seconds from dispatch to reply, per client
EVAL_EVERY = 3

# mean_round_time: PR-FL's record of the clients' measured round times (from the events' times)
CLOCK_FIELDS = frozenset({"time", "duration", "compute", "download", "link_wait", "link_wait_down", "upload", "delay",
                          "mean_round_time"})
SIM_ONLY = {
    "arrival": {"bytes_up_values", "bytes_up_index", "bytes_up_importance"},
}
FLOWER_ONLY = {
    "start": {"driver", "nodes"},
    "eval": {"buffer_staleness"},
    "arrival": {"accounted_down", "accounted_up", "importance_bytes", "received_bytes", "record_bytes_down",
                "record_bytes_up", "node", "pieces",
                "message", "stamps"},  # the reply's message id; wall-clock stamps of dispatch, node, reply
}


def scripted_update(weights: torch.Tensor, mask: torch.Tensor | None, want_importance: bool, seed: int,
                    num_prunable: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A client's scripted reply: ``W + 0.05 N(0, 1)`` (zero outside the mask) and importance."""
    g = torch.Generator().manual_seed(seed % (2**62))
    w = weights.to(torch.float32) + 0.05 * torch.randn(weights.shape, generator=g)
    if mask is not None:
        w[:num_prunable] *= mask
    grad_sq = torch.rand(num_prunable, generator=g) if want_importance else None
    return w, grad_sq


def mean_loss(client: int) -> float:
    return 0.5 + 0.125 * client


def evaluate(w: torch.Tensor) -> tuple[float, float]:
    return 1.0, float(1.0 / (1.0 + w.double().abs().mean()))


# ---------------------------------------------------------------------------- the simulator
class ScriptedExecutor:
    """An executor whose jobs return the scripted reply at once."""

    def submit(self, job: Any) -> Future:
        w, grad_sq = scripted_update(job.weights, job.mask, job.want_importance, job.seed, NUM_PRUNABLE)
        fut: Future = Future()
        fut.set_result(TrainOutput(weights=w, num_samples=NUM_SAMPLES[job.client], mean_loss=mean_loss(job.client),
                                   steps=1, compute_seconds=DURATIONS[job.client], grad_sq=grad_sq))
        return fut

    def close(self) -> None:
        pass


def run_simulator(case: Case) -> list[dict[str, Any]]:
    policy = case.build(SEED)
    fast = 1e18  # bytes/s: a transfer of a few hundred bytes takes no time at this clock's resolution
    fleet = Fleet(clients=tuple(DeviceProfile(compute_flops=1.0, down_bps=fast, up_bps=fast, sigma=0.0)
                                for _ in range(NUM_CLIENTS)),
                  server=ServerProfile(down_bps=math.inf, up_bps=math.inf, sigma=0.0), name="scripted")
    history = HistoryWriter(None)
    sim = Simulation(
        policy, fleet, ScriptedExecutor(), [np.arange(n) for n in NUM_SAMPLES], TrainConfig(),
        step_flops=lambda mask, batch, width: 1.0, evaluator=evaluate,
        # the SuperLink sends every node its own copy of a model: no model relay, as on Flower
        settings=SimSettings(eval_every_rounds=EVAL_EVERY, compute_time="measured", shared_server_link=False,
                             model_relay=False),
        seed=SEED, history=history,
    )
    sim.run()
    return history.records


# ---------------------------------------------------------------------------- the Flower driver
class VirtualClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def scripted_client_app(msg: Message, context: Context) -> Message:
    """Decodes a task as prfl's ClientApp does and answers with the scripted reply."""
    mtype = msg.metadata.message_type
    pid = int(context.node_config["partition-id"])
    if mtype == codec.DESCRIBE_TYPE:
        return Message(codec.encode_node(pid, NUM_CLIENTS, 0.0, len(NodeCache.load(context.state))), reply_to=msg)
    if mtype == codec.NOTICE_TYPE:
        codec.decode_notice(msg.content)
        return Message(RecordDict({"prfl.notices": ConfigRecord({"count": 1})}), reply_to=msg)
    task = codec.decode_task(msg.content)
    weights, mask = start_model(task, context)
    w, grad_sq = scripted_update(weights, mask, task.want_importance, task.seed, task.num_prunable)
    content = codec.encode_result(
        task=task, weights=w, mask=mask, grad_sq=grad_sq, num_samples=NUM_SAMPLES[task.client],
        mean_loss=mean_loss(task.client), steps=1, compute_seconds=DURATIONS[task.client], delay_seconds=0.0,
        received_payload_bytes=codec.payload_bytes(msg.content[codec.PAYLOAD]),
        received_record_bytes=codec.record_bytes(msg.content), partition_id=task.client,
    )
    return Message(content, reply_to=msg)


class ScriptedGrid(FakeGrid):
    """A train message's reply is ready ``DURATIONS[client]`` seconds after it was pushed."""

    def push_messages(self, messages: Any) -> list[str]:
        msgs = list(messages)
        ids = list(super().push_messages(msgs))
        for msg, mid in zip(msgs, ids):
            if msg.metadata.message_type == codec.TRAIN_TYPE and mid in self.ready_at:
                pid = int(self.contexts[msg.metadata.dst_node_id].node_config["partition-id"])
                self.ready_at[mid] = self.clock() + DURATIONS[pid]
        return ids


def run_flower(case: Case) -> list[dict[str, Any]]:
    policy = case.build(SEED)
    clock = VirtualClock()
    configs = [{"partition-id": c, "num-partitions": NUM_CLIENTS} for c in range(NUM_CLIENTS)]
    grid = ScriptedGrid(scripted_client_app, {}, configs, clock=clock)
    history = HistoryWriter(None)
    settings = DriverSettings(out_dir=".", reply_timeout=1e6, hello_timeout=1e6, wait_for_nodes=1.0,
                              poll_interval=1e3, discover_interval=1e6, probe_interval=1e6, idle_timeout=1e4,
                              checkpoint_every_rounds=0)
    driver: FlowerDriver

    def sleep(dt: float) -> None:
        """Wake at the next reply or timer (or after ``dt``), exactly at its time."""
        t = clock.t
        wake = [t + dt] + [x for x in grid.ready_at.values() if x > t]
        wake += [driver.t0 + at for at in driver.timers.values() if driver.t0 + at > t]
        clock.t = min(wake)

    driver = FlowerDriver(grid, policy, evaluate, settings, seed=SEED, history=history, eval_every_rounds=EVAL_EVERY,
                          clock=clock, sleep=sleep)
    driver.run()
    assert driver.t0 == 0.0  # nodes answered at once: the driver's times are the virtual clock's
    return history.records


# ---------------------------------------------------------------------------- the comparison
def differences(sim: list[dict[str, Any]], flower: list[dict[str, Any]]) -> list[str]:
    problems = []
    kinds = ([r["event"] for r in sim], [r["event"] for r in flower])
    if kinds[0] != kinds[1]:
        return [f"record kinds differ:\n  sim    {kinds[0]}\n  flower {kinds[1]}"]
    for i, (a, b) in enumerate(zip(sim, flower)):
        kind = a["event"]
        only_a = set(a) - set(b) - SIM_ONLY.get(kind, set()) - CLOCK_FIELDS
        only_b = set(b) - set(a) - FLOWER_ONLY.get(kind, set()) - CLOCK_FIELDS
        if only_a or only_b:
            problems.append(f"record {i} ({kind}): fields only the simulator writes {sorted(only_a)}, "
                            f"only the Flower driver writes {sorted(only_b)}")
        for key in sorted((set(a) & set(b)) - CLOCK_FIELDS):
            if a[key] != b[key]:
                problems.append(f"record {i} ({kind}) field {key!r}: simulator {a[key]!r}, Flower {b[key]!r}")
    return problems


POLICIES = sorted(CASES)  # FedAvg, FedAsync, FedBuff, FedFix, HeteroFL (width, mask), PR-FL in six configurations


@pytest.mark.parametrize("name", POLICIES)
def test_simulator_and_flower_driver_write_the_same_history(name: str) -> None:
    case = CASES[name]
    sim, flower = run_simulator(case), run_flower(case)
    assert sum(r["event"] == "arrival" for r in sim) >= 8, "the scripted run is too short to compare anything"
    assert sim[-1]["event"] == "end" and sim[-1]["round"] >= 6, sim[-1]
    problems = differences(sim, flower)
    assert not problems, "\n".join(problems[:10])


def test_the_comparison_sees_a_difference() -> None:
    sim = run_simulator(CASES["fedasync"])
    flower = [dict(r) for r in sim]
    assert differences(sim, flower) == []
    flower[3] = {**flower[3], "round": flower[3]["round"] + 1}
    assert differences(sim, flower) and "round" in differences(sim, flower)[0]
    flower = [dict(r) for r in sim] + [{"event": "end"}]
    assert differences(sim, flower)
