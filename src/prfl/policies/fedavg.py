"""Synchronous FedAvg (McMahan et al.): a cohort per round, averaged by sample count."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from prfl.aggregation import ACCUMULATE_DTYPE
from prfl.client.result import TaskResult
from prfl.policies.base import (
    Action,
    PolicyContext,
    Record,
)
from prfl.policies.fleet import FleetPolicy, InFlight, check_number


# --------------------------------------------------------------------------- FedAvg
@dataclass(frozen=True)
class FedAvgConfig:
    """FedAvg options.

    ``fraction``: cohort fraction C; a round samples max(ceil(C*K), min_clients) of the online,
    free clients (all of them when fewer are available). ``min_clients``: a round starts only
    once at least this many clients are online and free.
    """

    fraction: float = 1.0
    min_clients: int = 1

    def __post_init__(self) -> None:
        check_number("fraction", self.fraction, low=0.0, low_open=True, high=1.0)
        check_number("min_clients", self.min_clients, low=1, integer=True)


class FedAvg(FleetPolicy):
    """Synchronous FedAvg: dispatch to a cohort, wait for every task, average by sample count.

    New weights = sum_i n_i W_i / sum_i n_i over the results that arrived (n_i: the result's
    sample count). Failed tasks are left out; if the whole cohort failed, the weights are kept
    and a new cohort is sampled. Cohorts are drawn by address ``(seed, "cohort", version)``
    (``(seed, "cohort", version, attempt)`` when resampling after a failed round).
    """

    name = "fedavg"
    config_cls = FedAvgConfig
    weights_by_samples = True

    def __init__(self, ctx: PolicyContext, config: FedAvgConfig | None = None) -> None:
        super().__init__(ctx, config)
        if self.config.min_clients > ctx.num_clients:
            raise ValueError(
                f"min_clients={self.config.min_clients} exceeds the number of clients ({ctx.num_clients})"
            )
        self.cohort_size = max(math.ceil(self.config.fraction * ctx.num_clients - 1e-9),
                               self.config.min_clients)
        self.cohort: list[int] = []  # clients of the round in progress ([] between rounds)
        self.arrived: list[int] = []
        self.failed: list[int] = []
        self.attempt = 0  # rounds at this version whose whole cohort failed
        # sum_i n_i W_i, in float64 so that one model (or identical ones) average to themselves
        self._acc = torch.zeros(self.weights.shape, dtype=ACCUMULATE_DTYPE)
        self._acc_n = 0.0  # sum_i n_i

    def _on_start(self, now: float) -> list[Action]:
        return self._start_round(now)

    def _on_client_idle(self, now: float, client: int) -> list[Action]:
        # Mid-round newcomers wait for the next cohort draw.
        return [] if self.cohort else self._start_round(now)

    def _on_result(self, now: float, result: TaskResult) -> list[Action]:
        arrival = self.take_result(result)  # a bad sample count is rejected there, like any bad update
        n = result.num_samples
        self._acc.add_(arrival.weights, alpha=float(n))
        self._acc_n += float(n)
        self.arrived.append(arrival.task.client)
        return self._maybe_close(now)

    def _on_task_failed(self, now: float, task: InFlight) -> list[Action]:
        self.failed.append(task.client)
        return self._maybe_close(now)

    def _start_round(self, now: float) -> list[Action]:
        cohort = self.draw_cohort(self.cohort_size, self.config.min_clients, self.attempt)
        if cohort is None:
            return []
        self.cohort = cohort
        return [self.dispatch(c, now) for c in self.cohort]

    def _maybe_close(self, now: float) -> list[Action]:
        if self.in_flight:
            return []
        if self.arrived and self._acc_n <= 0:
            raise ValueError("every result of the round reports num_samples = 0; cannot weight the average")
        cohort, arrived, failed = self.cohort, self.arrived, self.failed
        self.cohort, self.arrived, self.failed = [], [], []
        if arrived:
            new = (self._acc / self._acc_n).to(self.weights.dtype)
            self._acc = torch.zeros_like(self._acc)
            self._acc_n = 0.0
            self.attempt = 0
            actions = self.commit(new, now, sorted(arrived), [0] * len(arrived),
                                  cohort=cohort, failed=sorted(failed))
        else:
            self.attempt += 1
            actions = [Record("round_failed", {"round": self.version, "cohort": cohort,
                                               "attempt": self.attempt})]
        if not self.stopped:
            actions += self._start_round(now)
        return actions

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(cohort=list(self.cohort), arrived=list(self.arrived), failed=list(self.failed),
                     attempt=self.attempt, acc=self._acc.clone(), acc_n=self._acc_n)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.cohort = list(state["cohort"])
        self.arrived = list(state["arrived"])
        self.failed = list(state["failed"])
        self.attempt = int(state["attempt"])
        self._acc = state["acc"].clone()
        self._acc_n = float(state["acc_n"])
