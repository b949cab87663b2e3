"""Event-order fuzzing of the Flower driver: a hostile grid around :class:`FakeGrid`.

:class:`ChaosGrid` extends the in-process :class:`flower_fakegrid.FakeGrid` with a virtual clock
and, drawn from a seeded RNG, everything a federation may do to the server:

- replies that are late (after the reply timeout), lost, duplicated (pulled again later), for
  message ids the server never sent, or malformed (no result record, another task's id, arrays
  of the wrong size, NaN weights, zero samples, a describe answer to a train message, an
  unreadable describe answer), and ClientApp errors (including NODE_UNAVAILABLE);
- nodes that vanish from the listing mid-task and return (same node id or a new one), die
  silently and revive, restart in place with an empty piece cache, or show up twice for one
  partition.

The ClientApp is :func:`fast_client_app`: it decodes a task exactly as prfl's ClientApp does
(dense, sparse or cached residual pieces) but returns the start weights plus a small step instead
of training, so a sequence of a few hundred messages takes milliseconds. The policy is one of the
tiny-model cases of ``tests/policies/event_fuzz.py``.

:func:`run_driver` runs one sequence from a seed and checks: no exception escapes the driver;
every event the driver delivers is one the policy may receive (a result or a failure only for a
task in flight, from its client; a timer the policy set); every dispatched task ends at most
once, and those that never end are exactly the policy's tasks in flight at the stop; the policy's
version never goes back and its weights stay finite; the driver's byte counters are never
negative; no client with a usable node is believed offline by the policy without a ClientIdle on
its way (unless quarantined); a client whose only node has been listed and answering for
``SETTLE`` seconds is bound to that node; and a run that stops as "idle" has no client with a
usable node that the policy holds free without a task. A broken check raises
:class:`DriverFuzzFailure` with the seed and the run's history tail.
"""

from __future__ import annotations

import random
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Error, Message, RecordDict

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "policies"))  # the tiny-model policy cases

from event_fuzz import CASES, NUM_CLIENTS, NUM_SAMPLES, Case  # noqa: E402
from flower_fakegrid import FakeGrid  # noqa: E402

from prfl.flower import codec  # noqa: E402
from prfl.flower.client_app import start_model  # noqa: E402
from prfl.flower.driver import NODE_UNAVAILABLE, FlowerDriver  # noqa: E402
from prfl.flower.pieces import NodeCache  # noqa: E402
from prfl.flower.settings import DriverSettings  # noqa: E402
from prfl.policies.base import Dispatch, ResultArrived, TaskFailed, TimerFired  # noqa: E402
from prfl.runtime.history import HistoryWriter  # noqa: E402

TRAIN_FATES = ("ok",) * 14 + ("lost", "late", "error", "unavailable", "garbage", "wrong_task", "short", "nan",
                             "zero_samples", "duplicate", "duplicate", "describe_content")
DESCRIBE_FATES = ("ok",) * 12 + ("lost", "garbage", "error")
SETTINGS = DriverSettings(
    out_dir=".", reply_timeout=3.0, hello_timeout=1.0, wait_for_nodes=2.0, poll_interval=0.1, discover_interval=0.3,
    probe_interval=0.6, idle_timeout=4.0, max_client_errors=10**6, checkpoint_every_rounds=0,
)
MAX_TIME = 25.0
SETTLE = 10.0  # a node listed and answering this long must be the one its client is bound to


class DriverFuzzFailure(AssertionError):
    """A check of :func:`run_driver` failed."""


class VirtualClock:
    """Seconds that pass only when the driver sleeps."""

    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def fast_client_app(msg: Message, context: Context) -> Message:
    """prfl's ClientApp without the training: the task is decoded as ``handle_train`` does and
    answered with its weights plus a small step at the mask (and importance scores if asked)."""
    mtype = msg.metadata.message_type
    cfg = context.node_config
    pid = int(cfg.get("partition-id", -1))
    if mtype == codec.DESCRIBE_TYPE:
        cached = len(NodeCache.load(context.state))
        return Message(codec.encode_node(pid, int(cfg.get("num-partitions", -1)), 0.0, cached), reply_to=msg)
    if mtype == codec.NOTICE_TYPE:
        codec.decode_notice(msg.content)
        return Message(RecordDict({"prfl.notices": ConfigRecord({"count": 1})}), reply_to=msg)
    task = codec.decode_task(msg.content)
    if pid >= 0 and pid != task.client:
        raise ValueError(f"node config partition-id={pid} but the server sent a task for client {task.client}")
    weights, mask = start_model(task, context)
    g = torch.Generator().manual_seed(task.seed % (2**62))
    w = weights + 0.05 * torch.randn(weights.shape, generator=g)
    npr = task.num_prunable
    if mask is not None:
        w[:npr] *= mask
    grad_sq = torch.rand(npr, generator=g) if task.want_importance else None
    content = codec.encode_result(
        task=task, weights=w, mask=mask, grad_sq=grad_sq, num_samples=NUM_SAMPLES[task.client], mean_loss=0.5,
        steps=1, compute_seconds=0.01, delay_seconds=0.0,
        received_payload_bytes=codec.payload_bytes(msg.content[codec.PAYLOAD]),
        received_record_bytes=codec.record_bytes(msg.content), partition_id=task.client,
    )
    return Message(content, reply_to=msg)


class ChaosGrid(FakeGrid):
    """A :class:`FakeGrid` on a virtual clock whose replies and nodes misbehave at random."""

    def __init__(self, rng: random.Random, clock: VirtualClock, node_configs: list[dict[str, Any]],
                 churn: float = 0.01) -> None:
        super().__init__(fast_client_app, {}, node_configs, clock=clock)
        self.rng = rng
        self.churn = churn  # chance per driver sleep of a node event
        self.configs: dict[int, dict[str, Any]] = {nid: dict(ctx.node_config) for nid, ctx in self.contexts.items()}
        self.removed: dict[int, dict[str, Any]] = {}
        self.again: dict[str, Message] = {}  # duplicated replies, returned once more in a later pull
        self.strays: list[Message] = []  # replies kept to be sent again with an id the server never used
        self.next_node_id = 5000
        self.counts: Counter[str] = Counter()
        self.started = clock()
        self.changed: dict[int, float] = {}  # partition -> time of the last event of one of its nodes

    # -- messages
    def push_messages(self, messages: Any) -> list[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = msg.object_id
            mid = msg.metadata.message_id
            ids.append(mid)
            dst = msg.metadata.dst_node_id
            if dst in self.dead or dst not in self.contexts:
                self.counts["to dead node"] += 1
                continue
            self._answer(msg, mid, dst)
        return ids

    def _answer(self, msg: Message, mid: str, dst: int) -> None:
        mtype = msg.metadata.message_type
        fates = TRAIN_FATES if mtype == codec.TRAIN_TYPE else DESCRIBE_FATES if mtype == codec.DESCRIBE_TYPE else ("ok",)
        fate = self.rng.choice(fates)
        self.counts[f"{mtype}:{fate}"] += 1
        if fate == "lost":
            return
        latency = self.rng.choice((0.0, 0.1, 0.4, 1.0, 2.0))
        if fate == "late":
            latency = SETTINGS.reply_timeout + self.rng.choice((0.2, 1.0, 3.0))
        if fate in ("error", "unavailable"):
            reply = Message(Error(code=NODE_UNAVAILABLE if fate == "unavailable" else 2, reason=f"fuzz {fate}"),
                            reply_to=msg)
        elif fate == "garbage":
            reply = Message(RecordDict({"junk": ConfigRecord({"x": 1})}), reply_to=msg)
        elif fate == "describe_content":
            reply = Message(codec.encode_node(0, NUM_CLIENTS, 0.0, 0), reply_to=msg)
        else:
            try:
                reply = fast_client_app(msg, self.contexts[dst])
            except Exception as exc:  # noqa: BLE001 - Flower turns a ClientApp exception into an error reply
                self.counts["client app error"] += 1
                reply = Message(Error(code=2, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg)
            if not reply.has_error() and mtype == codec.TRAIN_TYPE:
                self._spoil(reply, fate)
                self.strays.append(reply)
                del self.strays[:-8]
        self.replies[mid] = reply
        self.ready_at[mid] = self.clock() + latency
        if fate == "duplicate":
            self.again[mid] = reply

    def _spoil(self, reply: Message, fate: str) -> None:
        res, upd = reply.content[codec.RESULT], reply.content[codec.UPDATE]
        name = "weights" if "weights" in upd else "values"
        if fate == "wrong_task":
            res["task-id"] = int(res["task-id"]) + 1000
        elif fate == "short":
            upd[name] = codec.raw_array(torch.zeros(3), "float32")
        elif fate == "nan":
            bad = codec.from_raw(upd[name]).copy()
            bad[0] = np.nan
            upd[name] = codec.raw_array(bad, "float32")
        elif fate == "zero_samples":
            res["num-samples"] = 0

    def pull_messages(self, message_ids: Any) -> list[Message]:
        asked = list(message_ids)
        out = list(super().pull_messages(asked))
        for mid in [m for m in self.again if m not in self.replies]:  # pulled once already: deliver again
            if self.rng.random() < 0.5:
                out.append(self.again.pop(mid))
                self.counts["duplicate delivered"] += 1
        if self.strays and self.rng.random() < 0.02:  # a reply to a message this server never sent
            old = self.rng.choice(self.strays)
            fake = Message(old.content, dst_node_id=old.metadata.src_node_id, message_type=codec.TRAIN_TYPE)
            fake.metadata.__dict__["_message_id"] = f"stray-{self.rng.random()}"
            out.append(Message(old.content, reply_to=fake))
            self.counts["stray reply"] += 1
        self.rng.shuffle(out)
        return out

    # -- nodes
    def tick(self) -> None:
        """Maybe one node event (called whenever the driver sleeps)."""
        if self.rng.random() >= self.churn:
            return
        live = sorted(self.contexts)
        what = self.rng.choice(("vanish", "vanish", "return", "return", "die", "revive", "restart", "twin"))
        if what == "vanish" and live:
            nid = self.rng.choice(live)
            self.removed[nid] = self.configs[nid]
            self.remove_node(nid)
            for mid in [m for m, r in self.replies.items() if r.metadata.src_node_id == nid]:
                if self.rng.random() < 0.5:  # its replies are lost, or come back as "node unavailable"
                    del self.replies[mid]
        elif what == "return" and self.removed:
            nid = self.rng.choice(sorted(self.removed))
            cfg = self.removed.pop(nid)
            if self.rng.random() < 0.5:
                nid = self.next_node_id
                self.next_node_id += 17
            self._add(nid, cfg)
        elif what == "die" and live:
            nid = self.rng.choice(live)
            self.dead.add(nid)
        elif what == "revive" and self.dead:
            nid = self.rng.choice(sorted(self.dead))
            self.dead.discard(nid)
        elif what == "restart" and live:
            nid = self.rng.choice(live)
            self._add(nid, self.configs[nid])  # same id, empty state: its piece cache is gone
        elif what == "twin" and live:
            nid = self.next_node_id
            self._add(nid, self.configs[self.rng.choice(live)])
            self.next_node_id += 17
        else:
            return
        self.counts[f"node {what}"] += 1
        self.changed[int(self.configs[nid].get("partition-id", -1))] = self.clock()

    def _add(self, nid: int, cfg: dict[str, Any]) -> None:
        self.add_node(nid, cfg)
        self.configs[nid] = dict(cfg)

    def settled_nodes(self, seconds: float) -> dict[int, int]:
        """client -> its node, for clients with exactly one listed node, alive (not dead), and no
        event of any of the client's nodes for ``seconds``."""
        by_client: dict[int, list[int]] = {}
        for nid, ctx in self.contexts.items():
            pid = int(ctx.node_config.get("partition-id", -1))
            if pid >= 0:
                by_client.setdefault(pid, []).append(nid)
        now = self.clock()
        return {c: nids[0] for c, nids in by_client.items()
                if len(nids) == 1 and nids[0] not in self.dead and now - self.changed.get(c, self.started) >= seconds}


class Watch:
    """Checks every event the driver hands the policy, and what the policy answers."""

    def __init__(self, driver: FlowerDriver) -> None:
        self.driver = driver
        self.policy = driver.policy
        self.on_event = self.policy.on_event
        self.policy.on_event = self._on_event  # type: ignore[method-assign]
        self.dispatched: set[int] = set()
        self.ended: set[int] = set()
        self.version = 0
        self.problems: list[str] = []

    def _on_event(self, ev: Any) -> Any:
        pol = self.policy
        tid = client = None
        if isinstance(ev, ResultArrived):
            tid, client = ev.result.task_id, ev.result.client
        elif isinstance(ev, TaskFailed):
            tid, client = ev.task_id, ev.client
        if tid is not None and not pol.stopped:
            task = pol.in_flight.get(tid)
            if task is None or task.client != client:
                self.problems.append(f"the driver delivered {type(ev).__name__} for task {tid} (client {client}), "
                                     "which the policy does not have in flight")
            if tid in self.ended:
                self.problems.append(f"task {tid} ended twice")
            self.ended.add(tid)
        if isinstance(ev, TimerFired) and not pol.stopped and not ev.key.startswith(("prfl:", "aggregate")):
            self.problems.append(f"the driver fired a timer the policy never set: {ev.key!r}")
        actions = self.on_event(ev)
        for a in actions:
            if isinstance(a, Dispatch):
                if a.task.task_id in self.dispatched:
                    self.problems.append(f"task id {a.task.task_id} dispatched twice")
                self.dispatched.add(a.task.task_id)
        if pol.version < self.version:
            self.problems.append(f"version went back from {self.version} to {pol.version}")
        self.version = pol.version
        if not bool(torch.isfinite(pol.weights).all()):
            self.problems.append("the policy's weights are not finite")
        return actions


def run_driver(seed: int, case: Case | None = None, rng: random.Random | None = None) -> dict[str, Any]:
    """One fuzzed Flower run from ``seed`` (or from ``rng``: hypothesis passes its own, which it
    can shrink); returns the grid's counts and the stop reason."""
    rng = rng if rng is not None else random.Random(f"flower:{seed}")
    if case is None:
        case = CASES[rng.choice(sorted(CASES))]
    clock = VirtualClock()
    anonymous = rng.random() < 0.2  # nodes without partition ids: bound in node-id order
    configs = [{} if anonymous else {"partition-id": c, "num-partitions": NUM_CLIENTS} for c in range(NUM_CLIENTS)]
    grid = ChaosGrid(rng, clock, configs, churn=rng.choice((0.0, 0.01, 0.03, 0.1)))
    policy = case.build(seed % 3)
    history = HistoryWriter(None)

    def sleep(dt: float) -> None:
        clock.t += max(dt, 1e-3)
        grid.tick()

    def evaluate(w: torch.Tensor) -> tuple[float, float]:
        return 1.0, float(1.0 / (1.0 + w.double().abs().mean()))

    driver = FlowerDriver(grid, policy, evaluate, SETTINGS, seed=seed, history=history, eval_every_rounds=3,
                          max_time=MAX_TIME, clock=clock, sleep=sleep)
    watch = Watch(driver)

    def fail(message: str) -> None:
        tail = "\n  ".join(repr(r)[:200] for r in history.records[-25:])
        raise DriverFuzzFailure(f"[flower seed {seed}, {case.name}] {message}\nhistory (last 25):\n  {tail}")

    try:
        driver.run()
    except Exception as exc:  # noqa: BLE001 - any exception is a finding
        fail(f"{type(exc).__name__}: {exc}")
    if watch.problems:
        fail(watch.problems[0])
    open_tasks = watch.dispatched - watch.ended
    if open_tasks != set(policy.in_flight):
        fail(f"tasks never ended {sorted(open_tasks)} but the policy has {sorted(policy.in_flight)} in flight")
    counters = [driver.record_down, driver.record_up, driver.server_egress, driver.server_ingress]
    for name in ("bytes_down", "bytes_up", "importance_up", "accounted_down", "accounted_up", "arrivals", "failures"):
        counters += getattr(driver, name)
    if min(counters) < 0:
        fail("a byte or message counter is negative")
    reason = driver.stopped or ""
    limit = policy.checks.max_rejections
    for c in range(NUM_CLIENTS):
        announced = any(getattr(ev, "client", None) == c for ev in driver.queue)
        quarantined = limit is not None and policy.reject_streak[c] >= limit
        if driver._usable_node(c) is not None and c not in policy.online and not announced and not quarantined:
            fail(f"client {c} has a usable node, but the policy believes it offline and the driver will not say "
                 "otherwise (a ClientIdle was lost)")
    for c, nid in grid.settled_nodes(SETTLE).items():
        if driver.client_node.get(c) != nid:
            fail(f"client {c}'s only node {nid} has answered for {SETTLE:g} s, yet the driver has "
                 f"{'no node' if c not in driver.client_node else 'node ' + str(driver.client_node[c])} for it")
    if reason.startswith("idle") and not policy.stopped:
        for c in range(NUM_CLIENTS):
            if driver._usable_node(c) is None:
                continue
            if c not in policy.online:
                fail(f"the run stopped as {reason!r}: client {c} has a usable node, but the policy was never "
                     "told it is back (it still believes the client offline)")
            if policy.is_free(c):
                fail(f"the run stopped as {reason!r}: client {c} is online and free, but the policy sent it nothing")
    return {"case": case.name, "stopped": reason, "rounds": policy.version, "grid": dict(grid.counts)}
