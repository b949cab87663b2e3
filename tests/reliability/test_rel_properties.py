"""Property-based tests that complement tests/pruning, tests/test_aggregation.py and
tests/test_distribution.py: the lattice of nested masks, more averaging invariants, residual
pieces and packed indices round trips, buffer checkpoints, and config parsing with random
``--set`` overrides (valid ones load, invalid ones raise ConfigError naming the field)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prfl.aggregation import mask_fedavg, weighted_average
from prfl.buffer import ClientBuffer
from prfl.checkpoint import dumps, loads
from prfl.config import ConfigError, ExperimentConfig, load_config
from prfl.data import DATASETS
from prfl.distribution import PackedIndex, ResidualSplit
from prfl.models import MODELS
from prfl.policies import POLICIES
from prfl.pruning.ranking import Ranking, kept_count

DENSITY = st.floats(0.0, 1.0, allow_nan=False)


@st.composite
def rankings(draw) -> Ranking:
    n = draw(st.integers(1, 200))
    perm = draw(st.permutations(range(n)))
    return Ranking(torch.tensor(perm, dtype=torch.int64))


# --------------------------------------------------------------------------- mask algebra
@settings(max_examples=80, deadline=None)
@given(rankings(), DENSITY, DENSITY)
def test_masks_form_a_chain(r, a, b) -> None:
    ma, mb = r.mask(a), r.mask(b)
    lo, hi = min(a, b), max(a, b)
    assert torch.equal(ma & mb, r.mask(lo)) and torch.equal(ma | mb, r.mask(hi))
    # the residual between them is exactly the piece (lo, hi], a slice of the ranking
    diff = r.mask(hi) & ~r.mask(lo)
    piece = r.piece(lo, hi)
    assert sorted(piece.tolist()) == diff.nonzero().view(-1).tolist()
    assert int(diff.sum()) == kept_count(hi, r.size) - kept_count(lo, r.size)
    assert torch.equal(r.rank_of()[r.order], torch.arange(r.size))


@settings(max_examples=80, deadline=None)
@given(st.lists(st.booleans(), min_size=0, max_size=300))
def test_packed_index_round_trips_both_ways(bits) -> None:
    mask = torch.tensor(bits, dtype=torch.bool)
    idx = PackedIndex.from_mask(mask)
    assert torch.equal(idx.to_mask(), mask) and idx.count == int(mask.sum())
    assert torch.equal(idx.positions(), mask.nonzero().view(-1))
    again = PackedIndex.from_positions(mask.nonzero().view(-1), mask.numel())
    assert torch.equal(again.to_mask(), mask)
    # the cheaper encoding, whichever way it was built
    assert idx.nbytes == again.nbytes == 1 + min(math.ceil(mask.numel() / 8), 4 * idx.count)


@settings(max_examples=60, deadline=None)
@given(rankings(), st.lists(st.floats(0.001, 1.0), min_size=1, max_size=5), st.integers(0, 4), st.randoms())
def test_pieces_in_any_order_rebuild_the_submodel(r, densities, m, rnd) -> None:
    total = r.size + m
    w = torch.arange(1, total + 1, dtype=torch.float32)
    split = ResidualSplit(r, densities, version=3, total=total)
    for rho in densities:
        ids = list(split.needed(rho))
        rnd.shuffle(ids)
        weights, mask = split.assemble([split.extract(w, p) for p in ids])
        assert torch.equal(mask, r.mask(rho))
        assert torch.equal(weights[: r.size], torch.where(mask, w[: r.size], torch.zeros(())))
        assert torch.equal(weights[r.size :], w[r.size :])
    nxt = split.for_version(4)
    assert [nxt.indices(p).tolist() for p in nxt.piece_ids()] == [split.indices(p).tolist() for p in split.piece_ids()]


# --------------------------------------------------------------------------- aggregation
@st.composite
def fleets(draw):
    k = draw(st.integers(1, 6))
    n = draw(st.integers(1, 10))
    m = draw(st.integers(0, 3))
    vals = st.floats(-50, 50, allow_nan=False, width=32)
    ws = [torch.tensor(draw(st.lists(vals, min_size=n + m, max_size=n + m))) for _ in range(k)]
    masks = [draw(st.one_of(st.none(), st.lists(st.booleans(), min_size=n, max_size=n).map(torch.tensor))) for _ in range(k)]
    coeffs = [draw(st.floats(0.01, 20)) for _ in range(k)]
    prev = torch.tensor(draw(st.lists(vals, min_size=n + m, max_size=n + m)))
    return ws, masks, coeffs, prev, n


@settings(max_examples=100, deadline=None)
@given(fleets(), st.randoms(), st.floats(0.1, 10))
def test_mask_fedavg_ignores_order_and_coefficient_scale(fleet, rnd, scale) -> None:
    ws, ms, cs, prev, n = fleet
    base = mask_fedavg(prev, ws, ms, cs, n)
    order = list(range(len(ws)))
    rnd.shuffle(order)
    shuffled = mask_fedavg(prev, [ws[i] for i in order], [ms[i] for i in order], [cs[i] for i in order], n)
    scaled = mask_fedavg(prev, ws, ms, [c * scale for c in cs], n)
    assert torch.allclose(base, shuffled, rtol=1e-6, atol=1e-5)
    assert torch.allclose(base, scaled, rtol=1e-6, atol=1e-5)


@settings(max_examples=100, deadline=None)
@given(fleets())
def test_mask_fedavg_of_the_previous_model_is_a_fixed_point(fleet) -> None:
    ws, ms, cs, prev, n = fleet
    held_prev = [torch.cat([prev[:n] * m, prev[n:]]) if m is not None else prev.clone() for m in ms]
    assert torch.equal(mask_fedavg(prev, held_prev, ms, cs, n), prev)


@settings(max_examples=100, deadline=None)
@given(fleets())
def test_weighted_average_is_affine_equivariant(fleet) -> None:
    ws, _, cs, _, _ = fleet
    shift = torch.linspace(-3, 3, ws[0].numel())
    a = weighted_average([w + shift for w in ws], cs)
    b = weighted_average(ws, cs) + shift
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-4)


@settings(max_examples=50, deadline=None)
@given(fleets(), st.sampled_from(["dense", "sparse"]), st.sampled_from(["const", "poly", "hinge"]), st.integers(0, 6))
def test_buffer_equals_mask_fedavg_and_survives_a_checkpoint(fleet, storage, kind, now) -> None:
    ws, ms, _, prev, n = fleet
    buf = ClientBuffer(len(ws), prev.numel(), n, storage=storage)
    for i, (w, m) in enumerate(zip(ws, ms)):
        buf.put(i, torch.cat([w[:n] * m, w[n:]]) if m is not None else w, m, i + 1, sent_round=min(i, now))
    coeffs = buf.coefficients(now, kind)
    want = mask_fedavg(prev, ws, ms, [coeffs[i] for i in range(len(ws))], n)
    assert torch.allclose(buf.aggregate(prev, now, kind), want, rtol=1e-6, atol=1e-5)
    other = ClientBuffer(len(ws), prev.numel(), n, storage="sparse" if storage == "dense" else "dense")
    other.load_state_dict(loads(dumps(buf.state_dict())))
    assert torch.equal(other.aggregate(prev, now, kind), buf.aggregate(prev, now, kind))


# --------------------------------------------------------------------------- config parsing
def _num(v: float) -> str:
    """A float as YAML reads it back as a float (PyYAML takes "1e-09" for a string)."""
    return np.format_float_positional(float(v), unique=True)


# field -> (valid values, invalid values); every value is written as YAML text after "key="
FIELDS: dict[str, tuple[st.SearchStrategy[str], st.SearchStrategy[str]]] = {
    "seed": (st.integers(0, 10**6).map(str), st.one_of(st.integers(-100, -1).map(str), st.just("abc"), st.just("[1]"))),
    "data.num_clients": (st.integers(1, 50).map(str), st.one_of(st.integers(-5, 0).map(str), st.just("many"))),
    "data.partition": (st.sampled_from(["iid", "dirichlet", "shards", "natural"]), st.sampled_from(["random", "IID", "1"])),
    "data.dataset": (st.sampled_from(sorted(DATASETS)), st.sampled_from(["mnist2", "cifar", "x"])),
    "data.eval_samples": (st.one_of(st.integers(1, 1000).map(str), st.just("null")), st.integers(-5, 0).map(str)),
    "model.name": (st.sampled_from(sorted(MODELS)), st.sampled_from(["resnet999", "gpt"])),
    "train.lr": (st.floats(0.001, 100).map(_num), st.one_of(st.floats(-10, 0).map(_num), st.just("fast"))),
    "train.momentum": (st.floats(0, 0.999).map(_num), st.one_of(st.floats(1, 5).map(_num), st.floats(-5, -0.01).map(_num))),
    "train.batch_size": (st.integers(1, 512).map(str), st.integers(-5, 0).map(str)),
    "train.loss": (st.sampled_from(["ce", "bce"]), st.sampled_from(["mse", "CE"])),
    "fleet.preset": (st.sampled_from(["paper10", "lognormal", "uniform"]), st.sampled_from(["fast", "paper"])),
    "policy.name": (st.sampled_from(sorted(POLICIES)), st.sampled_from(["fedprox", "scaffold"])),
    "sim.executor": (st.sampled_from(["inline", "process", "ray"]), st.sampled_from(["threads", "gpu"])),
    "sim.workers": (st.integers(1, 64).map(str), st.integers(-3, 0).map(str)),
    "sim.max_rounds": (st.integers(1, 10**5).map(str), st.integers(-3, 0).map(str)),
    "sim.sparse_efficiency": (st.floats(0, 1).map(_num), st.one_of(st.floats(1.01, 9).map(_num), st.floats(-9, -0.01).map(_num))),
    "sim.checkpoint_every_rounds": (st.one_of(st.integers(1, 500).map(str), st.just("null")), st.integers(-3, 0).map(str)),
    "sim.bogus": (st.nothing(), st.integers().map(str)),  # unknown field
    "train.lr_decay": (st.nothing(), st.floats(0, 1).map(_num)),  # unknown field
}
VALID_KEYS = [k for k in FIELDS if k not in ("sim.bogus", "train.lr_decay")]


def _get(cfg: ExperimentConfig, key: str):
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_valid_overrides_load_with_their_values(data) -> None:
    keys = data.draw(st.lists(st.sampled_from(VALID_KEYS), min_size=1, max_size=5, unique=True))
    overrides = [f"{k}={data.draw(FIELDS[k][0])}" for k in keys]
    cfg = load_config(None, overrides)
    for item in overrides:
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw)
        got = _get(cfg, key)
        if isinstance(value, float):
            assert got == pytest.approx(value)
        else:
            assert got == value, item


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_invalid_overrides_raise_config_error_naming_the_field(data) -> None:
    bad = data.draw(st.lists(st.sampled_from(sorted(FIELDS)), min_size=1, max_size=3, unique=True))
    good = data.draw(st.lists(st.sampled_from([k for k in VALID_KEYS if k not in bad]), max_size=3, unique=True))
    overrides = [f"{k}={data.draw(FIELDS[k][1])}" for k in bad] + [f"{k}={data.draw(FIELDS[k][0])}" for k in good]
    data.draw(st.randoms()).shuffle(overrides)
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    msg = str(info.value)
    for k in bad:
        assert f"{k}:" in msg, (k, msg)
    for k in good:
        assert f"{k}:" not in msg, (k, msg)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(max_size=30), min_size=1, max_size=3))
def test_any_override_text_loads_or_raises_config_error(overrides) -> None:
    try:
        cfg = load_config(None, overrides)
    except ConfigError as exc:
        assert str(exc)
    else:
        assert isinstance(cfg, ExperimentConfig)


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(["seed", "data", "sim", "policy", "data.num_clients", "name"]),
       st.sampled_from(["x", "y.z"]), st.integers())
def test_overrides_through_a_value_name_the_path(section, leaf, value) -> None:
    item = f"{section}.{leaf}={value}"
    with pytest.raises(ConfigError) as info:
        load_config(None, [item])
    msg = str(info.value)
    assert section.split(".")[0] in msg and ("not a section" in msg or "unknown field" in msg or "Input should" in msg), msg


def test_nonfinite_numbers_name_the_field() -> None:
    # every float field refuses NaN and inf, not only those with their own range check
    for key in ("train.lr", "sim.sparse_efficiency", "sim.max_time", "sim.eval_every_seconds", "train.momentum",
                "train.weight_decay"):
        for raw in (".nan", "-.inf", ".inf"):
            with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
                load_config(None, [f"{key}={raw}"])


def test_missing_file_and_bad_yaml_name_the_file(tmp_path) -> None:
    with pytest.raises(ConfigError, match="config file .*nope.yaml does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: {dataset: digits\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="bad.yaml is not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="list.yaml must hold a mapping"):
        load_config(listy)
    assert math.isfinite(load_config(None, ["train.lr=0.5"]).train.lr)
