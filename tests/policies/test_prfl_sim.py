"""PR-FL end to end in the simulator: learning, density control, residual split accounting."""

import pytest

from prfl.config import load_config
from prfl.run import build_scenario, run_policy


@pytest.fixture(scope="module")
def scenario():
    cfg = load_config(overrides=[
        "data.dataset=digits", "model.name=mlp", "model.options={hidden: [32]}", "data.num_clients=10",
        "fleet.preset=paper10", "train.lr=0.1", "sim.max_rounds=120", "sim.eval_every_rounds=40",
        "sim.checkpoint_every_rounds=null",
    ])
    return build_scenario(cfg)


def run(sc, **options):
    return run_policy(sc, sc.cfg.policy.model_validate({"name": "prfl", "options": {"interval": 20, **options}}))


def test_prfl_learns_from_the_preset_densities(scenario):
    s = run(scenario)
    assert s["final_accuracy"] > 0.6  # ten classes: chance is 0.1
    assert any(r["event"] == "ranking" for r in s["history"])
    # paper10 lists the fastest client first: the preset gives the slowest ones the sparsest models
    arrivals = [r for r in s["history"] if r["event"] == "arrival"]
    first = {}
    for a in arrivals:
        first.setdefault(a["client"], a["density"])
    assert [first[c] for c in range(10)] == [1.0, 1.0, 0.6, 0.6, 0.3, 0.3, 0.1, 0.1, 0.1, 0.1]


def test_from_a_dense_start_slow_clients_get_sparser(scenario):
    # every arrival its own server step, so a client's round time is its own task's
    s = run(scenario, window=0.0, initial_densities=1.0)
    dens = [r for r in s["history"] if r["event"] == "densities"]
    assert dens, "density control never ran"
    last = dens[-1]["density"]
    assert last[0] == 1.0 and last == sorted(last, reverse=True) and max(last[-3:]) < 0.5
    assert min(last) >= 0.1  # the global minimum density
    arrivals = [r for r in s["history"] if r["event"] == "arrival"]
    assert {round(a["density"], 6) for a in arrivals} - {1.0}  # tasks trained at the densities given


def test_residual_split_saves_server_egress(scenario):
    # nested pieces: one version's sub-models of every density share what they have in common;
    # whole sub-models are published once per model and density (the relay), no more
    with_split = run(scenario)
    without = run(scenario, residual_split=False)
    assert with_split["server_egress_bytes"] < sum(with_split["client_download_bytes"])
    assert without["server_egress_bytes"] < sum(without["client_download_bytes"])
    per_task = [s["server_egress_bytes"] / sum(r["event"] == "arrival" for r in s["history"]) for s in (with_split, without)]
    assert per_task[0] < 0.75 * per_task[1]  # about half here (970 B against 2,051 B per arrival)
