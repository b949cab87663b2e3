"""PR-FL's control loop (:class:`PRFLControl`, a part of :class:`prfl.policies.prfl.PRFL`).

Every I rounds the control step sets new densities (:class:`prfl.pruning.density.DensityController`),
builds a new importance ranking (old rankings are then cut to the prefixes still in use) and asks
for the scores of the recovery monitors: the server score of an average of the buffered models
(``server_score``) and, with ``client_scores``, each buffered client's. The scores come back as
``EvaluationDone``: a stalled client's minimum density (or density, ``client_recovery``) rises by
``delta_rho``; when the server monitor runs out of patience the first time it arms the roll-back
and saves the state (the weights, a copy of the buffer and the importance scores, saved again at
each improvement from then on), later run-outs restore that state and raise every minimum
density, and once every density is 1 the next run-out stops the run. A client that sent no new
model since its last check is not checked. With ``minimum_rule: follow`` the minimums also follow
the lowest density upwards, and a density held at a raised minimum ends the first stage.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any

import torch

from prfl.buffer import ClientBuffer, order_dtype
from prfl.policies.base import Action, EvaluationDone, Record, RequestEvaluation, Stop
from prfl.policies.fleet import FleetPolicy
from prfl.pruning.density import DensityController
from prfl.pruning.importance import ImportanceScores
from prfl.pruning.ranking import Ranking, build_ranking
from prfl.pruning.recovery import EarlyStopping

if TYPE_CHECKING:
    from prfl.policies.prfl import PRFLConfig

SERVER_SCORE = "prfl:server-score"
CLIENT_SCORE = "prfl:client-score:"


class PRFLControl(FleetPolicy):
    """The control step and the recovery monitors of :class:`~prfl.policies.prfl.PRFL` (a mixin:
    it works on the policy's state, which ``PRFL.__init__`` sets up)."""

    config: PRFLConfig
    num_prunable: int
    control: DensityController
    ranking: Ranking
    ranking_id: int
    model_id: int
    scores: ImportanceScores
    _imp_asked: set[int]
    _masks: dict[float, torch.Tensor]
    buffer: ClientBuffer
    task_orders: dict[int, torch.Tensor]
    task_masks: dict[int, torch.Tensor | None]
    monitor: EarlyStopping
    client_monitors: list[EarlyStopping]
    best_weights: torch.Tensor
    best_buffer: ClientBuffer | None
    best_scores: torch.Tensor | None
    final_phase: bool
    ranked_from: torch.Tensor | None  # the scores the ranking was built from
    armed: bool
    first_stage: bool
    densities: list[float]  # PRFL.densities

    def _compact_orders(self) -> None:
        """After a new ranking, old ones are needed only up to the densities still in use: the
        tasks in flight keep one shared prefix per old ranking, the buffer cuts its own."""
        if not self.task_orders and not len(self.buffer):
            return
        counts: dict[int, int] = {}  # id(mask) -> kept weights
        need: dict[int, tuple[torch.Tensor, int]] = {}  # id(order) -> (order, longest prefix in use)
        for tid, order in self.task_orders.items():
            mask = self.task_masks.get(tid)
            if mask is None:
                continue
            if id(mask) not in counts:
                counts[id(mask)] = int(torch.count_nonzero(mask))
            held = need.get(id(order))
            need[id(order)] = (order, max(counts[id(mask)], held[1] if held else 0))
        small = order_dtype(self.num_prunable)  # old rankings are kept as int32 copies of their used prefix
        short = {i: order[:cap].to(small, copy=True) for i, (order, cap) in need.items()
                 if cap < order.numel() or order.dtype != small}
        for tid, order in list(self.task_orders.items()):
            if id(order) in short:
                self.task_orders[tid] = short[id(order)]
        self.buffer.compact_orders()

    def _control_step(self) -> list[Action]:
        """Every I rounds: new densities, a new ranking, and the recovery monitor's check."""
        cfg = self.config
        actions: list[Action] = []
        before = self.densities
        if self.first_stage or cfg.adapt_after_recovery:
            after = self.control.update()
            clamped = self.control.clamped if cfg.minimum_rule == "follow" else []
            if after != before or clamped:
                data: dict[str, Any] = {"density": after, "mean_round_time": self.control.mean_times()}
                if clamped:
                    data["clamped"] = list(clamped)
                actions.append(Record("densities", data))
            if clamped:  # the server held a density at its raised minimum: the first stage ends
                self.first_stage = False
                for c in clamped:
                    self.client_monitors[c].bad_checks = 0
        scores = self.scores.take(self.weights[: self.num_prunable]) if cfg.importance else None
        if scores is not None:
            self._rank(scores, actions)
        if cfg.recovery:
            actions.append(RequestEvaluation(self._score_model(), SERVER_SCORE))
            if cfg.client_scores:
                for c in self.buffer.clients():  # each client's model is built when it is evaluated
                    if self.buffered_models[c] == self.scored_models[c]:
                        continue  # nothing new from this client since its last check: no check
                    self.scored_models[c] = self.buffered_models[c]
                    actions.append(RequestEvaluation(partial(self._buffered_model, c), f"{CLIENT_SCORE}{c}"))
        return actions

    def _score_model(self) -> torch.Tensor:
        """The model the server monitor scores (``server_score``): an average of the buffered
        models, weighted by n_i ("plain") or by the aggregation's s_i n_i ("staleness", the
        reference's, which scores the server model itself in the final phase)."""
        cfg = self.config
        if not len(self.buffer) or (cfg.server_score == "staleness" and self.final_phase):
            return self.weights
        coeffs = None
        if cfg.server_score == "staleness":
            coeffs = self.buffer.coefficients(self.version, cfg.staleness, cfg.a, cfg.b, cfg.staleness_mode)
        model = self.buffer.plain_average(torch.float32, coeffs)
        if not bool(torch.isfinite(model.sum())):
            return self.weights  # the fp32 sum overflowed (huge but finite slots): score the model
        return model

    def _rank(self, scores: torch.Tensor, actions: list[Action]) -> None:
        """A new ranking built from importance ``scores`` and the current weights."""
        cfg = self.config
        cost = self.ctx.layer_cost if cfg.layer_cost else None
        self.ranking = build_ranking(scores, self.weights[: self.num_prunable], self.ctx.layer_bounds, cfg.floor,
                                     layer_cost=cost)
        self.ranked_from = scores  # the scores persist (holders rule): a checkpoint rebuilds the ranking from them
        self._imp_asked = set()
        self.ranking_id += 1
        self._masks = {}
        self._compact_orders()
        actions.append(Record("ranking", {"ranking_id": self.ranking_id}))

    def _follow_minimums(self) -> list[Action]:
        """``minimum_rule: follow``, after each server monitor check (and its roll-back, if any)
        and each client recovery: the minimums rise to the lowest density when it lies more than
        0.01 above them; the server monitor's patience then starts afresh, and once every
        minimum is 1 the final phase opens (the reference's R:1476-1484, which runs with recovery on)."""
        cfg = self.config
        if cfg.minimum_rule != "follow" or not cfg.recovery or not self.control.lift_minimums():
            return []
        self.monitor.bad_checks = 0
        rec: dict[str, Any] = {"min_density": list(self.control.minimums), "density": self.densities}
        if self.control.all_dense and not self.final_phase:
            self.final_phase = True
            self.monitor.patience *= cfg.final_patience_factor
            rec["final_phase"] = True
        return [Record("minimums", rec)]

    def _save_best(self) -> None:
        """The state a roll-back returns to: the weights, a copy of the buffer and the persistent
        importance scores (``ImportanceScores.take`` replaces its scores, never changes them in
        place, so the tensor itself is kept)."""
        self.best_weights = self.weights
        self.best_buffer = self.buffer.copy() if self.buffer.path is None else None
        self.best_scores = self.scores.scores

    def _buffered_model(self, client: int) -> torch.Tensor:
        entry = self.buffer.get(client)
        assert entry is not None
        return entry.weights

    def _on_evaluation(self, ev: EvaluationDone) -> list[Action]:
        cfg = self.config
        if ev.tag.startswith(CLIENT_SCORE):
            c = int(ev.tag[len(CLIENT_SCORE) :])
            _, fired = self.client_monitors[c].check(ev.accuracy, self.version)
            if not fired:
                return []
            if cfg.client_recovery == "density" and self.control.densities[c] < 1.0:
                self.control.raise_density(c, cfg.delta_rho)
            elif cfg.client_recovery == "minimum" and self.control.minimums[c] < 1.0:
                self.control.raise_minimum(c, cfg.delta_rho)
            else:
                return []
            self.first_stage = False
            return [Record("recovery", {"scope": "client", "client": c, "min_density": self.control.minimums[c],
                                        "density": self.densities, "score": ev.accuracy}), *self._follow_minimums()]
        if ev.tag != SERVER_SCORE:
            return []
        actions = self._server_check(ev)
        if not self.stopped:  # after the check, as the reference orders them: a rise restarts the patience
            actions += self._follow_minimums()
        return actions

    def _server_check(self, ev: EvaluationDone) -> list[Action]:
        """The server monitor's check of one score: arm, save, roll back and raise, or stop."""
        cfg = self.config
        improved, fired = self.monitor.check(ev.accuracy, self.version)
        if improved:
            if self.armed:
                self._save_best()
            return []
        if not fired:
            return []
        if not self.armed:  # the first run-out only arms the roll-back, saving the state it returns to
            self.armed = True
            self._save_best()
            return [Record("recovery", {"scope": "armed", "best_score": self.monitor.best,
                                        "best_round": self.monitor.best_round, "score": ev.accuracy})]
        if self.final_phase:
            self.stopped = True
            return [Record("recovery", {"scope": "stop", "best_score": self.monitor.best, "best_round": self.monitor.best_round}),
                    Stop("early stopping: no improvement with every density at 1")]
        self.weights = self.best_weights  # roll back to the saved state: the weights, the buffer, the scores
        if self.best_buffer is not None:
            self.buffer = self.best_buffer.copy()
        self.model_id += 1
        before = self.densities
        self.control.raise_minimum(None, cfg.delta_rho)
        for c, (old, new) in enumerate(zip(before, self.densities)):
            if new > old:  # a client whose density rose starts its own monitor's patience afresh
                self.client_monitors[c].bad_checks = 0
        self.first_stage = False
        actions: list[Action] = []
        restored = self.best_scores is not None
        if self.best_scores is not None:
            self.scores.scores = self.best_scores
            if self.densities != before:  # new sub-models, ranked as at the saved state (R:1423, 1502)
                self._rank(self.best_scores, actions)
        rec: dict[str, Any] = {"scope": "server", "min_density": list(self.control.minimums), "density": self.densities,
                               "buffer_restored": self.best_buffer is not None, "scores_restored": restored,
                               "best_score": self.monitor.best, "best_round": self.monitor.best_round, "score": ev.accuracy}
        if self.control.all_dense:
            self.final_phase = True
            self.monitor.patience *= cfg.final_patience_factor
            rec["final_phase"] = True
        return [Record("recovery", rec), *actions]
