"""The real-time driver: runs any prfl policy on a Flower Grid with push_messages / pull_messages.

The sibling of :class:`prfl.sim.engine.Simulation` for real devices. It owns a monotonic clock
(``now`` = seconds since Start), and

- turns ``Dispatch`` into a train message pushed to the client's node at once (a client without
  a usable node fails at once with ``TaskFailed(reason="offline")``, as in the simulator);
- pulls replies continuously and feeds each one to the policy as it arrives (``ResultArrived``),
  so nothing waits for a cohort unless the policy itself does;
- turns a missing reply after ``reply-timeout`` seconds, a ClientApp error or a node the
  SuperLink reports unavailable into ``TaskFailed``, then probes that node with a describe
  query; a node that answers (again), or a new node claiming the client's partition, yields
  ``ClientIdle``;
- fires ``SetTimer`` timers from its loop, answers ``RequestEvaluation`` on the server's test
  split, and writes the simulator's history format (``eval``, ``arrival`` with ``bytes_down`` /
  ``bytes_up`` measured from the messages, ``task_failed``, the policy's records, ``end``).

Clients are the policy's ids 0..K-1: a node's partition id (its node config ``partition-id``),
or, for nodes without one, the free ids in the order of their node ids.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from prfl.client.result import TaskResult
from prfl.distribution import dense_model_bytes
from prfl.flower import codec
from prfl.flower.pieces import PieceServer, residual_plan
from prfl.flower.settings import DriverSettings
from prfl.policies.base import (
    ClientIdle,
    Dispatch,
    EvaluationDone,
    Event,
    Policy,
    Record,
    RequestEvaluation,
    ResultArrived,
    SetTimer,
    Start,
    Stop,
    TaskFailed,
    TaskSpec,
    TimerFired,
)
from prfl.seeding import int_seed
from prfl.checkpoint import write_checkpoint
from prfl.sim.history import HistoryWriter

log = logging.getLogger(__name__)

Evaluator = Callable[[torch.Tensor], tuple[float, float]]  # weights -> (loss, accuracy)

NODE_UNAVAILABLE = 5  # flwr.common.constant.ErrorCode.NODE_UNAVAILABLE

# driver attributes a checkpoint carries as they are
_COUNTERS = (
    "bytes_down", "bytes_up", "importance_up", "accounted_down", "accounted_up", "record_down", "record_up",
    "server_egress", "server_ingress", "messages_sent", "messages_received", "tasks_sent", "arrivals", "failures",
)


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


def _finite(x: float) -> float | None:
    return None if math.isnan(x) else x


class FlowerDriver:
    """Drives one policy on a Flower Grid in real time (see the module docstring)."""

    def __init__(
        self,
        grid: Grid,
        policy: Policy,
        evaluator: Evaluator,
        settings: DriverSettings,
        *,
        seed: int = 0,
        history: HistoryWriter | None = None,
        eval_every_rounds: int | None = 10,
        eval_every_seconds: float | None = None,
        max_time: float | None = None,
        target_accuracies: Iterable[float] = (),
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.grid = grid
        self.policy = policy
        self.evaluator = evaluator
        self.settings = settings
        self.seed = seed
        self.history = history or HistoryWriter(None)
        self.eval_every_rounds = eval_every_rounds
        self.eval_every_seconds = eval_every_seconds
        self.max_time = max_time
        self.targets = tuple(target_accuracies)
        self._clock = clock
        self._sleep = sleep

        k = policy.ctx.num_clients
        self.num_clients = k
        self.total = policy.ctx.initial_weights.numel()
        self.num_prunable = policy.ctx.num_prunable
        self.nodes: dict[int, Node] = {}
        self.client_node: dict[int, int] = {}  # client -> node id
        self.pending: dict[str, Pending] = {}  # message id -> what it was
        self.busy: dict[int, str] = {}  # client -> message id of its task
        self.policy_online = [True] * k  # what the policy believes (FleetPolicy semantics)
        self.timers: dict[str, float] = {}
        self.queue: deque[Event] = deque()  # events to deliver at the next tick
        self.pieces = PieceServer(k)
        self._stop_file = Path(settings.stop_file).expanduser() if settings.stop_file else None

        self.t0 = clock()
        self.started = False
        self.stopped: str | None = None
        self.last_discover = -1e18
        self.idle_since: float | None = None
        self.next_eval_round = eval_every_rounds or 0
        self.next_eval_time = eval_every_seconds
        self.last_eval_version = -1
        # measured and accounted traffic
        self.bytes_down = [0] * k  # payload bytes sent to each client (array buffers)
        self.bytes_up = [0] * k  # payload bytes received: the model updates and the importance scores
        self.importance_up = [0] * k  # of which squared-gradient bytes
        self.accounted_down = [0] * k  # the policy's TaskSpec.download_bytes of the same tasks
        self.accounted_up = [0] * k
        self.record_down = 0  # Flower count_bytes of every message pushed (incl. describes)
        self.record_up = 0
        self.server_egress = 0
        self.server_ingress = 0
        self.messages_sent = 0
        self.messages_received = 0
        self.tasks_sent = 0
        self.arrivals = [0] * k
        self.failures = [0] * k
        self.evals: list[dict[str, Any]] = []
        self.reached: dict[float, float] = {}
        self.round_times: list[list[float]] = [[] for _ in range(k)]
        self.checkpoint_dir: Path | None = None  # set by the caller to enable checkpoints
        self._last_ckpt_version = 0
        self._checkpoint_due = False
        self._resume: dict[str, Any] | None = None

    # ------------------------------------------------------------------ clock
    def now(self) -> float:
        """Seconds since Start (since construction before Start)."""
        return self._clock() - self.t0

    # ------------------------------------------------------------------ running
    def run(self) -> dict[str, Any]:
        """Wait for the nodes, start the policy, and drive it until it stops."""
        wall0 = self._clock()
        self._wait_for_nodes()
        resumed = self._resume
        elapsed = 0.0 if resumed is None else float(resumed["now"])
        self.t0 = self._clock() - elapsed  # now = 0 at Start; a resumed run goes on from its checkpoint
        self.started = True
        nodes = {str(c): n for c, n in sorted(self.client_node.items())}
        if resumed is None:
            self.history.write("start", time=0.0, round=0, clients=self.num_clients, policy=self.policy.name,
                               driver="flower", nodes=nodes)
        try:
            if resumed is None:
                self._evaluate()
                self._deliver(Start(now=0.0))
            else:
                self._restart_tasks(nodes)
            while self.stopped is None:
                self._tick()
        except Exception as exc:
            self.history.write("end", time=self.now(), round=self.policy.version, reason=f"error: {exc}")
            self.history.offset()
            raise
        if self.busy:
            log.info("run ended with %d task(s) still out; their replies are ignored", len(self.busy))
        if self.last_eval_version != self.policy.version or not self.evals:
            self._evaluate()
        self.history.write("end", time=self.now(), round=self.policy.version, reason=self.stopped)
        self.history.offset()
        return self.summary(self._clock() - wall0)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The server's state: the policy's, the clock, counters and the history offset."""
        return {
            "kind": "flower-driver",
            "now": self.now(),
            "history_offset": self.history.offset(),
            "policy": self.policy.state_dict(),
            "policy_online": list(self.policy_online),
            "timers": dict(self.timers),
            "counters": {name: getattr(self, name) for name in _COUNTERS},
            "evals": list(self.evals),
            "reached": dict(self.reached),
            "round_times": [list(r) for r in self.round_times],
            "next_eval_round": self.next_eval_round,
            "next_eval_time": self.next_eval_time,
            "last_eval_version": self.last_eval_version,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint when :meth:`run` starts (before: nodes are not known yet)."""
        if state.get("kind") != "flower-driver":
            raise ValueError("not a checkpoint of the Flower driver (a simulator checkpoint? resume it with prfl run --resume)")
        self.policy.load_state_dict(state["policy"])
        self.policy_online = list(state["policy_online"])
        self.timers = dict(state["timers"])
        for name in _COUNTERS:
            value = state["counters"][name]
            setattr(self, name, list(value) if isinstance(value, list) else value)
        self.evals = list(state["evals"])
        self.reached = dict(state["reached"])
        self.round_times = [list(r) for r in state["round_times"]]
        self.next_eval_round = state["next_eval_round"]
        self.next_eval_time = state["next_eval_time"]
        self.last_eval_version = state["last_eval_version"]
        self._last_ckpt_version = self.policy.version
        self._resume = {"now": float(state["now"])}  # not the state: the policy holds what it needs of it

    def save_checkpoint(self) -> Path:
        """Write ``checkpoint.pt`` in the checkpoint directory atomically (previous one kept)."""
        assert self.checkpoint_dir is not None
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        self.history.write("checkpoint", time=self.now(), round=self.policy.version)
        path = write_checkpoint(self.state_dict(), self.checkpoint_dir)
        self._last_ckpt_version = self.policy.version
        return path

    def _restart_tasks(self, nodes: dict[str, int]) -> None:
        """After a resume: tasks in flight at the checkpoint will never be answered (their messages
        belong to the old server), so the policy is told they failed; clients with a node are then
        idle again and get new tasks."""
        now = self.now()
        lost = sorted(getattr(self.policy, "in_flight", {}).values(), key=lambda t: t.task_id)
        self.history.write("resume", time=now, round=self.policy.version, lost_tasks=[t.task_id for t in lost],
                           nodes=nodes)
        log.info("resumed at round %d (t=%.1f s); %d task(s) in flight at the checkpoint are failed",
                 self.policy.version, now, len(lost))
        reason = "server restarted: the task's reply is lost"
        for task in lost:
            self.failures[task.client] += 1
            self.history.write("task_failed", time=now, round=self.policy.version, client=task.client,
                               task=task.task_id, reason=reason, node=self.client_node.get(task.client))
            self._deliver(TaskFailed(now=now, client=task.client, task_id=task.task_id, reason=reason))
        for c in range(self.num_clients):
            if self._usable_node(c) is not None:
                self.policy_online[c] = False  # so that _client_back announces it
                self._client_back(c, self.client_node[c], "server resumed")

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

    def _tick(self) -> None:
        """One pass of the loop: queued events, timers, replies, timeouts, nodes, budget, sleep."""
        while self.queue and self.stopped is None:
            self._deliver(self.queue.popleft())
        self._fire_timers()
        self._pull()
        self._expire()
        self._discover(force=False)
        self._probe()
        now = self.now()
        if self.stopped is None and self.max_time is not None and now >= self.max_time:
            self.stopped = "time budget spent"
        if self.stopped is None and self._stop_file is not None and self._stop_file.exists():
            self.stopped = f"stop requested ({self._stop_file} exists)"
        if self.stopped is None and self.next_eval_time is not None and now >= self.next_eval_time:
            self._evaluate()
            assert self.eval_every_seconds is not None
            while self.next_eval_time <= now:
                self.next_eval_time += self.eval_every_seconds
        if self.stopped is None:
            self._check_idle()
        if self.stopped is None and not self.queue:
            wait = self.settings.poll_interval
            if self.timers:
                wait = min(wait, max(0.0, min(self.timers.values()) - self.now()))
            if wait > 0:
                self._sleep(wait)

    def _check_idle(self) -> None:
        busy = any(p.kind == "task" for p in self.pending.values())
        if busy or self.timers or self.queue:
            self.idle_since = None
            return
        t = self._clock()
        if self.idle_since is None:
            self.idle_since = t
        elif t - self.idle_since >= self.settings.idle_timeout:
            self.stopped = f"idle: nothing in flight for {self.settings.idle_timeout:g} s"

    # ------------------------------------------------------------------ policy I/O
    def _deliver(self, event: Event) -> None:
        """Hand ``event`` to the policy and carry out its actions (like the simulator)."""
        pending: list[Event] = [event]
        while pending and self.stopped is None:
            ev = pending.pop(0)
            if isinstance(ev, TaskFailed):
                self.policy_online[ev.client] = False
            elif isinstance(ev, ClientIdle):
                self.policy_online[ev.client] = True
            before = self.policy.version
            actions = self.policy.on_event(ev)
            for action in actions:
                if isinstance(action, Dispatch):
                    self._dispatch(action.task)
                elif isinstance(action, SetTimer):
                    if action.at < ev.now - 1e-9:
                        raise RuntimeError(f"policy set timer {action.key!r} in the past ({action.at} < {ev.now})")
                    self.timers[action.key] = action.at
                elif isinstance(action, RequestEvaluation):
                    loss, acc = self.evaluator(action.weights)
                    pending.append(EvaluationDone(now=self.now(), tag=action.tag, accuracy=acc, loss=loss))
                elif isinstance(action, Record):
                    self.history.write(action.kind, **{"time": self.now(), "round": self.policy.version, **action.data})
                    if action.kind == "rejected":
                        d = action.data
                        self._notify(int(d["client"]), int(d["task"]), str(d["check"]), str(d["reason"]))
                elif isinstance(action, Stop):
                    self.stopped = action.reason
                else:
                    raise TypeError(f"unknown action {action!r}")
            if self.policy.version != before:
                self._after_update()
        # saved once the event is fully handled (the evaluations it asked for included)
        if self._checkpoint_due and not pending and self.stopped is None:
            self._checkpoint_due = False
            self.save_checkpoint()
        self.history.offset()  # flushed: the history can be followed while the run goes on

    def _after_update(self) -> None:
        ck = self.settings.checkpoint_every_rounds
        if ck and self.checkpoint_dir is not None and self.policy.version - self._last_ckpt_version >= ck:
            self._checkpoint_due = True
        every = self.eval_every_rounds
        if every and self.policy.version >= self.next_eval_round:
            self._evaluate()
            while self.next_eval_round <= self.policy.version:
                self.next_eval_round += every

    def _fire_timers(self) -> None:
        while self.timers and self.stopped is None:
            key, at = min(self.timers.items(), key=lambda kv: kv[1])
            now = self.now()
            if at > now:
                return
            del self.timers[key]
            self._deliver(TimerFired(now=now, key=key))

    # ------------------------------------------------------------------ dispatch
    def _usable_node(self, client: int) -> Node | None:
        nid = self.client_node.get(client)
        node = self.nodes.get(nid) if nid is not None else None
        if node is None or node.gone or node.suspect or not node.described:
            return None
        return node

    def _dispatch(self, spec: TaskSpec) -> None:
        c = spec.client
        now = self.now()
        if not 0 <= c < self.num_clients:
            raise ValueError(f"policy dispatched to unknown client {c}")
        if c in self.busy:
            raise RuntimeError(f"policy dispatched task {spec.task_id} to client {c}, which is busy")
        node = self._usable_node(c)
        if node is None:
            self._fail_now(c, spec.task_id, "offline")
            return
        content, mask, egress, pieces = self._encode_task(spec)
        payload = codec.payload_bytes(content[codec.PAYLOAD])
        rec_bytes = codec.record_bytes(content)
        msg = Message(content, node.node_id, codec.TRAIN_TYPE, ttl=self.settings.reply_timeout + 5.0,
                      group_id=str(self.policy.version))
        wall = time.time()
        mid = self._push(msg)
        if mid is None:
            self._fail_now(c, spec.task_id, "push failed")
            return
        self.pending[mid] = Pending("task", node.node_id, self._clock() + self.settings.reply_timeout, mid, now, spec,
                                    mask, payload, rec_bytes, pieces, sent_wall=wall)
        self.busy[c] = mid
        self.tasks_sent += 1
        self.record_down += rec_bytes
        self.bytes_down[c] += payload
        self.accounted_down[c] += spec.download_bytes
        self.server_egress += egress
        if payload != spec.download_bytes:
            log.info("task %d to client %d: %d payload bytes on the wire, the policy accounted %d",
                     spec.task_id, c, payload, spec.download_bytes)

    def _encode_task(self, spec: TaskSpec) -> tuple[RecordDict, torch.Tensor | None, int, list[str]]:
        """Train-message content, the mask trained under, server egress bytes and pieces sent."""
        common = {
            "task_id": spec.task_id, "client": spec.client, "num_clients": self.num_clients, "version": spec.version,
            "density": spec.density, "width": spec.width, "want_importance": spec.want_importance,
            "importance_dtype": spec.importance_dtype, "importance_scope": spec.importance_scope,
            "seed": int_seed(self.seed, "train", spec.client, spec.task_id),
        }
        plan = residual_plan(self.policy, spec) if spec.width == 1.0 else None
        if plan is not None:
            arrays, sent, egress = self.pieces.arrays_for(plan, spec.weights, spec.client)
            j = plan.needed[-1].index
            mask = None if plan.split.bounds[j] >= self.num_prunable else plan.split.mask(plan.split.levels[j - 1])
            content = codec.encode_task(
                **common, kind=codec.KIND_PIECES, total=self.total, num_prunable=self.num_prunable, arrays=arrays,
                split=plan.split.version, structure=self.pieces.structure, needed=tuple(p.index for p in plan.needed),
                counts=tuple(plan.split.count(p) for p in plan.needed),
            )
            return content, mask, egress, sent
        weights = spec.weights.detach().to(torch.float32)
        if spec.mask is None or spec.width != 1.0:
            arrays = {"weights": codec.raw_array(weights, "float32")}
            content = codec.encode_task(**common, kind=codec.KIND_DENSE, total=weights.numel(),
                                        num_prunable=self.num_prunable, arrays=arrays)
            return content, None, dense_model_bytes(weights.numel()), []
        arrays = codec.sparse_arrays(weights, spec.mask, self.num_prunable)
        content = codec.encode_task(**common, kind=codec.KIND_SPARSE, total=self.total,
                                    num_prunable=self.num_prunable, arrays=arrays)
        return content, spec.mask, codec.payload_bytes(content[codec.PAYLOAD]), []

    def _push(self, msg: Message) -> str | None:
        try:
            ids = list(self.grid.push_messages([msg]))
        except Exception:  # a transport error must not kill the run: the task fails instead
            log.exception("push_messages failed")
            return None
        if not ids or ids[0] in (None, ""):
            return None
        self.messages_sent += 1
        return ids[0]

    def _fail_now(self, client: int, task_id: int, reason: str) -> None:
        """A dispatch that cannot leave: it fails at the next tick (as the simulator does). The
        client counts as offline for the policy from now on, so that a node joining for it before
        the failure is delivered announces it back (ClientIdle after the TaskFailed)."""
        self.policy_online[client] = False
        self.failures[client] += 1
        self.history.write("task_failed", time=self.now(), round=self.policy.version, client=client, task=task_id,
                           reason=reason)
        self.queue.append(TaskFailed(now=self.now(), client=client, task_id=task_id, reason=reason))

    # ------------------------------------------------------------------ replies
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
            # notices: the acknowledgement carries nothing the server needs

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
        msg = Message(content, nid, codec.NOTICE_TYPE, ttl=self.settings.hello_timeout + 5.0)
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
            node.next_probe = self._clock()
        log.warning("task %d of client %d failed: %s", spec.task_id, c, reason)
        self.history.write("task_failed", time=self.now(), round=self.policy.version, client=c, task=spec.task_id,
                           reason=reason, node=entry.node_id)
        self._deliver(TaskFailed(now=self.now(), client=c, task_id=spec.task_id, reason=reason))

    def _expire(self) -> None:
        t = self._clock()
        for mid, entry in list(self.pending.items()):
            if entry.deadline > t or self.pending.pop(mid, None) is None:
                continue
            if entry.kind == "task":
                self._task_failed(entry, f"timeout: no reply within {self.settings.reply_timeout:g} s")
            elif entry.kind == "notice":
                log.info("node %d did not acknowledge a rejection notice", entry.node_id)
            else:
                node = self.nodes.get(entry.node_id)
                if node is not None:
                    node.next_probe = t + self.settings.probe_interval
                    log.info("node %d did not answer the describe query", entry.node_id)

    # ------------------------------------------------------------------ nodes
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
        asked = {p.node_id for p in self.pending.values() if p.kind == "describe"}
        for node in self.nodes.values():
            if node.gone or node.node_id in asked or t < node.next_probe:
                continue
            if node.suspect or not node.described:
                self._describe(node)

    def _describe(self, node: Node) -> None:
        content = RecordDict({"prfl.query": ConfigRecord({"num-clients": self.num_clients})})
        msg = Message(content, node.node_id, codec.DESCRIBE_TYPE, ttl=self.settings.hello_timeout + 5.0)
        node.next_probe = self._clock() + self.settings.probe_interval
        mid = self._push(msg)
        if mid is None:
            return
        self.record_down += codec.record_bytes(content)
        self.pending[mid] = Pending("describe", node.node_id, self._clock() + self.settings.hello_timeout, mid)

    def _on_describe_reply(self, entry: Pending, reply: Message) -> None:
        node = self.nodes.get(entry.node_id)
        if node is None or node.gone:
            return
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
        recovered = node.suspect
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

    # ------------------------------------------------------------------ evaluation and results
    def _evaluate(self) -> None:
        loss, acc = self.evaluator(self.policy.weights)
        now = self.now() if self.started else 0.0
        self.last_eval_version = self.policy.version
        rec: dict[str, Any] = {
            "time": now,
            "round": self.policy.version,
            "accuracy": acc,
            "loss": loss,
            "server_egress": self.server_egress,
            "server_ingress": self.server_ingress,
            "participation": list(self.arrivals),
        }
        densities = getattr(self.policy, "densities", None)
        if densities is not None:
            rec["density"] = [float(d) for d in densities]
        buffer = getattr(self.policy, "buffer", None)
        if buffer is not None and hasattr(buffer, "get"):
            entries = [buffer.get(c) for c in range(self.num_clients)]
            rec["buffer_staleness"] = [None if e is None else self.policy.version - e.sent_round for e in entries]
        self.evals.append(rec)
        for target in self.targets:
            if acc >= target and target not in self.reached:
                self.reached[target] = now
        self.history.write("eval", **rec)
        log.info("round %d  t=%.1fs  accuracy %.4f  loss %.4f", self.policy.version, now, acc, loss)

    def summary(self, wall_seconds: float) -> dict[str, Any]:
        """The run's summary (the simulator's keys, plus the measured traffic)."""
        accs = [e["accuracy"] for e in self.evals]
        return {
            "policy": self.policy.name,
            "driver": "flower",
            "stopped": self.stopped,
            "seconds": self.now(),
            "wall_seconds": wall_seconds,
            "server_rounds": self.policy.version,
            "final_accuracy": accs[-1] if accs else None,
            "best_accuracy": max(accs) if accs else None,
            "time_to_accuracy": {f"{t:g}": self.reached.get(t) for t in self.targets},
            "local_rounds": list(self.arrivals),
            "aggregated_rounds": list(self.policy.participation),
            "failed_tasks": list(self.failures),
            "mean_round_time": [sum(r) / len(r) if r else None for r in self.round_times],
            "nodes": {str(c): n for c, n in sorted(self.client_node.items())},
            "messages_sent": self.messages_sent,
            "messages_received": self.messages_received,
            "tasks_sent": self.tasks_sent,
            "server_egress_bytes": self.server_egress,
            "server_ingress_bytes": self.server_ingress,
            "client_download_bytes": list(self.bytes_down),
            "client_upload_bytes": list(self.bytes_up),
            "client_importance_bytes": list(self.importance_up),
            "accounted_download_bytes": list(self.accounted_down),
            "accounted_upload_bytes": list(self.accounted_up),
            "record_bytes_sent": self.record_down,
            "record_bytes_received": self.record_up,
        }
