"""Speed changes of a fleet over virtual time (prfl.sim.devices.SpeedChange): which profile a
task gets, the fleet file and config forms, their errors, and what a change does to a run."""

from __future__ import annotations

import statistics
import sys
from pathlib import Path
from typing import Any

import pytest

from prfl.config import ConfigError, load_config
from prfl.flower.settings import refuse_simulator_only
from prfl.flower.shaping import LinkSpeeds, ShapingError
from prfl.run import build_scenario, resume_run, run_policy
from prfl.runtime.history import read_history
from prfl.sim.devices import (
    DeviceProfile,
    Fleet,
    FleetError,
    ServerProfile,
    SpeedChange,
    draw_task_speeds,
    fleet_summary,
    load_fleet,
    make_fleet,
    parse_changes,
    save_fleet,
)

sys.path.insert(0, str(Path(__file__).parent))
from test_accounting_run import Killed, events, overrides  # noqa: E402

MB = 1e6


def three() -> Fleet:
    return Fleet(
        clients=(DeviceProfile(3e10, 30 * MB, 3 * MB), DeviceProfile(2e10, 20 * MB, 2 * MB, 0.0),
                 DeviceProfile(1e10, 10 * MB, 1 * MB)),
        server=ServerProfile(50 * MB, 10 * MB),
        name="three",
    )


def test_profile_follows_the_latest_change_at_or_before_the_dispatch() -> None:
    base = three()
    fleet = Fleet(base.clients, base.server, "three", parse_changes([
        {"at": 200, "clients": [0], "compute": 0.5},  # listed out of order: sorted by time
        {"at": 100, "like": "reversed"},
        {"at": 300, "clients": [2, 0], "like": [1, 1], "up": 2},
    ]))
    c = base.clients
    assert [fleet.profile_at(k, 99.9) for k in range(3)] == list(c)
    assert [fleet.profile_at(k, 100.0) for k in range(3)] == [c[2], c[1], c[0]]  # a change at t applies at t
    # changes do not compound: client 0 is its own device at half compute, not client 2's
    assert fleet.profile_at(0, 250) == DeviceProfile(1.5e10, 30 * MB, 3 * MB)
    assert fleet.profile_at(2, 250) == c[0]
    assert fleet.profile_at(0, 300) == DeviceProfile(2e10, 20 * MB, 4 * MB, 0.0)  # client 1's sigma too
    assert fleet.profile_at(2, 1e9) == DeviceProfile(2e10, 20 * MB, 4 * MB, 0.0)
    assert fleet.profile_at(1, 1e9) == c[1]
    assert [ch.at for ch in fleet.changes] == [100.0, 200.0, 300.0]


def test_a_task_keeps_its_random_factors_and_takes_the_new_means() -> None:
    base = three()
    fleet = Fleet(base.clients, base.server, "three", (SpeedChange(50.0, clients=(0,), like=(2,), down=0.5),))
    for task in range(5):
        before = draw_task_speeds(fleet, 0, task, run_seed=3, at=49.0)
        assert before == draw_task_speeds(base, 0, task, run_seed=3)
        after = draw_task_speeds(fleet, 0, task, run_seed=3, at=50.0)
        # the same factors F applied to client 2's means, download halved
        assert after.compute_flops / 1e10 == pytest.approx(before.compute_flops / 3e10, rel=1e-12)
        assert after.down_bps / (5 * MB) == pytest.approx(before.down_bps / (30 * MB), rel=1e-12)
        assert after.up_bps / MB == pytest.approx(before.up_bps / (3 * MB), rel=1e-12)


@pytest.mark.parametrize(("raw", "message"), [
    ([{"at": -1}], "'at' must be a finite number of virtual seconds >= 0"),
    ([{"at": "soon"}], "'at' must be a finite number"),
    ([{"clients": [0]}], "field 'at' missing"),
    ([{"at": 1, "speed": 2}], "unknown key(s) 'speed'; valid keys: at, clients, like, compute, down, up"),
    ([{"at": 1, "clients": [0], "like": "reversed"}], "'like: reversed' applies to every client; leave 'clients' out"),
    ([{"at": 1, "clients": [0, 1], "like": [2]}], "'like' has 1 entries for 2 clients"),
    ([{"at": 1, "clients": []}], "'clients' is empty"),
    ([{"at": 1, "clients": [0, 0]}], "names a client twice"),
    ([{"at": 1, "clients": "0"}], "'clients' must be a list of client indices"),
    ([{"at": 1, "like": "backwards"}], "'like' must be a list of client indices"),
    ([{"at": 1, "clients": [-1]}], "client indices >= 0"),
    ([{"at": 1, "compute": 0}], "multiplier 'compute' must be a positive finite number"),
    ([{"at": 1, "up": float("inf")}], "multiplier 'up' must be a positive finite number"),
    ({"at": 1}, "expected a list of changes"),
])
def test_bad_changes_are_refused_with_the_field_and_the_fix(raw: Any, message: str) -> None:
    with pytest.raises(FleetError) as err:
        parse_changes(raw)
    assert message in str(err.value)


@pytest.mark.parametrize(("raw", "message"), [
    ([{"at": 1, "clients": [3]}], "names client 3, but the fleet has 3 clients (0..2)"),
    ([{"at": 1, "like": [0, 1]}], "'like' has 2 entries for the fleet's 3 clients"),
    ([{"at": 1}, {"at": 1, "clients": [2], "up": 2}], "two speed changes of client 2 at 1 s; merge them"),
])
def test_changes_that_do_not_fit_the_fleet_are_refused(raw: Any, message: str) -> None:
    base = three()
    with pytest.raises(FleetError) as err:
        Fleet(base.clients, base.server, "three", parse_changes(raw))
    assert message in str(err.value)


def test_fleet_files_carry_changes_and_round_trip(tmp_path) -> None:
    base = three()
    fleet = Fleet(base.clients, base.server, "three",
                  parse_changes([{"at": 10, "like": "reversed"}, {"at": 20.5, "clients": [1], "compute": 0.25}]))
    save_fleet(fleet, tmp_path / "f.yaml")
    assert load_fleet(tmp_path / "f.yaml") == fleet
    text = fleet_summary(fleet)
    assert "from 10 s: every client: client i takes client 2-i's starting device" in text
    assert "from 20.5 s: clients [1]: compute x0.25" in text
    bad = tmp_path / "bad.yaml"
    bad.write_text("clients:\n  - {compute_flops: 1.0e10, down_bps: 1.0e6, up_bps: 1.0e6, count: 3}\n"
                   "changes:\n  - {at: 20.5, clients: [7], compute: 0.25}\n")
    with pytest.raises(FleetError, match=r"bad.yaml: speed change at 20.5 s names client 7"):
        load_fleet(bad)


def test_config_changes_are_checked_when_loaded_and_when_the_fleet_is_built(tmp_path) -> None:
    with pytest.raises(ConfigError, match="fleet.changes"):
        load_config(overrides=[*overrides("honest", "fedasync"), "fleet.changes=[{at: 1, speed: 2}]"])
    cfg = load_config(overrides=[*overrides("honest", "fedasync"), "fleet.changes=[{at: 1, clients: [12]}]"])
    with pytest.raises(ConfigError, match="names client 12, but the fleet has 10 clients"):
        build_scenario(cfg)
    fleet = make_fleet("paper10", 10)
    save_fleet(Fleet(fleet.clients, fleet.server, "f", parse_changes([{"at": 5, "like": "reversed"}])), tmp_path / "f.yaml")
    both = load_config(overrides=[*overrides("honest", "fedasync"), f"fleet.file={tmp_path / 'f.yaml'}",
                                  "fleet.changes=[{at: 1, like: reversed}]"])
    with pytest.raises(ConfigError, match="keep them in one place"):
        build_scenario(both)
    from_file = build_scenario(load_config(overrides=[*overrides("honest", "fedasync"), f"fleet.file={tmp_path / 'f.yaml'}"]))
    assert from_file.fleet.profile_at(0, 5.0) == fleet.clients[9]


def test_flower_refuses_speed_changes() -> None:
    with pytest.raises(ConfigError, match=r"prfl.fleet.changes is set \(here\), but speed changes model simulated"):
        refuse_simulator_only({"fleet": {"changes": [{"at": 1, "like": "reversed"}]}}, "here")
    refuse_simulator_only({"fleet": {"changes": []}}, "here")  # none set: accepted
    steady = make_fleet("paper10", 10, sigma=0.0, server_sigma=0.0)
    LinkSpeeds.from_fleet(steady)
    with pytest.raises(ShapingError, match="has speed changes"):
        LinkSpeeds.from_fleet(Fleet(steady.clients, steady.server, "x", parse_changes([{"at": 1, "like": "reversed"}])))


CHANGE_AT = 0.006  # virtual s: about a third of the digits runs below (60 updates end near 0.016 s)
REVERSED = f"fleet.changes=[{{at: {CHANGE_AT}, like: reversed}}]"


def digits(*extra: str, out: Path | None = None) -> dict[str, Any]:
    cfg = load_config(overrides=[*overrides("honest", "fedasync"), "sim.max_rounds=60", *extra])
    return run_policy(build_scenario(cfg), out_dir=out)


def test_a_change_leaves_the_run_before_it_alone_and_moves_the_slow_device() -> None:
    steady = digits()
    changed = digits(REVERSED)
    assert [r for r in changed["history"] if r["time"] < CHANGE_AT] == [r for r in steady["history"] if r["time"] < CHANGE_AT]
    assert changed["history"] != steady["history"]

    def mean_download(summary: dict[str, Any], client: int, after: bool) -> float:
        return statistics.mean(a["download"] for a in events(summary, "arrival")
                               if a["client"] == client and (a["time"] - a["duration"] >= CHANGE_AT) == after)

    # client 0 had the fastest links (20 MB/s down) and takes the slowest (1.5 MB/s); client 9 the reverse
    assert mean_download(changed, 0, after=True) > 5 * mean_download(changed, 0, after=False)
    assert mean_download(changed, 9, after=True) * 5 < mean_download(steady, 9, after=True)


def test_a_run_with_a_change_resumes_exactly(tmp_path) -> None:
    extra = (REVERSED, "sim.checkpoint_every_rounds=7")
    whole = digits(*extra, out=tmp_path / "whole")

    def die(rec: dict[str, Any]) -> None:
        if rec["round"] >= 25:
            raise Killed

    cfg = load_config(overrides=[*overrides("honest", "fedasync"), "sim.max_rounds=60", *extra])
    with pytest.raises(Killed):
        run_policy(build_scenario(cfg), out_dir=tmp_path / "cut", on_progress=die)
    resumed = resume_run(tmp_path / "cut")
    assert list(read_history(tmp_path / "cut" / "history.jsonl")) == list(read_history(tmp_path / "whole" / "history.jsonl"))
    assert resumed["server_rounds"] == whole["server_rounds"] == 60


def test_plots_mark_each_time_the_speeds_change(monkeypatch, tmp_path) -> None:
    import matplotlib.pyplot as plt

    import prfl.run as run_module
    from prfl.report.plots import draw_marks, speed_change_marks

    assert speed_change_marks([{"at": 300, "clients": [1]}, {"at": 100, "like": "reversed"}, {"at": 300}]) == [
        (100.0, "speeds change"), (300.0, "speeds change")]
    assert speed_change_marks([]) == speed_change_marks(None) == []
    fig, ax = plt.subplots()
    draw_marks(ax, [(5.0, "speeds change")])
    assert [list(line.get_xdata()) for line in ax.lines] == [[5.0, 5.0]]
    assert [t.get_text() for t in ax.texts] == ["speeds change"]
    plt.close(fig)
    # a run directory's accuracy plot is given the configured changes
    seen: list[Any] = []
    real = run_module.plot_accuracy
    monkeypatch.setattr(run_module, "plot_accuracy", lambda *a, **k: seen.append(k.get("marks")) or real(*a, **k))
    digits(REVERSED, "sim.max_rounds=10", out=tmp_path / "run")
    assert seen == [[(CHANGE_AT, "speeds change")]] and (tmp_path / "run" / "accuracy.png").is_file()


def _densities(*options: str) -> tuple[list[float], list[float]]:
    """PR-FL on digits with window 0 (task times, not the window, set the round times), its
    device order reversed at 0.05 virtual s: the last densities before the change, and at the end."""
    at = 0.05
    cfg = load_config(overrides=[*overrides("honest", "prfl"), "sim.max_rounds=600", "sim.eval_every_rounds=300",
                                 f"policy.options={{interval: 10, window: 0, {', '.join(options)}}}",
                                 f"fleet.changes=[{{at: {at}, like: reversed}}]"])
    steps = [r for r in run_policy(build_scenario(cfg))["history"] if r["event"] == "densities"]
    return [r for r in steps if r["time"] < at][-1]["density"], steps[-1]["density"]


def test_prfl_rule_a_follows_a_reversed_fleet_and_the_reference_rule_sends_every_client_dense() -> None:
    # rule A with adapt_after_recovery: density t_fastest / t_i on dense-equivalent round times,
    # so after the reversal client 9 (now on the fastest device) trains dense and client 0 sparse
    before, after = _densities("density_rule: A", "adapt_after_recovery: true")
    assert before[0] == 1.0 and before[9] < 0.3
    assert after[9] == 1.0 and after[0] < 0.5 and min(after[6:]) > max(after[:4])
    # rule B (the reference) steps every density towards client 0's round time; client 0 is then
    # on the slowest device, so every client is faster than it and climbs to dense
    before, after = _densities("density_rule: B")
    assert before[0] == 1.0 and before[9] < 0.3
    assert after[0] == 1.0 and min(after) > 0.8
