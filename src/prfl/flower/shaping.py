"""Shaped loopback links for a local Flower deployment: ``tc`` htb classes per node and direction.

A :class:`ShapedFederation` is a :class:`~prfl.flower.local.LocalFederation` (a SuperLink and N
SuperNodes on 127.0.0.1) whose nodes reach the SuperLink over links with a fleet's speeds: node
``i`` downloads at ``down_bps[i]`` and uploads at ``up_bps[i]`` (bytes/s), and all downloads
share the server's sending capacity ``server_up_bps`` and all uploads its receiving capacity
``server_down_bps`` (the directions of :mod:`prfl.sim.devices`). Linux only, as root.

Addressing: a SuperNode dials the SuperLink from an ephemeral port of 127.0.0.1, so the kernel
cannot tell one node's packets from another's. Node ``i`` therefore dials its own loopback
address ``127.77.S.(i+1)`` (``S``: the run's slot, see below), where a :class:`Relay` (a TCP
forwarder in a thread of this process) passes the bytes on to the SuperLink on 127.0.0.1. ``tc``
classifies by the relay's end: packets from ``127.77.S.(i+1)`` and the relay's port are node
``i``'s download, packets to that address and port its upload; the relay's own leg to the
SuperLink is not shaped. Only 127.0.0.0/8 is used. A per-node shaping proxy (a userspace token
bucket) would need no root, but on a loaded machine its timers slip; the kernel's htb keeps the
rates and shares the server's capacity among the nodes by itself.

The relay keeps the packets of the shaped legs small (see :class:`Relay`): Ethernet-size
segments (:data:`MSS`) and at most four of them per packet, in both directions; and the classes
have no burst. htb lets a packet pass whole once its class has credit and charges it
afterwards, and loopback's 64 KiB MTU (with segmentation offload sized for a near-zero
round-trip time) would otherwise put up to 64 KiB in one packet: at 20 kB/s three seconds of
link time in one lump, by which a transfer ends early, and a node's small requests would queue
behind it. Measured with plain sockets at 10-100 kB/s, a transfer then ends within about 6 kB
of its fluid-model time (its first and last packets: about 1 % of 400 kB), and three
concurrent transfers end within 4 % of :class:`~prfl.sim.links.SharedLink`'s times.

Classes (one ``htb`` root ``5f1:`` on ``lo``; unclassified packets, i.e. every other program's
loopback traffic, bypass it through htb's direct queue, unshaped)::

    5f1:            htb root
    5f1:S001        server send: rate = ceil = server_up_bps (client downloads share it)
      5f1:S1ii      node i download: rate r_i, ceil min(d_i, C)
    5f1:S002        server receive: rate = ceil = server_down_bps (client uploads share it)
      5f1:S2ii      node i upload: rate r_i, ceil min(u_i, C)

with ``r = water_fill(speeds, C)`` (:func:`prfl.fairshare.water_fill`): the max-min fair rates
when every node is busy, which htb assures each class. When some are idle, htb lends what they
leave to the busy classes that want more, in turns of equal quanta, up to each class's ceil:
concurrent transfers get the max-min fair rates of the simulator's shared link (equal shares of
the server's capacity, none above its node's own speed, what a capped node leaves shared
again). An unlimited server (``inf``) gets the sum of its nodes' speeds, which never binds. Each
node class keeps htb's default FIFO leaf (kernels without sch_sfq are common in containers);
the relay's small windows keep each connection at a few packets in it, so a node's heartbeats
and HTTP requests wait behind its bulk transfer for about a second at 10 kB/s, less when faster.

Speeds are payload speeds: a fleet's ``down_bps`` is the TCP payload a node receives per
second, which is what the simulator charges a task's payload bytes at (and what a speed test
of a device reports). ``tc`` counts packets on the link, headers included: a 1448-byte segment
travels in a 1514-byte packet (14 bytes of loopback's Ethernet header, 20 of IP, 32 of TCP), so
every class's rate is the speed divided by :data:`PAYLOAD_EFFICIENCY` (0.956, as on Ethernet)
and full segments then carry payload at the fleet's speed (:func:`wire_rate`). What is left is
the protocol's own bytes (HTTP headers and protobuf framing of each request, Flower's polls and
heartbeats, TCP acknowledgements in the opposite class), which the simulator does not model.

Runs on one machine share the root: each takes a slot ``S`` (0..15) under a lock, with its
own classes, filters (u32 at priority ``100 + S``) and addresses; the last run to leave removes
the root. Setup is idempotent: slots whose owner process is gone (killed with SIGKILL, say)
are reclaimed first, with their classes, filters and the processes they recorded; a root qdisc
on ``lo`` that is not this module's makes setup fail with the command to remove it. Leaving
the ``with`` block (normally, on an exception, on SIGINT, or on SIGTERM inside
:func:`terminate_on_sigterm`) stops every process, the relay, and removes every class, filter
and qdisc of the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import logging
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Any, Self

from prfl.flower.local import LocalFederation, free_port
from prfl.fairshare import water_fill

log = logging.getLogger(__name__)

ROOT_MAJOR = 0x5F1
"""Major number of the root htb qdisc on ``lo``."""
FILTER_PRIO_BASE = 100
"""u32 filters of slot ``S`` sit at priority ``FILTER_PRIO_BASE + S``."""
MAX_SLOTS = 16
MAX_NODES = 254
ADDRESS_PREFIX = "127.77"
"""Node ``i`` of slot ``S`` dials ``127.77.S.(i+1)``."""
MSS = 1460
"""``TCP_MAXSEG`` of the shaped legs: Ethernet's MSS; with TCP timestamps a segment carries 1448
payload bytes in a 1514-byte packet."""
SEGMENT_PAYLOAD = MSS - 12
PACKET_BYTES = SEGMENT_PAYLOAD + 14 + 20 + 32
"""Bytes ``tc`` counts for a full segment on ``lo``: payload, Ethernet, IPv4, TCP with timestamps."""
PAYLOAD_EFFICIENCY = SEGMENT_PAYLOAD / PACKET_BYTES
"""Share of a shaped link's rate that carries TCP payload (0.956)."""
QUANTUM = 2 * PACKET_BYTES
"""Bytes a borrowing class may send per turn (equal for every class: equal shares)."""
CHUNK_SEGMENTS = 4
"""Segments the relay hands the kernel at a time towards a node (bounds its download packets)."""
WINDOW_SEGMENTS = 4
"""Receive buffer of the relay towards a node, in segments (bounds its window and upload packets)."""
TCP_NOTSENT_LOWAT = getattr(socket, "TCP_NOTSENT_LOWAT", 25)
DEVICE = "lo"


class ShapingError(RuntimeError):
    """Traffic shaping cannot be set up or removed; the message says why and what to do."""


# --------------------------------------------------------------------------- link speeds
@dataclass(frozen=True)
class LinkSpeeds:
    """Per-node and server link speeds in bytes/s (``server_*``: ``math.inf`` for unlimited).

    ``down_bps[i]`` / ``up_bps[i]``: node ``i``'s download and upload speeds; ``server_up_bps``
    is shared by the downloads, ``server_down_bps`` by the uploads.
    """

    down_bps: tuple[float, ...]
    up_bps: tuple[float, ...]
    server_up_bps: float = math.inf
    server_down_bps: float = math.inf

    def __post_init__(self) -> None:
        n = len(self.down_bps)
        if n < 1 or n > MAX_NODES or len(self.up_bps) != n:
            raise ShapingError(f"need 1..{MAX_NODES} nodes with one download and one upload speed each, "
                               f"got {len(self.down_bps)} and {len(self.up_bps)}")
        for name, values in (("down_bps", self.down_bps), ("up_bps", self.up_bps)):
            for i, v in enumerate(values):
                if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 1):
                    raise ShapingError(f"{name}[{i}] must be a finite speed of at least 1 byte/s, got {v!r}")
        for name in ("server_up_bps", "server_down_bps"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and v >= 1):
                raise ShapingError(f"{name} must be at least 1 byte/s or inf, got {v!r}")
        object.__setattr__(self, "down_bps", tuple(float(v) for v in self.down_bps))
        object.__setattr__(self, "up_bps", tuple(float(v) for v in self.up_bps))

    def __len__(self) -> int:
        return len(self.down_bps)

    @classmethod
    def from_fleet(cls, fleet: Any) -> LinkSpeeds:
        """The mean speeds of a :class:`~prfl.sim.devices.Fleet` whose speeds do not vary per task.

        A fleet with ``sigma > 0`` draws a new speed for every task, and a fleet with speed
        changes changes them over time, which fixed links cannot reproduce: both are refused.
        """
        if getattr(fleet, "changes", ()):
            raise ShapingError(f"fleet {fleet.name!r} has speed changes ({len(fleet.changes)}); shaped links keep "
                               "fixed speeds: remove its 'changes'")
        varying = [i for i, c in enumerate(fleet.clients) if c.sigma != 0]
        if varying or fleet.server.sigma != 0:
            where = f"clients {varying[:5]}" if varying else "the server"
            raise ShapingError(f"{where} of fleet {fleet.name!r} have sigma > 0 (a new speed per task); shaped links "
                               "have fixed speeds: write the fleet with sigma: 0")
        return cls(
            down_bps=tuple(c.down_bps for c in fleet.clients),
            up_bps=tuple(c.up_bps for c in fleet.clients),
            server_up_bps=fleet.server.up_bps,
            server_down_bps=fleet.server.down_bps,
        )


def node_address(slot: int, node: int) -> str:
    """The loopback address node ``node`` of slot ``slot`` dials: ``127.77.slot.(node+1)``."""
    if not 0 <= slot < MAX_SLOTS or not 0 <= node < MAX_NODES:
        raise ValueError(f"slot {slot} or node {node} out of range")
    return f"{ADDRESS_PREFIX}.{slot}.{node + 1}"


def wire_rate(bps: float) -> float:
    """The rate of packets on ``lo`` (bytes/s, headers included) that carries ``bps`` bytes/s of
    TCP payload in full segments: ``bps / PAYLOAD_EFFICIENCY``."""
    return bps / PAYLOAD_EFFICIENCY


def _rate(bps: float) -> str:
    """A payload speed in bytes/s as a tc rate of packets (:func:`wire_rate`; ``tc`` reads ``bps``
    as bytes/s, ``bit`` is unambiguous)."""
    return f"{max(8, round(wire_rate(bps) * 8))}bit"


def _classid(minor: int) -> str:
    return f"{ROOT_MAJOR:x}:{minor:x}"


def class_minors(slot: int, n: int) -> dict[str, Any]:
    """Minor numbers of a slot's classes: ``send``, ``receive``, ``down[i]``, ``up[i]``."""
    base = slot << 12
    return {"send": base | 0x001, "receive": base | 0x002,
            "down": [base | (0x100 + i) for i in range(n)], "up": [base | (0x200 + i) for i in range(n)]}


_BUCKETS = ("burst", "1", "cburst", "1", "quantum", str(QUANTUM))
"""No burst: a class idle for a while may send one packet at once, never more (with the default
burst of about a packet, a sender that idles between small windows gains a packet each time)."""


def tc_setup_commands(slot: int, speeds: LinkSpeeds, port: int, device: str = DEVICE) -> list[list[str]]:
    """The ``tc`` argument lists that give slot ``slot`` its classes and filters (not the root).

    Node ``i``'s download is what the relay sends it from ``127.77.S.(i+1):port``; its upload
    what it sends there.
    """
    n = len(speeds)
    m = class_minors(slot, n)
    root = f"{ROOT_MAJOR:x}:"
    prio = str(FILTER_PRIO_BASE + slot)
    cmds: list[list[str]] = []
    for direction, parent_key, caps, server in (
        ("down", "send", speeds.down_bps, speeds.server_up_bps),
        ("up", "receive", speeds.up_bps, speeds.server_down_bps),
    ):
        capacity = min(server, sum(caps))  # an unlimited server: the sum of its nodes' speeds never binds
        parent = m[parent_key]
        cmds.append(["class", "add", "dev", device, "parent", root, "classid", _classid(parent), "htb",
                     "rate", _rate(capacity), "ceil", _rate(capacity), *_BUCKETS])
        assured = water_fill(list(caps), capacity)  # every node busy: its max-min share, nothing to borrow
        for i, cap in enumerate(caps):
            child = m[direction][i]
            cmds.append(["class", "add", "dev", device, "parent", _classid(parent), "classid", _classid(child), "htb",
                         "rate", _rate(assured[i]), "ceil", _rate(min(cap, capacity)), *_BUCKETS])
    for i in range(n):
        addr = node_address(slot, i)
        cmds.append(["filter", "add", "dev", device, "parent", root, "protocol", "ip", "prio", prio, "u32",
                     "match", "ip", "src", f"{addr}/32", "match", "ip", "sport", str(port), "0xffff",
                     "flowid", _classid(m["down"][i])])
        cmds.append(["filter", "add", "dev", device, "parent", root, "protocol", "ip", "prio", prio, "u32",
                     "match", "ip", "dst", f"{addr}/32", "match", "ip", "dport", str(port), "0xffff",
                     "flowid", _classid(m["up"][i])])
    return cmds


def tc_teardown_commands(slot: int, n: int, device: str = DEVICE) -> list[list[str]]:
    """The ``tc`` argument lists that remove slot ``slot``'s filters and classes."""
    m = class_minors(slot, n)
    cmds = [["filter", "del", "dev", device, "parent", f"{ROOT_MAJOR:x}:", "protocol", "ip",
             "prio", str(FILTER_PRIO_BASE + slot)]]
    for minor in [*m["down"], *m["up"], m["send"], m["receive"]]:
        cmds.append(["class", "del", "dev", device, "classid", _classid(minor)])
    return cmds


# --------------------------------------------------------------------------- running tc
def _tc(args: Sequence[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    tc = shutil.which("tc") or "/usr/sbin/tc"
    done = subprocess.run([tc, *args], capture_output=True, text=True, check=False, timeout=30)
    if check and done.returncode != 0:
        raise ShapingError(f"`tc {' '.join(args)}` failed ({done.returncode}): {done.stderr.strip()}")
    return done


def root_qdisc(device: str = DEVICE) -> dict[str, Any]:
    """The root qdisc of ``device`` as ``tc -j`` reports it (``kind``, ``handle``, ...)."""
    done = _tc(["-j", "qdisc", "show", "dev", device, "root"])
    entries = json.loads(done.stdout or "[]")
    return entries[0] if entries else {"kind": "noqueue", "handle": "0:"}


def _root_is_ours(root: Mapping[str, Any]) -> bool:
    return root.get("kind") == "htb" and root.get("handle") == f"{ROOT_MAJOR:x}:"


def _root_is_default(root: Mapping[str, Any]) -> bool:
    return root.get("kind") in ("noqueue", "pfifo_fast", "fq_codel", "mq", "pfifo") and root.get("handle") in ("0:", None)


def class_bytes(device: str = DEVICE) -> dict[str, int]:
    """Bytes sent so far by every htb class of ``device`` (``tc -s`` statistics), by class id."""
    done = _tc(["-s", "class", "show", "dev", device])  # iproute2 6.1 prints no JSON for htb classes
    return {m.group(1): int(m.group(2)) for m in _CLASS_STATS.finditer(done.stdout)}


_CLASS_STATS = re.compile(r"^class htb (\S+) .*?\n\s*Sent (\d+) bytes", re.MULTILINE)


def shaping_unavailable() -> str | None:
    """Why ``tc`` shaping on ``lo`` cannot be used here, or None when it can."""
    if not hasattr(os, "geteuid") or not Path("/proc/net").exists():
        return "traffic shaping needs Linux (tc on the loopback interface)"
    if os.geteuid() != 0:
        return "traffic shaping needs root: tc changes the loopback interface's queueing discipline"
    if shutil.which("tc") is None and not Path("/usr/sbin/tc").exists():
        return "tc (iproute2) is not installed"
    try:
        with _registry_lock(_registry_dir()):
            root = root_qdisc()
            if _root_is_ours(root):
                return None  # a run is shaping right now (or left its root): htb works
            if not _root_is_default(root):
                return f"the loopback interface already has a {root.get('kind')} root qdisc that prfl did not add"
            probe = _tc(["qdisc", "add", "dev", DEVICE, "root", "handle", f"{ROOT_MAJOR:x}:", "htb"], check=False)
            if probe.returncode != 0:
                return f"tc cannot add an htb qdisc on {DEVICE} (kernel without sch_htb?): {probe.stderr.strip()}"
            _tc(["qdisc", "del", "dev", DEVICE, "root"])
    except (ShapingError, OSError, ValueError) as exc:
        return f"tc cannot change the loopback interface's qdisc: {exc}"
    return None


# --------------------------------------------------------------------------- slots
def _registry_dir() -> Path:
    """Where slot files and the lock live: ``/run/prfl-shaping`` (tmpfs: gone at reboot, like qdiscs)."""
    for base in (Path("/run"), Path("/tmp")):
        if base.is_dir() and os.access(base, os.W_OK):
            d = base / "prfl-shaping"
            d.mkdir(mode=0o700, exist_ok=True)
            return d
    raise ShapingError("neither /run nor /tmp is writable: no place for the shaping slots' lock")


@contextlib.contextmanager
def _registry_lock(directory: Path) -> Iterator[None]:
    with open(directory / "lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def process_start_time(pid: int) -> int | None:
    """Start time of process ``pid`` in clock ticks since boot (``/proc/<pid>/stat``), None if gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(raw.rsplit(")", 1)[1].split()[19])


def _alive(pid: int, start: int | None) -> bool:
    return start is not None and process_start_time(pid) == start


def _slot_file(directory: Path, slot: int) -> Path:
    return directory / f"slot-{slot}.json"


def _read_slot(directory: Path, slot: int) -> dict[str, Any] | None:
    try:
        return json.loads(_slot_file(directory, slot).read_text())
    except (OSError, ValueError):
        return None


def _live_slots(directory: Path) -> list[int]:
    live = []
    for slot in range(MAX_SLOTS):
        info = _read_slot(directory, slot)
        if info is not None and _alive(int(info["pid"]), info.get("start")):
            live.append(slot)
    return live


def _kill_recorded(processes: Sequence[Sequence[int]]) -> None:
    """SIGKILL the process groups of recorded ``(pid, start time)`` pairs that still run."""
    for pid, start in processes:
        if _alive(pid, start):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)  # each was started as its own session leader
            log.warning("killed process group %d left by a shaped run that died", pid)


def _reclaim_stale(directory: Path) -> None:
    """Remove the classes, filters and processes of slots whose owner is gone (lock held)."""
    for slot in range(MAX_SLOTS):
        info = _read_slot(directory, slot)
        path = _slot_file(directory, slot)
        if info is None:
            if path.exists():
                path.unlink()
            continue
        if _alive(int(info["pid"]), info.get("start")):
            continue
        log.warning("reclaiming shaping slot %d of process %s, which is gone", slot, info["pid"])
        _kill_recorded(info.get("processes", []))
        for cmd in tc_teardown_commands(slot, int(info.get("nodes", MAX_NODES))):
            _tc(cmd, check=False)
        path.unlink()


class LoopbackShaper:
    """The classes and filters of one run on ``lo`` (a slot); a context manager.

    ``apply()`` takes a free slot under the lock (reclaiming stale ones, adding the root if
    needed) and installs the run's classes and filters; ``remove()`` takes them away again and
    the root with the last slot. Use :meth:`reserve` first to learn the slot (the addresses
    depend on it), then :meth:`apply` once the relay's port is known.
    """

    def __init__(self, speeds: LinkSpeeds) -> None:
        self.speeds = speeds
        self.slot: int | None = None
        self.port: int | None = None
        self.applied = False
        self._dir = _registry_dir()

    def reserve(self) -> int:
        """Take a free slot (writing its file under the lock); the root qdisc is added if absent."""
        if self.slot is not None:
            return self.slot
        reason = shaping_unavailable()
        if reason is not None:
            raise ShapingError(reason)
        with _registry_lock(self._dir):
            _reclaim_stale(self._dir)
            live = _live_slots(self._dir)
            root = root_qdisc()
            if not _root_is_ours(root):
                if not _root_is_default(root):
                    raise ShapingError(f"{DEVICE} has a {root.get('kind')} root qdisc (handle {root.get('handle')}) that "
                                       f"prfl did not add; remove it with `tc qdisc del dev {DEVICE} root` if it is stale")
                _tc(["qdisc", "add", "dev", DEVICE, "root", "handle", f"{ROOT_MAJOR:x}:", "htb"])
            elif not live:  # our root, no live run: whatever hangs under it is stale
                _tc(["qdisc", "del", "dev", DEVICE, "root"])
                _tc(["qdisc", "add", "dev", DEVICE, "root", "handle", f"{ROOT_MAJOR:x}:", "htb"])
            free = [s for s in range(MAX_SLOTS) if s not in live]
            if not free:
                raise ShapingError(f"all {MAX_SLOTS} shaping slots are taken by live runs")
            self.slot = free[0]
            self._write_slot([])
        return self.slot

    def _write_slot(self, processes: Sequence[Sequence[int]]) -> None:
        assert self.slot is not None
        pid = os.getpid()
        info = {"pid": pid, "start": process_start_time(pid), "nodes": len(self.speeds), "port": self.port,
                "processes": [list(p) for p in processes]}
        tmp = _slot_file(self._dir, self.slot).with_suffix(".tmp")
        tmp.write_text(json.dumps(info))
        os.replace(tmp, _slot_file(self._dir, self.slot))

    def record_processes(self, pids: Sequence[int]) -> None:
        """Remember process groups this run started, so that a later setup can end them if this
        process dies without cleaning up (SIGKILL)."""
        with _registry_lock(self._dir):
            self._write_slot([(p, process_start_time(p) or 0) for p in pids])

    def apply(self, port: int) -> None:
        """Install the slot's classes and filters for relay port ``port``."""
        slot = self.reserve()
        self.port = port
        with _registry_lock(self._dir):
            self._write_slot([])
            for cmd in tc_teardown_commands(slot, len(self.speeds)):
                _tc(cmd, check=False)  # idempotent: leftovers of this slot go first
            try:
                for cmd in tc_setup_commands(slot, self.speeds, port):
                    _tc(cmd)
            except ShapingError:
                for cmd in tc_teardown_commands(slot, len(self.speeds)):
                    _tc(cmd, check=False)
                raise
        self.applied = True
        log.info("shaping slot %d: %d nodes on %s, relay port %d", slot, len(self.speeds), node_address(slot, 0), port)

    def remove(self) -> None:
        """Remove the slot's filters and classes, its file, and the root if no other run is live."""
        if self.slot is None:
            return
        with _registry_lock(self._dir):
            for cmd in tc_teardown_commands(self.slot, len(self.speeds)):
                _tc(cmd, check=False)
            _slot_file(self._dir, self.slot).unlink(missing_ok=True)
            if not _live_slots(self._dir) and _root_is_ours(root_qdisc()):
                _tc(["qdisc", "del", "dev", DEVICE, "root"], check=False)
        self.slot = None
        self.applied = False

    def class_bytes(self) -> dict[str, list[int]]:
        """Bytes sent so far by each node's download and upload class (IP packets, headers included)."""
        assert self.slot is not None
        stats = class_bytes()
        m = class_minors(self.slot, len(self.speeds))
        return {d: [stats.get(_classid(c), 0) for c in m[d]] for d in ("down", "up")}

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


# --------------------------------------------------------------------------- relay
@dataclass
class _Route:
    listen: tuple[str, int]
    down: int = 0  # bytes from the target to the clients of this route
    up: int = 0
    connections: int = 0


class Relay:
    """TCP forwarders from ``addresses`` (one port for all) to ``target``, in a background thread.

    The shaped legs are those between a node and the relay: the relay sends node ``i``'s
    downloads from ``addresses[i]:port`` and receives its uploads there; its own connections to
    the target (bound to ``addresses[i]``, so that the SuperLink's logs name the node) are not
    shaped. On the shaped legs packets stay small, so that htb, which lets a packet pass whole
    once its class has credit and makes the class pay afterwards, never lets a transfer finish
    a big packet ahead of the link speed:

    - segments of ``mss`` (``TCP_MAXSEG`` on the listening sockets: Ethernet's), both ways;
    - downloads: the relay hands the kernel ``chunk_segments`` segments at a time, and only once
      everything written before has gone to the qdisc (``TCP_NOTSENT_LOWAT`` 1). Left alone, TCP
      would gather the bytes that wait behind the shaped queue into one packet of up to 64 KiB
      (on loopback the round-trip time is tiny, and Linux then sizes segmentation-offload packets
      by the device's maximum), and a transfer would end up to 64 KiB early;
    - uploads: the relay's receive buffer holds ``window_segments`` segments (``SO_RCVBUF``),
      which bounds the node's window, and so its packets, the same way. The node's own
      sending is what the link paces, as on a real network: its writes block while the link
      is busy (shaping the relay's onward leg instead would let the node hand its whole upload
      to the kernel at once and then time out waiting for the reply).

    Bytes are counted per address and direction (``down``: from the target).
    """

    def __init__(self, addresses: Sequence[str], target: tuple[str, int], *, port: int = 0, mss: int = MSS,
                 chunk_segments: int = CHUNK_SEGMENTS, window_segments: int = WINDOW_SEGMENTS) -> None:
        self.addresses = list(addresses)
        self.target = target
        self.port = port
        self.mss = mss
        self.chunk_segments = chunk_segments
        self.window_segments = window_segments
        self.routes: list[_Route] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._listeners: list[socket.socket] = []

    def _listening_socket(self, address: str, port: int) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, self.mss)
            # a small receive buffer keeps the window small (TCP_WINDOW_CLAMP is not honoured on
            # loopback here: a clamped listener still took 110 kB unread)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.window_segments * SEGMENT_PAYLOAD)
            sock.bind((address, port))
            sock.listen(64)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        return sock

    def _bind_all(self) -> list[socket.socket]:
        """Listening sockets on every address with one port (retrying when a port is taken)."""
        for _ in range(20):
            socks: list[socket.socket] = []
            try:
                first = self._listening_socket(self.addresses[0], self.port)
                socks.append(first)
                port = first.getsockname()[1]
                for addr in self.addresses[1:]:
                    socks.append(self._listening_socket(addr, port))
                self.port = port
                return socks
            except OSError as exc:
                for s in socks:
                    s.close()
                if exc.errno != errno.EADDRINUSE or self.port:
                    raise
        raise ShapingError(f"no port is free on all of {self.addresses[0]}..{self.addresses[-1]}")

    def start(self) -> Self:
        """Bind every address and start forwarding; :attr:`port` is then the port in use."""
        if self._thread is not None:
            return self
        self._listeners = self._bind_all()
        self.routes = [_Route((a, self.port)) for a in self.addresses]
        loop = asyncio.new_event_loop()
        self._loop = loop

        def run() -> None:
            asyncio.set_event_loop(loop)
            for route, sock in zip(self.routes, self._listeners):
                self._spawn(loop, self._serve(route, sock))
            loop.run_forever()
            for task in list(self._tasks):
                task.cancel()
            loop.run_until_complete(asyncio.gather(*self._tasks, return_exceptions=True))
            loop.close()

        self._thread = threading.Thread(target=run, name="prfl-relay", daemon=True)
        self._thread.start()
        return self

    def _spawn(self, loop: asyncio.AbstractEventLoop, coro: Any) -> None:
        task = loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, route: _Route, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(listener)
            conn.setblocking(False)
            route.connections += 1
            self._spawn(loop, self._forward(route, conn))

    async def _forward(self, route: _Route, node: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        upstream = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        upstream.setblocking(False)
        try:
            upstream.bind((route.listen[0], 0))  # the node's address, for the SuperLink's logs
            for sock in (node, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            node.setsockopt(socket.IPPROTO_TCP, TCP_NOTSENT_LOWAT, 1)
            await loop.sock_connect(upstream, self.target)
            down_chunk = self.chunk_segments * node.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG)
            await asyncio.gather(self._pump(loop, node, upstream, route, "up", 1 << 16),
                                 self._pump(loop, upstream, node, route, "down", down_chunk))
        except OSError:
            pass
        finally:
            node.close()
            upstream.close()

    @staticmethod
    async def _pump(loop: asyncio.AbstractEventLoop, src: socket.socket, dst: socket.socket, route: _Route,
                    direction: str, chunk: int) -> None:
        """Copy ``src`` to ``dst`` in chunks handed to the kernel only once the previous one left it."""
        pending = bytearray()
        try:
            while data := await loop.sock_recv(src, 1 << 16):
                pending += data
                while pending:
                    if len(pending) < chunk:  # top up a short chunk with what has arrived meanwhile
                        try:
                            pending += src.recv(1 << 16)
                        except (BlockingIOError, InterruptedError):
                            pass
                    await _writable(loop, dst)
                    try:
                        sent = dst.send(pending[:chunk])
                    except (BlockingIOError, InterruptedError):
                        continue
                    if direction == "up":
                        route.up += sent
                    else:
                        route.down += sent
                    del pending[:sent]
        except OSError:
            pass
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)  # half-close: the other direction may still be talking

    def counts(self) -> dict[str, list[int]]:
        """Application bytes forwarded so far per address: ``down`` (from the target) and ``up``."""
        return {"down": [r.down for r in self.routes], "up": [r.up for r in self.routes],
                "connections": [r.connections for r in self.routes]}

    def stop(self) -> None:
        """Close every listening socket and connection and end the thread."""
        loop, thread = self._loop, self._thread
        if loop is not None and thread is not None and loop.is_running():
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
        for sock in self._listeners:
            sock.close()
        self._listeners = []
        self._loop = None
        self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


async def _writable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    """Wait until ``sock`` polls writable (with ``TCP_NOTSENT_LOWAT`` 1: nothing left unsent)."""
    fut = loop.create_future()
    fd = sock.fileno()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    loop.add_writer(fd, ready)
    try:
        await fut
    finally:
        loop.remove_writer(fd)


# --------------------------------------------------------------------------- the federation
@dataclass
class ShapedFederation:
    """A local SuperLink and one SuperNode per entry of ``speeds``, over shaped links.

    Node ``i`` has ``partition-id=i``. The SuperNodes log with timestamps (``FLWR_LOG_LEVEL=DEBUG``)
    so that :func:`read_node_transfers` can find when each message's transfer began and ended.
    Use as a context manager; leaving it (by any exception too) stops every process and the
    relay and removes every class, filter and qdisc it added.
    """

    workdir: Path
    speeds: LinkSpeeds
    extra_env: Mapping[str, str] = field(default_factory=dict)
    mss: int | None = MSS
    federation: LocalFederation | None = None
    relay: Relay | None = None
    shaper: LoopbackShaper | None = None

    @property
    def address(self) -> str:
        assert self.federation is not None
        return self.federation.address

    def start(self) -> Self:
        """Reserve a slot, start the relay, install the classes, then the SuperLink and SuperNodes."""
        try:
            self.shaper = LoopbackShaper(self.speeds)
            slot = self.shaper.reserve()
            addresses = [node_address(slot, i) for i in range(len(self.speeds))]
            env = {"FLWR_LOG_LEVEL": "DEBUG", "PYTHONUNBUFFERED": "1", **self.extra_env}  # stamped log lines, unbuffered
            link_port = free_port()
            self.relay = Relay(addresses, ("127.0.0.1", link_port), mss=self.mss).start()
            self.shaper.apply(self.relay.port)
            fed = LocalFederation(self.workdir, len(self.speeds), extra_env=env, port=link_port,
                                  node_superlinks=[f"{a}:{self.relay.port}" for a in addresses])
            self.federation = fed
            fed.start()
            pids = [p.popen.pid for p in (fed.superlink, *fed.nodes) if p.popen is not None]
            self.shaper.record_processes(pids)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the processes, the relay and the shaping, each even if another step fails.

        SIGINT and SIGTERM are held back while this runs, so a second Ctrl-C cannot leave
        classes or processes behind; they are delivered when it returns.
        """
        blocked = threading.current_thread() is threading.main_thread()
        if blocked:
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            try:
                if self.federation is not None:
                    self.federation.stop()
            finally:
                try:
                    if self.relay is not None:
                        self.relay.stop()
                finally:
                    if self.shaper is not None:
                        self.shaper.remove()
        finally:
            if blocked:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def terminate_on_sigterm() -> Iterator[None]:
    """Inside the block, SIGTERM raises ``SystemExit(143)`` (as SIGINT raises KeyboardInterrupt), so
    ``with`` blocks unwind and clean up; the previous handler is restored afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# --------------------------------------------------------------------------- node logs
@dataclass(frozen=True)
class NodeTransfer:
    """When a SuperNode moved one message, from its log (wall clock, seconds since the epoch).

    ``receiving``: the message's metadata arrived (its content is pulled next); ``received``:
    the content is in, and confirmed; ``sending`` / ``sent``: the reply's upload began / every
    object of it was acknowledged by the SuperLink.
    """

    message_id: str
    message_type: str
    receiving: float
    received: float | None = None
    sending: float | None = None
    sent: float | None = None
    reply_id: str | None = None


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_STAMP = re.compile(
    r"^(?:INFO|DEBUG|WARNING|ERROR)\s+(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\s*:\s+"
    r"(Receiving|Received successfully|Sending|Sent successfully)(?:: (\S+) message \(ID: ([0-9a-f]+)\))?"
)


def read_node_transfers(log_path: str | os.PathLike[str]) -> dict[str, NodeTransfer]:
    """Every message a SuperNode received, by message id, with its transfer stamps.

    Reads the SuperNode's log lines ``Receiving: <type> message (ID: ...)``, ``Received
    successfully``, ``Sending: <type> message (ID: ...)`` and ``Sent successfully``, which Flower
    1.41 timestamps (local time, milliseconds) when ``FLWR_LOG_LEVEL=DEBUG``. A SuperNode
    handles one message at a time, so each ``Received``/``Sending``/``Sent`` line belongs to the
    last message received.
    """
    out: dict[str, NodeTransfer] = {}
    current: dict[str, Any] | None = None

    def flush() -> None:
        if current is not None:
            out[current["message_id"]] = NodeTransfer(**current)

    for line in Path(log_path).read_text(encoding="utf-8", errors="replace").splitlines():
        m = _STAMP.match(_ANSI.sub("", line).strip())
        if m is None:
            continue
        stamp = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()  # local time, as logged
        what = m.group(2)
        if what == "Receiving":
            flush()
            current = {"message_id": m.group(4), "message_type": m.group(3), "receiving": stamp}
        elif current is None:
            continue
        elif what == "Received successfully":
            current["received"] = stamp
        elif what == "Sending":
            current["sending"] = stamp
            current["reply_id"] = m.group(4)
        elif what == "Sent successfully":
            current["sent"] = stamp
    flush()
    return out
