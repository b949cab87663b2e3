"""Server policies: pure, event-driven state machines.

A policy is told what happened (an :class:`Event` carrying ``now``) and answers with a list of
:class:`Action`. It never sleeps, never reads a clock and does no I/O, so the virtual-clock
simulator and the Flower driver run the same policy objects, and tests script events by hand.

Contract on weights: tensors a policy hands out in a :class:`TaskSpec` are never modified in
place afterwards (aggregation builds new tensors), so a driver may keep references cheaply.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Union

import torch

from prfl.client.result import TaskResult
from prfl.distribution import ResidualPlan


# --------------------------------------------------------------------------- context
@dataclass(frozen=True)
class PolicyContext:
    """What a policy knows about the federation when it is built."""

    num_clients: int
    num_samples: tuple[int, ...]  # training samples per client
    initial_weights: torch.Tensor  # flat vector, prunable weights first
    num_prunable: int  # N: length of the prunable prefix of the flat vector
    seed: int = 0
    max_rounds: int | None = None  # stop after this many server updates (None: never)
    max_time: float | None = None  # stop at this time (None: never)
    layer_bounds: tuple[tuple[int, int], ...] = ()  # (start, stop) of each prunable layer in the prefix
    client_labels: tuple[tuple[int, ...], ...] | None = None  # labels present in each client's data
    num_classes: int | None = None
    model_builder: Callable[[float], Any] | None = None  # width -> a fresh nn.Module (HeteroFL slicing)
    # seconds a dense task takes each client at its mean speeds (download, compute, upload); orders
    # the fleet for preset initial densities and picks a reference client (None: client order)
    nominal_round_times: tuple[float, ...] | None = None
    # per prunable layer, the seconds one kept weight costs a typical client per task (its transfer
    # plus its share of the compute); PR-FL's ranking divides scores by it (None: no cost weighting)
    layer_cost: tuple[float, ...] | None = None
    # set by the simulator's reference accounting: server steps close as the reference's simulator
    # closes them (see StepTiming); None: each policy's own rule
    step_timing: StepTiming | None = None

    def __post_init__(self) -> None:
        if self.num_clients < 1:
            raise ValueError("num_clients must be at least 1")
        if len(self.num_samples) != self.num_clients:
            raise ValueError(
                f"num_samples has {len(self.num_samples)} entries for {self.num_clients} clients"
            )
        if self.initial_weights.dim() != 1:
            raise ValueError("initial_weights must be a flat 1-D tensor")
        if not 0 <= self.num_prunable <= self.initial_weights.numel():
            raise ValueError("num_prunable must lie between 0 and the number of weights")
        if self.nominal_round_times is not None and len(self.nominal_round_times) != self.num_clients:
            raise ValueError(f"nominal_round_times has {len(self.nominal_round_times)} entries for {self.num_clients} clients")
        if self.layer_cost is not None:
            if self.layer_bounds and len(self.layer_cost) != len(self.layer_bounds):
                raise ValueError(f"layer_cost has {len(self.layer_cost)} entries for {len(self.layer_bounds)} prunable layers")
            if any(not c > 0 for c in self.layer_cost):
                raise ValueError(f"layer_cost coefficients must be positive, got {list(self.layer_cost)}")

    def speed_order(self) -> list[int]:
        """Clients from fastest to slowest by nominal round time (ties and no times: by id)."""
        times = self.nominal_round_times
        if times is None:
            return list(range(self.num_clients))
        return sorted(range(self.num_clients), key=lambda c: (times[c], c))


@dataclass(frozen=True)
class StepTiming:
    """When a server step closes under the PR-FL reference simulator's rule (its R:2471-2489).

    Steps follow each other without gap: a step starts when the previous one closes, at ``t``,
    and hands out the tasks dispatched at ``t``; with ``D`` the largest of their downloads in
    bytes (0 when nothing was dispatched) it closes at

        t + L(D),   L(D) = max(window, D / server_up_bps + margin),

    ``server_up_bps`` the server's nominal (mean) uplink speed in bytes/s and ``margin`` the
    reference's 0.1 s. ``window`` is the policy's own (PR-FL: its aggregation window; FedAsync: 0).
    Every result that arrives in ``(t, t + L]`` is aggregated at the close. A step in which
    nothing was dispatched lasts ``max(window, margin)``, so the boundaries after a step of length
    ``L1`` that started at ``t`` are ``t + L1 + k max(window, margin)``, k = 0, 1, ...
    (:meth:`next_close`). ``download_bytes`` sizes a task's download for the rule (None: the
    task's own ``download_bytes``); the reference accounting passes the reference's sizes.
    """

    server_up_bps: float
    margin: float = 0.1
    download_bytes: Callable[[TaskSpec], int] | None = None

    def __post_init__(self) -> None:
        if not self.server_up_bps > 0:  # also refuses NaN
            raise ValueError(f"server_up_bps must be positive (math.inf: unlimited), got {self.server_up_bps!r}")
        if not 0 <= self.margin < float("inf"):
            raise ValueError(f"margin must be a finite number >= 0, got {self.margin!r}")

    def size(self, task: TaskSpec) -> int:
        """Bytes of ``task``'s download as the rule counts them."""
        return task.download_bytes if self.download_bytes is None else int(self.download_bytes(task))

    def step_length(self, window: float, tasks: list[TaskSpec]) -> float:
        """L = max(window, max_i D_i / server_up_bps + margin) for the tasks dispatched at a step's start."""
        largest = max((self.size(t) for t in tasks), default=0)
        return max(window, largest / self.server_up_bps + self.margin)

    def next_close(self, start: float, first_length: float, window: float, now: float) -> float:
        """The first step boundary at or after ``now`` (> ``start``): ``start + first_length``,
        then every ``max(window, margin)`` seconds (empty steps)."""
        first = start + first_length
        if now <= first:
            return first
        empty = max(window, self.margin)
        if empty <= 0:
            return now  # zero-length empty steps: the step closes as the result arrives
        # a result at a boundary belongs to the step that closes there; 1e-9 absorbs the rounding
        # of (now - first) / empty (e.g. (1.0 - 0.6) / 0.1 = 4.000000000000001)
        k = math.ceil((now - first) / empty - 1e-9)
        return max(first + k * empty, now)  # never before now (a boundary a rounding error ago is now)


# --------------------------------------------------------------------------- events
@dataclass(frozen=True)
class Start:
    """The run begins; every client is idle and online unless told otherwise."""

    now: float


@dataclass(frozen=True)
class ClientIdle:
    """A client came (back) online and holds no task."""

    now: float
    client: int


@dataclass(frozen=True)
class ResultArrived:
    """A client's upload finished at the server."""

    now: float
    result: TaskResult


@dataclass(frozen=True)
class TaskFailed:
    """A dispatched task will not return (client went offline, crashed, or was rejected)."""

    now: float
    client: int
    task_id: int
    reason: str


@dataclass(frozen=True)
class TimerFired:
    """A timer set by the policy with :class:`SetTimer` fired."""

    now: float
    key: str


@dataclass(frozen=True)
class EvaluationDone:
    """Answer to a :class:`RequestEvaluation`."""

    now: float
    tag: str
    accuracy: float
    loss: float


Event = Union[Start, ClientIdle, ResultArrived, TaskFailed, TimerFired, EvaluationDone]


# --------------------------------------------------------------------------- actions
@dataclass(frozen=True)
class TaskSpec:
    """A local training task: start from ``weights`` (model ``version``), train under ``mask``.

    ``mask`` is a bool tensor over the prunable prefix (None: dense). ``download_bytes`` and
    ``upload_bytes`` are what the client's links carry; ``server_egress_bytes`` is what the
    server's uplink must push for this dispatch (less than ``download_bytes`` when pieces are
    shared between clients). ``pieces`` names residual pieces the client needs, if any.
    ``upload_index_bytes`` and ``upload_importance_bytes`` say how much of ``upload_bytes`` is
    positions and importance scores; the rest is weight values.
    """

    task_id: int
    client: int
    version: int
    weights: torch.Tensor
    mask: torch.Tensor | None
    density: float
    download_bytes: int
    upload_bytes: int
    server_egress_bytes: int | None = None
    pieces: tuple[str, ...] = ()
    width: float = 1.0
    want_importance: bool = False
    importance_dtype: str = "float32"  # precision the importance scores are uploaded in
    # "kept": the squared gradients of the kept weights only (pruned weights get none, as when the
    # forward pass multiplies by the mask); "all": of every prunable weight
    importance_scope: str = "all"
    upload_index_bytes: int = 0  # part of upload_bytes that is positions
    upload_importance_bytes: int = 0  # part of upload_bytes that is importance scores
    # what the task downloads, for a relay that serves content already published (the honest
    # accounting's model relay); None: the version's sub-model of this density and width. A policy
    # whose weights can change without a new version (PR-FL's roll-back) names its content itself.
    content_key: tuple[int | float, ...] | None = None


@dataclass(frozen=True)
class Dispatch:
    """Send ``task`` to its client now."""

    task: TaskSpec


@dataclass(frozen=True)
class SetTimer:
    """Deliver ``TimerFired(key)`` at time ``at`` (replaces a pending timer with the same key)."""

    at: float
    key: str


@dataclass(frozen=True)
class RequestEvaluation:
    """Evaluate ``weights`` on the held-out set and reply with ``EvaluationDone(tag)``.

    ``weights`` is a tensor or a zero-argument callable returning one, built on demand so that a
    policy asking for many evaluations (PR-FL's per-client monitors over thousands of buffered
    clients) does not hold every model at once. A driver calls :meth:`model` once per request
    and before it hands the policy another event, so the callable sees the state it was made in."""

    weights: torch.Tensor | Callable[[], torch.Tensor]
    tag: str

    def model(self) -> torch.Tensor:
        """The weights to evaluate (the callable's result, when ``weights`` is one)."""
        return self.weights if isinstance(self.weights, torch.Tensor) else self.weights()


@dataclass(frozen=True)
class Record:
    """A policy event worth keeping in the run history (density change, recovery step, ...)."""

    kind: str
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Stop:
    """End the run."""

    reason: str


@dataclass(frozen=True)
class NotifyClient:
    """Tell ``client`` that the result of its task ``task_id`` was rejected by ``check`` (with
    ``reason``). A driver with a transport sends the client's node a notice (fire and forget);
    the simulator, whose clients are modelled, has no one to tell."""

    client: int
    task_id: int
    check: str
    reason: str


Action = Union[Dispatch, SetTimer, RequestEvaluation, Record, Stop, NotifyClient]


# --------------------------------------------------------------------------- what drivers read
@dataclass(frozen=True)
class PolicyMetrics:
    """What a policy reports to its driver for evaluation records and the summary.

    ``densities``: each client's current density rho_i in (0, 1] (None: the policy does not
    assign densities). ``buffer_staleness``: per client, ``version - v_i`` for the update of
    client i waiting in the server's buffer, sent from model version v_i (None for a client with
    nothing buffered; None as a whole: the policy keeps no per-client buffer). ``rejected``:
    results rejected by validation, per client (empty: the policy validates nothing).
    """

    densities: tuple[float, ...] | None = None
    buffer_staleness: tuple[int | None, ...] | None = None
    rejected: tuple[int, ...] = ()


@dataclass(frozen=True)
class TaskInFlight:
    """A task the policy dispatched and still waits for."""

    task_id: int
    client: int
    version: int  # model version it started from
    dispatched_at: float


# --------------------------------------------------------------------------- policy
class Policy:
    """Base class: holds the global model and its version; subclasses implement ``on_event``.

    ``version`` counts server updates (the server round). ``weights`` is the current global flat
    vector. ``participation[i]`` counts results aggregated from client ``i``.
    """

    name: str = "policy"

    def __init__(self, ctx: PolicyContext) -> None:
        self.ctx = ctx
        self.weights: torch.Tensor = ctx.initial_weights.detach().clone()
        self.version: int = 0
        self.next_task_id: int = 0
        self.participation: list[int] = [0] * ctx.num_clients

    # -- to implement
    def on_event(self, event: Event) -> list[Action]:
        raise NotImplementedError

    # -- what drivers may read (public and typed: no driver reads a policy's attributes)
    def metrics(self) -> PolicyMetrics:
        """Per-client figures for evaluation records and the summary (none by default)."""
        return PolicyMetrics()

    def tasks_in_flight(self) -> tuple[TaskInFlight, ...]:
        """The tasks dispatched and not yet ended (arrived, failed or rejected), by task id."""
        return ()

    def residual_plan(self, spec: TaskSpec) -> ResidualPlan | None:
        """How ``spec``'s sub-model is distributed as nested residual pieces (the split and the
        pieces 0..j it needs), or None when the policy sends whole (sub-)models."""
        return None

    # -- helpers for subclasses
    def new_task_id(self) -> int:
        tid = self.next_task_id
        self.next_task_id += 1
        return tid

    def dense_bytes(self) -> int:
        """Bytes of the whole model in fp32."""
        return 4 * self.weights.numel()

    def dense_task(self, client: int, want_importance: bool = False) -> TaskSpec:
        """A dense task on the current global model (full download and upload)."""
        nbytes = self.dense_bytes()
        return TaskSpec(
            task_id=self.new_task_id(),
            client=client,
            version=self.version,
            weights=self.weights,
            mask=None,
            density=1.0,
            download_bytes=nbytes,
            upload_bytes=nbytes,
            want_importance=want_importance,
        )

    def should_stop(self, now: float) -> bool:
        """True once the configured round or time budget is spent."""
        if self.ctx.max_rounds is not None and self.version >= self.ctx.max_rounds:
            return True
        return self.ctx.max_time is not None and now >= self.ctx.max_time

    # -- checkpointing: subclasses extend with their own state
    def state_dict(self) -> dict[str, Any]:
        return {
            "weights": self.weights.clone(),
            "version": self.version,
            "next_task_id": self.next_task_id,
            "participation": list(self.participation),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.weights = state["weights"].clone()
        self.version = int(state["version"])
        self.next_task_id = int(state["next_task_id"])
        self.participation = list(state["participation"])
