"""Processes that end with the one that started them, however it ends.

Flower's processes start others: a SuperLink starts a SuperExec in a new session, which starts
``flwr-serverapp``; a SuperNode starts a SuperExec and a ``flwr-clientapp`` per message; Ray's
head starts workers. Ending a process group therefore misses some of them. Instead, every process
started through :class:`ManagedProcesses` carries an environment variable, ``PRFL_PROCESS_MARK``,
with a value unique to its manager, and every process they start inherits it. Ending them means
finding every live process with that mark (``/proc/<pid>/environ``, Linux) and signalling it:
SIGTERM, then SIGKILL after a grace period.

That happens at :meth:`ManagedProcesses.stop` (teardown, an error, Ctrl-C, SIGTERM, SIGHUP: the
caller's ``with`` block or signal handler gets there), and also when the manager's own process
dies without a chance to clean up (SIGKILL, a crash): a small *reaper* process, started in its own
session and holding the read end of a pipe from the manager, sees the pipe close and ends every
marked process. Each managed process also runs in its own process group (``start_new_session``),
so a terminal's Ctrl-C reaches only the manager, which then stops them in order.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any, Self

log = logging.getLogger(__name__)

MARK_VAR = "PRFL_PROCESS_MARK"
REAPER = "import sys; from prfl.flower.processes import reap_when_parent_exits; reap_when_parent_exits(sys.argv[1])"


def marked_pids(mark: str) -> list[int]:
    """Live processes (not this one) whose environment holds ``PRFL_PROCESS_MARK=<mark>``."""
    needle = f"{MARK_VAR}={mark}".encode()
    me = os.getpid()
    out = []
    try:
        entries = os.listdir("/proc")
    except OSError:  # pragma: no cover - not Linux
        return out
    for entry in entries:
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = f.read()
        except OSError:  # gone, or not ours
            continue
        if needle in env.split(b"\0"):
            out.append(int(entry))
    return out


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def end_marked(mark: str, grace: float = 5.0) -> int:
    """SIGTERM every process marked ``mark``, SIGKILL those still there after ``grace`` seconds
    (and any started meanwhile); return how many processes were signalled."""
    seen: set[int] = set()
    deadline = time.monotonic() + grace
    while True:
        left = marked_pids(mark)
        if not left:
            return len(seen)
        hard = time.monotonic() >= deadline
        for pid in left:
            if hard or pid not in seen:
                _signal(pid, signal.SIGKILL if hard else signal.SIGTERM)
            seen.add(pid)
        if hard and time.monotonic() > deadline + 10.0:
            log.warning("processes marked %s did not exit: %s", mark, left)
            return len(seen)
        time.sleep(0.1)


def reap_when_parent_exits(mark: str) -> None:
    """The reaper: wait until standard input closes (the manager stopped or died), then end every
    process marked ``mark``. Terminal signals are the manager's business, so they are ignored."""
    for sig in (signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: None)  # wake up, then sweep as on EOF
    try:
        sys.stdin.buffer.read()
    except (OSError, InterruptedError):
        pass
    end_marked(mark)


class ManagedProcesses:
    """Starts processes that are all ended by :meth:`stop`, or by the reaper if this process dies."""

    def __init__(self, mark: str | None = None) -> None:
        self.mark = mark or f"{os.getpid()}-{secrets.token_hex(6)}"
        self.reaper: subprocess.Popen[bytes] | None = None
        self.children: list[subprocess.Popen[Any]] = []

    @property
    def env(self) -> dict[str, str]:
        """The variables that mark a process as one of ours (add them to a child's environment)."""
        return {MARK_VAR: self.mark}

    def _start_reaper(self) -> None:
        if self.reaper is not None:
            return
        env = {k: v for k, v in os.environ.items() if k != MARK_VAR}  # the reaper itself is not marked
        src = str(Path(__file__).resolve().parents[2])  # prfl's own source root, wherever it is installed
        env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH", "")) if p)
        self.reaper = subprocess.Popen([sys.executable, "-c", REAPER, self.mark], stdin=subprocess.PIPE,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                                       start_new_session=True)

    def popen(self, cmd: Sequence[str], env: Mapping[str, str] | None = None, **kwargs: Any) -> subprocess.Popen[Any]:
        """``subprocess.Popen`` in a new process group, marked as ours (``env`` defaults to ours)."""
        self._start_reaper()
        full = dict(os.environ if env is None else env)
        full.update(self.env)
        proc = subprocess.Popen(list(cmd), env=full, start_new_session=True, **kwargs)
        self.children.append(proc)
        return proc

    def run(self, cmd: Sequence[str], timeout: float, env: Mapping[str, str] | None = None,
            **kwargs: Any) -> subprocess.CompletedProcess[Any]:
        """Run ``cmd`` to completion (``capture_output``/``text`` as for ``subprocess.run``); on a
        timeout or an interrupt, every process it started is ended before the error propagates."""
        capture = kwargs.pop("capture_output", False)
        if capture:
            kwargs.setdefault("stdout", subprocess.PIPE)
            kwargs.setdefault("stderr", subprocess.PIPE)
        proc = self.popen(cmd, env=env, **kwargs)
        try:
            out, err = proc.communicate(timeout=timeout)
        except BaseException:
            self.stop()
            raise
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def stop(self, grace: float = 5.0) -> None:
        """End every marked process, collect the children, then let the reaper go."""
        end_marked(self.mark, grace)
        for proc in self.children:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:  # pragma: no cover - ended above
                proc.kill()
        self.children.clear()
        if self.reaper is not None:
            stdin: IO[bytes] | None = self.reaper.stdin
            if stdin is not None:
                stdin.close()
            try:
                self.reaper.wait(15)
            except subprocess.TimeoutExpired:  # pragma: no cover
                self.reaper.kill()
            self.reaper = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
