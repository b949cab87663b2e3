"""A local Deployment Engine on 127.0.0.1: one SuperLink and N SuperNodes as subprocesses.

For trying the deployment path on one machine and for the tests. Every process gets its own
``FLWR_HOME`` under ``workdir`` and its own log file there; each SuperNode gets
``--node-config "partition-id=i num-partitions=N [delay-seconds=d]"``. The SuperLink serves its
Fleet, Control and Runtime HTTP APIs on one port (Flower 1.41), on a loopback address only.

Processes are started in their own process groups through :class:`~prfl.flower.processes.ManagedProcesses`:
:meth:`LocalFederation.stop` ends them and every process they started (Flower detaches its
SuperExec and app processes into other sessions), and a reaper process does the same if the
process that started the federation is killed.

From a shell::

    python -m prfl.flower.local --nodes 3 --delays 0,0,2 --workdir /tmp/prfl-fed
    # prints the `flwr run` command to use (with an output folder and a budget), and runs until
    # Ctrl-C, SIGTERM or SIGHUP, then stops every process it started
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Self

from prfl.flower.processes import ManagedProcesses

log = logging.getLogger(__name__)

QUIET_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float) -> None:
    """Block until ``host:port`` accepts connections; raise TimeoutError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:g} s")


def toml_value(value: Any) -> str:
    """A run-config value as TOML (for ``flwr run --run-config``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def run_config_arg(run_config: Mapping[str, Any]) -> str:
    """``{"a.b": 1, "c": "x"}`` -> ``a.b=1 c="x"``."""
    return " ".join(f"{k}={toml_value(v)}" for k, v in run_config.items())


@dataclass
class _Proc:
    name: str
    cmd: list[str]
    log_path: Path
    popen: subprocess.Popen[bytes] | None = None
    log_file: IO[bytes] | None = None

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None


class LocalFederation:
    """A SuperLink and ``num_nodes`` SuperNodes on loopback (see the module docstring)."""

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        num_nodes: int,
        *,
        delays: Sequence[float] = (),
        host: str = "127.0.0.1",
        port: int | None = None,
        extra_env: Mapping[str, str] | None = None,
        superexec_poll: float | None = 0.2,
        node_superlinks: Sequence[str] = (),
    ) -> None:
        """``node_superlinks[i]``: the address SuperNode ``i`` dials instead of the SuperLink's own
        (a relay in front of it, see :mod:`prfl.flower.shaping`); missing entries dial the SuperLink."""
        if num_nodes < 1:
            raise ValueError(f"num_nodes must be at least 1, got {num_nodes}")
        if not ipaddress.ip_address(host).is_loopback:
            raise ValueError(f"host must be a loopback address (127.0.0.0/8 or ::1), got {host!r}")
        self.procs = ManagedProcesses()
        self.workdir = Path(workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.num_nodes = num_nodes
        self.delays = [float(d) for d in delays] + [0.0] * max(0, num_nodes - len(delays))
        self.host = host
        self.port = port or free_port(host)
        self.bin_dir = Path(sys.executable).parent
        env = dict(os.environ)
        env.update(QUIET_ENV)
        env["PATH"] = f"{self.bin_dir}{os.pathsep}{env.get('PATH', '')}"  # SuperNodes start flower-superexec by name
        if superexec_poll is not None:  # how often a SuperExec looks for work (Flower's default: 1 s)
            env["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] = str(superexec_poll)
        env.update(extra_env or {})
        self.env = env
        self.superlink = _Proc(
            "superlink",
            [str(self.bin_dir / "flower-superlink"), "--insecure", "--host", host, "--port", str(self.port),
             "--disable-runtime-dependency-installation"],
            self.workdir / "superlink.log",
        )
        self.node_superlinks = list(node_superlinks)
        if len(self.node_superlinks) > num_nodes:
            raise ValueError(f"{len(self.node_superlinks)} node_superlinks for {num_nodes} nodes")
        self.node_ports = [free_port(host) for _ in range(num_nodes)]
        self.nodes = [self._node_proc(i) for i in range(num_nodes)]

    @property
    def address(self) -> str:
        """The SuperLink's address for SuperNodes and the ``flwr`` CLI."""
        return f"{self.host}:{self.port}"

    def _node_proc(self, i: int) -> _Proc:
        node_config = f"partition-id={i} num-partitions={self.num_nodes}"
        if self.delays[i] > 0:
            node_config += f" delay-seconds={self.delays[i]:g}"
        return _Proc(
            f"supernode-{i}",
            [str(self.bin_dir / "flower-supernode"), "--insecure", "--superlink",
             self.node_superlinks[i] if i < len(self.node_superlinks) else self.address,
             "--host", self.host, "--port", str(self.node_ports[i]), "--node-config", node_config],
            self.workdir / f"supernode-{i}.log",
        )

    # ------------------------------------------------------------------ processes
    def _start(self, proc: _Proc, home: str) -> None:
        env = dict(self.env, FLWR_HOME=str(self.workdir / home))
        proc.log_file = open(proc.log_path, "ab")  # noqa: SIM115 - closed by _stop / kill_node
        proc.popen = self.procs.popen(proc.cmd, cwd=self.workdir, env=env, stdout=proc.log_file,
                                      stderr=subprocess.STDOUT)
        log.info("started %s (pid %d): %s", proc.name, proc.popen.pid, " ".join(proc.cmd))

    def _signal(self, proc: _Proc, sig: int) -> None:
        if proc.popen is None:
            return
        try:
            os.killpg(proc.popen.pid, sig)  # the process group we created for it
        except ProcessLookupError:
            pass

    def _stop(self, proc: _Proc, timeout: float = 10.0) -> None:
        if proc.popen is None:
            return
        if timeout > 0:
            self._signal(proc, signal.SIGTERM)
            try:
                proc.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self._signal(proc, signal.SIGKILL)  # also the SuperExec and app processes in its group
        try:
            proc.popen.wait(5)
        except subprocess.TimeoutExpired:
            log.warning("%s (pid %d) did not exit", proc.name, proc.popen.pid)
        if proc.log_file is not None:
            proc.log_file.close()
            proc.log_file = None
        proc.popen = None

    def start(self, timeout: float = 60.0) -> LocalFederation:
        """Start the SuperLink, wait for its port, then start every SuperNode."""
        self._start(self.superlink, "superlink")
        try:
            wait_for_port(self.host, self.port, timeout)
        except TimeoutError:
            self.stop()
            raise RuntimeError(f"the SuperLink did not come up; see {self.superlink.log_path}") from None
        for i in range(self.num_nodes):
            self.start_node(i)
        return self

    def start_node(self, i: int) -> None:
        """(Re)start SuperNode ``i`` (a restarted node registers with a new node id)."""
        if self.nodes[i].running:
            raise RuntimeError(f"supernode {i} is already running")
        self._start(self.nodes[i], f"supernode-{i}")

    def kill_node(self, i: int) -> None:
        """Kill SuperNode ``i`` and its app processes at once (SIGKILL), as a crash would."""
        proc = self.nodes[i]
        self._signal(proc, signal.SIGKILL)
        if proc.popen is not None:
            proc.popen.wait(10)
            proc.popen = None
        if proc.log_file is not None:
            proc.log_file.close()
            proc.log_file = None
        log.info("killed supernode %d", i)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop every process, then any process they started.

        SIGTERM goes to every process group at once (SuperNodes first, then the SuperLink); the
        groups still there after ``timeout`` seconds get SIGKILL. A SuperNode's graceful shutdown
        can take seconds, so the processes are not stopped one after another.
        """
        try:
            procs = [p for p in [*self.nodes, self.superlink] if p.popen is not None]
            for proc in procs:
                self._signal(proc, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            for proc in procs:
                assert proc.popen is not None
                try:
                    proc.popen.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
            for proc in procs:
                self._stop(proc, timeout=0.0)  # SIGKILL for what is left (the apps they started too)
        finally:
            self.procs.stop()

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ the flwr CLI
    def cli_home(self, connection: str = "local-deployment") -> Path:
        """A ``FLWR_HOME`` for the ``flwr`` CLI whose config names this SuperLink ``connection``."""
        home = self.workdir / "cli"
        home.mkdir(parents=True, exist_ok=True)
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "{connection}"\n\n[superlink.{connection}]\naddress = "{self.address}"\n'
            "insecure = true\n",
            encoding="utf-8",
        )
        return home

    def flwr_run(self, app_dir: str | os.PathLike[str], run_config: Mapping[str, Any] | None = None,
                 connection: str = "local-deployment", timeout: float = 120.0) -> str:
        """Submit the app with ``flwr run`` (not streaming); return the run id."""
        home = self.cli_home(connection)
        cmd = [str(self.bin_dir / "flwr"), "run", str(Path(app_dir).resolve()), connection, "--format", "json"]
        if run_config:
            cmd += ["--run-config", run_config_arg(run_config)]
        env = dict(self.env, FLWR_HOME=str(home))
        done = self.procs.run(cmd, timeout=timeout, cwd=self.workdir, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"flwr run failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
        start = done.stdout.find("{")
        payload = json.loads(done.stdout[start:]) if start >= 0 else {}
        run_id = payload.get("run-id")
        if not run_id:
            raise RuntimeError(f"flwr run printed no run id:\n{done.stdout}\n{done.stderr}")
        return str(run_id)


def example_app() -> str:
    """The example Flower App's directory: absolute in a source checkout, else as documented."""
    here = Path(__file__).resolve().parents[3] / "examples" / "flower"
    return str(here) if (here / "pyproject.toml").is_file() else "examples/flower"


def run_command(fed: LocalFederation, num_clients: int, out_dir: Path, max_time: float) -> str:
    """The ``flwr run`` line for ``fed``: its connection, an output folder and a time budget."""
    cfg = run_config_arg({"prfl.data.num_clients": num_clients, "out-dir": str(out_dir),
                          "prfl.sim.max_time": float(max_time), "prfl.sim.max_rounds": "none"})
    flwr = shlex.quote(str(fed.bin_dir / "flwr"))
    return (f"FLWR_HOME={shlex.quote(str(fed.cli_home()))} {flwr} run {shlex.quote(example_app())} local-deployment "
            f"--stream --run-config {shlex.quote(cfg)}")


class Interrupted(Exception):
    """SIGTERM or SIGHUP arrived: stop as on Ctrl-C."""


def _interrupt(signum: int, frame: object) -> None:
    raise Interrupted(signal.Signals(signum).name)


def main(argv: Sequence[str] | None = None) -> int:
    """Start a local federation and keep it up until Ctrl-C, SIGTERM or SIGHUP."""
    parser = argparse.ArgumentParser(prog="python -m prfl.flower.local", description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=3, help="number of SuperNodes (partition ids 0..N-1)")
    parser.add_argument("--delays", default="", help="comma-separated delay-seconds per node, e.g. 0,0,2")
    parser.add_argument("--workdir", default="prfl-federation", help="FLWR_HOME and logs of every process")
    parser.add_argument("--port", type=int, default=None, help="SuperLink port (default: a free one)")
    parser.add_argument("--host", default="127.0.0.1", help="loopback address to serve on (127.0.0.0/8)")
    parser.add_argument("--max-time", type=float, default=120.0, help="budget in the printed command (seconds)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    delays = [float(d) for d in args.delays.split(",") if d.strip()]
    fed = LocalFederation(args.workdir, args.nodes, delays=delays, port=args.port, host=args.host)
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        with fed:
            runs = fed.workdir / "runs"
            log.info("SuperLink on %s with %d SuperNodes; logs in %s", fed.address, args.nodes, fed.workdir)
            log.info("run the app with (a new out-dir for every run, or add overwrite=true):\n  %s",
                     run_command(fed, args.nodes, runs / "run-1", args.max_time))
            while True:
                time.sleep(1)
    except (KeyboardInterrupt, Interrupted) as exc:
        log.info("stopping (%s): every process of the federation is ended", exc or "Ctrl-C")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
