"""Fleet bookkeeping shared by the policies: who is online, which tasks are in flight and from
which weights they started, validation of results, server-update records, stopping, checkpoints.

Rejected updates. :meth:`FleetPolicy.take_result` screens every result with
:func:`prfl.validation.validate_update` (type, dtype, shape, claimed version, sample count,
finiteness, mask, importance statistic and, when configured, the update norm) before anything
changes. A failing result raises :class:`~prfl.validation.RejectedUpdate`, which
:meth:`FleetPolicy.on_event` turns into ``Record("rejected", {client, task, version, check,
reason})``: the update is never aggregated and its task is treated as failed
(``_on_task_failed``), but the client stays online and is offered work again at once through
``_on_client_idle``, as if it had just become idle. Drivers need nothing new: a rejection is a
record plus, usually, a dispatch. A client whose last ``max_rejections`` results in a row were
rejected is quarantined (``Record("quarantined")``, offline for the policy until the driver
reports it idle again), and once every client is quarantined the policy stops the run with the
last reason. Policies that weight results by their sample count (``weights_by_samples``)
also reject a result reporting ``num_samples = 0`` (check ``samples``): it has no weight, and a
round or buffer holding only such results would have nothing to average. Results that cannot be
matched to an in-flight task (unknown task, wrong client) are driver errors and still raise
``ValueError``, before any state changes.

Non-finite models. :meth:`FleetPolicy.commit` never installs weights with a NaN or an infinity
(finite updates can still overflow a sum): it keeps the previous weights, still counts the server
update, and adds ``non_finite`` (the number of bad values) to its ``server_update`` record.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch

from prfl.client.result import TaskResult
from prfl.seeding import rng_for
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
from prfl.validation import RejectedUpdate, Rejection, UpdateChecks, check_norm, update_norm, validate_update


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


# how the stop reason of a run in which every client got quarantined begins
QUARANTINED_STOP = "every client is quarantined"


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
    from (None unless the policy keeps start weights), its staleness version - task.version and
    its update norm ||W_i - W_sent|| on the held weights (None unless the policy measures it)."""

    task: InFlight
    weights: torch.Tensor
    start: torch.Tensor | None
    staleness: int
    norm: float | None = None


class FleetPolicy(Policy):
    """Shared bookkeeping of the baseline policies.

    Tracks which clients are online (all at Start; a client whose task failed is offline until
    its next ``ClientIdle``) and busy (holding an in-flight task), validates arriving results,
    keeps the weights each in-flight task started from when ``keeps_start_weights`` is set
    (one reference per model version, never a copy), and stops the run once the round or time
    budget is spent: ``Stop`` is emitted once, after which every event is ignored.

    Subclasses set ``config_cls`` and implement the ``_on_*`` hooks; :meth:`update_checks` and
    :meth:`task_mask` tell the validation which norm check to run and which mask a task had.
    """

    config_cls: ClassVar[type]
    keeps_start_weights: ClassVar[bool] = False
    weights_by_samples: ClassVar[bool] = False  # averages results by num_samples: reject num_samples = 0

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
        self.checks: UpdateChecks = self.update_checks()
        # the weights each in-flight task started from, by task (references, never copies): the
        # norm check and clipping need W_sent even when the model changed without a new version
        self._track_starts = self.checks.norm_check or self.measures_norms()
        self.task_starts: dict[int, torch.Tensor] = {}
        self.recent_norms: deque[float] = deque(maxlen=self.checks.norm_window)  # accepted update norms
        self.rejected: list[int] = [0] * ctx.num_clients  # rejected results per client
        self.reject_streak: list[int] = [0] * ctx.num_clients  # rejections in a row per client

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
            try:
                return self._on_result(event.now, event.result)
            except RejectedUpdate as rej:
                return self._reject(event.now, event.result, rej.rejection)
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

    def update_checks(self) -> UpdateChecks:
        """Settings of the statistical checks (default: structural checks only)."""
        return UpdateChecks()

    def measures_norms(self) -> bool:
        """True if the policy needs every accepted update's norm (e.g. to clip it)."""
        return False

    def task_mask(self, task: InFlight) -> torch.Tensor | None:
        """The mask ``task`` was dispatched with (None: dense)."""
        return None

    def result_like(self, task: InFlight) -> torch.Tensor:
        """A tensor with the shape and dtype ``task``'s result must have (the global model's)."""
        return self.weights

    def _reject(self, now: float, result: TaskResult, rejection: Rejection) -> list[Action]:
        """A result failed validation: record it, fail its task, offer the client new work."""
        task = self.in_flight[result.task_id]  # take_result raised before retiring it
        c = task.client
        self._retire(task)
        self.rejected[c] += 1
        self.reject_streak[c] += 1
        actions: list[Action] = [Record("rejected", {
            "client": c, "task": task.task_id, "version": task.version,
            "check": rejection.check, "reason": rejection.reason,
        })]
        limit = self.checks.max_rejections
        if limit is not None and self.reject_streak[c] >= limit:
            self.online.discard(c)
            actions.append(Record("quarantined", {"client": c, "rejections": self.reject_streak[c]}))
        actions += self._on_task_failed(now, task)
        if self.stopped:
            return actions
        if c in self.online:
            actions += self._on_client_idle(now, c)
        elif limit is not None and all(n >= limit for n in self.reject_streak) and not self.in_flight:
            self.stopped = True
            actions.append(Stop(
                f"{QUARANTINED_STOP} after {limit} rejected updates in a row (last: {rejection}); "
                "fix the cause (learning rate, model, data or the clients) and run again"
            ))
        return actions

    # -- helpers
    def is_free(self, client: int) -> bool:
        """Online and holding no task: a task may be dispatched to it."""
        return client in self.online and client not in self._busy

    def draw_cohort(self, size: int, min_clients: int, attempt: int = 0) -> list[int] | None:
        """A synchronous round's cohort: ``size`` free clients drawn by address (seed, "cohort",
        version[, attempt]), sorted; None while fewer than ``min_clients`` are free."""
        free = self.free_clients()
        if len(free) < min_clients:
            return None
        keys = (self.version,) if attempt == 0 else (self.version, attempt)
        rng = rng_for(self.ctx.seed, "cohort", *keys)
        return sorted(int(c) for c in rng.choice(free, size=min(size, len(free)), replace=False))

    def free_clients(self) -> list[int]:
        return [c for c in range(self.ctx.num_clients) if self.is_free(c)]

    def dispatch(self, client: int, now: float) -> Dispatch:
        """A dense task on the current model for ``client``, recorded as in flight."""
        if client in self._busy:
            raise RuntimeError(f"client {client} already holds task {self._busy[client]}")
        task = self.dense_task(client)
        self.track_task(task, now)
        return Dispatch(task)

    def track_task(self, task: Any, now: float) -> InFlight:
        """Record a dispatched :class:`~prfl.policies.base.TaskSpec` as in flight (and keep the
        weights it starts from when the policy or its checks need them)."""
        inflight = InFlight(task.task_id, task.client, task.version, float(now))
        self._track(inflight)
        if self.keeps_start_weights:
            self.start_weights.setdefault(task.version, task.weights)
        if self._track_starts:
            self.task_starts[task.task_id] = task.weights
        return inflight

    def take_result(self, result: TaskResult) -> Arrival:
        """Validate ``result`` against its in-flight task, then retire the task.

        A result for a task that is not in flight (or from another client) raises ValueError;
        a result that fails :func:`prfl.validation.validate_update` raises
        :class:`~prfl.validation.RejectedUpdate`. Either is raised before any state changes.
        """
        task = self._find_task(result.task_id, result.client, "result")
        mask = self.task_mask(task)
        start = self.task_starts.get(task.task_id)
        rejection = validate_update(
            result.weights, claimed_version=result.version, expected_version=task.version, like=self.result_like(task),
            mask=mask, num_prunable=self.ctx.num_prunable, num_samples=result.num_samples, grad_sq=result.grad_sq,
        )
        if rejection is None and self.weights_by_samples and result.num_samples == 0:
            rejection = Rejection("samples", "num_samples = 0: a result trained on no sample has no weight in "
                                             f"{type(self).__name__}'s sample-weighted average")
        norm: float | None = None
        if rejection is None and start is not None and (self.checks.norm_check or self.measures_norms()):
            norm = update_norm(result.weights, start, mask, self.ctx.num_prunable)
            reason = check_norm(norm, self.recent_norms, self.checks.norm_factor, self.checks.norm_window)
            if reason is not None:
                rejection = Rejection("norm", reason)
        if rejection is not None:
            raise RejectedUpdate(rejection, task.task_id, task.client)
        if norm is not None:
            self.recent_norms.append(norm)
        self.reject_streak[task.client] = 0
        start = self._retire(task)
        return Arrival(task, result.weights.to(self.weights.dtype), start, self.version - task.version, norm)

    def commit(self, new_weights: torch.Tensor, now: float, clients: list[int],
               staleness: list[int], **extra: Any) -> list[Action]:
        """Install a server update: bump version and participation, record it, maybe stop.

        Weights with a NaN or an infinity are not installed (the previous ones stay); the record
        then says how many values were not finite (``non_finite``)."""
        bad = 0 if bool(torch.isfinite(new_weights.sum())) else int((~torch.isfinite(new_weights)).sum())
        if bad:
            extra = {**extra, "non_finite": bad}
        else:
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
        """Forget an in-flight task; return the weights it started from (None unless kept)."""
        del self.in_flight[task.task_id]
        del self._busy[task.client]
        start = self.start_weights.get(task.version)
        left = self._refs[task.version] - 1
        if left:
            self._refs[task.version] = left
        else:  # no in-flight task started from this version any more
            del self._refs[task.version]
            self.start_weights.pop(task.version, None)
        own = self.task_starts.pop(task.task_id, None)
        return own if own is not None else start

    # -- checkpointing
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(
            started=self.started,
            stopped=self.stopped,
            online=sorted(self.online),
            in_flight=[asdict(t) for t in self.in_flight.values()],
            start_weights={v: w.clone() for v, w in self.start_weights.items()},
            task_starts=dict(self.task_starts),  # shared tensors: torch.save stores each once
            recent_norms=list(self.recent_norms),
            rejected=list(self.rejected),
            reject_streak=list(self.reject_streak),
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
        copies: dict[int, torch.Tensor] = {}  # one copy per distinct tensor, as at save time
        self.task_starts = {}
        for t, w in state.get("task_starts", {}).items():
            if id(w) not in copies:
                copies[id(w)] = w.clone()
            self.task_starts[int(t)] = copies[id(w)]
        self.recent_norms = deque((float(x) for x in state.get("recent_norms", ())), maxlen=self.checks.norm_window)
        self.rejected = [int(x) for x in state.get("rejected", [0] * self.ctx.num_clients)]
        self.reject_streak = [int(x) for x in state.get("reject_streak", [0] * self.ctx.num_clients)]
