"""Helpers of the Flower tests: a small experiment, reading a run's history while it grows."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prfl.flower.settings import DRIVER_DEFAULTS

EXAMPLE_APP = Path(__file__).resolve().parents[2] / "examples" / "flower"


def ctrl_c_default() -> None:
    """``preexec_fn`` of a child that a test interrupts with SIGINT: Ctrl-C's default disposition,
    so the child's Python installs its KeyboardInterrupt handler even when the suite itself runs
    with SIGINT ignored (as a background job of a non-interactive shell does)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)

# A small, fast experiment: digits, an MLP with one hidden layer of 32, PR-FL on 3 clients.
SMALL_RUN: dict[str, Any] = {
    "prfl.seed": 0,
    "prfl.data.dataset": "digits",
    "prfl.data.num_clients": 3,
    "prfl.data.partition": "iid",
    "prfl.model.name": "mlp",
    "prfl.model.options.hidden": "[32]",
    "prfl.train.lr": 0.25,
    "prfl.train.local_steps": 10,
    "prfl.policy.name": "prfl",
    "policy-options.prfl.interval": 2,
    "policy-options.prfl.window": 0.3,
    "policy-options.prfl.min_density": 0.2,
}
assert set(DRIVER_DEFAULTS) >= {"reply-timeout", "out-dir", "stop-file"}


def read_history(path: Path) -> list[dict[str, Any]]:
    """The complete lines of a history.jsonl that may still be written."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line being written
    return out


def wait_for(
    path: Path, cond: Callable[[list[dict[str, Any]]], bool], timeout: float, what: str,
    alive: Callable[[], None] | None = None,
) -> list[dict[str, Any]]:
    """Poll the history until ``cond(records)`` holds; fail with ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        recs = read_history(path)
        if cond(recs):
            return recs
        if any(r["event"] == "end" for r in recs):
            raise AssertionError(f"the run ended before: {what}; last records: {recs[-5:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for: {what}; last records: {recs[-5:]}")
        if alive is not None:
            alive()
        time.sleep(0.5)


def events(recs: list[dict[str, Any]], kind: str, **match: Any) -> list[dict[str, Any]]:
    """Records of one event kind whose fields equal ``match``."""
    return [r for r in recs if r["event"] == kind and all(r.get(k) == v for k, v in match.items())]
