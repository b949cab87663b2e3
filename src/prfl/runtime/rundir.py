"""The run directory: the one place that names a run's files, writes them atomically and checks
that a run can be resumed.

A run directory holds

==================== =====================================================================
``config.yaml``      the resolved experiment config
``partition.json``   which training samples each client holds
``history.jsonl``    the run's events, one JSON object a line (:mod:`prfl.runtime.history`)
``summary.json``     the run's figures, written once the run ends (atomically)
``accuracy.png``     accuracy against time (and ``.svg``)
``round_time.png``   where a local round's time goes (simulator runs)
``checkpoint.pt``    the newest checkpoint (:mod:`prfl.runtime.checkpoint`), and the one
                     before it as ``checkpoint.prev.pt``
==================== =====================================================================

Both drivers (the simulator through :mod:`prfl.run`, the Flower ServerApp) and the tools that
read run directories (``prfl compare``, :mod:`prfl.report`) go through :class:`RunDirectory`.
Every file that replaces an earlier one (``summary.json``, the checkpoints) is written to a
temporary file, fsynced and renamed, so a run killed at any moment leaves the old file or the
new one, never half of one.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from prfl.runtime.checkpoint import CHECKPOINT, PREVIOUS_CHECKPOINT, load_checkpoint, write_checkpoint
from prfl.runtime.history import HistoryWriter, read_history

CONFIG = "config.yaml"
PARTITION = "partition.json"
HISTORY = "history.jsonl"
SUMMARY = "summary.json"
ACCURACY_PLOT = "accuracy.png"
ROUND_TIME_PLOT = "round_time.png"
RUN_FILES: tuple[str, ...] = (HISTORY, SUMMARY, CHECKPOINT, PREVIOUS_CHECKPOINT)
"""The files that say a directory holds (part of) a run: a new run must not silently mix with them."""
_TEMPORARY: tuple[str, ...] = (CHECKPOINT + ".tmp", SUMMARY + ".tmp")


class ResumeError(ValueError):
    """A run directory cannot be resumed; the message names what is missing and what to do."""


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically: a temporary file beside it, fsynced, then renamed."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


@dataclass(frozen=True)
class RunDirectory:
    """A run's directory (see the module docstring for its files)."""

    path: Path

    def __init__(self, path: str | os.PathLike[str]) -> None:
        object.__setattr__(self, "path", Path(path))

    # ------------------------------------------------------------------ creation
    @classmethod
    def new_timestamped(cls, root: str | os.PathLike[str], name: str, now: datetime | None = None) -> RunDirectory:
        """Create ``root/<name>-<YYYYmmdd-HHMMSS>`` (``-2``, ``-3``... when taken)."""
        stamp = (now or datetime.now()).strftime("%Y%m%d-%H%M%S")
        base = Path(root)
        base.mkdir(parents=True, exist_ok=True)
        for k in itertools.count(1):
            folder = base / (f"{name}-{stamp}" if k == 1 else f"{name}-{stamp}-{k}")
            try:
                folder.mkdir()
            except FileExistsError:
                continue
            return cls(folder)
        raise AssertionError("unreachable")

    def create(self) -> RunDirectory:
        """Make the directory (and its parents) if it does not exist."""
        self.path.mkdir(parents=True, exist_ok=True)
        return self

    # ------------------------------------------------------------------ file names
    @property
    def config(self) -> Path:
        return self.path / CONFIG

    @property
    def partition(self) -> Path:
        return self.path / PARTITION

    @property
    def history(self) -> Path:
        return self.path / HISTORY

    @property
    def summary(self) -> Path:
        return self.path / SUMMARY

    @property
    def accuracy_plot(self) -> Path:
        return self.path / ACCURACY_PLOT

    @property
    def round_time_plot(self) -> Path:
        return self.path / ROUND_TIME_PLOT

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT

    @property
    def previous_checkpoint(self) -> Path:
        return self.path / PREVIOUS_CHECKPOINT

    # ------------------------------------------------------------------ what it holds
    def is_run(self) -> bool:
        """A run directory: ``config.yaml`` and ``history.jsonl`` exist."""
        return self.config.is_file() and self.history.is_file()

    def holds_run(self) -> bool:
        """Does the directory hold (part of) an earlier run (a history, summary or checkpoint)?"""
        return any((self.path / name).exists() for name in RUN_FILES)

    def is_finished(self) -> bool:
        """The run reached its end: ``summary.json`` was written."""
        return self.summary.is_file()

    def has_checkpoint(self) -> bool:
        return self.checkpoint.is_file() or self.previous_checkpoint.is_file()

    def clear_run(self) -> None:
        """Remove an earlier run's history, summary and checkpoints (and their temporary files)."""
        for name in RUN_FILES + _TEMPORARY:
            (self.path / name).unlink(missing_ok=True)

    def history_size(self) -> int:
        """Bytes of ``history.jsonl`` (0 when there is none)."""
        return self.history.stat().st_size if self.history.exists() else 0

    # ------------------------------------------------------------------ writing
    def open_history(self, truncate_at: int | None = None) -> HistoryWriter:
        """A writer appending to ``history.jsonl``, cut back to ``truncate_at`` bytes first (resume)."""
        return HistoryWriter(self.history, truncate_at=truncate_at)

    def write_summary(self, summary: dict[str, Any]) -> Path:
        """Write ``summary.json`` atomically (non-finite floats as JSON numbers via ``float``)."""
        atomic_write_text(self.summary, json.dumps(summary, indent=2, default=float))
        return self.summary

    def write_checkpoint(self, state: Any) -> Path:
        """Write ``checkpoint.pt`` atomically, the previous one kept as ``checkpoint.prev.pt``."""
        self.create()
        return write_checkpoint(state, self.path)

    # ------------------------------------------------------------------ reading and resuming
    def read_summary(self) -> dict[str, Any]:
        return json.loads(self.summary.read_text(encoding="utf-8"))

    def records(self) -> Iterator[dict[str, Any]]:
        """The events of ``history.jsonl``, in order."""
        return read_history(self.history)

    def check_resumable(self, *, need_config: bool = True, need_history: bool = True) -> None:
        """Raise :class:`ResumeError` (naming the missing file and what to do) unless the
        directory has what resuming needs: a checkpoint and, as asked, the config and history."""
        if need_config and not self.config.is_file():
            raise ResumeError(f"{self.path} is not a run directory (no {CONFIG})")
        if not self.has_checkpoint():
            raise ResumeError(f"{self.path} has no {CHECKPOINT} to resume from; start the run again with `prfl run`")
        if need_history and not self.history.is_file():
            raise ResumeError(f"{self.path} has a checkpoint but no {HISTORY} to continue; start the run again with `prfl run`")

    def load_checkpoint(self) -> tuple[dict[str, Any], Path]:
        """The newest usable checkpoint (``checkpoint.pt``, else ``checkpoint.prev.pt``) that is
        not ahead of the history; raises :class:`~prfl.runtime.checkpoint.CheckpointError`."""
        return load_checkpoint(self.path, self.history_size())
