"""Checkpoint files that load without running code: tensors in safetensors, the rest as JSON.

A checkpoint is one file, a valid `safetensors <https://github.com/huggingface/safetensors>`_
file: an 8-byte little-endian header length, a JSON header naming every stored array (dtype,
shape, byte range), then the arrays' bytes. Besides the tensors' arrays it holds two ``U8``
arrays: ``prfl.state``, the state as JSON, and last ``prfl.trailer`` (48 bytes: the magic
``PRFLCKP2``, the length of everything before the trailer, the SHA-256 of it), which detects a
torn or corrupted file. Loading parses JSON and copies bytes into tensors; nothing is unpickled
and no class is built but those of :data:`ALLOWED_TYPES`, so a crafted file cannot run code. A
pickle (the format before this one, or any ``torch.save`` file) is refused with an error that
says what to do.

The state is plain data: None, bool, int, float (inf and nan included), str, list, and with
type tags tuple, set, frozenset, dicts whose keys are not plain strings (``{"$dict": [[k, v],
...]}``), numpy scalars and arrays, torch dtypes, tensors and the dataclasses of
:data:`ALLOWED_TYPES` (``{"$dc": name, "fields": {...}}``, rebuilt through their constructor).
A tensor in the state is ``{"$t": i}``, an index into a table that says how tensor i is stored:

- ``raw``: its elements as they are;
- ``bits``: a bool tensor as a bitmap (1 bit per element);
- ``u24``: an integer tensor whose values lie in [0, 2^24) (a ranking of fewer than 16.7 M
  weights), 3 bytes per element;
- ``narrow``: an int64 tensor whose values fit in int32, stored as int32;

and the bytes of an integer tensor's stored form (``raw``, ``u24`` or ``narrow``) go through zlib
(``"values": "zlib"``) when a sample of them shrinks by a third: counts such as PR-FL's
importance holders take a few distinct values and shrink to a few percent;
- ``sparse``: a floating-point tensor with many zero elements, as a bitmap of the nonzero ones,
  their values and, if some zeros are negative zeros, a bitmap of those among the zeros (so
  the tensor comes back bit for bit).

The floating-point values of ``raw`` and ``sparse`` are stored ``plain``, or ``hi-zlib`` when
a sample of their high bytes shrinks by a third: the low bytes of every value as they are and the high
bytes (the sign and most of the exponent, which take few distinct values in a trained model)
through zlib; it saves about 15% of a model's bytes. Every encoding is lossless.

Deltas. A tensor given as :class:`Near` (``Near(value, base, index)``: a client's model, an
older version of the global model) is close to another tensor of the state, ``base``. Its values
are stored ``delta``: the difference of their bit patterns from those of the base's values at
the same places (as unsigned integers of the element's width, modulo 2^bits, zigzag-coded so
that small differences either way are small numbers), one byte plane at a time, each plane
through zlib (run-length matching only) when a sample of it shrinks by a tenth. Close values share their sign, exponent
and leading mantissa bits, so the high planes are nearly all zeros: a model stored this way
beside the global model takes about 0.5-0.7 of its bytes instead of 0.85. The row names the
base (``"base"``, a tensor of the table stored without a delta) and the index (``"index"``), and
loading gives the value back bit for bit, as a tensor or (if it was written as a
:class:`Streamed`) a Streamed.

The same tensor object (or the same memory viewed the same way) referenced twice is stored once
and comes back as one object; tensors of equal dtype, shape and content are stored once (their
bytes) and come back as distinct objects.

Streaming. :class:`Streamed` stands for a tensor that the writer fetches only when it reaches it
and lets go of right after (``release``): values that live in a file (a file-backed buffer) or
that are loaded from disk (a waiting training job). The writer holds one tensor at a time beside
the state, never the whole payload; the header is written last into space reserved at the start.
On loading, a tensor written as :class:`Streamed` comes back as a :class:`Streamed` whose
``read`` copies it from the file when asked (one at a time, in the consumer's order), so a
large checkpoint is not loaded into memory at once either; every other tensor is read at once.

Files. :func:`write_checkpoint` writes ``checkpoint.pt`` atomically (temporary file, fsync,
rename; the previous checkpoint becomes ``checkpoint.prev.pt``); :func:`load_checkpoint` falls
back to the previous one when the newest is torn, corrupted, refused or ahead of the history.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import io
import json
import logging
import math
import os
import sys
import threading
import weakref
import zlib
from collections import OrderedDict
from collections.abc import Callable, Hashable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
PREVIOUS_CHECKPOINT = "checkpoint.prev.pt"
FORMAT = "prfl-checkpoint"
FORMAT_VERSION = 2
TRAILER_MAGIC = b"PRFLCKP2"
_PICKLE_TRAILER_MAGIC = b"PRFLCKP1"  # the trailer of the pickle checkpoints of earlier versions
_TRAILER_SIZE = len(TRAILER_MAGIC) + 8 + 32  # magic, payload length (little endian), SHA-256
_STATE, _TRAILER = "prfl.state", "prfl.trailer"
_CHUNK = 1 << 20  # bytes hashed, copied or compressed at a time
_ALIGN = 8  # every array starts at a multiple of this many bytes of the data section
_HEADER_LIMIT = 100_000_000  # safetensors refuses longer headers
_PLANE_MIN = 4096  # floating-point arrays at least this long have their high bytes compressed
_LITTLE_ENDIAN = sys.byteorder == "little"  # safetensors is little-endian, and so are the byte planes
_KEPT_INDEXES = 4  # indexes of deltas a reader keeps between Streamed reads
_HEADER_START = b'{"__metadata__":{"format":"prfl-checkpoint"'  # how the header of every checkpoint begins

#: Classes a checkpoint may rebuild (dataclasses, through their constructor), as
#: ``module:qualified name``. Nothing else is ever constructed from a checkpoint.
ALLOWED_TYPES: tuple[str, ...] = (
    "prfl.policies.base:TaskSpec",
    "prfl.policies.base:TaskInFlight",
    "prfl.policies.fleet:InFlight",  # TaskInFlight, as checkpoints of earlier versions name it
    "prfl.client.result:TaskResult",
    "prfl.client.trainer:TrainOutput",
    "prfl.sim.devices:TaskSpeeds",
    "prfl.distribution:PieceId",
)

_ST_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
_FROM_ST = {v: k for k, v in _ST_DTYPES.items()}
_DTYPE_NAMES = {str(d).removeprefix("torch."): d for d in _ST_DTYPES}
_INT_OF_SIZE = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}
_NP_DTYPES = ("bool", "int8", "int16", "int32", "int64", "uint8", "float16", "float32", "float64")
_RESUME_HINT = "start the run again with `prfl run` (or resume it with the prfl version that wrote it)"


class CheckpointError(ValueError):
    """A checkpoint is missing, torn, corrupted, refused or not a prfl checkpoint; the message
    names the file and what to do."""


@dataclass(frozen=True, eq=False)
class Streamed:
    """A tensor fetched when the writer (or, after loading, the consumer) gets to it.

    ``read()`` returns the tensor; ``release(t)``, if given, is called once the writer is done
    with it (e.g. to hand a file-backed tensor's pages back to the kernel). Streamed entries with
    equal ``key`` (not None) are one tensor: it is read and stored once. ``shape`` and ``dtype``,
    when known beforehand, let the writer store it once with any equal plain tensor too."""

    read: Callable[[], torch.Tensor]
    release: Callable[[torch.Tensor], None] | None = None
    key: Hashable | None = None
    shape: tuple[int, ...] | None = None
    dtype: torch.dtype | None = None


def materialize(value: torch.Tensor | Streamed | Near) -> torch.Tensor:
    """The tensor of a tensor, a :class:`Streamed` or a :class:`Near` (a state used without a
    file between it and its consumer)."""
    if isinstance(value, Near):
        value = value.value
    return value.read() if isinstance(value, Streamed) else value


@dataclass(frozen=True, eq=False)
class Near:
    """A tensor to store as its difference from ``base``, a tensor that is also in the state
    (the same object, so it is stored once); loading gives back ``value`` alone (a tensor, or a
    :class:`Streamed` if it is one), bit for bit.

    ``index`` says where in ``base`` the value's elements are: None, the same places (``value``
    has ``base``'s number of elements); a bool mask over the first ``P`` elements of ``base``, or
    that mask as a uint8 bitmap (most significant bit first, ``ceil(P / 8)`` bytes, the padding
    bits clear); or int positions into ``base``, of which only the first ``count`` are used if it
    is given (a prefix of a ranking). With an index, ``value`` holds the base's elements at the index
    (in mask order, or in the positions' order) followed by the base's last ``value.numel() -
    count`` elements: the packed layout of a sub-model (its weights at the mask, then the
    weights that are never pruned). ``index`` must be in the state too, or it is stored again.
    """

    value: torch.Tensor | Streamed
    base: torch.Tensor
    index: torch.Tensor | None = None
    count: int | None = None


def _aligned_base(base: torch.Tensor, index: torch.Tensor | None, n: int, count: int | None = None) -> torch.Tensor:
    """The elements of ``base`` that a value of ``n`` elements stored as a :class:`Near` of it
    with ``index`` (and ``count``) lines up with (1-D); ValueError if the sizes do not fit."""
    flat = base.reshape(-1)
    if count is not None:
        if index is None or index.dtype in (torch.bool, torch.uint8) or index.dtype.is_floating_point:
            raise ValueError("a Near count goes with integer positions")
        if not 0 <= count <= index.numel():
            raise ValueError(f"a Near count of {count} for {index.numel()} positions")
        index = index.reshape(-1)[:count]
    if index is None:
        if flat.numel() != n:
            raise ValueError(f"a Near value of {n} elements against a base of {flat.numel()}")
        return flat
    idx = index.reshape(-1)
    if idx.dtype == torch.uint8:  # a bitmap, most significant bit first, of a mask over the first P elements
        count = int(np.unpackbits(idx.numpy()).sum()) if idx.numel() else 0
        p = flat.numel() - (n - count)
        if not 0 <= p <= flat.numel() or idx.numel() != (p + 7) // 8:
            raise ValueError(f"a Near bitmap of {idx.numel()} bytes ({count} set) does not fit a value of {n} "
                             f"elements over a base of {flat.numel()}")
        idx = torch.from_numpy(np.unpackbits(idx.numpy(), count=p).view(np.bool_))
    if idx.dtype == torch.bool:
        if idx.numel() > flat.numel():
            raise ValueError(f"a Near index of {idx.numel()} places over a base of {flat.numel()}")
        picked = flat[: idx.numel()][idx]
    elif idx.dtype in (torch.int32, torch.int64):
        try:
            picked = torch.index_select(flat, 0, idx)
        except (IndexError, RuntimeError):
            raise ValueError(f"a Near index has positions outside a base of {flat.numel()}") from None
    else:
        raise ValueError(f"a Near index must be a bool mask, a bitmap or int32/int64 positions, not {idx.dtype}")
    suffix = n - picked.numel()
    if suffix < 0 or suffix > flat.numel() - (idx.numel() if idx.dtype == torch.bool else 0):
        raise ValueError(f"a Near value of {n} elements does not fit {picked.numel()} indexed ones and a suffix of the base")
    return torch.cat([picked, flat[flat.numel() - suffix :]]) if suffix else picked


# ---------------------------------------------------------------------------------------- types
def _qualname(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _allowed_class(name: str) -> type:
    """The class of an allowed type name; raises KeyError for any other name."""
    if name not in ALLOWED_TYPES:
        raise KeyError(name)
    module, _, qual = name.partition(":")
    obj: Any = importlib.import_module(module)
    for part in qual.split("."):
        obj = getattr(obj, part)
    if not (isinstance(obj, type) and dataclasses.is_dataclass(obj)):
        raise KeyError(name)
    return obj


def _bytes_of(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous tensor, without a copy."""
    flat = t.reshape(-1)
    if flat.dtype.itemsize != 1 or flat.dtype == torch.bool:
        flat = flat.view(torch.uint8)
    return memoryview(flat.numpy()).cast("B")


# ---------------------------------------------------------------------------------------- writing
@dataclass
class _Entry:
    """One logical tensor to write: a tensor or a Streamed."""

    source: torch.Tensor | Streamed
    ndim_bound: int
    base: int | None = None  # Near: the entries of the base and of the index, and how many positions
    index: int | None = None
    count: int | None = None


class _Encoder:
    """Turns a state into JSON-able data, collecting its tensors (phase one of writing)."""

    def __init__(self) -> None:
        self.entries: list[_Entry] = []
        self._by_view: dict[tuple[Any, ...], int] = {}
        self._by_key: dict[Hashable, int] = {}
        self._streams: dict[int, int] = {}  # id(Streamed) -> index (the state keeps them alive)

    def tensor(self, t: torch.Tensor) -> int:
        if t.layout != torch.strided:
            raise TypeError(f"cannot checkpoint a {t.layout} tensor; make it dense first")
        t = t.detach().cpu()
        if t.dtype not in _ST_DTYPES:
            raise TypeError(f"cannot checkpoint a tensor of dtype {t.dtype}; allowed: {sorted(map(str, _ST_DTYPES))}")
        view = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        index = self._by_view.get(view) if t.numel() else None
        if index is None:
            index = len(self.entries)
            self.entries.append(_Entry(t, t.dim()))
            if t.numel():
                self._by_view[view] = index
        return index

    def streamed(self, s: Streamed) -> int:
        index = self._streams.get(id(s))
        if index is None and s.key is not None:
            index = self._by_key.get(s.key)
        if index is None:
            index = len(self.entries)
            self.entries.append(_Entry(s, 8 if s.shape is None else len(s.shape)))
            if s.key is not None:
                self._by_key[s.key] = index
        self._streams[id(s)] = index
        return index

    def near(self, obj: Near) -> dict[str, int]:
        if not isinstance(obj.base, torch.Tensor) or not obj.base.is_floating_point():
            raise TypeError("the base of a Near must be a floating-point tensor")
        streamed = isinstance(obj.value, Streamed)
        i = self.streamed(obj.value) if streamed else self.tensor(obj.value)  # type: ignore[arg-type]
        b = self.tensor(obj.base)
        x = None if obj.index is None else self.tensor(obj.index)
        e = self.entries[i]
        # One level only: the base is stored as it is, and a value is never its own base.
        if e.base is None and i != b and self.entries[b].base is None and i != x:
            e.base, e.index, e.count = b, x, None if obj.count is None else int(obj.count)
        return {"$s": i} if streamed else {"$t": i}

    def encode(self, obj: Any) -> Any:
        if obj is None or isinstance(obj, (bool, str)):
            return obj
        if isinstance(obj, np.generic):  # before int/float: np.float64 is a float
            dt = obj.dtype.name
            if dt not in _NP_DTYPES:
                raise TypeError(f"cannot checkpoint a numpy scalar of dtype {dt}")
            return {"$npv": dt, "v": obj.item()}
        if isinstance(obj, int):
            return int(obj)
        if isinstance(obj, float):
            return float(obj)
        if isinstance(obj, torch.Tensor):
            return {"$t": self.tensor(obj)}
        if isinstance(obj, Streamed):
            return {"$s": self.streamed(obj)}
        if isinstance(obj, Near):
            return self.near(obj)
        if isinstance(obj, np.ndarray):
            if obj.dtype.name not in _NP_DTYPES:
                raise TypeError(f"cannot checkpoint a numpy array of dtype {obj.dtype}")
            return {"$np": self.tensor(torch.from_numpy(np.ascontiguousarray(obj)))}
        if isinstance(obj, list):
            return [self.encode(v) for v in obj]
        if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
            return {"$tuple": [self.encode(v) for v in obj]}
        if isinstance(obj, (set, frozenset)):
            return {"$fset" if isinstance(obj, frozenset) else "$set": [self.encode(v) for v in obj]}
        if isinstance(obj, dict):
            if all(isinstance(k, str) and not k.startswith("$") for k in obj):
                return {k: self.encode(v) for k, v in obj.items()}
            return {"$dict": [[self.encode(k), self.encode(v)] for k, v in obj.items()]}
        if isinstance(obj, torch.dtype):
            return {"$dtype": str(obj).removeprefix("torch.")}
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            name = _qualname(type(obj))
            if name not in ALLOWED_TYPES:
                raise TypeError(f"cannot checkpoint a {name}: not in prfl.runtime.checkpoint.ALLOWED_TYPES")
            fields = {f.name: self.encode(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
            return {"$dc": name, "fields": fields}
        raise TypeError(
            f"cannot checkpoint a {type(obj).__module__}.{type(obj).__qualname__}: checkpoints hold plain data, "
            "tensors, numpy arrays and the dataclasses of prfl.runtime.checkpoint.ALLOWED_TYPES"
        )


class _Deflated:
    """The zlib stream of a byte tensor, produced chunk by chunk as the writer asks for it (the
    compressed bytes are never all in memory)."""

    def __init__(self, data: torch.Tensor, strategy: int = zlib.Z_DEFAULT_STRATEGY) -> None:
        self.data = data
        self.strategy = strategy

    def __iter__(self) -> Any:
        z = zlib.compressobj(1, zlib.DEFLATED, zlib.MAX_WBITS, 8, self.strategy)
        view = self.data.numpy()
        for start in range(0, view.size, _CHUNK):
            out = z.compress(view[start : start + _CHUNK])
            if out:
                yield out
        yield z.flush()


_UINT = {2: np.uint16, 4: np.uint32, 8: np.uint64}  # the unsigned integers of a float's width


def _zigzag_delta(v: torch.Tensor, ref: torch.Tensor) -> np.ndarray:
    """The bit patterns of ``v`` minus those of ``ref`` (same dtype and length) modulo 2^bits,
    zigzag-coded (0, -1, 1, -2, ... -> 0, 1, 2, 3, ...): unsigned integers of the element's
    width, small where the values are close."""
    u = _UINT[v.element_size()]
    d = v.contiguous().view(_INT_OF_SIZE[v.element_size()]).numpy().view(u) - ref.contiguous().view(
        _INT_OF_SIZE[v.element_size()]).numpy().view(u)
    top = u(8 * v.element_size() - 1)
    return (d << u(1)) ^ (u(0) - (d >> top))


def _undo_zigzag_delta(z: np.ndarray, ref: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The values whose :func:`_zigzag_delta` from ``ref`` is ``z`` (uint of the width of ``dtype``)."""
    u = z.dtype.type
    d = (z >> u(1)) ^ (u(0) - (z & u(1)))
    d += ref.contiguous().view(_INT_OF_SIZE[dtype.itemsize]).numpy().view(u)
    return torch.from_numpy(d.view(np.dtype(f"<i{dtype.itemsize}"))).view(dtype)


def _is_delta(how: Any) -> bool:
    """Whether a table row's ``values`` says the floats are stored as a delta from a base."""
    return isinstance(how, str) and how.startswith("delta:")


def _delta_arrays(v: torch.Tensor, ref: torch.Tensor) -> tuple[str, list[tuple[str, Any]]]:
    """``v`` stored as its :func:`_zigzag_delta` from ``ref``, one byte plane at a time (lowest
    first), each through zlib when a sample of it shrinks by a tenth or more: ("delta:" and a
    letter per plane, ``r`` as it is or ``z`` through zlib, its arrays)."""
    size = v.element_size()
    planes = torch.from_numpy(_zigzag_delta(v, ref).view(np.uint8)).reshape(-1, size)
    kinds, arrays = [], []
    for b in range(size):
        plane = planes[:, b].contiguous()
        sample = plane[: 1 << 15].numpy()
        z = zlib.compressobj(1, zlib.DEFLATED, zlib.MAX_WBITS, 8, zlib.Z_RLE)
        if sample.size and len(z.compress(sample)) + len(z.flush()) <= 0.9 * sample.size:
            kinds.append("z")
            # Run-length matching only: a plane of small differences is runs of zeros and noise
            # that longer matches do not find; about twice as fast and smaller than the default.
            arrays.append(("U8", _Deflated(plane, zlib.Z_RLE)))
        else:
            kinds.append("r")
            arrays.append(("U8", plane))
    return "delta:" + "".join(kinds), arrays


def _float_arrays(v: torch.Tensor, ref: torch.Tensor | None = None) -> tuple[str, list[tuple[str, Any]]]:
    """How to store the floating-point values ``v`` (1-D, contiguous): as their delta from
    ``ref`` (:func:`_delta_arrays`) if it is given; else ``plain``, or ``hi-zlib``: the low bytes
    of every value as they are, and the high bytes (sign and most of the exponent, a few distinct
    values in a trained model) through zlib, when a sample of them shrinks by a third or more."""
    n, size = v.numel(), v.element_size()
    if ref is not None and _LITTLE_ENDIAN and size in _UINT:
        return _delta_arrays(v, ref)
    if n >= _PLANE_MIN and _LITTLE_ENDIAN:
        planes = v.view(torch.uint8).reshape(n, size)
        sample = planes[: min(n, 1 << 16), size - 1].contiguous().numpy()
        if len(zlib.compress(sample, 1)) <= 0.67 * sample.size:
            low = planes[:, : size - 1].contiguous().reshape(-1)
            return "hi-zlib", [("U8", low), ("U8", _Deflated(planes[:, size - 1].contiguous()))]
    return "plain", [(_ST_DTYPES[v.dtype], v)]


def _int_arrays(spec: dict[str, str], st_dtype: str, data: torch.Tensor) -> tuple[dict[str, str], list[tuple[str, Any]]]:
    """The arrays of an integer tensor's stored form ``data`` (1-D, contiguous): as they are, or
    (``"values": "zlib"``) its bytes through zlib when a sample of them shrinks by a third or more
    (counts and other small integers do; a ranking does not)."""
    raw = data.view(torch.uint8) if data.dtype != torch.uint8 else data
    if raw.numel() >= _PLANE_MIN and _LITTLE_ENDIAN:
        sample = raw[: 1 << 16].numpy()
        if len(zlib.compress(sample, 1)) <= 0.67 * sample.size:
            return {**spec, "values": "zlib"}, [("U8", _Deflated(raw))]
    return spec, [(st_dtype, data)]


def _encode_tensor(t: torch.Tensor, ref: torch.Tensor | None = None) -> tuple[dict[str, str], list[tuple[str, Any]]]:
    """How to store ``t`` (contiguous) and the arrays that store it: ({"enc": ..., "values": ...},
    [(safetensors dtype, array)]). ``ref``: the base's elements lined up with ``t`` (a
    :class:`Near`), for a floating-point ``t`` of at least 64 elements; its values are then
    stored as their delta from it."""
    n = t.numel()
    flat = t.reshape(-1)
    if ref is not None and not (t.is_floating_point() and n >= 64 and ref.dtype == t.dtype and ref.numel() == n):
        ref = None
    if t.dtype == torch.bool and n >= 64:
        return {"enc": "bits"}, [("U8", torch.from_numpy(np.packbits(flat.numpy(), bitorder="little")))]
    if t.dtype in (torch.int64, torch.int32) and n >= 64 and _LITTLE_ENDIAN:
        lo, hi = (int(x) for x in torch.aminmax(flat))
        if 0 <= lo and hi < 2**24:  # e.g. a ranking of fewer than 16.7 M weights: 3 bytes a position
            low3 = flat.to(torch.int32).view(torch.uint8).reshape(n, 4)[:, :3].contiguous().reshape(-1)
            return _int_arrays({"enc": "u24"}, "U8", low3)
        if t.dtype == torch.int64 and torch.iinfo(torch.int32).min <= lo and hi <= torch.iinfo(torch.int32).max:
            return _int_arrays({"enc": "narrow"}, "I32", flat.to(torch.int32))
    if not t.is_floating_point() and t.dtype != torch.bool and n >= 64 and _LITTLE_ENDIAN:
        return _int_arrays({"enc": "raw"}, _ST_DTYPES[t.dtype], flat)
    if t.is_floating_point() and n >= 64:
        size = t.element_size()
        nonzero = flat != 0
        count = int(torch.count_nonzero(nonzero))
        if size * count + (n - count + 7) // 8 + (n + 7) // 8 < 0.75 * size * n:
            how, values = _float_arrays(flat[nonzero], None if ref is None else ref[nonzero])
            arrays = [("U8", torch.from_numpy(np.packbits(nonzero.numpy(), bitorder="little"))), *values]
            negative = torch.signbit(flat[~nonzero])  # W ⊙ m holds -0.0 where W < 0: kept, bit for bit
            if bool(negative.any()):
                arrays.append(("U8", torch.from_numpy(np.packbits(negative.numpy(), bitorder="little"))))
            return {"enc": "sparse", "values": how}, arrays
    if t.is_floating_point():
        how, values = _float_arrays(flat, ref)
        return {"enc": "raw", "values": how}, values
    return {"enc": "raw"}, [(_ST_DTYPES[t.dtype], flat)]


class _BlobWriter:
    """Appends aligned arrays to the data section of a checkpoint being written."""

    def __init__(self, fh: BinaryIO, data_start: int) -> None:
        self.fh = fh
        self.data_start = data_start
        self.pos = 0  # offset in the data section
        self.header: dict[str, Any] = {}
        fh.seek(data_start)

    def add(self, name: str, st_dtype: str, shape: list[int], data: memoryview | bytes) -> None:
        pad = -self.pos % _ALIGN
        if pad:  # safetensors wants the data section covered without holes: padding is an array too
            self.header[f"{name}.pad"] = {"dtype": "U8", "shape": [pad], "data_offsets": [self.pos, self.pos + pad]}
            self.fh.write(b"\0" * pad)
            self.pos += pad
        size = len(data)
        self.header[name] = {"dtype": st_dtype, "shape": shape, "data_offsets": [self.pos, self.pos + size]}
        view = memoryview(data)
        for start in range(0, size, _CHUNK):
            self.fh.write(view[start : start + _CHUNK])
        self.pos += size

    def add_stream(self, name: str, chunks: Any) -> None:
        """A ``U8`` array of the bytes ``chunks`` yields, written as they come."""
        self.add(name, "U8", [0], b"")
        size = 0
        for chunk in chunks:
            self.fh.write(chunk)
            size += len(chunk)
        begin = self.header[name]["data_offsets"][0]
        self.header[name] = {"dtype": "U8", "shape": [size], "data_offsets": [begin, begin + size]}
        self.pos += size


def _content_key(t: torch.Tensor) -> tuple[Any, ...]:
    h = hashlib.sha256()
    data = _bytes_of(t)
    for start in range(0, len(data), _CHUNK):
        h.update(data[start : start + _CHUNK])
    return (t.dtype, tuple(t.shape), h.digest())


@dataclass
class _Prepared:
    """One entry read and encoded, ready to be written: its stored form (``encoding``, and
    ``arrays`` of tensors or byte chunks), its content key when it may equal another entry,
    and what to hand back to its source once written."""

    dtype: torch.dtype
    shape: list[int]
    key: tuple[Any, ...] | None
    encoding: dict[str, str]
    arrays: list[tuple[str, Any]]
    source: torch.Tensor | Streamed
    got: Any

    def release(self) -> None:
        src, got = self.source, self.got
        self.got = None
        if isinstance(src, Streamed) and src.release is not None and isinstance(got, torch.Tensor):
            src.release(got)


class _AlignedBases:
    """The base elements the deltas of one save line up with (:func:`_aligned_base`), kept for
    the last few (base, index, count, size) they were made for: the models of many clients of one
    density are deltas of the same elements of the global model. Shared by the save's threads."""

    def __init__(self, entries: list[_Entry], keep: int = 8) -> None:
        self.entries = entries
        self.keep = keep
        self._made: OrderedDict[tuple[Any, ...], torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    def __call__(self, e: _Entry, n: int) -> torch.Tensor:
        key = (e.base, e.index, e.count, n)
        with self._lock:
            ref = self._made.get(key)
            if ref is not None:
                self._made.move_to_end(key)
                return ref
        assert e.base is not None
        base = self.entries[e.base].source
        index = None if e.index is None else self.entries[e.index].source
        assert isinstance(base, torch.Tensor) and (index is None or isinstance(index, torch.Tensor))
        ref = _aligned_base(base.detach().cpu(), None if index is None else index.detach().cpu(), n, e.count)
        with self._lock:
            self._made[key] = ref
            while len(self._made) > self.keep:
                self._made.popitem(last=False)
        return ref


def _prepare(i: int, entries: list[_Entry], groups: dict[tuple[Any, ...], int], eager: bool,
             aligned: _AlignedBases, known: Callable[[tuple[Any, ...]], bool] | None = None) -> _Prepared:
    """Read entry ``i`` and encode it (:func:`_encode_tensor`, as a delta from its base when it
    has one), unless ``known(key)`` says an equal one is stored already; with ``eager`` its zlib
    streams are compressed now, into chunks held in memory."""
    e = entries[i]
    src = e.source
    got = src.read() if isinstance(src, Streamed) else src
    prep = _Prepared(torch.float32, [], None, {}, [], src, got)
    try:
        if not isinstance(got, torch.Tensor) or got.dtype not in _ST_DTYPES:
            raise TypeError(f"a streamed checkpoint entry gave {type(got).__name__}, not a tensor of an allowed dtype")
        t = got.detach().cpu().contiguous()
        prep.dtype, prep.shape = t.dtype, list(t.shape)
        key = _content_key(t) if groups.get((t.dtype, tuple(t.shape)), 0) > 1 and t.numel() else None
        prep.key = None if key is None else (*key, e.base, e.index, e.count)
        if prep.key is not None and known is not None and known(prep.key):
            return prep
        ref = None
        if e.base is not None and t.is_floating_point() and t.numel() >= 64:
            try:
                ref = aligned(e, t.numel())
            except ValueError as exc:  # stored as it is: a delta only saves space
                log.warning("checkpoint: tensor %d is stored without its delta (%s)", i, exc)
                ref = None
        prep.encoding, arrays = _encode_tensor(t, ref)
        prep.arrays = [(st, list(arr) if eager and not isinstance(arr, torch.Tensor) else arr) for st, arr in arrays]
    except BaseException:
        prep.release()
        raise
    return prep


#: Threads that read and encode a checkpoint's entries while it is written (1: all in the caller).
SAVE_THREADS = max(1, min(2, os.cpu_count() or 1))


def save(state: Any, fh: BinaryIO, threads: int | None = None) -> int:
    """Write ``state`` as a checkpoint to ``fh`` (a seekable binary file, empty, opened for
    reading and writing) and return its size in bytes. Tensors are fetched, encoded and written
    a few at a time (on ``threads`` threads, default :data:`SAVE_THREADS`); the file is hashed
    back from ``fh`` for the trailer."""
    enc = _Encoder()
    plain = enc.encode(state)
    entries = enc.entries
    # Header space: a tensor makes at most eight arrays (two bitmaps, two of values, their padding).
    bound = 1024 + sum(8 * (120 + 22 * max(1, e.ndim_bound)) for e in entries)
    data_start = 8 + bound + (-(8 + bound) % _ALIGN)
    blobs = _BlobWriter(fh, data_start)
    # Tensors that may share content with another one are hashed; others are written as they come.
    groups: dict[tuple[Any, ...], int] = {}
    for e in entries:
        s = e.source
        if isinstance(s, torch.Tensor):
            sig: tuple[Any, ...] | None = (s.dtype, tuple(s.shape))
        else:
            sig = None if s.shape is None or s.dtype is None else (s.dtype, tuple(s.shape))
        if sig is not None:
            groups[sig] = groups.get(sig, 0) + 1
    for e in entries:  # a delta's base is stored as it is (one level)
        if e.base is not None and entries[e.base].base is not None:
            e.base = e.index = e.count = None
    table: list[dict[str, Any]] = []
    stored: dict[tuple[Any, ...], dict[str, Any]] = {}
    # Entries are read and encoded (deltas, byte planes, zlib) on SAVE_THREADS threads, a few
    # ahead of the one being written; torch, numpy, zlib and hashlib release the GIL for that
    # work. The file is the same byte for byte whatever the number of threads: entries are
    # written in order, and a duplicate's encoding (found in order) is dropped.
    threads = max(1, SAVE_THREADS if threads is None else threads)
    pool = ThreadPoolExecutor(threads, thread_name_prefix="prfl-checkpoint") if threads > 1 else None
    ahead: dict[int, Future[_Prepared]] = {}
    submitted = 0
    aligned = _AlignedBases(entries)

    try:
        for i in range(len(entries)):
            if pool is None:  # in order: a duplicate is found before it is encoded
                prep = _prepare(i, entries, groups, False, aligned, known=stored.__contains__)
            else:
                while submitted < min(len(entries), i + 2 * threads):
                    ahead[submitted] = pool.submit(_prepare, submitted, entries, groups, True, aligned)
                    submitted += 1
                prep = ahead.pop(i).result()
            try:
                row = stored.get(prep.key) if prep.key is not None else None
                if row is None:
                    names: list[str] = []
                    for j, (st, arr) in enumerate(prep.arrays):
                        name = f"t{i}" if len(prep.arrays) == 1 else f"t{i}.{j}"
                        if isinstance(arr, torch.Tensor):
                            blobs.add(name, st, list(arr.shape), _bytes_of(arr) if arr.numel() else b"")
                        else:
                            blobs.add_stream(name, arr)
                        names.append(name)
                    row = {"dtype": str(prep.dtype).removeprefix("torch."), "shape": prep.shape, **prep.encoding,
                           "arrays": names}
                    if _is_delta(prep.encoding.get("values")):
                        e = entries[i]
                        row["base"], row["index"] = e.base, e.index
                        if e.count is not None:
                            row["count"] = e.count
                    if prep.key is not None:
                        stored[prep.key] = row
                table.append(row)
            finally:
                prep.release()
                del prep
    finally:
        if pool is not None:
            for fut in ahead.values():
                fut.cancel()
            pool.shutdown(wait=True)
            for fut in ahead.values():  # prepared but not written (an error stopped the writing)
                if not fut.cancelled() and fut.exception() is None:
                    fut.result().release()
    body = json.dumps({"format": FORMAT, "version": FORMAT_VERSION, "tensors": table, "state": plain},
                      separators=(",", ":"), allow_nan=True).encode("utf-8")
    del plain
    blobs.add(_STATE, "U8", [len(body)], body)
    del body
    blobs.add(_TRAILER, "U8", [_TRAILER_SIZE], b"\0" * _TRAILER_SIZE)  # filled in below
    header = {"__metadata__": {"format": FORMAT, "version": str(FORMAT_VERSION)}, **blobs.header}
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    room = data_start - 8
    if len(text) > room:  # pragma: no cover - the bound above is generous
        raise RuntimeError(f"checkpoint header of {len(text)} bytes exceeds the {room} bytes reserved")
    fh.seek(0)
    fh.write(room.to_bytes(8, "little"))
    fh.write(text + b" " * (room - len(text)))  # safetensors pads its header with spaces
    fh.flush()
    size = data_start + blobs.pos - _TRAILER_SIZE
    digest = _sha256_of(fh, size)
    fh.seek(size)
    fh.write(TRAILER_MAGIC + size.to_bytes(8, "little") + digest)
    fh.flush()
    return size + _TRAILER_SIZE


def _sha256_of(fh: BinaryIO, size: int) -> bytes:
    """SHA-256 of the first ``size`` bytes of an open binary file, read in bounded chunks."""
    h = hashlib.sha256()
    chunk = bytearray(min(_CHUNK, max(size, 1)))
    view = memoryview(chunk)
    fh.seek(0)
    left = size
    while left > 0:
        got = fh.readinto(view[: min(left, len(chunk))])  # type: ignore[attr-defined]
        if not got:
            break
        h.update(view[:got])
        left -= got
    return h.digest()


# ---------------------------------------------------------------------------------------- reading
class _Source:
    """Positional reads from an open checkpoint (kept open while Streamed entries need it)."""

    def __init__(self, fh: BinaryIO, owned: bool) -> None:
        self.fh = fh
        if owned:
            weakref.finalize(self, fh.close)

    def readinto(self, offset: int, out: memoryview) -> None:
        self.fh.seek(offset)
        got = 0
        while got < len(out):
            n = self.fh.readinto(out[got:])  # type: ignore[attr-defined]
            if not n:
                raise CheckpointError("the file ends inside an array")
            got += n


class _Decoder:
    """Builds the state back from its JSON and the arrays (phase two of reading)."""

    def __init__(self, src: _Source, data_start: int, header: dict[str, Any], table: Any, where: str) -> None:
        self.src, self.data_start, self.header, self.where = src, data_start, header, where
        if not isinstance(table, list):
            raise CheckpointError(f"{where}: malformed tensor table")
        self.table = table
        self._tensors: dict[int, torch.Tensor] = {}
        self._streams: dict[int, Streamed] = {}
        self._classes: dict[str, type] = {}
        self._bases: dict[int, torch.Tensor] = {}  # the bases of deltas, as read (kept for Streamed reads)
        self._indexes: OrderedDict[int, torch.Tensor] = OrderedDict()  # their indexes: the last few read
        self._lock = threading.Lock()  # Streamed reads, whichever thread asks

    # -- arrays
    def _array(self, name: Any, st_dtype: str, count: int) -> torch.Tensor:
        meta = self.header.get(name) if isinstance(name, str) else None
        if meta is None or meta["dtype"] != st_dtype:
            raise CheckpointError(f"{self.where}: array {name!r} is missing or not {st_dtype}")
        begin, end = meta["data_offsets"]
        dtype = _FROM_ST[st_dtype]
        if end - begin != count * dtype.itemsize:
            raise CheckpointError(f"{self.where}: array {name!r} holds {end - begin} bytes, not {count} x {st_dtype}")
        out = torch.empty(count, dtype=dtype)
        if count:
            self.src.readinto(self.data_start + begin, _bytes_of(out))
        return out

    def _index(self, i: Any) -> int:
        if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < len(self.table):
            raise CheckpointError(f"{self.where}: reference to tensor {i!r}, which the table does not have")
        return i

    def _bits(self, name: Any, n: int) -> torch.Tensor:
        """A bitmap array of ``n`` bits as a bool tensor."""
        packed = self._array(name, "U8", (n + 7) // 8)
        return torch.from_numpy(np.unpackbits(packed.numpy(), count=n, bitorder="little").view(np.bool_))

    def _values(self, how: Any, names: list[Any], dtype: torch.dtype, n: int, i: int,
                ref: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
        """``n`` floating-point values stored as :func:`_float_arrays` says (``names``: its arrays;
        ``ref``: the base's elements lined up with them, for a delta)."""
        if _is_delta(how) and ref is not None and _LITTLE_ENDIAN:
            size = dtype.itemsize
            kinds = how.removeprefix("delta:")
            if size not in _UINT or len(kinds) != size or len(names) != size or set(kinds) - {"r", "z"}:
                raise CheckpointError(f"{self.where}: malformed delta storage {how!r} of tensor {i}")
            z = np.empty((n, size), dtype=np.uint8)
            for b, (kind, name) in enumerate(zip(kinds, names)):
                if kind == "z":
                    self._inflate(name, z[:, b], i)
                else:
                    z[:, b] = self._array(name, "U8", n).numpy()
            base = ref()
            if base.dtype != dtype or base.numel() != n:
                raise CheckpointError(f"{self.where}: tensor {i} is stored as a delta from a tensor that does not line up with it")
            return _undo_zigzag_delta(z.reshape(-1).view(_UINT[size]), base, dtype)
        if how in (None, "plain") and len(names) == 1:
            return self._array(names[0], _ST_DTYPES[dtype], n)
        if how == "hi-zlib" and len(names) == 2 and _LITTLE_ENDIAN:
            size = dtype.itemsize
            low = self._array(names[0], "U8", (size - 1) * n)
            out = torch.empty(n, dtype=dtype)
            planes = out.view(torch.uint8).reshape(n, size)
            planes[:, : size - 1] = low.reshape(n, size - 1)
            del low
            self._inflate(names[1], planes[:, size - 1].numpy(), i)
            return out
        raise CheckpointError(f"{self.where}: unknown storage {how!r} of the values of tensor {i}")

    def _inflate(self, name: Any, out: np.ndarray, i: int) -> None:
        """Inflate the zlib stream of array ``name`` into the uint8 array ``out`` (of exactly the
        stream's length; it may be strided), chunk by chunk, never more than ``out`` holds."""
        n = out.size
        z, got = zlib.decompressobj(), 0
        try:
            for chunk in self._chunks(name):
                while chunk and got < n:
                    part = z.decompress(chunk, min(_CHUNK, n - got))
                    out[got : got + len(part)] = np.frombuffer(part, dtype=np.uint8)
                    got += len(part)
                    chunk = z.unconsumed_tail
                if chunk:
                    break
            ok = got == n and not z.unconsumed_tail and (z.eof or not z.flush())
        except zlib.error:
            ok = False
        if not ok or not z.eof:
            raise CheckpointError(f"{self.where}: tensor {i}: its compressed bytes do not give {n} bytes")

    def _int_array(self, how: Any, name: Any, st_dtype: str, count: int, i: int) -> torch.Tensor:
        """``count`` integers of safetensors dtype ``st_dtype`` stored as :func:`_int_arrays` says."""
        if how is None:
            return self._array(name, st_dtype, count)
        if how != "zlib" or not _LITTLE_ENDIAN:
            raise CheckpointError(f"{self.where}: unknown storage {how!r} of the values of tensor {i}")
        out = torch.empty(count, dtype=_FROM_ST[st_dtype])
        self._inflate(name, out.view(torch.uint8).numpy(), i)
        return out

    def _chunks(self, name: Any) -> Any:
        """The bytes of a ``U8`` array, a bounded chunk at a time."""
        meta = self.header.get(name) if isinstance(name, str) else None
        if meta is None or meta["dtype"] != "U8":
            raise CheckpointError(f"{self.where}: array {name!r} is missing or not U8")
        begin, end = meta["data_offsets"]
        for start in range(begin, end, _CHUNK):
            buf = bytearray(min(_CHUNK, end - start))
            self.src.readinto(self.data_start + start, memoryview(buf))
            yield bytes(buf)

    def _load(self, i: int) -> torch.Tensor:
        row = self.table[i]
        try:
            dtype = _DTYPE_NAMES[row["dtype"]]
            shape = [int(d) for d in row["shape"]]
            encoding, names, how = row["enc"], row["arrays"], row.get("values")
        except (KeyError, TypeError, ValueError, AttributeError):
            raise CheckpointError(f"{self.where}: malformed entry {i} of the tensor table") from None
        if any(d < 0 for d in shape) or not isinstance(names, list) or not names:
            raise CheckpointError(f"{self.where}: malformed entry {i} of the tensor table")
        n = math.prod(shape)
        ref = self._delta_base(row, i) if _is_delta(how) else None
        if encoding == "raw" and dtype.is_floating_point:
            flat = self._values(how, names, dtype, n, i, None if ref is None else lambda: ref(n))
        elif encoding == "raw" and len(names) == 1:
            flat = self._int_array(how, names[0], _ST_DTYPES[dtype], n, i)
        elif encoding == "bits" and dtype == torch.bool and len(names) == 1:
            flat = self._bits(names[0], n)
        elif encoding == "narrow" and dtype == torch.int64 and len(names) == 1:
            flat = self._int_array(how, names[0], "I32", n, i).to(torch.int64)
        elif encoding == "u24" and dtype in (torch.int64, torch.int32) and len(names) == 1 and _LITTLE_ENDIAN:
            words = torch.zeros(n, 4, dtype=torch.uint8)
            words[:, :3] = self._int_array(how, names[0], "U8", 3 * n, i).reshape(n, 3)
            flat = words.view(torch.int32).reshape(n).to(dtype)
        elif encoding == "sparse" and dtype.is_floating_point:
            k = 2 if how == "hi-zlib" else dtype.itemsize if ref is not None else 1  # arrays of the values
            if len(names) not in (1 + k, 2 + k):
                raise CheckpointError(f"{self.where}: malformed entry {i} of the tensor table")
            nonzero = self._bits(names[0], n)
            count = int(torch.count_nonzero(nonzero))
            values = self._values(how, names[1 : 1 + k], dtype, count, i,
                                  None if ref is None else lambda: ref(n)[nonzero])
            flat = torch.zeros(n, dtype=dtype)
            flat[nonzero] = values
            if len(names) == 2 + k:  # negative zeros, among the zeros
                negative = self._bits(names[1 + k], n - count)
                flat[~nonzero] = torch.where(negative, -0.0, 0.0).to(dtype)
        else:
            raise CheckpointError(f"{self.where}: unknown storage {encoding!r} for tensor {i}")
        return flat.reshape(shape)

    def _delta_base(self, row: dict[str, Any], i: int) -> Callable[[int], torch.Tensor]:
        """For tensor i stored as a delta: a function giving, for its ``n`` elements, the base's
        elements lined up with them. The base and the index are read from the file once and kept
        apart from the state's tensors (which their consumer may change in place before it reads
        a Streamed delta)."""
        b, x, count = row.get("base"), row.get("index"), row.get("count")
        if count is not None and (not isinstance(count, int) or isinstance(count, bool)):
            raise CheckpointError(f"{self.where}: malformed entry {i} of the tensor table")
        b = self._index(b)
        x = None if x is None else self._index(x)
        for j in (b, x):
            if j is not None and (j == i or not isinstance(self.table[j], dict)
                                  or _is_delta(self.table[j].get("values"))):
                raise CheckpointError(f"{self.where}: tensor {i} is a delta from tensor {j}, which is itself a delta")

        def base() -> torch.Tensor:
            t = self._bases.get(b)
            if t is None:
                t = self._bases[b] = self._load(b)
            return t

        def index(j: int) -> torch.Tensor:
            # Slots share few indexes (a ranking) or each has its own (a mask) that it reads once:
            # the last few are kept, so memory stays bounded however many slots there are.
            t = self._indexes.get(j)
            if t is None:
                t = self._indexes[j] = self._load(j)
                while len(self._indexes) > _KEPT_INDEXES:
                    self._indexes.popitem(last=False)
            else:
                self._indexes.move_to_end(j)
            return t

        def lined_up(n: int) -> torch.Tensor:
            try:
                return _aligned_base(base(), None if x is None else index(x), n, count)
            except (ValueError, IndexError, RuntimeError) as exc:
                raise CheckpointError(f"{self.where}: tensor {i}: its base does not line up with it ({exc})") from None

        return lined_up

    def tensor(self, i: Any) -> torch.Tensor:
        """Tensor i, one object however often the state refers to it."""
        t = self._tensors.get(self._index(i))
        if t is None:
            t = self._tensors[i] = self._load(i)
        return t

    def streamed(self, i: Any) -> Streamed:
        """A :class:`Streamed` reading tensor i from the file when asked (one per i)."""
        s = self._streams.get(self._index(i))
        if s is None:
            row = self.table[i]
            try:
                shape: tuple[int, ...] | None = tuple(int(d) for d in row["shape"])
                dtype: torch.dtype | None = _DTYPE_NAMES[row["dtype"]]
            except (KeyError, TypeError, ValueError):
                shape, dtype = None, None  # reported when it is read
            s = self._streams[i] = Streamed(read=lambda i=i: self._load_locked(i), key=("checkpoint", i), shape=shape,
                                            dtype=dtype)
        return s

    def _load_locked(self, i: int) -> torch.Tensor:
        # a Streamed entry may be read on another thread (a checkpoint written from a loaded state
        # encodes on threads): one read at a time, since reads share the file position and caches
        with self._lock:
            return self._load(i)

    # -- values
    def state(self, obj: Any) -> Any:
        """The decoded state; afterwards only Streamed entries keep a reference to the file."""
        try:
            return self.decode(obj)
        finally:
            self._tensors.clear()
            self._streams.clear()

    def decode(self, obj: Any) -> Any:
        if isinstance(obj, list):
            return [self.decode(v) for v in obj]
        if not isinstance(obj, dict):
            return obj
        if not any(k.startswith("$") for k in obj):
            return {k: self.decode(v) for k, v in obj.items()}
        if len(obj) == 1:
            (tag, value), = obj.items()
            if tag == "$t":
                return self.tensor(value)
            if tag == "$s":
                return self.streamed(value)
            if tag == "$np":
                return self.tensor(value).numpy()
            if tag == "$tuple" and isinstance(value, list):
                return tuple(self.decode(v) for v in value)
            if tag in ("$set", "$fset") and isinstance(value, list):
                items = [self.decode(v) for v in value]
                return set(items) if tag == "$set" else frozenset(items)
            if tag == "$dict" and isinstance(value, list):
                out = {}
                for pair in value:
                    if not (isinstance(pair, list) and len(pair) == 2):
                        raise CheckpointError(f"{self.where}: malformed $dict entry")
                    out[self.decode(pair[0])] = self.decode(pair[1])
                return out
            if tag == "$dtype" and isinstance(value, str):
                if value not in _DTYPE_NAMES:
                    raise CheckpointError(f"{self.where}: unknown torch dtype {value!r}")
                return _DTYPE_NAMES[value]
        if (set(obj) == {"$npv", "v"} and obj["$npv"] in _NP_DTYPES and isinstance(obj["v"], (bool, int, float))):
            return np.dtype(obj["$npv"]).type(obj["v"])
        if set(obj) == {"$dc", "fields"} and isinstance(obj["fields"], dict):
            return self._dataclass(obj["$dc"], obj["fields"])
        raise CheckpointError(f"{self.where}: unknown tag {sorted(obj)[0]!r}; the file was not written by this prfl")

    def _dataclass(self, name: Any, fields: dict[str, Any]) -> Any:
        cls = self._classes.get(name) if isinstance(name, str) else None
        if cls is None:
            try:
                cls = self._classes[name] = _allowed_class(name)
            except (KeyError, TypeError, ImportError, AttributeError):
                raise CheckpointError(
                    f"{self.where}: names the type {name!r}, which a checkpoint may not build; not loaded"
                ) from None
        known = {f.name: f for f in dataclasses.fields(cls)}
        if set(fields) - set(known):
            raise CheckpointError(f"{self.where}: {name} has no field(s) {sorted(set(fields) - set(known))}")
        values = {k: self.decode(v) for k, v in fields.items()}
        init = {k: v for k, v in values.items() if known[k].init}
        try:
            obj = cls(**init)
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{self.where}: cannot rebuild a {name} ({exc})") from None
        for k, v in values.items():
            if not known[k].init:
                object.__setattr__(obj, k, v)
        return obj


def _refuse_foreign(fh: BinaryIO, total: int, where: str) -> CheckpointError:
    """The error for a file that is not a checkpoint of this format."""
    fh.seek(0)
    head = fh.read(8 + len(_HEADER_START))
    fh.seek(max(0, total - _TRAILER_SIZE))
    tail = fh.read(_TRAILER_SIZE)
    if head[8:] == _HEADER_START:
        return CheckpointError(f"{where}: torn checkpoint (it ends before its {TRAILER_MAGIC.decode()} trailer)")
    if tail.startswith(_PICKLE_TRAILER_MAGIC) or head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return CheckpointError(
            f"{where}: a pickle checkpoint (written by an older prfl, or by torch.save); prfl does not load "
            f"pickles, which can run code; {_RESUME_HINT}"
        )
    return CheckpointError(f"{where}: not a prfl checkpoint (no {TRAILER_MAGIC.decode()} trailer); {_RESUME_HINT}")


def load(fh: BinaryIO, where: str = "checkpoint", *, owned: bool = False) -> Any:
    """Verify and read a checkpoint from ``fh`` (seekable binary). Streamed entries read from
    ``fh`` later, so it must stay open while they are used (``owned``: close it once they are
    all gone). Raises :class:`CheckpointError` naming ``where``."""
    total = fh.seek(0, io.SEEK_END)
    if total < 8 + _TRAILER_SIZE:
        raise _refuse_foreign(fh, total, where) if total else CheckpointError(f"{where}: empty file; {_RESUME_HINT}")
    fh.seek(total - _TRAILER_SIZE)
    trailer = fh.read(_TRAILER_SIZE)
    if not trailer.startswith(TRAILER_MAGIC):
        raise _refuse_foreign(fh, total, where)
    size = int.from_bytes(trailer[len(TRAILER_MAGIC) : len(TRAILER_MAGIC) + 8], "little")
    if size != total - _TRAILER_SIZE:
        raise CheckpointError(f"{where}: torn checkpoint (payload of {total - _TRAILER_SIZE} bytes, trailer says {size})")
    if _sha256_of(fh, size) != trailer[-32:]:
        raise CheckpointError(f"{where}: checksum mismatch; the checkpoint is corrupted")
    fh.seek(0)
    n = int.from_bytes(fh.read(8), "little")
    if not 0 < n <= min(_HEADER_LIMIT, size - 8):
        raise CheckpointError(f"{where}: bad header length {n}")
    try:
        header = json.loads(fh.read(n).decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        meta = header.pop("__metadata__", None)
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ValueError(f"no {FORMAT} metadata")
        if meta.get("version") != str(FORMAT_VERSION):
            raise CheckpointError(f"{where}: checkpoint format version {meta.get('version')!r}; this prfl reads "
                                  f"version {FORMAT_VERSION}; {_RESUME_HINT}")
        _check_layout(header, total - 8 - n)
        src = _Source(fh, owned)
        state_meta = header[_STATE]
        body = bytearray(state_meta["data_offsets"][1] - state_meta["data_offsets"][0])
        src.readinto(8 + n + state_meta["data_offsets"][0], memoryview(body))
        doc = json.loads(body.decode("utf-8"))
        del body
        if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("version") != FORMAT_VERSION:
            raise ValueError("the state is not a prfl checkpoint state")
        decoder = _Decoder(src, 8 + n, header, doc.get("tensors"), where)
        return decoder.state(doc.get("state"))
    except CheckpointError:
        raise
    except (ValueError, KeyError, TypeError, IndexError, RecursionError, UnicodeDecodeError, OverflowError) as exc:
        raise CheckpointError(f"{where}: malformed checkpoint ({type(exc).__name__}: {exc}); {_RESUME_HINT}") from None


def _check_layout(header: dict[str, Any], data_size: int) -> None:
    """The safetensors rules: every array well formed, the data section covered without holes
    or overlaps, and the state and trailer arrays present (the trailer last)."""
    spans = []
    for name, meta in header.items():
        if not isinstance(meta, dict) or set(meta) != {"dtype", "shape", "data_offsets"}:
            raise ValueError(f"array {name!r} is malformed")
        dtype = _FROM_ST.get(meta["dtype"])
        shape, offsets = meta["shape"], meta["data_offsets"]
        if (dtype is None or not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape)
                or not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets))):
            raise ValueError(f"array {name!r} is malformed")
        if offsets[1] - offsets[0] != math.prod(shape) * dtype.itemsize or offsets[0] < 0:
            raise ValueError(f"array {name!r}: its byte range does not match its shape")
        spans.append((offsets[0], offsets[1], name))
    spans.sort()
    pos = 0
    for begin, end, name in spans:
        if begin != pos:
            raise ValueError(f"array {name!r} starts at {begin}, expected {pos}")
        pos = end
    if pos != data_size:
        raise ValueError(f"the arrays cover {pos} bytes of a {data_size}-byte data section")
    if _STATE not in header or not spans or spans[-1][2] != _TRAILER or header[_STATE]["dtype"] != "U8":
        raise ValueError("no state or no trailer array")


def dumps(state: Any) -> bytes:
    """A checkpoint of ``state`` as bytes (tests and small states)."""
    buf = io.BytesIO()
    save(state, buf)
    return buf.getvalue()


def loads(data: bytes, where: str = "checkpoint") -> Any:
    """Read a checkpoint from bytes (see :func:`load`)."""
    return load(io.BytesIO(data), where)


# ---------------------------------------------------------------------------------------- files
def _fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platform dependent
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - platform dependent
        pass
    finally:
        os.close(fd)


def write_checkpoint(state: Any, directory: str | os.PathLike[str]) -> Path:
    """Write ``state`` as ``directory/checkpoint.pt`` atomically: to a temporary file, fsynced,
    renamed over the previous checkpoint, which becomes ``checkpoint.prev.pt``; then the
    directory is fsynced. Tensors are streamed to the file (see :func:`save`)."""
    d = Path(directory)
    final, prev = d / CHECKPOINT, d / PREVIOUS_CHECKPOINT
    tmp = d / (CHECKPOINT + ".tmp")
    try:
        with open(tmp, "w+b") as fh:
            save(state, fh)
            os.fsync(fh.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if final.exists():
        os.replace(final, prev)  # a kill right here leaves prev (and the complete tmp): resume uses prev
    os.replace(tmp, final)
    _fsync_dir(d)
    return final


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load and verify one checkpoint file; raise :class:`CheckpointError` (naming the file and
    what to do) if it is torn, corrupted, a pickle or not a prfl checkpoint. The file is hashed
    in chunks; tensors are read one by one (streamed ones when the consumer asks)."""
    p = Path(path)
    try:
        fh = open(p, "rb")
    except OSError as exc:
        raise CheckpointError(f"{p}: cannot be read ({exc})") from None
    try:
        state = load(fh, str(p), owned=True)
    except OSError as exc:
        fh.close()
        raise CheckpointError(f"{p}: cannot be read ({exc})") from None
    except BaseException:
        fh.close()
        raise
    if not isinstance(state, dict) or not {"policy", "history_offset", "now"} <= set(state):
        raise CheckpointError(f"{p}: not a run checkpoint (no policy, history offset or time); {_RESUME_HINT}")
    return state


def load_checkpoint(
    directory: str | os.PathLike[str], history_size: int | None = None
) -> tuple[dict[str, Any], Path]:
    """The newest usable checkpoint of a run directory: ``checkpoint.pt``, else (torn, missing,
    refused, or ahead of a history of ``history_size`` bytes) ``checkpoint.prev.pt``. Returns
    (state, path)."""
    d = Path(directory)
    problems: list[str] = []
    for path in (d / CHECKPOINT, d / PREVIOUS_CHECKPOINT):
        if not path.is_file():
            continue
        try:
            state = read_checkpoint(path)
        except CheckpointError as exc:
            problems.append(str(exc))
            log.warning("%s; trying the previous checkpoint", exc)
            continue
        offset = int(state["history_offset"])
        if history_size is not None and offset > history_size:
            problems.append(f"{path}: expects {offset} bytes of history.jsonl, which holds {history_size}")
            log.warning("%s", problems[-1])
            continue
        if problems:
            log.warning("resuming from %s", path)
        return state, path
    detail = "; ".join(problems) if problems else f"no {CHECKPOINT} or {PREVIOUS_CHECKPOINT}"
    hint = "" if _RESUME_HINT in detail else "; start the run again with `prfl run`"
    raise CheckpointError(f"{d} has no usable checkpoint ({detail}){hint}")
