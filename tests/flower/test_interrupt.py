"""A test run interrupted or killed in the middle of a Flower deployment leaves no process behind.

The suite's runner (a pytest process running ``deployment_victim.py``) starts a SuperLink and two
SuperNodes and submits the app; once results arrive, this test sends the runner SIGINT (Ctrl-C),
SIGTERM (a time limit) or SIGKILL, and then finds no process left whose environment mentions the
runner's temporary directory: no SuperLink, SuperNode, SuperExec, ServerApp or ClientApp.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("flwr", reason="Flower is not installed: pip install 'prfl[flower]' to run the deployment tests")

from flower_support import ctrl_c_default

from prfl.flower.processes import ManagedProcesses

ROOT = Path(__file__).resolve().parents[2]
VICTIM = Path(__file__).with_name("deployment_victim.py")


def processes_mentioning(text: str) -> dict[int, str]:
    """pid -> command line of every live process whose environment or command line holds ``text``."""
    needle = text.encode()
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = f.read()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if needle in env or needle in cmd:
            found[int(entry)] = cmd.replace(b"\0", b" ").decode(errors="replace").strip()
    return found


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux's /proc to list processes")
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=["SIGINT", "SIGTERM", "SIGKILL"])
def test_killing_the_test_runner_mid_deployment_leaves_no_process(sig: signal.Signals, tmp_path: Path) -> None:
    base = tmp_path / "runner"
    log = tmp_path / "runner.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH")) if p)}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--basetemp={base}", str(VICTIM)]
    with ManagedProcesses() as procs, open(log, "wb") as out:
        runner = procs.popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, preexec_fn=ctrl_c_default)
        deadline = time.monotonic() + 480
        while not list(base.glob("*/READY")):
            assert runner.poll() is None, f"the runner ended before the deployment trained:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no result within 480 s:\n{log.read_text()[-3000:]}"
            time.sleep(1)
        running = processes_mentioning(str(base))
        names = " ".join(running.values())
        assert "flower-superlink" in names and "flower-supernode" in names, running  # the check sees them
        assert "flwr-serverapp" in names, running  # Flower's detached app process too

        os.kill(runner.pid, sig)
        runner.wait(300)  # an orderly stop on a loaded machine: SIGTERM, a grace period, SIGKILL
        deadline = time.monotonic() + 60
        while (left := processes_mentioning(str(base))) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not left, f"left running after {sig.name}: {left}\nrunner log:\n{log.read_text()[-2000:]}"
