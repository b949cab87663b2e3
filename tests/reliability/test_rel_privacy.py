"""Client-level DP: clipping and noise by hand, the accountant against a hand computation, and a
simulator run that reports epsilon."""

from __future__ import annotations

import math

import pytest
import torch

from prfl.privacy import ClientDP, PrivatizingExecutor, held_mask, privatize_update, task_generator

dp_accounting = pytest.importorskip(
    "dp_accounting", reason="privacy accounting needs the optional extra: pip install 'prfl[privacy]' (dp-accounting)"
)
from prfl.privacy import epsilon, privacy_report  # noqa: E402


def test_clipping_by_hand() -> None:
    start = torch.tensor([1.0, 1.0, 1.0, 0.0])
    w = torch.tensor([4.0, 0.0, 5.0, 3.0])  # held: weights 0, 2 and the suffix; update (3, 4, 3)
    mask = torch.tensor([True, False, True])
    out, norm = privatize_update(w, start, mask, 3, clip_norm=1.0, noise_multiplier=0.0, generator=torch.Generator())
    assert norm == pytest.approx(math.sqrt(34))
    s = 1 / math.sqrt(34)
    assert out.tolist() == pytest.approx([1 + 3 * s, 0.0, 1 + 4 * s, 3 * s])
    small, _ = privatize_update(w, start, mask, 3, 100.0, 0.0, torch.Generator())
    assert torch.equal(small, w)  # below C: untouched


def test_noise_scale_by_hand() -> None:
    """The noise is sigma * C * randn over the held weights, in index order, from the task's generator."""
    n, total = 5000, 5002
    mask = torch.rand(n, generator=torch.Generator().manual_seed(0)) < 0.5
    start = torch.zeros(total)
    sigma, c = 1.7, 0.3
    out, _ = privatize_update(start.clone(), start, mask, n, c, sigma, task_generator(5, 2, 11))
    held = held_mask(mask, n, total)
    expected = sigma * c * torch.randn(int(held.sum()), generator=task_generator(5, 2, 11), dtype=torch.float64)
    assert torch.equal(out[held], expected.to(torch.float32))
    assert not out[~held].any()  # nothing outside the mask
    assert float(out[held].std()) == pytest.approx(sigma * c, rel=0.05)
    # seeded by address: another task draws other noise
    other, _ = privatize_update(start.clone(), start, mask, n, c, sigma, task_generator(5, 2, 12))
    assert not torch.equal(other, out)


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="privacy clip_norm must be a finite number > 0"):
        ClientDP(clip_norm=0.0, noise_multiplier=1.0)
    with pytest.raises(ValueError, match=r"privacy delta must be a finite number in \(0, 1\)"):
        ClientDP(clip_norm=1.0, noise_multiplier=1.0, delta=0.0)
    with pytest.raises(ValueError, match=r"sampling_rate must be a finite number in \(0, 1\]"):
        ClientDP(clip_norm=1.0, noise_multiplier=1.0, sampling_rate=1.5)


def rdp_epsilon_by_hand(sigma: float, steps: int, delta: float, orders: list[float]) -> float:
    """Gaussian mechanism: RDP at order a is a / (2 sigma^2) per step; the conversion of
    Balle et al. 2020 (Prop. 12): eps = r + log(1 - 1/a) - log(delta a) / (a - 1), minimised."""
    best = math.inf
    for a in orders:
        r = steps * a / (2 * sigma**2)
        best = min(best, r + math.log1p(-1 / a) - math.log(delta * a) / (a - 1))
    return max(best, 0.0)


def test_epsilon_matches_a_hand_computation() -> None:
    orders = [1.5, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64]
    for sigma, steps in ((1.0, 1), (2.0, 10), (0.8, 3)):
        got = epsilon(sigma, steps, 1e-5, orders=orders)
        assert got == pytest.approx(rdp_epsilon_by_hand(sigma, steps, 1e-5, orders), rel=1e-9)
    # and with the library's own default orders for the common case
    acc = dp_accounting.rdp.RdpAccountant()
    acc.compose(dp_accounting.GaussianDpEvent(1.0), 1)
    assert epsilon(1.0, 1, 1e-5) == pytest.approx(acc.get_epsilon(1e-5))
    assert epsilon(1.0, 1, 1e-5) == pytest.approx(4.7285, abs=1e-3)


def test_epsilon_grows_with_rounds_and_shrinks_with_noise_and_sampling() -> None:
    eps = [epsilon(1.1, t, 1e-5) for t in (0, 1, 2, 5, 10, 50, 200)]
    assert eps[0] == 0.0 and all(a < b for a, b in zip(eps, eps[1:]))
    assert epsilon(2.0, 50, 1e-5) < epsilon(1.0, 50, 1e-5)
    assert epsilon(1.0, 50, 1e-5, sampling_rate=0.1) < epsilon(1.0, 50, 1e-5)
    assert epsilon(0.0, 1, 1e-5) == math.inf


def test_report_takes_the_worst_client() -> None:
    dp = ClientDP(clip_norm=1.0, noise_multiplier=1.5, delta=1e-6)
    rep = privacy_report(dp, [3, 10, 0], rounds=40)
    assert rep["steps"] == [3, 10, 0] and rep["client_epsilon"][2] == 0.0
    assert rep["epsilon"] == rep["client_epsilon"][1] == pytest.approx(epsilon(1.5, 10, 1e-6))
    sampled = privacy_report(ClientDP(1.0, 1.5, 1e-6, sampling_rate=0.3), [3, 10, 0], rounds=40)
    assert sampled["steps"] == [40, 40, 40]


def test_simulator_privatises_updates_and_reports_epsilon() -> None:
    from prfl.config import load_config
    from prfl.run import StepCost, _executor, build_scenario, make_policy
    from prfl.sim.engine import SimSettings, Simulation

    cfg = load_config(None, [
        "seed=4", "data.dataset=digits", "data.num_clients=4", "model.name=mlp", "model.options={hidden: [16]}",
        "train.lr=0.1", "fleet.preset=uniform", "policy.name=fedasync", "sim.max_rounds=30",
    ])
    sc = build_scenario(cfg)
    dp = ClientDP(clip_norm=0.5, noise_multiplier=0.8, delta=1e-5)
    runs = []
    for _ in range(2):
        sim = Simulation(
            make_policy(sc, cfg.policy), sc.fleet, _executor(sc), sc.partition.client_indices, sc.train_cfg,
            StepCost(sc.cost, sc.layout), sc.evaluator(), SimSettings(eval_every_rounds=30), seed=cfg.seed, privacy=dp,
        )
        assert isinstance(sim.executor, PrivatizingExecutor)
        try:
            runs.append((sim.run(), sim.policy.weights.clone()))
        finally:
            sim.executor.close()
    (summary, weights), (summary2, weights2) = runs
    assert torch.equal(weights, weights2)  # the noise is seeded by address
    plain = Simulation(
        make_policy(sc, cfg.policy), sc.fleet, _executor(sc), sc.partition.client_indices, sc.train_cfg,
        StepCost(sc.cost, sc.layout), sc.evaluator(), SimSettings(eval_every_rounds=30), seed=cfg.seed,
    )
    assert "privacy" not in plain.run() and not torch.equal(plain.policy.weights, weights)
    rep = summary["privacy"]
    assert rep["steps"] == summary["local_rounds"] and sum(rep["steps"]) >= 30
    assert rep["epsilon"] == pytest.approx(epsilon(0.8, max(summary["local_rounds"]), 1e-5))
    assert math.isfinite(rep["epsilon"]) and rep["epsilon"] > 0
