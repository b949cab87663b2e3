"""Helpers to script policy events by hand, plus a tiny deterministic event loop for
checkpoint and stopping tests (no devices, no links: fixed task durations)."""

from __future__ import annotations

import heapq
from typing import Any

import torch

from prfl.runtime.checkpoint import dumps, loads
from prfl.client.result import TaskResult
from prfl.policies.base import (
    Action,
    ClientIdle,
    Dispatch,
    Event,
    Policy,
    PolicyContext,
    Record,
    RequestEvaluation,
    ResultArrived,
    SetTimer,
    Stop,
    TaskFailed,
    TaskSpec,
    TimerFired,
)

DIM = 6
NUM_PRUNABLE = 4


def make_ctx(num_samples: tuple[int, ...] = (10, 20, 30), init: float = 0.0, **kw: Any) -> PolicyContext:
    return PolicyContext(
        num_clients=len(num_samples),
        num_samples=num_samples,
        initial_weights=torch.full((DIM,), init, dtype=torch.float32),
        num_prunable=NUM_PRUNABLE,
        **kw,
    )


def vec(value: float | list[float]) -> torch.Tensor:
    if isinstance(value, list):
        return torch.tensor(value, dtype=torch.float32)
    return torch.full((DIM,), float(value), dtype=torch.float32)


def tasks(actions: list[Action]) -> list[TaskSpec]:
    return [a.task for a in actions if isinstance(a, Dispatch)]


def task_of(actions: list[Action], client: int) -> TaskSpec:
    (task,) = [t for t in tasks(actions) if t.client == client]
    return task


def updates(actions: list[Action]) -> list[dict[str, Any]]:
    return [a.data for a in actions if isinstance(a, Record) and a.kind == "server_update"]


def stops(actions: list[Action]) -> list[Stop]:
    return [a for a in actions if isinstance(a, Stop)]


def result(task: TaskSpec, weights: float | list[float] | torch.Tensor, num_samples: int = 1) -> TaskResult:
    w = weights if isinstance(weights, torch.Tensor) else vec(weights)
    return TaskResult(
        task_id=task.task_id, client=task.client, version=task.version, weights=w,
        num_samples=num_samples, mean_loss=0.0, steps=1, compute_seconds=0.0,
    )


def arrive(policy: Policy, task: TaskSpec, weights: Any, now: float = 0.0, num_samples: int | None = None) -> list[Action]:
    n = policy.ctx.num_samples[task.client] if num_samples is None else num_samples
    return policy.on_event(ResultArrived(now, result(task, weights, n)))


def checkpoint(policy: Policy) -> dict[str, Any]:
    """state_dict through the checkpoint file format (prfl.runtime.checkpoint), as a real checkpoint."""
    return loads(dumps(policy.state_dict()))


def comparable(actions: list[Action]) -> list[tuple]:
    out: list[tuple] = []
    for a in actions:
        if isinstance(a, Dispatch):
            t = a.task
            out.append(("dispatch", t.task_id, t.client, t.version, t.weights.tolist()))
        elif isinstance(a, RequestEvaluation):  # its model, built now (it may be made on demand)
            out.append(("RequestEvaluation", a.tag, a.model().tolist()))
        else:
            out.append((type(a).__name__, repr(a)))
    return out


class MiniLoop:
    """Feeds a policy in time order. A task of client c takes ``durations[c]``; its result is
    ``start weights + (c + 1) * step`` on every coordinate. Tasks whose id is in ``fail_tasks``
    fail at their finish time and the client is idle again one duration later."""

    def __init__(self, policy: Policy, durations: list[float], fail_tasks: frozenset[int] = frozenset(),
                 step: float = 0.25) -> None:
        self.policy = policy
        self.durations = durations
        self.fail_tasks = fail_tasks
        self.step = step
        self.queue: list[tuple[float, int, Event]] = []
        self.seq = 0
        self.log: list[tuple] = []
        self.stopped = False

    def clone_for(self, policy: Policy) -> "MiniLoop":
        other = MiniLoop(policy, self.durations, self.fail_tasks, self.step)
        other.queue = list(self.queue)
        other.seq = self.seq
        other.stopped = self.stopped
        return other

    def push(self, at: float, event: Event) -> None:
        heapq.heappush(self.queue, (at, self.seq, event))
        self.seq += 1

    def feed(self, event: Event) -> list[Action]:
        actions = self.policy.on_event(event)
        self.log.extend(comparable(actions))
        for a in actions:
            if isinstance(a, Dispatch):
                t = a.task
                done = event.now + self.durations[t.client]
                if t.task_id in self.fail_tasks:
                    self.push(done, TaskFailed(done, t.client, t.task_id, "scripted"))
                    self.push(done + self.durations[t.client], ClientIdle(done + self.durations[t.client], t.client))
                else:
                    w = t.weights + (t.client + 1) * self.step
                    n = self.policy.ctx.num_samples[t.client]
                    self.push(done, ResultArrived(done, result(t, w, n)))
            elif isinstance(a, SetTimer):
                self.push(a.at, TimerFired(a.at, a.key))
            elif isinstance(a, Stop):
                self.stopped = True
        return actions

    def run(self, steps: int) -> None:
        for _ in range(steps):
            if not self.queue:
                return
            _, _, event = heapq.heappop(self.queue)
            self.feed(event)
