"""FedAsync: mix every arriving model into the global one, down-weighted by its staleness."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch

from prfl.aggregation import STALENESS_KINDS, staleness_weight
from prfl.client.result import TaskResult
from prfl.policies.base import Action, Dispatch, PolicyContext, SetTimer
from prfl.policies.fleet import Arrival, FleetPolicy, InFlight, check_number

STEP_TIMER = "fedasync:step"
STEPS = ("arrival", "reference")


@dataclass(frozen=True)
class FedAsyncConfig:
    """FedAsync options: mixing weight ``alpha`` in (0, 1] and the staleness function
    ``staleness`` (const | poly | hinge) with its parameters ``a`` (poly exponent / hinge slope)
    and ``b`` (hinge point), as in :func:`prfl.aggregation.staleness_weight`.

    ``steps``: ``arrival`` (default, Xie et al.): every arrival is a server step at once;
    ``reference``: the PR-FL reference code's FedAsync (``-m fedasyn``), one arrival per server
    step with the mixing weight s_i / sum_j s_j (``alpha`` unused); set by the simulator's
    reference accounting, and needs its step timing (see :class:`FedAsync`).
    """

    alpha: float = 0.6  # mixing weight of an arriving model, in (0, 1]
    staleness: str = "poly"  # staleness function s(tau): const, poly or hinge
    a: float = 0.6  # poly: s = (1 + tau)^-a; hinge: slope of 1 / (a (tau - b) + 1) after b
    b: float = 2.0  # hinge: the staleness up to which s = 1
    steps: Literal["arrival", "reference"] = "arrival"  # reference: one arrival per step, weight s_i / sum s_j

    def __post_init__(self) -> None:
        check_number("alpha", self.alpha, low=0.0, low_open=True, high=1.0)
        if self.staleness not in STALENESS_KINDS:
            raise ValueError(
                f"staleness must be one of {', '.join(STALENESS_KINDS)}, got {self.staleness!r}"
            )
        check_number("a", self.a, low=0.0)
        check_number("b", self.b, low=0.0)
        if self.steps not in STEPS:
            raise ValueError(f"steps must be one of {', '.join(STEPS)}, got {self.steps!r}")


class FedAsync(FleetPolicy):
    """FedAsync. With ``steps: arrival``, on each arrival, with tau = version - result.version,

        alpha_t = alpha * s(tau),   x <- (1 - alpha_t) x + alpha_t x_new,   version += 1,

    and the client is sent the new model at once. Every client starts at Start; a client whose
    task failed gets a new task when it is back (``ClientIdle``).

    With ``steps: reference`` (the reference code, R:2164-2202 and 786-831) the server works in
    steps timed by ``ctx.step_timing`` with window 0: a step that starts at t and sends a model of
    D bytes closes at t + D / server_up + 0.1 s (0.1 s when it sent nothing). At a close, of the
    results that have arrived and wait, exactly one is merged: the first in round-robin client
    order after the last merged client. With s_j = s(tau_j) the staleness weight of client j's
    latest merged update (tau counted in server steps at its merge; s_j = 0 for a client never
    merged), the merge is

        p = s_i / sum_j s_j,   x <- (1 - p) x + p x_i,

    so the first update ever merged replaces the model. The merged client gets the new model at
    once; the other waiting results stay for later steps, their clients idle until merged.
    """

    name = "fedasync"
    config_cls = FedAsyncConfig

    def __init__(self, ctx: PolicyContext, config: FedAsyncConfig | None = None) -> None:
        super().__init__(ctx, config)
        if self.config.steps == "reference" and ctx.step_timing is None:
            raise ValueError(
                "steps 'reference' times server steps by the reference simulator's rule, which needs "
                "the server's uplink speed: run it with sim.accounting: reference, or use steps: arrival"
            )
        n = ctx.num_clients
        self.waiting: list[Arrival] = []  # arrived results not yet merged (reference steps)
        self.last_weight = [0.0] * n  # s_j of each client's latest merged update (reference steps)
        self.next_client = 0  # round-robin pointer: the search for the next merge starts here
        self.step_start = 0.0  # when the current server step started
        self.step_length = 0.0  # its length (from the download sent at its start)
        self.timer_set = False

    # -- events
    def _on_start(self, now: float) -> list[Action]:
        actions: list[Action] = [self.dispatch(c, now) for c in self.free_clients()]
        if self.config.steps == "reference":
            self._begin_step(now, actions)
        return actions

    def _on_result(self, now: float, result: TaskResult) -> list[Action]:
        arrival = self.take_result(result)
        if self.config.steps == "reference":
            self.waiting.append(arrival)
            return self._arm(now)
        cfg = self.config
        alpha_t = cfg.alpha * staleness_weight(cfg.staleness, arrival.staleness, cfg.a, cfg.b)
        new = torch.lerp(self.weights, arrival.weights, alpha_t)
        client = arrival.task.client
        actions = self.commit(new, now, [client], [arrival.staleness], alpha_t=alpha_t)
        if not self.stopped:
            actions.append(self.dispatch(client, now))
        return actions

    def _on_timer(self, now: float, key: str) -> list[Action]:
        if key != STEP_TIMER or self.config.steps != "reference":
            return super()._on_timer(now, key)
        self.timer_set = False
        actions: list[Action] = []
        if self.waiting:
            actions = self._merge_one(now)
        if not self.stopped:
            self._begin_step(now, actions)
            actions += self._arm(now)
        return actions

    def _on_client_idle(self, now: float, client: int) -> list[Action]:
        if any(a.task.client == client for a in self.waiting):
            return []  # its result waits for a step; it gets the new model when that is merged
        return super()._on_client_idle(now, client)

    # -- reference steps
    def _begin_step(self, now: float, actions: list[Action]) -> None:
        """A step starts at ``now`` with the tasks dispatched in ``actions``."""
        timing = self.ctx.step_timing
        assert timing is not None
        self.step_start = now
        self.step_length = timing.step_length(0.0, [a.task for a in actions if isinstance(a, Dispatch)])

    def _arm(self, now: float) -> list[Action]:
        """Set the step timer if results wait and it is not set: at the first boundary at or after now."""
        if self.timer_set or not self.waiting:
            return []
        timing = self.ctx.step_timing
        assert timing is not None
        self.timer_set = True
        return [SetTimer(timing.next_close(self.step_start, self.step_length, 0.0, now), STEP_TIMER)]

    def _merge_one(self, now: float) -> list[Action]:
        n = self.ctx.num_clients
        order = {c: (c - self.next_client) % n for c in range(n)}
        arrival = min(self.waiting, key=lambda a: order[a.task.client])
        self.waiting.remove(arrival)
        client = arrival.task.client
        cfg = self.config
        tau = self.version - arrival.task.version
        self.last_weight[client] = staleness_weight(cfg.staleness, tau, cfg.a, cfg.b)
        total = sum(self.last_weight)
        p = self.last_weight[client] / total if total > 0 else 1.0
        new = torch.lerp(self.weights, arrival.weights, p)
        self.next_client = (client + 1) % n
        actions = self.commit(new, now, [client], [tau], alpha_t=p)
        if not self.stopped:
            actions.append(self.dispatch(client, now))
        return actions

    # -- checkpoints
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(
            waiting=[{"task": asdict(a.task), "weights": a.weights, "staleness": a.staleness} for a in self.waiting],
            last_weight=list(self.last_weight),
            next_client=self.next_client,
            step_start=self.step_start,
            step_length=self.step_length,
            timer_set=self.timer_set,
        )
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.waiting = [Arrival(InFlight(**w["task"]), w["weights"].clone(), None, int(w["staleness"]))
                        for w in state.get("waiting", [])]
        self.last_weight = [float(x) for x in state.get("last_weight", [0.0] * self.ctx.num_clients)]
        self.next_client = int(state.get("next_client", 0))
        self.step_start = float(state.get("step_start", 0.0))
        self.step_length = float(state.get("step_length", 0.0))
        self.timer_set = bool(state.get("timer_set", False))
