"""The policy runner both drivers share: action delivery, evaluation and checkpoint cadence,
the records of a run's history and the accuracy part of its summary.

A driver (the simulator, :class:`prfl.sim.engine.Simulation`, or the Flower driver,
:class:`prfl.flower.driver.FlowerDriver`) owns only its clock and its transport; it implements
:class:`Transport` and hands every event to :meth:`PolicyRunner.deliver`, which asks the policy
and carries out its actions:

============================ ===================================================================
``Dispatch(task)``           ``transport.dispatch(task)``
``SetTimer(at, key)``        ``transport.set_timer(key, at, event)`` (the driver's clock fires it)
``RequestEvaluation``        evaluated at once; ``EvaluationDone`` goes back to the policy
``Record(kind, data)``       a history record ``{event: kind, time, round, **data}``
``NotifyClient``             ``transport.notify_client(notice)``
``Stop(reason)``             the run stops with ``reason``
============================ ===================================================================

After a server update (the policy's version moved) the runner evaluates every
``eval_every_rounds`` rounds and, every ``checkpoint_every_rounds`` rounds, saves a checkpoint
once the event has been handled completely (the evaluations it asked for answered), so that a
run resumed from it replays exactly what the uninterrupted run did. An evaluation record is

    {event: eval, time, round, accuracy, loss, server_egress, server_ingress, participation,
     density (policies with densities), buffer_staleness (when asked for)}

with ``participation`` the arrivals per client and the byte counters the transport's.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from prfl.policies.base import (
    Dispatch,
    EvaluationDone,
    Event,
    NotifyClient,
    Policy,
    Record,
    RequestEvaluation,
    SetTimer,
    Stop,
    TaskSpec,
)
from prfl.runtime.history import HistoryWriter
from prfl.runtime.rundir import RunDirectory

Evaluator = Callable[[torch.Tensor], tuple[float, float]]  # weights -> (loss, accuracy)


@dataclass(frozen=True)
class Traffic:
    """The transport's counters an evaluation record carries: bytes the server sent and
    received so far, and the arrivals (finished tasks) per client."""

    server_egress: int
    server_ingress: int
    arrivals: list[int]


class Transport(Protocol):
    """What a driver provides the runner: its clock and how actions reach clients."""

    def clock(self) -> float:
        """The driver's time now, in seconds since Start (virtual or wall clock)."""

    def dispatch(self, spec: TaskSpec) -> None:
        """Send a task to its client (or fail it as the driver's rules say)."""

    def set_timer(self, key: str, at: float, event: Event) -> None:
        """Arrange for ``TimerFired(key)`` at ``at`` (``event``: the event being handled)."""

    def notify_client(self, notice: NotifyClient) -> None:
        """Tell a client its result was rejected (a driver without clients to tell ignores it)."""

    def before_event(self, event: Event) -> None:
        """Called before the policy sees ``event``."""

    def after_update(self) -> None:
        """Called after an event that moved the policy's version, before evaluation."""

    def traffic(self) -> Traffic:
        """The counters of the next evaluation record."""

    def save_checkpoint(self) -> Path:
        """Save the driver's whole state (through :meth:`PolicyRunner.write_checkpoint`)."""


@dataclass(frozen=True)
class Cadence:
    """When the runner evaluates and checkpoints, and which accuracies it times."""

    eval_every_rounds: int | None = 10
    checkpoint_every_rounds: int | None = None
    target_accuracies: tuple[float, ...] = ()


class PolicyRunner:
    """Runs one policy for a driver (see the module docstring)."""

    def __init__(
        self,
        policy: Policy,
        evaluator: Evaluator,
        transport: Transport,
        history: HistoryWriter,
        cadence: Cadence = Cadence(),
        run_dir: RunDirectory | None = None,
        *,
        buffer_staleness: bool = False,
        on_eval: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        """``run_dir``: where checkpoints go (None: no checkpoints). ``buffer_staleness``: add the
        policy's buffered updates' staleness to evaluation records. ``on_eval``: called with each
        evaluation record."""
        self.policy = policy
        self.evaluator = evaluator
        # a weak reference: the driver owns its runner, and a cycle between them would keep a
        # finished run's model, buffers and executor alive until the cyclic collector ran
        self._transport = weakref.ref(transport)
        self.history = history
        self.cadence = cadence
        self.run_dir = run_dir
        self.buffer_staleness = buffer_staleness
        self.on_eval = on_eval
        self.stopped: str | None = None
        self.evals: list[dict[str, Any]] = []
        self.reached: dict[float, float] = {}
        self.last_eval_version = -1
        self.next_eval_round = cadence.eval_every_rounds or 0
        self.last_checkpoint_version = 0
        self.checkpoint_due = False
        self.events_handled = 0

    @property
    def transport(self) -> Transport:
        transport = self._transport()
        if transport is None:
            raise RuntimeError("the driver of this policy runner is gone")
        return transport

    # ------------------------------------------------------------------ delivery
    def deliver(self, event: Event) -> None:
        """Hand ``event`` to the policy and carry out its actions, and those of the evaluations
        they ask for; then save a checkpoint if one is due."""
        pending: list[Event] = [event]
        while pending and self.stopped is None:
            ev = pending.pop(0)
            self.transport.before_event(ev)
            before = self.policy.version
            actions = self.policy.on_event(ev)
            self.events_handled += 1
            for action in actions:
                if isinstance(action, Dispatch):
                    self.transport.dispatch(action.task)
                elif isinstance(action, SetTimer):
                    self.transport.set_timer(action.key, action.at, ev)
                elif isinstance(action, RequestEvaluation):
                    loss, acc = self.evaluator(action.model())
                    pending.append(EvaluationDone(now=self.transport.clock(), tag=action.tag, accuracy=acc, loss=loss))
                elif isinstance(action, Record):
                    self.history.write(action.kind, **{"time": self.transport.clock(), "round": self.policy.version,
                                                       **action.data})
                elif isinstance(action, NotifyClient):
                    self.transport.notify_client(action)
                elif isinstance(action, Stop):
                    self.stopped = action.reason
                else:
                    raise TypeError(f"unknown action {action!r}")
            if self.policy.version != before:
                self._after_update()
        # A checkpoint waits until the event is handled completely (the evaluations it asked
        # for answered), so that nothing pending is left out of the saved state.
        if self.checkpoint_due and not pending and self.stopped is None:
            self.checkpoint_due = False
            self.transport.save_checkpoint()

    def _after_update(self) -> None:
        self.transport.after_update()
        every = self.cadence.eval_every_rounds
        version = self.policy.version
        if every and version >= self.next_eval_round:
            self.evaluate(self.transport.clock())
            while self.next_eval_round <= version:
                self.next_eval_round += every
        ck = self.cadence.checkpoint_every_rounds
        if ck and self.run_dir is not None and version - self.last_checkpoint_version >= ck:
            self.checkpoint_due = True  # saved by deliver once the event is fully handled

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, now: float) -> dict[str, Any]:
        """Evaluate the global model at time ``now``; record, remember and return the record."""
        loss, acc = self.evaluator(self.policy.weights)
        self.last_eval_version = self.policy.version
        traffic = self.transport.traffic()
        rec: dict[str, Any] = {
            "time": now,
            "round": self.policy.version,
            "accuracy": acc,
            "loss": loss,
            "server_egress": traffic.server_egress,
            "server_ingress": traffic.server_ingress,
            "participation": list(traffic.arrivals),
        }
        metrics = self.policy.metrics()
        if metrics.densities is not None:
            rec["density"] = [float(d) for d in metrics.densities]
        if self.buffer_staleness and metrics.buffer_staleness is not None:
            rec["buffer_staleness"] = list(metrics.buffer_staleness)
        self.evals.append(rec)
        for target in self.cadence.target_accuracies:
            if acc >= target and target not in self.reached:
                self.reached[target] = now
        self.history.write("eval", **rec)
        if self.on_eval is not None:
            self.on_eval(rec)
        return rec

    def evaluate_if_stale(self, now: float) -> None:
        """At the end of a run: evaluate unless the last evaluation saw the final model."""
        if self.last_eval_version != self.policy.version or not self.evals:
            self.evaluate(now)

    # ------------------------------------------------------------------ checkpoints
    def write_checkpoint(self, state: Callable[[], dict[str, Any]]) -> Path:
        """Write ``state()`` (the driver's whole state, :meth:`state_dict` included) as the run
        directory's checkpoint. The ``checkpoint`` record is written before the state (and its
        history offset) is taken, so a resumed history keeps it."""
        assert self.run_dir is not None
        self.history.write("checkpoint", time=self.transport.clock(), round=self.policy.version)
        path = self.run_dir.write_checkpoint(state())
        self.last_checkpoint_version = self.policy.version
        return path

    def state_dict(self) -> dict[str, Any]:
        """The runner's part of a driver's checkpoint (plain data)."""
        return {
            "evals": list(self.evals),
            "reached": dict(self.reached),
            "last_eval_version": self.last_eval_version,
            "next_eval_round": self.next_eval_round,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (the policy's state is restored by the driver before)."""
        self.evals = list(state["evals"])
        self.reached = dict(state["reached"])
        self.last_eval_version = state["last_eval_version"]
        self.next_eval_round = state["next_eval_round"]
        self.last_checkpoint_version = self.policy.version
        self.checkpoint_due = False

    # ------------------------------------------------------------------ summary
    def accuracy_summary(self) -> dict[str, Any]:
        """``final_accuracy``, ``best_accuracy`` and ``time_to_accuracy`` (per target: the time
        of the first evaluation at or above it, None if never)."""
        accs = [e["accuracy"] for e in self.evals]
        return {
            "final_accuracy": accs[-1] if accs else None,
            "best_accuracy": max(accs) if accs else None,
            "time_to_accuracy": {f"{t:g}": self.reached.get(t) for t in self.cadence.target_accuracies},
        }

    def rejected_summary(self) -> dict[str, Any]:
        """``rejected_updates`` per client when the policy rejected any result, else nothing."""
        rejected = self.policy.metrics().rejected
        return {"rejected_updates": list(rejected)} if any(rejected) else {}


class RunnerBacked:
    """What both drivers expose of their :class:`PolicyRunner` (``self.runner``): why the run
    stopped (settable, e.g. by a stop file or the idle check) and the evaluation records."""

    runner: PolicyRunner

    @property
    def stopped(self) -> str | None:
        """Why the run stopped (None while it runs)."""
        return self.runner.stopped

    @stopped.setter
    def stopped(self, reason: str | None) -> None:
        self.runner.stopped = reason

    @property
    def evals(self) -> list[dict[str, Any]]:
        """The evaluation records so far."""
        return self.runner.evals
