"""Small end-to-end runs (digits / MLP, inline executor, the paper's fleet of 10) in each accounting
mode, and an exact resume under the reference accounting.

The MLP has one hidden layer of 8: N = 592 prunable weights, M = 18 biases, so the reference sizes
a dense download at 592 * 20 + 18 * 4 = 11,912 B (honest: 4 * 610 = 2,440 B). The paper's server
uplink is 10 MB/s = 1e7 B/s.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from prfl.config import ConfigError, load_config, load_run_config
from prfl.run import build_scenario, resume_run, run_policy
from prfl.runtime.history import TIME_PARTS, read_history
from prfl.settings import SimSettings

DENSE_REFERENCE = 592 * 20 + 18 * 4
SERVER_UP = 10e6
WALL_FIELDS = ("wall_seconds", "train_seconds")


def overrides(accounting: str, policy: str, *extra: str) -> list[str]:
    return [
        "data.dataset=digits", "data.num_clients=10", "model.name=mlp", "model.options={hidden: [8]}",
        "train.lr=0.1", "train.local_steps=5", "fleet.preset=paper10", "sim.executor=inline",
        "sim.max_rounds=40", "sim.eval_every_rounds=10", f"sim.accounting={accounting}", f"policy.name={policy}",
        "seed=2", *extra,
    ]


def run(accounting: str, policy: str, *extra: str, out: Path | None = None) -> dict[str, Any]:
    return run_policy(build_scenario(load_config(overrides=overrides(accounting, policy, *extra))), out_dir=out)


def events(summary: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [r for r in summary["history"] if r["event"] == kind]


@pytest.fixture(scope="module")
def runs() -> dict[tuple[str, str], dict[str, Any]]:
    return {(a, p): run(a, p) for a in ("honest", "reference") for p in ("fedasync", "prfl")}


@pytest.mark.parametrize("accounting", ["honest", "reference"])
@pytest.mark.parametrize("policy", ["fedasync", "prfl"])
def test_every_arrival_splits_its_duration(runs, accounting, policy) -> None:
    s = runs[(accounting, policy)]
    assert s["accounting"] == accounting and s["server_rounds"] == 40
    arrivals = events(s, "arrival")
    assert arrivals
    for a in arrivals:
        assert sum(a[p] for p in TIME_PARTS) == pytest.approx(a["duration"], rel=1e-9, abs=1e-12)
        assert min(a[p] for p in TIME_PARTS) >= 0
        if accounting == "honest":  # every byte of the upload is charged
            assert a["bytes_up"] == a["bytes_up_values"] + a["bytes_up_index"] + a["bytes_up_importance"]
        else:  # the values only
            assert a["bytes_up"] == a["bytes_up_values"]
    breakdown = s["round_time_breakdown"]
    assert set(breakdown) == set(TIME_PARTS) and all(len(v) == 10 for v in breakdown.values())


def test_honest_fedasync_is_fully_asynchronous(runs) -> None:
    s = runs[("honest", "fedasync")]
    times = {r["time"] for r in events(s, "arrival")}
    updates = events(s, "server_update")
    assert all(u["time"] in times and len(u["clients"]) == 1 for u in updates)  # each arrival at once
    assert {a["bytes_down"] for a in events(s, "arrival")} == {4 * 610}


def test_reference_fedasync_takes_one_arrival_per_step(runs) -> None:
    s = runs[("reference", "fedasync")]
    arrivals = events(s, "arrival")
    assert {a["bytes_down"] for a in arrivals} == {DENSE_REFERENCE}
    assert {a["bytes_up"] for a in arrivals} == {4 * 610}  # values only: the dense model
    assert len({a["compute"] for a in arrivals}) == 1  # the same compute seconds for every client
    updates = events(s, "server_update")
    assert all(len(u["clients"]) == 1 for u in updates)
    # a step that sent the model lasts 11,912 / 1e7 + 0.1 s; steps never overlap
    gaps = [b["time"] - a["time"] for a, b in zip(updates, updates[1:])]
    assert min(gaps) >= DENSE_REFERENCE / SERVER_UP + 0.1 - 1e-9
    # the first update replaces the model (p = 1), later ones mix by s_i / sum_j s_j < 1
    assert updates[0]["alpha_t"] == pytest.approx(1.0) and all(0 < u["alpha_t"] < 1 for u in updates[1:])
    # round robin over clients that all keep up: merges go around the fleet, 40 = 4 each
    assert s["aggregated_rounds"] == [4] * 10
    assert [u["clients"][0] for u in updates[:10]] == list(range(10))


def test_reference_prfl_closes_steps_on_the_reference_grid(runs) -> None:
    s = runs[("reference", "prfl")]
    # every download here is at most 11,912 B: 11,912 / 1e7 + 0.1 < window 0.5, so every step
    # lasts 0.5 s from t = 0 and each aggregation falls on a multiple of 0.5 s
    updates = events(s, "server_update")
    assert all(abs(u["time"] / 0.5 - round(u["time"] / 0.5)) < 1e-6 for u in updates)
    assert len({a["compute"] for a in events(s, "arrival")}) == 1
    honest = runs[("honest", "prfl")]
    # honest windows open at their first arrival, so they do not fall on that grid
    assert any(abs(u["time"] / 0.5 - round(u["time"] / 0.5)) > 1e-6 for u in events(honest, "server_update"))


def test_run_directory_has_the_round_time_plot(tmp_path) -> None:
    out = tmp_path / "ref"
    run("reference", "fedasync", "sim.max_rounds=12", out=out)
    assert (out / "round_time.png").stat().st_size > 0 and (out / "round_time.svg").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["accounting"] == "reference" and "round_time_breakdown" in summary
    assert load_config(out / "config.yaml").sim.accounting == "reference"


def test_bad_accounting_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="sim.accounting"):
        load_config(overrides=["sim.accounting=fair"])
    # piece_relay: false is about where honest downloads come from; the reference has its own model
    with pytest.raises(ConfigError, match="sim.piece_relay"):
        load_config(overrides=["sim.accounting=reference", "sim.piece_relay=false"])
    with pytest.raises(ValueError, match="piece_relay"):
        SimSettings(accounting="reference", piece_relay=False)


class Killed(Exception):
    """Stands in for the process being killed."""


def killed_at(run_dir: Path, at_round: int, accounting: str, policy: str, *extra: str) -> None:
    """Run the config until its first record at ``at_round`` or later, then stop as if killed."""

    def die(rec: dict[str, Any]) -> None:
        if rec["round"] >= at_round:
            raise Killed

    with pytest.raises(Killed):
        run_policy(build_scenario(load_config(overrides=overrides(accounting, policy, *extra))), out_dir=run_dir,
                   on_progress=die)


def assert_same_run(cut: Path, resumed: dict[str, Any], whole_dir: Path, whole: dict[str, Any]) -> None:
    assert list(read_history(cut / "history.jsonl")) == list(read_history(whole_dir / "history.jsonl"))
    drop = (*WALL_FIELDS, "history")
    assert {k: v for k, v in resumed.items() if k not in drop} == {k: v for k, v in whole.items() if k not in drop}


@pytest.mark.parametrize("policy", ["fedasync", "prfl"])
def test_reference_run_resumes_to_the_uninterrupted_history(tmp_path, policy) -> None:
    extra = ("sim.max_rounds=60", "sim.checkpoint_every_rounds=7")
    whole = run("reference", policy, *extra, out=tmp_path / "whole")
    killed_at(tmp_path / "cut", 40, "reference", policy, *extra)
    assert_same_run(tmp_path / "cut", resume_run(tmp_path / "cut"), tmp_path / "whole", whole)


def test_model_relay_charges_each_fedbuff_version_once_and_resumes_exactly(tmp_path) -> None:
    # FedBuff hands one model version to several clients; with model_relay the dense model
    # (4 * 610 = 2,440 B honest) crosses the server's uplink once per version, and the other
    # copies come from the relay. A run cut short resumes to the uninterrupted history.
    extra = ("policy.options={k: 3}", "sim.max_rounds=30", "sim.checkpoint_every_rounds=7")
    plain = run("honest", "fedbuff", *extra, "sim.model_relay=false")
    assert plain["server_egress_bytes"] == sum(plain["client_download_bytes"])
    whole = run("honest", "fedbuff", *extra, out=tmp_path / "whole")
    versions = {a["version"] for a in events(whole, "arrival")}
    assert whole["server_egress_bytes"] % 2_440 == 0
    assert len(versions) <= whole["server_egress_bytes"] // 2_440 <= whole["server_rounds"] + 1
    assert whole["server_egress_bytes"] < sum(whole["client_download_bytes"]) / 2
    assert load_config(overrides=overrides("honest", "fedbuff", *extra)).sim.model_relay  # the default
    killed_at(tmp_path / "cut", 20, "honest", "fedbuff", *extra)
    assert_same_run(tmp_path / "cut", resume_run(tmp_path / "cut"), tmp_path / "whole", whole)


def test_prfl_is_the_same_run_with_or_without_model_relay() -> None:
    # PR-FL sizes its own server egress (its residual pieces), so the model relay changes nothing
    relayed = run("honest", "prfl", "sim.max_rounds=25")
    before = run("honest", "prfl", "sim.max_rounds=25", "sim.model_relay=false")
    assert relayed["history"] == before["history"]


def test_prfl_without_residual_pieces_publishes_each_sub_model_once_under_the_relay() -> None:
    # without the residual split every client downloads its whole sub-model; the relay serves a
    # sub-model already sent for the same model and density, and without it every copy crosses
    off = ("policy.options={residual_split: false}", "sim.max_rounds=25")
    relayed = run("honest", "prfl", *off)
    before = run("honest", "prfl", *off, "sim.model_relay=false")
    assert before["server_egress_bytes"] == sum(before["client_download_bytes"])
    assert relayed["server_egress_bytes"] < sum(relayed["client_download_bytes"])


def test_a_run_saved_before_model_relay_resumes_under_its_old_rule(tmp_path) -> None:
    # config.yaml of a run started before the option existed has no sim.model_relay: it resumes
    # with every copy of a model crossing the server's link, as it started, not under the default
    extra = ("policy.options={k: 3}", "sim.max_rounds=30", "sim.checkpoint_every_rounds=7", "sim.model_relay=false")
    whole = run("honest", "fedbuff", *extra, out=tmp_path / "whole")
    killed_at(tmp_path / "old", 20, "honest", "fedbuff", *extra)
    saved = tmp_path / "old" / "config.yaml"
    text = saved.read_text()
    assert "model_relay: false" in text
    saved.write_text(text.replace("  model_relay: false\n", ""))
    assert load_run_config(saved).sim.model_relay is False and load_config(saved).sim.model_relay is True
    assert_same_run(tmp_path / "old", resume_run(tmp_path / "old"), tmp_path / "whole", whole)
