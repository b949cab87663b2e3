"""Model zoo: output shapes, parameter counts, width scaling, determinism, errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from prfl.models import MODELS, ModelError, build_model, model_cost, scaled_width

DIGITS = (1, 8, 8)
FMNIST = (1, 28, 28)
CIFAR = (3, 32, 32)
SHAKESPEARE = (80,)
VOCAB = 81


def conv_params(cin: int, cout: int, k: int) -> int:
    return k * k * cin * cout + cout


def fc_params(fin: int, fout: int) -> int:
    return fin * fout + fout


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", ["mlp", "conv2", "vgg11"])
@pytest.mark.parametrize("shape", [DIGITS, FMNIST, CIFAR])
def test_image_models_output_shape(name: str, shape: tuple[int, ...]) -> None:
    model = build_model(name, shape, 10)
    out = model(torch.randn(2, *shape))
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()


def test_char_lstm_output_shape() -> None:
    model = build_model("char_lstm", SHAKESPEARE, VOCAB)
    x = torch.randint(0, VOCAB, (3, *SHAKESPEARE), dtype=torch.int64)
    assert model(x).shape == (3, VOCAB)


def test_models_listing() -> None:
    assert set(MODELS) == {"vgg11", "conv2", "mlp", "char_lstm"}


def test_conv2_param_count_femnist() -> None:
    model = build_model("conv2", FMNIST, 62)
    expected = conv_params(1, 32, 5) + conv_params(32, 64, 5) + fc_params(7 * 7 * 64, 2048) + fc_params(2048, 62)
    assert expected == 6_603_710
    assert n_params(model) == expected
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["features.0.weight"] == (32, 1, 5, 5)
    assert shapes["features.3.weight"] == (64, 32, 5, 5)
    assert shapes["classifier.0.weight"] == (2048, 3136)
    assert shapes["classifier.2.weight"] == (62, 2048)


@pytest.mark.parametrize("shape, flat", [(DIGITS, 64 * 2 * 2), (FMNIST, 64 * 7 * 7), (CIFAR, 64 * 8 * 8)])
def test_conv2_flatten_size(shape: tuple[int, ...], flat: int) -> None:
    model = build_model("conv2", shape, 10)
    assert model.classifier[0].in_features == flat


def test_vgg11_param_count_cifar10() -> None:
    model = build_model("vgg11", CIFAR, 10)
    widths = [3, 64, 128, 256, 256, 512, 512, 512, 512]
    conv = sum(conv_params(a, b, 3) for a, b in zip(widths, widths[1:]))
    fc = fc_params(512, 512) + fc_params(512, 512) + fc_params(512, 10)
    assert n_params(model) == conv + fc == 9_750_922
    # the "37.2 MB" of the literature is MiB of fp32 weights
    assert model_cost(model, CIFAR).bytes() / 2**20 == pytest.approx(37.2, abs=0.05)


@pytest.mark.parametrize("shape, pools", [(CIFAR, 5), (FMNIST, 4), (DIGITS, 3)])
def test_vgg11_skips_collapsing_pools(shape: tuple[int, ...], pools: int) -> None:
    model = build_model("vgg11", shape, 10)
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == pools
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == 8
    assert model.classifier[0].in_features == 512
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.Dropout)) for m in model.modules())


def test_vgg11_dropout_option() -> None:
    model = build_model("vgg11", CIFAR, 10, dropout=0.5)
    drops = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert len(drops) == 2 and all(d.p == 0.5 for d in drops)
    with pytest.raises(ModelError):
        build_model("vgg11", CIFAR, 10, dropout=1.5)


def test_mlp_any_shape_and_hidden() -> None:
    model = build_model("mlp", (2, 3, 5), 7, hidden=(16, 8, 4))
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(30, 16), (16, 8), (8, 4), (4, 7)]
    assert model(torch.randn(4, 2, 3, 5)).shape == (4, 7)
    logreg = build_model("mlp", (10,), 3, hidden=())
    assert n_params(logreg) == fc_params(10, 3)


def test_char_lstm_structure_and_options() -> None:
    model = build_model("char_lstm", SHAKESPEARE, VOCAB)
    assert model.embed.weight.shape == (VOCAB, 8)
    assert (model.lstm.input_size, model.lstm.hidden_size, model.lstm.num_layers) == (8, 256, 2)
    assert model.lstm.batch_first
    lstm = 4 * 256 * (8 + 256) + 8 * 256 + 4 * 256 * (256 + 256) + 8 * 256
    assert n_params(model) == VOCAB * 8 + lstm + fc_params(256, VOCAB) == 820_185
    small = build_model("char_lstm", (20,), 30, embed_dim=4, hidden=16, layers=1)
    assert (small.lstm.input_size, small.lstm.hidden_size, small.lstm.num_layers) == (4, 16, 1)
    assert small(torch.zeros(2, 20, dtype=torch.long)).shape == (2, 30)


def test_char_lstm_uses_last_time_step() -> None:
    torch.manual_seed(0)
    model = build_model("char_lstm", (10,), 12).eval()
    x = torch.randint(0, 12, (1, 10))
    out, _ = model.lstm(model.embed(x))
    torch.testing.assert_close(model(x), model.fc(out[:, -1]))


def test_width_mult_half() -> None:
    vgg = build_model("vgg11", CIFAR, 10, width_mult=0.5)
    convs = [m for m in vgg.modules() if isinstance(m, nn.Conv2d)]
    assert [m.out_channels for m in convs] == [32, 64, 128, 128, 256, 256, 256, 256]
    assert convs[0].in_channels == 3
    fcs = [m for m in vgg.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in fcs] == [(256, 256), (256, 256), (256, 10)]

    cnn = build_model("conv2", FMNIST, 62, width_mult=0.5)
    assert [m.out_channels for m in cnn.modules() if isinstance(m, nn.Conv2d)] == [16, 32]
    assert cnn.classifier[0].in_features == 32 * 7 * 7 and cnn.classifier[0].out_features == 1024
    assert cnn.classifier[2].out_features == 62

    mlp = build_model("mlp", FMNIST, 10, width_mult=0.5)
    assert [m.out_features for m in mlp.modules() if isinstance(m, nn.Linear)] == [100, 100, 10]


def test_width_mult_rounds_up() -> None:
    vgg = build_model("vgg11", CIFAR, 10, width_mult=0.3)
    convs = [m.out_channels for m in vgg.modules() if isinstance(m, nn.Conv2d)]
    assert convs == [math.ceil(w * 0.3) for w in (64, 128, 256, 256, 512, 512, 512, 512)]
    assert convs[0] == 20  # ceil(19.2)
    assert scaled_width(100, 0.07) == 7  # not 8 despite 100 * 0.07 = 7.000000000000001
    assert scaled_width(3, 0.01) == 1
    lstm = build_model("char_lstm", SHAKESPEARE, VOCAB, width_mult=0.25)
    assert (lstm.lstm.input_size, lstm.lstm.hidden_size) == (2, 64)


@pytest.mark.parametrize("name, shape", [("vgg11", CIFAR), ("conv2", FMNIST), ("mlp", DIGITS), ("char_lstm", SHAKESPEARE)])
def test_deterministic_given_seed(name: str, shape: tuple[int, ...]) -> None:
    classes = VOCAB if name == "char_lstm" else 10
    torch.manual_seed(123)
    a = build_model(name, shape, classes).state_dict()
    torch.manual_seed(123)
    b = build_model(name, shape, classes).state_dict()
    torch.manual_seed(124)
    c = build_model(name, shape, classes).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ModelError) as info:
        build_model("resnet18", CIFAR, 10)
    assert isinstance(info.value, ValueError)
    for name in MODELS:
        assert name in str(info.value)


def test_name_is_case_insensitive() -> None:
    assert isinstance(build_model(" VGG11 ", CIFAR, 10), nn.Module)


@pytest.mark.parametrize(
    "name, shape, expected",
    [
        ("conv2", (28, 28), "(channels, height, width)"),
        ("vgg11", (80,), "(channels, height, width)"),
        ("char_lstm", FMNIST, "(seq_len,)"),
        ("mlp", (), "non-empty"),
        ("mlp", (0, 5), "positive"),
    ],
)
def test_bad_shape_raises(name: str, shape: tuple[int, ...], expected: str) -> None:
    with pytest.raises(ModelError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        build_model(name, shape, 10)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"widht_mult": 0.5},
        {"width_mult": 0},
        {"width_mult": -1.0},
        {"width_mult": float("nan")},
    ],
)
def test_bad_options_raise(kwargs: dict[str, object]) -> None:
    with pytest.raises(ModelError):
        build_model("conv2", FMNIST, 10, **kwargs)


def test_unknown_option_lists_accepted() -> None:
    with pytest.raises(ModelError, match="width_mult"):
        build_model("mlp", FMNIST, 10, hiden=(10,))
    with pytest.raises(ModelError):
        build_model("mlp", FMNIST, 10, hidden=(10, 0))
    with pytest.raises(ModelError):
        build_model("char_lstm", SHAKESPEARE, VOCAB, layers=0)


@pytest.mark.parametrize("classes", [0, -3, 2.5])
def test_bad_num_classes(classes: object) -> None:
    with pytest.raises(ModelError):
        build_model("mlp", DIGITS, classes)  # type: ignore[arg-type]
