"""Client-level differential privacy: clip each client update, add Gaussian noise, account for it.

Mechanism (DP-FedAvg style, McMahan et al. 2018, with the noise added where the update leaves the
client). For a task that started from W_sent and trained W_i under mask m, over the weights the
client holds (its mask on the prunable prefix, and the suffix):

    D   = W_i - W_sent
    D'  = D * min(1, C / ||D||)  +  N(0, sigma^2 C^2 I)
    W_i' = W_sent + D'            (and exactly 0 outside the mask, as the trainer's output)

Where it runs: as an executor-side transform (:class:`PrivatizingExecutor` wraps any executor), so
every executor and the policies are unchanged, the noise is drawn from a generator seeded by the
task's address ``(seed, "dp", client, task_id)`` (bit-for-bit reproducible, checkpoints included),
and a policy only ever sees privatised updates. In the simulator this models the client adding
the noise before upload. Pass ``privacy=ClientDP(...)`` to :class:`prfl.sim.engine.Simulation`.

Guarantee reported. Neighbouring runs differ in all of one client's data (add/remove one client).
Each upload of client i is a Gaussian mechanism with L2 sensitivity C and noise std sigma*C, i.e.
noise multiplier sigma; its n_i uploads compose. With ``sampling_rate`` q = 1 (the default, and
the only honest choice for asynchronous policies where who trains next is not random) client i
gets epsilon_i from n_i compositions of the Gaussian mechanism and the run reports the worst
client, max_i epsilon_i. With q < 1 (clients drawn independently with probability q per server
round, e.g. FedAvg cohorts) every client composes T Poisson-subsampled Gaussian mechanisms,
T = server rounds. The accountant is the Renyi-DP accountant of Google's ``dp-accounting``
(optional extra ``prfl[privacy]``), converted to (epsilon, delta) with its tight conversion.
The server sees each noisy update, so this also bounds what the server learns about one client
under add/remove adjacency; under replace-one adjacency the sensitivity is 2C (use sigma / 2).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import Any

import torch

from prfl.seeding import int_seed

ACCOUNTANT = "dp_accounting.rdp.RdpAccountant"
INSTALL_HINT = "install the privacy extra: pip install 'prfl[privacy]' (it brings dp-accounting)"


@dataclass(frozen=True)
class ClientDP:
    """Client-level DP settings: clip norm C, noise multiplier sigma (noise std = sigma C), the
    delta epsilon is reported for, and the per-round sampling rate q (1: no amplification)."""

    clip_norm: float
    noise_multiplier: float
    delta: float = 1e-5
    sampling_rate: float = 1.0

    def __post_init__(self) -> None:
        for name, value, ok in (
            ("clip_norm", self.clip_norm, lambda v: v > 0),
            ("noise_multiplier", self.noise_multiplier, lambda v: v >= 0),
            ("delta", self.delta, lambda v: 0 < v < 1),
            ("sampling_rate", self.sampling_rate, lambda v: 0 < v <= 1),
        ):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
                rule = {"clip_norm": "> 0", "noise_multiplier": ">= 0", "delta": "in (0, 1)", "sampling_rate": "in (0, 1]"}[name]
                raise ValueError(f"privacy {name} must be a finite number {rule}, got {value!r}")


# --------------------------------------------------------------------------- mechanism
def held_mask(mask: torch.Tensor | None, num_prunable: int, total: int) -> torch.Tensor:
    """Bool over the flat vector: the client's mask on the prefix (all True for None), True on the suffix."""
    held = torch.ones(total, dtype=torch.bool)
    if mask is not None:
        held[:num_prunable] = mask
    return held


def privatize_update(
    weights: torch.Tensor,
    start: torch.Tensor,
    mask: torch.Tensor | None,
    num_prunable: int,
    clip_norm: float,
    noise_multiplier: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, float]:
    """W_sent + clip_C(W_i - W_sent) + N(0, sigma^2 C^2) on the held weights, 0 elsewhere.

    The noise is ``sigma * C * torch.randn(h, generator=generator, dtype=float64)`` for the h held
    weights in index order. Returns (new weights in ``weights``' dtype, ||W_i - W_sent|| before
    clipping).
    """
    held = held_mask(mask, num_prunable, weights.numel())
    w = weights.detach().to(torch.float64)
    s = start.detach().to(torch.float64)
    diff = (w - s)[held]
    norm = float(torch.linalg.vector_norm(diff))
    if norm > clip_norm:
        diff.mul_(clip_norm / norm)
    if noise_multiplier > 0:
        diff.add_(torch.randn(diff.numel(), generator=generator, dtype=torch.float64), alpha=noise_multiplier * clip_norm)
    out = torch.zeros_like(w)
    out[held] = s[held] + diff
    return out.to(weights.dtype), norm


def task_generator(seed: int, client: int, task_id: int) -> torch.Generator:
    """The noise generator of one task, seeded by its address."""
    g = torch.Generator()
    g.manual_seed(int_seed(seed, "dp", client, task_id))
    return g


class _Chained(Future):  # type: ignore[type-arg]
    """A future whose result is ``fn(inner.result())``."""

    def __init__(self, inner: Future, fn: Callable[[Any], Any]) -> None:  # type: ignore[type-arg]
        super().__init__()
        self._inner = inner
        self._fn = fn
        inner.add_done_callback(self._finish)

    def result(self, timeout: float | None = None) -> Any:
        self._inner.exception(timeout)  # a deferred inner future computes now; _finish follows
        return super().result(timeout)

    def _finish(self, inner: Future) -> None:  # type: ignore[type-arg]
        if self.cancelled():
            return
        if inner.cancelled():
            super().cancel()
            return
        try:
            value = self._fn(inner.result())
        except BaseException as exc:  # surfaced when the driver asks for the result
            self.set_exception(exc)
        else:
            self.set_result(value)

    def cancel(self) -> bool:
        self._inner.cancel()
        return super().cancel()


class PrivatizingExecutor:
    """Wraps an executor: each job's output weights are privatised (see :func:`privatize_update`)
    against the job's start weights and mask, with noise seeded by the job's address."""

    def __init__(self, inner: Any, dp: ClientDP, num_prunable: int, seed: int) -> None:
        self.inner = inner
        self.dp = dp
        self.num_prunable = int(num_prunable)
        self.seed = int(seed)
        self.name = f"{getattr(inner, 'name', type(inner).__name__)}+dp"

    def transform(self, job: Any, output: Any) -> Any:
        """The privatised copy of ``output`` (a TrainOutput) of ``job`` (a TrainJob)."""
        weights, _ = privatize_update(
            output.weights, job.weights, job.mask, self.num_prunable, self.dp.clip_norm, self.dp.noise_multiplier,
            task_generator(self.seed, job.client, job.task_id),
        )
        return replace(output, weights=weights)

    def submit(self, job: Any) -> Future:  # type: ignore[type-arg]
        if job.width != 1.0:
            raise ValueError("client-level DP applies to full-width models; width-sliced tasks (HeteroFL width mode) are not supported")
        return _Chained(self.inner.submit(job), lambda out: self.transform(job, out))

    def close(self) -> None:
        self.inner.close()


# --------------------------------------------------------------------------- accounting
def _accounting() -> Any:
    try:
        import dp_accounting
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(f"privacy accounting needs dp-accounting; {INSTALL_HINT}") from exc
    return dp_accounting


def accountant_available() -> bool:
    """True if dp-accounting can be imported."""
    try:
        _accounting()
    except ImportError:
        return False
    return True


def epsilon(
    noise_multiplier: float, steps: int, delta: float, sampling_rate: float = 1.0, orders: Sequence[float] | None = None
) -> float:
    """(epsilon, delta)-DP of ``steps`` compositions of the Gaussian mechanism with noise multiplier
    sigma, Poisson-subsampled with rate q when q < 1 (RDP accountant of dp-accounting).

    For q = 1 the RDP of one step at order a is a / (2 sigma^2), so ``steps`` of them give
    r(a) = steps a / (2 sigma^2) and epsilon = min_a r(a) + log(1 - 1/a) - log(delta a) / (a - 1).
    """
    if isinstance(steps, bool) or int(steps) != steps or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    if steps == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    dpa = _accounting()
    acc = dpa.rdp.RdpAccountant(list(orders) if orders is not None else None)
    event: Any = dpa.GaussianDpEvent(noise_multiplier)
    if sampling_rate < 1.0:
        event = dpa.PoissonSampledDpEvent(sampling_rate, event)
    acc.compose(event, int(steps))
    return float(acc.get_epsilon(delta))


def privacy_report(dp: ClientDP, participations: Sequence[int], rounds: int) -> dict[str, Any]:
    """What a run spent: per-client epsilon for ``dp.delta`` and the worst client's.

    q = 1: client i composes its ``participations[i]`` uploads; q < 1: every client composes
    ``rounds`` Poisson-subsampled steps.
    """
    if dp.sampling_rate < 1.0:
        steps = [int(rounds)] * len(participations)
    else:
        steps = [int(n) for n in participations]
    cache: dict[int, float] = {}
    for n in steps:
        if n not in cache:
            cache[n] = epsilon(dp.noise_multiplier, n, dp.delta, dp.sampling_rate)
    per_client = [cache[n] for n in steps]
    return {
        "epsilon": max(per_client, default=0.0),
        "delta": dp.delta,
        "clip_norm": dp.clip_norm,
        "noise_multiplier": dp.noise_multiplier,
        "sampling_rate": dp.sampling_rate,
        "steps": steps,
        "client_epsilon": per_client,
        "accountant": ACCOUNTANT,
        "adjacency": "add or remove one client",
    }
