"""Two of ten clients send sign-flipped, scaled updates: robust aggregation keeps PR-FL on course.

Setting: digits / mlp, 10 clients of equal speed (so every density stays near 1 and the masks
are nearly dense), synchronous PR-FL, 150 server rounds. Clients 3 and 7 are attackers: an
executor wrapper replaces their trained weights W_i by  W_sent - 5 (W_i - W_sent)  on the weights
they hold (still exactly 0 outside their masks, so the update passes the structural checks).

Plain MaskFedAvg collapses to chance. The coordinate-wise median and trimmed mean (trim 0.2) end
within 3 accuracy points of the clean run; so does plain MaskFedAvg with the update-norm check
(k = 3), which rejects the attackers' updates once it has seen 10 accepted norms (and
quarantines them after 5 rejections in a row). Norm clipping
bounds each attacker's pull but cannot turn it around: it keeps the model far from collapse, and
is held to a looser bound.
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import Future
from typing import Any

import pytest

from prfl.config import load_config
from prfl.policies import build_policy
from prfl.run import Scenario, _executor, build_scenario, make_simulation
from prfl.sim.history import HistoryWriter

pytestmark = pytest.mark.slow

ATTACKERS = (3, 7)
FACTOR = -5.0
ROUNDS = 150


class ByzantineExecutor:
    """Wraps an executor; the attackers' outputs become W_sent + FACTOR (W_i - W_sent) ⊙ held."""

    name = "byzantine"

    def __init__(self, inner: Any, attackers: tuple[int, ...], num_prunable: int, factor: float) -> None:
        self.inner, self.attackers, self.num_prunable, self.factor = inner, set(attackers), num_prunable, factor

    def submit(self, job: Any) -> Future:
        fut = self.inner.submit(job)
        if job.client not in self.attackers:
            return fut
        out = fut.result()
        w = job.weights + self.factor * (out.weights - job.weights)
        if job.mask is not None:
            w[: self.num_prunable].masked_fill_(~job.mask, 0.0)
        bad: Future = Future()
        bad.set_result(dataclasses.replace(out, weights=w))
        return bad

    def close(self) -> None:
        self.inner.close()


@pytest.fixture(scope="module")
def scenario() -> Scenario:
    cfg = load_config(None, [
        "seed=1", "data.dataset=digits", "data.num_clients=10", "data.partition=iid", "model.name=mlp",
        "model.options={hidden: [32]}", "train.lr=0.1", "train.batch_size=20", "train.local_steps=5",
        "fleet.preset=uniform", "policy.name=prfl", f"sim.max_rounds={ROUNDS}", "sim.eval_every_rounds=50",
        "sim.checkpoint_every_rounds=null",
    ])
    return build_scenario(cfg)


def run(sc: Scenario, attackers: tuple[int, ...] = (), **options: Any) -> dict[str, Any]:
    policy = build_policy("prfl", sc.policy_context(), synchronous=True, interval=20, recovery=False,
                          initial_densities=1.0, **options)
    executor = ByzantineExecutor(_executor(sc), attackers, sc.layout.num_prunable, FACTOR)
    history = HistoryWriter(None)
    try:
        summary = make_simulation(sc, policy, None, history, executor).run()
    finally:
        executor.close()
    summary["history"] = history.records
    assert summary["server_rounds"] == ROUNDS
    return summary


@pytest.fixture(scope="module")
def clean(scenario: Scenario) -> float:
    acc = run(scenario)["final_accuracy"]
    assert acc > 0.9
    return acc


def test_plain_maskfedavg_collapses_under_attack(scenario, clean) -> None:
    attacked = run(scenario, ATTACKERS)["final_accuracy"]
    assert attacked < clean - 0.3, f"plain MaskFedAvg was not hurt ({attacked:.3f} vs clean {clean:.3f}): the attack is too weak"


@pytest.mark.parametrize("options", [{"robust": "median"}, {"robust": "trimmed_mean", "trim": 0.2}],
                         ids=["median", "trimmed_mean"])
def test_coordinatewise_rules_stay_within_3_points(scenario, clean, options) -> None:
    attacked = run(scenario, ATTACKERS, **options)["final_accuracy"]
    assert attacked >= clean - 0.03, f"{options}: {attacked:.3f} vs clean {clean:.3f}"


def test_norm_check_rejects_the_attackers(scenario, clean) -> None:
    summary = run(scenario, ATTACKERS, norm_factor=3.0, norm_window=10)
    assert summary["final_accuracy"] >= clean - 0.03, f"{summary['final_accuracy']:.3f} vs clean {clean:.3f}"
    rejected = [r for r in summary["history"] if r["event"] == "rejected"]
    assert {r["client"] for r in rejected} == set(ATTACKERS)
    assert all(r["check"] == "norm" and "median" in r["reason"] for r in rejected)
    # rejected from the second round on, quarantined after 5 rejections in a row
    quarantined = [r["client"] for r in summary["history"] if r["event"] == "quarantined"]
    assert sorted(quarantined) == sorted(ATTACKERS)
    assert summary["rejected_updates"] == [5 if c in ATTACKERS else 0 for c in range(10)]
    assert all(summary["aggregated_rounds"][c] == 1 for c in ATTACKERS)


def test_clipping_bounds_the_damage(scenario, clean) -> None:
    attacked = run(scenario, ATTACKERS, robust="clip", clip_norm=0.15)["final_accuracy"]
    assert attacked >= clean - 0.06, f"clip: {attacked:.3f} vs clean {clean:.3f}"
