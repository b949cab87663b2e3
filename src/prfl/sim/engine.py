"""The virtual-clock simulation driver: runs a server policy against a modelled fleet.

Local training really runs (on an executor), but time is modelled: a task takes its download
over the server's shared uplink, its local compute (FLOPs of the steps at the sub-model's
density, divided by the device's drawn speed) and its upload over the server's shared downlink.
All draws are seeded by address, so a run's history is fixed by its seed, whatever executor
trains and however loaded the host is (unless compute time is taken from measurements).

Accounting. ``SimSettings.accounting`` says what a task costs: ``honest`` (the default) charges
every byte the policy's task moves and FLOP-based compute at the device's speed; ``reference``
charges the PR-FL reference code's cost model (reference-sized downloads pushed once per server
step, values-only uploads, the same compute seconds for every client); see
:mod:`prfl.sim.accounting`.

Where a task's time goes. Every ``arrival`` record splits the task's duration (dispatch to the
end of its upload) into ``download + link_wait + compute + upload`` seconds; see
:meth:`Simulation._timing` for the definitions.

Checkpoints and exact resume. With a checkpoint directory the driver saves its whole state
(event queue, links, in-flight tasks, the policy, counters and the byte offset of the history
file) every ``checkpoint_every_rounds`` server rounds, once the event that made the round has
been handled completely (the evaluations it requested included), so a run resumed from any
checkpoint replays exactly what the uninterrupted run did. An in-flight task is saved as the
job it is (its start values, one copy per model version and mask, fetched from wherever the
executor keeps them: memory or its spill files) and trained again after a resume, which gives
the same output since a job carries everything that decides it; a task whose job is no longer
at hand (already trained) is saved with its output. The file format is :mod:`prfl.checkpoint`
(safetensors and JSON, written atomically with a checksum trailer, ``checkpoint.prev.pt`` kept);
:func:`load_checkpoint` falls back to the previous checkpoint, and the caller cuts the history
back to the offset of the checkpoint it got.
"""

from __future__ import annotations

import heapq
import logging
import math
import os
import time
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import torch

from prfl.allocator import release_free_heap, tune_allocator
from prfl.checkpoint import (  # noqa: F401  (the checkpoint names, as this module has always exported them)
    CHECKPOINT,
    PREVIOUS_CHECKPOINT,
    CheckpointError,
    Streamed,
    load_checkpoint,
    materialize,
    read_checkpoint,
    write_checkpoint,
)
from prfl.client.result import TaskResult
from prfl.client.trainer import TrainConfig, TrainOutput
from prfl.policies.base import (
    ClientIdle,
    Dispatch,
    EvaluationDone,
    Event,
    Policy,
    Record,
    RequestEvaluation,
    ResultArrived,
    SetTimer,
    Start,
    Stop,
    TaskFailed,
    TaskSpec,
    TimerFired,
)
from prfl.seeding import int_seed
from prfl.sim.accounting import Accounting, ReferenceBroadcast, ReferenceSizes, check_accounting, values_only_bytes
from prfl.sim.devices import Fleet, TaskSpeeds, draw_server_speeds, draw_task_speeds
from prfl.sim.executors import Executor, TrainJob, job_source
from prfl.sim.history import TIME_PARTS, UPLOAD_PARTS, HistoryWriter
from prfl.sim.links import SharedLink

log = logging.getLogger(__name__)

_NO_WEIGHTS = torch.empty(0)  # what an in-flight task record holds in place of its start weights
STATE_FORMAT = 2  # the layout of Simulation.state_dict


Evaluator = Callable[[torch.Tensor], tuple[float, float]]  # weights -> (loss, accuracy)


@dataclass(frozen=True)
class SimSettings:
    """How the simulator models time and when it evaluates and checkpoints."""

    eval_every_rounds: int | None = 10
    eval_every_seconds: float | None = None
    max_time: float | None = None
    compute_time: Literal["flops", "measured"] = "flops"
    sparse_efficiency: float = 1.0  # 1: compute scales with density; 0: masks save no compute
    shared_server_link: bool = True
    # pieces already published for the model version reach later clients from a relay at the
    # client's own speed; False: every downloaded byte crosses the server's shared link (Flower)
    piece_relay: bool = True
    checkpoint_every_rounds: int | None = None
    target_accuracies: tuple[float, ...] = ()
    accounting: Accounting = "honest"  # what tasks cost: every byte, or the reference's model

    def __post_init__(self) -> None:
        check_accounting(self.accounting)
        if self.accounting == "reference" and not self.piece_relay:
            raise ValueError("piece_relay: false describes where honest downloads come from; the reference "
                             "accounting has its own download model: use accounting 'honest' or piece_relay true")
        if self.eval_every_rounds is not None and self.eval_every_rounds < 1:
            raise ValueError("eval_every_rounds must be at least 1 (or None)")
        if self.eval_every_seconds is not None and self.eval_every_seconds <= 0:
            raise ValueError("eval_every_seconds must be positive (or None)")
        if not 0.0 <= self.sparse_efficiency <= 1.0:
            raise ValueError("sparse_efficiency must lie in [0, 1]")
        if self.compute_time not in ("flops", "measured"):
            raise ValueError("compute_time must be 'flops' or 'measured'")


@dataclass
class InFlight:
    """A dispatched task on its way: download, compute, upload."""

    spec: TaskSpec
    speeds: TaskSpeeds
    dispatched_at: float
    stage: str = "download"
    relay_bytes: int = 0  # part of the download served from already-published pieces
    output: TrainOutput | None = None
    compute_seconds: float = 0.0
    future: Any = field(default=None, repr=False)
    down_bytes: int = 0  # bytes the download is charged (the accounting's size)
    download_done_at: float = math.nan  # when the last byte of the download arrived
    upload_started_at: float = math.nan  # when compute ended and the upload began


class Simulation:
    """Drives one policy on a fleet in virtual time."""

    def __init__(
        self,
        policy: Policy,
        fleet: Fleet,
        executor: Executor,
        client_indices: list[np.ndarray],
        train_cfg: TrainConfig,
        step_flops: Callable[[torch.Tensor | None, int, float], float],  # (mask, batch, width) -> FLOPs of a step
        evaluator: Evaluator,
        settings: SimSettings = SimSettings(),
        seed: int = 0,
        history: HistoryWriter | None = None,
        availability: Any | None = None,
        checkpoint_dir: str | os.PathLike[str] | None = None,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
        privacy: Any | None = None,
    ) -> None:
        """``privacy``: a :class:`prfl.privacy.ClientDP` to privatise every client update (the
        executor is wrapped in :class:`prfl.privacy.PrivatizingExecutor`) and report epsilon in
        the summary; needs the ``privacy`` extra for the accounting."""
        tune_allocator()
        if len(fleet) != policy.ctx.num_clients or len(client_indices) != policy.ctx.num_clients:
            raise ValueError(
                f"fleet has {len(fleet)} clients, partition {len(client_indices)}, policy {policy.ctx.num_clients}: they must agree"
            )
        self.policy = policy
        self.fleet = fleet
        self.privacy = privacy
        if privacy is not None:
            from prfl.privacy import INSTALL_HINT, PrivatizingExecutor, accountant_available

            if not accountant_available():
                raise ImportError(f"privacy=... reports epsilon with dp-accounting, which is missing; {INSTALL_HINT}")
            executor = PrivatizingExecutor(executor, privacy, policy.ctx.num_prunable, seed)
        self.executor = executor
        self.client_indices = client_indices
        self.train_cfg = train_cfg
        self.step_flops = step_flops
        self.evaluator = evaluator
        self.settings = settings
        self.seed = seed
        self.history = history or HistoryWriter(None)
        self.availability = availability
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.on_progress = on_progress

        n = policy.ctx.num_clients
        self.now = 0.0
        self._seq = 0
        self._heap: list[tuple[float, int, str, Any]] = []
        self._timers: dict[str, int] = {}
        self.inflight: dict[int, InFlight] = {}
        self.busy: dict[int, int] = {}  # client -> task id
        self.online = [True] * n
        self.uplink = SharedLink(None)  # server -> clients (downloads)
        self.downlink = SharedLink(None)  # clients -> server (uploads)
        self._server_key = -1
        self.stopped: str | None = None
        self.last_eval_version = -1
        self.next_eval_round = settings.eval_every_rounds or 0
        self.bytes_down = [0] * n
        self.bytes_up = [0] * n
        self.server_egress = 0
        self.server_ingress = 0
        self.arrivals = [0] * n
        self.compute_total = 0.0  # measured seconds of local training, for overhead figures
        # per client: seconds of download, link wait, compute, upload summed over its arrivals
        self.time_parts = [[0.0] * len(TIME_PARTS) for _ in range(n)]
        self.upload_parts = [0] * len(UPLOAD_PARTS)  # bytes of values, index, importance uploaded
        self.reference = settings.accounting == "reference"
        self._ref_sizes = ReferenceSizes(policy.ctx.num_prunable, policy.ctx.initial_weights.numel())
        self._broadcast = ReferenceBroadcast(self._ref_sizes)
        # reference accounting, compute_time "flops": every client computes at the fastest device's speed
        self._equal_flops = max(p.compute_flops for p in fleet.clients)
        self.evals: list[dict[str, Any]] = []
        self.reached: dict[float, float] = {}
        self._last_ckpt_version = 0
        self._checkpoint_due = False
        self._events_handled = 0
        self._resumed = False

    # ------------------------------------------------------------------ scheduling
    def _push(self, t: float, kind: str, payload: Any = None) -> int:
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, kind, payload))
        return self._seq

    def _set_server_capacity(self) -> None:
        """Server link speeds are drawn once per server round (mean of 20 log-normal samples)."""
        if not self.settings.shared_server_link:
            return
        key = self.policy.version
        if key == self._server_key:
            return
        self._server_key = key
        down, up = draw_server_speeds(self.fleet, key, self.seed)
        self.uplink.set_capacity(up, self.now)  # the server's upload carries client downloads
        self.downlink.set_capacity(down, self.now)

    # ------------------------------------------------------------------ running
    def resume(self, state: dict[str, Any]) -> None:
        """Restore a checkpoint's state (from :func:`~prfl.checkpoint.load_checkpoint`); the next
        :meth:`run` continues from it. The state is not kept: dropping it afterwards frees it."""
        self._restore(state)
        self._resumed = True

    def run(self, resume_state: dict[str, Any] | None = None) -> dict[str, Any]:
        """Run until the policy stops, time runs out, or nothing can happen any more
        (continuing from ``resume_state``, or from what :meth:`resume` restored)."""
        wall0 = time.perf_counter()
        if resume_state is not None:
            self.resume(resume_state)
            del resume_state
        if not self._resumed:
            self.history.write("start", time=0.0, round=0, clients=self.policy.ctx.num_clients, policy=self.policy.name)
            if self.availability is not None:
                for c in range(len(self.online)):
                    self.online[c] = bool(self.availability.is_online(c, 0.0))
                    self._schedule_availability(c)
            if self.settings.eval_every_seconds:
                self._push(self.settings.eval_every_seconds, "eval_time")
            self._set_server_capacity()
            self._evaluate(force=True)
            self._deliver(Start(now=0.0))  # dispatches to offline clients fail at once
        try:
            while self.stopped is None:
                if not self._step():
                    self.stopped = self.stopped or "idle: no task in flight and nothing scheduled"
                    break
                release_free_heap()  # freed blocks between live ones are not trimmed by glibc
        finally:
            self._drain_futures()
        if self.last_eval_version != self.policy.version or not self.evals:
            self._evaluate(force=True)
        wall = time.perf_counter() - wall0
        self.history.write("end", time=self.now, round=self.policy.version, reason=self.stopped)
        return self.summary(wall)

    def _step(self) -> bool:
        """Process the next thing that happens. False when nothing is left."""
        while self._heap and self._heap[0][2] == "timer" and self._timers.get(self._heap[0][3][0]) != self._heap[0][3][1]:
            heapq.heappop(self._heap)  # a replaced timer: drop it without moving the clock
        t_heap = self._heap[0][0] if self._heap else math.inf
        nxt = [(c[0], name) for name, link in (("down", self.uplink), ("up", self.downlink)) if (c := link.next_completion())]
        t_link = min((t for t, _ in nxt), default=math.inf)
        t = min(t_heap, t_link)
        if t == math.inf:
            return False
        if self.settings.max_time is not None and t > self.settings.max_time:
            self.now = self.settings.max_time
            self.stopped = "time budget spent"
            return True
        self.now = max(self.now, t)
        if t_link <= t_heap:
            for tid in self.uplink.advance(self.now):
                self._download_done(tid)
            for tid in self.downlink.advance(self.now):
                self._upload_done(tid)
            return True
        _, _, kind, payload = heapq.heappop(self._heap)
        # keep the links' clocks in step before anything starts a transfer
        for tid in self.uplink.advance(self.now):
            self._download_done(tid)
        for tid in self.downlink.advance(self.now):
            self._upload_done(tid)
        if kind == "compute_done":
            self._compute_done(payload)
        elif kind == "relay_done":
            self._download_done(payload, relayed=True)
        elif kind == "timer":
            key, seq = payload
            if self._timers.get(key) == seq:
                del self._timers[key]
                self._deliver(TimerFired(now=self.now, key=key))
        elif kind == "availability":
            self._availability_change(payload)
        elif kind == "eval_time":
            self._evaluate(force=True)
            if self.settings.eval_every_seconds:
                self._push(self.now + self.settings.eval_every_seconds, "eval_time")
        elif kind == "failed":
            client, tid, reason = payload
            self._deliver(TaskFailed(now=self.now, client=client, task_id=tid, reason=reason))
        return True

    # ------------------------------------------------------------------ task stages
    def _dispatch(self, spec: TaskSpec) -> None:
        c = spec.client
        if not 0 <= c < len(self.online):
            raise ValueError(f"policy dispatched to unknown client {c}")
        if c in self.busy:
            raise RuntimeError(f"policy dispatched task {spec.task_id} to client {c}, which is busy with task {self.busy[c]}")
        if not self.online[c]:
            self.history.write("task_failed", time=self.now, round=self.policy.version, client=c, task=spec.task_id, reason="offline")
            self._push(self.now, "failed", (c, spec.task_id, "offline"))
            return
        speeds = draw_task_speeds(self.fleet, c, spec.task_id, self.seed)
        job = self._job(spec, spec.weights)
        if self.reference:
            down = self._ref_sizes.download_bytes(spec)
            egress = self._broadcast.egress(spec)
        else:
            down = spec.download_bytes
            egress = down
            if spec.server_egress_bytes is not None and self.settings.piece_relay:
                egress = min(spec.server_egress_bytes, down)
        future = self.executor.submit(job)
        del job
        # The job carries what training needs; the record of the task does not need the start
        # weights, and keeping them would keep one model version alive per task in flight.
        fl = InFlight(
            spec=dataclasses.replace(spec, weights=_NO_WEIGHTS), speeds=speeds, dispatched_at=self.now,
            relay_bytes=down - egress, future=future, down_bytes=down,
        )
        self.inflight[spec.task_id] = fl
        self.busy[c] = spec.task_id
        self.server_egress += egress
        self.bytes_down[c] += down
        self._set_server_capacity()
        cap = speeds.down_bps
        if not self.settings.shared_server_link:  # every transfer sees the whole server link
            cap = min(cap, self.fleet.server.up_bps)
        # Bytes the server publishes for this dispatch cross its shared uplink; pieces it already
        # published for this model version are served from the publication point at the
        # client's own speed (see prfl.distribution).
        self.uplink.start(spec.task_id, egress, cap, self.now)

    def _job(self, spec: TaskSpec, weights: torch.Tensor, packed: bool = False) -> TrainJob:
        """The training job of a task: everything that decides its output."""
        return TrainJob(
            task_id=spec.task_id,
            client=spec.client,
            weights=weights,
            indices=self.client_indices[spec.client],
            seed=int_seed(self.seed, "train", spec.client, spec.task_id),
            mask=spec.mask,
            want_importance=spec.want_importance,
            width=spec.width,
            packed=packed,
        )

    def _output(self, fl: InFlight) -> TrainOutput:
        if fl.output is None:
            fl.output = fl.future.result()
            fl.future = None
            self.compute_total += fl.output.compute_seconds
        return fl.output

    def _download_done(self, tid: int, relayed: bool = False) -> None:
        fl = self.inflight.get(tid)
        if fl is None:
            return
        if fl.relay_bytes > 0 and not relayed:
            fl.stage = "relay"
            self._push(self.now + fl.relay_bytes / fl.speeds.down_bps, "relay_done", tid)
            return
        fl.stage = "compute"
        fl.download_done_at = self.now
        if self.settings.compute_time == "measured":
            seconds = self._output(fl).compute_seconds
        else:
            n = len(self.client_indices[fl.spec.client])
            steps = self.train_cfg.num_steps(n)
            batch = min(self.train_cfg.batch_size, n)
            if self.reference:  # the dense model's FLOPs at the fastest device's nominal speed
                seconds = steps * self.step_flops(None, batch, 1.0) / self._equal_flops
            else:
                seconds = steps * self.step_flops(fl.spec.mask, batch, fl.spec.width) / fl.speeds.compute_flops
        fl.compute_seconds = seconds
        self._push(self.now + seconds, "compute_done", tid)

    def _compute_done(self, tid: int) -> None:
        fl = self.inflight.get(tid)
        if fl is None:
            return
        fl.stage = "upload"
        fl.upload_started_at = self.now
        # The result is fetched when the upload completes: a deferred (inline) job then trains
        # just before the server needs it, and nothing waits in memory during the upload.
        cap = fl.speeds.up_bps
        if not self.settings.shared_server_link:
            cap = min(cap, self.fleet.server.down_bps)
        self.downlink.start(tid, self._upload_bytes(fl.spec), cap, self.now)

    def _upload_bytes(self, spec: TaskSpec) -> int:
        """Bytes a task's upload is charged: all of it (honest), its values only (reference)."""
        return values_only_bytes(spec) if self.reference else spec.upload_bytes

    def _timing(self, fl: InFlight) -> dict[str, float]:
        """Where a finished task's time went, in seconds: ``download + link_wait + compute +
        upload = duration`` (up to rounding), ``duration`` = arrival time - dispatch time.

        - ``download`` = D / v_down: the task's charged download bytes D at the client's own
          download speed v_down drawn for this task (relayed pieces included);
        - ``upload`` = U / v_up likewise for its charged upload bytes U;
        - ``compute`` = the modelled (or measured) local training seconds;
        - ``link_wait`` = the rest: (observed download seconds - D / v_down) + (observed upload
          seconds - U / v_up), each clamped at 0. It is the time the transfers were queued or
          slowed by the server's link beyond the client's own link: a max-min fair share of
          the shared server link below the client's speed, or (``shared_server_link`` off) a
          server link slower than the client's. A client alone on a fast server waits 0.
        - ``link_wait_down`` = the download's part of ``link_wait`` (the upload's is the rest), so
          a transfer's observed seconds are ``download + link_wait_down`` and ``upload +
          link_wait - link_wait_down`` (what a deployment's timestamps measure).
        """
        own_down = fl.down_bytes / fl.speeds.down_bps
        own_up = self._upload_bytes(fl.spec) / fl.speeds.up_bps
        wait_down = max(0.0, (fl.download_done_at - fl.dispatched_at) - own_down)
        wait_up = max(0.0, (self.now - fl.upload_started_at) - own_up)
        return {"download": own_down, "link_wait": wait_down + wait_up, "link_wait_down": wait_down,
                "compute": fl.compute_seconds, "upload": own_up}

    def _upload_done(self, tid: int) -> None:
        fl = self.inflight.pop(tid, None)
        if fl is None:
            return
        spec = fl.spec
        c = spec.client
        self.busy.pop(c, None)
        out = self._output(fl)
        up = self._upload_bytes(spec)
        self.bytes_up[c] += up
        self.server_ingress += up
        self.arrivals[c] += 1
        timing = self._timing(fl)
        for k, part in enumerate(TIME_PARTS):
            self.time_parts[c][k] += timing[part]
        parts = {"values": values_only_bytes(spec), "index": spec.upload_index_bytes,
                 "importance": spec.upload_importance_bytes}
        for k, part in enumerate(UPLOAD_PARTS):
            self.upload_parts[k] += parts[part]
        result = TaskResult(
            task_id=tid,
            client=c,
            version=spec.version,
            weights=out.weights,
            num_samples=out.num_samples,
            mean_loss=out.mean_loss,
            steps=out.steps,
            compute_seconds=out.compute_seconds,
            grad_sq=out.grad_sq,
            density=spec.density,
            width=spec.width,
        )
        self.history.write(
            "arrival",
            time=self.now,
            round=self.policy.version,
            client=c,
            task=tid,
            version=spec.version,
            staleness=self.policy.version - spec.version,
            density=spec.density,
            train_loss=out.mean_loss,
            duration=self.now - fl.dispatched_at,
            compute=fl.compute_seconds,
            download=timing["download"],
            link_wait=timing["link_wait"],
            link_wait_down=timing["link_wait_down"],
            upload=timing["upload"],
            bytes_down=fl.down_bytes,
            bytes_up=up,
            bytes_up_values=parts["values"],
            bytes_up_index=parts["index"],
            bytes_up_importance=parts["importance"],
        )
        self._deliver(ResultArrived(now=self.now, result=result))

    def _fail_inflight(self, client: int, reason: str) -> None:
        tid = self.busy.pop(client, None)
        if tid is None:
            return
        fl = self.inflight.pop(tid)
        if fl.stage == "download":
            self.uplink.cancel(tid, self.now)
        elif fl.stage == "upload":
            self.downlink.cancel(tid, self.now)
        # a compute_done event may still be queued; it finds no task and does nothing
        if fl.future is not None:
            fl.future.cancel()
        self.history.write("task_failed", time=self.now, round=self.policy.version, client=client, task=tid, reason=reason)
        self._deliver(TaskFailed(now=self.now, client=client, task_id=tid, reason=reason))

    # ------------------------------------------------------------------ availability
    def _schedule_availability(self, client: int) -> None:
        t = self.availability.next_change(client, self.now)
        if math.isfinite(t):
            self._push(t, "availability", client)

    def _availability_change(self, client: int) -> None:
        online = bool(self.availability.is_online(client, self.now))
        was = self.online[client]
        self.online[client] = online
        self._schedule_availability(client)
        if was == online:
            return
        self.history.write("availability", time=self.now, round=self.policy.version, client=client, online=online)
        if online:
            self._deliver(ClientIdle(now=self.now, client=client))
        else:
            self._fail_inflight(client, "offline")

    # ------------------------------------------------------------------ policy I/O
    def _deliver(self, event: Event) -> None:
        pending: list[Event] = [event]
        while pending and self.stopped is None:
            ev = pending.pop(0)
            before = self.policy.version
            actions = self.policy.on_event(ev)
            self._events_handled += 1
            for action in actions:
                if isinstance(action, Dispatch):
                    self._dispatch(action.task)
                elif isinstance(action, SetTimer):
                    if action.at < self.now:
                        raise RuntimeError(f"policy set timer {action.key!r} in the past ({action.at} < {self.now})")
                    self._seq += 1
                    self._timers[action.key] = self._seq
                    heapq.heappush(self._heap, (action.at, self._seq, "timer", (action.key, self._seq)))
                elif isinstance(action, RequestEvaluation):
                    loss, acc = self.evaluator(action.weights)
                    pending.append(EvaluationDone(now=self.now, tag=action.tag, accuracy=acc, loss=loss))
                elif isinstance(action, Record):
                    self.history.write(action.kind, **{"time": self.now, "round": self.policy.version, **action.data})
                elif isinstance(action, Stop):
                    self.stopped = action.reason
                else:
                    raise TypeError(f"unknown action {action!r}")
            if self.policy.version != before:
                self._after_update()
        # A checkpoint waits until the event is handled completely (the evaluations it asked
        # for answered), so that nothing pending is left out of the saved state.
        if self._checkpoint_due and not pending and self.stopped is None:
            self._checkpoint_due = False
            self.save_checkpoint()

    def _after_update(self) -> None:
        self._set_server_capacity()
        every = self.settings.eval_every_rounds
        if every and self.policy.version >= self.next_eval_round:
            self._evaluate(force=True)
            while self.next_eval_round <= self.policy.version:
                self.next_eval_round += every
        ck = self.settings.checkpoint_every_rounds
        if ck and self.checkpoint_dir is not None and self.policy.version - self._last_ckpt_version >= ck:
            self._checkpoint_due = True  # saved by _deliver once the event is fully handled

    def _evaluate(self, force: bool = False) -> None:
        loss, acc = self.evaluator(self.policy.weights)
        self.last_eval_version = self.policy.version
        rec = {
            "time": self.now,
            "round": self.policy.version,
            "accuracy": acc,
            "loss": loss,
            "server_egress": self.server_egress,
            "server_ingress": self.server_ingress,
            "participation": list(self.arrivals),
        }
        densities = getattr(self.policy, "densities", None)
        if densities is not None:
            rec["density"] = [float(d) for d in densities]
        self.evals.append(rec)
        for target in self.settings.target_accuracies:
            if acc >= target and target not in self.reached:
                self.reached[target] = self.now
        self.history.write("eval", **rec)
        if self.on_progress is not None:
            self.on_progress(rec)

    # ------------------------------------------------------------------ results
    def summary(self, wall_seconds: float) -> dict[str, Any]:
        accs = [e["accuracy"] for e in self.evals]
        out = {
            "policy": self.policy.name,
            "stopped": self.stopped,
            "virtual_seconds": self.now,
            "server_rounds": self.policy.version,
            "final_accuracy": accs[-1] if accs else None,
            "best_accuracy": max(accs) if accs else None,
            "time_to_accuracy": {f"{t:g}": self.reached.get(t) for t in self.settings.target_accuracies},
            "local_rounds": list(self.arrivals),
            "aggregated_rounds": list(self.policy.participation),
            "server_egress_bytes": self.server_egress,
            "server_ingress_bytes": self.server_ingress,
            "client_download_bytes": list(self.bytes_down),
            "client_upload_bytes": list(self.bytes_up),
            "wall_seconds": wall_seconds,
            "train_seconds": self.compute_total,
            "accounting": self.settings.accounting,
            # mean seconds per local round of each client (None: no arrival)
            "round_time_breakdown": {
                part: [row[k] / a if a else None for row, a in zip(self.time_parts, self.arrivals)]
                for k, part in enumerate(TIME_PARTS)
            },
            # bytes the clients' uploads held, by kind (the reference accounting charges values only)
            "upload_bytes_split": dict(zip(UPLOAD_PARTS, self.upload_parts)),
        }
        rejected = getattr(self.policy, "rejected", None)
        if rejected is not None and any(rejected):
            out["rejected_updates"] = list(rejected)
        if self.privacy is not None:
            from prfl.privacy import privacy_report

            # every upload released one privatised update, whether it was aggregated or not
            out["privacy"] = privacy_report(self.privacy, self.arrivals, self.policy.version)
        return out

    def _drain_futures(self) -> None:
        for fl in self.inflight.values():
            if fl.future is not None:
                fl.future.cancel()

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue this run exactly.

        An in-flight task whose job the executor still holds is saved as that job: its start
        values are a :class:`~prfl.checkpoint.Streamed` read from where the executor keeps them
        (one per model version and mask), and it is trained again after a resume. Otherwise
        (an executor without job sources, or a task already trained) its output is saved,
        trained first if need be."""
        inflight = {}
        for tid, fl in self.inflight.items():
            entry: dict[str, Any] = {
                "spec": fl.spec,
                "speeds": fl.speeds,
                "dispatched_at": fl.dispatched_at,
                "stage": fl.stage,
                "relay_bytes": fl.relay_bytes,
                "compute_seconds": fl.compute_seconds,
                "down_bytes": fl.down_bytes,
                "download_done_at": fl.download_done_at,
                "upload_started_at": fl.upload_started_at,
            }
            src = job_source(fl.future) if fl.output is None and fl.future is not None else None
            if src is not None:
                dense = not src.job.packed
                entry["job"] = {
                    "packed": src.job.packed,
                    "start": Streamed(read=src.values, key=("job-start", src.key),
                                      shape=(self.policy.weights.numel(),) if dense else None,
                                      dtype=self.policy.weights.dtype if dense else None),
                }
            else:
                entry["output"] = self._output(fl)
            inflight[tid] = entry
        return {
            "format": STATE_FORMAT,
            "now": self.now,
            "seq": self._seq,
            "heap": list(self._heap),
            "timers": dict(self._timers),
            "inflight": inflight,
            "busy": dict(self.busy),
            "online": list(self.online),
            "uplink": self.uplink.state_dict(),
            "downlink": self.downlink.state_dict(),
            "server_key": self._server_key,
            "policy": self.policy.state_dict(),
            "counters": {
                "bytes_down": list(self.bytes_down),
                "bytes_up": list(self.bytes_up),
                "server_egress": self.server_egress,
                "server_ingress": self.server_ingress,
                "arrivals": list(self.arrivals),
                "compute_total": self.compute_total,
                "time_parts": [list(r) for r in self.time_parts],
                "upload_parts": list(self.upload_parts),
            },
            "broadcast": self._broadcast.state_dict(),
            "evals": list(self.evals),
            "reached": dict(self.reached),
            "last_eval_version": self.last_eval_version,
            "next_eval_round": self.next_eval_round,
            "history_offset": self.history.offset(),
        }

    def save_checkpoint(self) -> Path:
        """Write ``checkpoint.pt`` atomically, keeping the previous one as ``checkpoint.prev.pt``.

        The file is a :mod:`prfl.checkpoint` file (safetensors arrays, the state as JSON, a
        checksum trailer), written to a temporary file, fsynced, renamed; then the directory is
        fsynced. In-flight tasks' start values and a file-backed buffer's values are streamed to
        it one at a time (see :meth:`state_dict`).
        """
        assert self.checkpoint_dir is not None
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        # Written before the state (and its history offset) is taken, so a resumed history keeps it.
        self.history.write("checkpoint", time=self.now, round=self.policy.version)
        final = write_checkpoint(self.state_dict(), self.checkpoint_dir)
        self._last_ckpt_version = self.policy.version
        release_free_heap()
        return final

    def _restore(self, state: dict[str, Any]) -> None:
        if state.get("format") != STATE_FORMAT:
            raise CheckpointError(f"a simulation checkpoint of layout {state.get('format')!r}, this prfl reads "
                                  f"layout {STATE_FORMAT}; start the run again with `prfl run`")
        self.now = state["now"]
        self._seq = state["seq"]
        self._heap = [tuple(e) for e in state["heap"]]  # type: ignore[misc]
        heapq.heapify(self._heap)
        self._timers = dict(state["timers"])
        self.busy = {int(k): int(v) for k, v in state["busy"].items()}
        self.online = list(state["online"])
        self.uplink.load_state_dict(state["uplink"])
        self.downlink.load_state_dict(state["downlink"])
        self._server_key = state["server_key"]
        self.policy.load_state_dict(state["policy"])
        c = state["counters"]
        self.bytes_down, self.bytes_up = list(c["bytes_down"]), list(c["bytes_up"])
        self.server_egress, self.server_ingress = c["server_egress"], c["server_ingress"]
        self.arrivals, self.compute_total = list(c["arrivals"]), c["compute_total"]
        if "time_parts" in c:
            self.time_parts = [list(r) for r in c["time_parts"]]
            self.upload_parts = list(c["upload_parts"])
        self._broadcast.load_state_dict(state.get("broadcast", {"step": None}))
        self.evals = list(state["evals"])
        self.reached = dict(state["reached"])
        self.last_eval_version = state["last_eval_version"]
        self.next_eval_round = state["next_eval_round"]
        self._last_ckpt_version = self.policy.version
        self._checkpoint_due = False
        self.inflight = {}
        # Saved jobs go back to the executor, grouped by their start values: each is read from
        # the checkpoint once, and the executor keeps one copy for the jobs that share it.
        groups: dict[int, list[tuple[int, dict[str, Any]]]] = {}
        for tid, d in state["inflight"].items():
            if "job" in d:
                groups.setdefault(id(d["job"]["start"]), []).append((int(tid), d))
            self.inflight[int(tid)] = InFlight(
                spec=d["spec"], speeds=d["speeds"], dispatched_at=d["dispatched_at"], stage=d["stage"],
                relay_bytes=d["relay_bytes"], output=d.get("output"), compute_seconds=d["compute_seconds"],
                down_bytes=d.get("down_bytes", d["spec"].download_bytes),
                download_done_at=d.get("download_done_at", math.nan),
                upload_started_at=d.get("upload_started_at", math.nan),
            )
        for members in groups.values():
            start = materialize(members[0][1]["job"]["start"])
            for tid, d in members:
                self.inflight[tid].future = self.executor.submit(self._job(d["spec"], start, bool(d["job"]["packed"])))
            del start
