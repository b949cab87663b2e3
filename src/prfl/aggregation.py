"""Server-side aggregation maths: staleness functions, weighted and mask-aware averaging.

All functions are pure: they read their inputs and return new tensors, never modifying a tensor
they were given (policies hand the same tensors out to clients). Averages accumulate in float64
(``accumulate_dtype``) and are rounded once to the inputs' dtype, so the average of one model,
or of identical models, is that model bit for bit, and every coordinate of an average lies
within the range of its inputs. Accumulating in float32 is 2-3x faster on large models and
off by about one float32 ulp; pass ``accumulate_dtype=torch.float32`` where that matters more.

Sums run block by block (``BLOCK`` weights at a time, every model added into the block before
the next): a float64 block stays in cache and the float32-to-float64 conversion needs no
model-sized temporary, about 9x faster than adding whole models in turn on conv2. Each weight
still receives its terms in model order, so the results are those of the plain loop bit for bit.

MaskFedAvg's safeguard keeps the previous value where a weight's average is zero. Whether a
float sum is zero depends on how it was rounded (with fused multiply-adds, +0.7 and -0.7 at equal
weight sum to 8.3e-18 on some CPUs), so the rule is decided on the terms, not on a rounded sum:
the holders' sum counts as zero when

    |sum_i fl(c_i W_i)| <= gamma_(h+1) sum_i |fl(c_i W_i)|,    gamma_n = n u / (1 - n u),  u = 2^-53,

over its h holders, each product formed in float64 and rounded once, then added in client order
(:func:`exact_terms`, :func:`sum_is_zero`): zero to within the rounding error of computing it.
Every sum that is exactly zero passes, whatever the order, blocking or fusing of the arithmetic
that produced the accumulator, and no sum whose value stands above float64 rounding noise does.
The terms are formed only where an average lies within its accumulator's error bound of zero
(:func:`candidate_bound`), a handful of weights if any.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import overload

import torch

from prfl.kernels import KERNELS

STALENESS_KINDS: tuple[str, ...] = ("const", "poly", "hinge")

_TAU_DTYPE = torch.float64
ACCUMULATE_DTYPE = torch.float64
BLOCK = 1 << 18  # weights per block of an accumulation (2 MiB of float64, 1 MiB of float32: page-aligned)


def blocks(n: int) -> list[tuple[int, int]]:
    """The ``(start, stop)`` blocks of ``range(n)`` that sums in this package run over."""
    return [(a, min(a + BLOCK, n)) for a in range(0, n, BLOCK)]


# --------------------------------------------------------------------------- staleness
def _check_staleness_params(kind: str, a: float, b: float) -> None:
    if kind not in STALENESS_KINDS:
        raise ValueError(
            f"unknown staleness kind {kind!r}; valid kinds: {', '.join(STALENESS_KINDS)}"
        )
    if not (math.isfinite(a) and a >= 0):
        raise ValueError(f"staleness exponent/slope a must be a finite number >= 0, got {a!r}")
    if not (math.isfinite(b) and b >= 0):
        raise ValueError(f"staleness hinge point b must be a finite number >= 0, got {b!r}")


@overload
def staleness_weight(kind: str, tau: torch.Tensor, a: float = ..., b: float = ...) -> torch.Tensor: ...
@overload
def staleness_weight(kind: str, tau: float, a: float = ..., b: float = ...) -> float: ...


def staleness_weight(
    kind: str, tau: float | torch.Tensor, a: float = 0.6, b: float = 2.0
) -> float | torch.Tensor:
    """Weight s(tau) of an update that is ``tau`` server rounds stale.

    - ``const``: s = 1
    - ``poly``:  s = (tau + 1)^(-a)
    - ``hinge``: s = 1 if tau <= b else 1 / (a * (tau - b) + 1)

    ``tau`` is a number (returns a float) or a tensor (returns a float64 tensor, element-wise).
    """
    _check_staleness_params(kind, a, b)
    if isinstance(tau, torch.Tensor):
        t = tau.to(_TAU_DTYPE)
        if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
            raise ValueError("staleness tau must be finite and >= 0 for every entry")
        if kind == "const":
            return torch.ones_like(t)
        if kind == "poly":
            return (t + 1.0).pow(-a)
        return torch.where(t <= b, torch.ones_like(t), 1.0 / (a * (t - b) + 1.0))
    tau_f = float(tau)
    if not (math.isfinite(tau_f) and tau_f >= 0):
        raise ValueError(f"staleness tau must be finite and >= 0, got {tau!r}")
    if kind == "const":
        return 1.0
    if kind == "poly":
        return (tau_f + 1.0) ** (-a)
    return 1.0 if tau_f <= b else 1.0 / (a * (tau_f - b) + 1.0)


@dataclass(frozen=True)
class Staleness:
    """A staleness function s(tau) = :func:`staleness_weight` (kind, a, b), checked once."""

    kind: str = "poly"
    a: float = 0.6
    b: float = 2.0

    def __post_init__(self) -> None:
        _check_staleness_params(self.kind, self.a, self.b)

    def __call__(self, tau: float) -> float:
        return staleness_weight(self.kind, tau, self.a, self.b)


def fedbuff_staleness(tau: float) -> float:
    """FedBuff's staleness weight s(tau) = 1 / sqrt(1 + tau)."""
    tau_f = float(tau)
    if not (math.isfinite(tau_f) and tau_f >= 0):
        raise ValueError(f"staleness tau must be finite and >= 0, got {tau!r}")
    return 1.0 / math.sqrt(1.0 + tau_f)


# --------------------------------------------------------------------------- the zero rule
UNIT_ROUNDOFF = 2.0**-53  # u of float64: |fl(x) - x| <= u |x|
SUBBLOCK = 1 << 17  # weights per block of the finishing pass (its temporaries stay in cache)


def unit_roundoff(dtype: torch.dtype) -> float:
    """u = eps / 2 of a floating-point dtype (2^-53 for float64, 2^-24 for float32)."""
    return torch.finfo(dtype).eps / 2


def rounding_bound(n: int | torch.Tensor, u: float = UNIT_ROUNDOFF) -> float | torch.Tensor:
    """gamma_n = n u / (1 - n u): a sum of n terms, each a product rounded once and then added in
    turn, is off by at most gamma_n times the sum of the terms' magnitudes (Higham, *Accuracy and
    Stability of Numerical Algorithms*, 2002, sections 3.1 and 4.2)."""
    return n * u / (1 - n * u)


ExactTerms = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
"""(S, A, M, h) at K positions: sum of the products, sum of their magnitudes, sum of the holders'
coefficients (float64) and the number of holders (int64)."""


def exact_terms(terms: Iterable[tuple[float, torch.Tensor, torch.Tensor | None]], k: int) -> ExactTerms:
    """The holders' sums at K positions from the terms themselves, in float64 and in the given
    (client) order: for each (c_i, values_i, held_i) the products p_i = fl(c_i W_i) are formed by
    a multiplication alone (no fused multiply-add), then added: S = sum p_i, A = sum |p_i|,
    M = sum c_i over the holders, h = their number. ``held_i`` None: holds every position."""
    s = torch.zeros(k, dtype=torch.float64)
    a = torch.zeros(k, dtype=torch.float64)
    m = torch.zeros(k, dtype=torch.float64)
    h = torch.zeros(k, dtype=torch.int64)
    for c, values, held in terms:
        if c == 0.0:
            continue
        p = values.to(torch.float64) * c
        if held is None:
            m += c
            h += 1
        else:
            p = torch.where(held, p, 0.0)
            m += held.to(torch.float64) * c
            h += held
        s += p
        a += p.abs()
    return s, a, m, h


def sum_is_zero(s: torch.Tensor, a: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Where a holders' sum is zero to within its rounding: |S| <= gamma_(h+1) A (see the module
    docstring); h + 1 counts the rounding of the products as one more term."""
    return s.abs() <= rounding_bound(h.to(torch.float64) + 1) * a


def candidate_bound(wmax: float, n_terms: int, min_coef: float, drift: float = 0.0, u: float = UNIT_ROUNDOFF) -> float:
    """tau such that every weight whose holders' terms may sum to zero has |W_acc / M_acc| <= tau:

        tau = 4 (n + 1) max(u, 2^-53) wmax + 2 drift / min_coef.

    If the terms satisfy :func:`sum_is_zero`, their exact sum lies within 2 gamma_(h+1) A of zero,
    A <= M wmax (wmax = the largest |W_i|), and an accumulator summed from them in any order with
    unit roundoff u is within gamma_n A of it (n >= h terms): 3.1 (n + 1) u M wmax in all, for
    n u < 0.01; a running sum adds its ``drift`` bound (:mod:`prfl.incremental`), and M_acc >=
    ``min_coef``, the smallest positive coefficient, wherever someone holds the weight. Factors 4
    and 2 leave room for the rounding of M_acc and of the quotient. The weights below tau (a
    handful, if any) are then decided on their terms."""
    return 4 * (n_terms + 1) * max(u, UNIT_ROUNDOFF) * wmax + (2 * drift / min_coef if drift else 0.0)


def finish_masked(
    out: torch.Tensor,
    prev: torch.Tensor,
    w: torch.Tensor,
    m: torch.Tensor | None,
    exact: Callable[[torch.Tensor], ExactTerms],
    *,
    wmax: float,
    n_terms: int,
    min_coef: float,
    dense_c: float = 0.0,
    holders: torch.Tensor | None = None,
    dense_h: int = 0,
    drift: float = 0.0,
    eta_g: float = 1.0,
    positions: torch.Tensor | None = None,
    before_block: Callable[[int, int], None] | None = None,
) -> None:
    """The prunable part of MaskFedAvg from its accumulators, written into ``out``:

        M = m + dense_c,   W_new = W_acc / M,   W = (1 - eta_g) prev + eta_g W_new,

    keeping ``prev`` where nobody holds the weight (``holders`` + dense_h == 0 when holder counts
    are given, else M == 0), where the holders' sum is zero (:func:`sum_is_zero`, decided on the
    terms ``exact`` returns for the weights under :func:`candidate_bound`; W_new is then S / M
    from those terms) or where W_new underflows to 0. ``m`` None: no masked holder (M = dense_c).
    Arithmetic in ``w``'s dtype, rounded once to ``out``'s; every position block by block, or only
    ``positions`` (the rest of ``out`` is left alone). ``before_block(a, b)``, when given, brings
    the accumulators' positions [a, b) up to date just before they are read (every position only)."""
    dt = w.dtype
    if m is None and not dense_c > 0:
        raise ValueError("finish_masked needs the holders' coefficient sums m, or dense_c > 0")
    tau = candidate_bound(wmax, n_terms, min_coef, drift, unit_roundoff(dt))
    if positions is not None:
        spans = [(0, int(positions.numel()))]
    else:
        spans = [(a, min(a + SUBBLOCK, w.numel())) for a in range(0, w.numel(), SUBBLOCK)]
    everyone = dense_h > 0 or (holders is None and dense_c > 0)  # a dense client holds every weight
    inverse = 1.0 / dense_c if m is None and dense_c > 0 else None
    found: list[torch.Tensor] = []

    def take(t: torch.Tensor, a: int, b: int) -> torch.Tensor:  # index_select: far cheaper than t[positions]
        return t[a:b] if positions is None else t.index_select(0, positions)

    flag_at = tau * (1 + 2.0**-22)
    # one compiled loop per block (prfl.kernels): the same values bit for bit; it flags a block
    # with a held |W_new| <= 2 flag_at, and such a block's candidates are found eagerly below
    fused = positions is None and eta_g == 1.0 and KERNELS.enabled(w.numel())
    for a, b in spans:
        if before_block is not None:
            before_block(a, b)
        if fused:
            if everyone:
                done = KERNELS.everyone(w[a:b], None if m is None else m[a:b], dense_c, 2 * flag_at, out.dtype)
            elif holders is not None and m is not None:
                done = KERNELS.held(w[a:b], m[a:b], holders[a:b], prev[a:b], dense_c, 2 * flag_at, out.dtype)
            else:
                done = None
            if done is not None:
                out[a:b] = done[0]
                if not done[1]:
                    continue
                if everyone:  # the candidates: the check below, on the rounded values now in out
                    small = out[a:b].abs() <= flag_at
                    idx = small.nonzero().view(-1)
                    if idx.numel():
                        found.append(idx + a)
                    continue
        wb = take(w, a, b)
        if inverse is not None:
            val = wb / dense_c
        else:
            assert m is not None
            big_m = take(m, a, b)
            if dense_c:
                big_m = big_m + dense_c
            val = wb / big_m
        if everyone:
            res = val if eta_g == 1.0 else torch.lerp(take(prev, a, b).to(dt), val, eta_g)
        else:
            held = take(holders, a, b) > 0 if holders is not None else big_m > 0
            pb = take(prev, a, b).to(dt)
            res = torch.where(held, val, pb)
            if eta_g != 1.0:
                res = torch.lerp(pb, res, eta_g)
        if positions is None:
            out[a:b] = res
        else:
            out.index_copy_(0, positions, res.to(out.dtype))
        # rounding is monotone, so |val| <= tau implies |val rounded to out's dtype| <= tau (1 + 2^-22):
        # where out holds val itself (everyone holds every weight, eta_g = 1) the check reads the
        # narrower rounded values; elsewhere val, which is NaN or inf where nobody holds the weight
        probe = out[a:b] if everyone and positions is None and eta_g == 1.0 else val
        small = probe.abs() <= flag_at
        if not everyone:
            small &= held
        if bool(small.any()):
            idx = small.nonzero().view(-1)
            found.append(idx + a if positions is None else positions[idx])
    if not found:
        return
    pos = torch.cat(found)
    s, abs_sum, msum, h = exact(pos)
    val = s / msum
    keep = sum_is_zero(s, abs_sum, h).logical_or_(val == 0).logical_or_(h == 0)
    p64 = prev[pos].to(torch.float64)
    res = torch.where(keep, p64, val)
    if eta_g != 1.0:
        res = torch.lerp(p64, res, eta_g)
    out[pos] = res.to(out.dtype)


# --------------------------------------------------------------------------- averaging
def _check_coeffs(weights: Sequence[float], name: str) -> list[float]:
    out = [float(w) for w in weights]
    for i, w in enumerate(out):
        if not (math.isfinite(w) and w >= 0):
            raise ValueError(f"{name}[{i}] must be a finite number >= 0, got {w!r}")
    if not sum(out) > 0:
        raise ValueError(f"{name} must have a positive total, got {sum(out)!r}")
    return out


def _check_vectors(vectors: Sequence[torch.Tensor], shape: torch.Size, name: str) -> None:
    for i, v in enumerate(vectors):
        if v.shape != shape:
            raise ValueError(f"{name}[{i}] has shape {tuple(v.shape)}, expected {tuple(shape)}")
        if not v.is_floating_point():
            raise ValueError(f"{name}[{i}] must be a floating-point tensor, got {v.dtype}")


def weighted_average(
    vectors: Sequence[torch.Tensor],
    weights: Sequence[float],
    accumulate_dtype: torch.dtype = ACCUMULATE_DTYPE,
) -> torch.Tensor:
    """Normalised weighted average  sum_i w_i v_i / sum_i w_i  (a new tensor, dtype of ``vectors[0]``).

    Also the plain-FedAvg ablation of MaskFedAvg (masks ignored).
    """
    if len(vectors) == 0:
        raise ValueError("weighted_average needs at least one vector")
    if len(weights) != len(vectors):
        raise ValueError(f"got {len(vectors)} vectors but {len(weights)} weights")
    coeffs = _check_coeffs(weights, "weights")
    _check_vectors(vectors, vectors[0].shape, "vectors")
    acc = torch.zeros(vectors[0].shape, dtype=accumulate_dtype, device=vectors[0].device)
    live = [(v.reshape(-1), c) for v, c in zip(vectors, coeffs) if c != 0.0]
    flat = acc.view(-1)
    for a, b in blocks(flat.numel()):
        part = flat[a:b]
        for v, c in live:
            part.add_(v[a:b], alpha=c)
    return acc.div_(sum(coeffs)).to(vectors[0].dtype)


plain_fedavg = weighted_average


def mask_fedavg(
    prev: torch.Tensor,
    models: Sequence[torch.Tensor],
    masks: Sequence[torch.Tensor | None],
    coeffs: Sequence[float],
    num_prunable: int,
    eta_g: float = 1.0,
    accumulate_dtype: torch.dtype = ACCUMULATE_DTYPE,
) -> torch.Tensor:
    """MaskFedAvg: average each prunable weight over the clients whose mask holds it.

    With c_i = p_i n_i, on the prunable prefix (first ``num_prunable`` entries):
        W_acc = sum_i c_i (W_i ⊙ m_i),  M_acc = sum_i c_i m_i,  W_new = W_acc / M_acc,
    keeping ``prev`` wherever M_acc == 0 (nobody holds the weight) or the holders' sum is zero
    (decided on the terms, see the module docstring), so a weight is never pruned for ever. On
    the suffix (biases etc., held by every client):
        W_new = sum_i c_i W_i / sum_i c_i.
    Then the server step  W = (1 - eta_g) prev + eta_g W_new  (eta_g = 1: W = W_new).
    A mask of None means dense (all ones). Returns a new tensor of ``prev``'s dtype.
    """
    if prev.dim() != 1 or not prev.is_floating_point():
        raise ValueError(f"prev must be a flat 1-D floating-point tensor, got {prev.dtype} {tuple(prev.shape)}")
    n = len(models)
    if n == 0:
        raise ValueError("mask_fedavg needs at least one model")
    if len(masks) != n or len(coeffs) != n:
        raise ValueError(f"got {n} models, {len(masks)} masks and {len(coeffs)} coeffs; lengths must match")
    if not 0 <= num_prunable <= prev.numel():
        raise ValueError(f"num_prunable must lie in [0, {prev.numel()}], got {num_prunable}")
    if not (math.isfinite(eta_g) and eta_g > 0):
        raise ValueError(f"eta_g must be a finite number > 0, got {eta_g!r}")
    cs = _check_coeffs(coeffs, "coeffs")
    _check_vectors(models, prev.shape, "models")
    for i, m in enumerate(masks):
        if m is not None and (m.dtype != torch.bool or m.shape != (num_prunable,)):
            raise ValueError(
                f"masks[{i}] must be a bool tensor of shape ({num_prunable},), "
                f"got {m.dtype} {tuple(m.shape)}"
            )

    npr = num_prunable
    like = {"dtype": accumulate_dtype, "device": prev.device}
    w_acc = torch.zeros(npr, **like)
    m_acc = torch.zeros(npr, **like)
    s_acc = torch.zeros(prev.numel() - npr, **like)
    buf = torch.empty(min(npr, BLOCK), **like)  # m_i, then W_i ⊙ m_i (reused across clients)
    live = [(w, m, c) for w, m, c in zip(models, masks, cs) if c != 0.0]
    dense_total = 0.0  # coefficient mass of dense clients, added to m_acc once at the end
    for _, m, c in live:
        if m is None:
            dense_total += c
    for a, b in blocks(npr):
        wa, ma, scratch = w_acc[a:b], m_acc[a:b], buf[: b - a]
        for w, m, c in live:
            if m is None:
                wa.add_(w[a:b], alpha=c)
            else:
                ma.add_(scratch.copy_(m[a:b]), alpha=c)
                wa.add_(scratch.mul_(w[a:b]), alpha=c)
    for w, _, c in live:
        s_acc.add_(w[npr:], alpha=c)
    if dense_total:
        m_acc.add_(dense_total)

    new = torch.empty_like(prev)
    wmax = max((_abs_max(w[:npr]) for w, _, _ in live), default=0.0)

    def exact(pos: torch.Tensor) -> ExactTerms:
        return exact_terms(((c, w[pos], None if m is None else m[pos]) for w, m, c in live), int(pos.numel()))

    finish_masked(new[:npr], prev[:npr], w_acc, m_acc, exact, wmax=wmax, n_terms=len(live),
                  min_coef=min(c for _, _, c in live), eta_g=eta_g)
    tail = s_acc.div_(sum(cs))
    if eta_g != 1.0:
        tail = torch.lerp(prev[npr:].to(accumulate_dtype), tail, eta_g)
    new[npr:] = tail
    return new


def _abs_max(t: torch.Tensor) -> float:
    """max |t| (0 for an empty tensor), in one pass without a temporary."""
    if t.numel() == 0:
        return 0.0
    lo, hi = torch.aminmax(t)
    return max(-float(lo), float(hi))
