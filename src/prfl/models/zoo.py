"""Model zoo: VGG-11, the LEAF FEMNIST CNN, an MLP and the LEAF Shakespeare LSTM.

All builders share the signature ``builder(input_shape, num_classes, **options)``
where ``input_shape`` excludes the batch dimension. Hidden widths accept a
``width_mult`` option (HeteroFL-style width scaling): every hidden width ``w``
becomes ``ceil(w * width_mult)`` (at least 1) while the input channels and the
number of classes stay fixed, so a width-``r`` model is a channel slice of the
full one. ``scaler=True`` adds HeteroFL's train-time scaler: every hidden activation is divided
by ``width_mult`` in training mode (identity in eval mode), so a width-``r`` sub-model trains at
the activation scale of the full model; it adds no parameters and keeps parameter names.

Initialisation is PyTorch's default, so models are deterministic given
``torch.manual_seed``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from prfl.models.errors import ModelError

__all__ = [
    "MODELS",
    "VGG11_CONFIG",
    "CharLSTM",
    "ConvNet",
    "MLP",
    "ScaledReLU",
    "build_model",
    "scaled_width",
]

Builder = Callable[..., nn.Module]

# The only module-level mutable state: name -> builder, filled at import time.
_BUILDERS: dict[str, Builder] = {}

#: VGG-11 ("configuration A") feature extractor: conv widths and "M" = 2x2 max-pool.
VGG11_CONFIG: tuple[int | str, ...] = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")

_WIDTH_EPS = 1e-9  # guards ceil() against float noise such as 100 * 0.07 = 7.000000000000001


def _register(name: str) -> Callable[[Builder], Builder]:
    def deco(fn: Builder) -> Builder:
        _BUILDERS[name] = fn
        return fn

    return deco


def scaled_width(width: int, width_mult: float) -> int:
    """Hidden width after scaling: ``max(1, ceil(width * width_mult))``."""
    return max(1, math.ceil(width * width_mult - _WIDTH_EPS))


def _check_width_mult(width_mult: float) -> float:
    if isinstance(width_mult, bool) or not isinstance(width_mult, (int, float)):
        raise ModelError(f"width_mult must be a positive finite number, got {width_mult!r}")
    if not math.isfinite(width_mult) or width_mult <= 0:
        raise ModelError(f"width_mult must be a positive finite number, got {width_mult!r}")
    return float(width_mult)


def _check_scaler(scaler: bool) -> bool:
    if not isinstance(scaler, bool):
        raise ModelError(f"scaler must be True or False, got {scaler!r}")
    return scaler


def _relu(width_mult: float, scaler: bool) -> nn.Module:
    """The hidden activation: ``ReLU``, or ``ScaledReLU(width_mult)`` when the scaler is on."""
    return ScaledReLU(width_mult, inplace=True) if scaler else nn.ReLU(inplace=True)


def _image_shape(name: str, input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    if len(input_shape) != 3:
        raise ModelError(
            f"{name} expects input_shape (channels, height, width), got {input_shape!r}"
        )
    c, h, w = input_shape
    return c, h, w


def _pool_if_possible(h: int, w: int) -> tuple[bool, int, int]:
    """Apply a 2x2/stride-2 pool only if the output keeps at least 1x1 spatial size."""
    if min(h, w) >= 2:
        return True, h // 2, w // 2
    return False, h, w


# --------------------------------------------------------------------------- models


class ScaledReLU(nn.ReLU):
    """ReLU followed by HeteroFL's scaler: ``relu(x) / rate`` in training mode, ``relu(x)`` in eval.

    ``relu(x) / rate = relu(x / rate)`` for ``rate > 0``, so this is the scaler applied to the
    layer output before or after the activation alike. A subclass of ``nn.ReLU`` so the cost
    model counts it as one element-wise op, like the plain ReLU it replaces.
    """

    def __init__(self, rate: float, inplace: bool = False) -> None:
        super().__init__(inplace=inplace)
        self.rate = float(rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        if self.training and self.rate != 1.0:
            out = out / self.rate
        return out

    def extra_repr(self) -> str:
        return f"rate={self.rate}" + (", inplace=True" if self.inplace else "")


class ConvNet(nn.Module):
    """Convolutional ``features`` followed by a fully connected ``classifier``.

    ``forward(x) = classifier(flatten(features(x)))`` for ``x`` of shape (B, C, H, W).
    Used for VGG-11 and the LEAF CNN. ``scaler_rate`` is the train-time scaler's rate (None: off).
    """

    def __init__(
        self, features: nn.Sequential, classifier: nn.Sequential, scaler_rate: float | None = None
    ) -> None:
        super().__init__()
        self.features = features
        self.classifier = classifier
        self.scaler_rate = scaler_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


class MLP(nn.Module):
    """``layers(flatten(x))``: Linear/ReLU stack over the flattened input.

    ``scaler_rate`` is the train-time scaler's rate (None: off).
    """

    def __init__(self, layers: nn.Sequential, scaler_rate: float | None = None) -> None:
        super().__init__()
        self.layers = layers
        self.scaler_rate = scaler_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(torch.flatten(x, 1))


class CharLSTM(nn.Module):
    """Character model: Embedding -> stacked LSTM -> Linear on the last time step.

    Input: int64 token ids of shape (B, T); output: logits (B, vocab_size) for
    the character following the sequence.

    With ``scaler_rate = r`` (HeteroFL's scaler), training mode divides the embedding output and
    the last hidden state fed to ``fc`` by ``r``; the LSTM's internal activations are left alone
    (they are saturating gates, and ``nn.LSTM`` offers no hook between its stacked layers).
    """

    def __init__(
        self, vocab_size: int, embed_dim: int, hidden: int, layers: int, scaler_rate: float | None = None
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.lstm = nn.LSTM(embed_dim, hidden, num_layers=layers, batch_first=True)
        self.fc = nn.Linear(hidden, vocab_size)
        self.scaler_rate = scaler_rate

    def _scale(self, x: torch.Tensor) -> torch.Tensor:
        rate = self.scaler_rate
        return x / rate if self.training and rate is not None and rate != 1.0 else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self._scale(self.embed(x)))
        return self.fc(self._scale(out[:, -1, :]))


# --------------------------------------------------------------------------- builders


@_register("vgg11")
def _build_vgg11(
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    width_mult: float = 1.0,
    dropout: float = 0.0,
    scaler: bool = False,
) -> nn.Module:
    """VGG-11 without batch norm; 3x3 convs (padding 1), FC 512-512-num_classes.

    A max-pool is skipped when the spatial size is already below 2 in either
    dimension, so small inputs (8x8 digits, 28x28 images) still build: 28x28
    keeps 4 of the 5 pools (28-14-7-3-1), 8x8 keeps 3 (8-4-2-1). The flatten
    size is ``last_width * H_out * W_out`` (512 * 1 * 1 for 32x32 inputs).
    """
    width_mult = _check_width_mult(width_mult)
    scaler = _check_scaler(scaler)
    if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ModelError(f"dropout must be in [0, 1), got {dropout!r}")
    in_ch, h, w = _image_shape("vgg11", input_shape)
    layers: list[nn.Module] = []
    ch = in_ch
    for item in VGG11_CONFIG:
        if item == "M":
            pooled, h, w = _pool_if_possible(h, w)
            if pooled:
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            out = scaled_width(int(item), width_mult)
            layers += [nn.Conv2d(ch, out, kernel_size=3, padding=1), _relu(width_mult, scaler)]
            ch = out
    fc = scaled_width(512, width_mult)
    head: list[nn.Module] = []
    in_features = ch * h * w
    for _ in range(2):
        head += [nn.Linear(in_features, fc), _relu(width_mult, scaler)]
        if dropout > 0:
            head.append(nn.Dropout(dropout))
        in_features = fc
    head.append(nn.Linear(in_features, num_classes))
    return ConvNet(nn.Sequential(*layers), nn.Sequential(*head), width_mult if scaler else None)


@_register("conv2")
def _build_conv2(
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    width_mult: float = 1.0,
    scaler: bool = False,
) -> nn.Module:
    """LEAF FEMNIST CNN: [conv5x5(32, pad 2)-ReLU-pool2] x2 with 32/64 channels, FC 2048, FC classes.

    Flatten size is ``64 * (H // 4) * (W // 4)`` (3136 for 28x28, 256 for 8x8,
    4096 for 32x32); as in VGG-11 a pool is skipped if the map is already < 2.
    """
    width_mult = _check_width_mult(width_mult)
    scaler = _check_scaler(scaler)
    in_ch, h, w = _image_shape("conv2", input_shape)
    layers: list[nn.Module] = []
    ch = in_ch
    for width in (32, 64):
        out = scaled_width(width, width_mult)
        layers += [nn.Conv2d(ch, out, kernel_size=5, padding=2), _relu(width_mult, scaler)]
        pooled, h, w = _pool_if_possible(h, w)
        if pooled:
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        ch = out
    fc = scaled_width(2048, width_mult)
    head = nn.Sequential(nn.Linear(ch * h * w, fc), _relu(width_mult, scaler), nn.Linear(fc, num_classes))
    return ConvNet(nn.Sequential(*layers), head, width_mult if scaler else None)


@_register("mlp")
def _build_mlp(
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    hidden: Sequence[int] = (200, 200),
    width_mult: float = 1.0,
    scaler: bool = False,
) -> nn.Module:
    """Flatten -> [Linear(h_i) -> ReLU]* -> Linear(num_classes); ``hidden=()`` is logistic regression."""
    width_mult = _check_width_mult(width_mult)
    scaler = _check_scaler(scaler)
    if len(input_shape) < 1:
        raise ModelError(f"mlp expects a non-empty input_shape, got {input_shape!r}")
    try:
        widths = [int(h) for h in hidden]
    except (TypeError, ValueError) as exc:
        raise ModelError(f"hidden must be a sequence of positive ints, got {hidden!r}") from exc
    if any(h < 1 for h in widths):
        raise ModelError(f"hidden must be a sequence of positive ints, got {hidden!r}")
    layers: list[nn.Module] = []
    in_features = math.prod(input_shape)
    for width in widths:
        out = scaled_width(width, width_mult)
        layers += [nn.Linear(in_features, out), _relu(width_mult, scaler)]
        in_features = out
    layers.append(nn.Linear(in_features, num_classes))
    return MLP(nn.Sequential(*layers), width_mult if scaler else None)


@_register("char_lstm")
def _build_char_lstm(
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    embed_dim: int = 8,
    hidden: int = 256,
    layers: int = 2,
    width_mult: float = 1.0,
    scaler: bool = False,
) -> nn.Module:
    """LEAF Shakespeare model; ``num_classes`` is the vocabulary size, input_shape is ``(seq_len,)``.

    ``width_mult`` scales both ``embed_dim`` and ``hidden``.
    """
    width_mult = _check_width_mult(width_mult)
    scaler = _check_scaler(scaler)
    if len(input_shape) != 1:
        raise ModelError(f"char_lstm expects input_shape (seq_len,), got {input_shape!r}")
    for key, value in (("embed_dim", embed_dim), ("hidden", hidden), ("layers", layers)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ModelError(f"{key} must be a positive int, got {value!r}")
    return CharLSTM(
        vocab_size=num_classes,
        embed_dim=scaled_width(embed_dim, width_mult),
        hidden=scaled_width(hidden, width_mult),
        layers=layers,
        scaler_rate=width_mult if scaler else None,
    )


#: Names accepted by :func:`build_model`.
MODELS: tuple[str, ...] = tuple(sorted(_BUILDERS))


def _normalise_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    try:
        shape = tuple(int(d) for d in input_shape)
    except (TypeError, ValueError) as exc:
        raise ModelError(f"input_shape must be a sequence of positive ints, got {input_shape!r}") from exc
    if any(d < 1 for d in shape) or any(int(d) != d for d in input_shape):
        raise ModelError(f"input_shape must be a sequence of positive ints, got {input_shape!r}")
    return shape


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int, **options: Any) -> nn.Module:
    """Build model ``name`` for per-sample ``input_shape`` (no batch dim) and ``num_classes`` outputs.

    Names are case-insensitive. Raises :class:`ModelError` for unknown names,
    unsupported shapes and unknown or invalid options.
    """
    key = str(name).strip().lower()
    builder = _BUILDERS.get(key)
    if builder is None:
        raise ModelError(f"unknown model {name!r}; valid names: {', '.join(MODELS)}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ModelError(f"num_classes must be a positive int, got {num_classes!r}")
    shape = _normalise_shape(input_shape)
    accepted = [
        p.name for p in inspect.signature(builder).parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY
    ]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ModelError(
            f"unknown option(s) {', '.join(unknown)} for model {key!r}; accepted: {', '.join(accepted)}"
        )
    return builder(shape, num_classes, **options)
