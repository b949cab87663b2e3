"""A Grid whose ``pull_messages`` returns the replies that are complete and never waits for the rest.

Flower 1.41's ``HttpGrid.pull_messages`` hands out a reply as soon as its metadata reached the
SuperLink, which happens when the node *starts* uploading it, and then pulls the reply's
objects with exponential backoff (1, 2, 4, 8, then every 10 s) until the upload is done. The
ServerApp is blocked meanwhile: a slow client's upload holds up every other reply in the same
call, and the replies the server could already handle, and the dispatches they would trigger,
wait; when the upload ends the server notices it up to half the upload's time (and up to 10 s)
late. The real-time driver wants each reply when it lands, like the simulator.

:class:`PromptGrid` wraps a grid. For an ``HttpGrid`` it keeps the replies whose objects are
still arriving and tries their missing objects again at most every ``retry_interval`` seconds,
on the driver's own polling (each attempt is one request to the SuperLink per reply still
uploading); a call returns the replies that are complete now. Any other grid
(the Simulation Engine's, test doubles) is used as it is.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

log = logging.getLogger(__name__)


@dataclass
class _Partial:
    """A reply whose metadata the SuperLink handed out, with the objects pulled so far."""

    proto: Any  # flwr.proto.message_pb2.Message
    object_ids: list[str]
    objects: dict[str, bytes] = field(default_factory=dict)
    next_try: float = 0.0  # monotonic


class PromptGrid(Grid):
    """Delegates to ``base``; ``pull_messages`` does not block on uploads in progress (see module)."""

    def __init__(self, base: Grid, retry_interval: float = 0.5, clock: Callable[[], float] = time.monotonic) -> None:
        self.base = base
        self.retry_interval = retry_interval
        self._clock = clock
        self._partial: dict[str, _Partial] = {}  # by the id of the message replied to

    # ------------------------------------------------------------------ delegation
    def set_run(self, run: Any) -> None:
        self.base.set_run(run)

    @property
    def run(self) -> Any:
        return self.base.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return self.base.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.base.get_node_ids()

    def get_nodes(self) -> Iterable[Any]:
        return self.base.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.base.push_messages(messages)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.base.send_and_receive(messages, timeout=timeout)

    # ------------------------------------------------------------------ pulling
    @property
    def in_progress(self) -> int:
        """Replies handed out by the SuperLink whose upload has not completed yet."""
        return len(self._partial)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """The replies to ``message_ids`` that are complete now (never waits for an upload)."""
        from flwr.superlink.grid.http_grid import HttpGrid

        if not isinstance(self.base, HttpGrid):
            return self.base.pull_messages(message_ids)
        return self._pull_http(self.base, list(message_ids))

    def _pull_http(self, grid: Any, ids: list[str]) -> list[Message]:
        import httpx
        from flwr.proto.runtime_pb2 import PullAppMessagesRequest  # pylint: disable=E0611
        from flwr.supercore.inflatable.inflatable_object import iterate_object_tree

        wanted = set(ids)
        for key in [k for k in self._partial if k not in wanted]:
            del self._partial[key]  # the caller gave up on it (timeout, node gone)
        new = [m for m in ids if m not in self._partial]
        client = grid._runtime_client  # noqa: SLF001 - Flower 1.41's HttpGrid keeps its Runtime API client here
        if new:
            try:
                res = client.PullMessages(PullAppMessagesRequest(message_ids=new))
            except httpx.HTTPStatusError as exc:
                if exc.response.status_code == httpx.codes.REQUEST_ENTITY_TOO_LARGE:
                    log.error("pull_messages: the replies are too large for one HTTP response")
                    return []
                raise
            for proto, tree in zip(res.messages_list, res.message_object_trees, strict=True):
                ids_in_tree = list(dict.fromkeys(t.object_id for t in iterate_object_tree(tree)))
                self._partial[proto.metadata.reply_to_message_id] = _Partial(proto, ids_in_tree)
        return self._complete(grid, client)

    def _complete(self, grid: Any, client: Any) -> list[Message]:
        from flwr.proto.message_pb2 import ConfirmMessageReceivedRequest  # pylint: disable=E0611
        from flwr.supercore.inflatable.inflatable_protobuf_utils import make_pull_object_fn_protobuf
        from flwr.supercore.inflatable.inflatable_utils import (
            ObjectPullError,
            ObjectUnavailableError,
            inflate_object_from_contents,
        )

        run_id = grid.run.run_id
        pull = make_pull_object_fn_protobuf(pull_object_protobuf=client.PullObject, node=grid.node, run_id=run_id)
        out: list[Message] = []
        now = self._clock()
        for key, part in list(self._partial.items()):
            if now < part.next_try:
                continue
            try:
                for oid in part.object_ids:
                    if oid not in part.objects:
                        part.objects[oid] = pull(oid)
            except ObjectUnavailableError:
                part.next_try = now + self.retry_interval  # still uploading
                continue
            except ObjectPullError as exc:
                del self._partial[key]
                out.append(_unavailable(grid, run_id, part.proto.metadata.reply_to_message_id, str(exc)))
                continue
            del self._partial[key]
            msg_id = part.proto.metadata.message_id
            client.ConfirmMessageReceived(
                ConfirmMessageReceivedRequest(node=grid.node, run_id=run_id, message_object_id=msg_id))
            message = inflate_object_from_contents(msg_id, part.objects)
            message.metadata.__dict__["_message_id"] = msg_id  # as HttpGrid does
            out.append(message)
        return out


def _unavailable(grid: Any, run_id: int, reply_to: str, reason: str) -> Message:
    """The error reply ``HttpGrid`` makes for a reply whose objects cannot be pulled."""
    from flwr.app import Metadata
    from flwr.app.error import Error
    from flwr.app.message import make_message
    from flwr.common.constant import ErrorCode
    from flwr.supercore.constant import SYSTEM_MESSAGE_TYPE
    from flwr.supercore.date import now

    metadata = Metadata(run_id=run_id, message_id="", src_node_id=grid.node.node_id, dst_node_id=grid.node.node_id,
                        message_type=SYSTEM_MESSAGE_TYPE, group_id="", ttl=0, reply_to_message_id=reply_to,
                        created_at=now().timestamp())
    return make_message(metadata=metadata, error=Error(code=ErrorCode.MESSAGE_UNAVAILABLE,
                                                       reason=f"Reply message objects are unavailable. {reason}"))
