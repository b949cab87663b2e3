"""FedBuff: buffer K staleness-weighted client deltas, then apply their mean."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from prfl.aggregation import fedbuff_staleness
from prfl.client.result import TaskResult
from prfl.policies.base import Action, PolicyContext
from prfl.policies.fleet import FleetPolicy, check_number


@dataclass(frozen=True)
class FedBuffConfig:
    """FedBuff options.

    ``k``: deltas buffered per server update. Each arrival is one delta, so a fast client may fill
    several slots of one buffer and ``k`` may exceed the number of clients. ``server_lr``: step
    applied to the buffered mean.
    """

    k: int = 10
    server_lr: float = 1.0

    def __post_init__(self) -> None:
        check_number("k", self.k, low=1, integer=True)
        check_number("server_lr", self.server_lr, low=0.0, low_open=True)


class FedBuff(FleetPolicy):
    """FedBuff: each arrival adds s(tau) (W_i - W_sent) to an accumulator, s(tau) = 1/sqrt(1+tau),
    tau = version - result.version, W_sent the weights the task started from. Once K deltas are
    buffered:  x <- x + server_lr * accumulator / K,  version += 1, buffer cleared.

    The returning client is redispatched at once, after the update if its delta filled the buffer
    (so it starts from the freshest model).
    """

    name = "fedbuff"
    config_cls = FedBuffConfig
    keeps_start_weights = True

    def __init__(self, ctx: PolicyContext, config: FedBuffConfig | None = None) -> None:
        super().__init__(ctx, config)
        self.accumulator = torch.zeros_like(self.weights)
        self.buffered_clients: list[int] = []
        self.buffered_staleness: list[int] = []

    def _on_start(self, now: float) -> list[Action]:
        return [self.dispatch(c, now) for c in self.free_clients()]

    def _on_result(self, now: float, result: TaskResult) -> list[Action]:
        arrival = self.take_result(result)
        assert arrival.start is not None  # keeps_start_weights
        s = fedbuff_staleness(arrival.staleness)
        self.accumulator.add_(arrival.weights - arrival.start, alpha=s)
        self.buffered_clients.append(arrival.task.client)
        self.buffered_staleness.append(arrival.staleness)
        actions: list[Action] = []
        if len(self.buffered_clients) >= self.config.k:
            step = self.config.server_lr / self.config.k
            new = self.weights + step * self.accumulator
            clients, staleness = self.buffered_clients, self.buffered_staleness
            self.accumulator = torch.zeros_like(self.weights)
            self.buffered_clients, self.buffered_staleness = [], []
            actions = self.commit(new, now, clients, staleness)
        if not self.stopped:
            actions.append(self.dispatch(arrival.task.client, now))
        return actions

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(accumulator=self.accumulator.clone(),
                     buffered_clients=list(self.buffered_clients),
                     buffered_staleness=list(self.buffered_staleness))
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.accumulator = state["accumulator"].clone()
        self.buffered_clients = list(state["buffered_clients"])
        self.buffered_staleness = list(state["buffered_staleness"])
