"""Local training of a (masked) model on one client's samples, and batched evaluation.

The trainer binds the model's parameters and gradients to two flat vectors (see
:class:`prfl.params.ParamLayout`), so one SGD step is a handful of vector operations over the
whole model and a mask costs one multiply of the gradient. Weights outside the mask start at
zero and stay exactly zero: their gradient, momentum and weight decay are all zero.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from prfl.kernels import cxx_compiler
from prfl.params import ParamLayout
from prfl.settings import TrainConfig

log = logging.getLogger(__name__)


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


class CompiledForward:
    """``torch.compile(model)``'s forward pass, falling back to the eager model.

    The fallback is taken when the platform has no C++ compiler (checked up front) or when
    compiling fails (then from that call on); either is logged once. The compiled graph calls
    the same GEMM and convolution kernels, but fuses the element-wise operations around them,
    so its floats may differ from eager execution in the last bits: eager is the reference,
    and every process of a run must take the same path for the run to be reproducible.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.compiled: Callable[[torch.Tensor], torch.Tensor] | None = None
        compiler = cxx_compiler()
        if compiler is None:
            log.warning("torch.compile needs a C++ compiler and none was found (set CXX or install g++): "
                        "training runs eagerly")
        else:
            self.compiled = torch.compile(model)
            log.info("training step compiled with torch.compile (C++ compiler %s)", compiler)

    @property
    def is_compiled(self) -> bool:
        return self.compiled is not None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.compiled is not None:
            try:
                return self.compiled(x)
            except Exception as exc:  # a backend failure: the eager model computes the same function
                log.warning("torch.compile failed (%s: %s): training runs eagerly", type(exc).__name__, exc)
                self.compiled = None
        return self.model(x)


class LocalTrainer:
    """Trains one model architecture for many tasks, reusing its buffers between tasks.

    One SGD step: the forward and backward pass leave each parameter's gradient in a tensor of
    its own (autograd hands the gradient it computed over, so nothing is zeroed or summed into
    a model-sized buffer), then, without autograd, per parameter ``p``::

        g_p <- g_p * m_p                       (masked task; m_p the mask over p, 0/1 floats)
        g_p <- g_p + weight_decay * w_p        (weight_decay > 0)
        b_p <- momentum * b_p + g_p; g_p <- b_p (momentum > 0; b_p = 0 at the start of a task)
        w_p <- w_p - lr * g_p

    the update of ``torch.optim.SGD`` (dampening 0, no Nesterov) with the mask folded in. The
    step that yields PR-FL's importance instead accumulates its gradient into the flat vector
    ``g`` (zeroed first): the same values, in one vector the size of the model.
    """

    def __init__(
        self,
        model: nn.Module,
        layout: ParamLayout,
        x_train: torch.Tensor | np.ndarray,
        y_train: torch.Tensor | np.ndarray,
        cfg: TrainConfig,
        compile: bool = False,
    ) -> None:
        """``compile``: run the forward pass (and so its backward) through ``torch.compile``
        where the platform can (:class:`CompiledForward`); off by default, eager is the reference."""
        self.model = model
        self.layout = layout
        self.cfg = cfg
        self.forward: Callable[[torch.Tensor], torch.Tensor] = CompiledForward(model) if compile else model
        self.x = torch.as_tensor(x_train)
        self.y = torch.as_tensor(y_train, dtype=torch.int64)
        if len(self.x) != len(self.y):
            raise ValueError(f"{len(self.x)} training inputs but {len(self.y)} labels")
        named = dict(model.named_parameters())
        self._params = [named[e.name] for e in layout.entries]  # layout order: prunable first
        self.g = torch.zeros(layout.total, dtype=torch.float32)
        self._g_views = list(layout.views(self.g).values())
        self._buf_views: list[torch.Tensor] | None = None  # momentum buffers, made on first use
        self._mask_cache: tuple[weakref.ref[torch.Tensor], int, torch.Tensor, list[torch.Tensor]] | None = None
        # The model is bound to this vector between tasks (evaluation copies weights into it),
        # and to the task's own output vector while it trains.
        self._own = layout.flatten(model)  # binding keeps the model's current values
        self.w = self._own
        self._w_views: list[torch.Tensor] = []
        self._bind(self._own)

    def _bind(self, flat: torch.Tensor) -> None:
        """Make the model's parameters views into ``flat``: training updates ``flat`` in place."""
        self.layout.bind(self.model, flat)
        self.w = flat
        self._w_views = list(self.layout.views(flat).values())

    def train(
        self,
        weights: torch.Tensor,
        indices: np.ndarray,
        seed: int,
        mask: torch.Tensor | None = None,
        want_importance: bool = False,
        cfg: TrainConfig | None = None,
        out: torch.Tensor | None = None,
    ) -> TrainOutput:
        """Run one local task from ``weights`` on the samples ``indices``, under ``mask``.

        Returns new weights, the mean training loss, and when asked for, the squared gradient of
        the last step over the prunable weights times the sample count. The gradient is taken
        before masking, so pruned weights get an importance too.

        The new weights are written into ``out`` when given (a float32 vector of the model's
        size, e.g. a shared-memory slot; it may be ``weights`` itself), else into a fresh
        vector. Either way the trainer trains in that vector and hands it over: no copy.
        """
        cfg = cfg or self.cfg
        self.layout.check(weights)
        if out is not None:
            self.layout.check(out)
            if out.dtype != torch.float32 or not out.is_contiguous():
                raise ValueError(f"out must be a contiguous float32 vector, got {out.dtype}")
        indices = np.asarray(indices, dtype=np.int64)
        n = len(indices)
        t0 = time.perf_counter()
        masked = self._float_mask(mask)
        fmask = None if masked is None else masked[0]
        npr = self.layout.num_prunable
        target = out if out is not None else torch.empty(self.layout.total, dtype=torch.float32)
        self._bind(target)
        if fmask is None:
            if target is not weights:
                target.copy_(weights)
        else:  # one pass: W ⊙ m into the prefix, the suffix as it is
            torch.mul(weights[:npr], fmask, out=target[:npr])
            if target is not weights:
                target[npr:].copy_(weights[npr:])
        if cfg.momentum:
            self._zero_momentum()
        self.model.train()
        total_loss = 0.0
        batches = batch_schedule(n, cfg, seed)
        grad_sq = None
        idx_t = torch.from_numpy(indices)
        for step, pos in enumerate(batches):
            sel = idx_t[torch.from_numpy(pos)]
            xb, yb = self.x[sel], self.y[sel]
            flat_grad = want_importance and step == len(batches) - 1
            self._reset_grads(flat_grad)
            loss = loss_fn(cfg.loss, self.forward(xb), yb)
            loss.backward()
            total_loss += float(loss.detach())
            if want_importance and step == len(batches) - 1:
                grad_sq = self.g[: self.layout.num_prunable].square() * float(n)
            self._sgd_step(cfg, None if masked is None else masked[1])
        for p in self._params:
            p.grad = None  # gradients are not kept between tasks
        self._bind(self._own)  # the output is handed over: nothing here writes to it again
        seconds = time.perf_counter() - t0
        return TrainOutput(
            weights=target,
            num_samples=n,
            mean_loss=total_loss / len(batches),
            steps=len(batches),
            compute_seconds=seconds,
            grad_sq=grad_sq,
        )

    def _reset_grads(self, flat: bool) -> None:
        """Before a backward pass: no gradients (autograd hands its own over), or, with ``flat``,
        zeroed views into ``g`` that the backward pass accumulates into."""
        if flat:
            self.g.zero_()
            for p, gv in zip(self._params, self._g_views):
                p.grad = gv
        else:
            for p in self._params:
                p.grad = None

    def _zero_momentum(self) -> None:
        if self._buf_views is None:
            self._buf_views = list(self.layout.views(torch.zeros(self.layout.total, dtype=torch.float32)).values())
        else:
            for b in self._buf_views:
                b.zero_()

    def _float_mask(self, mask: torch.Tensor | None) -> tuple[torch.Tensor, list[torch.Tensor]] | None:
        """The mask over the prunable prefix as 0/1 floats and its views shaped like each
        prunable parameter, cached for the last mask object seen (policies hand out one mask
        object per density, so consecutive tasks reuse it)."""
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
            return cached[2], cached[3]
        fmask = mask.to(torch.float32)
        views = [fmask[e.offset : e.stop].view(e.shape) for e in self.layout.prunable_entries]
        self._mask_cache = (weakref.ref(mask), mask._version, fmask, views)
        return fmask, views

    def _sgd_step(self, cfg: TrainConfig, mask_views: list[torch.Tensor] | None) -> None:
        """SGD with optional momentum and weight decay (as torch.optim.SGD), parameter by
        parameter on views of the flat vectors; gradients outside the mask are zeroed first."""
        grads = []
        for p in self._params:
            g = p.grad
            grads.append(torch.zeros_like(p) if g is None else g)  # a parameter the forward pass did not use
        if mask_views is not None:
            for g, m in zip(grads, mask_views):  # the prunable parameters come first
                g.mul_(m)
        if cfg.weight_decay:
            for g, w in zip(grads, self._w_views):
                g.add_(w, alpha=cfg.weight_decay)
        if cfg.momentum:
            assert self._buf_views is not None
            for b, g in zip(self._buf_views, grads):
                b.mul_(cfg.momentum).add_(g)
            grads = self._buf_views
        for w, g in zip(self._w_views, grads):
            w.add_(g, alpha=-cfg.lr)

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
