"""A model's parameters as one flat vector, prunable weights first.

The layout orders every parameter so that the prunable weights (conv, linear and LSTM weight
matrices) occupy the prefix ``[0, N)`` and everything else (biases, norms, embeddings) the suffix.
Ranking indices, masks and residual pieces address the prefix, and since it starts at offset 0
they are also indices into the full vector. :meth:`ParamLayout.bind` makes a module's parameters
(and their gradients) views into flat tensors, so training updates the flat vector in place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn


@dataclass(frozen=True)
class ParamEntry:
    """One parameter's place in the flat vector."""

    name: str
    shape: tuple[int, ...]
    offset: int
    numel: int
    prunable: bool

    @property
    def stop(self) -> int:
        return self.offset + self.numel


def default_prunable_names(model: nn.Module) -> list[str]:
    """Weights of conv/linear layers and LSTM weight matrices; not biases, norms, embeddings."""
    names: list[str] = []
    for mod_name, module in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            names.append(prefix + "weight")
        elif isinstance(module, (nn.LSTM, nn.GRU, nn.RNN)):
            for pname, _ in module.named_parameters(recurse=False):
                if pname.startswith(("weight_ih", "weight_hh")):
                    names.append(prefix + pname)
    return names


class ParamLayout:
    """Where each parameter of a model lives in the flat vector (prunable prefix first)."""

    def __init__(self, model: nn.Module, prunable: Iterable[str] | None = None) -> None:
        params = dict(model.named_parameters())
        prunable_names = list(prunable) if prunable is not None else default_prunable_names(model)
        unknown = [n for n in prunable_names if n not in params]
        if unknown:
            raise ValueError(f"prunable parameter names not in the model: {unknown}")
        prunable_set = set(prunable_names)
        ordered = [n for n in params if n in prunable_set] + [n for n in params if n not in prunable_set]
        entries: list[ParamEntry] = []
        offset = 0
        for name in ordered:
            p = params[name]
            entries.append(ParamEntry(name, tuple(p.shape), offset, p.numel(), name in prunable_set))
            offset += p.numel()
        self.entries: tuple[ParamEntry, ...] = tuple(entries)
        self.total: int = offset
        self.num_prunable: int = sum(e.numel for e in entries if e.prunable)
        self._by_name = {e.name: e for e in entries}

    # -- structure
    @property
    def prunable_entries(self) -> tuple[ParamEntry, ...]:
        return tuple(e for e in self.entries if e.prunable)

    def entry(self, name: str) -> ParamEntry:
        return self._by_name[name]

    def layer_bounds(self) -> list[tuple[int, int]]:
        """``(start, stop)`` of each prunable layer inside the prefix."""
        return [(e.offset, e.stop) for e in self.prunable_entries]

    def layer_of(self) -> torch.Tensor:
        """Layer index (0..L-1) of every prunable weight, as an int64 tensor of length N."""
        out = torch.empty(self.num_prunable, dtype=torch.int64)
        for i, (a, b) in enumerate(self.layer_bounds()):
            out[a:b] = i
        return out

    # -- conversion
    def flatten(self, model: nn.Module) -> torch.Tensor:
        """A new flat float32 vector holding the model's current parameters."""
        params = dict(model.named_parameters())
        flat = torch.empty(self.total, dtype=torch.float32)
        with torch.no_grad():
            for e in self.entries:
                flat[e.offset : e.stop] = params[e.name].detach().reshape(-1)
        return flat

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of ``flat`` shaped like each parameter (no copies)."""
        self.check(flat)
        return {e.name: flat[e.offset : e.stop].view(e.shape) for e in self.entries}

    def load(self, model: nn.Module, flat: torch.Tensor) -> None:
        """Copy ``flat`` into the model's parameters."""
        views = self.views(flat)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(views[name])

    def bind(self, model: nn.Module, flat: torch.Tensor, grad: torch.Tensor | None = None) -> None:
        """Make the model's parameters (and gradients, if ``grad`` is given) views into flat tensors.

        After binding, an optimiser step on the flat vector is an update of the model and a
        backward pass accumulates gradients straight into ``grad``.
        """
        views = self.views(flat)
        gviews = self.views(grad) if grad is not None else None
        for name, p in model.named_parameters():
            p.data = views[name]
            if gviews is not None:
                p.grad = gviews[name]

    def check(self, flat: torch.Tensor) -> None:
        """Raise a clear error unless ``flat`` is a 1-D float tensor of the right length."""
        if flat.dim() != 1 or flat.numel() != self.total:
            raise ValueError(
                f"expected a flat vector of {self.total} weights, got shape {tuple(flat.shape)}"
            )
        if not flat.is_floating_point():
            raise ValueError(f"expected floating-point weights, got {flat.dtype}")

    def full_mask(self, prunable_mask: torch.Tensor | None) -> torch.Tensor | None:
        """Extend a bool mask over the prefix to the whole vector (suffix always kept)."""
        if prunable_mask is None:
            return None
        if prunable_mask.numel() != self.num_prunable:
            raise ValueError(
                f"mask has {prunable_mask.numel()} entries, the model has {self.num_prunable} prunable weights"
            )
        out = torch.ones(self.total, dtype=torch.bool)
        out[: self.num_prunable] = prunable_mask
        return out

    def __repr__(self) -> str:
        return f"ParamLayout(total={self.total}, prunable={self.num_prunable}, layers={len(self.prunable_entries)})"
