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


def test_prfl_learns_and_slow_clients_get_sparser(scenario):
    s = run(scenario)
    assert s["final_accuracy"] > 0.6  # ten classes: chance is 0.1
    dens = [r for r in s["history"] if r["event"] == "densities"]
    assert dens, "density control never ran"
    last = dens[-1]["density"]
    # paper10 lists the fastest client first: the slowest ones end up with the smallest densities
    assert max(last) == 1.0 and min(last[-3:]) < max(last[:3])
    assert min(last) >= 0.1  # the global minimum density
    assert any(r["event"] == "ranking" for r in s["history"])
    # every arrival trained at the density its task was given
    arrivals = [r for r in s["history"] if r["event"] == "arrival"]
    assert {round(a["density"], 6) for a in arrivals} - {1.0}


def test_residual_split_saves_server_egress(scenario):
    with_split = run(scenario)
    without = run(scenario, residual_split=False)
    assert with_split["server_egress_bytes"] < sum(with_split["client_download_bytes"])
    assert without["server_egress_bytes"] == sum(without["client_download_bytes"])
