"""The compiled finishing pass of MaskFedAvg (prfl.kernels) against the eager one: bit for bit."""

from __future__ import annotations

import pytest
import torch

from prfl import kernels
from prfl.aggregation import SUBBLOCK, exact_terms, finish_masked

pytestmark = pytest.mark.skipif(kernels.cxx_compiler() is None,
                                reason="torch.compile's CPU backend needs a C++ compiler; none is on the PATH")

N = 2 * SUBBLOCK + 777  # three blocks, the last one short


def _clients(seed: int, dense: bool) -> tuple[list[tuple[float, torch.Tensor, torch.Tensor | None]], torch.Tensor]:
    """Five masked clients (and a dense one) whose terms cancel exactly at some positions, nearly
    cancel at others, and leave some positions with no holder; and the previous model."""
    g = torch.Generator().manual_seed(seed)
    terms = []
    for i in range(5):
        values = torch.randn(N, generator=g) * (10.0 ** (i - 2))
        held = torch.rand(N, generator=g) < 0.3 + 0.1 * i
        terms.append((0.1 * (i + 1), values, held))
    # exact cancellation: client 1, at client 0's coefficient, holds minus its values at 1 in 50 shared positions
    both = terms[0][2] & terms[1][2] & (torch.rand(N, generator=g) < 0.02)
    terms[1] = (terms[0][0], torch.where(both, -terms[0][1], terms[1][1]), terms[1][2])
    # tiny values near the candidate bound
    tiny = torch.rand(N, generator=g) < 0.01
    terms[2][1][tiny] = 1e-9
    if dense:  # zero where the others cancel or are tiny, so the rule still has work there
        terms.append((0.05, torch.where(both | tiny, 0.0, torch.randn(N, generator=g)), None))
    prev = torch.randn(N, generator=g)
    return terms, prev


def _accumulators(terms):
    w = torch.zeros(N, dtype=torch.float64)
    m = torch.zeros(N, dtype=torch.float64)
    h = torch.zeros(N, dtype=torch.int64)
    dense_c, dense_h = 0.0, 0
    for c, values, held in terms:
        if held is None:
            w += values.to(torch.float64) * c
            dense_c += c
            dense_h += 1
        else:
            w += torch.where(held, values.to(torch.float64) * c, 0.0)
            m += held.to(torch.float64) * c
            h += held
    return w, m, h, dense_c, dense_h


def _finish(terms, prev, monkeypatch, compiled: bool, with_m: bool = True) -> tuple[torch.Tensor, int]:
    monkeypatch.setattr(kernels, "COMPILE_MIN", 0)
    monkeypatch.setenv(kernels.ENV, "1" if compiled else "0")
    w, m, h, dense_c, dense_h = _accumulators(terms)
    calls = []

    def exact(pos):
        calls.append(int(pos.numel()))
        return exact_terms(((c, v[pos], None if held is None else held[pos]) for c, v, held in terms), int(pos.numel()))

    out = torch.full((N,), float("nan"))
    wmax = max(float(v.abs().max()) for _, v, _ in terms)
    finish_masked(out, prev, w, m if with_m else None, exact, wmax=wmax, n_terms=len(terms),
                  min_coef=min(c for c, _, _ in terms), dense_c=dense_c, holders=h if with_m else None,
                  dense_h=dense_h, drift=1e-12)
    return out, sum(calls)


@pytest.mark.parametrize("seed, dense", [(0, False), (1, True), (2, False)])
def test_the_compiled_finishing_pass_equals_the_eager_one_bit_for_bit(seed, dense, monkeypatch):
    terms, prev = _clients(seed, dense)
    eager, eager_exact = _finish(terms, prev, monkeypatch, compiled=False)
    fused, fused_exact = _finish(terms, prev, monkeypatch, compiled=True)
    assert kernels.KERNELS._compiled is not None and not kernels.KERNELS._failed  # the compiled path ran
    assert eager_exact > 0 and fused_exact == eager_exact  # the same weights were decided on their terms
    assert not torch.isnan(eager).any()
    assert torch.equal(eager.view(torch.int32), fused.view(torch.int32))  # bit for bit, signed zeros included
    if not dense:  # nobody holds some weights: they keep prev
        _, _, h, _, _ = _accumulators(terms)
        assert torch.equal(fused[h == 0], prev[h == 0])


def test_only_dense_clients_compiled_equals_eager(monkeypatch):
    g = torch.Generator().manual_seed(5)
    terms = [(0.3, torch.randn(N, generator=g), None), (0.7, torch.randn(N, generator=g), None)]
    terms[1][1][:100] = -terms[0][1][:100] * (0.3 / 0.7)  # near-cancellations the rule must look at
    prev = torch.randn(N, generator=g)
    eager, eager_exact = _finish(terms, prev, monkeypatch, compiled=False, with_m=False)
    fused, fused_exact = _finish(terms, prev, monkeypatch, compiled=True, with_m=False)
    assert eager_exact > 0 and fused_exact == eager_exact
    assert torch.equal(eager.view(torch.int32), fused.view(torch.int32))


def test_a_compile_failure_falls_back_to_the_eager_values(monkeypatch, caplog):
    terms, prev = _clients(3, False)
    eager, _ = _finish(terms, prev, monkeypatch, compiled=False)
    broken = kernels.ServerKernels()
    broken._compiled = {"held": _raise, "everyone": _raise}
    monkeypatch.setattr(kernels, "KERNELS", broken)
    import prfl.aggregation as agg
    monkeypatch.setattr(agg, "KERNELS", broken)
    with caplog.at_level("WARNING", logger="prfl.kernels"):
        fallen, _ = _finish(terms, prev, monkeypatch, compiled=True)
    assert broken._failed and "runs eagerly" in caplog.text
    assert torch.equal(eager.view(torch.int32), fallen.view(torch.int32))


def _raise(*args, **kwargs):
    raise RuntimeError("backend exploded")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_mask_check_counts_nonzero_values_outside_the_mask(dtype):
    from prfl.validation import check_mask
    g = torch.Generator().manual_seed(7)
    mask = torch.rand(N, generator=g) < 0.4
    clean = torch.where(mask, torch.randn(N, generator=g), 0.0).to(dtype)
    clean[torch.nonzero(mask).view(-1)[:5]] = 0.0  # a trained weight may be zero inside the mask
    dirty = clean.clone()
    dirty[torch.nonzero(~mask).view(-1)[:37]] = 1e-3
    dirty[torch.nonzero(~mask).view(-1)[40]] = float("nan")
    dirty[torch.nonzero(~mask).view(-1)[41]] = -0.0  # a signed zero is zero
    assert check_mask(clean, mask, N) is None
    assert check_mask(dirty, mask, N).startswith("weights have 38 non-zero values outside")
    # only the prunable head is checked: the suffix holds biases whatever the mask
    longer = torch.cat([clean, torch.ones(3, dtype=dtype)])
    assert check_mask(longer, mask, N) is None
