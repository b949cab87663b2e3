"""Cost model: per-layer parameters and FLOPs against hand formulas."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from prfl.models import BACKWARD_FACTOR, LayerCost, ModelCost, ModelError, build_model, model_cost


def by_name(cost: ModelCost) -> dict[str, LayerCost]:
    return {layer.name: layer for layer in cost.layers}


@pytest.mark.parametrize("classes", [10, 62])
def test_conv2_flops_per_layer(classes: int) -> None:
    cost = model_cost(build_model("conv2", (1, 28, 28), classes), (1, 28, 28))
    layers = by_name(cost)
    conv1_out, conv2_out = 32 * 28 * 28, 64 * 14 * 14
    expected = {
        # name: (params, prunable, forward_flops, prunable_flops)
        "features.0": (5 * 5 * 1 * 32 + 32, 5 * 5 * 1 * 32, 2 * conv1_out * 25 + conv1_out, 2 * conv1_out * 25),
        "features.1": (0, 0, conv1_out, 0),  # ReLU: 1 per element
        "features.2": (0, 0, 32 * 14 * 14 * 3, 0),  # 2x2 max-pool: 3 comparisons per output
        "features.3": (
            5 * 5 * 32 * 64 + 64,
            5 * 5 * 32 * 64,
            2 * conv2_out * 32 * 25 + conv2_out,
            2 * conv2_out * 32 * 25,
        ),
        "features.4": (0, 0, conv2_out, 0),
        "features.5": (0, 0, 64 * 7 * 7 * 3, 0),
        "classifier.0": (3136 * 2048 + 2048, 3136 * 2048, 2 * 3136 * 2048 + 2048, 2 * 3136 * 2048),
        "classifier.1": (0, 0, 2048, 0),
        "classifier.2": (2048 * classes + classes, 2048 * classes, 2 * 2048 * classes + classes, 2 * 2048 * classes),
    }
    assert list(layers) == list(expected)
    for name, (params, prunable, fwd, pf) in expected.items():
        layer = layers[name]
        assert (layer.params, layer.prunable, layer.forward_flops, layer.prunable_flops) == (params, prunable, fwd, pf), name
        assert layer.param_name == (f"{name}.weight" if prunable else None)
    assert cost.forward_flops == sum(v[2] for v in expected.values())
    assert cost.total_params == sum(v[0] for v in expected.values())


def test_mlp_flops_per_layer() -> None:
    cost = model_cost(build_model("mlp", (1, 28, 28), 10), (1, 28, 28))
    layers = by_name(cost)
    assert [(l.name, l.forward_flops, l.prunable_flops) for l in cost.layers] == [
        ("layers.0", 2 * 784 * 200 + 200, 2 * 784 * 200),
        ("layers.1", 200, 0),
        ("layers.2", 2 * 200 * 200 + 200, 2 * 200 * 200),
        ("layers.3", 200, 0),
        ("layers.4", 2 * 200 * 10 + 10, 2 * 200 * 10),
    ]
    assert layers["layers.0"].params == 784 * 200 + 200
    assert cost.prunable_params == 784 * 200 + 200 * 200 + 200 * 10


def test_char_lstm_flops() -> None:
    seq, vocab, emb, hid = 80, 81, 8, 256
    cost = model_cost(build_model("char_lstm", (seq,), vocab), (seq,))
    rnn = {l.param_name: l for l in cost.layers if l.name == "lstm"}
    assert rnn["lstm.weight_ih_l0"].prunable_flops == 2 * 4 * hid * emb * seq
    assert rnn["lstm.weight_hh_l0"].prunable_flops == 2 * 4 * hid * hid * seq
    assert rnn["lstm.weight_ih_l0"].forward_flops == (2 * 4 * hid * emb + 4 * hid) * seq  # + bias_ih adds
    per_layer = lambda i: 2 * 4 * hid * (i + hid) * seq + 2 * 4 * hid * seq  # noqa: E731
    assert sum(l.forward_flops for l in rnn.values()) == per_layer(emb) + per_layer(hid)
    fc = by_name(cost)["fc"]
    assert fc.forward_flops == 2 * hid * vocab + vocab  # last time step only
    embed = by_name(cost)["embed"]
    assert (embed.params, embed.prunable, embed.forward_flops, embed.param_name) == (vocab * emb, 0, 0, None)
    assert cost.total_params == 820_185


@pytest.mark.parametrize(
    "name, shape, classes",
    [("vgg11", (3, 32, 32), 10), ("vgg11", (1, 8, 8), 10), ("conv2", (1, 8, 8), 10), ("char_lstm", (80,), 81)],
)
def test_totals_match_model(name: str, shape: tuple[int, ...], classes: int) -> None:
    model = build_model(name, shape, classes)
    cost = model_cost(model, shape)
    assert cost.total_params == sum(p.numel() for p in model.parameters())
    prunable = {l.param_name for l in cost.layers if l.param_name}
    params = dict(model.named_parameters())
    assert cost.prunable_params == sum(params[n].numel() for n in prunable)


def test_vgg11_cifar_flops() -> None:
    cost = model_cost(build_model("vgg11", (3, 32, 32), 10), (3, 32, 32))
    # (cin, cout, spatial side) of the eight convs
    convs = [(3, 64, 32), (64, 128, 16), (128, 256, 8), (256, 256, 8), (256, 512, 4), (512, 512, 4), (512, 512, 2), (512, 512, 2)]
    conv_mm = sum(2 * s * s * co * ci * 9 for ci, co, s in convs)
    fc_mm = 2 * (512 * 512 + 512 * 512 + 512 * 10)
    assert cost.prunable_flops == conv_mm + fc_mm
    assert cost.bytes() == 4 * 9_750_922 and cost.bytes(2) == 2 * 9_750_922


def test_forward_flops_at_half_density() -> None:
    cost = model_cost(build_model("conv2", (1, 28, 28), 62), (1, 28, 28))
    rest = cost.forward_flops - cost.prunable_flops
    assert rest > 0
    assert cost.forward_flops_at(1.0) == cost.forward_flops
    assert cost.forward_flops_at(0.5) == pytest.approx(0.5 * cost.prunable_flops + rest)
    all_half = {l.param_name: 0.5 for l in cost.layers if l.param_name}
    assert cost.forward_flops_at(all_half) == pytest.approx(cost.forward_flops_at(0.5))
    assert cost.forward_flops_at(0.0) == rest


def test_forward_flops_at_per_layer() -> None:
    cost = model_cost(build_model("conv2", (1, 28, 28), 10), (1, 28, 28))
    fc1 = by_name(cost)["classifier.0"]
    expected = cost.forward_flops - 0.9 * fc1.prunable_flops
    assert cost.forward_flops_at({"classifier.0.weight": 0.1}) == pytest.approx(expected)
    assert cost.forward_flops_at({"classifier.0": 0.1}) == pytest.approx(expected)
    # parameter name takes precedence over layer name
    assert cost.forward_flops_at({"classifier.0": 1.0, "classifier.0.weight": 0.1}) == pytest.approx(expected)


def test_forward_flops_at_lstm_per_matrix() -> None:
    cost = model_cost(build_model("char_lstm", (80,), 81), (80,))
    hh0 = next(l for l in cost.layers if l.param_name == "lstm.weight_hh_l0")
    got = cost.forward_flops_at({"lstm.weight_hh_l0": 0.25})
    assert got == pytest.approx(cost.forward_flops - 0.75 * hh0.prunable_flops)
    lstm_mm = sum(l.prunable_flops for l in cost.layers if l.name == "lstm")
    assert cost.forward_flops_at({"lstm": 0.0}) == pytest.approx(cost.forward_flops - lstm_mm)


@pytest.mark.parametrize("density", [{"nope.weight": 0.5}, {"features.0.weight": 1.5}, -0.1, float("nan")])
def test_bad_density_raises(density: object) -> None:
    cost = model_cost(build_model("conv2", (1, 8, 8), 10), (1, 8, 8))
    with pytest.raises(ModelError):
        cost.forward_flops_at(density)  # type: ignore[arg-type]


def test_train_step_flops() -> None:
    cost = model_cost(build_model("mlp", (1, 8, 8), 10), (1, 8, 8))
    assert BACKWARD_FACTOR == 2.0
    assert cost.train_step_flops(32) == pytest.approx(3 * 32 * cost.forward_flops)
    assert cost.train_step_flops(8, 0.5) == pytest.approx(3 * 8 * cost.forward_flops_at(0.5))


def test_linear_over_sequence_and_grouped_conv() -> None:
    seq_model = nn.Sequential(nn.Linear(4, 3))
    layer = model_cost(seq_model, (5, 4)).layers[0]
    assert (layer.forward_flops, layer.prunable_flops) == (2 * 4 * 3 * 5 + 3 * 5, 2 * 4 * 3 * 5)

    conv = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, groups=2, bias=False))
    layer = model_cost(conv, (4, 6, 6)).layers[0]
    assert layer.forward_flops == layer.prunable_flops == 2 * (8 * 6 * 6) * (2 * 3 * 3)
    assert layer.params == layer.prunable == 8 * 2 * 3 * 3


def test_model_cost_restores_mode_and_leaves_weights() -> None:
    torch.manual_seed(0)
    model = build_model("vgg11", (1, 8, 8), 10, dropout=0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    model_cost(model, (1, 8, 8))
    assert model.training
    assert all(not m._forward_hooks for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class _Recurrent(nn.Module):
    """Bidirectional GRU followed by a projected LSTM (seq-first), for generic RNN counting."""

    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(3, 5, bidirectional=True, batch_first=True)
        self.lstm = nn.LSTM(10, 6, proj_size=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.gru(x)
        z, _ = self.lstm(y.transpose(0, 1))
        return z


@pytest.mark.filterwarnings("ignore:LSTM with projections")
def test_generic_rnn_counting() -> None:
    model = _Recurrent()
    seq = 7
    cost = model_cost(model, (seq, 3))
    assert cost.total_params == sum(p.numel() for p in model.parameters())
    params = dict(model.named_parameters())
    for layer in cost.layers:
        assert layer.param_name is not None
        w = params[layer.param_name]
        bias = params.get(layer.param_name.replace("weight", "bias"))
        b = bias.numel() if bias is not None else 0
        assert layer.prunable_flops == 2 * w.numel() * seq
        assert layer.forward_flops == (2 * w.numel() + b) * seq
    names = [l.param_name for l in cost.layers]
    assert "gru.weight_hh_l0_reverse" in names and "lstm.weight_hr_l0" in names
    assert len(names) == 4 + 3
