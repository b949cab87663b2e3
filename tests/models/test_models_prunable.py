"""Selection of prunable parameters."""

from __future__ import annotations

from torch import nn

from prfl.models import build_model, prunable_parameter_names


def test_conv2_prunable_names() -> None:
    model = build_model("conv2", (1, 28, 28), 62)
    assert prunable_parameter_names(model) == [
        "features.0.weight",
        "features.3.weight",
        "classifier.0.weight",
        "classifier.2.weight",
    ]


def test_vgg11_prunable_names_are_all_weights() -> None:
    model = build_model("vgg11", (3, 32, 32), 10)
    names = prunable_parameter_names(model)
    assert len(names) == 8 + 3
    assert all(n.endswith(".weight") for n in names)
    assert names == [n for n, _ in model.named_parameters() if n.endswith("weight")]


def test_char_lstm_excludes_embedding_and_biases() -> None:
    model = build_model("char_lstm", (80,), 81)
    names = prunable_parameter_names(model)
    assert names == [
        "lstm.weight_ih_l0",
        "lstm.weight_hh_l0",
        "lstm.weight_ih_l1",
        "lstm.weight_hh_l1",
        "fc.weight",
    ]
    assert "embed.weight" not in names
    assert not any("bias" in n for n in names)


def test_generic_modules() -> None:
    model = nn.Sequential(
        nn.Conv1d(2, 4, 3),
        nn.BatchNorm1d(4),
        nn.GRU(4, 5, bidirectional=True),
        nn.LayerNorm(10),
        nn.Conv3d(1, 2, 1, bias=False),
        nn.Linear(10, 3),
    )
    assert prunable_parameter_names(model) == [
        "0.weight",
        "2.weight_ih_l0",
        "2.weight_hh_l0",
        "2.weight_ih_l0_reverse",
        "2.weight_hh_l0_reverse",
        "4.weight",
        "5.weight",
    ]


def test_shared_weight_reported_once() -> None:
    a = nn.Linear(4, 4)
    b = nn.Linear(4, 4)
    b.weight = a.weight
    model = nn.Sequential(a, b)
    assert prunable_parameter_names(model) == ["0.weight"]
