"""Incremental MaskFedAvg (frozen staleness, running sums) against the full recomputation."""

from __future__ import annotations

import math

import pytest
import torch

import prfl.buffer.running as buffer_module
from prfl.aggregation import Staleness, mask_fedavg
from prfl.buffer import ClientBuffer
from prfl.runtime.checkpoint import dumps, loads

NPR, TOTAL, CLIENTS = 3000, 3020, 12
DENSITIES = (0.1, 0.3, 0.6, 1.0)


def scripted_arrivals(count: int, seed: int):
    """``count`` random arrivals: client, weights (W ⊙ m), mask, ranking, n, sent and arrival rounds.
    A new ranking every 100 arrivals; densities mixed; staleness 0..9 rounds."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(NPR, generator=g)
    masks: dict[float, torch.Tensor] = {}  # one mask object per density and ranking, as a policy hands out
    for step in range(count):
        if step % 100 == 99:
            order = torch.randperm(NPR, generator=g)
            masks = {}
        c = int(torch.randint(CLIENTS, (1,), generator=g))
        rho = DENSITIES[int(torch.randint(len(DENSITIES), (1,), generator=g))]
        w = torch.randn(TOTAL, generator=g) * float(torch.rand(1, generator=g) * 3 + 0.01)
        mask = None
        if rho < 1.0:
            if rho not in masks:
                masks[rho] = torch.zeros(NPR, dtype=torch.bool)
                masks[rho][order[: math.ceil(rho * NPR)]] = True
            mask = masks[rho]
            w[:NPR] *= mask
        n = int(torch.randint(1, 60, (1,), generator=g))
        tau = int(torch.randint(10, (1,), generator=g))
        yield c, w, mask, order, n, max(0, step - tau), step


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max_k |got_k - want_k| / max(|want_k|, 1e-3): relative, except for averages within 1e-3 of 0
    (where the inputs, of size 0.01-3, set the scale)."""
    return float(((got.double() - want.double()).abs() / want.double().abs().clamp(min=1e-3)).max())


@pytest.mark.parametrize("storage, recompute_every, partial", [
    ("dense", 1000, True), ("dense", 37, False), ("sparse", 1000, True), ("prefix", 1000, True),
    ("prefix", 1000, False), ("prefix-file", 250, True)])
def test_incremental_equals_full_recomputation_over_1000_arrivals(storage, recompute_every, partial, tmp_path,
                                                                   monkeypatch):
    """partial: masked arrivals recompute only the positions they touched (whatever their share)."""
    monkeypatch.setattr(buffer_module, "PARTIAL_FRACTION", 1.0 if partial else 0.0)
    kind = "prefix" if storage == "prefix-file" else storage
    path = tmp_path if storage == "prefix-file" else None
    frozen = Staleness("poly", 0.6)
    buf = ClientBuffer(CLIENTS, TOTAL, NPR, storage=kind, path=path, frozen=frozen, recompute_every=recompute_every)
    prev = torch.randn(TOTAL)
    worst = 0.0
    for step, (c, w, mask, order, n, sent, arrived) in enumerate(scripted_arrivals(1000, seed=7)):
        buf.put(c, w, mask, n, sent, order=order if kind == "prefix" and mask is not None else None,
                arrival_round=arrived)
        if step % 89 == 88:  # a roll-back: prev is not the last aggregate (every weight recomputed)
            prev = prev + 0.5
        eta = 0.5 if step % 131 == 130 else 1.0
        full = buf.aggregate(prev, arrived, kind="poly", a=0.6, eta_g=eta, staleness_mode="frozen")
        new = buf.aggregate_running(prev, eta_g=eta)
        worst = max(worst, relative_error(new, full))
        prev = new
    assert worst <= 1e-6, worst
    # the holder counts are integers: kept exactly, whatever arrivals skipped (a client back at the same positions)
    counts = buf._running.h.clone()
    buf._recompute()
    assert torch.equal(counts, buf._running.h)


def test_running_sums_against_mask_fedavg_with_hand_coefficients():
    """The running aggregate is MaskFedAvg with c_i = s(a_i - n'_i) n_i, computed here independently."""
    frozen = Staleness("hinge", 0.5, 2.0)
    buf = ClientBuffer(CLIENTS, TOTAL, NPR, frozen=frozen)
    latest = {}
    prev = torch.randn(TOTAL)
    for c, w, mask, _, n, sent, arrived in scripted_arrivals(150, seed=3):
        buf.put(c, w, mask, n, sent, arrival_round=arrived)
        latest[c] = (w, mask, n * frozen(arrived - sent))
    ids = sorted(latest)
    want = mask_fedavg(prev, [latest[c][0] for c in ids], [latest[c][1] for c in ids], [latest[c][2] for c in ids], NPR)
    assert relative_error(buf.aggregate_running(prev), want) <= 1e-6


@pytest.mark.parametrize("storage, other", [("dense", "sparse"), ("dense", "dense"), ("prefix", "prefix")])
def test_checkpoint_resumes_the_running_sums_bit_for_bit(storage, other):
    """state_dict recomputes the sums exactly, and so does load_state_dict: both buffers then
    continue with the same aggregates, bit for bit (not merely close). The resumed buffer is
    handed new mask objects of the same values, as a resumed policy hands out: whether a
    client's old and new slot share their mask (the running sums' shared-mask path, with its
    own rounding) must not change."""
    frozen = Staleness()
    live = ClientBuffer(CLIENTS, TOTAL, NPR, storage=storage, frozen=frozen)
    arrivals = list(scripted_arrivals(300, seed=11))
    prev = torch.zeros(TOTAL)

    def order_for(buf, order, mask):
        return order if buf.storage == "prefix" and mask is not None else None

    split = 150  # mid-way between two rankings: mask objects of before the checkpoint are used after it
    for c, w, mask, order, n, sent, arrived in arrivals[:split]:
        live.put(c, w, mask, n, sent, order=order_for(live, order, mask), arrival_round=arrived)
        prev = live.aggregate_running(prev)
    state = loads(dumps({"buffer": live.state_dict()}))["buffer"]
    resumed = ClientBuffer(CLIENTS, TOTAL, NPR, storage=other, frozen=frozen)
    resumed.load_state_dict(state)
    fresh: dict[int, torch.Tensor] = {}  # the resumed side's mask objects: same values, new tensors
    prev_live, prev_resumed = prev, prev.clone()
    for c, w, mask, order, n, sent, arrived in arrivals[split:]:
        mask2 = None if mask is None else fresh.setdefault(id(mask), mask.clone())
        live.put(c, w, mask, n, sent, order=order_for(live, order, mask), arrival_round=arrived)
        resumed.put(c, w, mask2, n, sent, order=order_for(resumed, order, mask), arrival_round=arrived)
        prev_live = live.aggregate_running(prev_live)
        prev_resumed = resumed.aggregate_running(prev_resumed)
        assert torch.equal(prev_live, prev_resumed)
        if other == storage:  # the float64 sums themselves, not only their float32 quotient
            assert torch.equal(live._running.m, resumed._running.m) and torch.equal(live._running.w, resumed._running.w)


def test_arrival_round_checks_and_running_needs_frozen():
    buf = ClientBuffer(2, 6, 4)
    with pytest.raises(ValueError, match="arrival_round"):
        buf.put(0, torch.ones(6), None, 1, 3, arrival_round=2)
    buf.put(0, torch.ones(6), None, 1, 3)
    with pytest.raises(ValueError, match="frozen=Staleness"):
        buf.aggregate_running(torch.zeros(6))
    with pytest.raises(ValueError, match="recompute_every"):
        ClientBuffer(2, 6, 4, frozen=Staleness(), recompute_every=0)


@pytest.mark.parametrize("storage", ["dense", "sparse", "prefix"])
@pytest.mark.parametrize("partial", [True, False])
def test_exact_zero_survives_the_drift_of_running_sums(storage, partial, monkeypatch):
    """Clients A and B hold +0.7 and -0.7 at weight 0 with equal coefficients, so its average is
    exactly 0 and prev is kept; client C's 0.3 there came and went, which leaves the running sum a
    rounding residue, not 0. The decision is taken on the terms: prev is kept on both paths. With
    unequal coefficients the same weights average to a value that is not zero."""
    monkeypatch.setattr(buffer_module, "PARTIAL_FRACTION", 1.0 if partial else 0.0)
    order_a = torch.tensor([0, 1, 2, 3])
    order_b = torch.tensor([3, 2, 1, 0])
    prev = torch.tensor([9.0, 9.0, 9.0, 9.0, 9.0])
    for n_b, zero in ((5, True), (6, False)):
        buf = ClientBuffer(3, 5, 4, storage=storage, frozen=Staleness("poly", 0.6))
        buf.put(0, torch.tensor([0.7, 1.0, 1.0, 1.0, 1.0]), None, 5, 0, arrival_round=1)
        buf.put(1, torch.tensor([-0.7, 2.0, 2.0, 2.0, 1.0]), None, n_b, 0, arrival_round=1)
        c_mask = torch.tensor([True, True, False, False])
        buf.put(2, torch.tensor([0.3, 5.0, 0.0, 0.0, 1.0]), c_mask, 7, 0, order=order_a, arrival_round=3)
        out = buf.aggregate_running(prev)
        assert out[0] != 9.0
        buf.put(2, torch.tensor([0.0, 0.0, 0.0, 4.0, 1.0]), torch.tensor([False, False, False, True]), 7, 3,
                order=order_b, arrival_round=4)
        if zero:
            buf._running.flush()
            assert buf._running.w[0] != 0.0  # the residue the rule must see through
        before = out
        out = buf.aggregate_running(before)
        full = buf.aggregate(before, 4, staleness_mode="frozen")
        if zero:  # the previous value, 0.3 cC / (cA + cB + cC), is kept
            assert out[0] == before[0] and full[0] == before[0]
        else:
            want = 0.7 * (5 - n_b) / (5 + n_b)
            assert out[0] != 9.0 and torch.isclose(out[0], torch.tensor(want)) and torch.isclose(full[0], torch.tensor(want))


@pytest.mark.parametrize("storage", ["dense", "sparse", "prefix"])
def test_removed_slot_leaves_the_running_sums(storage):
    """A removed client (PR-FL evicts a quarantined one: under frozen staleness its weight would
    never decay) no longer counts, on the running path as on the full one."""
    buf = ClientBuffer(CLIENTS, TOTAL, NPR, storage=storage, frozen=Staleness())
    prev = torch.zeros(TOTAL)
    for c, w, mask, order, n, sent, arrived in scripted_arrivals(60, seed=5):
        buf.put(c, w, mask, n, sent, order=order if storage == "prefix" and mask is not None else None,
                arrival_round=arrived)
        prev = buf.aggregate_running(prev)
    gone = buf.clients()[:3]
    for c in gone:
        assert buf.remove(c)
    assert not buf.remove(gone[0]) and all(c not in buf for c in gone)
    full = buf.aggregate(prev, 60, staleness_mode="frozen")
    assert relative_error(buf.aggregate_running(prev), full) <= 1e-6


def test_a_mask_edited_in_place_is_read_again():
    """Positions are cached per mask object; an in-place edit (a new version of the tensor) is seen."""
    buf = ClientBuffer(2, 6, 4, frozen=Staleness("const"))
    mask = torch.tensor([True, False, False, False])
    buf.put(0, torch.tensor([2.0, 0, 0, 0, 1, 1]), mask, 1, 0)
    mask[1] = True
    buf.put(1, torch.tensor([4.0, 6.0, 0, 0, 1, 1]), mask, 1, 0)
    out = buf.aggregate_running(torch.full((6,), 9.0))
    assert out.tolist() == [3.0, 6.0, 9.0, 9.0, 1.0, 1.0]
