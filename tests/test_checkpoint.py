"""The checkpoint format: what it stores and how, what it refuses, and that nothing in it runs."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import pickle
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

import prfl.runtime.checkpoint as ck
from prfl.runtime.checkpoint import CheckpointError, Near, Streamed, dumps, loads, read_checkpoint, write_checkpoint
from prfl.client.result import TaskResult
from prfl.distribution import PieceId
from prfl.policies.base import TaskSpec


def _bits(t: torch.Tensor) -> torch.Tensor:
    """A tensor's bit patterns, so that -0.0 and NaN payloads compare exactly."""
    return t.reshape(-1).view(torch.uint8) if t.dtype.is_floating_point else t


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b))


def test_plain_data_and_tensors_come_back_as_they_were() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(1000, generator=g)
    mask = torch.rand(900, generator=g) < 0.3
    sparse = torch.zeros(1000)
    sparse[::9] = 1.5
    sparse[4] = -0.0  # a negative zero comes back negative
    state = {
        "plain": [1, 2.5, float("inf"), -0.0, None, True, "x", 10**30],
        "nan": float("nan"),
        "tuple": (1, (2, 3)), "set": {1, 2}, "frozen": frozenset({"a"}),
        "keys": {1: "a", (2, 3): 4.0, 0.5: 1, "$text": 2},
        "w": w, "w_again": w, "w_copy": w.clone(), "view": w[10:20], "mask": mask, "sparse": sparse,
        "bf16": torch.randn(100, generator=g).to(torch.bfloat16), "i64": torch.arange(100),
        "i64_wide": torch.full((70,), 2**40), "i32": torch.arange(5, dtype=torch.int32),
        "empty": torch.empty(0), "scalar": torch.tensor(3.5), "matrix": torch.randn(3, 4, generator=g),
        "array": np.arange(5), "np_float": np.float64(0.1), "np_int": np.int64(3), "dtype": torch.bfloat16,
        "spec": TaskSpec(1, 2, 3, w, mask, 0.5, 10, 20, pieces=("a",)),
        "pieces": {PieceId(1, 2), PieceId(3, 4)},
        "result": TaskResult(4, 1, 2, sparse, 7, 0.25, 5, 0.1, grad_sq=None),
    }
    back = loads(dumps(state))
    assert set(back) == set(state)
    for key, value in state.items():
        got = back[key]
        if isinstance(value, torch.Tensor):
            assert _same(value, got), key
        elif isinstance(value, np.ndarray):
            assert got.dtype == value.dtype and (got == value).all()
        elif key == "nan":
            assert math.isnan(got)
        elif key in ("spec", "result"):
            assert type(got) is type(value)
        else:
            assert got == value and type(got) is type(value), key
    assert math.copysign(1.0, back["plain"][3]) == -1.0
    assert back["w"] is back["w_again"] and back["spec"].weights is back["w"] and back["spec"].mask is back["mask"]
    assert back["w_copy"] is not back["w"]  # equal content, distinct objects: stored once, read twice
    assert back["spec"].pieces == ("a",) and _same(back["result"].weights, sparse)


def test_compact_storage_and_dedupe() -> None:
    n = 1_000_000
    mask = torch.rand(n) < 0.1
    weights = torch.randn(n)
    masked = weights * mask  # 90% zeros
    ranking = torch.randperm(n)  # int64 whose values fit in int32
    alone = len(dumps({"w": weights}))
    assert alone < 0.9 * 4 * n  # the high bytes (sign, exponent) through zlib
    assert len(dumps({"m": mask})) < n // 8 + 4096  # a bool tensor as a bitmap
    assert len(dumps({"r": ranking})) < 3 * n + 4096  # positions below 2^24: 3 bytes each
    assert len(dumps({"r": ranking + 2**30})) < 4 * n + 4096  # int64 that fits int32: narrowed
    assert len(dumps({"w": torch.rand(n).mul(2 * torch.pi).sin().to(torch.float64)})) < 0.95 * 8 * n
    # W ⊙ m: the nonzeros, a bitmap of them, and one of the negative zeros (W < 0 outside the mask)
    assert len(dumps({"x": masked})) < 0.1 * 4 * n + n // 8 + 0.9 * n // 8 + 20_000
    assert len(dumps({"x": masked.abs()})) < 0.1 * 4 * n + n // 8 + 20_000  # no negative zeros: no second bitmap
    # the same tensor, or an equal one, is stored once
    assert len(dumps({"a": weights, "b": weights, "c": weights.clone(), "d": [weights]})) < alone + 4096
    more = {"r": ranking, "r32": ranking.to(torch.int32), "wide": ranking + 2**30, "x": masked, "w": weights,
            "bf16": weights.to(torch.bfloat16), "f16": weights.to(torch.float16), "f64": weights.to(torch.float64),
            "nan": torch.where(mask, torch.nan, weights)}
    back = loads(dumps(more))
    assert all(_same(back[k], v) for k, v in more.items())
    assert int(torch.signbit(back["x"][~mask]).sum()) == int(torch.signbit(masked[~mask]).sum()) > 0
    table = json.loads(_state_array(dumps(more)))["tensors"]
    assert {r["enc"] for r in table} == {"u24", "narrow", "sparse", "raw"}
    assert any(r.get("values") == "hi-zlib" for r in table)


def test_small_integers_go_through_zlib_and_come_back_bit_for_bit() -> None:
    """Counts (PR-FL's importance holders: a few distinct values per weight) shrink through zlib in
    each integer storage; a ranking, whose bytes do not shrink, is stored as it is."""
    n = 1_000_000
    g = torch.Generator().manual_seed(3)
    counts = torch.randint(0, 4, (n,), generator=g)  # int64 in [0, 2^24): u24, then zlib
    cases = {"u24": counts, "u24_32": counts.to(torch.int32), "narrow": counts - 5,
             "raw16": counts.to(torch.int16), "raw8": counts.to(torch.uint8) * 7}
    for name, t in cases.items():
        data = dumps({"c": t})
        assert len(data) < 0.35 * t.numel() * t.element_size(), name  # 2 bits of entropy per value
        back = loads(data)["c"]
        assert back.dtype == t.dtype and torch.equal(back, t), name
        (row,) = json.loads(_state_array(data))["tensors"]
        assert row.get("values") == "zlib", name
    (row,) = json.loads(_state_array(dumps({"r": torch.randperm(n, generator=g)})))["tensors"]
    assert row["enc"] == "u24" and "values" not in row


def test_corrupt_compressed_integers_are_refused(monkeypatch) -> None:
    data = bytearray(dumps({"c": torch.zeros(100_000, dtype=torch.int64)}))
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    begin, end = next(v["data_offsets"] for k, v in header.items() if k.startswith("t0"))
    body = bytearray(data[: -48])
    body[8 + n + begin + 2 : 8 + n + begin + 6] = b"\xff\xff\xff\xff"  # damage the zlib stream...
    forged = bytes(body) + b"PRFLCKP2" + len(body).to_bytes(8, "little") + hashlib.sha256(body).digest()
    with pytest.raises(CheckpointError, match="compressed bytes"):  # ...and forge a valid checksum
        loads(forged)


def _state_array(data: bytes) -> bytes:
    """The bytes of the ``prfl.state`` array of a checkpoint."""
    n = int.from_bytes(data[:8], "little")
    begin, end = json.loads(data[8 : 8 + n])["prfl.state"]["data_offsets"]
    return data[8 + n + begin : 8 + n + end]


def test_the_file_is_safetensors() -> None:
    from safetensors import safe_open

    state = {"w": torch.randn(333), "m": torch.rand(100) < 0.5, "n": 3}
    data = dumps(state)
    with tempfile.NamedTemporaryFile(suffix=".safetensors") as fh:
        fh.write(data)
        fh.flush()
        with safe_open(fh.name, "pt") as f:
            assert f.metadata() == {"format": "prfl-checkpoint", "version": "2"}
            names = list(f.keys())
            assert "prfl.state" in names and "prfl.trailer" in names
            body = f.get_tensor("prfl.state").numpy().tobytes()
    assert json.loads(body)["state"]["n"] == 3
    trailer = data[-48:]
    assert trailer[:8] == b"PRFLCKP2" and int.from_bytes(trailer[8:16], "little") == len(data) - 48
    assert trailer[16:] == hashlib.sha256(data[:-48]).digest()


@pytest.mark.parametrize("threads", [1, 2])
def test_streamed_entries_are_read_a_few_at_a_time_and_released(threads: int, monkeypatch) -> None:
    monkeypatch.setattr(ck, "SAVE_THREADS", threads)
    live: list[int] = []
    peak = [0]
    released: list[int] = []

    def source(i: int) -> Streamed:
        def read() -> torch.Tensor:
            live.append(i)
            peak[0] = max(peak[0], len(live))
            return torch.full((1000,), float(i))

        def release(t: torch.Tensor) -> None:
            assert float(t[0]) == i
            live.remove(i)
            released.append(i)

        return Streamed(read=read, release=release)

    state = {"slots": [source(i) for i in range(20)], "shared": [Streamed(read=lambda: torch.ones(10), key="k")] * 3}
    state["shared"].append(Streamed(read=lambda: torch.ones(10), key="k"))  # another object, the same key
    back = loads(dumps(state))
    # one at a time in the caller; with threads, at most 2 per thread read ahead of the one written
    assert (peak[0] == 1) if threads == 1 else (1 <= peak[0] <= 2 * threads + 1)
    assert released == list(range(20)) and not live
    # read back lazily: still Streamed, read from the file when asked, one object per stored tensor
    assert all(isinstance(s, Streamed) for s in back["slots"])
    assert [float(s.read()[0]) for s in back["slots"]] == [float(i) for i in range(20)]
    assert len({id(s) for s in back["shared"]}) == 1 and back["slots"][3].shape == (1000,)
    assert torch.equal(ck.materialize(back["shared"][0]), torch.ones(10))


def _close_model(n: int = 50_000, p: int = 45_000, seed: int = 0) -> dict[str, torch.Tensor]:
    """A trained-like global model ``w`` (p prunable weights, then a suffix), a client's model
    close to it, and the pieces a checkpoint holds of such models."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, generator=g) * 0.05
    client = w + 1e-4 * torch.randn(n, generator=g)
    mask = torch.rand(p, generator=g) < 0.4
    masked = client.clone()
    masked[:p][~mask] = 0.0
    masked[:p][~mask & (torch.arange(p) % 7 == 0)] = -0.0  # W ⊙ m keeps -0.0 where W < 0
    return {"w": w, "client": client, "mask": mask, "masked": masked,
            "packed": torch.cat([client[:p][mask], client[p:]]), "positions": mask.nonzero().view(-1).to(torch.int32)}


def _rows(data: bytes) -> list[dict]:
    return json.loads(_state_array(data))["tensors"]


def test_near_values_are_stored_as_deltas_and_come_back_bit_for_bit() -> None:
    from prfl.distribution import pack_bits

    m = _close_model()
    w, mask, p = m["w"], m["mask"], m["mask"].numel()
    bitmap = pack_bits(mask)
    by_rank = torch.randperm(p, generator=torch.Generator().manual_seed(1))[:5000]
    state = {
        "w": w, "mask": mask, "bitmap": bitmap, "positions": m["positions"], "by_rank": by_rank,
        "aligned": Near(m["client"], w), "sparse": Near(m["masked"], w), "packed": Near(m["packed"], w, mask),
        "bitmap_packed": Near(m["packed"].clone(), w, bitmap), "positions_packed": Near(m["packed"] + 0.0, w, m["positions"]),
        "ranked": Near(torch.cat([m["client"][by_rank], m["client"][p:]]), w, by_rank),
        "prefix": Near(torch.cat([m["client"][by_rank[:1234]], m["client"][p:]]), w, by_rank, 1234),
        "streamed": Near(Streamed(read=lambda: m["packed"].clone()), w, mask),
        "half": Near(m["client"].half(), w.half()), "double": Near(m["client"].double(), w.double()),
        "equal": Near(w.clone(), w), "odd": Near(torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0, 3e38, -1e-45] * 20), w[:140] * -1.0),
    }
    data = dumps(state)
    back = loads(data)
    expected = {"aligned": m["client"], "sparse": m["masked"], "packed": m["packed"], "bitmap_packed": m["packed"],
                "positions_packed": m["packed"], "ranked": torch.cat([m["client"][by_rank], m["client"][p:]]),
                "prefix": torch.cat([m["client"][by_rank[:1234]], m["client"][p:]]),
                "half": m["client"].half(), "double": m["client"].double(), "equal": w,
                "odd": torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0, 3e38, -1e-45] * 20)}
    for k, v in expected.items():
        assert isinstance(back[k], torch.Tensor) and _same(back[k], v), k
    assert isinstance(back["streamed"], Streamed) and _same(back["streamed"].read(), m["packed"])
    assert back["equal"] is not back["w"] and _same(back["w"], w)
    deltas = [r for r in _rows(data) if str(r.get("values", "")).startswith("delta:")]
    assert len(deltas) == len(expected) + 1  # every Near value, the streamed one included
    # Close values share their high bytes: the delta is much smaller than the values stored alone.
    alone = len(dumps({"w": w, "client": m["client"]})) - len(dumps({"w": w}))
    near = len(dumps({"w": w, "client": Near(m["client"], w)})) - len(dumps({"w": w}))
    assert near < 0.8 * alone
    # A value equal to its base costs next to nothing.
    assert len(dumps({"w": w, "c": Near(w.clone(), w)})) < len(dumps({"w": w})) + 0.05 * w.numel() * 4


def test_a_near_value_read_after_its_base_changed_in_place_is_still_exact() -> None:
    """The reader keeps its own copy of a delta's base: a consumer that updates the loaded model
    in place before it reads a Streamed delta still gets the saved values."""
    m = _close_model()
    back = loads(dumps({"w": m["w"], "s": Near(Streamed(read=lambda: m["client"]), m["w"])}))
    back["w"].add_(1.0)
    assert _same(back["s"].read(), m["client"])


def test_near_falls_back_to_plain_storage_when_it_cannot_apply(caplog) -> None:
    m = _close_model()
    w = m["w"]
    chained = Near(m["client"] + 1e-5, m["client"])  # its base is itself stored as a delta: one level only
    state = {"w": w, "a": Near(m["client"], w), "b": chained, "self": Near(w, w),
             "misfit": Near(m["client"][:-3].clone(), w),  # does not line up with the base: stored as it is
             "ints": Near(torch.arange(100), w)}
    with caplog.at_level("WARNING", logger="prfl.runtime.checkpoint"):
        data = dumps(state)
    assert "without its delta" in caplog.text
    back = loads(data)
    assert _same(back["b"], m["client"] + 1e-5) and _same(back["misfit"], m["client"][:-3])
    assert back["self"] is back["w"] and torch.equal(back["ints"], torch.arange(100))
    rows = _rows(data)
    assert sum(str(r.get("values", "")).startswith("delta:") for r in rows) == 1  # "a" only
    # In memory (no file between writer and reader), materialize sees through a Near.
    assert ck.materialize(state["a"]) is m["client"]
    with pytest.raises(TypeError, match="base of a Near"):
        dumps({"x": Near(torch.ones(100), torch.arange(100))})


@pytest.mark.parametrize("damage", ["self", "chain", "range", "misfit"])
def test_forged_delta_rows_are_refused(damage: str) -> None:
    m = _close_model()
    data = dumps({"w": m["w"], "v": m["client"] + 0.0, "c": Near(m["client"], m["w"])})
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    begin, end = header["prfl.state"]["data_offsets"]
    doc = json.loads(data[8 + n + begin : 8 + n + end])
    rows = doc["tensors"]
    i = next(k for k, r in enumerate(rows) if str(r.get("values", "")).startswith("delta:"))
    if damage == "self":
        rows[i]["base"] = i
    elif damage == "chain":
        j = next(k for k, r in enumerate(rows) if k != i and r["enc"] == "raw")
        rows[j]["values"] = rows[i]["values"]
        rows[i]["base"] = j
    elif damage == "range":
        rows[i]["base"] = 99
    else:
        rows[i]["shape"] = [rows[i]["shape"][0] - 8]
    # The decoder reads the same arrays with the forged table (as load does once the checksum holds).
    dec = ck._Decoder(ck._Source(io.BytesIO(data), False), 8 + n, header, rows, "forged")
    with pytest.raises(CheckpointError, match="forged"):
        dec.state(doc["state"])


def test_unknown_types_are_refused_when_writing() -> None:
    class Custom:
        pass

    @dataclasses.dataclass
    class NotAllowed:
        x: int

    with pytest.raises(TypeError, match="Custom"):
        dumps({"a": Custom()})
    with pytest.raises(TypeError, match="ALLOWED_TYPES"):
        dumps({"a": NotAllowed(1)})
    with pytest.raises(TypeError, match="complex"):
        dumps({"a": torch.zeros(3, dtype=torch.complex64)})


# --------------------------------------------------------------------------- hostile files
class _Marker:
    """Unpickling this calls open(path, "w"): a pickle that runs code creates the marker file."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def pickle_checkpoint(marker: Path, with_trailer: bool = True) -> bytes:
    """What an old checkpoint looked like (torch.save payload, PRFLCKP1 trailer with a correct
    checksum), carrying a payload that creates ``marker`` when unpickled."""
    buf = io.BytesIO()
    torch.save({"policy": {"version": 1, "evil": _Marker(marker)}, "history_offset": 0, "now": 0.0}, buf)
    data = buf.getvalue()
    if with_trailer:
        data += b"PRFLCKP1" + len(data).to_bytes(8, "little") + hashlib.sha256(data).digest()
    return data


@pytest.mark.parametrize("kind", ["torch.save with the old trailer", "torch.save", "plain pickle"])
def test_a_pickle_is_refused_and_never_run(tmp_path: Path, kind: str) -> None:
    marker = tmp_path / "marker"
    if kind == "plain pickle":
        data = pickle.dumps({"policy": _Marker(marker), "history_offset": 0, "now": 0.0})
    else:
        data = pickle_checkpoint(marker, with_trailer=kind != "torch.save")
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(data)
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and "pickle" in message and "prfl run" in message
    assert not marker.exists()
    # the crafted file really would have run code
    pickle.loads(pickle.dumps(_Marker(marker)))
    assert marker.exists()


def test_a_forged_type_tag_is_refused_and_nothing_is_built(tmp_path: Path, monkeypatch) -> None:
    """A well-formed file, checksum and all, that names a class outside the allow-list."""
    marker = tmp_path / "marker"
    calls: list[str] = []

    @dataclasses.dataclass
    class Hostile:
        path: str

        def __post_init__(self) -> None:
            calls.append(self.path)
            Path(self.path).touch()

    name = f"{Hostile.__module__}:{Hostile.__qualname__}"
    monkeypatch.setattr(ck, "ALLOWED_TYPES", (*ck.ALLOWED_TYPES, name))  # only to write the file
    data = dumps({"policy": {"x": Hostile(str(marker))}, "history_offset": 0, "now": 0.0})
    monkeypatch.undo()
    marker.unlink()
    calls.clear()
    with pytest.raises(CheckpointError, match="may not build"):
        loads(data, "crafted.pt")
    assert calls == [] and not marker.exists()


@pytest.mark.parametrize("damage", ["cut", "flip", "header", "empty", "foreign"])
def test_damaged_files_name_the_problem(tmp_path: Path, damage: str) -> None:
    data = dumps({"policy": {"w": torch.randn(1000)}, "history_offset": 0, "now": 0.0})
    if damage == "cut":
        data, match = data[: len(data) // 2], "torn"
    elif damage == "flip":
        data, match = data[:100] + bytes([data[100] ^ 1]) + data[101:], "checksum mismatch"
    elif damage == "header":  # a new header with a valid checksum, but its layout is wrong
        body = bytearray(data[:-48])
        body[0:8] = (12).to_bytes(8, "little")
        data, match = bytes(body) + b"PRFLCKP2" + len(body).to_bytes(8, "little") + hashlib.sha256(body).digest(), "malformed"
    elif damage == "empty":
        data, match = b"", "empty"
    else:
        data, match = b"\x00" * 200, "not a prfl checkpoint"
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match=match) as info:
        read_checkpoint(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_write_is_atomic_and_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    write_checkpoint({"policy": {"version": 1}, "history_offset": 1, "now": 0.0}, tmp_path)
    write_checkpoint({"policy": {"version": 2}, "history_offset": 2, "now": 0.0}, tmp_path)
    assert read_checkpoint(tmp_path / "checkpoint.pt")["policy"]["version"] == 2
    assert read_checkpoint(tmp_path / "checkpoint.prev.pt")["policy"]["version"] == 1
    with pytest.raises(TypeError):  # a state that cannot be written leaves no temporary file behind
        write_checkpoint({"policy": object(), "history_offset": 3, "now": 0.0}, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.prev.pt", "checkpoint.pt"]
    assert read_checkpoint(tmp_path / "checkpoint.pt")["policy"]["version"] == 2


def test_streamed_deltas_with_many_indexes_read_back_in_any_order() -> None:
    """A reader keeps only the last few indexes of deltas (a large fleet's slots each have their
    own mask): values read in any order, an index read again after it was dropped, are exact."""
    m = _close_model()
    w, p = m["w"], m["mask"].numel()
    g = torch.Generator().manual_seed(7)
    masks = [torch.rand(p, generator=g) < 0.3 for _ in range(9)]
    packed = [torch.cat([m["client"][:p][k], m["client"][p:]]) for k in masks]
    state = {"w": w, "masks": masks,
             "slots": [Near(Streamed(read=lambda v=v: v), w, k) for v, k in zip(packed, masks)]}
    back = loads(dumps(state))
    for i in [0, 5, 1, 8, 2, 0, 7, 3, 6, 4, 5, 0]:
        assert _same(back["slots"][i].read(), packed[i]), i


def test_the_file_is_the_same_byte_for_byte_whatever_the_number_of_threads(tmp_path) -> None:
    """Entries encoded on threads are written in order, duplicates found in order: the same file."""
    m = _close_model()
    w = m["w"]
    g = torch.Generator().manual_seed(3)
    order = torch.randperm(45_000, generator=g)
    state = {
        "w": w, "order": order,
        "near": [Near(w + 1e-4 * torch.randn(w.numel(), generator=g), w) for _ in range(5)],
        # three clients of one density: deltas of the same elements of w (lined up once per save)
        "prefix": [Near(torch.cat([w[:45_000][order[:9_000]], w[45_000:]]) + 1e-4 * k, w, order, 9_000) for k in range(3)],
        "streamed": [Streamed(read=lambda i=i: torch.full((3000,), float(i))) for i in range(6)],
        "same": [torch.arange(5000) for _ in range(3)],  # equal contents, stored once
        "mask": torch.rand(45_000, generator=g) < 0.3,
    }
    sizes = []
    for threads in (1, 2, 3):
        with open(tmp_path / f"t{threads}.pt", "w+b") as fh:
            sizes.append(ck.save(state, fh, threads=threads))
    data = [(tmp_path / f"t{t}.pt").read_bytes() for t in (1, 2, 3)]
    assert data[0] == data[1] == data[2] and sizes[0] == len(data[0])
    back = loads(data[1])
    assert torch.equal(ck.materialize(back["near"][2]), ck.materialize(state["near"][2].value))
    for got, sent in zip(back["prefix"], state["prefix"]):
        assert torch.equal(ck.materialize(got).view(torch.int32), sent.value.view(torch.int32))
    deltas = [r for r in _rows(data[1]) if r.get("count") == 9_000]
    assert len(deltas) == 3 and all(r["values"].startswith("delta:") for r in deltas)


def test_an_entry_that_fails_on_a_thread_fails_the_save_and_releases_the_rest(tmp_path) -> None:
    released: list[int] = []

    def source(i: int) -> Streamed:
        def read() -> torch.Tensor:
            if i == 4:
                raise OSError("disk gone")
            return torch.full((100,), float(i))
        return Streamed(read=read, release=lambda t, i=i: released.append(i))

    with open(tmp_path / "x.pt", "w+b") as fh, pytest.raises(OSError, match="disk gone"):
        ck.save({"s": [source(i) for i in range(10)]}, fh, threads=2)
    assert set(released) >= {0, 1, 2, 3} and 4 not in released


def test_a_lazily_loaded_state_saves_again_on_threads(tmp_path, monkeypatch) -> None:
    """Streamed entries of a loaded checkpoint share its file (one position) and the reader's
    caches: read from several threads, one at a time, they still come back exact (deltas
    included). The reads here pause between seeking and reading, so that unguarded reads on
    two threads would interleave."""
    import time

    def slow_readinto(self, offset, out):
        self.fh.seek(offset)
        time.sleep(0.002)
        got = 0
        while got < len(out):
            n = self.fh.readinto(out[got:])
            if not n:
                raise ck.CheckpointError("the file ends inside an array")
            got += n

    m = _close_model()
    w = m["w"]
    g = torch.Generator().manual_seed(5)
    values = [w + 1e-4 * torch.randn(w.numel(), generator=g) for _ in range(8)]
    state = {"w": w, "s": [Near(Streamed(read=lambda v=v: v), w) for v in values],
             "p": [Streamed(read=lambda i=i: torch.full((4000,), float(i))) for i in range(8)]}
    with open(tmp_path / "first.pt", "w+b") as fh:
        ck.save(state, fh)
    back = ck.load(open(tmp_path / "first.pt", "rb"), owned=True)  # read from the file when asked
    monkeypatch.setattr(ck._Source, "readinto", slow_readinto)
    assert all(isinstance(x, Streamed) for x in back["s"])
    with open(tmp_path / "again.pt", "w+b") as fh:
        ck.save(back, fh, threads=3)
    again = loads((tmp_path / "again.pt").read_bytes())
    for v, x in zip(values, again["s"]):
        assert torch.equal(ck.materialize(x).view(torch.int32), v.view(torch.int32))
    assert [float(ck.materialize(x)[0]) for x in again["p"]] == [float(i) for i in range(8)]
