"""PR-FL: Federated Learning based on Pruning and Recovery.

Slow clients train sparser sub-models of one global model: densities follow the clients'
observed round times (:mod:`prfl.pruning.density`), the mask at density rho is the prefix of an
importance ranking rebuilt every ``interval`` rounds from the clients' squared gradients, and an
early-stopping monitor raises the minimum densities step by step when accuracy stalls
(recovery). The server keeps every client's latest model in a buffer and aggregates the whole
buffer with staleness weights and MaskFedAvg; sub-models are distributed as nested residual
pieces so that a piece of a model version leaves the server once.

Ablation switches: ``recovery``, ``buffer`` (off: aggregate only the window's arrivals),
``mask_fedavg`` (off: plain weighted FedAvg), ``residual_split`` (off: each client gets its whole
sparse sub-model), ``synchronous`` (wait for every online client before aggregating).

Robustness (off by default): ``robust`` = ``clip`` clips each arriving update W_i - W_sent (W_sent:
the weights its task started from) to norm ``clip_norm`` on the client's mask before it enters
the buffer, then aggregates with MaskFedAvg; ``trimmed_mean`` / ``median`` replace MaskFedAvg by
the coordinate-wise rule over the holders of each weight (:mod:`prfl.robust`), with trimmed
fraction ``trim``. ``norm_factor`` = k rejects an update whose norm exceeds k times the median of
the last ``norm_window`` accepted update norms (:mod:`prfl.validation`).
"""

from __future__ import annotations

import bisect
import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

import torch

from prfl import masks
from prfl.aggregation import Staleness, mask_fedavg, staleness_weight, weighted_average
from prfl.buffer import ClientBuffer
from prfl.client.result import TaskResult
from prfl.distribution import PieceLedger, ResidualPlan, ResidualSplit, dense_model_bytes, sparse_model_bytes
from prfl.policies.base import (
    Action,
    Dispatch,
    EvaluationDone,
    Event,
    PolicyContext,
    PolicyMetrics,
    Record,
    RequestEvaluation,
    SetTimer,
    TaskSpec,
)
from prfl.policies.fleet import TaskInFlight
from prfl.policies.prfl_checkpoint import PRFLCheckpoint
from prfl.policies.prfl_control import CLIENT_SCORE, SERVER_SCORE, PRFLControl  # noqa: F401  (score tags, as before)
from prfl.pruning.density import DensityController
from prfl.pruning.importance import AVERAGES, ImportanceScores
from prfl.pruning.ranking import IMPORTANCE_BYTES, Ranking, importance_for_upload, magnitude_ranking
from prfl.pruning.recovery import EarlyStopping
from prfl.robust import ROBUST_METHODS, check_method, clip_update, robust_aggregate
from prfl.validation import Rejection, UpdateChecks

PAPER_PRESET_DENSITIES = (1.0, 1.0, 0.6, 0.6, 0.3, 0.3, 0.1, 0.1, 0.1, 0.1)


def preset_densities(times: list[float], preset: tuple[float, ...] = PAPER_PRESET_DENSITIES) -> tuple[float, ...]:
    """The preset (the paper's, for 10 clients fastest first) mapped onto any fleet by nominal
    round time: a client with r clients strictly faster than it, of n, gets
    ``preset[floor(len(preset) * r / n)]`` (equally fast clients start equally dense)."""
    n = len(times)
    ordered = sorted(times)
    out = []
    for t in times:
        r = bisect.bisect_left(ordered, t)  # clients strictly faster
        out.append(preset[len(preset) * r // n])
    return tuple(out)


WINDOW_TIMER = "prfl:window"


@dataclass(frozen=True)
class PRFLConfig:
    """PR-FL options. Defaults follow the PR-FL reference code (docs/ALGORITHMS.md lists each
    rule, the reference's choice and the option that changes it)."""

    # I: fastest-client rounds (or server steps, see `counting`) between ranking rebuilds,
    # density steps and monitor checks
    interval: int = 50
    # what I, the patience and the round-time FIFOs count: "fastest_client" = local rounds of the
    # client that has done the most (the reference counts its fastest client's rounds);
    # "server_steps" = server aggregation steps
    counting: Literal["fastest_client", "server_steps"] = "fastest_client"
    density_rule: Literal["A", "B"] = "B"  # B: step towards the fastest client's round time (reference); A: t_min / t_i
    # round times before the density rule: "observed" as measured (rule B's default), or "dense"
    # (scaled to the dense model, rule A's default); see prfl.pruning.density
    time_basis: Literal["dense", "observed"] | None = None
    # what a round time is: "inter_arrival" = time between a client's consecutive arrivals at the
    # server (the reference), "task" = dispatch to arrival of one task
    round_time: Literal["inter_arrival", "task"] = "inter_arrival"
    # densities before the first control step: one per client, or one number for every client;
    # None: the paper's preset (1, 1, .6, .6, .3, .3, .1, .1, .1, .1) mapped onto the fleet by
    # nominal speed (the client at speed rank r of n gets entry floor(10 r / n))
    initial_densities: tuple[float, ...] | float | None = None
    # rule B adapts densities only until the server first changes one itself (a recovery, or under
    # minimum_rule "follow" a clamp to a raised minimum), as the reference does; True keeps
    # adapting afterwards
    adapt_after_recovery: bool = False
    min_density: float = 0.1  # global minimum density
    # how the minimum densities move besides recoveries: "fixed" = they do not, and a density-rule
    # step below a client's minimum is clamped to it; "follow" = the reference's global minimum
    # (R:1448-1453, 1476-1484, 2332, 2377-2381): after each server monitor check and each client
    # recovery the minimums rise to the lowest density when it lies more than 0.01 above them, a rule step
    # below step_floor is not taken, one below a minimum is clamped and ends the first stage, a
    # rise restarts the server monitor's patience, and a rise to 1 opens the final phase
    minimum_rule: Literal["fixed", "follow"] = "fixed"
    # a density-rule step below this is not taken (the density stays). None: min_density under
    # minimum_rule "follow" (the reference's Fashion-MNIST setting; its CIFAR-10 and FEMNIST
    # settings take steps down to 0.05 and clamp them to the minimum), no floor under "fixed"
    step_floor: float | None = None
    density_step: float | None = None  # round densities down to multiples of this (large fleets)
    # how the buffer stores sparse models: "dense" vectors, "sparse" (values + index) or
    # "prefix" (values in ranking order; see prfl.buffer); prefix suits large fleets
    buffer_storage: Literal["dense", "sparse", "prefix"] = "dense"
    # prefix storage only: keep the buffer's values in a file in this directory instead of RAM
    buffer_dir: str | None = None
    floor: float = 0.05  # per-layer magnitude floor of the ranking
    importance: bool = True  # rank by squared gradients (False: by magnitude)
    # which weights a client reports squared gradients for: "kept" (its sub-model's, values only:
    # the server knows the mask) or "all" prunable weights
    importance_scope: Literal["kept", "all"] = "kept"
    # precision of the squared gradients on the wire (bfloat16 halves the bytes)
    importance_dtype: Literal["float32", "bfloat16"] = "float32"
    # which tasks carry them: one task per client per ranking interval ("interval": the first
    # dispatch to a client after a rebuild asks for them), or "every" task
    importance_requests: Literal["every", "interval"] = "interval"
    # how reports become scores: "holders" = per weight over the clients that reported it, scores
    # kept across intervals, unscored weights filled with g_min * |w|; "all" = plain mean of the
    # interval's reports (see prfl.pruning.importance)
    importance_average: Literal["holders", "all"] = "holders"
    # divide scores by each layer's per-weight cost (transfer + compute) when ranking
    layer_cost: bool = True
    staleness: Literal["const", "poly", "hinge"] = "poly"  # staleness weight s(tau): poly (tau + 1)^-a, hinge, const
    a: float = 0.6  # poly exponent (hinge: slope after b)
    b: float = 2.0  # hinge: the staleness up to which s = 1
    # "frozen": s_i fixed when client i's update arrives, from its staleness then (the reference's
    # rule; the buffer keeps MaskFedAvg's running sums); "reaged": every buffered update re-aged at
    # every server step (the full sum over the buffer at each step)
    staleness_mode: Literal["frozen", "reaged"] = "frozen"
    eta_g: float = 1.0  # server step: W <- (1 - eta_g) W_prev + eta_g W_new
    # Aggregation window (the paper's simulator closes a server step at
    # max(t + window, t + upload_time + 0.1 s)). Here a window opens when its first upload has
    # completed, so it closes `window` seconds after that arrival; 0 aggregates every arrival.
    window: float = 0.5
    recovery: bool = True  # early-stopping monitor that rolls back and raises minimum densities
    patience: int = 10  # monitor checks (one per interval) without improvement before it fires
    delta_rho: float = 0.2  # how much a recovery raises the minimum densities
    # patience multiplier once every density is 1 (then the next firing stops); 8 as the reference
    # runs it: it multiplies by 5 when the last rise lands, then resets to 8 x patience at the next check
    final_patience_factor: int = 8
    # the first time the server monitor runs out of patience it only arms the roll-back (the
    # reference starts checkpointing then); later run-outs roll back and raise densities
    recovery_arming: bool = True
    client_scores: bool = True  # per-client monitors: a stalled client's density rises (client_recovery)
    # what a client monitor's run-out raises by delta_rho: "minimum" = the client's minimum
    # density (its density follows only where it was below); "density" = its density itself, as
    # the reference code does (once the density rule has stopped, only this moves a density that
    # is above its minimum)
    client_recovery: Literal["minimum", "density"] = "minimum"
    # the model the server monitor scores: "staleness" = the reference's, the buffered models
    # averaged with weights s_i n_i (the aggregation's staleness rule and mode) until the final
    # phase (every density 1), then the server model itself; "plain" = sum_i n_i W_i / sum_i n_i
    server_score: Literal["plain", "staleness"] = "staleness"
    buffer: bool = True  # aggregate the per-client buffer of latest models (false: the window's arrivals only)
    mask_fedavg: bool = True  # mask-aware average (false: plain weighted average)
    residual_split: bool = True  # distribute nested residual pieces (false: each client its sparse sub-model)
    synchronous: bool = False  # wait for every online client before aggregating
    robust: Literal["none", "clip", "trimmed_mean", "median"] = "none"  # robust aggregation over the holders
    clip_norm: float | None = None  # c of robust: clip (required then)
    trim: float = 0.1  # beta of robust: trimmed_mean, in [0, 0.5)
    norm_factor: float | None = None  # k of the update-norm check (None: off)
    norm_window: int = 20  # M: accepted update norms the check's median is taken over
    max_rejections: int | None = 5  # rejections in a row that quarantine a client (None: never)

    def __post_init__(self) -> None:
        if self.interval < 1:
            raise ValueError(f"interval must be at least 1, got {self.interval}")
        if self.density_rule not in ("A", "B"):
            raise ValueError(f"density_rule must be 'A' or 'B', got {self.density_rule!r}")
        if self.counting not in ("fastest_client", "server_steps"):
            raise ValueError(f"counting must be 'fastest_client' or 'server_steps', got {self.counting!r}")
        if self.time_basis is not None and self.time_basis not in ("dense", "observed"):
            raise ValueError(f"time_basis must be 'dense' or 'observed', got {self.time_basis!r}")
        if self.round_time not in ("inter_arrival", "task"):
            raise ValueError(f"round_time must be 'inter_arrival' or 'task', got {self.round_time!r}")
        if self.importance_scope not in ("kept", "all"):
            raise ValueError(f"importance_scope must be 'kept' or 'all', got {self.importance_scope!r}")
        if self.importance_average not in AVERAGES:
            raise ValueError(f"importance_average must be one of {', '.join(AVERAGES)}, got {self.importance_average!r}")
        if self.importance_requests not in ("every", "interval"):
            raise ValueError(f"importance_requests must be 'every' or 'interval', got {self.importance_requests!r}")
        if self.importance_dtype not in IMPORTANCE_BYTES:
            raise ValueError(f"importance_dtype must be one of {sorted(IMPORTANCE_BYTES)}, got {self.importance_dtype!r}")
        if self.density_step is not None and not 0 < self.density_step <= 1:
            raise ValueError(f"density_step must lie in (0, 1], got {self.density_step}")
        if self.buffer_storage not in ("dense", "sparse", "prefix"):
            raise ValueError(f"buffer_storage must be 'dense', 'sparse' or 'prefix', got {self.buffer_storage!r}")
        if self.buffer_dir is not None and self.buffer_storage != "prefix":
            raise ValueError(f"buffer_dir keeps prefix-stored values on disk; set buffer_storage: prefix "
                             f"(got {self.buffer_storage!r}) or drop buffer_dir")
        if not 0 < self.min_density <= 1:
            raise ValueError(f"min_density must lie in (0, 1], got {self.min_density}")
        if not 0 <= self.floor <= 1:
            raise ValueError(f"floor must lie in [0, 1], got {self.floor}")
        if self.staleness not in ("const", "poly", "hinge"):
            raise ValueError(f"staleness must be const, poly or hinge, got {self.staleness!r}")
        if self.staleness_mode not in ("frozen", "reaged"):
            raise ValueError(f"staleness_mode must be 'frozen' or 'reaged', got {self.staleness_mode!r}")
        if not 0 < self.eta_g <= 1:
            raise ValueError(f"eta_g must lie in (0, 1], got {self.eta_g}")
        if self.window < 0:
            raise ValueError(f"window must be non-negative, got {self.window}")
        if self.step_floor is not None and not 0 <= self.step_floor <= 1:
            raise ValueError(f"step_floor must lie in [0, 1], got {self.step_floor}")
        if self.minimum_rule not in ("fixed", "follow"):
            raise ValueError(f"minimum_rule must be 'fixed' or 'follow', got {self.minimum_rule!r}")
        if self.client_recovery not in ("minimum", "density"):
            raise ValueError(f"client_recovery must be 'minimum' or 'density', got {self.client_recovery!r}")
        if self.server_score not in ("plain", "staleness"):
            raise ValueError(f"server_score must be 'plain' or 'staleness', got {self.server_score!r}")
        if self.patience < 1 or self.final_patience_factor < 1:
            raise ValueError("patience and final_patience_factor must be at least 1")
        if not 0 < self.delta_rho <= 1:
            raise ValueError(f"delta_rho must lie in (0, 1], got {self.delta_rho}")
        if isinstance(self.initial_densities, (int, float)) and not isinstance(self.initial_densities, bool):
            object.__setattr__(self, "initial_densities", float(self.initial_densities))
        elif self.initial_densities is not None:
            object.__setattr__(self, "initial_densities", tuple(float(d) for d in self.initial_densities))
        if self.robust not in ROBUST_METHODS:
            raise ValueError(f"robust must be one of {', '.join(ROBUST_METHODS)}, got {self.robust!r}")
        check_method(self.robust, self.trim, self.clip_norm)
        UpdateChecks(self.norm_factor, self.norm_window, self.max_rejections)  # validates them


class PRFL(PRFLControl, PRFLCheckpoint):
    """The PR-FL server policy (asynchronous by default). Its control step and recovery monitors
    are in :mod:`prfl.policies.prfl_control`, its checkpoint state in
    :mod:`prfl.policies.prfl_checkpoint`."""

    name = "prfl"
    config_cls = PRFLConfig
    weights_by_samples = True

    def __init__(self, ctx: PolicyContext, config: PRFLConfig | None = None) -> None:
        super().__init__(ctx, config)
        cfg: PRFLConfig = self.config
        n = ctx.num_clients
        if not ctx.layer_bounds:
            raise ValueError("PR-FL needs ctx.layer_bounds (the prunable layers of the model)")
        self.control = DensityController(n, cfg.interval, cfg.density_rule, cfg.min_density, self._initial_densities(),
                                         self._time_basis(), step=cfg.density_step,
                                         anchor=ctx.speed_order()[0] if cfg.density_rule == "B" else None,
                                         step_floor=self._step_floor())
        self.num_prunable = ctx.num_prunable
        self.total = ctx.initial_weights.numel()
        self.ranking: Ranking = magnitude_ranking(self.weights[: self.num_prunable], ctx.layer_bounds, cfg.floor)
        self.ranking_id = 0
        self.ranked_from: torch.Tensor | None = None  # the scores the ranking was built from (None: magnitudes)
        self.model_id = 0  # bumps whenever the global weights change (aggregation or roll-back)
        self.scores = ImportanceScores(self.num_prunable, ctx.layer_bounds, cfg.importance_average)
        self._imp_asked: set[int] = set()  # clients asked for importance since the last rebuild
        self._masks: dict[float, torch.Tensor] = {}
        # frozen staleness: running sums, unless a coordinate-wise robust rule needs the whole buffer
        running = cfg.staleness_mode == "frozen" and cfg.buffer and cfg.robust not in ("trimmed_mean", "median")
        self.buffer = ClientBuffer(n, self.total, self.num_prunable, storage=cfg.buffer_storage, path=cfg.buffer_dir,
                                   frozen=Staleness(cfg.staleness, cfg.a, cfg.b) if running else None)
        self.task_orders: dict[int, torch.Tensor] = {}  # prefix storage: the ranking each task's mask is a prefix of
        self.window: list[tuple[TaskInFlight, TaskResult, int]] = []  # (task, result, staleness)
        self.task_masks: dict[int, torch.Tensor | None] = {}  # the mask each task was sent with
        self.window_open = False
        self.step_start = 0.0  # reference step timing: when the current server step started
        self.step_length = 0.0  # ...and its length, from the downloads handed out at its start
        self._split: ResidualSplit | None = None
        self._split_key: tuple[int, int, tuple[float, ...]] | None = None
        self._split_id = 0
        # which pieces each client holds and which were published; piece positions depend only on
        # the ranking and the density levels (the split's structure), not on the model version
        self.ledger = PieceLedger(n)
        self.monitor = EarlyStopping(cfg.patience)
        self.client_monitors = [EarlyStopping(cfg.patience) for _ in range(n)]
        # models of each client put into the buffer, and that count when its monitor last checked
        # it: a client that sent nothing new since is not checked (it did not stall, it was away)
        self.buffered_models = [0] * n
        self.scored_models = [0] * n
        # the state a roll-back returns to: the global weights, the buffer of client models
        # (restoring the weights alone would not last: the next MaskFedAvg recomputes the weights
        # from the buffer) and the persistent importance scores. Saved from the arming on: when
        # the monitor first runs out, then at each improvement of its score; a file-backed buffer
        # is not saved (best_buffer stays None)
        self.best_weights: torch.Tensor = self.weights
        self.best_buffer: ClientBuffer | None = None
        self.best_scores: torch.Tensor | None = None
        self.final_phase = False
        self.armed = not cfg.recovery_arming  # a roll-back needs the monitor to have run out once before
        if self.armed and cfg.recovery:
            self._save_best()
        self.first_stage = True  # the density rule runs until the server changes a density itself
        self.local_rounds = [0] * n  # accepted results per client
        self.control_steps = 0  # control steps taken
        self.last_arrival = [0.0] * n  # when each client's last result arrived (inter-arrival times)

    def _step_floor(self) -> float | None:
        cfg: PRFLConfig = self.config
        if cfg.step_floor is not None:
            return cfg.step_floor
        return cfg.min_density if cfg.minimum_rule == "follow" else None

    def _time_basis(self) -> str:
        cfg: PRFLConfig = self.config
        if cfg.time_basis is not None:
            return cfg.time_basis
        return "dense" if cfg.density_rule == "A" else "observed"

    def _initial_densities(self) -> tuple[float, ...]:
        """The configured densities, or the paper's preset mapped onto the fleet by nominal speed."""
        cfg: PRFLConfig = self.config
        n = self.ctx.num_clients
        if isinstance(cfg.initial_densities, float):  # one density for every client
            return (cfg.initial_densities,) * n
        if cfg.initial_densities is not None:
            return tuple(cfg.initial_densities)
        times = self.ctx.nominal_round_times
        return preset_densities(list(times) if times is not None else [float(c) for c in range(n)])

    def _counter(self) -> int:
        """The count the interval is measured in: the fastest client's local rounds or server steps."""
        if self.config.counting == "server_steps":
            return self.version
        return max(self.local_rounds)

    # ------------------------------------------------------------------ views
    @property
    def densities(self) -> list[float]:
        return list(self.control.densities)

    def mask_for(self, density: float) -> torch.Tensor | None:
        if density >= 1.0:
            return None
        m = self._masks.get(density)
        if m is None:
            m = self._masks[density] = self.ranking.mask(density)
        return m

    def _current_split(self) -> ResidualSplit:
        levels = tuple(sorted(set(self.control.densities)))
        self.ledger.use_structure((self.ranking_id, levels))
        key = (self.model_id, self.ranking_id, levels)
        if self._split is None or key != self._split_key:
            self._split_id += 1
            self._split = ResidualSplit(self.ranking, levels, self._split_id, self.total)
            self._split_key = key
            self.ledger.use_version(self._split_id)
        return self._split

    def residual_plan(self, spec: TaskSpec) -> ResidualPlan | None:
        """The split the current dispatches use (every dispatch of one event shares it) and the
        pieces ``spec`` needs; None with ``residual_split`` off (whole sub-models)."""
        if not self.config.residual_split or self._split is None:
            return None
        return ResidualPlan(self._split, self._split.needed(spec.density))

    def metrics(self) -> PolicyMetrics:
        """Densities, the buffered updates' staleness and the rejected results per client."""
        sent = self.buffer.sent_rounds()
        return PolicyMetrics(
            densities=tuple(float(d) for d in self.control.densities),
            buffer_staleness=tuple(None if c not in sent else self.version - sent[c] for c in range(self.ctx.num_clients)),
            rejected=tuple(self.rejected),
        )

    # ------------------------------------------------------------------ dispatch
    def dispatch(self, client: int, now: float) -> Dispatch:
        if client in self._busy:
            raise RuntimeError(f"client {client} already holds task {self._busy[client]}")
        rho = self.control.densities[client]
        mask = self.mask_for(rho)
        count = self.ranking.count(rho)
        suffix = self.total - self.num_prunable
        pieces: tuple[str, ...] = ()
        if self.config.residual_split:
            split = self._current_split()
            needed = split.needed(rho)
            new_values, new_index = self.ledger.unpublished(needed)
            lack_values, lack_index = self.ledger.missing(client, needed)

            def values(p: Any) -> int:
                return 4 * split.count(p)

            def index(p: Any) -> int:
                return split.piece_bytes(p) - values(p)

            # values: each piece of this model version once; positions: once per structure
            down = sum(values(p) for p in lack_values) + sum(index(p) for p in lack_index)
            egress = sum(values(p) for p in new_values) + sum(index(p) for p in new_index)
            self.ledger.deliver(client, split, needed)  # the client's cache now holds this version's pieces
            pieces = tuple(str(p) for p in needed)
            content = None  # the ledger sized the egress
        else:
            # whole sub-models: the server's egress is the simulator's rule for published models
            # (sim.model_relay), for this model's sub-model at this density
            down = dense_model_bytes(self.total) if rho >= 1.0 else sparse_model_bytes(count, self.num_prunable, suffix)
            egress = None
            content = (self.model_id, self.ranking_id, rho)
        up = 4 * (count + suffix)  # values only: the server knows the mask it sent
        want_importance = self.config.importance and (
            self.config.importance_requests == "every" or client not in self._imp_asked)
        importance_bytes = 0
        if want_importance:
            self._imp_asked.add(client)
            # "kept": the squared gradients of the kept weights, values only (the server knows the
            # mask); "all": of every prunable weight, pruned ones included
            reported = count if self.config.importance_scope == "kept" else self.num_prunable
            importance_bytes = IMPORTANCE_BYTES[self.config.importance_dtype] * reported
            up += importance_bytes
        task = TaskSpec(
            task_id=self.new_task_id(),
            client=client,
            version=self.version,
            weights=self.weights,
            mask=mask,
            density=rho,
            download_bytes=down,
            upload_bytes=up,
            server_egress_bytes=egress,
            pieces=pieces,
            content_key=content,
            want_importance=want_importance,
            importance_dtype=self.config.importance_dtype,
            importance_scope=self.config.importance_scope,
            upload_importance_bytes=importance_bytes,
        )
        self.track_task(task, now)
        self.task_masks[task.task_id] = mask
        if self.config.buffer_storage == "prefix" and mask is not None:
            self.task_orders[task.task_id] = self.ranking.order
        return Dispatch(task)

    # ------------------------------------------------------------------ validation hooks
    def update_checks(self) -> UpdateChecks:
        return UpdateChecks(self.config.norm_factor, self.config.norm_window, self.config.max_rejections)

    def measures_norms(self) -> bool:
        return self.config.robust == "clip"

    def task_mask(self, task: TaskInFlight) -> torch.Tensor | None:
        return self.task_masks.get(task.task_id)

    # ------------------------------------------------------------------ events
    def on_event(self, event: Event) -> list[Action]:
        if isinstance(event, EvaluationDone) and not self.stopped:
            return self._on_evaluation(event)
        return super().on_event(event)

    def _on_start(self, now: float) -> list[Action]:
        actions: list[Action] = [self.dispatch(c, now) for c in self.free_clients()]
        self._begin_step(now, actions)
        return actions

    def _on_result(self, now: float, result: TaskResult) -> list[Action]:
        arrival = self.take_result(result)
        task = arrival.task
        c = task.client
        start = self.last_arrival[c] if self.config.round_time == "inter_arrival" else task.dispatched_at
        self.control.observe(c, max(0.0, now - start), result.density)
        self.last_arrival[c] = now
        self.local_rounds[c] += 1
        if result.grad_sq is not None:
            mask = self.task_masks.get(task.task_id)
            if self.config.importance_scope == "kept" and mask is not None:
                # a pruned weight gets no gradient when the forward pass is W * m: the kept ones alone
                kept = masks.positions(mask)
                self.scores.add_kept(importance_for_upload(result.grad_sq.reshape(-1)[kept],
                                                           self.config.importance_dtype), kept)
            else:
                self.scores.add(importance_for_upload(result.grad_sq, self.config.importance_dtype))
        weights = arrival.weights
        if self.config.robust == "clip":
            assert arrival.start is not None and self.config.clip_norm is not None  # measures_norms keeps start weights
            weights, _ = clip_update(weights, arrival.start, self.task_masks.get(task.task_id), self.num_prunable,
                                     self.config.clip_norm)
        self.window.append((task, dataclasses.replace(result, weights=weights), arrival.staleness))
        if self.config.synchronous:
            return self._aggregate(now) if not self.in_flight else []
        timing = self.ctx.step_timing
        if self.config.window == 0 and timing is None:
            return self._aggregate(now)
        if not self.window_open:
            self.window_open = True
            if timing is None:  # the window opens with its first arrival
                return [SetTimer(now + self.config.window, WINDOW_TIMER)]
            close = timing.next_close(self.step_start, self.step_length, self.config.window, now)
            return [SetTimer(close, WINDOW_TIMER)]
        return []

    def _on_timer(self, now: float, key: str) -> list[Action]:
        if key != WINDOW_TIMER:
            raise ValueError(f"PR-FL set no timer {key!r}")
        self.window_open = False
        actions = self._aggregate(now) if self.window else []
        self._begin_step(now, actions)
        return actions

    def _begin_step(self, now: float, actions: list[Action]) -> None:
        """Reference step timing (``ctx.step_timing``): a server step starts at ``now`` with the
        tasks dispatched in ``actions``; it closes at now + max(window, D / server_up + 0.1 s),
        D the largest of their downloads, or at a later boundary if nothing arrives by then
        (:meth:`prfl.policies.base.StepTiming.next_close`). Without step timing a window opens
        at its first arrival and closes ``window`` seconds later."""
        timing = self.ctx.step_timing
        if timing is None or self.config.synchronous:
            return
        self.step_start = now
        self.step_length = timing.step_length(self.config.window, [a.task for a in actions if isinstance(a, Dispatch)])

    def _reject(self, now: float, result: TaskResult, rejection: Rejection) -> list[Action]:
        actions = super()._reject(now, result, rejection)
        if (self.config.staleness_mode == "frozen" and result.client in self.buffer
                and any(isinstance(a, Record) and a.kind == "quarantined" for a in actions)):
            # the rejection may have closed a round whose control step asked for this client's
            # score (synchronous mode): that evaluation is of the model as it was, built now
            tag = f"{CLIENT_SCORE}{result.client}"
            actions = [RequestEvaluation(a.model(), a.tag) if isinstance(a, RequestEvaluation) and a.tag == tag else a
                       for a in actions]
            self.buffer.remove(result.client)  # its frozen weight would count for ever, never decaying
        return actions

    def _on_task_failed(self, now: float, task: TaskInFlight) -> list[Action]:
        self.task_masks.pop(task.task_id, None)
        self.task_orders.pop(task.task_id, None)
        self._imp_asked.discard(task.client)  # ask again: that task's importance never came
        self.ledger.forget(task.client)  # a failed device may have lost its piece cache
        if self.config.synchronous and not self.in_flight:
            if self.window:
                return self._aggregate(now)
            # every task of the round failed: the next round starts with the clients free now
            # (those that came back during the round were told to wait for it)
            return [self.dispatch(c, now) for c in self.free_clients()]
        return []

    def _on_client_idle(self, now: float, client: int) -> list[Action]:
        if self.config.synchronous and self.in_flight:
            return []  # joins at the next round
        if any(t.client == client for t, _, _ in self.window):
            return []  # its result waits in the open window: it is sent the aggregate when the window closes
        return [self.dispatch(client, now)] if self.is_free(client) else []

    # ------------------------------------------------------------------ aggregation
    def _aggregate(self, now: float) -> list[Action]:
        cfg = self.config
        arrived = self.window
        self.window = []
        masks = {t.task_id: self.task_masks.pop(t.task_id) for t, _, _ in arrived}
        for task, result, st in arrived:  # st: staleness at arrival, frozen into the slot
            self.buffered_models[task.client] += 1
            self.buffer.put(task.client, result.weights, masks[task.task_id], result.num_samples, task.version,
                            order=self.task_orders.pop(task.task_id, None), arrival_round=task.version + st,
                            zero_outside_mask=True,  # take_result checked the mask (clipping keeps it)
                            take=True)  # the result's tensor is the buffer's from here on: nothing else writes it
        # clipping happened on arrival (against W_sent); the coordinate-wise rules run here
        rule = cfg.robust if cfg.robust in ("trimmed_mean", "median") else "none"
        if cfg.buffer and rule == "none" and cfg.staleness_mode == "frozen":
            new = self.buffer.aggregate_running(self.weights, eta_g=cfg.eta_g, masked=cfg.mask_fedavg)
        elif cfg.buffer:
            # fp32 accumulation: the models are fp32 and this halves the cost of the step
            new = self.buffer.aggregate(
                self.weights, self.version, kind=cfg.staleness, a=cfg.a, b=cfg.b, eta_g=cfg.eta_g,
                masked=cfg.mask_fedavg, accumulate_dtype=torch.float32, robust=rule, trim=cfg.trim,
                staleness_mode=cfg.staleness_mode,
            )
        else:
            s = [staleness_weight(cfg.staleness, st, cfg.a, cfg.b) for _, _, st in arrived]
            total = sum(s)
            coeffs = [si / total * r.num_samples for si, (_, r, _) in zip(s, arrived)]
            models = [r.weights for _, r, _ in arrived]
            if rule != "none":
                task_masks = [masks[t.task_id] if cfg.mask_fedavg else None for t, _, _ in arrived]
                new = robust_aggregate(self.weights, models, task_masks, coeffs, self.num_prunable, rule, cfg.trim,
                                       eta_g=cfg.eta_g)
            elif cfg.mask_fedavg:
                new = mask_fedavg(self.weights, models, [masks[t.task_id] for t, _, _ in arrived], coeffs, self.num_prunable, cfg.eta_g)
            else:
                avg = weighted_average(models, coeffs)
                new = avg if cfg.eta_g == 1.0 else torch.lerp(self.weights, avg, cfg.eta_g)
        clients = [t.client for t, _, _ in arrived]
        self.model_id += 1
        actions = self.commit(new, now, clients, [st for _, _, st in arrived], densities=[r.density for _, r, _ in arrived])
        if self._counter() // cfg.interval > self.control_steps:
            self.control_steps = self._counter() // cfg.interval
            actions += self._control_step()
        if not self.stopped:
            targets = self.free_clients() if cfg.synchronous else [c for c in clients if self.is_free(c)]
            actions += [self.dispatch(c, now) for c in targets]
        return actions
