"""Shaped loopback links: tc commands, the relay, node-log stamps, shaping accuracy and clean-up.

The tests that change the loopback interface need root and tc with htb; they are skipped, with
the reason, where that is not available. The others run anywhere.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("flwr", reason="Flower is not installed: pip install 'prfl[flower]' to run the Flower tests")

from flower_support import ctrl_c_default

from prfl.flower import shaping
from prfl.flower.shaping import (
    PAYLOAD_EFFICIENCY,
    LinkSpeeds,
    LoopbackShaper,
    Relay,
    ShapingError,
    class_minors,
    node_address,
    read_node_transfers,
    tc_setup_commands,
    tc_teardown_commands,
)
from prfl.sim.devices import DeviceProfile, Fleet, ServerProfile
from prfl.sim.links import SharedLink

UNAVAILABLE = shaping.shaping_unavailable()
needs_tc = pytest.mark.skipif(UNAVAILABLE is not None, reason=f"cannot shape the loopback interface: {UNAVAILABLE}")
HERE = Path(__file__).resolve().parent


# --------------------------------------------------------------------------- tc commands
def test_tc_commands_give_each_node_a_class_per_direction_under_the_server_classes() -> None:
    speeds = LinkSpeeds(down_bps=(40e3, 10e3), up_bps=(20e3, 5e3), server_up_bps=30e3, server_down_bps=math.inf)
    cmds = tc_setup_commands(3, speeds, port=4242)
    m = class_minors(3, 2)
    assert m["send"] == 0x3001 and m["down"] == [0x3100, 0x3101] and m["up"] == [0x3200, 0x3201]
    classes = {c[c.index("classid") + 1]: c for c in cmds if c[:2] == ["class", "add"]}

    def opt(cmd: list[str], key: str) -> str:
        return cmd[cmd.index(key) + 1]

    def bits(kbps: float) -> str:  # a payload speed in kB/s as the tc rate of its packets
        return f"{round(kbps * 1000 / PAYLOAD_EFFICIENCY * 8)}bit"

    # downloads share the server's sending side: 30 kB/s of payload; each node at most its speed
    assert opt(classes["5f1:3001"], "rate") == opt(classes["5f1:3001"], "ceil") == bits(30)
    assert opt(classes["5f1:3001"], "rate") == "250939bit"  # 30 kB/s / 0.956 in packets, headers included
    assert opt(classes["5f1:3100"], "parent") == "5f1:3001"
    assert opt(classes["5f1:3100"], "ceil") == bits(30)  # 40 kB/s capped by the server's 30
    assert opt(classes["5f1:3100"], "rate") == bits(20)  # assured: its max-min share, 30 - 10
    assert opt(classes["5f1:3101"], "rate") == opt(classes["5f1:3101"], "ceil") == bits(10)
    # an unlimited receiving side gets the sum of the upload speeds, which never binds
    assert opt(classes["5f1:3002"], "rate") == bits(25)
    assert opt(classes["5f1:3201"], "ceil") == bits(5)
    quanta = {opt(c, "quantum") for c in classes.values()}
    assert len(quanta) == 1  # equal turns: equal shares of what the parent lends
    filters = [c for c in cmds if c[:2] == ["filter", "add"]]
    assert len(filters) == 4 and all(opt(f, "prio") == "103" for f in filters)
    down0 = next(f for f in filters if opt(f, "flowid") == "5f1:3100")
    assert " ".join(down0).count(f"src {node_address(3, 0)}/32") == 1 and "sport 4242 0xffff" in " ".join(down0)
    up1 = next(f for f in filters if opt(f, "flowid") == "5f1:3201")
    assert f"dst {node_address(3, 1)}/32" in " ".join(up1) and "dport 4242 0xffff" in " ".join(up1)
    teardown = tc_teardown_commands(3, 2)
    assert teardown[0][:2] == ["filter", "del"] and opt(teardown[0], "prio") == "103"
    assert {opt(c, "classid") for c in teardown[1:]} == set(classes)


def test_only_loopback_addresses_are_used() -> None:
    assert node_address(0, 0) == "127.77.0.1" and node_address(15, 253) == "127.77.15.254"
    with pytest.raises(ValueError):
        node_address(16, 0)


def test_a_fleet_whose_speeds_vary_per_task_is_refused() -> None:
    server = ServerProfile(down_bps=1e5, up_bps=1e5, sigma=0.0)
    steady = Fleet((DeviceProfile(1e9, 2e4, 1e4, sigma=0.0),) * 2, server, "steady")
    assert LinkSpeeds.from_fleet(steady).down_bps == (2e4, 2e4)
    varying = Fleet((DeviceProfile(1e9, 2e4, 1e4, sigma=0.0), DeviceProfile(1e9, 2e4, 1e4, sigma=0.3)), server, "v")
    with pytest.raises(ShapingError, match=r"clients \[1\].*sigma: 0"):
        LinkSpeeds.from_fleet(varying)
    with pytest.raises(ShapingError, match="server"):
        LinkSpeeds.from_fleet(Fleet(steady.clients, ServerProfile(1e5, 1e5, sigma=0.1), "s"))
    with pytest.raises(ShapingError, match="up_bps"):
        LinkSpeeds(down_bps=(1e4,), up_bps=(math.inf,))


# --------------------------------------------------------------------------- node logs
def test_node_log_stamps_are_read_per_message(tmp_path: Path) -> None:
    log = tmp_path / "supernode-0.log"
    log.write_text(
        "\x1b[92mINFO 2026-01-02 10:00:00,000\x1b[0m:      Starting Flower SuperNode\n"
        "\x1b[92mINFO 2026-01-02 10:00:01,000\x1b[0m:      Receiving: query.describe message (ID: aa01)\n"
        "\x1b[92mINFO 2026-01-02 10:00:01,250\x1b[0m:      Received successfully\n"
        "\x1b[94mDEBUG 2026-01-02 10:00:02,000\x1b[0m:     Runtime.AcquireTask\n"
        "\x1b[92mINFO 2026-01-02 10:00:05,000\x1b[0m:      Sending: query.describe message (ID: bb01)\n"
        "\x1b[92mINFO 2026-01-02 10:00:05,100\x1b[0m:      Sent successfully\n"
        "\x1b[92mINFO 2026-01-02 10:00:08,000\x1b[0m:      Receiving: train message (ID: cc02)\n"
        "\x1b[92mINFO 2026-01-02 10:00:18,500\x1b[0m:      Received successfully\n"
        "\x1b[92mINFO 2026-01-02 10:00:40,000\x1b[0m:      Sending: train message (ID: dd02)\n"
        "\x1b[92mINFO 2026-01-02 10:00:55,750\x1b[0m:      Sent successfully\n"
        "\x1b[92mINFO 2026-01-02 10:01:00,000\x1b[0m:      Receiving: train message (ID: ee03)\n",
        encoding="utf-8",
    )
    got = read_node_transfers(log)
    assert set(got) == {"aa01", "cc02", "ee03"}
    train = got["cc02"]
    assert train.message_type == "train" and train.reply_id == "dd02"
    assert train.received - train.receiving == pytest.approx(10.5)
    assert train.sending - train.received == pytest.approx(21.5)
    assert train.sent - train.sending == pytest.approx(15.75)
    assert got["ee03"].received is None and got["ee03"].sent is None  # the run ended meanwhile


# --------------------------------------------------------------------------- relay (no root needed)
class ByteServer:
    """``GET n``: sends n bytes; ``PUT n`` then n bytes: answers ``ok``."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    @staticmethod
    def _handle(conn: socket.socket) -> None:
        with conn:
            f = conn.makefile("rb")
            line = f.readline().split()
            if len(line) != 2:
                return
            verb, n = line
            if verb == b"GET":
                conn.sendall(b"x" * int(n))
            else:
                left = int(n)
                while left > 0:
                    data = f.read1(65536)
                    if not data:
                        return
                    left -= len(data)
                conn.sendall(b"ok\n")

    def close(self) -> None:
        self.sock.close()


def transfer(address: str, port: int, verb: str, n: int, started: list[float] | None = None) -> float:
    """Seconds to GET or PUT ``n`` bytes through a relay address (``started`` gets the start time)."""
    with socket.create_connection((address, port)) as s:
        t0 = time.monotonic()
        if started is not None:
            started.append(t0)
        if verb == "GET":
            s.sendall(b"GET %d\n" % n)
            got = 0
            while got < n:
                data = s.recv(65536)
                assert data, "connection closed early"
                got += len(data)
        else:
            s.sendall(b"PUT %d\n" % n)
            s.sendall(b"y" * n)
            assert s.recv(10) == b"ok\n"
        return time.monotonic() - t0


def test_relay_forwards_both_ways_counts_bytes_and_clamps_segments() -> None:
    server = ByteServer()
    addresses = [node_address(15, 200), node_address(15, 201)]
    try:
        with Relay(addresses, ("127.0.0.1", server.port)) as relay:
            transfer(addresses[0], relay.port, "GET", 300_000)
            transfer(addresses[1], relay.port, "PUT", 100_000)
            with socket.create_connection((addresses[1], relay.port)) as s:
                # the relay advertised Ethernet's MSS: with timestamps 1448 payload bytes a segment
                assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG) <= shaping.SEGMENT_PAYLOAD
                s.sendall(b"GET 10\n")
                assert s.recv(100) == b"x" * 10
            deadline = time.monotonic() + 5
            while (relay.counts()["up"][1] < 100_000 + 18 or relay.counts()["down"][1] < 13) \
                    and time.monotonic() < deadline:  # counted by the relay's thread just after sending
                time.sleep(0.05)
            counts = relay.counts()
        assert counts["down"][0] == 300_000 and counts["up"][0] == len(b"GET 300000\n")
        assert counts["up"][1] == 100_000 + len(b"PUT 100000\n") + len(b"GET 10\n")
        assert counts["down"][1] == len(b"ok\n") + 10
        assert counts["connections"] == [1, 2]
        with pytest.raises(OSError):  # stopped: nothing listens any more
            socket.create_connection((addresses[0], relay.port), timeout=2)
    finally:
        server.close()


# --------------------------------------------------------------------------- shaping (root)
def _root() -> dict[str, object]:
    return shaping.root_qdisc()


def _our_classes(slot: int) -> list[str]:
    """The htb classes on lo that belong to shaping slot ``slot``."""
    out = subprocess.run(["tc", "class", "show", "dev", "lo"], capture_output=True, text=True, check=True).stdout
    found = []
    for line in out.splitlines():
        major, _, minor_hex = line.split()[2].partition(":")
        minor = int(minor_hex or "0", 16)
        if major == "5f1" and minor >> 12 == slot and (minor & 0xFFF in (1, 2) or 0x100 <= minor & 0xFFF < 0x300):
            found.append(line)
    return found


@needs_tc
def test_apply_and_remove_leave_the_loopback_interface_as_it_was() -> None:
    before = _root()
    speeds = LinkSpeeds(down_bps=(3e4, 2e4), up_bps=(2e4, 1e4), server_up_bps=4e4, server_down_bps=3e4)
    with LoopbackShaper(speeds) as shaper:
        slot = shaper.reserve()
        shaper.apply(5555)
        assert len(_our_classes(slot)) == 6
        shaper.apply(5556)  # again (a new relay port): the same classes, not twice
        assert len(_our_classes(slot)) == 6
        assert _root()["kind"] == "htb"
    assert _our_classes(slot) == []
    after = _root()
    if before.get("kind") != "htb":  # no other shaped run was live: the root is gone too
        assert after["kind"] == before["kind"] and after["handle"] == before["handle"]


@needs_tc
def test_shaped_transfers_take_the_fluid_models_time_and_share_the_server_max_min_fairly() -> None:
    """Alone, a transfer takes payload / speed (the classes' packet rates carry the speeds in
    payload); three at once share the server's capacity as prfl.sim.links.SharedLink does (equal
    shares, capped at each node's speed)."""
    server = ByteServer()
    k = 1000.0
    speeds = LinkSpeeds(down_bps=(60 * k, 40 * k, 20 * k), up_bps=(30 * k, 30 * k, 30 * k),
                        server_up_bps=90 * k, server_down_bps=60 * k)
    try:
        with LoopbackShaper(speeds) as shaper:
            slot = shaper.reserve()
            addresses = [node_address(slot, i) for i in range(3)]
            with Relay(addresses, ("127.0.0.1", server.port)) as relay:
                shaper.apply(relay.port)
                n = 120_000
                alone = transfer(addresses[0], relay.port, "GET", n)
                assert alone == pytest.approx(n / (60 * k), rel=0.1)
                up = transfer(addresses[1], relay.port, "PUT", 90_000)
                assert up == pytest.approx(90_000 / (30 * k), rel=0.1)
                sizes, delays = (180_000, 120_000, 60_000), (0.0, 0.5, 1.0)
                took: dict[int, float] = {}
                began: dict[int, list[float]] = {i: [] for i in range(3)}

                def get(i: int) -> None:
                    time.sleep(delays[i])
                    took[i] = transfer(addresses[i], relay.port, "GET", sizes[i], began[i])

                threads = [threading.Thread(target=get, args=(i,)) for i in range(3)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
        t0 = began[0][0]
        starts = tuple(began[i][0] - t0 for i in range(3))  # as they really began (threads start late)
        ends = fluid_finish(speeds.down_bps, 90 * k, list(map(float, sizes)), starts)
        for i in range(3):
            assert took[i] == pytest.approx(ends[i] - starts[i], rel=0.1), (i, starts, took, ends)
    finally:
        server.close()


def fluid_finish(caps: tuple[float, ...], capacity: float, sizes: list[float], starts: tuple[float, ...]) -> dict[int, float]:
    """When each transfer ends on a SharedLink (the simulator's model of the server link)."""
    link = SharedLink(capacity)
    waiting = sorted(range(len(sizes)), key=lambda i: starts[i])
    ends: dict[int, float] = {}
    while len(ends) < len(sizes):
        nxt = link.next_completion()
        t_done = nxt[0] if nxt is not None else math.inf
        if waiting and starts[waiting[0]] <= t_done:
            i = waiting.pop(0)
            link.start(i, sizes[i], caps[i], starts[i])
        else:
            for fid in link.advance(t_done):
                ends[int(fid)] = t_done
    return ends


# --------------------------------------------------------------------------- clean-up (root)
def _start_child(tmp_path: Path, mode: str) -> tuple[subprocess.Popen[str], dict[str, object]]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parents[1] / "src"), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, str(HERE / "shaping_child.py"), str(tmp_path / "fed"), mode],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=ctrl_c_default)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.wait(60)
        pytest.fail(f"the shaped federation did not start: {proc.stderr.read() if proc.stderr else ''}")
    return proc, json.loads(line)


def _alive(pid: int) -> bool:
    return shaping.process_start_time(pid) is not None and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def _assert_clean(info: dict[str, object]) -> None:
    slot = int(info["slot"])  # type: ignore[arg-type]
    assert _our_classes(slot) == [], "classes of the run are left on lo"
    filters = subprocess.run(["tc", "filter", "show", "dev", "lo"], capture_output=True, text=True).stdout
    assert f"pref {shaping.FILTER_PRIO_BASE + slot} " not in filters, "filters of the run are left on lo"
    assert not (shaping._registry_dir() / f"slot-{slot}.json").exists()
    left = [p for p in info["pids"] if _alive(int(p))]  # type: ignore[union-attr]
    assert not left, f"processes left running: {left}"
    with pytest.raises(OSError):
        socket.create_connection((node_address(slot, 0), int(info["port"])), timeout=2)  # type: ignore[arg-type]


@needs_tc
@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_removes_every_class_filter_relay_and_process(tmp_path: Path, sig: signal.Signals) -> None:
    proc, info = _start_child(tmp_path, "wait")
    try:
        assert _our_classes(int(info["slot"]))  # type: ignore[arg-type]
        assert all(_alive(int(p)) for p in info["pids"])  # type: ignore[union-attr]
        proc.send_signal(sig)
        assert proc.wait(120) != 0
    finally:
        if proc.poll() is None:  # it did not stop: SIGTERM, so that a failure leaves nothing on lo
            proc.terminate()
            proc.wait(60)
    _assert_clean(info)


@needs_tc
@pytest.mark.slow
def test_a_failure_inside_the_run_removes_everything(tmp_path: Path) -> None:
    proc, info = _start_child(tmp_path, "raise")
    assert proc.wait(120) != 0
    assert proc.stderr is not None and "failure inside the shaped run" in proc.stderr.read()
    _assert_clean(info)


@needs_tc
@pytest.mark.slow
def test_after_a_sigkill_the_next_setup_reclaims_the_runs_classes_and_processes(tmp_path: Path) -> None:
    proc, info = _start_child(tmp_path, "wait")
    proc.kill()  # nothing can clean up after SIGKILL ...
    proc.wait(30)
    slot = int(info["slot"])  # type: ignore[arg-type]
    assert _our_classes(slot), "the killed run's classes should still be there"
    # ... so the next setup does: the stale slot's classes and recorded processes go first
    with LoopbackShaper(LinkSpeeds(down_bps=(1e4,), up_bps=(1e4,))) as shaper:
        shaper.reserve()
        assert _our_classes(slot) == []
        deadline = time.monotonic() + 10
        while any(_alive(int(p)) for p in info["pids"]) and time.monotonic() < deadline:  # type: ignore[union-attr]
            time.sleep(0.1)
        assert not any(_alive(int(p)) for p in info["pids"])  # type: ignore[union-attr]
    _assert_clean({**info, "pids": []})
