"""The stages of a simulated task: download, compute, upload, and their accounting.

A dispatched task downloads over the server's upload link (max-min fair with the other
downloads; pieces already published for its model version come from the publication point at
the client's own speed, the *relay*; with ``model_relay`` any policy's sub-model already sent
for the version does too), computes (modelled FLOPs at the device's drawn speed, or
measured), and uploads over the server's download link. Its arrival record splits its duration
into ``download + link_wait + compute + upload`` (:meth:`TaskStages._timing`).

:class:`TaskStages` is a part of :class:`prfl.sim.engine.Simulation` (a mixin: it works on the
simulation's state).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from prfl.client.result import TaskResult
from prfl.client.trainer import TrainConfig, TrainOutput
from prfl.policies.base import Policy, ResultArrived, TaskFailed, TaskSpec
from prfl.runtime.history import TIME_PARTS, UPLOAD_PARTS, HistoryWriter
from prfl.seeding import int_seed
from prfl.settings import SimSettings
from prfl.sim.accounting import ReferenceBroadcast, ReferenceSizes, VersionPublication, values_only_bytes
from prfl.sim.devices import Fleet, TaskSpeeds, draw_task_speeds
from prfl.sim.executors import Executor, TrainJob
from prfl.sim.links import SharedLink

_NO_WEIGHTS = torch.empty(0)  # what an in-flight task record holds in place of its start weights


@dataclass
class TaskProgress:
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


class TaskStages:
    """Dispatch, the three stages of a task and its arrival (see the module docstring)."""

    policy: Policy
    fleet: Fleet
    executor: Executor
    client_indices: list[np.ndarray]
    train_cfg: TrainConfig
    step_flops: Callable[[torch.Tensor | None, int, float], float]
    settings: SimSettings
    seed: int
    history: HistoryWriter
    now: float
    inflight: dict[int, TaskProgress]
    busy: dict[int, int]
    online: list[bool]
    download_link: SharedLink
    upload_link: SharedLink
    bytes_down: list[int]
    bytes_up: list[int]
    server_egress: int
    server_ingress: int
    arrivals: list[int]
    compute_total: float
    time_parts: list[list[float]]
    upload_parts: list[int]
    reference: bool
    _ref_sizes: ReferenceSizes
    _broadcast: ReferenceBroadcast
    _publication: VersionPublication
    _equal_flops: float

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
        speeds = draw_task_speeds(self.fleet, c, spec.task_id, self.seed, at=self.now)
        job = self._job(spec, spec.weights)
        if self.reference:
            down = self._ref_sizes.download_bytes(spec)
            egress = self._broadcast.egress(spec)
        else:
            down = spec.download_bytes
            egress = down
            if self.settings.piece_relay and self.settings.model_relay:
                egress = self._publication.egress(spec)
            elif self.settings.piece_relay and spec.server_egress_bytes is not None:
                egress = min(spec.server_egress_bytes, down)
        future = self.executor.submit(job)
        del job
        # The job carries what training needs; the record of the task does not need the start
        # weights, and keeping them would keep one model version alive per task in flight.
        fl = TaskProgress(
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
        self.download_link.start(spec.task_id, egress, cap, self.now)

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

    def _output(self, fl: TaskProgress) -> TrainOutput:
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
        self.upload_link.start(tid, self._upload_bytes(fl.spec), cap, self.now)

    def _upload_bytes(self, spec: TaskSpec) -> int:
        """Bytes a task's upload is charged: all of it (honest), its values only (reference)."""
        return values_only_bytes(spec) if self.reference else spec.upload_bytes

    def _timing(self, fl: TaskProgress) -> dict[str, float]:
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
            self.download_link.cancel(tid, self.now)
        elif fl.stage == "upload":
            self.upload_link.cancel(tid, self.now)
        # a compute_done event may still be queued; it finds no task and does nothing
        if fl.future is not None:
            fl.future.cancel()
        self.history.write("task_failed", time=self.now, round=self.policy.version, client=client, task=tid, reason=reason)
        self._deliver(TaskFailed(now=self.now, client=client, task_id=tid, reason=reason))
