"""Wire format of prfl tasks and results in Flower messages, with honest byte counts.

Arrays travel as raw little-endian buffers (``stype="raw"``, no header), so the payload bytes
Flower carries are exactly the byte formulas of :mod:`prfl.distribution`:

- a dense task: ``weights``, 4 |W| bytes;
- a sparse sub-model (a mask, no residual split): ``values`` at the mask (4 c), ``index``
  (1 tag byte + the cheaper of a bitmap, ceil(N / 8), or int32 positions, 4 c) and ``suffix``
  (4 M): ``sparse_model_bytes(c, N, M)``;
- residual pieces: the values of every piece the node lacks for this model version,
  ``p0.values`` (4 M) and ``p{j}.values`` (4 c), and the positions it lacks for this split
  structure, ``p{j}.index`` (min(ceil(N / 8), 4 c) + 1): PR-FL's accounting, in which a node
  keeps piece positions until the ranking or the density levels change.

A result carries the trained values at the task's mask plus the suffix (the server knows the
mask it sent), 4 (c + M) bytes, or all 4 |W| for a dense task; the squared gradients PR-FL
ranks by travel beside them (4 N) and are counted separately.

``payload bytes`` below are the array buffers (what prfl's accounting models); ``record bytes``
are Flower's own ``count_bytes`` of every record in the message (adds key names and the small
config record describing the task).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from prfl.distribution import PackedIndex, PieceId, unpack_bits
from prfl.pruning.ranking import IMPORTANCE_BYTES, importance_for_upload

IMPORTANCE_SCOPES = ("all", "kept")

RAW = "raw"
"""``Array.stype`` of a headerless little-endian buffer."""

TASK = "prfl.task"
PAYLOAD = "prfl.payload"
RESULT = "prfl.result"
UPDATE = "prfl.update"
NODE = "prfl.node"

TRAIN_TYPE = "train"
DESCRIBE_TYPE = "query.describe"
NOTICE_TYPE = "query.notice"  # the server tells a node that its result was rejected
NOTICE = "prfl.notice"

KIND_DENSE = "dense"
KIND_SPARSE = "sparse"
KIND_PIECES = "pieces"

_TAG_POSITIONS = 0
_TAG_BITMAP = 1
_DTYPES = {"float32": "<f4", "int32": "<i4", "uint8": "u1"}


# --------------------------------------------------------------------------- raw arrays
def raw_array(values: torch.Tensor | np.ndarray, dtype: str) -> Array:
    """A 1-D array as a headerless little-endian buffer of ``dtype`` (float32, int32, uint8)."""
    arr = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    data = np.ascontiguousarray(arr.reshape(-1), dtype=_DTYPES[dtype]).tobytes()
    return Array(dtype=dtype, shape=(int(arr.size),), stype=RAW, data=data)


def from_raw(array: Array) -> np.ndarray:
    """Inverse of :func:`raw_array` (a read-only view of the buffer)."""
    if array.stype != RAW or array.dtype not in _DTYPES:
        raise ValueError(f"expected a raw float32/int32/uint8 array, got stype={array.stype!r} dtype={array.dtype!r}")
    return np.frombuffer(array.data, dtype=_DTYPES[array.dtype])


def importance_array(grad_sq: torch.Tensor, dtype: str) -> Array:
    """Importance scores for the wire: raw float32, or bfloat16 as the upper 16 bits of each float32."""
    if dtype == "float32":
        return raw_array(grad_sq, "float32")
    bits = importance_for_upload(grad_sq, dtype).view(torch.int32).numpy().view(np.uint32) >> 16
    data = np.ascontiguousarray(bits.astype("<u2")).tobytes()
    return Array(dtype="bfloat16", shape=(int(grad_sq.numel()),), stype=RAW, data=data)


def importance_values(array: Array) -> np.ndarray:
    """Inverse of :func:`importance_array`, as float32."""
    if array.stype == RAW and array.dtype == "bfloat16":
        if len(array.data) % 2:
            raise ValueError(f"a bfloat16 array needs an even number of bytes, got {len(array.data)}")
        high = np.frombuffer(array.data, dtype="<u2").astype(np.uint32) << 16
        return high.view(np.float32)
    if array.dtype != "float32":
        raise ValueError(f"importance scores must be float32 or bfloat16, got {array.dtype!r}")
    return from_raw(array).astype(np.float32)


def encode_index(index: PackedIndex) -> Array:
    """A packed index as one uint8 buffer: the 1-byte tag, then the bitmap or int32 positions."""
    tag = np.array([_TAG_BITMAP if index.is_bitmap else _TAG_POSITIONS], dtype=np.uint8)
    body = index.data.numpy()
    body_bytes = body.astype(np.uint8).tobytes() if index.is_bitmap else body.astype("<i4").tobytes()
    data = tag.tobytes() + body_bytes
    return Array(dtype="uint8", shape=(len(data),), stype=RAW, data=data)


def decode_index(array: Array, size: int) -> torch.Tensor:
    """Positions (ascending, int64) of an index made by :func:`encode_index` over ``size`` items."""
    buf = from_raw(array)
    if buf.size < 1:
        raise ValueError("an index needs at least its tag byte")
    tag, body = int(buf[0]), buf[1:]
    if tag == _TAG_BITMAP:
        return unpack_bits(torch.from_numpy(body.copy()), size).nonzero().view(-1)
    if tag == _TAG_POSITIONS:
        if body.size % 4:
            raise ValueError(f"a position list needs a multiple of 4 bytes, got {body.size}")
        pos = torch.from_numpy(body.view("<i4").astype(np.int64))
        if pos.numel() and (int(pos.min()) < 0 or int(pos.max()) >= size):
            raise ValueError(f"positions outside [0, {size})")
        return pos
    raise ValueError(f"unknown index tag {tag}")


def payload_bytes(record: ArrayRecord) -> int:
    """Bytes of the array buffers of ``record`` (what prfl's byte accounting models)."""
    return sum(len(a.data) for a in record.values())


def record_bytes(content: RecordDict) -> int:
    """Flower's byte count of every array, config and metric record in ``content``."""
    total = 0
    for rec in content.values():
        total += rec.count_bytes()
    return total


# --------------------------------------------------------------------------- tasks
@dataclass
class TaskMessage:
    """A decoded task: what a node must train, and from what."""

    task_id: int
    client: int
    num_clients: int
    version: int
    density: float
    width: float
    want_importance: bool
    seed: int
    kind: str
    total: int
    num_prunable: int
    importance_dtype: str = "float32"  # precision of the importance scores in the result
    importance_scope: str = "all"  # "kept": scores of the kept weights only, in mask order
    split: int = -1
    structure: int = -1  # the split's structure (ranking and levels): piece positions are keyed by it
    needed: tuple[int, ...] = ()  # piece indices 0..j of split ``split`` (kind == pieces)
    counts: tuple[int, ...] = ()  # weights per needed piece, for validation
    arrays: dict[str, Array] = field(default_factory=dict)

    @property
    def needed_ids(self) -> list[PieceId]:
        return [PieceId(self.split, j) for j in self.needed]


def encode_task(
    *,
    task_id: int,
    client: int,
    num_clients: int,
    version: int,
    density: float,
    width: float,
    want_importance: bool,
    seed: int,
    kind: str,
    total: int,
    num_prunable: int,
    arrays: dict[str, Array],
    importance_dtype: str = "float32",
    importance_scope: str = "all",
    split: int = -1,
    structure: int = -1,
    needed: tuple[int, ...] = (),
    counts: tuple[int, ...] = (),
) -> RecordDict:
    """The content of a train message."""
    cfg: dict[str, Any] = {
        "task-id": int(task_id),
        "client": int(client),
        "num-clients": int(num_clients),
        "version": int(version),
        "density": float(density),
        "width": float(width),
        "want-importance": bool(want_importance),
        "importance-dtype": str(importance_dtype),
        "importance-scope": str(importance_scope),
        "seed": int(seed),
        "kind": kind,
        "total": int(total),
        "num-prunable": int(num_prunable),
        "split": int(split),
        "structure": int(structure),
    }
    if needed:
        cfg["needed"] = [int(j) for j in needed]
        cfg["counts"] = [int(c) for c in counts]
    return RecordDict({TASK: ConfigRecord(cfg), PAYLOAD: ArrayRecord(array_dict=dict(arrays))})


def decode_task(content: RecordDict) -> TaskMessage:
    """Inverse of :func:`encode_task`."""
    if TASK not in content or PAYLOAD not in content:
        raise ValueError(f"a prfl train message needs records {TASK!r} and {PAYLOAD!r}, got {sorted(content)}")
    c = content[TASK]
    kind = str(c["kind"])
    if kind not in (KIND_DENSE, KIND_SPARSE, KIND_PIECES):
        raise ValueError(f"unknown task kind {kind!r}")
    imp_dtype = str(c["importance-dtype"]) if "importance-dtype" in c else "float32"
    if imp_dtype not in IMPORTANCE_BYTES:
        raise ValueError(f"unknown importance dtype {imp_dtype!r}: expected one of {sorted(IMPORTANCE_BYTES)}")
    imp_scope = str(c["importance-scope"]) if "importance-scope" in c else "all"
    if imp_scope not in IMPORTANCE_SCOPES:
        raise ValueError(f"unknown importance scope {imp_scope!r}: expected one of {list(IMPORTANCE_SCOPES)}")
    return TaskMessage(
        task_id=int(c["task-id"]),
        client=int(c["client"]),
        num_clients=int(c["num-clients"]),
        version=int(c["version"]),
        density=float(c["density"]),
        width=float(c["width"]),
        want_importance=bool(c["want-importance"]),
        importance_dtype=imp_dtype,
        importance_scope=imp_scope,
        seed=int(c["seed"]),
        kind=kind,
        total=int(c["total"]),
        num_prunable=int(c["num-prunable"]),
        split=int(c["split"]),
        structure=int(c["structure"]),
        needed=tuple(int(j) for j in c.get("needed", [])),
        counts=tuple(int(n) for n in c.get("counts", [])),
        arrays=dict(content[PAYLOAD].items()),
    )


def sparse_arrays(weights: torch.Tensor, mask: torch.Tensor, num_prunable: int) -> dict[str, Array]:
    """A sub-model as one message: values at the mask, their index and the dense suffix."""
    pos = mask.nonzero().view(-1)
    return {
        "values": raw_array(weights[pos], "float32"),
        "index": encode_index(PackedIndex.from_mask(mask)),
        "suffix": raw_array(weights[num_prunable:], "float32"),
    }


def decode_sparse(arrays: dict[str, Array], total: int, num_prunable: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weights, mask)`` of a sub-model sent by :func:`sparse_arrays` (zeros outside the mask)."""
    pos = decode_index(arrays["index"], num_prunable)
    values = torch.from_numpy(from_raw(arrays["values"]).astype(np.float32))
    suffix = torch.from_numpy(from_raw(arrays["suffix"]).astype(np.float32))
    if values.numel() != pos.numel() or suffix.numel() != total - num_prunable:
        raise ValueError(
            f"sparse task: {values.numel()} values for {pos.numel()} positions and {suffix.numel()} suffix "
            f"values for {total - num_prunable} non-prunable weights"
        )
    weights = torch.zeros(total, dtype=torch.float32)
    weights[pos] = values
    weights[num_prunable:] = suffix
    mask = torch.zeros(num_prunable, dtype=torch.bool)
    mask[pos] = True
    return weights, mask


# --------------------------------------------------------------------------- results
@dataclass
class ResultMessage:
    """A decoded result."""

    task_id: int
    client: int
    version: int
    num_samples: int
    mean_loss: float
    steps: int
    compute_seconds: float
    delay_seconds: float
    received_payload_bytes: int
    received_record_bytes: int
    partition_id: int
    update_payload_bytes: int
    importance_bytes: int
    arrays: dict[str, Array]
    arrived_at: float = float("nan")  # node's wall clock (s since the epoch): the train message reached the app
    trained_at: float = float("nan")  # node's wall clock: training (and any artificial delay) ended


def encode_result(
    *,
    task: TaskMessage,
    weights: torch.Tensor,
    mask: torch.Tensor | None,
    grad_sq: torch.Tensor | None,
    num_samples: int,
    mean_loss: float,
    steps: int,
    compute_seconds: float,
    delay_seconds: float,
    received_payload_bytes: int,
    received_record_bytes: int,
    partition_id: int,
    arrived_at: float = float("nan"),
    trained_at: float = float("nan"),
) -> RecordDict:
    """The content of a result: values at the mask plus the suffix (all weights when dense).

    ``arrived_at`` and ``trained_at`` are the node's wall-clock stamps (``time.time()``, seconds
    since the epoch) of the train message reaching the ClientApp and of training ending; with
    the server's stamps of dispatch and reply receipt they split a task into download, compute
    and upload."""
    if mask is None:
        arrays = {"weights": raw_array(weights, "float32")}
    else:
        pos = mask.nonzero().view(-1)
        arrays = {"values": raw_array(torch.cat([weights[pos], weights[task.num_prunable:]]), "float32")}
    update = payload_bytes(ArrayRecord(array_dict=dict(arrays)))
    importance = 0
    if grad_sq is not None:
        if task.importance_scope == "kept" and mask is not None:
            grad_sq = grad_sq[mask.nonzero().view(-1)]  # the server knows the mask: values only
        arrays["grad_sq"] = importance_array(grad_sq, task.importance_dtype)
        importance = len(arrays["grad_sq"].data)
    cfg = ConfigRecord(
        {
            "task-id": task.task_id,
            "client": task.client,
            "version": task.version,
            "num-samples": int(num_samples),
            "mean-loss": float(mean_loss),
            "steps": int(steps),
            "compute-seconds": float(compute_seconds),
            "delay-seconds": float(delay_seconds),
            "received-payload-bytes": int(received_payload_bytes),
            "received-record-bytes": int(received_record_bytes),
            "partition-id": int(partition_id),
            "update-payload-bytes": int(update),
            "importance-bytes": int(importance),
            "arrived-at": float(arrived_at),
            "trained-at": float(trained_at),
        }
    )
    return RecordDict({RESULT: cfg, UPDATE: ArrayRecord(array_dict=arrays)})


class MalformedResult(ValueError):
    """A result message that cannot be decoded; the message says what is wrong with it."""


def decode_result(content: RecordDict) -> ResultMessage:
    """Inverse of :func:`encode_result` (weights are rebuilt by :func:`result_weights`).

    Anything a node could send that is not a well-formed result raises :class:`MalformedResult`.
    """
    try:
        return _decode_result(content)
    except MalformedResult:
        raise
    except KeyError as exc:
        raise MalformedResult(f"result lacks the field {exc.args[0]!r}") from None
    except (TypeError, ValueError, OverflowError, AttributeError) as exc:
        raise MalformedResult(f"result has a field of the wrong type ({exc})") from None


def _decode_result(content: RecordDict) -> ResultMessage:
    if RESULT not in content or UPDATE not in content:
        raise MalformedResult(f"a prfl result needs records {RESULT!r} and {UPDATE!r}, got {sorted(content)}")
    c = content[RESULT]
    if not isinstance(c, ConfigRecord) or not isinstance(content[UPDATE], ArrayRecord):
        raise MalformedResult(f"record {RESULT!r} must be a ConfigRecord and {UPDATE!r} an ArrayRecord")
    return ResultMessage(
        task_id=int(c["task-id"]),
        client=int(c["client"]),
        version=int(c["version"]),
        num_samples=int(c["num-samples"]),
        mean_loss=float(c["mean-loss"]),
        steps=int(c["steps"]),
        compute_seconds=float(c["compute-seconds"]),
        delay_seconds=float(c["delay-seconds"]),
        received_payload_bytes=int(c["received-payload-bytes"]),
        received_record_bytes=int(c["received-record-bytes"]),
        partition_id=int(c["partition-id"]),
        update_payload_bytes=int(c["update-payload-bytes"]),
        importance_bytes=int(c["importance-bytes"]),
        arrays=dict(content[UPDATE].items()),
        arrived_at=float(c.get("arrived-at", float("nan"))),
        trained_at=float(c.get("trained-at", float("nan"))),
    )


def _float32(msg: ResultMessage, name: str) -> np.ndarray:
    array = msg.arrays[name]
    if array.dtype != "float32":
        raise ValueError(f"result of task {msg.task_id}: {name!r} must be float32, got {array.dtype!r}")
    return from_raw(array)


def result_weights(
    msg: ResultMessage, mask: torch.Tensor | None, total: int, num_prunable: int, importance_scope: str = "all"
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(weights, grad_sq)`` of a result, given the mask its task was sent with (and whether its
    importance scores cover the kept weights only, in mask order, or every prunable weight)."""
    if mask is None:
        if "weights" not in msg.arrays:
            raise ValueError(f"result of task {msg.task_id}: a dense task must return 'weights'")
        weights = torch.from_numpy(_float32(msg, "weights").astype(np.float32))
        if weights.numel() != total:
            raise ValueError(f"result of task {msg.task_id} has {weights.numel()} weights, expected {total}")
    else:
        if "values" not in msg.arrays:
            raise ValueError(f"result of task {msg.task_id}: a masked task must return 'values'")
        values = torch.from_numpy(_float32(msg, "values").astype(np.float32))
        pos = mask.nonzero().view(-1)
        if values.numel() != pos.numel() + total - num_prunable:
            raise ValueError(
                f"result of task {msg.task_id} has {values.numel()} values, expected "
                f"{pos.numel()} at the mask + {total - num_prunable} suffix"
            )
        weights = torch.zeros(total, dtype=torch.float32)
        weights[pos] = values[: pos.numel()]
        weights[num_prunable:] = values[pos.numel():]
    grad_sq = None
    if "grad_sq" in msg.arrays:
        grad_sq = torch.from_numpy(importance_values(msg.arrays["grad_sq"]))
        if importance_scope == "kept" and mask is not None:
            pos = mask.nonzero().view(-1)
            if grad_sq.numel() != pos.numel():
                raise ValueError(f"result of task {msg.task_id} has {grad_sq.numel()} importance values, expected "
                                 f"{pos.numel()} (one per kept weight)")
            full = torch.zeros(num_prunable, dtype=torch.float32)
            full[pos] = grad_sq
            grad_sq = full
        elif grad_sq.numel() != num_prunable:
            raise ValueError(f"result of task {msg.task_id} has {grad_sq.numel()} importance values, expected {num_prunable}")
    return weights, grad_sq


# --------------------------------------------------------------------------- node description
def encode_node(partition_id: int, num_partitions: int, delay_seconds: float, cached_pieces: int) -> RecordDict:
    """A node's answer to the describe query (-1: not set in its node config)."""
    return RecordDict(
        {
            NODE: ConfigRecord(
                {
                    "partition-id": int(partition_id),
                    "num-partitions": int(num_partitions),
                    "delay-seconds": float(delay_seconds),
                    "cached-pieces": int(cached_pieces),
                }
            )
        }
    )


def decode_node(content: RecordDict) -> dict[str, Any]:
    """Inverse of :func:`encode_node`; anything else raises ValueError saying what is wrong."""
    if NODE not in content:
        raise ValueError(f"a describe reply needs record {NODE!r}, got {sorted(content)}")
    c = content[NODE]
    try:
        return {
            "partition_id": int(c["partition-id"]),
            "num_partitions": int(c["num-partitions"]),
            "delay_seconds": float(c["delay-seconds"]),
            "cached_pieces": int(c["cached-pieces"]),
        }
    except KeyError as exc:
        raise ValueError(f"a describe reply lacks the field {exc.args[0]!r}") from None
    except (TypeError, ValueError, OverflowError, AttributeError) as exc:
        raise ValueError(f"a describe reply has a field of the wrong type ({exc})") from None


# --------------------------------------------------------------------------- notices
def encode_notice(task_id: int, client: int, check: str, reason: str) -> RecordDict:
    """The server's notice that the result of ``task_id`` was rejected, and why."""
    return RecordDict({NOTICE: ConfigRecord({"task-id": int(task_id), "client": int(client), "check": str(check),
                                             "reason": str(reason)})})


def decode_notice(content: RecordDict) -> dict[str, Any]:
    """Inverse of :func:`encode_notice`."""
    if NOTICE not in content:
        raise ValueError(f"a notice needs record {NOTICE!r}, got {sorted(content)}")
    c = content[NOTICE]
    return {"task_id": int(c["task-id"]), "client": int(c["client"]), "check": str(c["check"]), "reason": str(c["reason"])}
