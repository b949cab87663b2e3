"""Width slicing between a full model and its width-``r`` version (HeteroFL sub-models).

A width-``r`` model of the zoo (``build_model(..., width_mult=r)``) has the architecture of the
full model with every hidden width ``C`` cut to ``C_r = ceil(r * C)``; the input channels of the
first layer and the output classes of the last layer are unchanged. HeteroFL's sub-model is the
leading block of every parameter of the full model:

    sub[p] = full[p][:d_0^r, :d_1^r, ...]        (d^r: the sub-model's shape of parameter p)

i.e. the first ``C_r`` units/channels of each hidden layer, connected to the first ``C_r`` units of
the layer before. Two cases need a word:

* the Linear layer after a conv flatten sees ``C * H * W`` features in channel-major order
  (``torch.flatten`` of an NCHW tensor: feature ``c * H * W + h * W + w``). Viewed as
  ``(out, C, H, W)``, its sub-weight is ``[:out_r, :C_r, :, :]``, and because the spatial size is
  the same at every width, those are exactly the first ``C_r * H * W`` columns: the leading block
  of the ``(out, C * H * W)`` matrix.
* recurrent layers stack their gates along dim 0 (LSTM: ``[i; f; g; o]``, each ``H`` rows; GRU: 3
  gates). Their ``weight_ih/weight_hh/bias_ih/bias_hh`` are viewed as ``(gates, H, ...)`` and each
  gate block is sliced: ``[:, :H_r, :in_r]``.

:class:`SliceMap` turns this into one index tensor over the flat vectors of :mod:`prfl.params`:
``sub_flat = full_flat[idx]`` (the sub-model's own :class:`~prfl.params.ParamLayout` order) and
``full_flat[idx] = sub_flat`` writes a sub-model back.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from prfl.params import ParamLayout

__all__ = ["SliceMap", "block_indices", "gate_counts", "output_classes", "output_layer"]

_GATES = {"LSTM": 4, "GRU": 3}
_GATED_PREFIXES = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")


def block_indices(full_shape: Sequence[int], sub_shape: Sequence[int], gates: int = 1) -> torch.Tensor:
    """Row-major flat indices, into a tensor of ``full_shape``, of its leading ``sub_shape`` block.

    Returned in the row-major order of the block, so ``full.reshape(-1)[idx].view(sub_shape)`` is
    ``full[:s_0, :s_1, ...]``. With ``gates = g > 1`` dim 0 holds ``g`` stacked blocks of
    ``full_shape[0] / g`` rows and each keeps its first ``sub_shape[0] / g`` rows:
    ``full.view(g, -1, ...)[:, :s_0 / g, :s_1, ...]``.
    """
    full = tuple(int(d) for d in full_shape)
    sub = tuple(int(d) for d in sub_shape)
    if len(full) != len(sub):
        raise ValueError(f"cannot slice shape {sub} out of {full}: different number of dimensions")
    if any(s > f or s < 0 for s, f in zip(sub, full)):
        raise ValueError(f"cannot slice shape {sub} out of {full}: the sub-shape is larger")
    grid = torch.arange(math.prod(full), dtype=torch.int64).view(full)
    if gates > 1:
        if not full or full[0] % gates or sub[0] % gates:
            raise ValueError(f"dim 0 of {full} and {sub} must split into {gates} gate blocks")
        grid = grid.view(gates, full[0] // gates, *full[1:])
        block = grid[(slice(None), slice(0, sub[0] // gates), *(slice(0, s) for s in sub[1:]))]
    else:
        block = grid[tuple(slice(0, s) for s in sub)]
    return block.reshape(-1)


def gate_counts(model: nn.Module) -> dict[str, int]:
    """Full parameter name -> number of gate blocks stacked along dim 0 (recurrent layers only)."""
    out: dict[str, int] = {}
    for prefix, module in model.named_modules():
        if not isinstance(module, nn.RNNBase):
            continue
        if getattr(module, "proj_size", 0):
            raise ValueError(f"slicing an LSTM with proj_size > 0 ({prefix!r}) is not supported")
        gates = _GATES.get(module.mode, 1)
        dot = f"{prefix}." if prefix else ""
        for local, _ in module.named_parameters(recurse=False):
            if local.startswith(_GATED_PREFIXES):
                out[dot + local] = gates
    return out


class SliceMap:
    """Where a width-``r`` sub-model's parameters live in the full model's flat vector.

    ``idx`` (int64, length ``sub_layout.total``) satisfies ``sub_flat = full_flat[idx]`` with
    ``sub_flat`` in the sub-model's own ParamLayout order (prunable prefix first), so the same
    index scatters a sub-model back: ``full_flat[idx] = sub_flat``. Entries of ``idx`` are distinct.
    Only the two models' structure is read (their values are ignored); they are not kept.
    """

    def __init__(
        self,
        full_model: nn.Module,
        sub_model: nn.Module,
        *,
        full_layout: ParamLayout | None = None,
        sub_layout: ParamLayout | None = None,
    ) -> None:
        self.full_layout = full_layout if full_layout is not None else ParamLayout(full_model)
        self.sub_layout = sub_layout if sub_layout is not None else ParamLayout(sub_model)
        full_gates = gate_counts(full_model)
        sub_gates = gate_counts(sub_model)
        if full_gates != sub_gates:
            raise ValueError("the full and sub models have different recurrent layers")
        full_names = {e.name for e in self.full_layout.entries}
        sub_names = {e.name for e in self.sub_layout.entries}
        if full_names != sub_names:
            diff = sorted(full_names ^ sub_names)
            raise ValueError(f"the full and sub models have different parameters: {diff[:5]}")
        parts: list[torch.Tensor] = []
        for e in self.sub_layout.entries:
            fe = self.full_layout.entry(e.name)
            try:
                local = block_indices(fe.shape, e.shape, sub_gates.get(e.name, 1))
            except ValueError as err:
                raise ValueError(f"parameter {e.name!r}: {err}") from err
            parts.append(local.add_(fe.offset))
        self.idx: torch.Tensor = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)

    @property
    def full_total(self) -> int:
        return self.full_layout.total

    @property
    def sub_total(self) -> int:
        return self.sub_layout.total

    @property
    def prunable_fraction(self) -> float:
        """Share of the full model's prunable weights the sub-model holds (``N_r / N``)."""
        n = self.full_layout.num_prunable
        return self.sub_layout.num_prunable / n if n else 1.0

    def slice(self, full_flat: torch.Tensor) -> torch.Tensor:
        """The sub-model's flat vector ``full_flat[idx]`` (a new tensor)."""
        self.full_layout.check(full_flat)
        return full_flat[self.idx]

    def scatter(self, full_flat: torch.Tensor, sub_flat: torch.Tensor) -> torch.Tensor:
        """A copy of ``full_flat`` with the sub-model's coordinates replaced: ``out[idx] = sub_flat``."""
        self.full_layout.check(full_flat)
        self.sub_layout.check(sub_flat)
        out = full_flat.clone()
        out[self.idx] = sub_flat.to(out.dtype)
        return out

    def held(self) -> torch.Tensor:
        """Bool mask over the full vector: True at the coordinates the sub-model holds."""
        out = torch.zeros(self.full_total, dtype=torch.bool)
        out[self.idx] = True
        return out

    def __repr__(self) -> str:
        return f"SliceMap(full={self.full_total}, sub={self.sub_total})"


def output_layer(model: nn.Module) -> tuple[str, str | None]:
    """Names of the weight and bias (None if absent) of the output layer: the last ``nn.Linear``."""
    last: tuple[str, str | None] | None = None
    for prefix, module in model.named_modules():
        if isinstance(module, nn.Linear):
            dot = f"{prefix}." if prefix else ""
            last = (dot + "weight", dot + "bias" if module.bias is not None else None)
    if last is None:
        raise ValueError("the model has no nn.Linear output layer")
    return last


def output_classes(model: nn.Module, layout: ParamLayout | None = None) -> torch.Tensor:
    """Class of every flat-vector coordinate of the output layer, -1 elsewhere (int64, ``layout.total``).

    Output-layer weight row ``c`` (all its columns) and bias entry ``c`` belong to class ``c``.
    """
    layout = layout if layout is not None else ParamLayout(model)
    weight, bias = output_layer(model)
    out = torch.full((layout.total,), -1, dtype=torch.int64)
    e = layout.entry(weight)
    rows, cols = e.shape[0], math.prod(e.shape[1:])
    out[e.offset : e.stop] = torch.arange(rows, dtype=torch.int64).repeat_interleave(cols)
    if bias is not None:
        b = layout.entry(bias)
        out[b.offset : b.stop] = torch.arange(b.numel, dtype=torch.int64)
    return out
