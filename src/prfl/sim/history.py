"""Run history as JSON Lines: one event per line, tables and plots are computed from it."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Iterator


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
