"""PR-FL's checkpoint state (:class:`PRFLCheckpoint`, a part of :class:`prfl.policies.prfl.PRFL`):
the fleet's state plus the density controller, ranking, importance scores, buffer, aggregation
window, residual split and piece ledger, and the recovery monitors. Checkpoints of earlier
versions, which kept the piece ledger's parts apart, still load."""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import torch

from prfl.buffer import ClientBuffer
from prfl.client.result import TaskResult
from prfl.distribution import PieceLedger, ResidualSplit
from prfl.policies.fleet import FleetPolicy, TaskInFlight
from prfl.pruning.density import DensityController
from prfl.pruning.importance import ImportanceScores
from prfl.pruning.ranking import Ranking, floor_mask, rank_with_floor
from prfl.pruning.recovery import EarlyStopping
from prfl.runtime.checkpoint import Near, materialize


class PRFLCheckpoint(FleetPolicy):
    """state_dict / load_state_dict of :class:`~prfl.policies.prfl.PRFL` (a mixin on its state)."""

    total: int
    control: DensityController
    ranking: Ranking
    ranking_id: int
    model_id: int
    scores: ImportanceScores
    armed: bool
    first_stage: bool
    local_rounds: list[int]
    control_steps: int
    last_arrival: list[float]
    _imp_asked: set[int]
    _masks: dict[float, torch.Tensor]
    buffer: ClientBuffer
    window: list[tuple[TaskInFlight, TaskResult, int]]
    task_masks: dict[int, torch.Tensor | None]
    task_orders: dict[int, torch.Tensor]
    window_open: bool
    step_start: float
    step_length: float
    _split: ResidualSplit | None
    _split_key: tuple[int, int, tuple[float, ...]] | None
    _split_id: int
    ledger: PieceLedger
    monitor: EarlyStopping
    client_monitors: list[EarlyStopping]
    buffered_models: list[int]
    scored_models: list[int]
    best_weights: torch.Tensor
    best_buffer: ClientBuffer | None
    best_scores: torch.Tensor | None
    final_phase: bool
    ranked_from: torch.Tensor | None

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(
            control=self.control.state_dict(),
            **self._ranking_state(),
            ranking_floor=self.ranking.floor_count,
            ranking_id=self.ranking_id,
            model_id=self.model_id,
            scores=self.scores.state_dict(),
            armed=self.armed,
            first_stage=self.first_stage,
            local_rounds=list(self.local_rounds),
            control_steps=self.control_steps,
            last_arrival=list(self.last_arrival),
            imp_asked=sorted(self._imp_asked),
            buffer=self.buffer.state_dict(near=state["weights"]),
            window=[(dataclasses.asdict(t), r, st) for t, r, st in self.window],
            task_masks=dict(self.task_masks),
            task_orders=dict(self.task_orders),
            window_open=self.window_open,
            step_start=self.step_start,
            step_length=self.step_length,
            split_id=self._split_id,
            split_key=self._split_key,
            ledger=self.ledger.state_dict(),
            monitor=self.monitor.state_dict(),
            client_monitors=[m.state_dict() for m in self.client_monitors],
            buffered_models=list(self.buffered_models),
            scored_models=list(self.scored_models),
            best_weights=Near(self.best_weights.clone(), state["weights"]),
            best_buffer=None if self.best_buffer is None else self.best_buffer.state_dict(),
            best_scores=None if self.best_scores is None else self.best_scores.clone(),
            final_phase=self.final_phase,
        )
        return state

    def _ranking_state(self) -> dict[str, Any]:
        """The ranking: built from the persistent importance scores (which the checkpoint holds
        anyway), it is kept as its magnitude floor (a bit a weight) and a digest, and rebuilt on
        loading; otherwise (magnitudes, or scores that do not persist) as its permutation."""
        if self.ranked_from is not None and self.ranked_from is self.scores.scores:
            return {"ranking_order": None, "ranking_in_floor": floor_mask(self.ranking),
                    "ranking_digest": _digest(self.ranking.order)}
        return {"ranking_order": self.ranking.order.clone()}

    def _load_ranking(self, state: dict[str, Any]) -> None:
        if state["ranking_order"] is not None:
            self.ranking = Ranking(state["ranking_order"].clone(), state["ranking_floor"])
            self.ranked_from = None
            return
        scores = self.scores.scores
        if scores is None:
            raise ValueError("the checkpoint keeps its ranking as the importance scores it was built from, but has no scores")
        cost = self.ctx.layer_cost if self.config.layer_cost else None
        ranking = rank_with_floor(scores, state["ranking_in_floor"], self.ctx.layer_bounds, layer_cost=cost)
        if ranking.floor_count != int(state["ranking_floor"]) or _digest(ranking.order) != state["ranking_digest"]:
            raise ValueError("the ranking rebuilt from the checkpoint's importance scores differs from the one the run "
                             "had (a checkpoint of a different configuration or prfl version?)")
        self.ranking, self.ranked_from = ranking, scores

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.control.load_state_dict(state["control"])
        self.ranking_id = state["ranking_id"]
        self.model_id = state["model_id"]
        self.scores.load_state_dict(state["scores"])
        self._load_ranking(state)
        self.armed = bool(state["armed"])
        self.first_stage = bool(state["first_stage"])
        self.local_rounds = [int(x) for x in state["local_rounds"]]
        self.control_steps = int(state["control_steps"])
        self.last_arrival = [float(x) for x in state["last_arrival"]]
        self._imp_asked = set(state.get("imp_asked", ()))
        self._masks = {}
        self.buffer.load_state_dict(state["buffer"])
        self.window = [(TaskInFlight(**t), r, st) for t, r, st in state["window"]]
        self.task_masks = dict(state["task_masks"])
        self.task_orders = dict(state.get("task_orders", {}))
        self.window_open = state["window_open"]
        self.step_start = float(state.get("step_start", 0.0))
        self.step_length = float(state.get("step_length", 0.0))
        self._split, self._split_key, self._split_id = None, None, state["split_id"]
        key = state.get("split_key")
        if key is not None:  # rebuild the split in force, so a resumed run publishes exactly the same pieces
            model_id, ranking_id, levels = key
            self._split_key = (int(model_id), int(ranking_id), tuple(float(d) for d in levels))
            self._split = ResidualSplit(self.ranking, self._split_key[2], self._split_id, self.total)
        if "ledger" in state:
            self.ledger.load_state_dict(state["ledger"])
        else:  # a checkpoint of an earlier version, which kept the ledger's parts apart
            self.ledger.load_state_dict({
                "values": state["held"], "index": state["held_index"], "publisher": state["publisher"],
                "published_index": state["published_index"], "structure": state["structure_id"],
                "structure_key": state["structure_key"],
            })
        self.monitor.load_state_dict(state["monitor"])
        for m, s in zip(self.client_monitors, state["client_monitors"]):
            m.load_state_dict(s)
        # checkpoints of earlier versions did not count the models: every buffered client is
        # then checked at the next control step, as those versions checked them
        n = self.ctx.num_clients
        self.buffered_models = [int(x) for x in state.get("buffered_models", [1] * n)]
        self.scored_models = [int(x) for x in state.get("scored_models", [0] * n)]
        self.best_weights = materialize(state["best_weights"]).clone()
        self.best_buffer = None
        if state.get("best_buffer") is not None:  # (checkpoints of earlier versions saved no buffer)
            self.best_buffer = self.buffer.empty_like()
            self.best_buffer.load_state_dict(state["best_buffer"])
        # (checkpoints of earlier versions saved no scores: a roll-back then keeps the current ones)
        saved = state.get("best_scores")
        self.best_scores = None if saved is None else materialize(saved).clone()
        self.final_phase = state["final_phase"]


def _digest(order: torch.Tensor) -> str:
    """SHA-256 of a ranking's permutation (as int64), hex."""
    return hashlib.sha256(order.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()
