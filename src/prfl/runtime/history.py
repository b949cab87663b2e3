"""Run history as JSON Lines: one event per line, tables and plots are computed from it.

An ``arrival`` record (one per finished task) carries, besides client, task, version, staleness,
density and loss:

- ``duration``: seconds from dispatch to the end of the upload, split as
  ``download + link_wait + compute + upload`` (:data:`TIME_PARTS`): ``download`` and ``upload`` are
  the charged bytes at the client's own link speeds for the task, ``compute`` the local training
  seconds, and ``link_wait`` the time the transfers spent queued or slowed by the server's link
  beyond that (see :meth:`prfl.sim.tasks.TaskStages._timing`);
- ``link_wait_down``: the download's part of ``link_wait``, so the transfers' observed seconds
  are ``download + link_wait_down`` and ``upload + link_wait - link_wait_down`` (what a
  deployment's timestamps measure; :func:`observed_transfers`);
- ``bytes_down`` and ``bytes_up``: the bytes the accounting charged its download and upload;
- ``bytes_up_values``, ``bytes_up_index``, ``bytes_up_importance`` (:data:`UPLOAD_PARTS`): what
  the upload held (weight values, positions, importance scores). Under honest accounting they sum
  to ``bytes_up``; the reference accounting charges the values only.

:func:`time_breakdown` and :func:`upload_split` aggregate them per client and per run.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Iterator

TIME_PARTS: tuple[str, ...] = ("download", "link_wait", "compute", "upload")
"""The parts of a task's duration an arrival record carries, in seconds."""
UPLOAD_PARTS: tuple[str, ...] = ("values", "index", "importance")
"""The parts of a task's upload an arrival record carries, as ``bytes_up_<part>``."""


def _clean(value: Any) -> Any:
    """JSON-safe values: floats that are not finite become None, tuples become lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return _clean(value.item())
    return value


class HistoryWriter:
    """Appends events to ``history.jsonl``; ``offset()`` marks a point a resume truncates back to."""

    def __init__(self, path: str | os.PathLike[str] | None, truncate_at: int | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.records: list[dict[str, Any]] = []  # kept in memory for tests and summaries
        self._fh = None
        if self.path is not None:
            if truncate_at is not None and self.path.exists():
                with open(self.path, "r+b") as fh:
                    fh.truncate(truncate_at)
            self._fh = open(self.path, "a", encoding="utf-8")

    def write(self, event: str, **data: Any) -> None:
        rec = {"event": event, **_clean(data)}
        self.records.append(rec)
        if self._fh is not None:
            self._fh.write(json.dumps(rec, separators=(",", ":")) + "\n")

    def flush(self) -> None:
        """Hand buffered events to the operating system (no fsync)."""
        if self._fh is not None:
            self._fh.flush()

    def offset(self) -> int:
        """Flush and return the file size: everything before it is durable."""
        if self._fh is None:
            return 0
        self._fh.flush()
        os.fsync(self._fh.fileno())
        return self._fh.tell()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.flush()
            self._fh.close()
            self._fh = None


def read_history(path: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """Events of a ``history.jsonl`` file, in order; a torn last line (crash) is ignored."""
    with open(path, encoding="utf-8") as fh:
        lines = fh.readlines()
    for i, line in enumerate(lines):
        line = line.strip()
        if not line:
            continue
        try:
            yield json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                return
            raise ValueError(f"{path}: line {i + 1} is not valid JSON; the history file is corrupt")


def time_breakdown(records: Iterable[Mapping[str, Any]], num_clients: int | None = None) -> dict[str, list[float | None]]:
    """Per client, the mean seconds per arrival of each part of :data:`TIME_PARTS`.

    ``{part: [mean over client c's arrivals, ...]}`` for clients 0..num_clients-1 (default: one
    past the largest client that arrived); None for a client with no arrival. Arrival records
    without the parts (histories of older versions) are skipped.
    """
    sums: dict[int, list[float]] = {}
    counts: dict[int, int] = {}
    for r in records:
        if r.get("event") != "arrival" or any(r.get(p) is None for p in TIME_PARTS):
            continue
        c = int(r["client"])
        row = sums.setdefault(c, [0.0] * len(TIME_PARTS))
        for k, p in enumerate(TIME_PARTS):
            row[k] += float(r[p])
        counts[c] = counts.get(c, 0) + 1
    n = num_clients if num_clients is not None else (max(sums) + 1 if sums else 0)
    return {p: [sums[c][k] / counts[c] if c in sums else None for c in range(n)] for k, p in enumerate(TIME_PARTS)}


def upload_split(records: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """Bytes of all uploads of a history by part (:data:`UPLOAD_PARTS`); 0 where not recorded."""
    out = dict.fromkeys(UPLOAD_PARTS, 0)
    for r in records:
        if r.get("event") == "arrival":
            for p in UPLOAD_PARTS:
                out[p] += int(r.get(f"bytes_up_{p}") or 0)
    return out


def observed_transfers(record: Mapping[str, Any]) -> tuple[float, float]:
    """(download, upload) seconds an ``arrival`` record's task spent transferring, queueing on
    the server's link included: ``download + link_wait_down`` and ``upload + link_wait -
    link_wait_down``. Raises ``KeyError`` naming the field for a history written without the
    split (before ``link_wait_down`` was recorded)."""
    for key in ("download", "link_wait", "link_wait_down", "upload"):
        if record.get(key) is None:
            raise KeyError(f"arrival record of task {record.get('task')} has no {key!r}: the history "
                           "predates the per-transfer split; run the simulation again")
    wait_down = float(record["link_wait_down"])
    return float(record["download"]) + wait_down, float(record["upload"]) + float(record["link_wait"]) - wait_down
