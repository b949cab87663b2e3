"""Width slicing (prfl.models.slicing) and the zoo's train-time scaler option.

The central check: load the sliced weights into the width-r model, and run the full model with
every weight outside the slice set to zero. A hidden unit outside the slice then has zero
incoming weights and bias, so its activation is ReLU(0) = 0 (for an LSTM unit: c = 0.5 c_prev
from c = 0, h = o tanh(0) = 0), and its outgoing weights are zero too: both networks compute the
same function, up to float summation order (double precision here). A wrong index for any
parameter (wrong block, wrong flatten order, gates not split) breaks the equality.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from prfl.models import build_model, model_cost
from prfl.models.errors import ModelError
from prfl.models.slicing import SliceMap, block_indices, gate_counts, output_classes, output_layer
from prfl.models.zoo import ScaledReLU
from prfl.params import ParamLayout

# name -> (input_shape, num_classes, options, input maker)
MODELS = {
    # 12x12 -> two pools -> 3x3: the flatten mixes 9 spatial positions per channel
    "conv2": ((1, 12, 12), 10, {}, lambda: torch.randn(3, 1, 12, 12, dtype=torch.float64)),
    "mlp": ((1, 8, 8), 10, {"hidden": (40, 30)}, lambda: torch.randn(3, 1, 8, 8, dtype=torch.float64)),
    # 8x64 -> pools to 1x8 (the 4th and 5th pools are skipped): 8 positions per channel at the flatten
    "vgg11": ((3, 8, 64), 10, {}, lambda: torch.randn(2, 3, 8, 64, dtype=torch.float64)),
    "char_lstm": ((7,), 13, {"hidden": 16, "embed_dim": 8}, lambda: torch.randint(0, 13, (3, 7))),
}


def build(name: str, width: float, **extra) -> nn.Module:
    shape, classes, options, _ = MODELS[name]
    return build_model(name, shape, classes, width_mult=width, **options, **extra)


def flat64(layout: ParamLayout, model: nn.Module) -> torch.Tensor:
    params = dict(model.named_parameters())
    return torch.cat([params[e.name].detach().reshape(-1) for e in layout.entries])


# --------------------------------------------------------------------------- index maps by hand
def test_mlp_half_index_map_by_hand():
    # full: layers.0.weight (4,3) @0, layers.2.weight (2,4) @12, layers.0.bias (4) @20, layers.2.bias (2) @24
    # half: layers.0.weight (2,3), layers.2.weight (2,2), layers.0.bias (2), layers.2.bias (2)
    full = build_model("mlp", (3,), 2, hidden=(4,))
    sub = build_model("mlp", (3,), 2, hidden=(4,), width_mult=0.5)
    smap = SliceMap(full, sub)
    assert smap.idx.tolist() == [0, 1, 2, 3, 4, 5,  # W1 rows 0-1, all 3 inputs
                                 12, 13, 16, 17,  # W2 rows 0-1 (classes), columns 0-1
                                 20, 21,  # b1[:2]
                                 24, 25]  # b2 (classes: never sliced)
    assert (smap.full_total, smap.sub_total) == (26, 14)
    assert smap.prunable_fraction == 10 / 20
    assert smap.held().nonzero().flatten().tolist() == smap.idx.tolist()


def test_block_indices_splits_gates():
    # (8, 2) = 4 gates of 2 rows; keep 1 row per gate and 1 column: rows 0, 2, 4, 6, column 0
    assert block_indices((8, 2), (4, 1), gates=4).tolist() == [0, 4, 8, 12]
    # without the gate split the leading block would be rows 0-3
    assert block_indices((8, 2), (4, 1)).tolist() == [0, 2, 4, 6]
    assert block_indices((8,), (4,), gates=4).tolist() == [0, 2, 4, 6]
    assert block_indices((2, 3, 4), (1, 2, 2)).tolist() == [0, 1, 4, 5]
    with pytest.raises(ValueError, match="larger"):
        block_indices((2, 3), (3, 3))
    with pytest.raises(ValueError, match="gate blocks"):
        block_indices((8, 2), (3, 1), gates=4)


def test_gate_counts_and_output_layer():
    lstm = build("char_lstm", 1.0)
    gates = gate_counts(lstm)
    assert gates == {f"lstm.{k}_l{i}": 4 for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh") for i in (0, 1)}
    assert output_layer(lstm) == ("fc.weight", "fc.bias")  # not the embedding, which also has vocab rows
    assert output_layer(build("vgg11", 0.5)) == ("classifier.4.weight", "classifier.4.bias")


def test_output_classes_marks_rows_and_bias():
    model = build_model("mlp", (3,), 2, hidden=(4,))
    classes = output_classes(model)
    expected = [-1] * 12 + [0] * 4 + [1] * 4 + [-1] * 4 + [0, 1]
    assert classes.tolist() == expected


# --------------------------------------------------------------------------- functional equality
@pytest.mark.parametrize("rate", [0.5, 0.25])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_sub_model_equals_full_model_with_the_rest_zeroed(name: str, rate: float):
    torch.manual_seed(0)
    full = build(name, 1.0).double().eval()
    sub = build(name, rate).double().eval()
    smap = SliceMap(full, sub)
    assert smap.sub_total == sum(p.numel() for p in sub.parameters())
    assert smap.idx.unique().numel() == smap.sub_total  # distinct coordinates

    w = flat64(smap.full_layout, full)
    x = MODELS[name][3]()
    with torch.no_grad():
        dense_out = full(x)
        smap.sub_layout.load(sub, w[smap.idx])
        zeroed = torch.zeros_like(w)
        zeroed[smap.idx] = w[smap.idx]
        smap.full_layout.load(full, zeroed)
        torch.testing.assert_close(sub(x), full(x), rtol=1e-9, atol=1e-12)
    # the slice really removes something: the dense full model computes something else
    assert not torch.allclose(dense_out, full(x), rtol=1e-3, atol=1e-6)


def test_lstm_without_gate_split_does_not_match():
    """The equality test is sharp: slicing LSTM gate matrices as one block fails it."""
    torch.manual_seed(1)
    full = build("char_lstm", 1.0).double().eval()
    sub = build("char_lstm", 0.5).double().eval()
    smap = SliceMap(full, sub)
    wrong = []
    for e in smap.sub_layout.entries:
        fe = smap.full_layout.entry(e.name)
        wrong.append(block_indices(fe.shape, e.shape) + fe.offset)  # no gate split
    idx = torch.cat(wrong)
    assert not torch.equal(idx, smap.idx)
    w = flat64(smap.full_layout, full)
    x = MODELS["char_lstm"][3]()
    with torch.no_grad():
        smap.sub_layout.load(sub, w[idx])
        zeroed = torch.zeros_like(w)
        zeroed[idx] = w[idx]
        smap.full_layout.load(full, zeroed)
        assert not torch.allclose(sub(x), full(x), rtol=1e-6, atol=1e-9)


def test_slice_and_scatter_round_trip():
    full = build("conv2", 1.0)
    sub = build("conv2", 0.25)
    smap = SliceMap(full, sub)
    w = torch.randn(smap.full_total)
    s = smap.slice(w)
    assert s.shape == (smap.sub_total,) and torch.equal(s, w[smap.idx])
    back = smap.scatter(torch.zeros(smap.full_total), s)
    assert torch.equal(back[smap.idx], s)
    assert int((back != 0).sum()) == int((s != 0).sum())
    assert torch.equal(smap.scatter(w, s), w)  # writing a slice back changes nothing
    with pytest.raises(ValueError, match="flat vector"):
        smap.slice(torch.zeros(3))


def test_mismatched_models_are_refused():
    with pytest.raises(ValueError, match="different parameters"):
        SliceMap(build_model("mlp", (3,), 2, hidden=(4,)), build_model("mlp", (3,), 2, hidden=(4, 4)))
    with pytest.raises(ValueError, match="larger"):
        SliceMap(build_model("mlp", (3,), 2, hidden=(4,), width_mult=0.5), build_model("mlp", (3,), 2, hidden=(4,)))


# --------------------------------------------------------------------------- scaler option
def test_scaler_mlp_divides_hidden_activations_in_training_only():
    torch.manual_seed(0)
    plain = build_model("mlp", (3,), 2, hidden=(4,), width_mult=0.5)
    scaled = build_model("mlp", (3,), 2, hidden=(4,), width_mult=0.5, scaler=True)
    assert [n for n, _ in plain.named_parameters()] == [n for n, _ in scaled.named_parameters()]
    assert plain.scaler_rate is None and scaled.scaler_rate == 0.5
    scaled.load_state_dict(plain.state_dict())
    x = torch.randn(5, 3)
    w1, b1 = plain.layers[0].weight, plain.layers[0].bias
    w2, b2 = plain.layers[2].weight, plain.layers[2].bias
    with torch.no_grad():
        torch.testing.assert_close(scaled.eval()(x), plain.eval()(x))
        expected = (torch.relu(x @ w1.T + b1) / 0.5) @ w2.T + b2
        torch.testing.assert_close(scaled.train()(x), expected)
        torch.testing.assert_close(plain.train()(x), torch.relu(x @ w1.T + b1) @ w2.T + b2)


def test_scaler_is_identity_at_full_width_and_costs_nothing():
    torch.manual_seed(0)
    full = build("conv2", 1.0, scaler=True)
    assert full.scaler_rate == 1.0
    relus = [m for m in full.modules() if isinstance(m, nn.ReLU)]
    assert len(relus) == 3 and all(isinstance(m, ScaledReLU) and m.rate == 1.0 for m in relus)
    x = torch.randn(2, 1, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(full.train()(x), full.eval()(x))
    vgg = build("vgg11", 0.25, scaler=True)
    assert sum(isinstance(m, ScaledReLU) and m.rate == 0.25 for m in vgg.modules()) == 8 + 2
    for name in ("vgg11", "conv2", "mlp", "char_lstm"):
        shape = MODELS[name][0]
        a, b = model_cost(build(name, 0.25), shape), model_cost(build(name, 0.25, scaler=True), shape)
        assert (a.total_params, a.forward_flops) == (b.total_params, b.forward_flops)
    with pytest.raises(ModelError, match="scaler"):
        build("conv2", 0.5, scaler="yes")


def test_scaler_conv2_and_lstm_scale_training_outputs():
    torch.manual_seed(0)
    conv = build("conv2", 0.25, scaler=True).double()
    plain = build("conv2", 0.25).double()
    plain.load_state_dict(conv.state_dict())
    x = MODELS["conv2"][3]()
    f = plain.features  # conv, relu, pool, conv, relu, pool
    with torch.no_grad():
        # two hidden conv layers and one hidden FC, each output scaled by 1 / 0.25 in training
        assert sum(isinstance(m, ScaledReLU) for m in conv.modules()) == 3
        torch.testing.assert_close(conv.eval()(x), plain.eval()(x))
        a1 = f[2](torch.relu(f[0](x)) * 4)
        a2 = f[5](torch.relu(f[3](a1)) * 4)
        c = plain.classifier
        expected = c[2](torch.relu(c[0](torch.flatten(a2, 1))) * 4)
        torch.testing.assert_close(conv.train()(x), expected)

    lstm = build("char_lstm", 0.5, scaler=True).double()
    tokens = MODELS["char_lstm"][3]()
    with torch.no_grad():
        out, _ = lstm.lstm(lstm.embed(tokens) / 0.5)
        torch.testing.assert_close(lstm.train()(tokens), lstm.fc(out[:, -1] / 0.5))
        out, _ = lstm.lstm(lstm.embed(tokens))
        torch.testing.assert_close(lstm.eval()(tokens), lstm.fc(out[:, -1]))
