"""Per-client latest-model buffer: slots, staleness weights, MaskFedAvg, storage kinds, checkpoints."""

from __future__ import annotations

import weakref

import pytest
import torch

from prfl.aggregation import Staleness, mask_fedavg, weighted_average
from prfl.runtime.checkpoint import Near, Streamed, dumps, loads
from prfl.buffer import BufferEntry, ClientBuffer

T = torch.tensor


def masked_model(total: int, npr: int, density: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random weights zeroed outside a random mask of the given density (W ⊙ m, suffix dense)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(total, generator=g)
    mask = torch.rand(npr, generator=g) < density
    w[:npr] = torch.where(mask, w[:npr], torch.zeros(()))
    return w, mask


def fill(buf: ClientBuffer, specs: list[tuple[int, float | None, int, int]], seed: int = 0) -> dict:
    """Put (client, density or None for dense, num_samples, sent_round) entries; return them."""
    data = {}
    for client, density, n, r in specs:
        if density is None:
            w = torch.randn(buf.total, generator=torch.Generator().manual_seed(seed + client))
            mask = None
        else:
            w, mask = masked_model(buf.total, buf.num_prunable, density, seed + client)
        buf.put(client, w, mask, n, r)
        data[client] = (w, mask, n, r)
    return data


SPECS = [(0, None, 50, 9), (2, 0.1, 20, 4), (3, 0.5, 30, 7), (5, 0.3, 0, 8), (6, 0.8, 10, 10)]


@pytest.fixture(params=["dense", "sparse"])
def storage(request) -> str:
    return request.param


# --------------------------------------------------------------------------- staleness
def test_staleness_weights_hand_values():
    buf = ClientBuffer(3, total=4, num_prunable=3)
    for c, r in [(0, 10), (1, 7), (2, 2)]:
        buf.put(c, torch.zeros(4), None, 1, r)
    # poly a = 0.5 at round 10: tau = 0, 3, 8 -> s = 1, 1/2, 1/3, sum 11/6 -> p = 6/11, 3/11, 2/11
    p = buf.staleness_weights(10, "poly", a=0.5)
    assert p == pytest.approx({0: 6 / 11, 1: 3 / 11, 2: 2 / 11}, rel=1e-12)
    # default poly a = 0.6 at round 11: tau = 1, 4, 9 -> s = 2^-0.6 = 0.659754, 5^-0.6 = 0.380731,
    # 10^-0.6 = 0.251189; sum 1.291674 -> p = 0.659754/1.291674 = 0.510775, 0.294758, 0.194468
    p = buf.staleness_weights(11)
    assert p == pytest.approx({0: 0.510775, 1: 0.294758, 2: 0.194468}, abs=2e-6)
    # hinge a = 0.6, b = 2 at round 12: tau = 2, 5, 10 -> s = 1, 1/(0.6*3+1) = 1/2.8, 1/(0.6*8+1) = 1/5.8
    s = [1.0, 1 / 2.8, 1 / 5.8]
    p = buf.staleness_weights(12, "hinge")
    assert p == pytest.approx({i: v / sum(s) for i, v in enumerate(s)}, rel=1e-12)
    assert buf.staleness_weights(12, "const") == pytest.approx({0: 1 / 3, 1: 1 / 3, 2: 1 / 3})
    # coefficients c_i = p_i n_i
    buf.put(1, torch.zeros(4), None, 4, 7)
    assert buf.coefficients(10, "poly", a=0.5) == pytest.approx({0: 6 / 11, 1: 12 / 11, 2: 2 / 11})


def test_staleness_errors():
    buf = ClientBuffer(2, total=4, num_prunable=3)
    with pytest.raises(ValueError, match="empty"):
        buf.staleness_weights(0)
    buf.put(1, torch.zeros(4), None, 1, 5)
    with pytest.raises(ValueError, match="client 1 was sent at round 5"):
        buf.staleness_weights(4)
    with pytest.raises(ValueError, match="staleness kind"):
        buf.staleness_weights(5, "linear")


# --------------------------------------------------------------------------- aggregation
def test_aggregate_hand_numbers(storage):
    # N = 3, M = 1; both sent at round 0, so p = 1/2 each; n = 1 and 3 -> c = 0.5 and 1.5
    buf = ClientBuffer(2, total=4, num_prunable=3, storage=storage)
    buf.put(0, T([2.0, 0.0, 0.0, 1.0]), T([True, False, False]), 1, 0)
    buf.put(1, T([4.0, 6.0, 0.0, 5.0]), T([True, True, False]), 3, 0)
    prev = T([9.0, 9.0, 9.0, 9.0])
    # w0 = (0.5*2 + 1.5*4) / 2 = 3.5; w1 = 1.5*6 / 1.5 = 6; w2: nobody holds it -> prev 9;
    # suffix = (0.5*1 + 1.5*5) / 2 = 4
    assert buf.aggregate(prev, 0).tolist() == [3.5, 6.0, 9.0, 4.0]
    # ablation, masks ignored: (0.5*[2,0,0,1] + 1.5*[4,6,0,5]) / 2 = [3.5, 4.5, 0, 4]
    assert buf.aggregate(prev, 0, masked=False).tolist() == [3.5, 4.5, 0.0, 4.0]
    # server step eta_g = 0.5: halfway between prev and W_new
    assert buf.aggregate(prev, 0, eta_g=0.5).tolist() == [6.25, 7.5, 9.0, 6.5]
    # plain average weighted by n: (1*[2,0,0,1] + 3*[4,6,0,5]) / 4 = [3.5, 4.5, 0, 4]
    assert buf.plain_average().tolist() == [3.5, 4.5, 0.0, 4.0]
    # given coefficients (the reference's s_i n_i): (3*[2,0,0,1] + 1*[4,6,0,5]) / 4 = [2.5, 1.5, 0, 2]
    assert buf.plain_average(coefficients={0: 3.0, 1: 1.0}).tolist() == [2.5, 1.5, 0.0, 2.0]
    assert torch.equal(buf.plain_average(coefficients=buf.coefficients(0)), buf.aggregate(prev, 0, masked=False))
    with pytest.raises(ValueError, match=r"exactly the buffered clients \[0, 1\]"):
        buf.plain_average(coefficients={0: 1.0})
    with pytest.raises(ValueError, match="finite and non-negative"):
        buf.plain_average(coefficients={0: 1.0, 1: -1.0})


@pytest.mark.parametrize("kind", ["poly", "hinge", "const"])
@pytest.mark.parametrize("eta_g", [1.0, 0.7])
def test_aggregate_equals_mask_fedavg(storage, kind, eta_g):
    total, npr = 1200, 1000
    buf = ClientBuffer(8, total, npr, storage=storage)
    data = fill(buf, SPECS)
    prev = torch.randn(total, generator=torch.Generator().manual_seed(99))
    now = 12
    coeffs = buf.coefficients(now, kind)
    ids = sorted(data)
    models = [data[c][0] for c in ids]
    masks = [data[c][1] for c in ids]
    c = [coeffs[i] for i in ids]
    expected = mask_fedavg(prev, models, masks, c, npr, eta_g=eta_g)
    got = buf.aggregate(prev, now, kind=kind, eta_g=eta_g)
    assert torch.equal(got, expected)
    plain = buf.aggregate(prev, now, kind=kind, masked=False, eta_g=eta_g)
    assert torch.equal(plain, torch.lerp(prev, weighted_average(models, c), eta_g) if eta_g != 1.0 else weighted_average(models, c))
    assert torch.equal(buf.plain_average(), weighted_average(models, [data[i][2] for i in ids]))
    # float32 accumulation is passed through as well
    f32 = mask_fedavg(prev, models, masks, c, npr, eta_g=eta_g, accumulate_dtype=torch.float32)
    assert torch.equal(buf.aggregate(prev, now, kind=kind, eta_g=eta_g, accumulate_dtype=torch.float32), f32)


def test_aggregate_does_not_modify_inputs(storage):
    buf = ClientBuffer(8, 300, 250, storage=storage)
    fill(buf, SPECS)
    prev = torch.randn(300)
    before = prev.clone()
    snapshot = {c: buf.get(c).weights.clone() for c in buf.clients()}
    buf.aggregate(prev, 12)
    assert torch.equal(prev, before)
    for c, w in snapshot.items():
        assert torch.equal(buf.get(c).weights, w)


def test_aggregate_errors():
    buf = ClientBuffer(2, total=4, num_prunable=3)
    with pytest.raises(ValueError, match="empty"):
        buf.aggregate(torch.zeros(4), 0)
    buf.put(0, torch.ones(4), None, 0, 0)
    with pytest.raises(ValueError, match="num_samples == 0"):
        buf.aggregate(torch.zeros(4), 0)
    with pytest.raises(ValueError, match="num_samples == 0"):
        buf.plain_average()
    buf.put(0, torch.ones(4), None, 2, 0)
    with pytest.raises(ValueError, match="length 4"):
        buf.aggregate(torch.zeros(5), 0)
    with pytest.raises(ValueError, match="eta_g"):
        buf.aggregate(torch.zeros(4), 0, eta_g=0.0)


# --------------------------------------------------------------------------- slots and storage
def test_slot_is_replaced_by_a_newer_model(storage):
    buf = ClientBuffer(4, total=5, num_prunable=4, storage=storage)
    buf.put(2, T([1.0, 0.0, 0.0, 0.0, 1.0]), T([True, False, False, False]), 10, 1)
    buf.put(0, torch.ones(5), None, 5, 2)
    buf.put(2, T([0.0, 3.0, 4.0, 0.0, 2.0]), T([False, True, True, False]), 12, 5)
    assert len(buf) == 2 and buf.clients() == [0, 2] and 2 in buf and 1 not in buf
    e = buf.get(2)
    assert isinstance(e, BufferEntry)
    assert (e.client, e.num_samples, e.sent_round) == (2, 12, 5)
    assert e.weights.tolist() == [0.0, 3.0, 4.0, 0.0, 2.0]
    assert e.mask.tolist() == [False, True, True, False]
    assert buf.get(1) is None
    assert buf.get(0).mask is None


def test_put_copies_its_input(storage):
    buf = ClientBuffer(1, total=3, num_prunable=2, storage=storage)
    w = T([1.0, 2.0, 3.0])
    buf.put(0, w, None, 1, 0)
    w.zero_()
    assert buf.get(0).weights.tolist() == [1.0, 2.0, 3.0]


def test_put_takes_a_handed_over_tensor_only_into_dense_memory_slots(storage, tmp_path):
    """take=True: a dense in-memory slot keeps the caller's tensor (no copy of a model per
    arrival); sparse slots and file-backed rows still store their own form."""
    w, mask = masked_model(300, 250, 0.4, 1)
    for path in (None, tmp_path / "rows"):
        if path is not None and storage != "dense":
            continue
        buf = ClientBuffer(2, total=300, num_prunable=250, storage=storage, path=path)
        buf.put(0, w, mask, 5, 0, zero_outside_mask=True, take=True)
        buf.put(1, w, mask, 5, 0, zero_outside_mask=True)
        kept = buf._slots[0].values
        assert (kept.data_ptr() == w.data_ptr()) == (storage == "dense" and path is None)
        assert buf._slots[1].values.data_ptr() != w.data_ptr()  # without take: a copy
        assert torch.equal(buf.get(0).weights, buf.get(1).weights)


def test_sparse_equals_dense():
    total, npr = 700, 600
    dense = ClientBuffer(8, total, npr, storage="dense")
    sparse = ClientBuffer(8, total, npr, storage="sparse")
    fill(dense, SPECS)
    fill(sparse, SPECS)
    for c in dense.clients():
        a, b = dense.get(c), sparse.get(c)
        assert torch.equal(a.weights, b.weights)
        assert (a.mask is None and b.mask is None) or torch.equal(a.mask, b.mask)
        assert (a.num_samples, a.sent_round) == (b.num_samples, b.sent_round)
    prev = torch.randn(total)
    for masked in (True, False):
        assert torch.equal(dense.aggregate(prev, 11, masked=masked), sparse.aggregate(prev, 11, masked=masked))
    assert torch.equal(dense.plain_average(), sparse.plain_average())


def test_sparse_nbytes_below_dense_at_10_percent():
    total, npr = 1010, 1000
    mask = torch.zeros(npr, dtype=torch.bool)
    mask[::10] = True  # 100 of 1000
    w = torch.zeros(total)
    w[:npr][mask] = 1.5
    w[npr:] = -2.0
    dense = ClientBuffer(1, total, npr, storage="dense")
    sparse = ClientBuffer(1, total, npr, storage="sparse")
    assert dense.nbytes() == sparse.nbytes() == 0
    dense.put(0, w, mask, 1, 0)
    sparse.put(0, w, mask, 1, 0)
    assert dense.nbytes() == 4 * 1010 + 1000  # fp32 vector + bool mask = 5040
    assert sparse.nbytes() == 4 * (100 + 10) + 125  # kept values + suffix + bitmap of 1000 bits = 565
    assert torch.equal(sparse.get(0).weights, w)


def test_sparse_refuses_weights_outside_the_mask():
    buf = ClientBuffer(1, total=4, num_prunable=3, storage="sparse")
    with pytest.raises(ValueError, match="1 weights outside the mask are nonzero"):
        buf.put(0, T([1.0, 0.5, 0.0, 2.0]), T([True, False, False]), 1, 0)
    assert len(buf) == 0
    buf.put(0, T([1.0, -0.0, 0.0, 2.0]), T([True, False, False]), 1, 0)  # -0.0 is zero
    assert buf.get(0).weights.tolist() == [1.0, 0.0, 0.0, 2.0]


def test_put_errors():
    buf = ClientBuffer(3, total=4, num_prunable=3)
    with pytest.raises(ValueError, match="length 4"):
        buf.put(0, torch.zeros(5), None, 1, 0)
    with pytest.raises(ValueError, match="length 4"):
        buf.put(0, torch.zeros(2, 2), None, 1, 0)
    with pytest.raises(ValueError, match="floating-point"):
        buf.put(0, torch.zeros(4, dtype=torch.int64), None, 1, 0)
    for bad in (-1, 3, 1.5):
        with pytest.raises(ValueError, match=r"client id must be an integer in \[0, 3\)"):
            buf.put(bad, torch.zeros(4), None, 1, 0)
    with pytest.raises(ValueError, match="client id"):
        buf.get(7)
    with pytest.raises(ValueError, match=r"mask must be a bool tensor of shape \(3,\)"):
        buf.put(0, torch.zeros(4), torch.ones(4, dtype=torch.bool), 1, 0)
    with pytest.raises(ValueError, match="mask must be a bool"):
        buf.put(0, torch.zeros(4), torch.ones(3), 1, 0)
    with pytest.raises(ValueError, match="num_samples"):
        buf.put(0, torch.zeros(4), None, -1, 0)
    with pytest.raises(ValueError, match="sent_round"):
        buf.put(0, torch.zeros(4), None, 1, -2)
    with pytest.raises(ValueError, match="storage"):
        ClientBuffer(3, 4, 3, storage="compressed")
    with pytest.raises(ValueError, match="num_prunable"):
        ClientBuffer(3, 4, 5)
    assert len(buf) == 0


def test_file_backed_buffer_matches_memory(tmp_path):
    total, npr = 500, 400
    path = tmp_path / "buffer.f32"
    mem = ClientBuffer(8, total, npr)
    mapped = ClientBuffer(8, total, npr, path=path)
    fill(mem, SPECS)
    fill(mapped, SPECS)
    assert path.stat().st_size == 8 * total * 4
    prev = torch.randn(total)
    assert torch.equal(mem.aggregate(prev, 12), mapped.aggregate(prev, 12))
    for c in mem.clients():
        assert torch.equal(mem.get(c).weights, mapped.get(c).weights)
    with pytest.raises(ValueError, match="storage='dense'"):
        ClientBuffer(2, total, npr, storage="sparse", path=tmp_path / "x")


# --------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("through_file", [False, True])
@pytest.mark.parametrize("target", ["dense", "sparse"])
def test_state_dict_round_trip(storage, target, through_file):
    total, npr = 400, 350
    src = ClientBuffer(8, total, npr, storage=storage)
    fill(src, SPECS)
    state = src.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())  # the buffer's own tensors, no copies
    if through_file:
        state = loads(dumps(state))
    dst = ClientBuffer(8, total, npr, storage=target)
    dst.put(1, torch.ones(total), None, 3, 0)  # replaced by the load
    dst.load_state_dict(state)
    assert dst.clients() == src.clients()
    for c in src.clients():
        a, b = src.get(c), dst.get(c)
        assert torch.equal(a.weights, b.weights)
        assert (a.mask is None and b.mask is None) or torch.equal(a.mask, b.mask)
        assert (a.num_samples, a.sent_round) == (b.num_samples, b.sent_round)
    prev = torch.randn(total)
    assert torch.equal(src.aggregate(prev, 12), dst.aggregate(prev, 12))


def test_state_dict_through_a_checkpoint_file_is_safetensors(tmp_path):
    from safetensors import safe_open

    src = ClientBuffer(8, 300, 250, storage="sparse")
    fill(src, SPECS)
    path = tmp_path / "buf.safetensors"
    path.write_bytes(dumps({"buffer": src.state_dict()}))
    with safe_open(str(path), "pt") as f:  # a valid safetensors file, whatever else it holds
        assert f.metadata()["format"] == "prfl-checkpoint" and len(list(f.keys())) > 8
    dst = ClientBuffer(8, 300, 250, storage="sparse")
    dst.load_state_dict(loads(path.read_bytes())["buffer"])
    assert torch.equal(src.plain_average(), dst.plain_average())


def test_load_state_dict_errors_leave_buffer_unchanged():
    buf = ClientBuffer(8, 300, 250)
    fill(buf, SPECS[:2])
    other = ClientBuffer(8, 301, 250)
    fill(other, SPECS)
    with pytest.raises(ValueError, match="num_prunable"):
        buf.load_state_dict(other.state_dict())
    state = ClientBuffer(8, 300, 250)
    fill(state, SPECS)
    broken = state.state_dict()
    del broken["slot.3.values"]
    with pytest.raises(ValueError, match="slot.3.values"):
        buf.load_state_dict(broken)
    assert buf.clients() == [0, 2]


# --------------------------------------------------------------------------- prefix storage
def prefix_fleet(total: int, npr: int, seed: int = 0):
    """Entries whose masks are prefixes of two rankings (as PR-FL's are), plus a dense client,
    one that holds nothing, and one with n = 0: (client, weights, mask, order, n, sent_round)."""
    g = torch.Generator().manual_seed(seed)
    orders = [torch.randperm(npr, generator=g), torch.randperm(npr, generator=g)]
    out = []
    for c, (which, count, n, r) in enumerate([(0, 100, 20, 4), (0, 500, 30, 7), (1, 300, 10, 9), (0, 0, 5, 8),
                                              (1, 800, 0, 6), (0, 100, 40, 9)]):
        order = orders[which]
        mask = torch.zeros(npr, dtype=torch.bool)
        mask[order[:count]] = True
        w = torch.randn(total, generator=g)
        w[:npr] *= mask
        out.append((c, w, mask, order, n, r))
    out.append((len(out), torch.randn(total, generator=g), None, None, 25, 10))  # dense
    return out


def prefix_buffer(fleet: list, total: int, npr: int, path=None) -> ClientBuffer:
    """A prefix-storage buffer holding ``fleet`` (entries of :func:`prefix_fleet`)."""
    buf = ClientBuffer(len(fleet), total, npr, storage="prefix", path=path)
    for c, w, mask, order, n, r in fleet:
        buf.put(c, w, mask, n, r, order=order)
    return buf


@pytest.mark.parametrize("kind", ["dense", "sparse", "prefix", "prefix-file"])
def test_slots_stored_near_the_model_come_back_bit_for_bit(kind, tmp_path):
    """With ``near`` (the global model, in the same checkpoint) every slot's values are stored as
    their difference from it, at the slot's places (dense: the same; sparse: its index; prefix: the
    first ranks of its ranking), and load back exactly, in memory or through a file."""
    import json

    total, npr = 1100, 1000
    if kind.startswith("prefix"):
        src = prefix_buffer(prefix_fleet(total, npr), total, npr, path=tmp_path / "b" if kind == "prefix-file" else None)
    else:
        src = ClientBuffer(8, total, npr, storage=kind)
        fill(src, SPECS)
    model = src.plain_average() + 1e-3  # the slots are near it
    in_memory = src.state_dict(near=model)
    slots = [k for k in in_memory if k.endswith(".values")]
    assert slots and all(isinstance(in_memory[k], Near) for k in slots)
    data = dumps({"model": model, "buffer": in_memory})
    n = int.from_bytes(data[:8], "little")
    begin, end = json.loads(data[8 : 8 + n])["prfl.state"]["data_offsets"]
    rows = json.loads(data[8 + n + begin : 8 + n + end])["tensors"]
    assert sum(str(r.get("values", "")).startswith("delta:") for r in rows) >= len(slots) - 1  # an empty slot has no values
    prev = torch.randn(total, generator=torch.Generator().manual_seed(4))
    for state in (in_memory, loads(data)["buffer"]):
        dst = ClientBuffer(src.num_clients, total, npr, storage=src.storage)
        dst.load_state_dict(state)
        assert torch.equal(dst.aggregate(prev, 12), src.aggregate(prev, 12))
        for c in src.clients():
            assert torch.equal(dst.get(c).weights, src.get(c).weights)
    with pytest.raises(ValueError, match="near must be"):
        src.state_dict(near=model[:-1])


@pytest.mark.parametrize("kind", ["poly", "const"])
@pytest.mark.parametrize("eta_g", [1.0, 0.5])
def test_prefix_storage_aggregates_like_mask_fedavg(kind, eta_g):
    total, npr = 1100, 1000
    fleet = prefix_fleet(total, npr)
    buf = prefix_buffer(fleet, total, npr)
    prev = torch.randn(total, generator=torch.Generator().manual_seed(5))
    coeffs = buf.coefficients(12, kind)
    ids = [f[0] for f in fleet]
    expected = mask_fedavg(prev, [f[1] for f in fleet], [f[2] for f in fleet], [coeffs[c] for c in ids], npr, eta_g=eta_g)
    got = buf.aggregate(prev, 12, kind=kind, eta_g=eta_g)
    assert torch.allclose(got, expected, rtol=1e-6, atol=1e-7)  # another summation order
    # the safeguard holds exactly: no client holds ranks >= 800 of ranking 1 that ranking 0's
    # 500 and the dense client miss... so use a buffer without the dense client to check it
    sparse_only = ClientBuffer(len(fleet), total, npr, storage="prefix")
    for c, w, mask, order, n, r in fleet[:-1]:
        sparse_only.put(c, w, mask, n, r, order=order)
    got = sparse_only.aggregate(prev, 12, kind=kind)
    held = torch.zeros(npr, dtype=torch.bool)
    for _, _, mask, _, n, _ in fleet[:-1]:
        if n > 0:
            held |= mask
    assert not bool(held.all())
    assert torch.equal(got[:npr][~held], prev[:npr][~held])  # a weight nobody holds keeps its value
    # entries, masks and the plain average come back as they were put
    for c, w, mask, _, _, _ in fleet:
        e = buf.get(c)
        assert torch.equal(e.weights, w) and (mask is None and e.mask is None or torch.equal(e.mask, mask))
    assert torch.allclose(buf.plain_average(), weighted_average([f[1] for f in fleet], [f[4] for f in fleet]))


def test_prefix_storage_holds_each_ranking_once_and_round_trips():
    total, npr = 1100, 1000
    fleet = prefix_fleet(total, npr)
    buf = ClientBuffer(len(fleet), total, npr, storage="prefix")
    sparse = ClientBuffer(len(fleet), total, npr, storage="sparse")
    for c, w, mask, order, n, r in fleet:
        buf.put(c, w, mask, n, r, order=order)
        sparse.put(c, w, mask, n, r)
    assert len(buf._orders) == 2
    values = sum(f[2].sum().item() if f[2] is not None else total for f in fleet) + sum(
        total - npr for f in fleet if f[2] is not None)
    assert buf.nbytes() == 4 * values + 2 * 8 * npr  # values + suffixes, and the two rankings once
    # a checkpoint restores the same buffer (same aggregate, bit for bit)
    prev = torch.randn(total, generator=torch.Generator().manual_seed(1))
    copy = ClientBuffer(len(fleet), total, npr, storage="prefix")
    copy.load_state_dict(buf.state_dict())
    assert torch.equal(copy.aggregate(prev, 12), buf.aggregate(prev, 12)) and len(copy._orders) == 2
    # replacing every slot of ranking 1 drops that ranking
    for c, w, mask, order, n, r in fleet:
        if order is not None and order is fleet[2][3]:
            buf.put(c, torch.zeros(total), None, n, r + 1)
    assert len(buf._orders) == 1


def test_prefix_storage_refuses_what_it_cannot_store():
    total, npr = 20, 16
    buf = ClientBuffer(2, total, npr, storage="prefix")
    order = torch.arange(npr)
    mask = torch.zeros(npr, dtype=torch.bool)
    mask[:4] = True
    w = torch.zeros(total)
    w[:4] = 1.0
    with pytest.raises(ValueError, match="needs the ranking order"):
        buf.put(0, w, mask, 1, 0)
    with pytest.raises(ValueError, match="not the first 4 entries"):
        buf.put(0, w, mask, 1, 0, order=order.flip(0))
    w[10] = 2.0
    with pytest.raises(ValueError, match="outside the mask are nonzero"):
        buf.put(0, w, mask, 1, 0, order=order)
    assert len(buf) == 0
    # the prefix check is kept for a mask and an order, and made again once either is edited in place
    w[10] = 0.0
    buf.put(0, w, mask, 1, 0, order=order)
    buf.put(1, w, mask, 1, 0, order=order)
    mask[3], mask[5] = False, True
    with pytest.raises(ValueError, match="not the first 4 entries"):
        buf.put(1, torch.cat([w[:npr] * mask, w[npr:]]), mask, 1, 1, order=order)
    mask[3], mask[5] = True, False
    order[[3, 5]] = order[[5, 3]]
    with pytest.raises(ValueError, match="not the first 4 entries"):
        buf.put(1, w, mask, 1, 1, order=order)
    assert len(buf) == 2


def test_compacted_rankings_aggregate_the_same_and_take_less():
    total, npr = 1100, 1000
    fleet = prefix_fleet(total, npr)
    buf = prefix_buffer(fleet, total, npr)
    prev = torch.randn(total, generator=torch.Generator().manual_seed(2))
    before, nbytes = buf.aggregate(prev, 12), buf.nbytes()
    held = buf.compact_orders()
    caps = {}
    for _, _, mask, order, _, _ in fleet:
        if order is not None:
            caps[id(order)] = max(caps.get(id(order), 0), int(mask.sum()))
    # the old rankings are held as int32 copies of the prefixes in use: 4 bytes a rank
    assert held == 4 * sum(caps.values()) and buf.nbytes() == nbytes - 2 * 8 * npr + held
    assert all(o.dtype == torch.int32 for o in buf._orders.values())
    assert torch.equal(buf.aggregate(prev, 12), before)
    for c, w, mask, _, _, _ in fleet:
        e = buf.get(c)
        assert torch.equal(e.weights, w) and (mask is None or torch.equal(e.mask, mask))
    # a later slot of an old ranking, given the full order or a prefix, joins the held ranking and
    # may extend it; a different ranking gets its own key
    c, w, mask, order, n, r = next(f for f in fleet if f[3] is not None)
    dense_order = order
    buf.put(c, w, mask, n, r + 1, order=dense_order[: int(mask.sum())].clone())
    buf.put(c, w, mask, n, r + 1, order=dense_order.clone())
    assert len(buf._orders) == 2 and buf._orders[buf._slots[c].order_key].numel() == npr
    other = torch.randperm(npr, generator=torch.Generator().manual_seed(9))
    m2 = torch.zeros(npr, dtype=torch.bool)
    m2[other[:100]] = True
    w2 = torch.zeros(total)
    w2[:npr][m2] = 1.0
    buf.put(c, w2, m2, n, r + 2, order=other[:100].clone())
    assert len(buf._orders) == 3 or len(buf._orders) == 2  # the old key is dropped if c was its only user
    assert torch.equal(buf.get(c).mask, m2)
    with pytest.raises(ValueError, match="at least 100 long"):
        buf.put(c, w2, m2, n, r + 3, order=other[:99].clone())


def test_file_backed_prefix_buffer_matches_memory_and_reuses_its_file(tmp_path):
    total, npr = 1100, 1000
    fleet = prefix_fleet(total, npr)
    mem, disk = prefix_buffer(fleet, total, npr), prefix_buffer(fleet, total, npr, path=tmp_path)
    assert list(tmp_path.iterdir()) == []  # the value file is unlinked: it goes away with the process
    prev = torch.randn(total, generator=torch.Generator().manual_seed(3))
    for _ in range(2):  # pages handed back after the first aggregation are read again
        assert torch.equal(disk.aggregate(prev, 12), mem.aggregate(prev, 12))
    assert torch.equal(disk.plain_average(), mem.plain_average())
    for c, w, mask, _, _, _ in fleet:
        assert torch.equal(disk.get(c).weights, w)
    size = disk._arena.size
    for c, w, mask, order, n, r in fleet:  # same sizes again: regions are reused, the file does not grow
        disk.put(c, w * 2, mask, n, r + 1, order=order)
        mem.put(c, w * 2, mask, n, r + 1, order=order)
    assert disk._arena.size == size
    assert torch.equal(disk.aggregate(prev, 13), mem.aggregate(prev, 13))
    copy = ClientBuffer(len(fleet), total, npr, storage="prefix", path=tmp_path)
    copy.load_state_dict(disk.state_dict())
    assert torch.equal(copy.aggregate(prev, 13), mem.aggregate(prev, 13))
    with pytest.raises(ValueError, match="needs storage='dense'"):
        ClientBuffer(2, total, npr, storage="sparse", path=tmp_path)



@pytest.mark.parametrize("block", [3, 256])  # blocks inside a page: releases widened to whole pages
def test_prefix_sums_do_not_depend_on_the_block_size(monkeypatch, tmp_path, block):
    """Rank-space sums run block by block, handing file pages back per block; the result is the
    one of a single block, bit for bit, in memory and from the file."""
    import prfl.aggregation as agg

    total, npr = 5100, 5000
    fleet = prefix_fleet(total, npr)
    prev = torch.randn(total, generator=torch.Generator().manual_seed(8))
    mem, disk = prefix_buffer(fleet, total, npr), prefix_buffer(fleet, total, npr, path=tmp_path)
    want = (mem.aggregate(prev, 12, eta_g=0.5), mem.plain_average())
    monkeypatch.setattr(agg, "BLOCK", block)
    for buf in (mem, disk):
        assert torch.equal(buf.aggregate(prev, 12, eta_g=0.5), want[0])
        assert torch.equal(buf.plain_average(), want[1])

FILE_RSS = """
import torch
from prfl.allocator import release_free_heap, tune_allocator
from prfl.buffer import ClientBuffer

def rss():
    with open("/proc/self/status") as fh:
        kb = {{l.split(":")[0]: int(l.split()[1]) * 1024 for l in fh if l.startswith(("RssAnon:", "RssFile:"))}}
    return kb["RssAnon"], kb["RssFile"]

npr, total, clients, count = 4_000_000, 4_000_100, 64, 1_000_000  # 64 slots of 4 MB
order = torch.randperm(npr, generator=torch.Generator().manual_seed(0))
mask = torch.zeros(npr, dtype=torch.bool)
mask[order[:count]] = True
w = torch.zeros(total)
w[:npr][mask] = 1.0
buf = ClientBuffer(clients, total, npr, storage="prefix", path={path!r})
assert tune_allocator()
release_free_heap(keep=0)
anon0, file0 = rss()
for c in range(clients):
    buf.put(c, w, mask, 1, 0, order=order)
peak_file = [0]
release = buf._arena.release
def watched(t, *span):  # the file pages mapped in while the buffer is being read, slot after slot
    peak_file[0] = max(peak_file[0], rss()[1])
    release(t, *span)
buf._arena.release = watched
new = buf.aggregate(torch.zeros(total), 1)
assert float(new[order[0]]) == 1.0 and float(new[order[-1]]) == 0.0
avg = buf.plain_average()
assert float(avg[order[0]]) == 1.0
assert peak_file[0] - file0 < 32 * 2**20, (file0, peak_file)
_, file1 = rss()
release_free_heap(keep=0)  # the freed temporaries of puts and aggregation go back too
anon1, _ = rss()
# the 256 MB of values are in neither the file pages mapped in nor the process's own memory
assert file1 - file0 < 32 * 2**20 and anon1 - anon0 < 32 * 2**20, (anon0, anon1, file0, file1)
print("ok")
"""


def test_file_backed_prefix_values_are_not_resident(tmp_path):
    import subprocess
    import sys

    import os

    # the compiled aggregation kernels map torch.compile's libraries in (~270 MB of file pages
    # that are not the buffer's): this test measures the buffer's own pages, so it runs eagerly
    env = {**os.environ, "PRFL_COMPILE": "0"}
    out = subprocess.run([sys.executable, "-c", FILE_RSS.format(path=str(tmp_path))], capture_output=True, text=True,
                         env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


# --------------------------------------------------------------------------- streamed checkpoints
@pytest.mark.parametrize("on_disk", [False, True])
def test_file_backed_prefix_buffer_checkpoint_reads_one_slot_at_a_time(tmp_path, on_disk):
    """A file-backed prefix buffer's state goes through a checkpoint file and back slot by slot,
    as stored (no densifying), into a buffer in a file or in RAM, and aggregates bit for bit as
    before; restoring a buffer from its own state works too (its file regions are not reused
    before they are read)."""
    total, npr = 1100, 1000
    fleet = prefix_fleet(total, npr)
    src = prefix_buffer(fleet, total, npr, path=tmp_path / "src")
    state = loads(dumps({"buffer": src.state_dict()}))["buffer"]
    slots = [k for k in state if k.endswith(".values")]
    assert slots and all(isinstance(state[k], Streamed) for k in slots)
    live, peak = [0], [0]
    for k in slots:  # count how many slot values are read and not yet dropped at once
        inner = state[k]

        def read(inner=inner):
            live[0] += 1
            peak[0] = max(peak[0], live[0])
            t = inner.read()
            weakref.finalize(t, lambda: live.__setitem__(0, live[0] - 1))
            return t

        state[k] = Streamed(read=read, shape=inner.shape, dtype=inner.dtype)
    dst = ClientBuffer(len(fleet), total, npr, storage="prefix", path=tmp_path / "dst" if on_disk else None)
    dst.load_state_dict(state)
    assert peak[0] == 1 and live[0] == 0
    prev = torch.randn(total, generator=torch.Generator().manual_seed(4))
    assert torch.equal(dst.aggregate(prev, 12), src.aggregate(prev, 12))
    assert torch.equal(dst.plain_average(), src.plain_average())
    src.load_state_dict(src.state_dict())  # its own state, straight from its own file
    assert torch.equal(src.aggregate(prev, 12), dst.aggregate(prev, 12))


def test_a_bad_slot_in_a_stored_state_leaves_the_buffer_unchanged(tmp_path):
    total, npr = 1100, 1000
    fleet = prefix_fleet(total, npr)
    buf = prefix_buffer(fleet, total, npr, path=tmp_path)
    prev = torch.randn(total)
    before = buf.aggregate(prev, 12)
    state = prefix_buffer(fleet, total, npr).state_dict()
    key = next(k for k in state if k.endswith(".prefix"))
    c = key.split(".")[1]
    state[f"slot.{c}.values"] = torch.zeros(3)  # not count + suffix values
    with pytest.raises(ValueError, match=f"slot.{c}.values holds 3 values"):
        buf.load_state_dict(state)
    assert torch.equal(buf.aggregate(prev, 12), before)


def test_restored_rankings_keep_their_keys_after_compaction():
    """Two rankings held under two keys stay two after a checkpoint, even once compaction has cut
    one to a prefix of the other: the restored buffer sums in the same groups, bit for bit."""
    total, npr = 30, 24
    a = torch.randperm(npr, generator=torch.Generator().manual_seed(3))
    b = torch.cat([a[:2], a[2:].flip(0)])  # agrees with a on its first 2 ranks only
    g = torch.Generator().manual_seed(0)  # values whose fp32 sums differ when the two groups are merged
    buf = ClientBuffer(2, total, npr, storage="prefix")
    for client, order, count in ((0, a, 12), (1, b, 2)):
        mask = torch.zeros(npr, dtype=torch.bool)
        mask[order[:count]] = True
        w = torch.randn(total, generator=g)
        w[:npr] *= mask
        buf.put(client, w, mask, 3 + 4 * client, 0, order=order)
    buf.compact_orders()  # b is now held as a[:2]
    copy = ClientBuffer(2, total, npr, storage="prefix")
    copy.load_state_dict(buf.state_dict())
    assert len(copy._orders) == len(buf._orders) == 2
    prev = torch.randn(total, generator=g)
    for dtype in (torch.float32, torch.float64):
        assert torch.equal(copy.aggregate(prev, 1, accumulate_dtype=dtype), buf.aggregate(prev, 1, accumulate_dtype=dtype))


@pytest.mark.parametrize("storage", ["dense", "sparse"])
def test_put_of_a_checked_update_stores_it_as_it_is(storage):
    """zero_outside_mask: the caller vouches for W ⊙ m (a validated update); the same slot results."""
    mask = torch.tensor([True, False, True, False])
    w = torch.tensor([1.0, 0.0, 3.0, 0.0, 5.0, 6.0])
    a, b = ClientBuffer(1, 6, 4, storage=storage), ClientBuffer(1, 6, 4, storage=storage)
    a.put(0, w, mask, 2, 0)
    b.put(0, w, mask, 2, 0, zero_outside_mask=True)
    assert torch.equal(a.get(0).weights, b.get(0).weights) and torch.equal(a.get(0).mask, b.get(0).mask)
    assert torch.equal(a.aggregate(torch.zeros(6), 0), b.aggregate(torch.zeros(6), 0))


@pytest.mark.parametrize("storage", ["dense", "sparse", "prefix"])
def test_a_copy_aggregates_like_the_buffer_and_is_independent_of_it(storage):
    g = torch.Generator().manual_seed(3)
    buf = ClientBuffer(3, 8, 6, storage=storage, frozen=Staleness("poly", 0.6, 2.0))
    order = torch.randperm(6, generator=g)
    for c in range(3):
        m = torch.zeros(6, dtype=torch.bool)
        m[order[: 2 + 2 * c]] = True
        w = torch.randn(8, generator=g)
        w[:6][~m] = 0
        buf.put(c, w, m, 10 + c, c, order=order if storage == "prefix" else None, arrival_round=c + 1,
                zero_outside_mask=True)
    prev = torch.randn(8, generator=g)
    cp = buf.copy()
    assert cp.clients() == buf.clients() and cp.storage == storage
    assert torch.equal(cp.aggregate_running(prev), buf.aggregate_running(prev))
    cp.put(0, torch.ones(8), None, 5, 3, arrival_round=3)  # the copy moves on alone
    assert not torch.equal(cp.aggregate_running(prev), buf.aggregate_running(prev))
    assert torch.equal(buf.get(0).weights, buf.copy().get(0).weights)


def test_a_file_backed_buffer_is_not_copied(tmp_path):
    buf = ClientBuffer(2, 4, 3, path=tmp_path / "slots.bin")
    with pytest.raises(ValueError, match="file-backed buffer"):
        buf.copy()
