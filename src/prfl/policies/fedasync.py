"""FedAsync: mix every arriving model into the global one, down-weighted by its staleness."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prfl.aggregation import STALENESS_KINDS, staleness_weight
from prfl.client.result import TaskResult
from prfl.policies.base import Action, PolicyContext
from prfl.policies.fleet import FleetPolicy, check_number


@dataclass(frozen=True)
class FedAsyncConfig:
    """FedAsync options: mixing weight ``alpha`` in (0, 1] and the staleness function
    ``staleness`` (const | poly | hinge) with its parameters ``a`` (poly exponent / hinge slope)
    and ``b`` (hinge point), as in :func:`prfl.aggregation.staleness_weight`."""

    alpha: float = 0.6  # mixing weight of an arriving model, in (0, 1]
    staleness: str = "poly"  # staleness function s(tau): const, poly or hinge
    a: float = 0.6  # poly: s = (1 + tau)^-a; hinge: slope of 1 / (a (tau - b) + 1) after b
    b: float = 2.0  # hinge: the staleness up to which s = 1

    def __post_init__(self) -> None:
        check_number("alpha", self.alpha, low=0.0, low_open=True, high=1.0)
        if self.staleness not in STALENESS_KINDS:
            raise ValueError(
                f"staleness must be one of {', '.join(STALENESS_KINDS)}, got {self.staleness!r}"
            )
        check_number("a", self.a, low=0.0)
        check_number("b", self.b, low=0.0)


class FedAsync(FleetPolicy):
    """FedAsync: on each arrival, with tau = version - result.version,

        alpha_t = alpha * s(tau),   x <- (1 - alpha_t) x + alpha_t x_new,   version += 1,

    and the client is sent the new model at once. Every client starts at Start; a client whose
    task failed gets a new task when it is back (``ClientIdle``).
    """

    name = "fedasync"
    config_cls = FedAsyncConfig

    def __init__(self, ctx: PolicyContext, config: FedAsyncConfig | None = None) -> None:
        super().__init__(ctx, config)

    def _on_start(self, now: float) -> list[Action]:
        return [self.dispatch(c, now) for c in self.free_clients()]

    def _on_result(self, now: float, result: TaskResult) -> list[Action]:
        arrival = self.take_result(result)
        cfg = self.config
        alpha_t = cfg.alpha * staleness_weight(cfg.staleness, arrival.staleness, cfg.a, cfg.b)
        new = torch.lerp(self.weights, arrival.weights, alpha_t)
        client = arrival.task.client
        actions = self.commit(new, now, [client], [arrival.staleness], alpha_t=alpha_t)
        if not self.stopped:
            actions.append(self.dispatch(client, now))
        return actions
