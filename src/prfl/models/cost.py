"""Per-layer parameter and FLOP accounting, dense and at a given per-layer density.

FLOP conventions (per sample, forward pass, one multiply-add = 2 FLOPs):

* Conv: ``2 * out_elements * (in_ch / groups * kh * kw)`` for the kernel, plus
  ``out_elements`` bias adds.
* Linear: ``2 * in * out * positions`` plus ``out * positions`` bias adds, where
  ``positions`` is the number of leading non-batch positions (1 for (B, in) input).
* RNN/LSTM/GRU: every weight matrix ``W`` is applied once per time step, so it
  costs ``2 * W.numel() * T``; its bias costs ``b.numel() * T``. Gate
  nonlinearities and the cell-state element-wise update are not counted.
  Each weight matrix gets its own :class:`LayerCost` entry (same ``name``,
  distinct ``param_name``), with ``bias_ih``/``bias_hh`` attached to the
  matching ``weight_ih``/``weight_hh``.
* Element-wise activations (ReLU, Sigmoid, Tanh, GELU, ...): 1 FLOP per output element.
* MaxPool: ``prod(kernel) - 1`` comparisons per output element; AvgPool:
  ``prod(kernel)`` per output element; adaptive pools: 1 per input element.
* BatchNorm (inference, folded scale and shift): 2 per element.
* Embedding, Dropout, Flatten and anything else: 0.

Only the kernel/matmul part (``prunable_flops``) scales with density; bias adds
and non-parametric ops are unchanged by pruning. A training step costs about
3x the forward pass: backward computes the gradient w.r.t. the layer input and
the gradient w.r.t. the weights, each about as expensive as the forward.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from prfl.models.errors import ModelError
from prfl.models.prunable import PRUNABLE_MODULE_TYPES, is_rnn_weight, prunable_parameter_names

__all__ = ["BACKWARD_FACTOR", "LayerCost", "ModelCost", "model_cost"]

#: train-step FLOPs = (1 + BACKWARD_FACTOR) * forward FLOPs (backward ~ grad wrt input + grad wrt weights).
BACKWARD_FACTOR: float = 2.0

_ELEMENTWISE = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU,
    nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus,
)
_MAXPOOL = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
_AVGPOOL = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
_ADAPTIVE = (
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)
_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_COUNTED_OPS = _ELEMENTWISE + _MAXPOOL + _AVGPOOL + _ADAPTIVE + _BATCHNORM


@dataclass(frozen=True)
class LayerCost:
    """Cost of one layer (or, for recurrent layers, of one weight matrix) per sample.

    ``forward_flops`` is the dense forward cost; ``prunable_flops`` is the part
    of it done by the prunable weights (``2 * MACs``), which scales with density.
    """

    name: str
    param_name: str | None
    params: int
    prunable: int
    forward_flops: int
    prunable_flops: int = 0


@dataclass(frozen=True)
class ModelCost:
    """Per-layer costs of a model; all FLOP figures are per sample unless stated."""

    layers: tuple[LayerCost, ...]

    @property
    def total_params(self) -> int:
        """All parameters (prunable or not)."""
        return sum(layer.params for layer in self.layers)

    @property
    def prunable_params(self) -> int:
        """Parameters that pruning may remove."""
        return sum(layer.prunable for layer in self.layers)

    @property
    def forward_flops(self) -> int:
        """Dense forward FLOPs per sample."""
        return sum(layer.forward_flops for layer in self.layers)

    @property
    def prunable_flops(self) -> int:
        """Dense forward FLOPs per sample done by prunable weights (scales with density)."""
        return sum(layer.prunable_flops for layer in self.layers)

    def _density(self, layer: LayerCost, layer_density: Mapping[str, float] | float) -> float:
        if not isinstance(layer_density, Mapping):
            return float(layer_density)
        if layer.param_name is not None and layer.param_name in layer_density:
            return float(layer_density[layer.param_name])
        return float(layer_density.get(layer.name, 1.0))

    def _check_density(self, layer_density: Mapping[str, float] | float) -> None:
        values: list[Any]
        if isinstance(layer_density, Mapping):
            known = {layer.name for layer in self.layers}
            known |= {layer.param_name for layer in self.layers if layer.param_name is not None}
            unknown = sorted(set(layer_density) - known)
            if unknown:
                raise ModelError(f"layer_density has unknown layer/parameter names: {', '.join(unknown)}")
            values = list(layer_density.values())
        else:
            values = [layer_density]
        for v in values:
            try:
                ok = 0.0 <= float(v) <= 1.0  # False for NaN
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise ModelError(f"densities must be in [0, 1], got {v!r}")

    def forward_flops_at(self, layer_density: Mapping[str, float] | float = 1.0) -> float:
        """Forward FLOPs per sample when each layer keeps a fraction ``d`` of its prunable weights.

        ``sum_l d_l * prunable_flops_l + (forward_flops_l - prunable_flops_l)``.
        ``layer_density`` is one density for all layers or a mapping keyed by
        prunable parameter name (e.g. ``"features.0.weight"``) or layer name
        (``"features.0"``; the parameter name wins); missing layers count as dense.
        """
        self._check_density(layer_density)
        total = 0.0
        for layer in self.layers:
            d = self._density(layer, layer_density) if layer.prunable_flops else 1.0
            total += d * layer.prunable_flops + (layer.forward_flops - layer.prunable_flops)
        return total

    def train_step_flops(self, batch_size: int, layer_density: Mapping[str, float] | float = 1.0) -> float:
        """FLOPs of one SGD step on ``batch_size`` samples: ``3 * batch_size * forward_flops_at(d)``.

        The factor 3 is forward + backward, the backward pass being ~2x forward
        (gradient w.r.t. inputs and gradient w.r.t. weights, each ~ one forward).
        """
        if batch_size < 0:
            raise ModelError(f"batch_size must be >= 0, got {batch_size!r}")
        return (1.0 + BACKWARD_FACTOR) * batch_size * self.forward_flops_at(layer_density)

    def bytes(self, dtype_bytes: int = 4) -> int:
        """Dense size of all parameters: ``total_params * dtype_bytes`` (fp32 by default)."""
        return self.total_params * dtype_bytes


# --------------------------------------------------------------------------- counting


def _conv_flops(module: nn.Module, out: torch.Tensor) -> tuple[int, int]:
    assert isinstance(module, nn.modules.conv._ConvNd)
    out_elements = out.numel()  # the dummy batch has one sample
    per_output = (module.in_channels // module.groups) * math.prod(module.kernel_size)
    bias = out_elements if module.bias is not None else 0
    return 2 * out_elements * per_output, bias


def _linear_flops(module: nn.Linear, out: torch.Tensor) -> tuple[int, int]:
    positions = out.numel() // module.out_features
    bias = positions * module.out_features if module.bias is not None else 0
    return 2 * module.in_features * module.out_features * positions, bias


def _rnn_steps(module: nn.RNNBase, inp: Any) -> int:
    if isinstance(inp, PackedSequence):
        return int(inp.data.shape[0])  # tokens across the (single-sample) batch
    assert isinstance(inp, torch.Tensor)
    if inp.dim() == 2:  # unbatched (T, features)
        return int(inp.shape[0])
    return int(inp.shape[1] if module.batch_first else inp.shape[0])


def _op_flops(module: nn.Module, inp: torch.Tensor, out: torch.Tensor) -> int:
    if isinstance(module, _ELEMENTWISE):
        return out.numel()
    if isinstance(module, _MAXPOOL):
        return out.numel() * (math.prod(_as_tuple(module.kernel_size, out.dim() - 2)) - 1)
    if isinstance(module, _AVGPOOL):
        return out.numel() * math.prod(_as_tuple(module.kernel_size, out.dim() - 2))
    if isinstance(module, _ADAPTIVE):
        return inp.numel()
    if isinstance(module, _BATCHNORM):
        return 2 * out.numel()
    return 0


def _as_tuple(value: int | tuple[int, ...], n: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, tuple) else (value,) * max(n, 1)


def _dummy_input(model: nn.Module, input_shape: tuple[int, ...], dtype: torch.dtype | None) -> torch.Tensor:
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    if dtype is None:
        uses_embedding = any(isinstance(m, nn.Embedding) for m in model.modules())
        dtype = torch.long if uses_embedding else (param.dtype if param is not None else torch.float32)
    return torch.zeros((1, *input_shape), dtype=dtype, device=device)


def model_cost(model: nn.Module, input_shape: tuple[int, ...], dtype: torch.dtype | None = None) -> ModelCost:
    """Count parameters and per-sample forward FLOPs of ``model`` layer by layer.

    Runs one forward pass on a zero input of shape ``(1, *input_shape)`` in eval
    mode with forward hooks (the model's training flag is restored). The input
    dtype defaults to int64 if the model has an ``nn.Embedding``, else the
    parameters' dtype. Every parameter is counted exactly once (shared ones at
    their first module), so ``total_params == sum(p.numel() for p in model.parameters())``.
    """
    shape = tuple(int(d) for d in input_shape)
    prunable = set(prunable_parameter_names(model))
    # flops[module_name] = [matmul, bias, other]; rnn_steps[module_name] = T
    flops: dict[str, list[int]] = {}
    rnn_steps: dict[str, int] = {}

    def hook_for(name: str) -> Callable[[nn.Module, tuple[Any, ...], Any], None]:
        def hook(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            acc = flops.setdefault(name, [0, 0, 0])
            if isinstance(module, nn.modules.conv._ConvNd):
                mm, b = _conv_flops(module, out)
                acc[0] += mm
                acc[1] += b
            elif isinstance(module, nn.Linear):
                mm, b = _linear_flops(module, out)
                acc[0] += mm
                acc[1] += b
            elif isinstance(module, nn.RNNBase):
                rnn_steps[name] = rnn_steps.get(name, 0) + _rnn_steps(module, args[0])
            else:
                acc[2] += _op_flops(module, args[0], out)

        return hook

    handles = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear, nn.RNNBase) + _COUNTED_OPS):
            handles.append(module.register_forward_hook(hook_for(name)))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(_dummy_input(model, shape, dtype))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)

    layers: list[LayerCost] = []
    seen: set[int] = set()
    for name, module in model.named_modules():
        dot = f"{name}." if name else ""
        own = [(local, p) for local, p in module.named_parameters(recurse=False) if id(p) not in seen]
        seen.update(id(p) for _, p in own)
        if isinstance(module, nn.RNNBase):
            layers.extend(_rnn_layers(name, dot, own, rnn_steps.get(name, 0), prunable))
            continue
        params = sum(p.numel() for _, p in own)
        mm, bias, other = flops.get(name, [0, 0, 0])
        weight_name = f"{dot}weight"
        if isinstance(module, PRUNABLE_MODULE_TYPES) and weight_name in prunable:
            weight = getattr(module, "weight")
            layers.append(LayerCost(name, weight_name, params, weight.numel(), mm + bias, mm))
        elif own or isinstance(module, _COUNTED_OPS) or name in flops:
            # non-prunable conv/linear (e.g. shared weight) keep their matmul FLOPs as fixed cost
            layers.append(LayerCost(name, None, params, 0, mm + bias + other, 0))
    return ModelCost(tuple(layers))


def _rnn_layers(
    name: str, dot: str, own: list[tuple[str, nn.Parameter]], steps: int, prunable: set[str]
) -> list[LayerCost]:
    """One entry per RNN weight matrix; ``bias_X_lK`` joins ``weight_X_lK``."""
    params = dict(own)
    out: list[LayerCost] = []
    used: set[str] = set()
    for local, weight in own:
        if not is_rnn_weight(local):
            continue
        bias_name = "bias" + local[len("weight"):]
        bias = params.get(bias_name)
        used |= {local, bias_name}
        mm = 2 * weight.numel() * steps
        b = bias.numel() * steps if bias is not None else 0
        full = f"{dot}{local}"
        n_params = weight.numel() + (bias.numel() if bias is not None else 0)
        if full in prunable:
            out.append(LayerCost(name, full, n_params, weight.numel(), mm + b, mm))
        else:
            out.append(LayerCost(name, None, n_params, 0, mm + b, 0))
    rest = sum(p.numel() for local, p in own if local not in used)
    if rest:
        out.append(LayerCost(name, None, rest, 0, 0, 0))
    return out
