"""An in-process stand-in for Flower's Grid: nodes run the ClientApp inline, replies queue up."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity


class FakeGrid:
    """``get_node_ids`` / ``push_messages`` / ``pull_messages`` over in-process nodes.

    A message to a live node is handled at once by ``client_app``; its reply is returned by
    ``pull_messages`` once ``latency`` seconds have passed on ``clock``. A message to a node in
    ``dead`` is swallowed (no reply ever).
    """

    def __init__(self, client_app: Any, run_config: dict[str, Any], node_configs: list[dict[str, Any]],
                 latency: float = 0.0, clock: Callable[[], float] = time.monotonic) -> None:
        TaskIdentity.run_id = 1  # what Flower sets in a ServerApp process
        TaskIdentity.node_id = 1
        TaskIdentity.task_id = 1
        self.client_app = client_app
        self.run_config = run_config
        self.contexts: dict[int, Context] = {}
        self.dead: set[int] = set()
        self.latency = latency
        self.clock = clock
        self.replies: dict[str, Message] = {}
        self.ready_at: dict[str, float] = {}
        self.pushed: list[Message] = []
        for i, nc in enumerate(node_configs):
            self.add_node(1000 + 17 * i, nc)

    def add_node(self, node_id: int, node_config: dict[str, Any]) -> None:
        self.contexts[node_id] = Context(run_id=1, node_id=node_id, node_config=dict(node_config),
                                         state=RecordDict(), run_config=dict(self.run_config))

    def remove_node(self, node_id: int) -> None:
        self.contexts.pop(node_id, None)

    def get_node_ids(self) -> Iterable[int]:
        return sorted(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = msg.object_id
            mid = msg.metadata.message_id
            ids.append(mid)
            self.pushed.append(msg)
            dst = msg.metadata.dst_node_id
            if dst in self.dead or dst not in self.contexts:
                continue
            try:
                reply = self.client_app(msg, self.contexts[dst])
            except Exception as exc:  # noqa: BLE001 - Flower turns a ClientApp exception into an error reply
                reply = Message(Error(code=2, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg)
            self.replies[mid] = reply
            self.ready_at[mid] = self.clock() + self.latency
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        now = self.clock()
        ready = [m for m in list(message_ids) if m in self.replies and self.ready_at[m] <= now]
        return [self.replies.pop(m) for m in ready]
