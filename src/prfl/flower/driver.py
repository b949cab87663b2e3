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
import time
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from prfl.distribution import dense_model_bytes
from prfl.flower import codec
from prfl.flower.nodes import Node, NodeDirectory
from prfl.flower.pieces import PieceServer, residual_plan
from prfl.flower.replies import NODE_UNAVAILABLE, Pending, ReplyHandling  # noqa: F401  (NODE_UNAVAILABLE: as before)
from prfl.flower.settings import DriverSettings
from prfl.policies.base import (
    ClientIdle,
    Event,
    NotifyClient,
    Policy,
    Start,
    TaskFailed,
    TaskSpec,
    TimerFired,
)
from prfl.runtime.history import HistoryWriter
from prfl.runtime.rundir import RunDirectory
from prfl.runtime.runner import Cadence, PolicyRunner, RunnerBacked, Traffic
from prfl.seeding import int_seed

log = logging.getLogger(__name__)

Evaluator = Callable[[torch.Tensor], tuple[float, float]]  # weights -> (loss, accuracy)

# driver attributes a checkpoint carries as they are
_COUNTERS = (
    "bytes_down", "bytes_up", "importance_up", "accounted_down", "accounted_up", "record_down", "record_up",
    "server_egress", "server_ingress", "messages_sent", "messages_received", "tasks_sent", "arrivals", "failures",
)


class FlowerDriver(NodeDirectory, ReplyHandling, RunnerBacked):
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
        self.last_discover = -1e18
        self.idle_since: float | None = None
        self.next_eval_time = eval_every_seconds
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
        self.round_times: list[list[float]] = [[] for _ in range(k)]
        self._resume: dict[str, Any] | None = None
        cadence = Cadence(eval_every_rounds, settings.checkpoint_every_rounds, self.targets)
        self.runner = PolicyRunner(policy, evaluator, self, self.history, cadence, None, buffer_staleness=True,
                                   on_eval=self._log_eval)

    @property
    def checkpoint_dir(self) -> Path | None:
        """Where checkpoints go (set by the caller to enable them; None: no checkpoints)."""
        return self.runner.run_dir.path if self.runner.run_dir is not None else None

    @checkpoint_dir.setter
    def checkpoint_dir(self, path: Path | None) -> None:
        self.runner.run_dir = RunDirectory(path) if path is not None else None

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
                self.runner.evaluate(self.now())
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
        self.runner.evaluate_if_stale(self.now())
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
            **self.runner.state_dict(),
            "round_times": [list(r) for r in self.round_times],
            "next_eval_time": self.next_eval_time,
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
        self.runner.load_state_dict(state)
        self.round_times = [list(r) for r in state["round_times"]]
        self.next_eval_time = state["next_eval_time"]
        self._resume = {"now": float(state["now"])}  # not the state: the policy holds what it needs of it

    def save_checkpoint(self) -> Path:
        """Write ``checkpoint.pt`` in the checkpoint directory atomically (previous one kept)."""
        assert self.checkpoint_dir is not None
        return self.runner.write_checkpoint(self.state_dict)

    def _restart_tasks(self, nodes: dict[str, int]) -> None:
        """After a resume: tasks in flight at the checkpoint will never be answered (their messages
        belong to the old server), so the policy is told they failed; clients with a node are then
        idle again and get new tasks."""
        now = self.now()
        lost = self.policy.tasks_in_flight()
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
            self.runner.evaluate(self.now())
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
        """Stop the run after ``idle-timeout`` seconds with no task in flight, no timer and no event
        queued. A describe query that could still give an unserved client its node (sent before the
        timeout ran out, its message still alive) defers the stop until it is answered or expires:
        at most the query's life (``hello-timeout``, up to 4x after expiries) more, since queries
        sent later do not count."""
        busy = any(p.kind == "task" for p in self.pending.values())
        if busy or self.timers or self.queue:
            self.idle_since = None
            return
        t = self._clock()
        if self.idle_since is None:
            self.idle_since = t
        elif t - self.idle_since >= self.settings.idle_timeout:
            if self._hopeful_query(self.idle_since + self.settings.idle_timeout):
                return
            self.stopped = f"idle: nothing in flight for {self.settings.idle_timeout:g} s"

    def _hopeful_query(self, before: float) -> bool:
        """Whether a describe query sent before ``before`` (monotonic) is still pending for a node
        whose answer could make a client usable (a client with no usable node)."""
        for p in self.pending.values():
            if p.kind != "describe" or p.asked_at >= before:
                continue
            node = self.nodes.get(p.node_id)
            if node is None or node.gone:
                continue
            if node.client is None or self._usable_node(node.client) is None:
                return True
        return False

    # ------------------------------------------------------------------ policy I/O
    def _deliver(self, event: Event) -> None:
        """Hand ``event`` to the policy through the shared runner (see :mod:`prfl.runtime.runner`)."""
        self.runner.deliver(event)
        self.history.offset()  # flushed: the history can be followed while the run goes on

    # -- transport (for the runner)
    def clock(self) -> float:
        return self.now()

    def dispatch(self, spec: TaskSpec) -> None:
        self._dispatch(spec)

    def set_timer(self, key: str, at: float, event: Event) -> None:
        if at < event.now - 1e-9:
            raise RuntimeError(f"policy set timer {key!r} in the past ({at} < {event.now})")
        self.timers[key] = at

    def notify_client(self, notice: NotifyClient) -> None:
        self._notify(notice.client, notice.task_id, notice.check, notice.reason)

    def before_event(self, event: Event) -> None:
        if isinstance(event, TaskFailed):
            self.policy_online[event.client] = False
        elif isinstance(event, ClientIdle):
            self.policy_online[event.client] = True

    def after_update(self) -> None:
        pass

    def traffic(self) -> Traffic:
        return Traffic(self.server_egress, self.server_ingress, self.arrivals)

    def _fire_timers(self) -> None:
        while self.timers and self.stopped is None:
            key, at = min(self.timers.items(), key=lambda kv: kv[1])
            now = self.now()
            if at > now:
                return
            del self.timers[key]
            self._deliver(TimerFired(now=now, key=key))

    # ------------------------------------------------------------------ dispatch

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

    # ------------------------------------------------------------------ replies: see ReplyHandling
            # notices: the acknowledgement carries nothing the server needs


    # ------------------------------------------------------------------ nodes: see NodeDirectory


    # ------------------------------------------------------------------ evaluation and results
    def _log_eval(self, rec: dict[str, Any]) -> None:
        log.info("round %d  t=%.1fs  accuracy %.4f  loss %.4f", rec["round"], rec["time"], rec["accuracy"], rec["loss"])

    def summary(self, wall_seconds: float) -> dict[str, Any]:
        """The run's summary (the simulator's keys, plus the measured traffic)."""
        return {
            "policy": self.policy.name,
            "driver": "flower",
            "stopped": self.stopped,
            "seconds": self.now(),
            "wall_seconds": wall_seconds,
            "server_rounds": self.policy.version,
            **self.runner.accuracy_summary(),
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
            **self.runner.rejected_summary(),
        }
