"""Checkpoints of a simulation: its whole state, saved so that a resumed run replays exactly.

See :mod:`prfl.sim.engine` (Checkpoints and exact resume). :class:`SimulationCheckpoints` is a
part of :class:`prfl.sim.engine.Simulation` (a mixin: it works on the simulation's state).
"""

from __future__ import annotations

import heapq
import math
from pathlib import Path
from typing import Any

import torch

from prfl.allocator import release_free_heap
from prfl.runtime.checkpoint import CheckpointError, Near, Streamed, materialize
from prfl.sim.executors import job_source
from prfl.sim.tasks import TaskProgress

STATE_FORMAT = 2  # the layout of Simulation.state_dict


class SimulationCheckpoints:
    """``state_dict``, ``save_checkpoint`` and the restore behind ``Simulation.resume``."""

    checkpoint_dir: Path | None
    runner: Any

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue this run exactly.

        An in-flight task whose job the executor still holds is saved as that job: its start
        values are a :class:`~prfl.runtime.checkpoint.Streamed` read from where the executor keeps them
        (one per model version and mask), and it is trained again after a resume. Otherwise
        (an executor without job sources, or a task already trained) its output is saved,
        trained first if need be."""
        policy = self.policy.state_dict()
        model = policy.get("weights") if isinstance(policy, dict) else None
        if not (isinstance(model, torch.Tensor) and model.is_floating_point()
                and model.numel() == self.policy.weights.numel()):
            model = None
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
                # the model's layout: not packed at a mask, not a width-sliced sub-network
                dense = not src.job.packed and src.job.width == 1.0
                start: Streamed | Near = Streamed(read=src.values, key=("job-start", src.key),
                                                  shape=(self.policy.weights.numel(),) if dense else None,
                                                  dtype=self.policy.weights.dtype if dense else None)
                mask = fl.spec.mask
                if model is not None and src.job.width == 1.0 and (dense or mask is not None):
                    # An older version of the model (at the task's mask, then the suffix): stored as
                    # its difference from the model, which it is close to.
                    start = Near(start, model, None if dense else mask)
                entry["job"] = {"packed": src.job.packed, "start": start}
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
            "download_link": self.download_link.state_dict(),
            "upload_link": self.upload_link.state_dict(),
            "server_key": self._server_key,
            "policy": policy,
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
            "publication": self._publication.state_dict(),
            **self.runner.state_dict(),
            "history_offset": self.history.offset(),
        }

    def save_checkpoint(self) -> Path:
        """Write ``checkpoint.pt`` atomically, keeping the previous one as ``checkpoint.prev.pt``.

        The file is a :mod:`prfl.runtime.checkpoint` file (safetensors arrays, the state as JSON, a
        checksum trailer), written to a temporary file, fsynced, renamed; then the directory is
        fsynced. In-flight tasks' start values and a file-backed buffer's values are streamed to
        it one at a time (see :meth:`state_dict`).
        """
        assert self.checkpoint_dir is not None
        final = self.runner.write_checkpoint(self.state_dict)
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
        # "uplink" / "downlink" in the checkpoints of earlier versions (the server's links)
        self.download_link.load_state_dict(state["download_link"] if "download_link" in state else state["uplink"])
        self.upload_link.load_state_dict(state["upload_link"] if "upload_link" in state else state["downlink"])
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
        self._publication.load_state_dict(state.get("publication", {}))
        self.runner.load_state_dict(state)
        self.inflight = {}
        # Saved jobs go back to the executor, grouped by their start values: each is read from
        # the checkpoint once, and the executor keeps one copy for the jobs that share it.
        groups: dict[int, list[tuple[int, dict[str, Any]]]] = {}
        for tid, d in state["inflight"].items():
            if "job" in d:
                start = d["job"]["start"]
                groups.setdefault(id(start.value if isinstance(start, Near) else start), []).append((int(tid), d))
            self.inflight[int(tid)] = TaskProgress(
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
