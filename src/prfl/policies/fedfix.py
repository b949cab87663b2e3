"""FedFix: aggregate at fixed times n*dt whatever clients have finished by then."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from prfl.client.result import TaskResult
from prfl.policies.base import Action, PolicyContext, SetTimer
from prfl.policies.fleet import FleetPolicy, check_number

TIMER_KEY = "aggregate"

# Tolerance when counting periods, so a duration of exactly k*dt computed in floating point
# (e.g. 0.7 - 0.4 = 0.29999999999999993 or 0.30000000000000004 for 3 * 0.1) counts k periods.
_PERIOD_EPS = 1e-9


@dataclass(frozen=True)
class FedFixConfig:
    """FedFix options: ``dt`` the aggregation period (virtual seconds, required) and ``eta_g``
    the server learning rate."""

    dt: float  # aggregation period, virtual seconds (required)
    eta_g: float = 1.0  # server learning rate

    def __post_init__(self) -> None:
        check_number("dt", self.dt, low=0.0, low_open=True)
        check_number("eta_g", self.eta_g, low=0.0, low_open=True)


@dataclass(frozen=True)
class Finished:
    """A result waiting for the next aggregation time."""

    client: int
    delta: torch.Tensor  # theta_i - theta_sent_i
    duration: float  # virtual time from dispatch to arrival
    staleness: int  # server rounds between dispatch and arrival


class FedFix(FleetPolicy):
    """FedFix (arXiv 2206.10189): at every time t0 + n*dt the server applies

        theta <- theta + eta_g * sum_i d_i (theta_i - theta_sent_i),
        d_i = ceil(tau_i / dt) * p_i,   p_i = n_i / sum_j n_j (over all clients),

    over the clients that finished since the last aggregation, tau_i being the virtual time the
    client's task took from dispatch to arrival (at least one period is counted). Finished
    clients wait and restart from the new model; if nobody finished, the model and version stay.
    A client back online (``ClientIdle``) with no task starts at once from the current model.
    """

    name = "fedfix"
    config_cls = FedFixConfig
    keeps_start_weights = True

    def __init__(self, ctx: PolicyContext, config: FedFixConfig | None = None) -> None:
        if config is None:
            raise ValueError("fedfix needs a FedFixConfig with the aggregation period dt")
        super().__init__(ctx, config)
        total = sum(ctx.num_samples)
        if total <= 0:
            raise ValueError("fedfix weights clients by num_samples, whose total must be positive")
        self.p = [n / total for n in ctx.num_samples]
        self.finished: dict[int, Finished] = {}  # client -> result waiting for aggregation
        self.next_aggregation: float | None = None

    def is_free(self, client: int) -> bool:
        return super().is_free(client) and client not in self.finished

    def _on_start(self, now: float) -> list[Action]:
        self.next_aggregation = now + self.config.dt
        actions: list[Action] = [self.dispatch(c, now) for c in self.free_clients()]
        actions.append(SetTimer(self.next_aggregation, TIMER_KEY))
        return actions

    def _on_result(self, now: float, result: TaskResult) -> list[Action]:
        arrival = self.take_result(result)
        assert arrival.start is not None  # keeps_start_weights
        task = arrival.task
        self.finished[task.client] = Finished(
            task.client, arrival.weights - arrival.start, float(now) - task.dispatched_at,
            arrival.staleness,
        )
        return []

    def _on_timer(self, now: float, key: str) -> list[Action]:
        if key != TIMER_KEY:
            raise ValueError(f"fedfix set only the timer {TIMER_KEY!r}, got TimerFired({key!r})")
        assert self.next_aggregation is not None
        actions: list[Action] = []
        if self.finished:
            done = [self.finished[c] for c in sorted(self.finished)]
            self.finished = {}
            d = [self._period_weight(f) for f in done]
            update = torch.zeros_like(self.weights)
            for f, d_i in zip(done, d):
                update.add_(f.delta, alpha=d_i)
            new = self.weights + self.config.eta_g * update
            clients = [f.client for f in done]
            actions = self.commit(new, now, clients, [f.staleness for f in done], d=d)
            if self.stopped:
                return actions
            actions += [self.dispatch(c, now) for c in clients if self.is_free(c)]
        while self.next_aggregation <= now:
            self.next_aggregation += self.config.dt
        actions.append(SetTimer(self.next_aggregation, TIMER_KEY))
        return actions

    def _period_weight(self, f: Finished) -> float:
        periods = max(1, math.ceil(f.duration / self.config.dt - _PERIOD_EPS))
        return periods * self.p[f.client]

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(
            finished=[{"client": f.client, "delta": f.delta.clone(), "duration": f.duration,
                       "staleness": f.staleness} for f in self.finished.values()],
            next_aggregation=self.next_aggregation,
        )
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.finished = {}
        for f in state["finished"]:
            self.finished[int(f["client"])] = Finished(
                int(f["client"]), f["delta"].clone(), float(f["duration"]), int(f["staleness"])
            )
        na = state["next_aggregation"]
        self.next_aggregation = None if na is None else float(na)
