"""The virtual-clock simulation driver: runs a server policy against a modelled fleet.

Local training really runs (on an executor), but time is modelled: a task takes its download
over the server's upload link (shared by every download), its local compute (FLOPs of the steps
at the sub-model's density, divided by the device's drawn speed) and its upload over the
server's download link (shared by every upload).
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
at hand (already trained) is saved with its output. The file format is :mod:`prfl.runtime.checkpoint`
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
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from prfl.allocator import release_free_heap, tune_allocator
from prfl.client.trainer import TrainConfig
from prfl.policies.base import (
    ClientIdle,
    Event,
    NotifyClient,
    Policy,
    Start,
    TaskFailed,
    TaskSpec,
    TimerFired,
)
from prfl.settings import SimSettings
from prfl.sim.accounting import ReferenceBroadcast, ReferenceSizes, VersionPublication
from prfl.sim.devices import Fleet, draw_server_speeds
from prfl.sim.executors import Executor
from prfl.runtime.history import TIME_PARTS, UPLOAD_PARTS, HistoryWriter
from prfl.runtime.rundir import RunDirectory
from prfl.runtime.runner import Cadence, PolicyRunner, RunnerBacked, Traffic
from prfl.sim.links import SharedLink
from prfl.sim.snapshot import STATE_FORMAT, SimulationCheckpoints  # noqa: F401  (STATE_FORMAT: as before)
from prfl.sim.tasks import TaskProgress, TaskStages

log = logging.getLogger(__name__)



Evaluator = Callable[[torch.Tensor], tuple[float, float]]  # weights -> (loss, accuracy)


class Simulation(TaskStages, SimulationCheckpoints, RunnerBacked):
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
        self.inflight: dict[int, TaskProgress] = {}
        self.busy: dict[int, int] = {}  # client -> task id
        self.online = [True] * n
        self.download_link = SharedLink(None)  # the server's upload capacity, shared by the clients' downloads
        self.upload_link = SharedLink(None)  # the server's download capacity, shared by the clients' uploads
        self._server_key = -1
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
        self._publication = VersionPublication()  # honest accounting with model_relay
        # reference accounting, compute_time "flops": every client computes at the fastest device's speed
        self._equal_flops = max(p.compute_flops for p in fleet.clients)
        self._resumed = False
        cadence = Cadence(settings.eval_every_rounds, settings.checkpoint_every_rounds, settings.target_accuracies)
        run_dir = RunDirectory(self.checkpoint_dir) if self.checkpoint_dir is not None else None
        self.runner = PolicyRunner(policy, evaluator, self, self.history, cadence, run_dir, on_eval=on_progress)

    # ------------------------------------------------------------------ transport (for the runner)
    def clock(self) -> float:
        return self.now

    def dispatch(self, spec: TaskSpec) -> None:
        self._dispatch(spec)

    def set_timer(self, key: str, at: float, event: Event) -> None:
        if at < self.now:
            raise RuntimeError(f"policy set timer {key!r} in the past ({at} < {self.now})")
        self._seq += 1
        self._timers[key] = self._seq
        heapq.heappush(self._heap, (at, self._seq, "timer", (key, self._seq)))

    def notify_client(self, notice: NotifyClient) -> None:
        """Modelled clients: no one to tell (the rejection is in the history)."""

    def before_event(self, event: Event) -> None:
        pass

    def after_update(self) -> None:
        self._set_server_capacity()

    def traffic(self) -> Traffic:
        return Traffic(self.server_egress, self.server_ingress, self.arrivals)

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
        self.download_link.set_capacity(up, self.now)  # the server's upload carries client downloads
        self.upload_link.set_capacity(down, self.now)

    # ------------------------------------------------------------------ running
    def resume(self, state: dict[str, Any]) -> None:
        """Restore a checkpoint's state (from :func:`~prfl.runtime.checkpoint.load_checkpoint`); the next
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
            self.runner.evaluate(self.now)
            self._deliver(Start(now=0.0))  # dispatches to offline clients fail at once
        try:
            while self.stopped is None:
                if not self._step():
                    self.stopped = self.stopped or "idle: no task in flight and nothing scheduled"
                    break
                release_free_heap()  # freed blocks between live ones are not trimmed by glibc
        finally:
            self._drain_futures()
        self.runner.evaluate_if_stale(self.now)
        wall = time.perf_counter() - wall0
        self.history.write("end", time=self.now, round=self.policy.version, reason=self.stopped)
        return self.summary(wall)

    def _step(self) -> bool:
        """Process the next thing that happens. False when nothing is left."""
        while self._heap and self._heap[0][2] == "timer" and self._timers.get(self._heap[0][3][0]) != self._heap[0][3][1]:
            heapq.heappop(self._heap)  # a replaced timer: drop it without moving the clock
        t_heap = self._heap[0][0] if self._heap else math.inf
        nxt = [(c[0], name) for name, link in (("down", self.download_link), ("up", self.upload_link)) if (c := link.next_completion())]
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
            for tid in self.download_link.advance(self.now):
                self._download_done(tid)
            for tid in self.upload_link.advance(self.now):
                self._upload_done(tid)
            return True
        _, _, kind, payload = heapq.heappop(self._heap)
        # keep the links' clocks in step before anything starts a transfer
        for tid in self.download_link.advance(self.now):
            self._download_done(tid)
        for tid in self.upload_link.advance(self.now):
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
            self.runner.evaluate(self.now)
            if self.settings.eval_every_seconds:
                self._push(self.now + self.settings.eval_every_seconds, "eval_time")
        elif kind == "failed":
            client, tid, reason = payload
            self._deliver(TaskFailed(now=self.now, client=client, task_id=tid, reason=reason))
        return True

    # ------------------------------------------------------------------ task stages: see TaskStages


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
        """Hand ``event`` to the policy through the shared runner (see :mod:`prfl.runtime.runner`)."""
        self.runner.deliver(event)

    # ------------------------------------------------------------------ results
    def summary(self, wall_seconds: float) -> dict[str, Any]:
        out = {
            "policy": self.policy.name,
            "stopped": self.stopped,
            "virtual_seconds": self.now,
            "server_rounds": self.policy.version,
            **self.runner.accuracy_summary(),
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
        out.update(self.runner.rejected_summary())
        if self.privacy is not None:
            from prfl.privacy import privacy_report

            # every upload released one privatised update, whether it was aggregated or not
            out["privacy"] = privacy_report(self.privacy, self.arrivals, self.policy.version)
        return out

    def _drain_futures(self) -> None:
        for fl in self.inflight.values():
            if fl.future is not None:
                fl.future.cancel()

    # ------------------------------------------------------------------ checkpoints: see SimulationCheckpoints

