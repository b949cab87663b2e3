"""Robust aggregation that respects masks: norm clipping, coordinate-wise trimmed mean and median.

A client *holds* weight k if k lies in the suffix (biases, held by everyone) or its mask keeps k.
Each coordinate is aggregated over its holders only, so a sparse client neither drags unheld
weights towards 0 nor counts as a vote for them; a weight nobody holds keeps the previous value.
The clients' models are stacked into one (K, T) tensor (K clients, T weights), so every method is
a handful of tensor operations over all clients at once; columns are processed in chunks to
bound the temporaries on large models.

- clipping (Sun et al. 2019; "centered clipping", Karimireddy et al. 2021, when the reference
  is the current model): scale each update W_i - W_ref, over the weights client i holds, to
  L2 norm at most c:   W_i' = W_ref + (W_i - W_ref) * min(1, c / ||W_i - W_ref||_held).
- coordinate-wise trimmed mean (Yin et al. 2018): for weight k with h_k holders, drop the
  t_k = floor(beta h_k) highest and t_k lowest values and average the rest, weighted by the
  clients' aggregation coefficients c_i (uniform when none are given).
- coordinate-wise median over the holders of each weight (mean of the two middle values when
  h_k is even). Coefficients are ignored: a median weighted by sample counts would hand a
  client that lies about its sample count the vote.

All functions are pure (inputs are never modified) and return tensors of ``prev``'s dtype.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from prfl.aggregation import mask_fedavg

ROBUST_METHODS: tuple[str, ...] = ("none", "clip", "trimmed_mean", "median")
_CHUNK = 1 << 20  # columns per chunk of the coordinate-wise methods
_ACC = torch.float64


# --------------------------------------------------------------------------- helpers
def check_method(method: str, trim: float = 0.1, clip_norm: float | None = None) -> None:
    """Raise a ValueError naming the option unless the robust settings make sense."""
    if method not in ROBUST_METHODS:
        raise ValueError(f"robust must be one of {', '.join(ROBUST_METHODS)}, got {method!r}")
    if isinstance(trim, bool) or not isinstance(trim, (int, float)) or not 0 <= trim < 0.5:
        raise ValueError(f"trim must be a fraction in [0, 0.5), got {trim!r}")
    if method == "clip" and clip_norm is None:
        raise ValueError("robust: clip needs clip_norm, the largest update norm kept (e.g. clip_norm: 1.0)")
    if clip_norm is not None and (
        isinstance(clip_norm, bool) or not isinstance(clip_norm, (int, float)) or not math.isfinite(clip_norm) or clip_norm <= 0
    ):
        raise ValueError(f"clip_norm must be a finite number > 0, got {clip_norm!r}")


def holders(masks: Sequence[torch.Tensor | None], num_prunable: int, total: int) -> torch.Tensor:
    """(K, T) bool: row i is client i's mask on the prefix (all True for None) and True on the suffix."""
    out = torch.ones(len(masks), total, dtype=torch.bool)
    for i, m in enumerate(masks):
        if m is not None:
            if m.dtype != torch.bool or m.shape != (num_prunable,):
                raise ValueError(f"masks[{i}] must be a bool tensor of shape ({num_prunable},), got {m.dtype} {tuple(m.shape)}")
            out[i, :num_prunable] = m
    return out


def stack(models: Sequence[torch.Tensor], total: int | None = None) -> torch.Tensor:
    """The client models as one (K, T) tensor (a copy)."""
    if len(models) == 0:
        raise ValueError("robust aggregation needs at least one model")
    t = models[0].numel() if total is None else total
    for i, w in enumerate(models):
        if w.dim() != 1 or w.numel() != t or not w.is_floating_point():
            raise ValueError(f"models[{i}] must be flat floating-point weights of length {t}, got {w.dtype} {tuple(w.shape)}")
    return torch.stack([w.detach() for w in models])


def _check(models: torch.Tensor, held: torch.Tensor, prev: torch.Tensor) -> None:
    if models.dim() != 2 or held.shape != models.shape or held.dtype != torch.bool:
        raise ValueError(f"models must be (K, T) and holders a bool tensor of the same shape, got {tuple(models.shape)} and {held.dtype} {tuple(held.shape)}")
    if prev.shape != (models.shape[1],) or not prev.is_floating_point():
        raise ValueError(f"prev must be flat floating-point weights of length {models.shape[1]}, got {prev.dtype} {tuple(prev.shape)}")


# --------------------------------------------------------------------------- clipping
def clip_updates(
    models: torch.Tensor, ref: torch.Tensor, held: torch.Tensor, max_norm: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip every row's update to norm ``max_norm`` on the weights it holds.

    With D_i = (W_i - W_ref) ⊙ h_i:  W_i' = (W_ref + D_i min(1, c / ||D_i||)) ⊙ h_i, so an unheld
    prefix weight stays 0 (the W ⊙ m convention). ``ref`` is (T,) or (K, T). Returns
    (clipped models in ``models``' dtype, the norms ||D_i|| in float64).
    """
    if models.dim() != 2 or held.shape != models.shape:
        raise ValueError(f"models must be (K, T) with holders of the same shape, got {tuple(models.shape)}, {tuple(held.shape)}")
    check_method("clip", clip_norm=max_norm)
    r = ref.to(_ACC)
    diff = torch.where(held, models.to(_ACC) - r, torch.zeros((), dtype=_ACC))
    norms = torch.linalg.vector_norm(diff, dim=1)
    scale = torch.where(norms > max_norm, max_norm / norms, torch.ones_like(norms))
    out = torch.where(held, r + diff * scale[:, None], torch.zeros((), dtype=_ACC))
    return out.to(models.dtype), norms


def clip_update(
    weights: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor | None, num_prunable: int, max_norm: float
) -> tuple[torch.Tensor, float]:
    """One client's update clipped to norm ``max_norm`` on its mask and the suffix (see
    :func:`clip_updates`); returns (new weights, the norm before clipping)."""
    held = holders([mask], num_prunable, weights.numel())
    out, norms = clip_updates(weights.detach()[None], ref, held, max_norm)
    return out[0], float(norms[0])


# --------------------------------------------------------------------------- coordinate-wise
def _sorted_chunks(models: torch.Tensor, held: torch.Tensor):
    """Yield (slice, sorted values with unheld entries as +inf, sort order, holder counts)."""
    total = models.shape[1]
    inf = torch.tensor(math.inf, dtype=_ACC)
    for lo in range(0, total, _CHUNK):
        sl = slice(lo, min(lo + _CHUNK, total))
        h = held[:, sl]
        vals = torch.where(h, models[:, sl].to(_ACC), inf)
        s, order = torch.sort(vals, dim=0, stable=True)
        yield sl, s, order, h.sum(dim=0)


def coordinate_median(models: torch.Tensor, held: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    """Median over the holders of each weight: with the h_k held values sorted, x_(m) for odd
    h_k = 2m+1, (x_(m-1) + x_(m)) / 2 for even h_k = 2m; ``prev`` where h_k = 0."""
    _check(models, held, prev)
    out = prev.to(_ACC).clone()
    for sl, s, _, cnt in _sorted_chunks(models, held):
        lo = ((cnt - 1).clamp(min=0) // 2)[None]
        hi = (cnt // 2).clamp(max=models.shape[0] - 1)[None]
        med = (s.gather(0, lo) + s.gather(0, hi))[0] / 2
        out[sl] = torch.where(cnt > 0, med, out[sl])
    return out.to(prev.dtype)


def trimmed_mean(
    models: torch.Tensor,
    held: torch.Tensor,
    prev: torch.Tensor,
    trim: float,
    weights: Sequence[float] | torch.Tensor | None = None,
) -> torch.Tensor:
    """Coordinate-wise trimmed mean over the holders of each weight.

    For weight k with h_k holders sorted ascending, t_k = floor(beta h_k): keep ranks
    t_k .. h_k - t_k - 1 and return sum c_i x_i / sum c_i over them (c_i = ``weights``, uniform
    when None); ``prev`` where h_k = 0 or the kept coefficients sum to 0. beta = 0 is the
    (masked) weighted mean over holders.
    """
    _check(models, held, prev)
    check_method("trimmed_mean", trim)
    k = models.shape[0]
    c = torch.ones(k, dtype=_ACC) if weights is None else torch.as_tensor(weights, dtype=_ACC).reshape(-1)
    if c.shape != (k,) or not bool(torch.isfinite(c).all()) or bool((c < 0).any()):
        raise ValueError(f"weights must be {k} finite numbers >= 0, got {c.tolist()}")
    ranks = torch.arange(k)[:, None]
    out = prev.to(_ACC).clone()
    zero = torch.zeros((), dtype=_ACC)
    for sl, s, order, cnt in _sorted_chunks(models, held):
        t = torch.floor(trim * cnt.to(_ACC) + 1e-9).to(torch.int64)
        keep = (ranks >= t) & (ranks < cnt - t)
        w = c[order]
        den = torch.where(keep, w, zero).sum(dim=0)
        num = torch.where(keep, s * w, zero).sum(dim=0)
        out[sl] = torch.where(den > 0, num / den, out[sl])
    return out.to(prev.dtype)


# --------------------------------------------------------------------------- one entry point
def robust_aggregate(
    prev: torch.Tensor,
    models: Sequence[torch.Tensor],
    masks: Sequence[torch.Tensor | None],
    coeffs: Sequence[float],
    num_prunable: int,
    method: str = "none",
    trim: float = 0.1,
    clip_norm: float | None = None,
    eta_g: float = 1.0,
) -> torch.Tensor:
    """Aggregate client models with ``method`` and take the server step
    W = (1 - eta_g) prev + eta_g W_new.

    - ``none``: MaskFedAvg with coefficients c_i (:func:`prfl.aggregation.mask_fedavg`).
    - ``clip``: updates W_i - prev clipped to ``clip_norm`` on the held weights, then MaskFedAvg.
    - ``trimmed_mean``: :func:`trimmed_mean` with weights c_i and fraction ``trim``.
    - ``median``: :func:`coordinate_median` (c_i ignored).
    """
    check_method(method, trim, clip_norm)
    if len(masks) != len(models) or len(coeffs) != len(models):
        raise ValueError(f"got {len(models)} models, {len(masks)} masks and {len(coeffs)} coeffs; lengths must match")
    if method == "none":
        return mask_fedavg(prev, models, masks, coeffs, num_prunable, eta_g)
    if not (math.isfinite(eta_g) and eta_g > 0):
        raise ValueError(f"eta_g must be a finite number > 0, got {eta_g!r}")
    total = prev.numel()
    x = stack(models, total)
    held = holders(masks, num_prunable, total)
    if method == "clip":
        assert clip_norm is not None
        clipped, _ = clip_updates(x, prev, held, clip_norm)
        return mask_fedavg(prev, list(clipped), masks, coeffs, num_prunable, eta_g)
    new = trimmed_mean(x, held, prev, trim, coeffs) if method == "trimmed_mean" else coordinate_median(x, held, prev)
    return new if eta_g == 1.0 else torch.lerp(prev, new, eta_g)
