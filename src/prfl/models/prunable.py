"""Which parameters of a model are subject to pruning.

Pruning (and the density bookkeeping of the cost model) acts on the weight
matrices of linear maps only: convolution kernels, fully connected weights and
the input/hidden (and projection) matrices of recurrent layers. Biases,
normalisation affine parameters and embeddings are always kept dense because
they are small and removing entries from them does not save matmul work.
"""

from __future__ import annotations

import re

from torch import nn

__all__ = ["PRUNABLE_MODULE_TYPES", "prunable_parameter_names", "is_rnn_weight"]

#: Module types whose ``weight`` parameter is prunable.
PRUNABLE_MODULE_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)

# weight_ih_l0, weight_hh_l1_reverse, weight_hr_l0 (LSTM projection), ...
_RNN_WEIGHT = re.compile(r"^weight_(ih|hh|hr)_l\d+(_reverse)?$")


def is_rnn_weight(local_name: str) -> bool:
    """True if ``local_name`` (a parameter name inside an ``nn.RNNBase``) is a weight matrix."""
    return _RNN_WEIGHT.match(local_name) is not None


def prunable_parameter_names(model: nn.Module) -> list[str]:
    """Full names of the prunable parameters of ``model``, in ``named_parameters()`` order.

    Prunable: ``weight`` of every Conv1d/2d/3d and Linear module, and the
    ``weight_ih_l*`` / ``weight_hh_l*`` / ``weight_hr_l*`` matrices of RNN/LSTM/GRU
    modules. Parameters shared between modules are reported once, under the
    name ``named_parameters()`` gives them.
    """
    candidates: set[str] = set()
    for prefix, module in model.named_modules():
        dot = f"{prefix}." if prefix else ""
        if isinstance(module, PRUNABLE_MODULE_TYPES):
            if isinstance(module.weight, nn.Parameter):
                candidates.add(f"{dot}weight")
        elif isinstance(module, nn.RNNBase):
            for local, _ in module.named_parameters(recurse=False):
                if is_rnn_weight(local):
                    candidates.add(f"{dot}{local}")
    return [name for name, _ in model.named_parameters() if name in candidates]
