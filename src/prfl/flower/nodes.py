"""The Flower driver's node directory: which node serves which client, and when a node is usable.

Nodes are listed with ``get_node_ids`` every ``discover-interval`` seconds and asked who they
are with a describe query (partition id, delay, cached pieces). A node that answers is bound to
its partition's client (or, without a partition id, to a free client in node-id order); a node
whose task failed is *suspect* and probed again before it is used; a node that leaves the
listing is forgotten, and its client's tasks fail. A client whose node answers (again) is
announced to the policy with ``ClientIdle``.

A node has at most one describe query alive. A SuperNode handles its messages one at a time, so
a second query would only queue behind the first: when a node's first answer (a cold ClientApp
start) took longer than a query lives, queries sent meanwhile each waited behind the last and
expired in turn, and the node was never described. A query lives ``hello-timeout`` seconds (its
message's TTL); one that expires unanswered is followed at once by a new one that lives twice as
long, up to ``MAX_BACKOFF`` times ``hello-timeout``, so a node whose answers are always slower
than the timeout is described too. An answer resets the node's wait to ``hello-timeout``.

:class:`NodeDirectory` is a part of :class:`prfl.flower.driver.FlowerDriver` (a mixin: it works
on the driver's state).
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from prfl.flower import codec
from prfl.flower.replies import EXPIRED_CODES, Pending
from prfl.flower.settings import DriverSettings
from prfl.policies.base import ClientIdle, Event

log = logging.getLogger("prfl.flower.driver")

MAX_BACKOFF = 4.0  # a describe query lives at most this many times hello-timeout


@dataclass
class Node:
    """A Flower node as the driver sees it."""

    node_id: int
    client: int | None = None
    partition_id: int = -1  # from its node config, -1 when unset
    delay_seconds: float = 0.0
    described: bool = False
    suspect: bool = False  # its last task failed: probe before using it again
    gone: bool = False
    next_probe: float = 0.0  # monotonic time of the next describe query
    errors: int = 0  # consecutive ClientApp errors
    failed: int = 0  # tasks failed on this node (a describe answer clears the suspicion of later failures only)
    describe_wait: float = 0.0  # seconds its next describe query lives (0: hello-timeout; doubled after an expiry)


class NodeDirectory:
    """Node discovery, describe queries and the client <-> node binding (see the module docstring)."""

    grid: Grid
    settings: DriverSettings
    num_clients: int
    nodes: dict[int, Node]
    client_node: dict[int, int]  # client -> node id
    pending: dict[str, Pending]
    busy: dict[int, str]
    policy_online: list[bool]
    queue: deque[Event]
    started: bool
    last_discover: float
    history: Any
    policy: Any
    pieces: Any
    record_down: int
    record_up: int
    _clock: Callable[[], float]
    _sleep: Callable[[float], None]

    def _wait_for_nodes(self) -> None:
        """Describe the federation's nodes until every client has one (or the wait runs out)."""
        deadline = self._clock() + self.settings.wait_for_nodes
        while True:
            self._discover(force=False)
            self._pull()
            self._expire()
            self._probe()
            waiting = [n for n in self.nodes.values() if n.described and n.client is None and not n.gone]
            if len(self.client_node) + len(waiting) >= self.num_clients or self._clock() >= deadline:
                self._bind_unassigned()
                bound = len(self.client_node)
                if bound >= self.num_clients:
                    log.info("all %d clients have a node", self.num_clients)
                else:
                    log.warning("starting with %d of %d clients bound to a node after %.0f s; the others fail as "
                                "offline until their node appears", bound, self.num_clients,
                                self.settings.wait_for_nodes)
                return
            self._sleep(self.settings.poll_interval)

    def _bind_unassigned(self) -> None:
        """Give nodes without a partition id the free clients, in the order of their node ids."""
        for node in sorted(self.nodes.values(), key=lambda n: n.node_id):
            if node.described and node.client is None and not node.gone and node.partition_id < 0:
                client = self._free_client()
                if client is None:
                    log.warning("node %d has no partition-id and every client has a node; it stays unused",
                                node.node_id)
                    continue
                self._bind(node, client)

    def _usable_node(self, client: int) -> Node | None:
        nid = self.client_node.get(client)
        node = self.nodes.get(nid) if nid is not None else None
        if node is None or node.gone or node.suspect or not node.described:
            return None
        return node

    def _discover(self, force: bool) -> None:
        t = self._clock()
        if not force and t - self.last_discover < self.settings.discover_interval:
            return
        self.last_discover = t
        try:
            listed = {int(n) for n in self.grid.get_node_ids()}
        except Exception:
            log.exception("get_node_ids failed; retrying later")
            return
        for nid in sorted(listed - set(self.nodes)):
            self.nodes[nid] = Node(nid)
            self._describe(self.nodes[nid])
        for nid, node in [(n, x) for n, x in self.nodes.items() if n not in listed]:
            del self.nodes[nid]  # forgotten: if its id is listed again, it is described as a new node
            if not node.gone:
                node.gone = True
                log.info("node %d left the federation", nid)
                for mid, entry in list(self.pending.items()):
                    if entry.node_id == nid and self.pending.pop(mid, None) is not None and entry.kind == "task":
                        self._task_failed(entry, "node left the federation")
                if node.client is not None and self.client_node.get(node.client) == nid:
                    del self.client_node[node.client]
                    for old in self.nodes.values():  # a node it replaced may still be listed: ask it again
                        if old.client is None and old.partition_id == node.client:
                            old.gone, old.suspect, old.next_probe = False, True, t
                    if self.started:
                        self.history.write("node", time=self.now(), round=self.policy.version, client=node.client,
                                           node=nid, status="left")

    def _probe(self) -> None:
        t = self._clock()
        asked = {p.node_id for p in self.pending.values() if p.kind == "describe"}  # one live query per node
        for node in self.nodes.values():
            if node.gone or node.node_id in asked or t < node.next_probe:
                continue
            if node.suspect or not node.described:
                self._describe(node)

    def _describe_wait(self, node: Node) -> float:
        return node.describe_wait or self.settings.hello_timeout

    def _describe(self, node: Node) -> None:
        """Send ``node`` a describe query. Callers send one only to a node without a live query
        (:meth:`_probe`; :meth:`_discover` for a node just listed): a second would queue behind it."""
        content = RecordDict({"prfl.query": ConfigRecord({"num-clients": self.num_clients})})
        wait = self._describe_wait(node)
        msg = Message(content, node.node_id, codec.DESCRIBE_TYPE, ttl=wait)
        node.next_probe = self._clock() + self.settings.probe_interval
        mid = self._push(msg)
        if mid is None:
            return
        self.record_down += codec.record_bytes(content)
        self.pending[mid] = Pending("describe", node.node_id, self._clock() + wait, mid, epoch=node.failed,
                                    asked_at=self._clock())

    def _describe_expired(self, node_id: int, why: str) -> None:
        """A describe query to ``node_id`` ended without an answer: ask again at once, with twice
        the wait (up to MAX_BACKOFF x hello-timeout)."""
        node = self.nodes.get(node_id)
        if node is None or node.gone:
            return
        wait = self._describe_wait(node)
        node.describe_wait = min(2 * wait, MAX_BACKOFF * self.settings.hello_timeout)
        node.next_probe = self._clock()
        log.info("node %d did not answer the describe query within %g s (%s); asking again with %g s",
                 node_id, wait, why, node.describe_wait)

    def _on_describe_reply(self, entry: Pending, reply: Message) -> None:
        node = self.nodes.get(entry.node_id)
        if node is None or node.gone:
            return
        if reply.has_error() and reply.error.code in EXPIRED_CODES:  # the SuperLink: it expired unanswered
            self._describe_expired(node.node_id, "its message expired")
            return
        node.describe_wait = 0.0  # it answers (if badly): its next query waits hello-timeout again
        if reply.has_error():
            log.info("node %d answered the describe query with an error: %s", node.node_id, reply.error.reason)
            node.next_probe = self._clock() + self.settings.probe_interval
            return
        self.record_up += codec.record_bytes(reply.content)
        try:
            info = codec.decode_node(reply.content)
        except ValueError as exc:  # not a prfl ClientApp, or a broken one: ask again later
            log.warning("node %d sent an unreadable describe reply: %s", node.node_id, exc)
            node.next_probe = self._clock() + self.settings.probe_interval
            return
        if info["num_partitions"] not in (-1, self.num_clients):
            raise RuntimeError(
                f"node {node.node_id} has num-partitions={info['num_partitions']} but the run has "
                f"{self.num_clients} clients (prfl.data.num_clients); start the SuperNodes with "
                f"--node-config 'num-partitions={self.num_clients} ...'"
            )
        pid = info["partition_id"]
        if pid >= self.num_clients:
            raise RuntimeError(f"node {node.node_id} has partition-id={pid}, outside 0..{self.num_clients - 1}")
        node.partition_id = pid
        node.delay_seconds = info["delay_seconds"]
        node.described = True
        recovered = node.suspect and entry.epoch == node.failed  # asked after its last failed task
        if recovered:
            node.suspect = False
        if node.client is None:
            if pid >= 0:
                self._bind(node, pid)
            elif self.started:  # before Start, nodes without a partition id are bound in node-id order
                self._bind_unassigned()
        elif recovered and self.client_node.get(node.client) == node.node_id:
            self._client_back(node.client, node.node_id, "node answered again")

    def _free_client(self) -> int | None:
        taken = set(self.client_node) | {n.partition_id for n in self.nodes.values() if n.partition_id >= 0 and not n.gone}
        for c in range(self.num_clients):
            if c not in taken:
                return c
        return None

    def _bind(self, node: Node, client: int) -> None:
        old = self.client_node.get(client)
        if old is not None and old != node.node_id:
            prev = self.nodes[old]
            if not prev.suspect and not prev.gone:
                log.warning("client %d: node %d replaces node %d (two live nodes with one partition id?)",
                            client, node.node_id, old)
            prev.client = None
            prev.gone = prev.gone or prev.suspect  # a failed node replaced by a new one is not probed again
            mid = self.busy.get(client)
            if mid is not None and self.pending.get(mid) is not None and self.pending[mid].node_id == old:
                entry = self.pending.pop(mid)
                self._task_failed(entry, "node replaced")
        node.client = client
        self.client_node[client] = node.node_id
        self.pieces.forget(client)  # a new node starts with an empty cache
        log.info("client %d -> node %d (partition-id %d, delay %.3g s)", client, node.node_id, node.partition_id,
                 node.delay_seconds)
        if self.started:
            self.history.write("node", time=self.now(), round=self.policy.version, client=client, node=node.node_id,
                               status="joined", delay=node.delay_seconds)
            self._client_back(client, node.node_id, "node joined")

    def _client_back(self, client: int, node_id: int, why: str) -> None:
        """Tell the policy a client is idle again, when it believes the client offline."""
        if not self.started or self.policy_online[client] or client in self.busy:
            return
        self.history.write("availability", time=self.now(), round=self.policy.version, client=client, online=True,
                           node=node_id, reason=why)
        self.queue.append(ClientIdle(now=self.now(), client=client))
