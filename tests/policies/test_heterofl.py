"""HeteroFL (width and mask modes) driven by hand-scripted events, plus one simulated run.

The width-mode numbers use a tiny MLP 3 -> 4 -> 2 (hidden=(4,)), whose flat vector (26 weights,
20 prunable) is laid out as

    W1 (4x3) @ [0, 12)   W2 (2x4) @ [12, 20)   b1 (4) @ [20, 24)   b2 (2) @ [24, 26)

Its width-1/2 model is W1[:2, :], W2[:, :2], b1[:2], b2: coordinates
[0..5, 12, 13, 16, 17, 20, 21, 24, 25] (14 weights, 10 of them prunable).
"""

from __future__ import annotations

import math

import pytest
import torch

from policy_script import MiniLoop, arrive, checkpoint, task_of, tasks, updates
from prfl.aggregation import mask_fedavg
from prfl.models import build_model
from prfl.policies.base import PolicyContext, Record, Start, TaskFailed
from prfl.policies.heterofl import (
    PAPER_DENSITIES,
    HeteroFL,
    HeteroFLConfig,
    default_densities,
    default_rates,
    holder_average,
    sparse_bytes,
    spread_levels,
)

HALF = [0, 1, 2, 3, 4, 5, 12, 13, 16, 17, 20, 21, 24, 25]


def mlp(width: float, scaler: bool = False) -> torch.nn.Module:
    return build_model("mlp", (3,), 2, hidden=(4,), width_mult=width, scaler=scaler)


def mlp_ctx(num_samples=(1, 3), labels=((0, 1), (1,)), init: torch.Tensor | float = 0.0, **kw) -> PolicyContext:
    w = init if isinstance(init, torch.Tensor) else torch.full((26,), float(init))
    return PolicyContext(
        num_clients=len(num_samples), num_samples=num_samples, initial_weights=w, num_prunable=20,
        layer_bounds=((0, 12), (12, 20)), client_labels=labels, num_classes=2, model_builder=kw.pop("builder", mlp),
        **kw,
    )


def full_vector(w1: list[float], w2: list[float], b1: list[float], b2: list[float]) -> torch.Tensor:
    return torch.tensor(w1 + w2 + b1 + b2, dtype=torch.float32)


# --------------------------------------------------------------------------- defaults
def test_default_levels():
    assert default_rates(10) == (1, 1, 0.5, 0.5, 0.25, 0.25, 0.125, 0.125, 0.0625, 0.0625)
    assert default_rates(3) == (1, 0.5, 0.25)
    assert default_rates(7) == (1, 1, 0.5, 0.5, 0.25, 0.125, 0.0625)  # larger groups first
    assert default_densities(10) == PAPER_DENSITIES == (1, 1, 0.6, 0.6, 0.3, 0.3, 0.1, 0.1, 0.1, 0.1)
    assert default_densities(6) == (1, 1, 0.6, 0.6, 0.3, 0.1)
    assert spread_levels((1.0, 0.5), 1) == (1.0,)
    # 4 m + min(ceil(N / 8), 4 m) + 1 + 4 (T - N)
    assert sparse_bytes(2, 4, 6) == 8 + 1 + 1 + 8
    assert sparse_bytes(1, 100, 110) == 4 + 4 + 1 + 40  # index list beats the 13-byte bitmap
    assert sparse_bytes(50, 100, 110) == 200 + 13 + 1 + 40


def test_config_validation():
    assert HeteroFLConfig(rates=[1, 0.5]).rates == (1.0, 0.5)  # lists from YAML become tuples
    with pytest.raises(ValueError, match="mode"):
        HeteroFLConfig(mode="depth")
    with pytest.raises(ValueError, match=r"rates\[1\] must be > 0"):
        HeteroFLConfig(rates=(1.0, 0.0))
    with pytest.raises(ValueError, match="densities applies to mode 'mask'"):
        HeteroFLConfig(densities=(1.0, 0.5))
    with pytest.raises(ValueError, match="scaler applies to mode 'width'"):
        HeteroFLConfig(mode="mask", scaler=True)
    with pytest.raises(ValueError, match="rates has 3 entries for 2 clients"):
        HeteroFL(mlp_ctx(), HeteroFLConfig(rates=(1, 0.5, 0.5)))
    with pytest.raises(ValueError, match="client_labels"):
        HeteroFL(mlp_ctx(labels=None), HeteroFLConfig(rates=(1, 0.5)))
    with pytest.raises(ValueError, match="model_builder"):
        HeteroFL(mlp_ctx(builder=None), HeteroFLConfig(rates=(1, 0.5), label_split=False))
    with pytest.raises(ValueError, match="model option scaler: true"):
        HeteroFL(mlp_ctx(), HeteroFLConfig(rates=(1, 0.5), scaler=True))
    with pytest.raises(ValueError, match="policy option scaler: true"):
        HeteroFL(mlp_ctx(builder=lambda w: mlp(w, scaler=True)), HeteroFLConfig(rates=(1, 0.5)))


# --------------------------------------------------------------------------- width mode
def test_width_tasks_carry_the_sliced_sub_model():
    init = torch.arange(26, dtype=torch.float32)
    pol = HeteroFL(mlp_ctx(init=init), HeteroFLConfig(rates=(1.0, 0.5)))
    acts = pol.on_event(Start(0.0))
    t0, t1 = task_of(acts, 0), task_of(acts, 1)
    assert (t0.width, t0.density, t0.mask) == (1.0, 1.0, None)
    assert t0.weights is pol.weights and t0.download_bytes == t0.upload_bytes == 4 * 26
    assert (t1.width, t1.density, t1.mask) == (0.5, 10 / 20, None)
    assert t1.weights.numel() == sum(p.numel() for p in mlp(0.5).parameters()) == 14
    assert t1.weights.tolist() == [float(i) for i in HALF]
    assert t1.download_bytes == t1.upload_bytes == 4 * 14
    # a result must have the sub-model's length; a wrong one is rejected: recorded, its task
    # failed, nothing aggregated
    acts = arrive(pol, t1, torch.zeros(26))
    (rej,) = [a.data for a in acts if isinstance(a, Record) and a.kind == "rejected"]
    assert rej["check"] == "shape" and "(14,)" in rej["reason"] and rej["client"] == 1
    assert set(pol.in_flight) == {t0.task_id} and pol.version == 0


def test_width_aggregation_over_holders_with_label_split():
    # n = (1, 3); client 0 (rate 1) holds labels {0, 1}, client 1 (rate 1/2) holds only label 1.
    pol = HeteroFL(mlp_ctx(), HeteroFLConfig(rates=(1.0, 0.5)))
    acts = pol.on_event(Start(0.0))
    arrive(pol, task_of(acts, 0), torch.full((26,), 2.0))
    acts = arrive(pol, task_of(acts, 1), torch.full((14,), 6.0))
    # shared coordinates: (1 * 2 + 3 * 6) / 4 = 5; only client 0 holds it: 2;
    # output row / bias of class 0: client 1 lacks label 0, so client 0 alone: 2
    expected = full_vector(
        w1=[5, 5, 5, 5, 5, 5, 2, 2, 2, 2, 2, 2],
        w2=[2, 2, 2, 2,   # class 0
            5, 5, 2, 2],  # class 1: columns 0-1 shared, 2-3 full model only
        b1=[5, 5, 2, 2],
        b2=[2, 5],
    )
    assert torch.equal(pol.weights, expected)
    (upd,) = updates(acts)
    assert upd["round"] == 1 and upd["clients"] == [0, 1] and upd["levels"] == [1.0, 0.5]
    assert upd["mode"] == "width" and pol.participation == [1, 1]
    # the next round hands out slices of the new weights
    nxt = task_of(acts, 1)
    assert nxt.version == 1 and torch.equal(nxt.weights, expected[HALF])


def test_width_aggregation_without_label_split():
    pol = HeteroFL(mlp_ctx(), HeteroFLConfig(rates=(1.0, 0.5), label_split=False))
    acts = pol.on_event(Start(0.0))
    arrive(pol, task_of(acts, 0), torch.full((26,), 2.0))
    arrive(pol, task_of(acts, 1), torch.full((14,), 6.0))
    expected = full_vector(
        w1=[5] * 6 + [2] * 6, w2=[5, 5, 2, 2, 5, 5, 2, 2], b1=[5, 5, 2, 2], b2=[5, 5],
    )
    assert torch.equal(pol.weights, expected)


def test_coordinates_nobody_holds_keep_their_value():
    # client 0 (full model) fails: only the half model's coordinates are averaged, and of those the
    # class-0 output row and bias are held by client 1 alone, which lacks label 0: they keep -1 too.
    pol = HeteroFL(mlp_ctx(init=-1.0), HeteroFLConfig(rates=(1.0, 0.5)))
    acts = pol.on_event(Start(0.0))
    t0, t1 = task_of(acts, 0), task_of(acts, 1)
    assert pol.on_event(TaskFailed(1.0, 0, t0.task_id, "offline")) == []
    sub = torch.arange(14, dtype=torch.float32)  # distinct values show where each one lands
    acts = arrive(pol, t1, sub, now=2.0)
    expected = full_vector(
        w1=[0, 1, 2, 3, 4, 5, -1, -1, -1, -1, -1, -1],  # sub[0:6] -> W1 rows 0-1
        w2=[-1, -1, -1, -1,  # class 0: sub[6], sub[7] left out (label split)
            8, 9, -1, -1],  # class 1: sub[8], sub[9] -> W2[1, 0:2]
        b1=[10, 11, -1, -1],  # sub[10:12]
        b2=[-1, 13],  # sub[12] (class 0) left out, sub[13] -> b2[1]
    )
    assert torch.equal(pol.weights, expected)
    assert updates(acts)[0]["failed"] == [0] and pol.participation == [0, 1]


def test_holder_average_by_hand():
    prev = torch.tensor([7.0, 7.0, 7.0, 7.0])
    new = holder_average(
        prev,
        values=[torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([10.0, 20.0])],
        indices=[None, torch.tensor([3, 0])],
        coeffs=[1.0, 4.0],
        include=[None, torch.tensor([True, False])],
    )
    # coordinate 0: client 1 excluded -> 1; coordinate 3: (1*4 + 4*10) / 5 = 8.8; others client 0
    assert new.tolist() == pytest.approx([1.0, 2.0, 3.0, 8.8])
    new = holder_average(prev, [torch.tensor([5.0])], [torch.tensor([2])], [2.0])
    assert new.tolist() == [7.0, 7.0, 5.0, 7.0]
    with pytest.raises(ValueError, match="positive total"):
        holder_average(prev, [torch.tensor([5.0])], [torch.tensor([2])], [0.0])
    # float64 accumulation: identical values come back bit for bit (float32 sums here would not)
    v = torch.full((4,), 0.1)
    args = ([v, v[:2], v], [None, torch.tensor([1, 2]), None], [0.3, 0.7, 1.3])
    same = holder_average(prev, *args)
    assert torch.equal(same, v) and same.dtype == torch.float32
    assert not torch.equal(holder_average(prev, *args, accumulate_dtype=torch.float32), v)


def test_width_run_with_cohort_fraction_and_default_rates():
    ctx = mlp_ctx(num_samples=(4, 4, 4, 4), labels=((0, 1), (0,), (1,), (0, 1)), seed=5)
    pol = HeteroFL(ctx, HeteroFLConfig(fraction=0.5))
    assert pol.rates == (1.0, 0.5, 0.25, 0.125)
    acts = pol.on_event(Start(0.0))
    cohort = [t.client for t in tasks(acts)]
    assert len(cohort) == 2
    for t in tasks(acts):
        sub = mlp(pol.rates[t.client])
        assert t.width == pol.rates[t.client]
        assert t.weights.numel() == sum(p.numel() for p in sub.parameters())


# --------------------------------------------------------------------------- mask mode
def mask_ctx(init: list[float], **kw) -> PolicyContext:
    return PolicyContext(
        num_clients=3, num_samples=(10, 20, 30), initial_weights=torch.tensor(init), num_prunable=4,
        layer_bounds=((0, 2), (2, 4)), **kw,
    )


def test_mask_mode_nested_masks_bytes_and_mask_fedavg():
    # prunable [0.1, -0.4 | 0.3, 0.2]: the 5% floor keeps each layer's largest (1 and 2), then
    # the rest by magnitude (3, then 0): ranking [1, 2, 3, 0].
    init = [0.1, -0.4, 0.3, 0.2, 0.5, 0.5]
    pol = HeteroFL(mask_ctx(init), HeteroFLConfig(mode="mask", densities=(1.0, 0.5, 0.25)))
    acts = pol.on_event(Start(0.0))
    t0, t1, t2 = (task_of(acts, c) for c in range(3))
    assert t0.mask is None and t0.density == 1.0 and t0.download_bytes == 24
    assert t1.mask.tolist() == [False, True, True, False] and t1.density == 0.5
    assert t2.mask.tolist() == [False, True, False, False] and t2.density == 0.25
    assert bool((t2.mask & ~t1.mask).any()) is False  # nested
    # down: 4 m + min(ceil(4 / 8), 4 m) + 1 + 4 * 2; up: the values only (the server knows the mask)
    assert (t1.download_bytes, t1.upload_bytes) == (4 * 2 + 1 + 1 + 8, 4 * 2 + 8)
    assert (t2.download_bytes, t2.upload_bytes) == (4 * 1 + 1 + 1 + 8, 4 * 1 + 8)
    assert all(t.width == 1.0 and t.weights is pol.weights for t in (t0, t1, t2))

    w0 = torch.tensor([20.0, 2, 3, 4, 6, 6])
    w1 = torch.tensor([0.0, 8, 9, 0, 3, 3])
    w2 = torch.tensor([0.0, 12, 0, 0, 1, 4])
    prev = pol.weights
    arrive(pol, t0, w0)
    arrive(pol, t1, w1)
    acts = arrive(pol, t2, w2)
    # coordinate 0: client 0 only -> 20; 1: (10*2 + 20*8 + 30*12) / 60 = 9; 2: (10*3 + 20*9) / 30 = 7;
    # 3: client 0 only -> 4; suffix: (60 + 60 + 30) / 60 = 2.5 and (60 + 60 + 120) / 60 = 4
    assert torch.equal(pol.weights, torch.tensor([20.0, 9, 7, 4, 2.5, 4]))
    expected = mask_fedavg(prev, [w0, w1, w2], [None, t1.mask, t2.mask], [10, 20, 30], 4)
    assert torch.equal(pol.weights, expected)
    assert updates(acts)[0]["levels"] == [1.0, 0.5, 0.25]

    # the ranking is rebuilt on the new weights: layer floors 0 (20) and 2 (7), then 1 (9), 3 (4)
    u1, u2 = task_of(acts, 1), task_of(acts, 2)
    assert u1.mask.tolist() == [True, False, True, False]
    assert u2.mask.tolist() == [True, False, False, False]

    # an update with a non-zero weight outside its task's mask is rejected, not aggregated
    before = pol.weights
    acts = arrive(pol, u2, torch.tensor([5.0, 0, 1.0, 0, 1, 1]))  # index 2 is outside u2's mask
    (rej,) = [a.data for a in acts if isinstance(a, Record) and a.kind == "rejected"]
    assert rej["check"] == "mask" and rej["client"] == 2 and "outside the assigned mask" in rej["reason"]
    assert torch.equal(pol.weights, before)


def test_mask_mode_default_densities_for_ten_clients():
    ctx = PolicyContext(num_clients=10, num_samples=(1,) * 10, initial_weights=torch.randn(120), num_prunable=100,
                        layer_bounds=((0, 60), (60, 100)))
    pol = HeteroFL(ctx, HeteroFLConfig(mode="mask"))
    acts = pol.on_event(Start(0.0))
    counts = [100 if t.mask is None else int(t.mask.sum()) for t in sorted(tasks(acts), key=lambda t: t.client)]
    assert counts == [100, 100, 60, 60, 30, 30, 10, 10, 10, 10]
    assert [t.download_bytes for t in tasks(acts)][-1] == sparse_bytes(10, 100, 120) == 40 + 13 + 1 + 80


# --------------------------------------------------------------------------- lifecycle
WIDTH_OPTS = HeteroFLConfig(rates=(1.0, 0.5, 0.25, 0.5), fraction=0.75)
MASK_OPTS = HeteroFLConfig(mode="mask", densities=(1.0, 0.6, 0.3, 0.3))


def lifecycle_ctx(mode: str, **kw) -> PolicyContext:
    labels = ((0, 1), (1,), (0,), (0, 1))
    if mode == "width":
        return mlp_ctx(num_samples=(5, 10, 15, 20), labels=labels, init=torch.linspace(-1, 1, 26), seed=3, **kw)
    return PolicyContext(num_clients=4, num_samples=(5, 10, 15, 20), initial_weights=torch.linspace(-1, 1, 26),
                         num_prunable=20, layer_bounds=((0, 12), (12, 20)), seed=3, **kw)


@pytest.mark.parametrize("mode", ["width", "mask"])
def test_checkpoint_mid_round_resumes_identically(mode: str):
    cfg = WIDTH_OPTS if mode == "width" else MASK_OPTS
    ctx = lifecycle_ctx(mode)
    a = HeteroFL(ctx, cfg)
    loop_a = MiniLoop(a, [1.0, 1.7, 2.9, 4.3], frozenset({5, 11}))
    loop_a.feed(Start(0.0))
    while not (a.version >= 2 and a.arrived):  # stop with results of an open round held
        loop_a.run(1)
    b = HeteroFL(ctx, cfg)
    b.load_state_dict(checkpoint(a))
    assert len(b.arrived) == len(a.arrived) and b.cohort == a.cohort
    loop_b = loop_a.clone_for(b)
    loop_a.log.clear()
    loop_a.run(40)
    loop_b.run(40)
    assert loop_a.log and loop_a.log == loop_b.log
    assert torch.equal(a.weights, b.weights)
    assert a.version == b.version > 4 and a.participation == b.participation


@pytest.mark.parametrize("mode", ["width", "mask"])
def test_stops_after_max_rounds(mode: str):
    cfg = WIDTH_OPTS if mode == "width" else MASK_OPTS
    pol = HeteroFL(lifecycle_ctx(mode, max_rounds=3), cfg)
    loop = MiniLoop(pol, [1.0, 1.7, 2.9, 4.3], frozenset({5}))
    loop.feed(Start(0.0))
    loop.run(500)
    kinds = [entry[0] for entry in loop.log]
    assert kinds.count("Stop") == 1 and kinds[-1] == "Stop" and pol.version == 3
    assert sum(1 for e in loop.log if e[0] == "Record" and "server_update" in e[1]) == 3


def test_whole_cohort_failing_keeps_weights_and_resamples():
    pol = HeteroFL(mlp_ctx(), HeteroFLConfig(rates=(1.0, 0.5)))
    acts = pol.on_event(Start(0.0))
    pol.on_event(TaskFailed(1.0, 0, task_of(acts, 0).task_id, "crash"))
    acts = pol.on_event(TaskFailed(1.0, 1, task_of(acts, 1).task_id, "crash"))
    assert pol.version == 0 and torch.equal(pol.weights, torch.zeros(26))
    assert [a.kind for a in acts if isinstance(a, Record)] == ["round_failed"] and tasks(acts) == []


# --------------------------------------------------------------------------- simulated run
def sim_run(mode: str, scaler: bool = False):
    from prfl.config import load_config
    from prfl.run import build_scenario, make_simulation
    from prfl.sim.executors import make_executor
    from prfl.runtime.history import HistoryWriter

    hidden = "{hidden: [32], scaler: true}" if scaler else "{hidden: [32]}"
    cfg = load_config(overrides=[
        "data.dataset=digits", "data.num_clients=4", "model.name=mlp", f"model.options={hidden}",
        "train.lr=0.1", "train.local_steps=3", "fleet.preset=uniform", "sim.max_rounds=3",
        "sim.executor=inline", "policy.name=fedavg", "seed=1",
    ])
    sc = build_scenario(cfg)
    config = HeteroFLConfig(scaler=scaler) if mode == "width" else HeteroFLConfig(mode="mask")
    policy = HeteroFL(sc.policy_context(), config)
    history = HistoryWriter(None)
    executor = make_executor("inline", sc.worker_spec, dataset=sc.dataset)
    try:
        summary = make_simulation(sc, policy, None, history, executor).run()
    finally:
        executor.close()
    return sc, policy, summary, history.records


@pytest.mark.parametrize("mode,scaler", [("width", False), ("width", True), ("mask", False)])
def test_simulated_rounds_end_to_end(mode: str, scaler: bool):
    sc, pol, summary, records = sim_run(mode, scaler)
    assert summary["server_rounds"] == 3 and summary["aggregated_rounds"] == [3, 3, 3, 3]
    assert bool(torch.isfinite(pol.weights).all()) and not torch.equal(pol.weights, sc.initial_weights)
    total = sc.layout.total
    if mode == "width":
        # rates (1, 1/2, 1/4, 1/8): each client moves exactly its sub-model's fp32 values
        sizes = [sum(p.numel() for p in sc.build_at_width(r).parameters()) for r in (1.0, 0.5, 0.25, 0.125)]
        assert sizes[0] == total
        assert summary["client_download_bytes"] == [3 * 4 * s for s in sizes]
        assert summary["client_upload_bytes"] == [3 * 4 * s for s in sizes]
    else:
        npr = sc.layout.num_prunable
        per_task = [4 * total] + [
            sparse_bytes(math.ceil(rho * npr), npr, total) for rho in default_densities(4)[1:]
        ]
        assert summary["client_download_bytes"] == [3 * b for b in per_task]


def test_default_levels_go_from_the_fastest_client_to_the_slowest():
    import torch

    from prfl.policies import build_policy
    from prfl.policies.base import PolicyContext

    ctx = PolicyContext(num_clients=4, num_samples=(1, 1, 1, 1), initial_weights=torch.ones(6), num_prunable=4,
                        layer_bounds=((0, 4),), nominal_round_times=(3.0, 1.0, 4.0, 2.0))
    pol = build_policy("heterofl", ctx, mode="mask")
    # levels {1, .6, .3, .1} fastest first: client 1, then 3, 0, 2
    assert pol.densities == (0.3, 1.0, 0.1, 0.6)
