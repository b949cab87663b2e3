"""Residual pieces over Flower: what the server sends each node, and the node's piece cache.

The server side (:class:`PieceServer`) encodes each piece of a model version once, records
what every client holds in a :class:`~prfl.distribution.PieceLedger` (the record PR-FL's byte
accounting keeps) and sends a node only what it lacks. The node side (:class:`NodeCache`) keeps piece values keyed by :class:`PieceId`
(model version of the split, piece index) and piece positions keyed by (split structure,
piece index) in the ClientApp's ``Context.state``, which Flower keeps on the SuperNode between
the messages of a run, and rebuilds the sub-model from them.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, RecordDict

from prfl.distribution import PackedIndex, Piece, PieceId, PieceLedger, ResidualPlan, ResidualSplit, assemble
from prfl.flower.codec import TaskMessage, decode_index, encode_index, from_raw, raw_array
from prfl.policies.base import Policy, TaskSpec

log = logging.getLogger(__name__)


class MissingPieces(RuntimeError):
    """A node was asked to rebuild a sub-model from pieces it does not hold."""


PiecePlan = ResidualPlan  # the name this module used before the plan moved to prfl.distribution


def residual_plan(policy: Policy, spec: TaskSpec) -> ResidualPlan | None:
    """The residual pieces ``spec`` needs (:meth:`Policy.residual_plan`), or None when its
    policy sends whole (sub-)models. The split's mask at the task's level must be the task's
    mask, which is checked here."""
    plan = policy.residual_plan(spec)
    if plan is None:
        return None
    kept = plan.kept
    expected = plan.split.num_prunable if spec.mask is None else int(torch.count_nonzero(spec.mask))
    if kept != expected:
        raise RuntimeError(
            f"task {spec.task_id}: residual pieces 1..{plan.needed[-1].index} of split {plan.split.version} hold "
            f"{kept} weights but the task's mask keeps {expected}; the policy's split and mask disagree"
        )
    return plan


class PieceServer:
    """Server side of the residual split: the arrays each client still needs, encoded once.

    Which pieces a client holds is a :class:`~prfl.distribution.PieceLedger`, the record PR-FL's
    byte accounting keeps too, so the server sends what the accounting charges: the values of
    the pieces a client lacks for this model version and the positions it lacks for this split
    structure (piece 0, the dense suffix, has no positions to send). A piece's values are
    encoded once per version, its positions once per structure.
    """

    def __init__(self, num_clients: int) -> None:
        self.ledger = PieceLedger(num_clients)
        self._ranking: object | None = None  # the ranking of the structure in use (kept alive: its id is in the key)
        self._version: int | None = None
        self._values: dict[PieceId, bytes] = {}  # encoded values of the current version
        self._index: dict[int, bytes] = {}  # encoded positions of the current structure

    @property
    def structure(self) -> int:
        """The split structure the positions sent belong to (a node keys its cached positions by it)."""
        return self.ledger.structure

    def forget(self, client: int) -> None:
        """The node of ``client`` may have lost its cache (restart, failure): send everything next time."""
        self.ledger.forget(client)

    def _sync(self, split: ResidualSplit) -> None:
        if self.ledger.use_structure((id(split.ranking), split.levels)):
            self._ranking = split.ranking
            self._index = {}
        if split.version != self._version:
            self._version = split.version
            self._values = {}
            self.ledger.use_version(split.version)

    def arrays_for(self, plan: ResidualPlan, weights: torch.Tensor, client: int) -> tuple[dict[str, Array], list[str], int]:
        """Arrays ``client`` still needs for ``plan``, their labels, and the bytes newly published."""
        split = plan.split
        self._sync(split)
        lack_values, lack_index = self.ledger.missing(client, plan.needed)
        new_values, new_index = self.ledger.unpublished(plan.needed)
        arrays: dict[str, Array] = {}
        sent: list[str] = []
        egress = 0
        for p in plan.needed:
            j = p.index
            if p in lack_values:
                data = self._values.get(p)
                if data is None:
                    vals = split.extract(weights.to(torch.float32), p).values
                    data = self._values[p] = raw_array(vals, "float32").data
                arrays[f"p{j}.values"] = Array(dtype="float32", shape=(len(data) // 4,), stype="raw", data=data)
                sent.append(str(p))
                if p in new_values:
                    egress += len(data)
            if j > 0 and p in lack_index:
                data = self._index.get(j)
                if data is None:
                    pos = split.indices(p)
                    data = self._index[j] = encode_index(PackedIndex.from_positions(pos, split.num_prunable)).data
                arrays[f"p{j}.index"] = Array(dtype="uint8", shape=(len(data),), stype="raw", data=data)
                sent.append(f"s{self.structure}/p{j}.index")
                if p in new_index:
                    egress += len(data)
        self.ledger.deliver(client, split, plan.needed)
        return arrays, sent, egress


class NodeCache:
    """Node side: piece values keyed by (model version, piece) and piece positions keyed by
    (structure, piece), kept in the ClientApp's ``Context.state`` between messages."""

    STATE_KEY = "prfl.pieces"

    def __init__(self) -> None:
        self.values: dict[PieceId, torch.Tensor] = {}
        self.index: dict[tuple[int, int], torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.values)

    # -- persistence in Context.state
    @classmethod
    def load(cls, state: RecordDict) -> NodeCache:
        cache = cls()
        rec = state.get(cls.STATE_KEY)
        if isinstance(rec, ArrayRecord):
            for key, arr in rec.items():
                kind, a, b = key.split("/")
                if kind == "v":
                    cache.values[PieceId(int(a), int(b))] = torch.from_numpy(arr.numpy().astype(np.float32))
                elif kind == "i":
                    cache.index[(int(a), int(b))] = torch.from_numpy(arr.numpy().astype(np.int64))
        return cache

    def save(self, state: RecordDict) -> None:
        arrays: dict[str, Array] = {}
        for pid, vals in sorted(self.values.items()):
            arrays[f"v/{pid.version}/{pid.index}"] = Array(vals.numpy().astype(np.float32))
        for (st, j), pos in sorted(self.index.items()):
            arrays[f"i/{st}/{j}"] = Array(pos.numpy().astype(np.int32))
        state[self.STATE_KEY] = ArrayRecord(array_dict=arrays)

    # -- use
    def receive(self, task: TaskMessage) -> int:
        """Store the values and positions ``task`` carries; drop older versions and structures."""
        for pid in [p for p in self.values if p.version < task.split]:
            del self.values[pid]
        for key in [k for k in self.index if k[0] != task.structure]:
            del self.index[key]
        stored = 0
        for j in task.needed:
            if f"p{j}.values" in task.arrays:
                vals = from_raw(task.arrays[f"p{j}.values"]).astype(np.float32)
                self.values[PieceId(task.split, j)] = torch.from_numpy(vals)
                stored += 1
            if j > 0 and f"p{j}.index" in task.arrays:
                self.index[(task.structure, j)] = decode_index(task.arrays[f"p{j}.index"], task.num_prunable)
        return stored

    def rebuild(self, task: TaskMessage) -> tuple[torch.Tensor, torch.Tensor]:
        """``(weights, prunable mask)`` of the task's sub-model from the cached pieces."""
        pieces = []
        for j, count in zip(task.needed, task.counts):
            pid = PieceId(task.split, j)
            vals = self.values.get(pid)
            if vals is None:
                raise MissingPieces(f"task {task.task_id}: the values of piece {pid} are not cached on this node")
            if j == 0:
                pos = torch.arange(task.num_prunable, task.total, dtype=torch.int64)
            else:
                pos = self.index.get((task.structure, j))
                if pos is None:
                    raise MissingPieces(f"task {task.task_id}: the positions of piece {j} (structure "
                                        f"{task.structure}) are not cached on this node")
            if vals.numel() != count or pos.numel() != count:
                raise MissingPieces(f"task {task.task_id}: piece {pid} has {vals.numel()} values and {pos.numel()} "
                                    f"positions cached, expected {count}")
            pieces.append(Piece(pid, pos, vals))
        return assemble(pieces, task.total, task.num_prunable)
