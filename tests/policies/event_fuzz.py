"""Event-order fuzzing of the server policies: a model of what a driver may deliver, and checks.

:class:`PolicyFuzz` plays the driver. It holds a policy built by a :class:`Case` (a tiny MLP
3 -> 4 -> 2: 26 weights, 20 of them prunable in 2 layers, 4 clients) and delivers the events a
driver can produce, in any order the fuzzer asks for:

- ``start``: Start, once, first; clients offline at Start get their tasks failed at once;
- ``offline(c)`` / ``online(c)``: availability churn. Going offline fails the client's task
  (TaskFailed "offline"); coming back online delivers ClientIdle, whatever the policy believes;
- ``idle(c)``: ClientIdle for an online client holding no task (a Flower node answering again);
- ``arrive(client, variant)``: the result of any client's task (so results come late and out of
  order), well formed or malformed (NaN, wrong shape, wrong version claim, values outside the
  mask, bad or zero sample counts, huge values, bad importance scores);
- ``fail_task(client)``: TaskFailed for any client's task (timeout, crash, rejected by the transport);
- ``fire(pick)``: a timer the policy set, never before its time;
- ``evaluate(pick)``: the answer to a RequestEvaluation (at once or deferred, per sequence);
- ``checkpoint()``: state_dict -> deepcopy -> a fresh policy's load_state_dict. From then on the
  restored copy receives every event too and must answer with the same actions;
- ``hostile(kind, pick)``: events no driver may deliver (a result or a failure for a task that
  already ended or was never dispatched, a result naming the wrong client, an unknown timer).
  The policy contract (:mod:`prfl.policies.fleet`) is that these raise ValueError; the fuzzer
  checks that they do, and that the policy's state is unchanged by the refusal.

After every event it checks: no exception; no client is sent a task while it holds one; every
task ends once (the policy's tasks in flight are exactly the driver's); round and version
numbers never go back; the global weights, dispatched weights and weights sent to evaluation are
finite; byte counts are never negative; timers are never set in the past; a stopped policy stays
silent. A failed check raises :class:`FuzzFailure` carrying the event log.

:func:`run_random` draws a whole sequence from a seed (used by ``benchmarks/fuzz_policies.py``);
``test_event_fuzz.py`` drives the same methods from a hypothesis state machine, which shrinks a
failing sequence to a minimal one.
"""

from __future__ import annotations

import copy
import functools
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from prfl.client.result import TaskResult
from prfl.models import build_model
from prfl.policies import build_policy
from prfl.policies.base import (
    Action,
    ClientIdle,
    Dispatch,
    EvaluationDone,
    Event,
    Policy,
    PolicyContext,
    NotifyClient,
    Record,
    RequestEvaluation,
    ResultArrived,
    SetTimer,
    Start,
    Stop,
    TaskFailed,
    TaskSpec,
    TimerFired,
)

NUM_CLIENTS = 4
NUM_SAMPLES = (5, 3, 8, 2)
LABELS = ((0, 1), (1,), (0,), (0, 1))
TOTAL, NUM_PRUNABLE = 26, 20
LAYER_BOUNDS = ((0, 12), (12, 20))
MAX_ROUNDS = 12

RESULT_VARIANTS = ("ok", "ok", "ok", "ok", "ok", "ok", "nan", "shape", "version", "outside_mask", "samples",
                   "zero_samples", "huge", "importance")
HOSTILE_KINDS = ("duplicate", "failed_ended", "unknown_task", "wrong_client", "unknown_timer")
DTS = (0.0, 0.05, 0.3, 1.0, 2.5)


@functools.lru_cache(maxsize=None)
def mlp(width: float = 1.0) -> torch.nn.Module:
    """The tiny model: MLP 3 -> 4 -> 2 (W1 @ [0, 12), W2 @ [12, 20), biases @ [20, 26)).

    Built once per width (HeteroFL reads only its structure), which makes sequences 3x faster."""
    return build_model("mlp", (3,), 2, hidden=(4,), width_mult=width)


def make_ctx(seed: int = 0) -> PolicyContext:
    g = torch.Generator().manual_seed(1234)
    return PolicyContext(
        num_clients=NUM_CLIENTS, num_samples=NUM_SAMPLES, initial_weights=torch.randn(TOTAL, generator=g),
        num_prunable=NUM_PRUNABLE, seed=seed, max_rounds=MAX_ROUNDS, layer_bounds=LAYER_BOUNDS,
        client_labels=LABELS, num_classes=2, model_builder=mlp,
    )


@dataclass(frozen=True)
class Case:
    """A policy and its options, as :func:`prfl.policies.build_policy` takes them."""

    name: str
    policy: str
    options: dict[str, Any] = field(default_factory=dict)

    def build(self, seed: int = 0) -> Policy:
        return build_policy(self.policy, make_ctx(seed), **self.options)


# PR-FL: control steps every 2 rounds (ranking rebuilds, density changes, recovery checks) and
# sparse clients from the first task, so that short sequences reach every code path.
_PRFL = {"interval": 2, "patience": 2, "initial_densities": (1.0, 0.6, 0.3, 0.1)}

CASES: dict[str, Case] = {c.name: c for c in (
    Case("fedavg", "fedavg", {"fraction": 0.75}),
    Case("fedasync", "fedasync"),
    Case("fedbuff", "fedbuff", {"k": 3}),
    Case("fedfix", "fedfix", {"dt": 1.0}),
    Case("heterofl-width", "heterofl", {"mode": "width", "rates": (1.0, 0.5, 0.5, 0.25)}),
    Case("heterofl-mask", "heterofl", {"mode": "mask", "densities": (1.0, 0.6, 0.3, 0.1)}),
    Case("prfl", "prfl", dict(_PRFL)),
    Case("prfl-window0", "prfl", {**_PRFL, "window": 0.0}),
    Case("prfl-sync", "prfl", {**_PRFL, "synchronous": True}),
    Case("prfl-whole", "prfl", {**_PRFL, "residual_split": False}),
    Case("prfl-prefix", "prfl", {**_PRFL, "buffer_storage": "prefix"}),
    Case("prfl-clip", "prfl", {**_PRFL, "robust": "clip", "clip_norm": 1.0, "norm_factor": 4.0, "norm_window": 3,
                               "client_scores": True}),
)}


class FuzzFailure(AssertionError):
    """An invariant broke; the message ends with the events delivered so far."""


# --------------------------------------------------------------------------- comparing actions
def _tensor_key(t: torch.Tensor | None) -> Any:
    return None if t is None else (str(t.dtype), tuple(t.shape), t.detach().cpu().numpy().tobytes())


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return _tensor_key(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def action_key(action: Action) -> Any:
    """Everything an action says, in a form ``==`` compares exactly (tensors by their bytes)."""
    if isinstance(action, Dispatch):
        t = action.task
        fields = {k: _plain(v) for k, v in vars(t).items()}
        return ("dispatch", fields)
    if isinstance(action, RequestEvaluation):
        return ("evaluate", action.tag, _tensor_key(action.model()))
    if isinstance(action, Record):
        return ("record", action.kind, _plain(action.data))
    if isinstance(action, SetTimer):
        return ("timer", action.key, action.at)
    if isinstance(action, Stop):
        return ("stop", action.reason)
    return ("?", repr(action))


def state_key(state: Any) -> Any:
    """A policy's ``state_dict`` in a form ``==`` compares exactly."""
    if isinstance(state, torch.Tensor):
        return _tensor_key(state)
    if isinstance(state, dict):
        return {repr(k): state_key(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return [state_key(v) for v in state]
    if isinstance(state, set):
        return sorted(repr(v) for v in state)
    if isinstance(state, float) and math.isnan(state):
        return "nan"
    if hasattr(state, "__dataclass_fields__"):
        return (type(state).__name__, state_key(vars(state)))
    return state


def describe(event: Event) -> str:
    """One line per event for failure reports."""
    if isinstance(event, ResultArrived):
        r = event.result
        extra = "" if getattr(r, "_variant", "ok") == "ok" else f" [{r._variant}]"  # type: ignore[attr-defined]
        return f"t={event.now:g} ResultArrived(task={r.task_id}, client={r.client}, version={r.version}){extra}"
    if isinstance(event, TaskFailed):
        return f"t={event.now:g} TaskFailed(task={event.task_id}, client={event.client}, {event.reason!r})"
    if isinstance(event, ClientIdle):
        return f"t={event.now:g} ClientIdle({event.client})"
    if isinstance(event, TimerFired):
        return f"t={event.now:g} TimerFired({event.key!r})"
    if isinstance(event, EvaluationDone):
        return f"t={event.now:g} EvaluationDone({event.tag!r}, acc={event.accuracy:.3g})"
    return f"t={event.now:g} {type(event).__name__}"


# --------------------------------------------------------------------------- the driver model
@dataclass
class Outstanding:
    """A task the driver sent and that has not ended."""

    spec: TaskSpec
    doomed: bool  # sent to an offline client: it can only fail ("offline")


class PolicyFuzz:
    """Plays a driver for one policy; every public method delivers events and checks invariants."""

    def __init__(self, case: Case, seed: int = 0, eval_at_once: bool = True, eager_fail: bool = True,
                 online: tuple[bool, ...] | None = None) -> None:
        self.case = case
        self.policy = case.build(seed)
        self.seed = seed
        self.eval_at_once = eval_at_once  # answer evaluations at once (as the drivers do) or later
        self.eager_fail = eager_fail  # fail a dispatch to an offline client at once, or later
        self.now = 0.0
        self.online = list(online) if online is not None else [True] * NUM_CLIENTS
        self.started = False
        self.stopped = False
        self.outstanding: dict[int, Outstanding] = {}
        self.ended: dict[int, TaskSpec] = {}
        self.timers: dict[str, float] = {}
        self.evals: list[RequestEvaluation] = []
        self.version = 0
        self.last_round = 0
        self.last_dispatch_version = 0
        self.bytes_down = [0] * NUM_CLIENTS
        self.bytes_up = [0] * NUM_CLIENTS
        self.server_egress = 0
        self.broken = False
        self.told_gone = [False] * NUM_CLIENTS  # the policy was told the client is gone (failure, quarantine)
        self.shadow: Policy | None = None  # restored from a checkpoint, fed the same events
        self.log: list[str] = []
        self.counts: dict[str, int] = {}

    # ------------------------------------------------------------------ helpers
    def fail(self, message: str) -> None:
        self.broken = True  # finish() must not run on (and report) the state a failure left behind
        tail = "\n  ".join(self.log[-60:])
        raise FuzzFailure(f"[{self.case.name}] {message}\nevents (last {min(60, len(self.log))}):\n  {tail}")

    def _count(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1

    @property
    def active(self) -> bool:
        return self.started and not self.stopped

    def live_tasks(self) -> list[Outstanding]:
        return [o for o in self.outstanding.values() if not o.doomed]

    def holder(self, client: int) -> Outstanding | None:
        for o in self.outstanding.values():
            if o.spec.client == client:
                return o
        return None

    def _tick(self, dt: float) -> None:
        self.now += dt

    # ------------------------------------------------------------------ delivering
    def deliver(self, event: Event) -> list[Action]:
        """Hand ``event`` to the policy (and the restored copy), then carry out the actions."""
        self.log.append(describe(event))
        if isinstance(event, TaskFailed):
            self.told_gone[event.client] = True
        elif isinstance(event, ClientIdle):
            self.told_gone[event.client] = False
        try:
            actions = self.policy.on_event(event)
        except Exception as exc:  # noqa: BLE001 - any exception on a deliverable event is a finding
            self.fail(f"{type(exc).__name__}: {exc} (on {describe(event)})")
        if self.shadow is not None:
            try:
                mirrored = self.shadow.on_event(event)
            except Exception as exc:  # noqa: BLE001
                self.fail(f"the restored policy raised {type(exc).__name__}: {exc} where the original did not")
            if [action_key(a) for a in mirrored] != [action_key(a) for a in actions]:
                self.fail(f"after restoring a checkpoint the policy answers {describe(event)} differently:\n"
                          f"    original: {[action_key(a)[:2] for a in actions]}\n"
                          f"    restored: {[action_key(a)[:2] for a in mirrored]}")
        self._carry_out(event, actions)
        return actions

    def _carry_out(self, event: Event, actions: list[Action]) -> None:
        pol = self.policy
        answers: list[RequestEvaluation] = []
        failed_at_once: list[TaskSpec] = []
        for a in actions:
            if isinstance(a, Dispatch):
                t = a.task
                self._check_dispatch(t)
                doomed = not self.online[t.client]
                self.outstanding[t.task_id] = Outstanding(t, doomed)
                if doomed and self.eager_fail:
                    failed_at_once.append(t)
                self.bytes_down[t.client] += t.download_bytes
                self.server_egress += t.download_bytes if t.server_egress_bytes is None else t.server_egress_bytes
            elif isinstance(a, SetTimer):
                if not math.isfinite(a.at) or a.at < event.now - 1e-9:
                    self.fail(f"timer {a.key!r} set at {a.at}, before now = {event.now}")
                self.timers[a.key] = a.at
            elif isinstance(a, RequestEvaluation):
                a = RequestEvaluation(a.model(), a.tag)  # its model is built now, before the next event
                if not bool(torch.isfinite(a.model()).all()):
                    self.fail(f"evaluation {a.tag!r} of non-finite weights")
                answers.append(a)
            elif isinstance(a, NotifyClient):
                # a notice goes with the rejection of the same task, recorded in the same answer
                told = [(int(r.data["client"]), int(r.data["task"])) for r in actions
                        if isinstance(r, Record) and r.kind == "rejected"]
                if (a.client, a.task_id) not in told:
                    self.fail(f"NotifyClient for client {a.client}, task {a.task_id} without its rejection record")
            elif isinstance(a, Record):
                if a.kind == "quarantined":
                    self.told_gone[int(a.data["client"])] = True
                if a.kind == "server_update":
                    rnd = int(a.data["round"])
                    if rnd != self.last_round + 1:
                        self.fail(f"server_update round {rnd} after round {self.last_round}")
                    self.last_round = rnd
            elif isinstance(a, Stop):
                self.stopped = True
            else:
                self.fail(f"unknown action {a!r}")
        self._check_state()
        if self.stopped:
            return
        # what the simulator and the Flower driver do next: evaluations answered at once,
        # dispatches to offline clients failed at once
        if self.eval_at_once:
            for req in answers:
                if self.stopped:
                    return
                self.deliver(EvaluationDone(self.now, req.tag, _score(req.weights), 0.0))
        else:
            self.evals.extend(answers)
        for t in failed_at_once:
            if self.stopped:
                return
            if t.task_id in self.outstanding:
                self._end(t.task_id)
                self.deliver(TaskFailed(self.now, t.client, t.task_id, "offline"))
        if not self.stopped and not pol.in_flight and not self.timers and not self.evals:
            free = [c for c in range(NUM_CLIENTS) if pol.is_free(c)]
            if free:  # nothing will ever happen unless a driver repeats ClientIdle, which drivers do not
                self.fail(f"stall: clients {free} are online and free for the policy, yet it has nothing in "
                          f"flight and no timer (after {describe(event)})")

    def _check_dispatch(self, t: TaskSpec) -> None:
        pol = self.policy
        if not 0 <= t.client < NUM_CLIENTS:
            self.fail(f"task {t.task_id} dispatched to unknown client {t.client}")
        held = self.holder(t.client)
        if held is not None:
            self.fail(f"client {t.client} is sent task {t.task_id} while it holds task {held.spec.task_id}")
        if t.task_id in self.outstanding or t.task_id in self.ended:
            self.fail(f"task id {t.task_id} dispatched twice")
        if t.version < self.last_dispatch_version or t.version > pol.version:
            self.fail(f"task {t.task_id} has version {t.version} (last dispatch {self.last_dispatch_version}, "
                      f"policy at {pol.version})")
        self.last_dispatch_version = t.version
        for name in ("download_bytes", "upload_bytes", "upload_index_bytes", "upload_importance_bytes"):
            if getattr(t, name) < 0:
                self.fail(f"task {t.task_id} has {name} = {getattr(t, name)}")
        if t.server_egress_bytes is not None and t.server_egress_bytes < 0:
            self.fail(f"task {t.task_id} has server_egress_bytes = {t.server_egress_bytes}")
        if t.upload_index_bytes + t.upload_importance_bytes > t.upload_bytes:
            self.fail(f"task {t.task_id}: index + importance bytes exceed upload_bytes")
        if not bool(torch.isfinite(t.weights).all()):
            self.fail(f"task {t.task_id} carries non-finite weights")
        if t.mask is not None and (t.mask.dtype != torch.bool or t.mask.shape != (NUM_PRUNABLE,)):
            self.fail(f"task {t.task_id} has a mask of {t.mask.dtype} {tuple(t.mask.shape)}")

    def _check_state(self) -> None:
        pol = self.policy
        if pol.version < self.version:
            self.fail(f"version went back from {self.version} to {pol.version}")
        self.version = pol.version
        if self.last_round > pol.version:
            self.fail(f"recorded round {self.last_round} but the policy is at version {pol.version}")
        if not bool(torch.isfinite(pol.weights).all()):
            self.fail("the global weights are not finite")
        if any(b < 0 for b in self.bytes_down) or any(b < 0 for b in self.bytes_up) or self.server_egress < 0:
            self.fail("a byte counter went negative")
        if any(p < 0 for p in pol.participation):
            self.fail(f"participation {pol.participation}")
        in_flight = getattr(pol, "in_flight", None)
        if in_flight is not None and not self.stopped:
            if set(in_flight) != set(self.outstanding):
                self.fail(f"the policy has tasks {sorted(in_flight)} in flight, the driver {sorted(self.outstanding)}")
            clients = [t.client for t in in_flight.values()]
            if len(clients) != len(set(clients)):
                self.fail(f"a client holds two tasks in the policy: {sorted(clients)}")

    def _end(self, task_id: int) -> TaskSpec:
        o = self.outstanding.pop(task_id)
        self.ended[task_id] = o.spec
        return o.spec

    # ------------------------------------------------------------------ events a driver delivers
    def start(self) -> None:
        if self.started:
            return
        self.started = True
        self._count("start")
        self.deliver(Start(self.now))

    def offline(self, client: int, dt: float = 0.0) -> None:
        if not self.active or not self.online[client]:
            return
        self._tick(dt)
        self.online[client] = False
        self._count("offline")
        self.log.append(f"t={self.now:g} (client {client} goes offline)")
        held = self.holder(client)
        if held is not None and not held.doomed:
            self._end(held.spec.task_id)
            self.deliver(TaskFailed(self.now, client, held.spec.task_id, "offline"))

    def online_(self, client: int, dt: float = 0.0) -> None:
        if not self.active or self.online[client]:
            return
        self._tick(dt)
        self.online[client] = True
        self._count("online")
        self.log.append(f"t={self.now:g} (client {client} comes online)")
        self.deliver(ClientIdle(self.now, client))

    def idle(self, client: int, dt: float = 0.0) -> None:
        """ClientIdle for an online client that holds no live task (a node answering again)."""
        held = self.holder(client)
        if not self.active or not self.online[client] or (held is not None and not held.doomed):
            return
        self._tick(dt)
        self._count("idle")
        self.deliver(ClientIdle(self.now, client))

    def next_holder(self, client: int, live: bool) -> Outstanding | None:
        """The task of ``client``, or else of the next client (cyclically) holding one."""
        for k in range(NUM_CLIENTS):
            held = self.holder((client + k) % NUM_CLIENTS)
            if held is not None and not (live and held.doomed):
                return held
        return None

    def arrive(self, client: int, variant: str = "ok", dt: float = 0.0, noise: int = 0) -> None:
        """The result of ``client``'s task (if it holds none: of the next client holding one)."""
        held = self.next_holder(client, live=True)
        if not self.active or held is None:
            return
        self._tick(dt)
        spec = self._end(held.spec.task_id)
        self._count(f"arrive:{variant}")
        self.deliver(ResultArrived(self.now, make_result(spec, variant, noise)))

    def fail_task(self, client: int, dt: float = 0.0) -> None:
        """TaskFailed for ``client``'s task (a timeout, a crash; if it holds none: the next
        client's holding one)."""
        held = self.next_holder(client, live=False)
        if not self.active or held is None:
            return
        self._tick(dt)
        spec = self._end(held.spec.task_id)
        self._count("fail")
        self.deliver(TaskFailed(self.now, spec.client, spec.task_id, "offline" if held.doomed else "timeout"))

    def fire(self, pick: int, dt: float = 0.0) -> None:
        keys = sorted(self.timers)
        if not self.active or not keys:
            return
        key = keys[pick % len(keys)]
        self.now = max(self.now + dt, self.timers.pop(key))
        self._count("timer")
        self.deliver(TimerFired(self.now, key))

    def evaluate(self, pick: int, accuracy: float, dt: float = 0.0) -> None:
        if not self.active or not self.evals:
            return
        self._tick(dt)
        req = self.evals.pop(pick % len(self.evals))
        self._count("evaluation")
        self.deliver(EvaluationDone(self.now, req.tag, accuracy, 1.0 - accuracy))

    def checkpoint(self) -> None:
        """state_dict -> deepcopy -> a fresh policy's load_state_dict; it shadows the original."""
        if not self.started:
            return
        self._count("checkpoint")
        self.log.append(f"t={self.now:g} (checkpoint and restore)")
        try:
            state = copy.deepcopy(self.policy.state_dict())
            restored = self.case.build(self.seed)
            restored.load_state_dict(state)
        except Exception as exc:  # noqa: BLE001
            self.fail(f"checkpoint/restore raised {type(exc).__name__}: {exc}")
        self.shadow = restored

    def hostile(self, kind: str, pick: int, dt: float = 0.0) -> None:
        """An event no driver may deliver: it must raise ValueError and change nothing."""
        if not self.active:
            return
        self._tick(dt)
        dt = 0.0
        pol = self.policy
        event: Event
        if kind in ("duplicate", "failed_ended"):
            if not self.ended:
                return
            spec = self.ended[sorted(self.ended)[pick % len(self.ended)]]
            event = (ResultArrived(self.now + dt, make_result(spec, "ok", pick)) if kind == "duplicate"
                     else TaskFailed(self.now + dt, spec.client, spec.task_id, "timeout"))
        elif kind == "unknown_task":
            tid = pol.next_task_id + pick % 3
            c = pick % NUM_CLIENTS
            fake = TaskSpec(tid, c, pol.version, pol.weights, None, 1.0, 0, 0)
            event = ResultArrived(self.now + dt, make_result(fake, "ok", pick))
        elif kind == "wrong_client":
            live = sorted(self.live_tasks(), key=lambda o: o.spec.task_id)
            if not live:
                return
            spec = live[pick % len(live)].spec
            event = ResultArrived(self.now + dt, replace(make_result(spec, "ok", pick),
                                                        client=(spec.client + 1 + pick % (NUM_CLIENTS - 1)) % NUM_CLIENTS))
        elif kind == "unknown_timer":
            event = TimerFired(self.now + dt, f"no-such-timer-{pick % 3}")
        else:
            raise ValueError(f"unknown hostile kind {kind!r}")
        self._count(f"hostile:{kind}")
        # state_dict() is a checkpoint: with running sums it first recomputes them exactly (so a
        # saved and a continuing run agree bit for bit); the restored copy takes the same step
        before = state_key(pol.state_dict())
        if self.shadow is not None:
            self.shadow.state_dict()
        self.log.append(describe(event) + "  [undeliverable: must raise ValueError]")
        for who, p in (("policy", pol), ("restored policy", self.shadow)):
            if p is None:
                continue
            try:
                p.on_event(event)
            except ValueError:
                pass
            except Exception as exc:  # noqa: BLE001
                self.fail(f"the {who} raised {type(exc).__name__}: {exc} on an undeliverable event (not ValueError)")
            else:
                self.fail(f"the {who} accepted an undeliverable event: {describe(event)}")
        after = state_key(pol.state_dict())
        if self.shadow is not None:
            self.shadow.state_dict()
        if after != before:
            self.fail(f"refusing {describe(event)} changed the policy's state")

    # ------------------------------------------------------------------ the end
    def finish(self) -> None:
        """Liveness at the end. The dispatches to offline clients fail, every client comes back
        online (ClientIdle), and every client the policy was told is gone (a failed task, a
        quarantine) is announced again, as a driver does once it hears from the client. No other
        ClientIdle is sent: drivers do not repeat it for clients the policy believes online. Then
        the run must not be stuck: the policy stopped, or a task in flight, or a timer or an
        evaluation pending."""
        if self.broken:
            return
        if self.stopped:
            if self.policy.on_event(ClientIdle(self.now, 0)):
                self.fail("a stopped policy answered an event")
            return
        if not self.started:
            return
        while not self.stopped and any(o.doomed for o in self.outstanding.values()):
            tid = min(t for t, o in self.outstanding.items() if o.doomed)  # sent while offline: fails
            spec = self._end(tid)
            self.deliver(TaskFailed(self.now, spec.client, tid, "offline"))
        for c in range(NUM_CLIENTS):
            if not self.stopped and not self.online[c]:
                self.online_(c)
        for c in range(NUM_CLIENTS):
            if not self.stopped and self.told_gone[c]:
                self.idle(c)
        if not self.stopped and not self.live_tasks() and not self.timers and not self.evals:
            self.fail("stuck: every client is online and known to the policy, yet nothing is in flight or scheduled")


def _score(weights: torch.Tensor) -> float:
    """A deterministic stand-in accuracy in [0, 1] for evaluations answered at once."""
    return float(1.0 / (1.0 + weights.double().abs().mean()))


def make_result(spec: TaskSpec, variant: str, noise: int) -> TaskResult:
    """The result a client could send for ``spec``: trained weights (the sent ones plus a small
    step, zero outside the mask), or a malformed one (``variant``)."""
    g = torch.Generator().manual_seed(noise * 7919 + spec.task_id)
    w = spec.weights.detach().clone().float() + 0.1 * torch.randn(spec.weights.shape, generator=g)
    if spec.mask is not None:
        w[:NUM_PRUNABLE] *= spec.mask
    grad_sq = torch.rand(NUM_PRUNABLE, generator=g) if spec.want_importance else None
    n = NUM_SAMPLES[spec.client]
    version = spec.version
    if variant == "nan":
        w[int(torch.randint(0, w.numel(), (1,), generator=g))] = float("nan")
    elif variant == "shape":
        w = torch.cat([w, torch.zeros(1)])
    elif variant == "version":
        version = spec.version + 1
    elif variant == "outside_mask":
        w[:NUM_PRUNABLE] = 1.0  # every prunable weight non-zero: outside the mask unless dense
    elif variant == "samples":
        n = -1
    elif variant == "zero_samples":
        n = 0
    elif variant == "huge":
        w = w.sign() * 3e38
        if spec.mask is not None:
            w[:NUM_PRUNABLE] *= spec.mask
    elif variant == "importance":
        grad_sq = torch.full((NUM_PRUNABLE,), float("nan"))
    res = TaskResult(task_id=spec.task_id, client=spec.client, version=version, weights=w, num_samples=n,
                     mean_loss=0.5, steps=1, compute_seconds=0.01, grad_sq=grad_sq, density=spec.density,
                     width=spec.width)
    res._variant = variant  # type: ignore[attr-defined]  # for the event log only
    return res


# --------------------------------------------------------------------------- random sequences
def run_random(case: Case, seed: int, steps: int = 60, hostile: bool = True) -> PolicyFuzz:
    """One sequence of ``steps`` random driver moves drawn from ``seed``; raises FuzzFailure."""
    rng = random.Random(f"{case.name}:{seed}")
    online = tuple(rng.random() > 0.15 for _ in range(NUM_CLIENTS))
    fz = PolicyFuzz(case, seed=rng.randrange(3), eval_at_once=rng.random() < 0.7, eager_fail=rng.random() < 0.7,
                    online=online)
    moves: list[tuple[float, Callable[[], None]]] = [
        (6.0, lambda: fz.arrive(holder(live=True), rng.choice(RESULT_VARIANTS), rng.choice(DTS), rng.randrange(99))),
        (1.5, lambda: fz.fail_task(holder(live=False), rng.choice(DTS))),
        (3.0, lambda: fz.fire(rng.randrange(64), rng.choice(DTS))),
        (1.0, lambda: fz.evaluate(rng.randrange(64), rng.random(), rng.choice(DTS))),
        (1.5, lambda: fz.offline(rng.randrange(NUM_CLIENTS), rng.choice(DTS))),
        (1.5, lambda: fz.online_(rng.randrange(NUM_CLIENTS), rng.choice(DTS))),
        (1.0, lambda: fz.idle(rng.randrange(NUM_CLIENTS), rng.choice(DTS))),
        (0.3, fz.checkpoint),
    ]
    if hostile:
        moves.append((0.7, lambda: fz.hostile(rng.choice(HOSTILE_KINDS), rng.randrange(64), rng.choice(DTS))))
    weights = [w for w, _ in moves]

    def holder(live: bool) -> int:  # a client holding a task, so that few moves are wasted
        held = sorted(o.spec.client for o in fz.outstanding.values() if not (live and o.doomed))
        return held[rng.randrange(len(held))] if held else 0

    fz.start()
    for _ in range(steps):
        if fz.stopped:
            break
        rng.choices(moves, weights)[0][1]()
    fz.finish()
    return fz
