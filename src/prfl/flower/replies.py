"""The Flower driver's messages in flight and their replies: results, errors, timeouts, notices.

A pushed message waits in ``pending`` (:class:`Pending`) until its reply is pulled or its
deadline passes. A train reply is decoded and checked (task id, client, array sizes): a usable
one becomes ``ResultArrived`` with its measured bytes recorded, an unusable one is recorded as
rejected (``check: decode``), the node is told, and the task fails. A ClientApp error, a node
the SuperLink reports unavailable or a missing reply fails the task (``TaskFailed``) and makes
the node suspect; a node that sends nothing usable ``max-client-errors`` times in a row ends
the run.

:class:`ReplyHandling` is a part of :class:`prfl.flower.driver.FlowerDriver` (a mixin: it works
on the driver's state).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch
from flwr.app import Message
from flwr.serverapp import Grid

from prfl.client.result import TaskResult
from prfl.flower import codec
from prfl.flower.settings import DriverSettings
from prfl.policies.base import ResultArrived, TaskFailed, TaskSpec

if TYPE_CHECKING:
    from prfl.flower.nodes import Node

log = logging.getLogger("prfl.flower.driver")

NODE_UNAVAILABLE = 5  # flwr.common.constant.ErrorCode.NODE_UNAVAILABLE
# flwr.common.constant.ErrorCode.MESSAGE_UNAVAILABLE and REPLY_MESSAGE_UNAVAILABLE: the SuperLink's
# error replies for a message that expired before (a reply to) it arrived
EXPIRED_CODES = (3, 4)
QUERY_GRACE = 5.0  # seconds a notice's message outlives its timeout (its TTL is the timeout plus this)


@dataclass
class Pending:
    """A pushed message waiting for its reply."""

    kind: str  # "task", "describe" or "notice"
    node_id: int
    deadline: float  # monotonic
    mid: str = ""  # message id
    sent_at: float = 0.0  # driver clock (now)
    spec: TaskSpec | None = None
    mask: torch.Tensor | None = None  # the mask the node trains under (None: dense)
    payload_bytes: int = 0
    record_bytes: int = 0
    pieces: list[str] = field(default_factory=list)
    sent_wall: float = math.nan  # wall clock (time.time()) at dispatch
    replied_wall: float = math.nan  # wall clock when the reply was pulled
    epoch: int = 0  # describe queries: the node's Node.failed count when it was sent
    asked_at: float = 0.0  # monotonic time the message was pushed (describe queries)


def _finite(x: float) -> float | None:
    return None if math.isnan(x) else x


class ReplyHandling:
    """Pulling replies, turning them into events, failing tasks (see the module docstring)."""

    grid: Grid
    settings: DriverSettings
    num_prunable: int
    nodes: dict[int, Node]
    client_node: dict[int, int]
    pending: dict[str, Pending]
    busy: dict[int, str]
    history: Any
    policy: Any
    pieces: Any
    record_down: int
    record_up: int
    messages_received: int
    server_ingress: int
    bytes_up: list[int]
    importance_up: list[int]
    accounted_up: list[int]
    arrivals: list[int]
    failures: list[int]
    round_times: list[list[float]]
    _clock: Callable[[], float]

    def _pull(self) -> None:
        if not self.pending:
            return
        try:
            replies = list(self.grid.pull_messages(list(self.pending)))
        except Exception:
            log.exception("pull_messages failed; retrying at the next tick")
            return
        pulled = time.time()
        for reply in replies:
            mid = reply.metadata.reply_to_message_id
            entry = self.pending.pop(mid, None)
            if entry is None:
                continue
            entry.replied_wall = pulled
            self.messages_received += 1
            if entry.kind == "task":
                self._on_task_reply(mid, entry, reply)
            elif entry.kind == "describe":
                self._on_describe_reply(entry, reply)

    def _release(self, entry: Pending) -> None:
        """The client of ``entry`` no longer holds its task."""
        assert entry.spec is not None
        if self.busy.get(entry.spec.client) == entry.mid:
            del self.busy[entry.spec.client]

    def _on_task_reply(self, mid: str, entry: Pending, reply: Message) -> None:
        spec = entry.spec
        assert spec is not None
        c = spec.client
        self._release(entry)
        node = self.nodes.get(entry.node_id)
        if reply.has_error():
            err = reply.error
            reason = f"client error {err.code}: {err.reason}"
            if err.code == NODE_UNAVAILABLE:
                reason = "node unavailable"
            elif node is not None:
                node.errors += 1
                if node.errors >= self.settings.max_client_errors:
                    raise RuntimeError(
                        f"node {node.node_id} (client {c}) failed {node.errors} tasks in a row; last error: {err.reason}"
                    )
            self._task_failed(entry, reason)
            return
        now = self.now()
        self.record_up += codec.record_bytes(reply.content)
        try:
            res = codec.decode_result(reply.content)
            if res.task_id != spec.task_id or res.client != c:
                raise codec.MalformedResult(
                    f"reply to task {spec.task_id} (client {c}) names task {res.task_id} (client {res.client})")
            weights, grad_sq = codec.result_weights(res, entry.mask, spec.weights.numel(), self.num_prunable,
                                                    spec.importance_scope)
        except ValueError as exc:  # MalformedResult, or arrays of the wrong size or type
            self._malformed(entry, node, str(exc))
            return
        if node is not None:
            node.errors = 0
        if res.received_payload_bytes != entry.payload_bytes:
            log.warning("task %d: node counted %d payload bytes, server sent %d", spec.task_id,
                        res.received_payload_bytes, entry.payload_bytes)
        self.bytes_up[c] += res.update_payload_bytes + res.importance_bytes
        self.importance_up[c] += res.importance_bytes
        self.accounted_up[c] += spec.upload_bytes
        self.server_ingress += res.update_payload_bytes + res.importance_bytes
        self.arrivals[c] += 1
        duration = now - entry.sent_at
        self.round_times[c].append(duration)
        result = TaskResult(
            task_id=spec.task_id, client=c, version=spec.version, weights=weights.to(spec.weights.dtype),
            num_samples=res.num_samples, mean_loss=res.mean_loss, steps=res.steps,
            compute_seconds=res.compute_seconds, grad_sq=grad_sq, density=spec.density, width=spec.width,
        )
        self.history.write(
            "arrival", time=now, round=self.policy.version, client=c, task=spec.task_id, version=spec.version,
            staleness=self.policy.version - spec.version, density=spec.density, train_loss=res.mean_loss,
            duration=duration, compute=res.compute_seconds, bytes_down=entry.payload_bytes,
            bytes_up=res.update_payload_bytes + res.importance_bytes, accounted_down=spec.download_bytes, accounted_up=spec.upload_bytes,
            importance_bytes=res.importance_bytes, received_bytes=res.received_payload_bytes,
            record_bytes_down=entry.record_bytes,
            record_bytes_up=codec.record_bytes(reply.content), delay=res.delay_seconds, node=entry.node_id,
            pieces=entry.pieces, message=mid,
            # wall-clock stamps (time.time()): dispatch, node received / trained, reply pulled
            stamps=[_finite(entry.sent_wall), _finite(res.arrived_at), _finite(res.trained_at),
                    _finite(entry.replied_wall)],
        )
        self._deliver(ResultArrived(now=now, result=result))

    def _notify(self, client: int, task_id: int, check: str, reason: str, node_id: int | None = None) -> None:
        """Tell the client's node that the result of ``task_id`` was rejected (fire and forget:
        the acknowledgement is pulled and dropped)."""
        nid = node_id if node_id is not None else self.client_node.get(client)
        if nid is None:
            return
        content = codec.encode_notice(task_id, client, check, reason)
        msg = Message(content, nid, codec.NOTICE_TYPE, ttl=self.settings.hello_timeout + QUERY_GRACE)
        mid = self._push(msg)
        if mid is None:
            return
        self.record_down += codec.record_bytes(content)
        self.pending[mid] = Pending("notice", nid, self._clock() + self.settings.hello_timeout, mid)

    def _malformed(self, entry: Pending, node: Node | None, reason: str) -> None:
        """A reply that is not a usable result: recorded as rejected, its task failed; a node that
        sends nothing else ``max-client-errors`` times in a row ends the run."""
        assert entry.spec is not None
        c = entry.spec.client
        self.history.write("rejected", time=self.now(), round=self.policy.version, client=c,
                           task=entry.spec.task_id, check="decode", reason=reason, node=entry.node_id)
        self._notify(c, entry.spec.task_id, "decode", reason, entry.node_id)
        if node is not None:
            node.errors += 1
            if node.errors >= self.settings.max_client_errors:
                raise RuntimeError(f"node {node.node_id} (client {c}) sent {node.errors} unusable results in a row; "
                                   f"last: {reason}")
        self._task_failed(entry, f"malformed result: {reason}")

    def _task_failed(self, entry: Pending, reason: str) -> None:
        spec = entry.spec
        assert spec is not None
        c = spec.client
        self._release(entry)
        self.failures[c] += 1
        self.pieces.forget(c)  # the node may have lost its cache
        node = self.nodes.get(entry.node_id)
        if node is not None:
            node.suspect = True
            node.failed += 1  # describe answers to queries sent before now do not clear the suspicion
            node.next_probe = self._clock()
        log.warning("task %d of client %d failed: %s", spec.task_id, c, reason)
        self.history.write("task_failed", time=self.now(), round=self.policy.version, client=c, task=spec.task_id,
                           reason=reason, node=entry.node_id)
        self._deliver(TaskFailed(now=self.now(), client=c, task_id=spec.task_id, reason=reason))

    def _expire(self) -> None:
        """Fail tasks past their reply timeout, drop unacknowledged notices, and ask again the
        nodes whose describe query expired unanswered (see :mod:`prfl.flower.nodes`)."""
        t = self._clock()
        for mid, entry in list(self.pending.items()):
            if entry.deadline > t or mid not in self.pending:
                continue
            del self.pending[mid]
            if entry.kind == "task":
                self._task_failed(entry, f"timeout: no reply within {self.settings.reply_timeout:g} s")
            elif entry.kind == "describe":
                self._describe_expired(entry.node_id, "no reply")
            elif entry.kind == "notice":
                log.info("node %d did not acknowledge a rejection notice", entry.node_id)
