"""The virtual-clock simulation driver: runs a server policy against a modelled fleet.

Local training really runs (on an executor), but time is modelled: a task takes its download
over the server's shared uplink, its local compute (FLOPs of the steps at the sub-model's
density, divided by the device's drawn speed) and its upload over the server's shared downlink.
All draws are seeded by address, so a run's history is fixed by its seed, whatever executor
trains and however loaded the host is (unless compute time is taken from measurements).

Checkpoints and exact resume. With a checkpoint directory the driver saves its whole state
(event queue, links, in-flight tasks with their trained outputs, the policy, counters and the
byte offset of the history file) every ``checkpoint_every_rounds`` server rounds, once the
event that made the round has been handled completely (the evaluations it requested
included), so a run resumed from any checkpoint replays exactly what the uninterrupted run did.
``checkpoint.pt`` is written atomically: to a temporary file with a trailer (magic, payload
length, SHA-256 of the payload), fsynced, then renamed over the previous checkpoint, which is
kept as ``checkpoint.prev.pt``. :func:`load_checkpoint` verifies the trailer (a torn or
corrupted file fails it) and falls back to the previous checkpoint; the caller cuts the history
back to the offset of the checkpoint it got.
"""

from __future__ import annotations

import hashlib
import heapq
import io
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
from prfl.sim.devices import Fleet, TaskSpeeds, draw_server_speeds, draw_task_speeds
from prfl.sim.executors import Executor, TrainJob
from prfl.sim.history import HistoryWriter
from prfl.sim.links import SharedLink

log = logging.getLogger(__name__)

_NO_WEIGHTS = torch.empty(0)  # what an in-flight task record holds in place of its start weights
CHECKPOINT = "checkpoint.pt"
PREVIOUS_CHECKPOINT = "checkpoint.prev.pt"
_TRAILER_MAGIC = b"PRFLCKP1"
_TRAILER_SIZE = len(_TRAILER_MAGIC) + 8 + 32  # magic, payload length (little endian), SHA-256


class CheckpointError(ValueError):
    """A checkpoint is missing, torn or not a simulation checkpoint; the message names the file."""


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

    def __post_init__(self) -> None:
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
    downloaded_at: float = math.nan  # when the download (and any relay) ended
    uploading_at: float = math.nan  # when the upload started
    future: Any = field(default=None, repr=False)


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
        self.evals: list[dict[str, Any]] = []
        self.reached: dict[float, float] = {}
        self._last_ckpt_version = 0
        self._checkpoint_due = False
        self._events_handled = 0

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
    def run(self, resume_state: dict[str, Any] | None = None) -> dict[str, Any]:
        """Run until the policy stops, time runs out, or nothing can happen any more."""
        wall0 = time.perf_counter()
        if resume_state is None:
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
        else:
            self._restore(resume_state)
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
        job = TrainJob(
            task_id=spec.task_id,
            client=c,
            weights=spec.weights,
            indices=self.client_indices[c],
            seed=int_seed(self.seed, "train", c, spec.task_id),
            mask=spec.mask,
            want_importance=spec.want_importance,
            width=spec.width,
        )
        egress = spec.download_bytes
        if spec.server_egress_bytes is not None and self.settings.piece_relay:
            egress = min(spec.server_egress_bytes, spec.download_bytes)
        future = self.executor.submit(job)
        del job
        # The job carries what training needs; the record of the task does not need the start
        # weights, and keeping them would keep one model version alive per task in flight.
        fl = InFlight(
            spec=dataclasses.replace(spec, weights=_NO_WEIGHTS), speeds=speeds, dispatched_at=self.now,
            relay_bytes=spec.download_bytes - egress, future=future,
        )
        self.inflight[spec.task_id] = fl
        self.busy[c] = spec.task_id
        self.server_egress += egress
        self.bytes_down[c] += spec.download_bytes
        self._set_server_capacity()
        cap = speeds.down_bps
        if not self.settings.shared_server_link:  # every transfer sees the whole server link
            cap = min(cap, self.fleet.server.up_bps)
        # Bytes the server publishes for this dispatch cross its shared uplink; pieces it already
        # published for this model version are served from the publication point at the
        # client's own speed (see prfl.distribution).
        self.uplink.start(spec.task_id, egress, cap, self.now)

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
        fl.downloaded_at = self.now
        if self.settings.compute_time == "measured":
            seconds = self._output(fl).compute_seconds
        else:
            n = len(self.client_indices[fl.spec.client])
            steps = self.train_cfg.num_steps(n)
            flops = steps * self.step_flops(fl.spec.mask, min(self.train_cfg.batch_size, n), fl.spec.width)
            seconds = flops / fl.speeds.compute_flops
        fl.compute_seconds = seconds
        self._push(self.now + seconds, "compute_done", tid)

    def _compute_done(self, tid: int) -> None:
        fl = self.inflight.get(tid)
        if fl is None:
            return
        fl.stage = "upload"
        fl.uploading_at = self.now
        # The result is fetched when the upload completes: a deferred (inline) job then trains
        # just before the server needs it, and nothing waits in memory during the upload.
        cap = fl.speeds.up_bps
        if not self.settings.shared_server_link:
            cap = min(cap, self.fleet.server.down_bps)
        self.downlink.start(tid, fl.spec.upload_bytes, cap, self.now)

    def _upload_done(self, tid: int) -> None:
        fl = self.inflight.pop(tid, None)
        if fl is None:
            return
        spec = fl.spec
        c = spec.client
        self.busy.pop(c, None)
        out = self._output(fl)
        self.bytes_up[c] += spec.upload_bytes
        self.server_ingress += spec.upload_bytes
        self.arrivals[c] += 1
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
            download=fl.downloaded_at - fl.dispatched_at,
            compute=fl.compute_seconds,
            upload=self.now - fl.uploading_at,
            bytes_down=spec.download_bytes,
            bytes_up=spec.upload_bytes,
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
        """Everything needed to continue this run exactly (in-flight training is resolved first)."""
        inflight = {}
        for tid, fl in self.inflight.items():
            out = self._output(fl)
            inflight[tid] = {
                "spec": fl.spec,
                "speeds": fl.speeds,
                "dispatched_at": fl.dispatched_at,
                "stage": fl.stage,
                "relay_bytes": fl.relay_bytes,
                "output": out,
                "compute_seconds": fl.compute_seconds,
                "downloaded_at": fl.downloaded_at,
                "uploading_at": fl.uploading_at,
            }
        return {
            "format": 1,
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
            },
            "evals": list(self.evals),
            "reached": dict(self.reached),
            "last_eval_version": self.last_eval_version,
            "next_eval_round": self.next_eval_round,
            "history_offset": self.history.offset(),
        }

    def save_checkpoint(self) -> Path:
        """Write ``checkpoint.pt`` atomically, keeping the previous one as ``checkpoint.prev.pt``.

        The file is the ``torch.save`` payload followed by a trailer (magic, payload length,
        SHA-256 of the payload), written to a temporary file, fsynced, renamed; then the
        directory is fsynced. ``torch.load`` reads it as it is (the trailer is ignored).
        """
        assert self.checkpoint_dir is not None
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        # Written before the state (and its history offset) is taken, so a resumed history keeps it.
        self.history.write("checkpoint", time=self.now, round=self.policy.version)
        final = write_checkpoint(self.state_dict(), self.checkpoint_dir)
        self._last_ckpt_version = self.policy.version
        return final

    def _restore(self, state: dict[str, Any]) -> None:
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
        self.evals = list(state["evals"])
        self.reached = dict(state["reached"])
        self.last_eval_version = state["last_eval_version"]
        self.next_eval_round = state["next_eval_round"]
        self._last_ckpt_version = self.policy.version
        self._checkpoint_due = False
        self.inflight = {}
        for tid, d in state["inflight"].items():
            self.inflight[int(tid)] = InFlight(
                spec=d["spec"], speeds=d["speeds"], dispatched_at=d["dispatched_at"], stage=d["stage"],
                relay_bytes=d["relay_bytes"],
                output=d["output"], compute_seconds=d["compute_seconds"],
                downloaded_at=d.get("downloaded_at", math.nan), uploading_at=d.get("uploading_at", math.nan),
            )


# ---------------------------------------------------------------------- checkpoint files
def _fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platform dependent
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - platform dependent
        pass
    finally:
        os.close(fd)


_CHUNK = 1 << 22  # bytes read at a time when hashing a checkpoint


def _sha256_of(fh: Any, size: int) -> bytes:
    """SHA-256 of the first ``size`` bytes of an open binary file, read in bounded chunks."""
    h = hashlib.sha256()
    chunk = bytearray(min(_CHUNK, max(size, 1)))
    view = memoryview(chunk)
    fh.seek(0)
    left = size
    while left > 0:
        got = fh.readinto(view[: min(left, len(chunk))])
        if not got:
            break
        h.update(view[:got])
        left -= got
    return h.digest()


class _Window(io.RawIOBase):
    """The first ``size`` bytes of an open binary file, as a seekable file of its own (so
    ``torch.load`` reads the payload in place, without a copy of the whole checkpoint)."""

    def __init__(self, fh: Any, size: int) -> None:
        super().__init__()
        self._fh, self._size, self._pos = fh, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, b: Any) -> int:
        n = max(0, min(len(b), self._size - self._pos))
        if n == 0:
            return 0
        self._fh.seek(self._pos)
        got = self._fh.readinto(memoryview(b)[:n]) or 0
        self._pos += got
        return got


def write_checkpoint(state: dict[str, Any], directory: str | os.PathLike[str]) -> Path:
    """Write ``state`` as ``directory/checkpoint.pt`` with a checksum trailer, atomically; the
    checkpoint it replaces becomes ``checkpoint.prev.pt``. The payload is streamed to the file
    and hashed from there, so writing holds no second copy of the state in memory."""
    d = Path(directory)
    final, prev = d / CHECKPOINT, d / PREVIOUS_CHECKPOINT
    tmp = d / (CHECKPOINT + ".tmp")
    with open(tmp, "w+b") as fh:
        torch.save(state, fh)
        fh.flush()
        size = fh.seek(0, io.SEEK_END)
        digest = _sha256_of(fh, size)
        fh.seek(size)
        fh.write(_TRAILER_MAGIC + size.to_bytes(8, "little") + digest)
        fh.flush()
        os.fsync(fh.fileno())
    if final.exists():
        os.replace(final, prev)  # a kill right here leaves prev (and the complete tmp): resume uses prev
    os.replace(tmp, final)
    _fsync_dir(d)
    return final


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load and verify one checkpoint file; raise :class:`CheckpointError` if it is torn,
    corrupted or not a simulation checkpoint. (Checkpoints are pickles: load only your own.)
    The file is hashed in chunks and loaded in place: no copy of it is held in memory."""
    p = Path(path)
    try:
        with open(p, "rb") as fh:
            total = fh.seek(0, io.SEEK_END)
            size = total
            if total >= _TRAILER_SIZE:
                fh.seek(total - _TRAILER_SIZE)
                trailer = fh.read(_TRAILER_SIZE)
                if trailer.startswith(_TRAILER_MAGIC):
                    size = int.from_bytes(trailer[len(_TRAILER_MAGIC) : len(_TRAILER_MAGIC) + 8], "little")
                    if size != total - _TRAILER_SIZE:
                        raise CheckpointError(
                            f"{p}: torn checkpoint (payload of {total - _TRAILER_SIZE} bytes, trailer says {size})"
                        )
                    if _sha256_of(fh, size) != trailer[-32:]:
                        raise CheckpointError(f"{p}: checksum mismatch; the checkpoint is corrupted")
            try:
                state = torch.load(_Window(fh, size), weights_only=False)
            except Exception as exc:  # a file from before checksums, torn: torch.load is the check
                raise CheckpointError(f"{p}: torn or corrupted checkpoint ({type(exc).__name__}: {exc})") from None
    except OSError as exc:
        raise CheckpointError(f"{p}: cannot be read ({exc})") from None
    if not isinstance(state, dict) or not {"policy", "history_offset", "now"} <= set(state):
        raise CheckpointError(f"{p}: not a simulation checkpoint")
    return state


def load_checkpoint(
    directory: str | os.PathLike[str], history_size: int | None = None
) -> tuple[dict[str, Any], Path]:
    """The newest usable checkpoint of a run directory: ``checkpoint.pt``, else (torn, missing, or
    ahead of a history of ``history_size`` bytes) ``checkpoint.prev.pt``. Returns (state, path)."""
    d = Path(directory)
    problems: list[str] = []
    for path in (d / CHECKPOINT, d / PREVIOUS_CHECKPOINT):
        if not path.is_file():
            continue
        try:
            state = read_checkpoint(path)
        except CheckpointError as exc:
            problems.append(str(exc))
            log.warning("%s; trying the previous checkpoint", exc)
            continue
        offset = int(state["history_offset"])
        if history_size is not None and offset > history_size:
            problems.append(f"{path}: expects {offset} bytes of history.jsonl, which holds {history_size}")
            log.warning("%s", problems[-1])
            continue
        if problems:
            log.warning("resuming from %s", path)
        return state, path
    detail = "; ".join(problems) if problems else f"no {CHECKPOINT} or {PREVIOUS_CHECKPOINT}"
    raise CheckpointError(f"{d} has no usable checkpoint ({detail}); start the run again with `prfl run`")
