"""The Flower driver against a hostile grid: any order of replies and node events.

``driver_fuzz.run_driver`` runs the real driver loop (virtual clock) on a :class:`FakeGrid` whose
replies come late, twice, malformed or for unknown messages and whose nodes vanish and return
mid-task; see ``driver_fuzz.py`` for the checks. ``benchmarks/fuzz_policies.py`` runs 10,000 such
sequences; here a few fixed seeds and a few hypothesis-drawn ones (whose random choices hypothesis
shrinks on a failure), plus the driver bugs the fuzzing found, each as its minimal sequence.
"""

from __future__ import annotations

import logging
import os

import pytest

pytest.importorskip("flwr", reason="Flower is not installed: pip install 'prfl[flower]' to run the Flower tests")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from driver_fuzz import SETTINGS, VirtualClock, fast_client_app, run_driver  # noqa: E402
from event_fuzz import CASES, NUM_CLIENTS  # noqa: E402
from flower_fakegrid import FakeGrid  # noqa: E402
from flwr.app import Message, RecordDict, ConfigRecord  # noqa: E402
from prfl.flower import codec  # noqa: E402
from prfl.flower.driver import FlowerDriver  # noqa: E402
from prfl.policies.base import ClientIdle, Start, TaskFailed  # noqa: E402
from prfl.runtime.history import HistoryWriter  # noqa: E402

SEEDS = int(os.environ.get("PRFL_FUZZ_FLOWER", "8"))


@pytest.fixture(autouse=True)
def _quiet():
    logging.disable(logging.WARNING)  # the driver logs every failure it handles
    yield
    logging.disable(logging.NOTSET)


def test_fixed_seeds():
    for seed in range(SEEDS):
        run_driver(seed)


@settings(max_examples=SEEDS, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(rng=st.randoms(use_true_random=False), case=st.sampled_from(sorted(CASES)))
def test_hypothesis_drawn_runs(rng, case):
    run_driver(0, CASES[case], rng=rng)


def driver_on(grid: FakeGrid, clock: VirtualClock, case: str = "prfl") -> FlowerDriver:
    def sleep(dt: float) -> None:
        clock.t += max(dt, 1e-3)

    return FlowerDriver(grid, CASES[case].build(), lambda w: (1.0, 0.5), SETTINGS, history=HistoryWriter(None),
                        clock=clock, sleep=sleep)


def test_describe_reply_without_the_node_record_is_logged_not_raised():
    """A node answers the describe query with something else. Before: ValueError from
    codec.decode_node ended the run; now the node is asked again later."""
    clock = VirtualClock()
    configs = [{"partition-id": c, "num-partitions": NUM_CLIENTS} for c in range(NUM_CLIENTS)]
    answered: dict[int, int] = {}

    def app(msg, ctx):
        if msg.metadata.message_type == codec.DESCRIBE_TYPE and not answered.get(ctx.node_id):
            answered[ctx.node_id] = 1
            return Message(RecordDict({"junk": ConfigRecord({"x": 1})}), reply_to=msg)
        return fast_client_app(msg, ctx)

    grid = FakeGrid(app, {}, configs, clock=clock)
    driver = driver_on(grid, clock)
    driver._wait_for_nodes()
    assert sorted(driver.client_node) == [0, 1, 2, 3]  # every node described on its second query


def test_node_joining_while_a_failed_dispatch_is_queued_announces_the_client():
    """Client 3 has no node when the policy dispatches to it: the dispatch fails at the next tick
    (TaskFailed queued). A node for partition 3 joins in the same tick. Before: the driver saw the
    client still online for the policy and sent no ClientIdle; the queued TaskFailed then made the
    policy believe client 3 offline for ever, though its node was healthy."""
    clock = VirtualClock()
    configs = [{"partition-id": c, "num-partitions": NUM_CLIENTS} for c in range(3)]
    grid = FakeGrid(fast_client_app, {}, configs, clock=clock)
    driver = driver_on(grid, clock, "fedasync")
    driver._wait_for_nodes()
    driver.started = True
    driver._deliver(Start(0.0))  # tasks for clients 0-2 leave; client 3's fails at the next tick
    assert [type(e) for e in driver.queue] == [TaskFailed] and driver.queue[0].client == 3
    grid.add_node(7777, {"partition-id": 3, "num-partitions": NUM_CLIENTS})
    driver._discover(force=True)  # describes the new node...
    driver._pull()  # ...and binds it to client 3 in the same tick
    assert [type(e) for e in driver.queue] == [TaskFailed, ClientIdle]
    driver._tick()
    assert 3 in driver.policy.online and 3 in driver.busy  # client 3 got a new task on its new node


def started_driver(case: str = "fedasync") -> tuple[FakeGrid, FlowerDriver]:
    clock = VirtualClock()
    configs = [{"partition-id": c, "num-partitions": NUM_CLIENTS} for c in range(NUM_CLIENTS)]
    grid = FakeGrid(fast_client_app, {}, configs, clock=clock)  # nodes 1000, 1017, 1034, 1051
    driver = driver_on(grid, clock, case)
    driver._wait_for_nodes()
    driver.started = True
    driver._deliver(Start(0.0))
    return grid, driver


def test_node_leaving_and_returning_with_its_id_is_used_again():
    """Client 1's node 1017 drops out of the listing mid-task (its task fails) and is listed again
    under the same id (a SuperNode that missed heartbeats). Before: the driver kept it as gone
    for ever, so client 1 never trained again although its node was back."""
    grid, driver = started_driver()
    grid.remove_node(1017)
    driver._discover(force=True)
    assert 1 not in driver.policy.online and 1 not in driver.client_node
    grid.add_node(1017, {"partition-id": 1, "num-partitions": NUM_CLIENTS})
    driver._discover(force=True)  # described as a new node...
    driver._pull()  # ...bound to client 1 again, which is announced back
    assert driver.client_node.get(1) == 1017 and [type(e) for e in driver.queue] == [ClientIdle]
    sent = driver.bytes_down[1]
    driver._tick()
    assert 1 in driver.policy.online and driver.bytes_down[1] > sent  # a new task went to node 1017


def test_node_replaced_by_a_twin_is_asked_again_when_the_twin_leaves():
    """A second node (7777) claims the partition of a client without a task and replaces its node,
    which stays listed; then 7777 leaves. Before: the replaced node, healthy, was never asked
    again, and the client stayed without a node for the rest of the run."""
    grid, driver = started_driver("fedavg")  # a cohort of 3 of the 4 clients
    (c,) = [c for c in range(NUM_CLIENTS) if c not in driver.busy]
    grid.replies.clear()  # the cohort's replies are slow: the round stays open, client c idle
    old = driver.client_node[c]
    grid.add_node(7777, {"partition-id": c, "num-partitions": NUM_CLIENTS})
    driver._discover(force=True)
    driver._pull()
    assert driver.client_node[c] == 7777
    grid.remove_node(7777)
    driver._discover(force=True)
    assert c not in driver.client_node
    driver._probe()  # the replaced node is asked again at once...
    driver._pull()
    assert driver.client_node.get(c) == old and driver._usable_node(c) is not None  # ...and takes the client back


class SlowDescribeGrid(FakeGrid):
    """A :class:`FakeGrid` whose ``slow`` nodes answer every describe query after ``delay`` seconds."""

    def __init__(self, *args, slow: set[int], delay: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.slow, self.delay = slow, delay

    def push_messages(self, messages):
        messages = list(messages)
        ids = list(super().push_messages(messages))
        for msg, mid in zip(messages, ids):
            if msg.metadata.message_type == codec.DESCRIBE_TYPE and msg.metadata.dst_node_id in self.slow:
                self.ready_at[mid] = self.clock() + self.delay
        return ids


def started_without_client_3() -> tuple[VirtualClock, SlowDescribeGrid, FlowerDriver]:
    """A started FedAsync driver whose client 3 has no node yet; its node, when added as 7777,
    answers every describe query 2 x hello-timeout after it was sent."""
    clock = VirtualClock()
    configs = [{"partition-id": c, "num-partitions": NUM_CLIENTS} for c in range(NUM_CLIENTS - 1)]
    grid = SlowDescribeGrid(fast_client_app, {}, configs, clock=clock, slow={7777}, delay=2 * SETTINGS.hello_timeout)
    driver = driver_on(grid, clock, "fedasync")
    driver._wait_for_nodes()
    driver.started = True
    driver._deliver(Start(0.0))
    return clock, grid, driver


def test_node_answering_every_describe_query_after_the_timeout_is_bound():
    """flower seeds 3601, 3682 and 9061 of the fuzz run: client 3's node (7777) joins after Start
    and answers each describe query 2 x hello-timeout after it was sent. Before: a query past the
    timeout was dropped from the pending messages, so its answer was never pulled; the node was
    asked again, answered late again, and client 3 stayed without a node for the whole run
    although its node was listed and answering. Now the first query expires unanswered, the
    second lives twice as long, and its answer binds the node."""
    clock, grid, driver = started_without_client_3()
    driver._deliver(driver.queue.popleft())  # client 3 has no node: its task failed as offline
    assert 3 not in driver.policy.online
    grid.add_node(7777, {"partition-id": 3, "num-partitions": NUM_CLIENTS})
    asked, end = [], clock.t + 5 * SETTINGS.hello_timeout
    while clock.t < end and 3 not in driver.client_node:
        driver._discover(force=False)
        driver._probe()
        asked = [m for m in grid.pushed if m.metadata.message_type == codec.DESCRIBE_TYPE
                 and m.metadata.dst_node_id == 7777]
        clock.t += SETTINGS.poll_interval
        driver._pull()
        driver._expire()
    assert len(asked) == 2  # the first query expired, the second (living 2 x hello-timeout) was answered
    assert [m.metadata.ttl for m in asked] == [SETTINGS.hello_timeout, 2 * SETTINGS.hello_timeout]
    assert driver.client_node.get(3) == 7777 and driver._usable_node(3) is not None
    assert [(type(e), e.client) for e in driver.queue] == [(ClientIdle, 3)]
    assert driver.nodes[7777].describe_wait == 0.0  # it answered: its next query lives hello-timeout again


class QueueingGrid(FakeGrid):
    """A :class:`FakeGrid` whose ``slow`` nodes handle their messages one at a time, as a
    SuperNode does: the first takes ``cold`` seconds (a ClientApp's cold start), each later one
    ``warm``. A message whose TTL has passed when its node reaches it is not handed out, and a
    reply finished after the TTL is refused, as by the SuperLink."""

    def __init__(self, *args, slow: set[int], cold: float, warm: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.slow, self.cold, self.warm = slow, cold, warm
        self.free_at: dict[int, float] = {}
        self.answered: list[tuple[float, float]] = []  # (sent, answered) of the replies that made it

    def push_messages(self, messages):
        messages = list(messages)
        ids = list(super().push_messages(messages))
        for msg, mid in zip(messages, ids):
            dst = msg.metadata.dst_node_id
            if dst not in self.slow:
                continue
            sent, dies = self.clock(), self.clock() + msg.metadata.ttl
            start = max(self.free_at.get(dst, sent), sent)
            if start >= dies:  # expired in the queue: never handed to the node
                self.replies.pop(mid)
                continue
            done = start + (self.warm if dst in self.free_at else self.cold)
            self.free_at[dst] = done
            if done > dies:  # the node answered after the message's TTL: the SuperLink refuses it
                self.replies.pop(mid)
            else:
                self.ready_at[mid] = done
                self.answered.append((sent, done))
        return ids


def test_node_with_a_slow_cold_start_is_described_with_one_query_alive_at_a_time():
    """On a loaded machine a node's ClientApp took longer than a describe query lives to answer
    its first message, and each later one took most of hello-timeout. Before: the driver sent a
    new query every hello-timeout + probe-interval while the first still lived; the SuperNode
    handled them in turn, each behind the last, so every reply came after its message's TTL and
    the node was never bound. Now a query goes out only when the last one has expired, and lives
    twice as long as that one: the node is bound by its second or third."""
    clock, _, driver = started_without_client_3()
    hello = SETTINGS.hello_timeout
    configs = [{"partition-id": c, "num-partitions": NUM_CLIENTS} for c in range(NUM_CLIENTS - 1)]
    grid = QueueingGrid(fast_client_app, {}, configs, clock=clock, slow={7777}, cold=3.5 * hello, warm=0.9 * hello)
    driver.grid = grid
    grid.add_node(7777, {"partition-id": 3, "num-partitions": NUM_CLIENTS})
    end = clock.t + 20 * hello
    while clock.t < end and 3 not in driver.client_node:
        driver._discover(force=False)
        driver._probe()
        alive = [p for p in driver.pending.values() if p.kind == "describe" and p.node_id == 7777]
        assert len(alive) <= 1  # never a second query queued behind the first
        clock.t += SETTINGS.poll_interval
        driver._pull()
        driver._expire()
    asked = [m for m in grid.pushed if m.metadata.message_type == codec.DESCRIBE_TYPE
             and m.metadata.dst_node_id == 7777]
    assert driver.client_node.get(3) == 7777 and driver._usable_node(3) is not None
    assert len(asked) == 3 and [m.metadata.ttl for m in asked] == [hello, 2 * hello, 4 * hello]
    assert len(grid.answered) == 1  # the first two replies came after their TTL


def test_describe_answer_to_a_query_sent_before_a_task_failed_does_not_clear_the_suspicion():
    """With late describe answers accepted, an answer can outlive a later failure: client 0's node
    answers a query sent before its task timed out. That answer says nothing about the node after
    the failure, so the node stays suspect until a query sent after it is answered."""
    grid, driver = started_driver("fedasync")
    node = driver.nodes[driver.client_node[0]]
    grid.replies.clear()  # the tasks in flight are never answered
    node.suspect, node.next_probe = True, driver._clock()  # as after an earlier failure: a query goes out...
    driver._probe()
    (query,) = [m for m, p in driver.pending.items() if p.kind == "describe"]
    mid = driver.busy[0]
    entry = driver.pending.pop(mid)
    driver._task_failed(entry, "timeout")  # ...then the node's task fails
    driver._pull()  # the answer to the earlier query arrives
    assert query not in driver.pending and node.suspect and driver._usable_node(0) is None
    driver._probe()  # a new query is sent at once, and its answer clears the suspicion
    driver._pull()
    assert not node.suspect and driver._usable_node(0) is not None


def test_idle_stop_waits_for_a_describe_answer_already_on_its_way():
    """flower seed 8764 of the fuzz run: every task had failed, so nothing was in flight; client
    1's node had answered its describe queries with errors and garbage, then answered one 2 s
    after it was sent (past hello-timeout, within its message's life). The idle timeout ran out
    0.4 s before that answer, and the run stopped with client 1 never bound although its node was
    listed and answering. Now a query sent before the timeout ran out defers the stop until it is
    answered (here: the node is bound and announced) or expires; later queries do not defer it."""
    clock, grid, driver = started_without_client_3()
    while driver.queue:
        driver._deliver(driver.queue.popleft())
    for mid in [m for m, p in driver.pending.items() if p.kind == "task"]:  # every task is lost
        driver._task_failed(driver.pending.pop(mid), "timeout")
    driver.queue.clear()
    driver.idle_since = clock.t
    clock.t += SETTINGS.idle_timeout - 0.5
    grid.add_node(7777, {"partition-id": 3, "num-partitions": NUM_CLIENTS})
    driver._discover(force=True)  # the query goes out 0.5 s before the timeout runs out
    clock.t += 0.6
    driver._check_idle()
    assert driver.stopped is None  # the answer is on its way
    clock.t += 2 * SETTINGS.hello_timeout
    driver._pull()
    assert driver.client_node.get(3) == 7777 and [(type(e), e.client) for e in driver.queue] == [(ClientIdle, 3)]
    driver._check_idle()
    assert driver.stopped is None and driver.idle_since is None

    # a query sent after the timeout ran out does not defer the stop
    driver.queue.clear()
    grid.slow.add(8888)
    driver.idle_since = clock.t - SETTINGS.idle_timeout - 0.1
    grid.add_node(8888, {"partition-id": 3, "num-partitions": NUM_CLIENTS})
    del driver.client_node[3]
    driver.nodes[7777].client = None
    driver.nodes[7777].gone = True
    driver._discover(force=True)
    assert any(p.kind == "describe" and p.node_id == 8888 for p in driver.pending.values())
    driver._check_idle()
    assert driver.stopped is not None and driver.stopped.startswith("idle")
