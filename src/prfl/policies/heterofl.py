"""HeteroFL (Diao et al. 2021) in synchronous rounds, in its original width form and in the PR-FL
paper's mask form.

**Width mode** (the original). Client ``i`` has a fixed rate ``r_i``; its sub-model keeps the first
``ceil(r_i C)`` channels/units of every hidden layer (:mod:`prfl.models.slicing`): with the index
map ``idx_i`` of that width, the task carries ``W[idx_i]`` and the client trains the width-``r_i``
model (``TaskSpec.width = r_i``) and returns its flat vector ``V_i``. Aggregation averages each
coordinate ``k`` of the full vector over the clients holding it:

    W_new[k] = sum_i n_i e_ik V_i[j] / sum_i n_i e_ik     over i with idx_i[j] = k,

with ``e_ik = 1``, except on the output layer under ``label_split``: for the weight row and the
bias entry of class ``c``, ``e_ik = 1`` only if client ``i`` holds label ``c``. A coordinate whose
denominator is 0 (nobody in the round holds it, or no holder has its label) keeps ``W[k]``.

*Scaler.* HeteroFL divides each hidden layer's output by ``r`` while training, so sub-models
train at the activation scale of the full model. Workers build their models from the scenario's
model options, which a policy cannot change, so the scaler is the model option ``scaler: true``
(see :class:`prfl.models.zoo.ScaledReLU`); the policy option ``scaler`` states which one is
expected, and the policy checks it against the models ``ctx.model_builder`` builds.
*Static batch norm* is not needed: the zoo's models have no batch norm (VGG-11 here is the
variant without it).

**Mask mode** (the PR-FL paper's variant). Client ``i`` has a fixed density ``rho_i``. At the start
of every round the ranking is rebuilt on the global weights (:func:`magnitude_ranking`: per-layer
top ``floor`` by magnitude, then the rest by magnitude), the task carries ``W`` with
``mask_i = ranking.mask(rho_i)`` (nested: lower densities are subsets), and aggregation is
MaskFedAvg with ``c_i = n_i`` (:func:`prfl.aggregation.mask_fedavg`). ``label_split`` does not
apply in this mode.

Bytes. Width mode: ``4 * |V_i|`` each way (fp32 values of the sub-model). Mask mode, with ``N``
prunable weights, ``T`` weights in all and ``m = ceil(rho N)`` kept ones, a sparse sub-model is
its values plus where they are, whichever index is smaller, plus one byte naming the encoding,
plus the dense suffix:

    bytes = 4 m + min(ceil(N / 8), 4 m) + 1 + 4 (T - N)        (bitmap or int32 positions);

a dense task (``rho = 1``) costs ``4 T``. The same count is used for download and upload.

Rounds are synchronous as in :class:`prfl.policies.fedavg.FedAvg`: a cohort of
``max(ceil(fraction K), min_clients)`` online, free clients is drawn by address
``(seed, "cohort", version[, attempt])``, every task is awaited (arrived or failed), then one
server update (``version += 1``, ``Record("server_update")``); if every task of the cohort failed
the weights are kept, ``Record("round_failed")`` is emitted and a new cohort is drawn.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from prfl.aggregation import ACCUMULATE_DTYPE, mask_fedavg
from prfl.client.result import TaskResult
from prfl.models.slicing import SliceMap, output_classes
from prfl.params import ParamLayout
from prfl.policies.base import Action, Dispatch, PolicyContext, PolicyMetrics, Record, TaskSpec
from prfl.policies.fleet import FleetPolicy, TaskInFlight, check_number
from prfl.pruning.ranking import Ranking, magnitude_ranking

__all__ = [
    "DENSITY_LEVELS",
    "HeteroFL",
    "HeteroFLConfig",
    "PAPER_DENSITIES",
    "WIDTH_LEVELS",
    "default_densities",
    "default_rates",
    "holder_average",
    "label_include",
    "sparse_bytes",
    "spread_levels",
]

#: HeteroFL's width levels, largest first.
WIDTH_LEVELS: tuple[float, ...] = (1.0, 0.5, 0.25, 0.125, 0.0625)
#: The PR-FL paper's preset densities for its 10 clients (fastest first).
PAPER_DENSITIES: tuple[float, ...] = (1.0, 1.0, 0.6, 0.6, 0.3, 0.3, 0.1, 0.1, 0.1, 0.1)
#: The distinct levels of PAPER_DENSITIES, spread over other fleet sizes.
DENSITY_LEVELS: tuple[float, ...] = (1.0, 0.6, 0.3, 0.1)

MODES: tuple[str, ...] = ("width", "mask")


# --------------------------------------------------------------------------- defaults and bytes
def spread_levels(levels: Sequence[float], num_clients: int) -> tuple[float, ...]:
    """Levels over clients in index order, in equal contiguous groups.

    With ``L = min(len(levels), K)`` levels (the first ``L``), client groups have sizes
    ``floor(K / L)`` or one more, the larger groups first (as ``numpy.array_split``): 10 clients
    over 5 levels are ``[l0, l0, l1, l1, ..., l4, l4]``.
    """
    if num_clients < 1:
        raise ValueError(f"num_clients must be at least 1, got {num_clients}")
    used = min(len(levels), num_clients)
    base, extra = divmod(num_clients, used)
    out: list[float] = []
    for g in range(used):
        out += [float(levels[g])] * (base + (1 if g < extra else 0))
    return tuple(out)


def default_rates(num_clients: int) -> tuple[float, ...]:
    """HeteroFL's levels {1, 1/2, 1/4, 1/8, 1/16} over clients in index order (equal groups)."""
    return spread_levels(WIDTH_LEVELS, num_clients)


def default_densities(num_clients: int) -> tuple[float, ...]:
    """The PR-FL paper's preset for 10 clients; otherwise {1, .6, .3, .1} in equal groups."""
    if num_clients == len(PAPER_DENSITIES):
        return PAPER_DENSITIES
    return spread_levels(DENSITY_LEVELS, num_clients)


def by_speed(levels: Sequence[float], speed_order: Sequence[int]) -> tuple[float, ...]:
    """Per-client levels from levels listed fastest first: client ``speed_order[r]`` gets ``levels[r]``."""
    out = [0.0] * len(levels)
    for r, c in enumerate(speed_order):
        out[c] = float(levels[r])
    return tuple(out)


def sparse_bytes(kept: int, num_prunable: int, total: int) -> int:
    """Bytes of a sparse sub-model: ``4 m + min(ceil(N / 8), 4 m) + 1 + 4 (T - N)``.

    ``m = kept`` fp32 values, their positions as a bitmap over the ``N`` prunable weights or as
    ``m`` int32 indices (the smaller), one byte naming which, and the ``T - N`` dense weights.
    """
    if not 0 <= kept <= num_prunable <= total:
        raise ValueError(f"need 0 <= kept <= num_prunable <= total, got {kept}, {num_prunable}, {total}")
    return 4 * kept + min(math.ceil(num_prunable / 8), 4 * kept) + 1 + 4 * (total - num_prunable)


# --------------------------------------------------------------------------- aggregation
def holder_average(
    prev: torch.Tensor,
    values: Sequence[torch.Tensor],
    indices: Sequence[torch.Tensor | None],
    coeffs: Sequence[float],
    include: Sequence[torch.Tensor | None] | None = None,
    accumulate_dtype: torch.dtype = ACCUMULATE_DTYPE,
) -> torch.Tensor:
    """HeteroFL's element-wise average over the clients holding each coordinate.

    Client ``i`` holds coordinates ``indices[i]`` of the full vector (None: all of them, in order)
    with values ``values[i]`` (``values[i][j]`` is coordinate ``indices[i][j]``; indices distinct).
    With ``e_ij = include[i][j]`` (1 when ``include`` or ``include[i]`` is None):

        W_new[k] = sum_i c_i e_ij v_ij / sum_i c_i e_ij     over (i, j) with indices[i][j] = k,

    and ``W_new[k] = prev[k]`` where the denominator is 0. Sums accumulate in ``accumulate_dtype``
    (float64, as in :mod:`prfl.aggregation`) and are rounded once: averaging identical values gives
    them back bit for bit. Returns a new tensor of ``prev``'s dtype.
    """
    if prev.dim() != 1 or not prev.is_floating_point():
        raise ValueError(f"prev must be a flat 1-D floating-point tensor, got {prev.dtype} {tuple(prev.shape)}")
    n = len(values)
    if n == 0:
        raise ValueError("holder_average needs at least one client")
    incl = list(include) if include is not None else [None] * n
    if len(indices) != n or len(coeffs) != n or len(incl) != n:
        raise ValueError(
            f"got {n} values, {len(indices)} indices, {len(coeffs)} coeffs and {len(incl)} include masks; "
            "lengths must match"
        )
    cs = [float(c) for c in coeffs]
    for i, c in enumerate(cs):
        if not (math.isfinite(c) and c >= 0):
            raise ValueError(f"coeffs[{i}] must be a finite number >= 0, got {c!r}")
    if not sum(cs) > 0:
        raise ValueError(f"coeffs must have a positive total, got {sum(cs)!r}")
    acc = {"dtype": accumulate_dtype, "device": prev.device}
    num = torch.zeros(prev.numel(), **acc)
    den = torch.zeros(prev.numel(), **acc)
    for i, (v, idx, inc, c) in enumerate(zip(values, indices, incl, cs)):
        length = prev.numel() if idx is None else idx.numel()
        if v.shape != (length,):
            raise ValueError(f"values[{i}] has shape {tuple(v.shape)}, expected ({length},)")
        if inc is not None and (inc.dtype != torch.bool or inc.shape != (length,)):
            raise ValueError(f"include[{i}] must be a bool tensor of shape ({length},)")
        if c == 0.0:
            continue
        w = torch.full((length,), c, **acc) if inc is None else inc.to(accumulate_dtype).mul_(c)
        contrib = v.to(accumulate_dtype) * w
        if idx is None:
            num.add_(contrib)
            den.add_(w)
        else:
            num.index_add_(0, idx, contrib)
            den.index_add_(0, idx, w)
    held = den > 0
    avg = num.div_(torch.where(held, den, torch.ones_like(den))).to(prev.dtype)
    return torch.where(held, avg, prev)


def label_include(classes: torch.Tensor, idx: torch.Tensor | None, labels: Sequence[int]) -> torch.Tensor:
    """Label-split mask over a client's coordinates: False on output rows of labels it lacks.

    ``classes`` is :func:`prfl.models.slicing.output_classes` of the full model (-1 off the output
    layer); ``idx`` the client's coordinates (None: all).
    """
    cls = classes if idx is None else classes[idx]
    keep = cls < 0
    if len(labels):
        keep |= torch.isin(cls, torch.as_tensor(list(labels), dtype=cls.dtype))
    return keep


# --------------------------------------------------------------------------- config
@dataclass(frozen=True)
class HeteroFLConfig:
    """HeteroFL options.

    ``mode``: ``"width"`` (original: width-sliced sub-models) or ``"mask"`` (the PR-FL paper's
    variant: unstructured nested masks at fixed densities, MaskFedAvg).
    ``rates`` (width mode): each client's width rate in (0, 1]. None: HeteroFL's levels
    {1, 1/2, 1/4, 1/8, 1/16} over clients in index order, in equal groups (see
    :func:`spread_levels`), handed out from the fastest client to the slowest by the nominal round
    times in the policy context (client order when it has none).
    ``densities`` (mask mode): each client's density in (0, 1]. None: the PR-FL paper's
    [1, 1, .6, .6, .3, .3, .1, .1, .1, .1] for 10 clients, otherwise {1, .6, .3, .1} in equal
    groups, fastest client first as for ``rates``.
    ``fraction``, ``min_clients``: the cohort, as in FedAvg.
    ``label_split`` (width mode): output rows averaged only over clients holding their label.
    ``scaler`` (width mode): whether the models train with HeteroFL's 1/r scaler; it must agree
    with the model option ``scaler`` (checked on the models of ``ctx.model_builder``).
    ``floor`` (mask mode): per-layer magnitude floor of the ranking.
    """

    mode: Literal["width", "mask"] = "width"
    rates: tuple[float, ...] | None = None
    densities: tuple[float, ...] | None = None
    fraction: float = 1.0
    min_clients: int = 1
    label_split: bool = True
    scaler: bool = False
    floor: float = 0.05

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        check_number("fraction", self.fraction, low=0.0, low_open=True, high=1.0)
        check_number("min_clients", self.min_clients, low=1, integer=True)
        check_number("floor", self.floor, low=0.0, high=1.0)
        for flag in ("label_split", "scaler"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag} must be true or false, got {getattr(self, flag)!r}")
        for name, used_in in (("rates", "width"), ("densities", "mask")):
            value = getattr(self, name)
            if value is None:
                continue
            if self.mode != used_in:
                raise ValueError(f"{name} applies to mode {used_in!r}, not {self.mode!r}")
            if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value:
                raise ValueError(f"{name} must be a non-empty list of numbers in (0, 1], got {value!r}")
            for i, v in enumerate(value):
                check_number(f"{name}[{i}]", v, low=0.0, low_open=True, high=1.0)
            object.__setattr__(self, name, tuple(float(v) for v in value))
        if self.mode == "mask" and self.scaler:
            raise ValueError("scaler applies to mode 'width', not 'mask'")


# --------------------------------------------------------------------------- policy
@dataclass(frozen=True)
class _Arrived:
    """A result of the round in progress, waiting for the round to close."""

    client: int
    num_samples: float
    weights: torch.Tensor


class HeteroFL(FleetPolicy):
    """HeteroFL with synchronous rounds; see the module docstring for both modes' formulas."""

    name = "heterofl"
    config_cls = HeteroFLConfig
    weights_by_samples = True

    def __init__(self, ctx: PolicyContext, config: HeteroFLConfig | None = None) -> None:
        super().__init__(ctx, config)
        cfg: HeteroFLConfig = self.config
        k = ctx.num_clients
        if cfg.min_clients > k:
            raise ValueError(f"min_clients={cfg.min_clients} exceeds the number of clients ({k})")
        self.cohort_size = max(math.ceil(cfg.fraction * k - 1e-9), cfg.min_clients)
        self.rates: tuple[float, ...] | None = None
        self.densities: tuple[float, ...] | None = None
        self._classes: torch.Tensor | None = None  # output class of every full coordinate (-1 else)
        self._full_layout: ParamLayout | None = None
        if cfg.mode == "width":
            self.rates = cfg.rates if cfg.rates is not None else by_speed(default_rates(k), ctx.speed_order())
            self._check_per_client("rates", self.rates)
            if cfg.label_split:
                labels = ctx.client_labels
                if labels is None or len(labels) != k:
                    raise ValueError(
                        "label_split needs ctx.client_labels (the labels of every client); "
                        "set label_split=false to average output rows over every holder"
                    )
            if any(r < 1.0 for r in self.rates) or cfg.label_split or cfg.scaler:
                self._init_full_model()
        else:
            self.densities = (cfg.densities if cfg.densities is not None
                              else by_speed(default_densities(k), ctx.speed_order()))
            self._check_per_client("densities", self.densities)
        self.cohort: list[int] = []  # clients of the round in progress ([] between rounds)
        self.arrived: list[_Arrived] = []
        self.failed: list[int] = []
        self.attempt = 0  # rounds at this version whose whole cohort failed
        # derived caches, rebuilt on demand (not checkpointed)
        self._maps: dict[float, SliceMap] = {}
        self._ranking: Ranking | None = None  # mask mode: ranking of the current weights
        self._masks: dict[float, torch.Tensor | None] = {}

    # -- set-up
    def _check_per_client(self, name: str, values: tuple[float, ...]) -> None:
        if len(values) != self.ctx.num_clients:
            raise ValueError(f"{name} has {len(values)} entries for {self.ctx.num_clients} clients")

    def _builder(self) -> Any:
        if self.ctx.model_builder is None:
            raise ValueError(
                "HeteroFL's width mode needs ctx.model_builder (width -> model) to slice sub-models "
                "and find the output layer"
            )
        return self.ctx.model_builder

    def _build(self, width: float) -> Any:
        """The width-``width`` model, for its structure only (names, shapes, modules).

        Built on the meta device: no memory and no draws from torch's global generator. A builder
        that cannot run there is run on the CPU with the generator's state restored afterwards.
        """
        builder = self._builder()
        try:
            with torch.device("meta"):
                return builder(width)
        except (RuntimeError, NotImplementedError):
            with torch.random.fork_rng(devices=[]):
                return builder(width)

    def _check_scaler(self, model: Any, width: float) -> None:
        rate = getattr(model, "scaler_rate", None)
        if self.config.scaler and (rate is None or not math.isclose(rate, width, rel_tol=1e-9)):
            raise ValueError(
                f"scaler=true, but the width-{width} model scales by {rate!r} instead of {width}: build the "
                "models with the model option scaler: true (and width_mult 1 for the full model)"
            )
        if not self.config.scaler and rate is not None:
            raise ValueError(
                "the models train with the 1/r scaler (model option scaler: true); set the policy option "
                "scaler: true to state it, or drop the model option"
            )

    def _init_full_model(self) -> None:
        model = self._build(1.0)
        layout = ParamLayout(model)
        if layout.total != self.weights.numel() or layout.num_prunable != self.ctx.num_prunable:
            raise ValueError(
                f"ctx.model_builder(1.0) has {layout.total} weights ({layout.num_prunable} prunable); "
                f"the context has {self.weights.numel()} ({self.ctx.num_prunable} prunable)"
            )
        self._check_scaler(model, 1.0)
        self._full_layout = layout
        self._classes = output_classes(model, layout)
        if self.ctx.num_classes is not None and int(self._classes.max()) + 1 != self.ctx.num_classes:
            raise ValueError(
                f"the output layer has {int(self._classes.max()) + 1} rows, ctx.num_classes is {self.ctx.num_classes}"
            )

    def slice_map(self, rate: float) -> SliceMap | None:
        """The index map of the width-``rate`` sub-model (None for the full model), built once."""
        if rate == 1.0:
            return None
        smap = self._maps.get(rate)
        if smap is None:
            sub = self._build(rate)
            self._check_scaler(sub, rate)
            full = self._build(1.0)
            smap = SliceMap(full, sub, full_layout=self._full_layout)
            self._maps[rate] = smap
        return smap

    # -- hooks
    def _on_start(self, now: float) -> list[Action]:
        return self._start_round(now)

    def _on_client_idle(self, now: float, client: int) -> list[Action]:
        # Mid-round newcomers wait for the next cohort draw.
        return [] if self.cohort else self._start_round(now)

    def _on_result(self, now: float, result: TaskResult) -> list[Action]:
        arrival = self.take_result(result)  # a bad update is rejected there (recorded, client told)
        self.arrived.append(_Arrived(arrival.task.client, float(result.num_samples), arrival.weights))
        return self._maybe_close(now)

    def result_like(self, task: TaskInFlight) -> torch.Tensor:
        """The width form returns the sub-network's vector: its length is the one expected."""
        return torch.empty((self._task_length(task.client),), dtype=self.weights.dtype, device="meta")

    def _on_task_failed(self, now: float, task: TaskInFlight) -> list[Action]:
        self.failed.append(task.client)
        return self._maybe_close(now)

    def metrics(self) -> PolicyMetrics:
        """The clients' fixed densities (mask mode; None in width mode) and rejected results."""
        return PolicyMetrics(densities=self.densities, rejected=tuple(self.rejected))

    def task_mask(self, task: TaskInFlight) -> torch.Tensor | None:
        """Mask form: the mask the task trained under. Rounds are synchronous, so a task in flight
        started from the current weights and its mask is the current one at its density."""
        if self.config.mode != "mask" or task.version != self.version:
            return None
        assert self.densities is not None
        return self.mask_for(self.densities[task.client])

    # -- rounds
    def _start_round(self, now: float) -> list[Action]:
        cohort = self.draw_cohort(self.cohort_size, self.config.min_clients, self.attempt)
        if cohort is None:
            return []
        self.cohort = cohort
        return [self._dispatch(c, now) for c in self.cohort]

    def _dispatch(self, client: int, now: float) -> Dispatch:
        task = self._width_task(client) if self.config.mode == "width" else self._mask_task(client)
        self._track(TaskInFlight(task.task_id, client, task.version, float(now)))
        return Dispatch(task)

    def _width_task(self, client: int) -> TaskSpec:
        assert self.rates is not None
        rate = self.rates[client]
        smap = self.slice_map(rate)
        if smap is None:
            weights, density = self.weights, 1.0
        else:
            weights, density = smap.slice(self.weights), smap.prunable_fraction
        nbytes = 4 * weights.numel()
        return TaskSpec(
            task_id=self.new_task_id(), client=client, version=self.version, weights=weights, mask=None,
            density=density, download_bytes=nbytes, upload_bytes=nbytes, width=rate,
        )

    def _mask_task(self, client: int) -> TaskSpec:
        assert self.densities is not None
        rho = self.densities[client]
        mask = self.mask_for(rho)
        total, npr = self.weights.numel(), self.ctx.num_prunable
        if mask is None:
            nbytes = up = 4 * total
            density = 1.0
        else:
            kept = self.ranking().count(rho)
            nbytes, density = sparse_bytes(kept, npr, total), rho
            up = 4 * (kept + total - npr)  # the values only: the server assigned the mask, so it knows it
        return TaskSpec(
            task_id=self.new_task_id(), client=client, version=self.version, weights=self.weights, mask=mask,
            density=density, download_bytes=nbytes, upload_bytes=up,
        )

    def ranking(self) -> Ranking:
        """Mask mode: the magnitude ranking (with the per-layer floor) of the current global weights."""
        if self._ranking is None:
            npr = self.ctx.num_prunable
            bounds = self.ctx.layer_bounds or ((0, npr),)
            self._ranking = magnitude_ranking(self.weights[:npr], bounds, floor=self.config.floor)
        return self._ranking

    def mask_for(self, density: float) -> torch.Tensor | None:
        """Mask mode: the mask at ``density`` on the current weights (None: dense)."""
        if density >= 1.0 or self.ctx.num_prunable == 0:
            return None
        if density not in self._masks:
            self._masks[density] = self.ranking().mask(density)
        return self._masks[density]

    def _task_length(self, client: int) -> int:
        if self.rates is not None:
            smap = self.slice_map(self.rates[client])
            if smap is not None:
                return smap.sub_total
        return self.weights.numel()

    def _maybe_close(self, now: float) -> list[Action]:
        if self.in_flight:
            return []
        if self.arrived and not sum(h.num_samples for h in self.arrived) > 0:
            raise ValueError("every result of the round reports num_samples = 0; cannot weight the average")
        cohort, arrived, failed = self.cohort, self.arrived, self.failed
        self.cohort, self.arrived, self.failed = [], [], []
        if arrived:
            new = self.aggregate(arrived)
            self.attempt = 0
            clients = sorted(h.client for h in arrived)
            per_client = self.rates if self.rates is not None else self.densities
            assert per_client is not None
            actions = self.commit(
                new, now, clients, [0] * len(clients), cohort=cohort, failed=sorted(failed),
                mode=self.config.mode, levels=[per_client[c] for c in clients],
            )
            self._ranking, self._masks = None, {}  # the weights changed
        else:
            self.attempt += 1
            actions = [Record("round_failed", {"round": self.version, "cohort": cohort, "attempt": self.attempt})]
        if not self.stopped:
            actions += self._start_round(now)
        return actions

    def aggregate(self, arrived: Sequence[_Arrived]) -> torch.Tensor:
        """The new global weights from the round's results (holder average or MaskFedAvg)."""
        coeffs = [h.num_samples for h in arrived]
        if self.config.mode == "mask":
            assert self.densities is not None
            masks = [self.mask_for(self.densities[h.client]) for h in arrived]
            return mask_fedavg(self.weights, [h.weights for h in arrived], masks, coeffs, self.ctx.num_prunable)
        assert self.rates is not None
        idxs: list[torch.Tensor | None] = []
        include: list[torch.Tensor | None] = []
        for h in arrived:
            smap = self.slice_map(self.rates[h.client])
            idx = None if smap is None else smap.idx
            idxs.append(idx)
            if self.config.label_split:
                assert self._classes is not None and self.ctx.client_labels is not None
                include.append(label_include(self._classes, idx, self.ctx.client_labels[h.client]))
            else:
                include.append(None)
        return holder_average(self.weights, [h.weights for h in arrived], idxs, coeffs, include)

    # -- checkpointing
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(
            cohort=list(self.cohort),
            arrived=[{"client": h.client, "num_samples": h.num_samples, "weights": h.weights.clone()} for h in self.arrived],
            failed=list(self.failed),
            attempt=self.attempt,
        )
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.cohort = list(state["cohort"])
        saved = state["arrived"] if "arrived" in state else state["held"]  # "held" in earlier checkpoints
        self.arrived = [_Arrived(int(h["client"]), float(h["num_samples"]), h["weights"].clone()) for h in saved]
        self.failed = list(state["failed"])
        self.attempt = int(state["attempt"])
        self._ranking, self._masks = None, {}  # rebuilt from the restored weights on demand
