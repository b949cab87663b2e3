"""Residual pieces over Flower: what the server sends each node, and the node's piece cache.

The server side (:class:`PieceServer`) encodes each piece of a model version once, remembers
which pieces every client holds (like PR-FL's ``held``) and sends a node only the pieces it
lacks. The node side (:class:`NodeCache`) keeps the pieces keyed by :class:`PieceId` (model
version of the split, piece index) in the ClientApp's ``Context.state``, which Flower keeps
on the SuperNode between messages of a run, and rebuilds the sub-model from them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, RecordDict

from prfl.distribution import PackedIndex, Piece, PieceId, Publisher, ResidualSplit, assemble
from prfl.flower.codec import TaskMessage, decode_index, encode_index, from_raw, raw_array
from prfl.policies.base import Policy, TaskSpec

log = logging.getLogger(__name__)


class MissingPieces(RuntimeError):
    """A node was asked to rebuild a sub-model from pieces it does not hold."""


@dataclass(frozen=True)
class PiecePlan:
    """The residual split a task is distributed with and the pieces 0..j it needs."""

    split: ResidualSplit
    needed: tuple[PieceId, ...]


def residual_plan(policy: Policy, spec: TaskSpec) -> PiecePlan | None:
    """The residual pieces ``spec`` needs, or None when its policy sends whole (sub-)models.

    A policy opts in with a method ``residual_split_for(spec) -> (split, needed) | None``.
    PR-FL with ``residual_split`` on is read from the split its last dispatches used (every
    dispatch of one event shares it). The split's mask at the task's level must be the task's
    mask, which is checked here.
    """
    hook = getattr(policy, "residual_split_for", None)
    if callable(hook):
        got = hook(spec)
        if got is None:
            return None
        split, needed = got
        plan = PiecePlan(split, tuple(needed))
    else:
        split = getattr(policy, "_split", None)
        if not isinstance(split, ResidualSplit) or not getattr(getattr(policy, "config", None), "residual_split", False):
            return None
        plan = PiecePlan(split, split.needed(spec.density))
    kept = plan.split.bounds[plan.needed[-1].index]
    expected = plan.split.num_prunable if spec.mask is None else int(spec.mask.sum())
    if kept != expected:
        raise RuntimeError(
            f"task {spec.task_id}: residual pieces 1..{plan.needed[-1].index} of split {plan.split.version} hold "
            f"{kept} weights but the task's mask keeps {expected}; the policy's split and mask disagree"
        )
    return plan


class PieceServer:
    """Server side of the residual split: encoded pieces of the current split, and who holds what."""

    def __init__(self, num_clients: int) -> None:
        self.held: list[set[PieceId]] = [set() for _ in range(num_clients)]
        self.publisher = Publisher()
        self._encoded: dict[PieceId, dict[str, bytes]] = {}
        self._split_version: int | None = None

    def forget(self, client: int) -> None:
        """The node of ``client`` may have lost its cache (restart, failure): send everything next time."""
        self.held[client] = set()

    def arrays_for(self, plan: PiecePlan, weights: torch.Tensor, client: int) -> tuple[dict[str, Array], list[PieceId], int]:
        """Arrays of the pieces ``client`` lacks, their ids, and the bytes newly published."""
        split = plan.split
        if split.version != self._split_version:
            self._encoded = {}
            self._split_version = split.version
            self.publisher.forget_versions_before(split.version)
        missing = [p for p in plan.needed if p not in self.held[client]]
        arrays: dict[str, Array] = {}
        for p in missing:
            enc = self._encoded.get(p)
            if enc is None:
                enc = self._encoded[p] = self._encode(split, weights, p)
            for key, (dtype, n, data) in enc.items():  # fresh Array objects, shared buffers
                arrays[key] = Array(dtype=dtype, shape=(n,), stype="raw", data=data)
        egress = self.publisher.publish(split, missing)
        self.held[client] = set(plan.needed)
        return arrays, missing, egress

    @staticmethod
    def _encode(split: ResidualSplit, weights: torch.Tensor, piece: PieceId) -> dict[str, Any]:
        p = split.extract(weights.to(torch.float32), piece)
        values = raw_array(p.values, "float32")
        out = {f"p{piece.index}.values": (values.dtype, values.shape[0], values.data)}
        if piece.index > 0:
            index = encode_index(PackedIndex.from_positions(p.indices, split.num_prunable))
            out[f"p{piece.index}.index"] = (index.dtype, index.shape[0], index.data)
        return out


class NodeCache:
    """Node side: the residual pieces a node holds, keyed by :class:`PieceId`, kept in Context.state."""

    STATE_KEY = "prfl.pieces"

    def __init__(self) -> None:
        self._pieces: dict[PieceId, Piece] = {}

    def __len__(self) -> int:
        return len(self._pieces)

    def held(self) -> set[PieceId]:
        return set(self._pieces)

    # -- persistence in Context.state
    @classmethod
    def load(cls, state: RecordDict) -> NodeCache:
        cache = cls()
        rec = state.get(cls.STATE_KEY)
        if isinstance(rec, ArrayRecord):
            for key, arr in rec.items():
                if not key.endswith("/idx"):
                    continue
                v, j = (int(x) for x in key[: -len("/idx")].split("/"))
                pid = PieceId(v, j)
                idx = torch.from_numpy(arr.numpy().astype(np.int64))
                val = torch.from_numpy(rec[f"{v}/{j}/val"].numpy().astype(np.float32))
                cache._pieces[pid] = Piece(pid, idx, val)
        return cache

    def save(self, state: RecordDict) -> None:
        arrays: dict[str, Array] = {}
        for pid, piece in sorted(self._pieces.items()):
            arrays[f"{pid.version}/{pid.index}/idx"] = Array(piece.indices.numpy().astype(np.int32))
            arrays[f"{pid.version}/{pid.index}/val"] = Array(piece.values.numpy().astype(np.float32))
        state[self.STATE_KEY] = ArrayRecord(array_dict=arrays)

    # -- use
    def receive(self, task: TaskMessage) -> int:
        """Store the pieces carried by ``task``; drop older versions. Returns pieces stored."""
        old = [p for p in self._pieces if p.version < task.split]
        for p in old:
            del self._pieces[p]
        stored = 0
        for j in task.needed:
            key = f"p{j}.values"
            if key not in task.arrays:
                continue
            values = torch.from_numpy(from_raw(task.arrays[key]).astype(np.float32))
            if j == 0:
                idx = torch.arange(task.num_prunable, task.total, dtype=torch.int64)
            else:
                idx = decode_index(task.arrays[f"p{j}.index"], task.num_prunable)
            self._pieces[PieceId(task.split, j)] = Piece(PieceId(task.split, j), idx, values)
            stored += 1
        return stored

    def rebuild(self, task: TaskMessage) -> tuple[torch.Tensor, torch.Tensor]:
        """``(weights, prunable mask)`` of the task's sub-model from the cached pieces."""
        ids = task.needed_ids
        absent = [str(p) for p in ids if p not in self._pieces]
        if absent:
            raise MissingPieces(f"task {task.task_id}: pieces {', '.join(absent)} are not cached on this node")
        for pid, count in zip(ids, task.counts):
            if self._pieces[pid].indices.numel() != count:
                raise MissingPieces(f"task {task.task_id}: cached piece {pid} has {self._pieces[pid].indices.numel()} weights, expected {count}")
        return assemble((self._pieces[p] for p in ids), task.total, task.num_prunable)
