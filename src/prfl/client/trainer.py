"""Local training of a (masked) model on one client's samples, and batched evaluation.

The trainer binds the model's parameters and gradients to two flat vectors (see
:class:`prfl.params.ParamLayout`), so one SGD step is a handful of vector operations over the
whole model and a mask costs one multiply of the gradient. Weights outside the mask start at
zero and stay exactly zero: their gradient, momentum and weight decay are all zero.
"""

from __future__ import annotations

import math
import time
import weakref
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from prfl.params import ParamLayout


@dataclass(frozen=True)
class TrainConfig:
    """Local optimiser settings. Defaults are the PR-FL paper's: SGD lr 0.25, batch 20, 5 steps.

    Give either ``local_steps`` (mini-batch steps per task) or ``local_epochs`` (passes over the
    client's samples); steps take precedence when both are set.
    """

    lr: float = 0.25
    momentum: float = 0.0
    weight_decay: float = 0.0
    batch_size: int = 20
    local_steps: int | None = 5
    local_epochs: float | None = None
    loss: Literal["ce", "bce"] = "ce"

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must lie in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be non-negative, got {self.weight_decay}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.local_steps is None and self.local_epochs is None:
            raise ValueError("set local_steps or local_epochs")
        if self.local_steps is not None and self.local_steps < 1:
            raise ValueError(f"local_steps must be at least 1, got {self.local_steps}")
        if self.local_epochs is not None and self.local_epochs <= 0:
            raise ValueError(f"local_epochs must be positive, got {self.local_epochs}")
        if self.loss not in ("ce", "bce"):
            raise ValueError(f"loss must be 'ce' or 'bce', got {self.loss!r}")

    def num_steps(self, num_samples: int) -> int:
        """Mini-batch steps one task takes on ``num_samples`` samples."""
        if self.local_steps is not None:
            return self.local_steps
        assert self.local_epochs is not None
        return max(1, math.ceil(self.local_epochs * math.ceil(num_samples / self.batch_size)))


def batch_schedule(num_samples: int, cfg: TrainConfig, seed: int) -> list[np.ndarray]:
    """Positions (into the client's index list) of each mini-batch of one task.

    Positions come from consecutive random permutations of the client's samples; a batch never
    repeats a sample within one pass. Deterministic for ``seed``.
    """
    if num_samples < 1:
        raise ValueError("a client needs at least one training sample")
    rng = np.random.default_rng(seed)
    steps = cfg.num_steps(num_samples)
    bs = min(cfg.batch_size, num_samples)
    batches: list[np.ndarray] = []
    perm = rng.permutation(num_samples)
    pos = 0
    while len(batches) < steps:
        if pos + bs > num_samples:
            if cfg.local_steps is None and pos < num_samples:
                batches.append(perm[pos:])  # epoch mode: the pass ends with a short batch
                if len(batches) == steps:
                    break
            perm = rng.permutation(num_samples)
            pos = 0
        batches.append(perm[pos : pos + bs])
        pos += bs
    return batches


@dataclass
class TrainOutput:
    """What one local task produced."""

    weights: torch.Tensor
    num_samples: int
    mean_loss: float
    steps: int
    compute_seconds: float
    grad_sq: torch.Tensor | None


def loss_fn(kind: str, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy, or BCE-with-logits on one-hot labels (the PR-FL code's choice)."""
    if kind == "ce":
        return F.cross_entropy(logits, y)
    onehot = F.one_hot(y, logits.shape[-1]).to(logits.dtype)
    return F.binary_cross_entropy_with_logits(logits, onehot)


class LocalTrainer:
    """Trains one model architecture for many tasks, reusing its buffers between tasks."""

    def __init__(
        self,
        model: nn.Module,
        layout: ParamLayout,
        x_train: torch.Tensor | np.ndarray,
        y_train: torch.Tensor | np.ndarray,
        cfg: TrainConfig,
    ) -> None:
        self.model = model
        self.layout = layout
        self.cfg = cfg
        self.x = torch.as_tensor(x_train)
        self.y = torch.as_tensor(y_train, dtype=torch.int64)
        if len(self.x) != len(self.y):
            raise ValueError(f"{len(self.x)} training inputs but {len(self.y)} labels")
        self.w = layout.flatten(model)  # binding keeps the model's current values
        self.g = torch.zeros(layout.total, dtype=torch.float32)
        self.buf = torch.zeros(layout.total, dtype=torch.float32)
        self._mask_cache: tuple[weakref.ref[torch.Tensor], int, torch.Tensor] | None = None
        layout.bind(model, self.w, self.g)

    def train(
        self,
        weights: torch.Tensor,
        indices: np.ndarray,
        seed: int,
        mask: torch.Tensor | None = None,
        want_importance: bool = False,
        cfg: TrainConfig | None = None,
    ) -> TrainOutput:
        """Run one local task from ``weights`` on the samples ``indices``, under ``mask``.

        Returns new weights (a fresh tensor), the mean training loss, and when asked for, the
        squared gradient of the last step over the prunable weights times the sample count.
        The gradient is taken before masking, so pruned weights get an importance too.
        """
        cfg = cfg or self.cfg
        self.layout.check(weights)
        indices = np.asarray(indices, dtype=np.int64)
        n = len(indices)
        t0 = time.perf_counter()
        fmask = self._float_mask(mask)
        npr = self.layout.num_prunable
        if fmask is None:
            self.w.copy_(weights)
        else:  # one pass: W ⊙ m into the prefix, the suffix as it is
            torch.mul(weights[:npr], fmask, out=self.w[:npr])
            self.w[npr:].copy_(weights[npr:])
        self.buf.zero_()
        self.model.train()
        total_loss = 0.0
        batches = batch_schedule(n, cfg, seed)
        grad_sq = None
        idx_t = torch.from_numpy(indices)
        for step, pos in enumerate(batches):
            sel = idx_t[torch.from_numpy(pos)]
            xb, yb = self.x[sel], self.y[sel]
            self.g.zero_()
            loss = loss_fn(cfg.loss, self.model(xb), yb)
            loss.backward()
            total_loss += float(loss.detach())
            if want_importance and step == len(batches) - 1:
                grad_sq = self.g[: self.layout.num_prunable].square() * float(n)
            self._sgd_step(cfg, fmask)
        seconds = time.perf_counter() - t0
        # Hand the trained vector over and bind the model to a fresh one: cheaper than a copy
        # (the next task overwrites every value anyway).
        out = self.w
        self.w = torch.empty_like(out)
        self.layout.bind(self.model, self.w)
        return TrainOutput(
            weights=out,
            num_samples=n,
            mean_loss=total_loss / len(batches),
            steps=len(batches),
            compute_seconds=seconds,
            grad_sq=grad_sq,
        )

    def _float_mask(self, mask: torch.Tensor | None) -> torch.Tensor | None:
        """The mask over the prunable prefix as 0/1 floats, cached for the last mask object seen
        (policies hand out one mask object per density, so consecutive tasks reuse it)."""
        if mask is None:
            return None
        if mask.dtype != torch.bool or mask.numel() != self.layout.num_prunable:
            raise ValueError(
                f"mask must be a bool tensor over the {self.layout.num_prunable} prunable weights, "
                f"got {mask.dtype} of {mask.numel()} entries"
            )
        cached = self._mask_cache
        # identity and version: a mask edited in place is converted again
        if cached is not None and cached[0]() is mask and cached[1] == mask._version:
            return cached[2]
        fmask = mask.to(torch.float32)
        self._mask_cache = (weakref.ref(mask), mask._version, fmask)
        return fmask

    def _sgd_step(self, cfg: TrainConfig, fmask: torch.Tensor | None) -> None:
        """SGD with optional momentum and weight decay (as torch.optim.SGD), on the flat vectors."""
        g = self.g
        if fmask is not None:
            g[: self.layout.num_prunable].mul_(fmask)
        if cfg.weight_decay:
            g.add_(self.w, alpha=cfg.weight_decay)
        if cfg.momentum:
            self.buf.mul_(cfg.momentum).add_(g)
            g = self.buf
        self.w.add_(g, alpha=-cfg.lr)

    @torch.no_grad()
    def evaluate(
        self, weights: torch.Tensor, x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray, batch_size: int = 1000
    ) -> tuple[float, float]:
        """Mean loss and accuracy of ``weights`` on ``(x, y)``, in batches."""
        return evaluate(self.model, self.layout, self.w, weights, x, y, self.cfg.loss, batch_size)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    layout: ParamLayout,
    bound: torch.Tensor,
    weights: torch.Tensor,
    x: torch.Tensor | np.ndarray,
    y: torch.Tensor | np.ndarray,
    loss: str = "ce",
    batch_size: int = 1000,
) -> tuple[float, float]:
    """Loss and accuracy of ``weights`` loaded into ``bound`` (the model's flat parameter view)."""
    layout.check(weights)
    bound.copy_(weights)
    model.eval()
    xt = torch.as_tensor(x)
    yt = torch.as_tensor(y, dtype=torch.int64)
    n = len(yt)
    if n == 0:
        raise ValueError("cannot evaluate on an empty set")
    total_loss = 0.0
    correct = 0
    for a in range(0, n, batch_size):
        logits = model(xt[a : a + batch_size])
        yb = yt[a : a + batch_size]
        total_loss += float(loss_fn(loss, logits, yb)) * len(yb)
        correct += int((logits.argmax(dim=-1) == yb).sum())
    return total_loss / n, correct / n
