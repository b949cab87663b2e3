"""PromptGrid: replies that are complete come back at once; one still uploading never blocks the call."""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("flwr", reason="Flower is not installed: pip install 'prfl[flower]' to run the Flower tests")

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.app.message import remove_content_from_message
from flwr.common.serde import message_to_proto
from flwr.proto.message_pb2 import ConfirmMessageReceivedResponse, PullObjectResponse  # pylint: disable=E0611
from flwr.proto.runtime_pb2 import PullAppMessagesResponse  # pylint: disable=E0611
from flwr.superlink.grid.http_grid import HttpGrid
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from prfl.flower.grid import PromptGrid


def _instruction(i: int) -> Message:
    msg = Message(RecordDict({"task": ConfigRecord({"i": i})}), dst_node_id=10 + i, message_type="train")
    msg.metadata.__dict__["_message_id"] = msg.object_id  # as the SuperLink names it
    return msg


def _reply(ins: Message, value: float) -> Message:
    content = RecordDict({"update": ArrayRecord([np.full(1000, value, dtype=np.float32)])})
    msg = Message(content, reply_to=ins)
    msg.metadata.__dict__["_message_id"] = msg.object_id
    return msg


class FakeRuntime:
    """The SuperLink's Runtime API as a ServerApp sees it: a reply is handed out once, as soon as its
    metadata arrived; its objects become available when its upload ends (``finish``)."""

    def __init__(self) -> None:
        self.replies: dict[str, Message] = {}  # instruction id -> reply
        self.delivered: set[str] = set()
        self.uploaded: dict[str, bytes] = {}  # object id -> content, once available
        self.pending_objects: dict[str, dict[str, bytes]] = {}
        self.object_calls = 0
        self.confirmed: list[str] = []

    def start_upload(self, ins: Message, reply: Message) -> None:
        self.replies[ins.metadata.message_id] = reply
        self.pending_objects[reply.metadata.message_id] = {
            oid: obj.deflate() for oid, obj in get_all_nested_objects(reply).items()}

    def finish(self, reply: Message) -> None:
        self.uploaded.update(self.pending_objects.pop(reply.metadata.message_id))

    def PullMessages(self, request: Any) -> PullAppMessagesResponse:  # noqa: N802 - Flower's client API
        msgs, trees = [], []
        for mid in request.message_ids:
            reply = self.replies.get(mid)
            if reply is not None and mid not in self.delivered:
                self.delivered.add(mid)
                msgs.append(message_to_proto(remove_content_from_message(reply)))  # metadata only, as on the wire
                trees.append(get_object_tree(reply))
        return PullAppMessagesResponse(messages_list=msgs, message_object_trees=trees)

    def PullObject(self, request: Any) -> PullObjectResponse:  # noqa: N802
        self.object_calls += 1
        oid = request.object_id
        if oid in self.uploaded:
            return PullObjectResponse(object_found=True, object_available=True, object_content=self.uploaded[oid])
        found = any(oid in objs for objs in self.pending_objects.values())
        return PullObjectResponse(object_found=found, object_available=False)

    def ConfirmMessageReceived(self, request: Any) -> ConfirmMessageReceivedResponse:  # noqa: N802
        self.confirmed.append(request.message_object_id)
        return ConfirmMessageReceivedResponse()


@pytest.fixture
def setup() -> tuple[PromptGrid, FakeRuntime, list[float]]:
    TaskIdentity.run_id = 7  # what Flower sets in a ServerApp process
    TaskIdentity.node_id = 1
    TaskIdentity.task_id = 1
    base = HttpGrid(token="test-token")
    runtime = FakeRuntime()
    base._client = runtime  # type: ignore[assignment]  # noqa: SLF001 - the Runtime API client HttpGrid uses
    base.set_run(Run.create_empty(run_id=7))
    now = [0.0]
    return PromptGrid(base, retry_interval=0.2, clock=lambda: now[0]), runtime, now


def test_a_complete_reply_is_not_held_up_by_one_still_uploading(setup: tuple[PromptGrid, FakeRuntime, list[float]]) -> None:
    grid, runtime, now = setup
    a, b = _instruction(0), _instruction(1)
    ra, rb = _reply(a, 1.0), _reply(b, 2.0)
    runtime.start_upload(a, ra)
    runtime.start_upload(b, rb)
    runtime.finish(rb)
    ids = [a.metadata.message_id, b.metadata.message_id]

    got = list(grid.pull_messages(ids))  # a is still uploading: b comes back, nothing waits
    assert [m.metadata.reply_to_message_id for m in got] == [b.metadata.message_id]
    assert float(got[0].content["update"].to_numpy_ndarrays()[0][0]) == 2.0
    assert grid.in_progress == 1
    calls = runtime.object_calls

    assert list(grid.pull_messages(ids[:1])) == []  # retried only after retry_interval
    assert runtime.object_calls == calls
    now[0] = 0.25
    assert list(grid.pull_messages(ids[:1])) == []  # one attempt per call, no backoff loop
    assert runtime.object_calls == calls + 1

    runtime.finish(ra)
    now[0] = 0.5
    got = list(grid.pull_messages(ids[:1]))
    assert [m.metadata.reply_to_message_id for m in got] == [a.metadata.message_id]
    assert float(got[0].content["update"].to_numpy_ndarrays()[0][0]) == 1.0
    assert got[0].metadata.message_id == ra.metadata.message_id
    assert runtime.confirmed == [rb.metadata.message_id, ra.metadata.message_id]
    assert grid.in_progress == 0


def test_a_reply_no_longer_asked_for_is_dropped(setup: tuple[PromptGrid, FakeRuntime, list[float]]) -> None:
    grid, runtime, _ = setup
    a = _instruction(0)
    runtime.start_upload(a, _reply(a, 1.0))
    assert list(grid.pull_messages([a.metadata.message_id])) == []
    assert grid.in_progress == 1
    assert list(grid.pull_messages([])) == []  # the driver gave up on the task (timeout)
    assert grid.in_progress == 0


def test_a_reply_whose_objects_are_gone_becomes_an_error_reply(setup: tuple[PromptGrid, FakeRuntime, list[float]]) -> None:
    grid, runtime, _ = setup
    a = _instruction(0)
    runtime.start_upload(a, _reply(a, 1.0))
    runtime.pending_objects.clear()  # the push session expired: the SuperLink has no such objects
    (msg,) = grid.pull_messages([a.metadata.message_id])
    assert msg.has_error() and msg.metadata.reply_to_message_id == a.metadata.message_id
    assert "unavailable" in msg.error.reason


def test_other_grids_are_used_as_they_are() -> None:
    class Plain:
        def pull_messages(self, ids: Any) -> list[str]:
            return [f"reply-{i}" for i in ids]

    assert list(PromptGrid(Plain()).pull_messages(["x"])) == ["reply-x"]  # type: ignore[arg-type]
