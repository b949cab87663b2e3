"""Fleet bookkeeping shared by the policies: who is online, which tasks are in flight and from
which weights they started, validation of results, server-update records, stopping, checkpoints.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch

from prfl.client.result import TaskResult
from prfl.policies.base import (
    Action,
    ClientIdle,
    Dispatch,
    EvaluationDone,
    Event,
    Policy,
    PolicyContext,
    Record,
    ResultArrived,
    Start,
    Stop,
    TaskFailed,
    TimerFired,
)


# --------------------------------------------------------------------------- config checks
def check_number(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    integer: bool = False,
) -> None:
    """Raise a ValueError naming ``name`` unless ``value`` is a finite number in the given range."""
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or not math.isfinite(value):
        kind = "an integer" if integer else "a finite number"
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value!r}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value!r}")


# --------------------------------------------------------------------------- fleet bookkeeping
@dataclass(frozen=True)
class InFlight:
    """A dispatched task the server is waiting for."""

    task_id: int
    client: int
    version: int  # model version the task started from
    dispatched_at: float


@dataclass(frozen=True)
class Arrival:
    """A validated result: its task, its weights (model dtype), the weights the task started
    from (None unless the policy keeps start weights) and its staleness version - task.version."""

    task: InFlight
    weights: torch.Tensor
    start: torch.Tensor | None
    staleness: int


class FleetPolicy(Policy):
    """Shared bookkeeping of the baseline policies.

    Tracks which clients are online (all at Start; a client whose task failed is offline until
    its next ``ClientIdle``) and busy (holding an in-flight task), validates arriving results,
    keeps the weights each in-flight task started from when ``keeps_start_weights`` is set
    (one reference per model version, never a copy), and stops the run once the round or time
    budget is spent: ``Stop`` is emitted once, after which every event is ignored.

    Subclasses set ``config_cls`` and implement the ``_on_*`` hooks.
    """

    config_cls: ClassVar[type]
    keeps_start_weights: ClassVar[bool] = False

    def __init__(self, ctx: PolicyContext, config: Any = None) -> None:
        super().__init__(ctx)
        if config is None:
            config = self.config_cls()
        if not isinstance(config, self.config_cls):
            raise TypeError(
                f"{type(self).__name__} needs a {self.config_cls.__name__}, got {type(config).__name__}"
            )
        self.config = config
        self.started = False
        self.stopped = False
        self.online: set[int] = set(range(ctx.num_clients))
        self.in_flight: dict[int, InFlight] = {}
        self.start_weights: dict[int, torch.Tensor] = {}  # version -> weights handed out
        self._busy: dict[int, int] = {}  # client -> task_id (derived from in_flight)
        self._refs: dict[int, int] = {}  # version -> in-flight tasks started from it (derived)

    # -- event routing
    def on_event(self, event: Event) -> list[Action]:
        if self.stopped:
            return []
        if isinstance(event, Start):
            if self.started:
                raise RuntimeError(f"{type(self).__name__} received Start twice")
            self.started = True
        elif not self.started:
            raise RuntimeError(f"{type(self).__name__} received {type(event).__name__} before Start")
        if self.should_stop(event.now):
            return [self._stop()]
        if isinstance(event, Start):
            return self._on_start(event.now)
        if isinstance(event, ClientIdle):
            self._check_client(event.client)
            self.online.add(event.client)
            return self._on_client_idle(event.now, event.client)
        if isinstance(event, ResultArrived):
            return self._on_result(event.now, event.result)
        if isinstance(event, TaskFailed):
            task = self._find_task(event.task_id, event.client, "TaskFailed")
            self._retire(task)
            self.online.discard(event.client)
            return self._on_task_failed(event.now, task)
        if isinstance(event, TimerFired):
            return self._on_timer(event.now, event.key)
        if isinstance(event, EvaluationDone):
            return []
        raise TypeError(f"unknown event {event!r}")

    # -- hooks
    def _on_start(self, now: float) -> list[Action]:
        raise NotImplementedError

    def _on_client_idle(self, now: float, client: int) -> list[Action]:
        return [self.dispatch(client, now)] if self.is_free(client) else []

    def _on_result(self, now: float, result: TaskResult) -> list[Action]:
        raise NotImplementedError

    def _on_task_failed(self, now: float, task: InFlight) -> list[Action]:
        return []

    def _on_timer(self, now: float, key: str) -> list[Action]:
        raise ValueError(f"{type(self).__name__} set no timer, got TimerFired({key!r})")

    # -- helpers
    def is_free(self, client: int) -> bool:
        """Online and holding no task: a task may be dispatched to it."""
        return client in self.online and client not in self._busy

    def free_clients(self) -> list[int]:
        return [c for c in range(self.ctx.num_clients) if self.is_free(c)]

    def dispatch(self, client: int, now: float) -> Dispatch:
        """A dense task on the current model for ``client``, recorded as in flight."""
        if client in self._busy:
            raise RuntimeError(f"client {client} already holds task {self._busy[client]}")
        task = self.dense_task(client)
        self._track(InFlight(task.task_id, client, task.version, float(now)))
        if self.keeps_start_weights:
            self.start_weights.setdefault(task.version, task.weights)
        return Dispatch(task)

    def take_result(self, result: TaskResult) -> Arrival:
        """Validate ``result`` against its in-flight task, then retire the task.

        A malformed result raises before any state changes.
        """
        task = self._find_task(result.task_id, result.client, "result")
        if result.version != task.version:
            raise ValueError(
                f"result of task {task.task_id} claims model version {result.version}, "
                f"but the task was dispatched at version {task.version}"
            )
        w = result.weights
        if w.shape != self.weights.shape:
            raise ValueError(
                f"result of task {task.task_id} (client {task.client}) has weights of shape "
                f"{tuple(w.shape)}, expected {tuple(self.weights.shape)}"
            )
        # a NaN or inf anywhere makes the sum non-finite: one cheap reduction in the common case
        if not bool(torch.isfinite(w.sum())) and not bool(torch.isfinite(w).all()):
            raise ValueError(f"result of task {task.task_id} (client {task.client}) has non-finite weights")
        start = self._retire(task)
        return Arrival(task, w.to(self.weights.dtype), start, self.version - task.version)

    def commit(self, new_weights: torch.Tensor, now: float, clients: list[int],
               staleness: list[int], **extra: Any) -> list[Action]:
        """Install a server update: bump version and participation, record it, maybe stop."""
        self.weights = new_weights
        self.version += 1
        for c in clients:
            self.participation[c] += 1
        actions: list[Action] = [
            Record("server_update", {"round": self.version, "clients": list(clients),
                                     "staleness": list(staleness), **extra})
        ]
        if self.should_stop(now):
            actions.append(self._stop())
        return actions

    def _stop(self) -> Stop:
        self.stopped = True
        if self.ctx.max_rounds is not None and self.version >= self.ctx.max_rounds:
            return Stop(f"reached max_rounds={self.ctx.max_rounds}")
        return Stop(f"reached max_time={self.ctx.max_time}")

    def _check_client(self, client: int) -> None:
        if not 0 <= client < self.ctx.num_clients:
            raise ValueError(f"client {client} out of range [0, {self.ctx.num_clients})")

    def _track(self, task: InFlight) -> None:
        self.in_flight[task.task_id] = task
        self._busy[task.client] = task.task_id
        self._refs[task.version] = self._refs.get(task.version, 0) + 1

    def _find_task(self, task_id: int, client: int, what: str) -> InFlight:
        task = self.in_flight.get(task_id)
        if task is None:
            raise ValueError(
                f"{what} for task {task_id} (client {client}), which is not in flight "
                "(never dispatched, already returned or already failed)"
            )
        if task.client != client:
            raise ValueError(f"{what} for task {task_id} names client {client}, but it was sent to {task.client}")
        return task

    def _retire(self, task: InFlight) -> torch.Tensor | None:
        """Forget an in-flight task; return its start weights (None unless kept)."""
        del self.in_flight[task.task_id]
        del self._busy[task.client]
        start = self.start_weights.get(task.version)
        left = self._refs[task.version] - 1
        if left:
            self._refs[task.version] = left
        else:  # no in-flight task started from this version any more
            del self._refs[task.version]
            self.start_weights.pop(task.version, None)
        return start

    # -- checkpointing
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(
            started=self.started,
            stopped=self.stopped,
            online=sorted(self.online),
            in_flight=[asdict(t) for t in self.in_flight.values()],
            start_weights={v: w.clone() for v, w in self.start_weights.items()},
        )
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.started = bool(state["started"])
        self.stopped = bool(state["stopped"])
        self.online = set(state["online"])
        self.in_flight, self._busy, self._refs = {}, {}, {}
        for t in state["in_flight"]:
            self._track(InFlight(**t))
        self.start_weights = {int(v): w.clone() for v, w in state["start_weights"].items()}
