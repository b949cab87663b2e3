"""Tests for prfl.sim.devices: profiles, per-task draws, presets and fleet files."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from prfl.sim.devices import (
    PRESETS,
    UNLIMITED_SERVER,
    DeviceProfile,
    Fleet,
    FleetError,
    ServerProfile,
    TaskSpeeds,
    draw_server_speeds,
    draw_task_speeds,
    fleet_summary,
    load_fleet,
    make_fleet,
    save_fleet,
)

MB = 1e6


def small_fleet(sigma: float = 0.3) -> Fleet:
    return Fleet(
        clients=(DeviceProfile(1e10, 5 * MB, 1 * MB, sigma), DeviceProfile(2e9, 1 * MB, 0.5 * MB, sigma)),
        server=ServerProfile(50 * MB, 10 * MB, sigma),
        name="small",
    )


# -- profiles ----------------------------------------------------------------------------------


def test_profile_validation() -> None:
    with pytest.raises(FleetError, match="down_bps"):
        DeviceProfile(1e10, 0.0, 1.0)
    with pytest.raises(FleetError, match="compute_flops"):
        DeviceProfile(math.inf, 1.0, 1.0)
    with pytest.raises(FleetError, match="sigma"):
        DeviceProfile(1.0, 1.0, 1.0, sigma=-0.1)
    with pytest.raises(FleetError, match="at least one"):
        Fleet(clients=(), server=UNLIMITED_SERVER)
    assert ServerProfile(math.inf, math.inf).unlimited
    fleet = Fleet(clients=[DeviceProfile(1.0, 1.0, 1.0)], server=UNLIMITED_SERVER)  # type: ignore[arg-type]
    assert isinstance(fleet.clients, tuple) and len(fleet) == 1


# -- draws -------------------------------------------------------------------------------------


def test_sigma_zero_gives_exact_means() -> None:
    fleet = small_fleet(sigma=0.0)
    for task in range(5):
        assert draw_task_speeds(fleet, 1, task, run_seed=7) == TaskSpeeds(2e9, 1 * MB, 0.5 * MB)
        assert draw_server_speeds(fleet, task, run_seed=7) == (50 * MB, 10 * MB)


def test_draws_are_deterministic_and_differ_by_address() -> None:
    fleet = small_fleet()
    a = draw_task_speeds(fleet, 0, 3, run_seed=1)
    assert draw_task_speeds(fleet, 0, 3, run_seed=1) == a
    assert draw_task_speeds(fleet, 0, 4, run_seed=1) != a
    assert draw_task_speeds(fleet, 1, 3, run_seed=1).down_bps / 1e6 != a.down_bps / 5e6
    assert draw_task_speeds(fleet, 0, 3, run_seed=2) != a
    # down, up and compute use independent samples
    assert len({a.compute_flops / 1e10, a.down_bps / (5 * MB), a.up_bps / MB}) == 3
    assert draw_server_speeds(fleet, 0, 1) != draw_server_speeds(fleet, 1, 1)
    with pytest.raises(IndexError):
        draw_task_speeds(fleet, 2, 0, run_seed=1)


def test_draws_identical_in_fresh_process() -> None:
    fleet = small_fleet()
    addresses = [(0, 0), (1, 5), (0, 123456)]
    here = [
        [getattr(draw_task_speeds(fleet, c, t, run_seed=42), k) for k in ("compute_flops", "down_bps", "up_bps")]
        for c, t in addresses
    ] + [list(draw_server_speeds(fleet, 9, run_seed=42))]
    code = (
        "import json, sys\n"
        "from prfl.sim.devices import *\n"
        "f = Fleet((DeviceProfile(1e10, 5e6, 1e6, 0.3), DeviceProfile(2e9, 1e6, 5e5, 0.3)),"
        " ServerProfile(5e7, 1e7, 0.3))\n"
        f"out = [[getattr(draw_task_speeds(f, c, t, 42), k) for k in ('compute_flops', 'down_bps', 'up_bps')]"
        f" for c, t in {addresses!r}]\n"
        "out.append(list(draw_server_speeds(f, 9, 42)))\n"
        "sys.stdout.write(json.dumps([[x.hex() for x in row] for row in out]))\n"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    there = [[float.fromhex(x) for x in row] for row in json.loads(proc.stdout)]
    assert there == here


def test_mean_of_draws_matches_lognormal_mean() -> None:
    # E[speed] = mean * E[LogNormal(0, s)] = mean * exp(s^2 / 2). For s = 0.3 a single sample has
    # sd = sqrt((e^{s^2} - 1) e^{s^2}) ~ 0.321, one draw (mean of 20) ~ 0.072, and the average of
    # 3000 draws ~ 0.0013, i.e. 0.12% of the mean: a 1% tolerance is ~8 standard errors.
    sigma = 0.3
    fleet = small_fleet(sigma)
    draws = [draw_task_speeds(fleet, 0, t, run_seed=3) for t in range(3000)]
    expected = math.exp(sigma**2 / 2)
    for attr, mean in (("compute_flops", 1e10), ("down_bps", 5 * MB), ("up_bps", 1 * MB)):
        got = np.mean([getattr(d, attr) for d in draws]) / mean
        assert got == pytest.approx(expected, rel=0.01)
    # the spread of a draw is that of a mean of 20 samples, not of one sample
    sd = np.std([d.down_bps / (5 * MB) for d in draws])
    one = math.sqrt((math.exp(sigma**2) - 1) * math.exp(sigma**2))
    assert sd == pytest.approx(one / math.sqrt(20), rel=0.1)


# -- presets -----------------------------------------------------------------------------------


def test_paper10_values() -> None:
    fleet = make_fleet("paper10", 10)
    assert len(fleet) == 10 and fleet.name == "paper10"
    assert [c.down_bps for c in fleet.clients] == [x * MB for x in (20, 18, 12, 10, 6, 4, 2.5, 2, 2, 1.5)]
    assert [c.up_bps for c in fleet.clients] == [x * MB for x in (5, 4, 3, 2.5, 1.5, 1, 0.6, 0.5, 0.5, 0.4)]
    assert all(c.sigma == 0.3 for c in fleet.clients)
    assert fleet.server == ServerProfile(down_bps=50 * MB, up_bps=10 * MB, sigma=0.1)
    compute = [c.compute_flops for c in fleet.clients]
    assert compute[0] == 2e10
    assert compute[0] / compute[-1] == pytest.approx(10.0)
    assert compute == sorted(compute, reverse=True)
    assert compute[7] == compute[8]  # equal download speeds, equal rank
    # geometric spacing: ratio between consecutive distinct ranks is 10^(1/9)
    assert compute[0] / compute[1] == pytest.approx(10 ** (1 / 9))


def test_paper10_options_and_repetition() -> None:
    fleet = make_fleet(
        "paper10", 20, compute_flops=1e9, compute_spread=4.0, sigma=0.0, server_up_bps=math.inf
    )
    assert len(fleet) == 20
    assert fleet.clients[10:] == fleet.clients[:10]
    assert fleet.clients[0].compute_flops == 1e9
    assert fleet.clients[9].compute_flops == pytest.approx(0.25e9)
    assert fleet.server.up_bps == math.inf
    with pytest.raises(FleetError, match="multiple of 10"):
        make_fleet("paper10", 7)


def test_preset_errors_name_the_problem() -> None:
    with pytest.raises(FleetError, match="valid presets: paper10, lognormal, uniform"):
        make_fleet("paper", 10)
    with pytest.raises(FleetError, match=r"'spred'.*valid options"):
        make_fleet("lognormal", 10, spred=2.0)
    with pytest.raises(FleetError, match="compute_spread"):
        make_fleet("uniform", 10, compute_spread=2.0)
    with pytest.raises(FleetError, match="'down_bps'"):
        make_fleet("uniform", 3, down_bps=-1.0)
    with pytest.raises(FleetError, match="'correlated'"):
        make_fleet("lognormal", 3, correlated="yes")
    with pytest.raises(FleetError, match="num_clients"):
        make_fleet("uniform", 0)
    assert set(PRESETS) == {"paper10", "lognormal", "uniform"}


def test_uniform() -> None:
    fleet = make_fleet("uniform", 5, compute_flops=3e9, down_bps=2 * MB, up_bps=1 * MB, sigma=0.2)
    assert len(set(fleet.clients)) == 1
    assert fleet.clients[0] == DeviceProfile(3e9, 2 * MB, 1 * MB, 0.2)


def test_lognormal_determinism_and_spread() -> None:
    a = make_fleet("lognormal", 50, seed=4)
    assert make_fleet("lognormal", 50, seed=4) == a
    assert make_fleet("lognormal", 50, seed=5) != a
    # prefix stability: client i depends on (seed, i) only
    assert make_fleet("lognormal", 10, seed=4).clients == a.clients[:10]
    big = make_fleet("lognormal", 2000, seed=1, spread=0.5, down_bps=4 * MB)
    logs = np.log([c.down_bps for c in big.clients])
    # sd of the sample mean of log = 0.5 / sqrt(2000) = 0.011; of the sample sd ~ 0.5 / sqrt(4000)
    assert logs.mean() == pytest.approx(math.log(4 * MB), abs=0.05)
    assert logs.std() == pytest.approx(0.5, rel=0.05)
    indep = np.log([[c.compute_flops, c.down_bps, c.up_bps] for c in big.clients])
    assert abs(np.corrcoef(indep.T)[0, 1]) < 0.1
    corr = make_fleet("lognormal", 200, seed=1, correlated=True)
    ratios = {round(c.compute_flops / 1e10 / (c.down_bps / (5 * MB)), 9) for c in corr.clients}
    assert ratios == {1.0}  # one shared factor
    assert make_fleet("lognormal", 5, spread=0.0).clients == make_fleet("uniform", 5).clients


# -- fleet files -------------------------------------------------------------------------------


def test_yaml_round_trip(tmp_path: Path) -> None:
    for fleet in (make_fleet("lognormal", 7, seed=3), make_fleet("paper10", 10, server_up_bps=math.inf)):
        path = tmp_path / f"{fleet.name}.yaml"
        save_fleet(fleet, path)
        assert load_fleet(path) == fleet
    with pytest.raises(FleetError, match="YAML"):
        save_fleet(fleet, tmp_path / "f.csv")


def test_csv_load(tmp_path: Path) -> None:
    path = tmp_path / "fleet.csv"
    path.write_text(
        "# my devices\n"
        "client,compute_flops,down_bps,up_bps,sigma\n"
        "1, 2e9, 1e6, 5e5,\n"
        "0, 1e10, 5e6, 1e6, 0.1\n"
    )
    fleet = load_fleet(path)
    assert fleet.clients == (DeviceProfile(1e10, 5e6, 1e6, 0.1), DeviceProfile(2e9, 1e6, 5e5, 0.3))
    assert fleet.server == UNLIMITED_SERVER and fleet.name == "fleet"
    # CSV -> YAML -> same fleet
    save_fleet(fleet, tmp_path / "fleet.yaml")
    assert load_fleet(tmp_path / "fleet.yaml") == fleet


def test_yaml_defaults_and_count(tmp_path: Path) -> None:
    path = tmp_path / "f.yml"
    path.write_text(
        "name: lab\n"
        "server: {down_bps: 5e7, up_bps: .inf}\n"
        "defaults: {up_bps: 1e6, sigma: 0.0}\n"
        "clients:\n"
        "  - {compute_flops: 2e10, down_bps: 2e7, up_bps: 5e6}\n"
        "  - {compute_flops: 1e9, down_bps: 1e6, count: 2}\n"
    )
    fleet = load_fleet(path)
    assert fleet.name == "lab" and len(fleet) == 3
    assert fleet.server == ServerProfile(5e7, math.inf, 0.1)
    assert fleet.clients[0] == DeviceProfile(2e10, 2e7, 5e6, 0.0)
    assert fleet.clients[1] == fleet.clients[2] == DeviceProfile(1e9, 1e6, 1e6, 0.0)


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("client,compute_flops,down_bps\n0,1e9,1e6\n", r"missing column\(s\) 'up_bps'"),
        ("client,compute_flops,down_bps,up_bps\n0,1e9,0,1e6\n", r"line 2 \(client 0\): field 'down_bps' must be a positive"),
        ("client,compute_flops,down_bps,up_bps\n0,fast,1e6,1e6\n", r"line 2 \(client 0\): field 'compute_flops' is not a number"),
        ("client,compute_flops,down_bps,up_bps\n0,1e9,1e6,-2\n", r"field 'up_bps' must be a positive"),
        ("client,compute_flops,down_bps,up_bps,sigma\n0,1e9,1e6,1e6,-1\n", r"field 'sigma' must be a finite number >= 0"),
        ("client,compute_flops,down_bps,up_bps,speed\n", r"unknown column\(s\) 'speed'"),
        ("client,compute_flops,down_bps,up_bps\n1,1e9,1e6,1e6\n", r"missing \[0\]"),
        ("client,compute_flops,down_bps,up_bps\n0,1e9,1e6,1e6\n0,1e9,1e6,1e6\n", r"line 3.*'client'.*duplicate"),
        ("client,compute_flops,down_bps,up_bps\nx,1e9,1e6,1e6\n", r"line 2: field 'client' must be an integer"),
        ("client,compute_flops,down_bps,up_bps\n0,1e9,1e6\n", r"line 2: 3 cells for 4 columns"),
    ],
)
def test_csv_errors(tmp_path: Path, text: str, pattern: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(FleetError, match=pattern) as err:
        load_fleet(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("clients:\n  - {compute_flops: 1e9, down_bps: 1e6}\n", r"clients\[0\]: field 'up_bps' missing; add it here or under 'defaults'"),
        ("clients:\n  - {compute_flops: 1e9, down_bps: 0, up_bps: 1}\n", r"clients\[0\]: field 'down_bps' must be a positive"),
        ("clients:\n  - {compute_flops: abc, down_bps: 1, up_bps: 1}\n", r"clients\[0\]: field 'compute_flops' is not a number"),
        ("clients:\n  - {compute_flops: 1, down_bps: 1, up_bps: 1, upload: 3}\n", r"clients\[0\]: unknown key\(s\) 'upload'"),
        ("clients: []\n", r"'clients' must be a non-empty list"),
        ("server: {down_bps: 1}\nclients:\n  - {compute_flops: 1, down_bps: 1, up_bps: 1}\n", r"server: field 'up_bps' missing"),
        ("defaults: {sigma: -1}\nclients:\n  - {compute_flops: 1, down_bps: 1, up_bps: 1}\n", r"defaults: field 'sigma'"),
        ("clients:\n  - {compute_flops: 1, down_bps: .inf, up_bps: 1}\n", r"clients\[0\]: field 'down_bps' must be a positive finite"),
        ("clients:\n  - {compute_flops: 1, down_bps: 1, up_bps: 1, count: 0}\n", r"field 'count'"),
        ("clients: [\n", r"not valid YAML"),
    ],
)
def test_yaml_errors(tmp_path: Path, text: str, pattern: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(FleetError, match=pattern) as err:
        load_fleet(path)
    assert str(path) in str(err.value)


def test_file_type_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FleetError, match="does not exist"):
        load_fleet(tmp_path / "none.yaml")
    (tmp_path / "f.json").write_text("{}")
    with pytest.raises(FleetError, match=r"use \.csv, \.yaml or \.yml"):
        load_fleet(tmp_path / "f.json")


def test_fleet_summary() -> None:
    text = fleet_summary(make_fleet("paper10", 10))
    lines = text.splitlines()
    assert lines[0].startswith("fleet paper10: 10 clients; server down 50 MB/s, up 10 MB/s")
    assert "GFLOP/s" in lines[1]
    assert lines[2].split() == ["0", "20", "20", "5", "0.3"]
    assert lines[-1].split()[0] == "max"
    long = fleet_summary(make_fleet("lognormal", 100), max_rows=5)
    assert "(95 more)" in long and "median" in long
    assert "unlimited" in fleet_summary(Fleet((DeviceProfile(1, 1, 1),), UNLIMITED_SERVER))


def test_paper10_fastest_links() -> None:
    """links="fastest": every client gets client 0's links; compute and the server stay the paper's."""
    paper = make_fleet("paper10", 20)
    fast = make_fleet("paper10", 20, links="fastest")
    assert {(c.down_bps, c.up_bps) for c in fast.clients} == {(20 * MB, 5 * MB)}
    assert [c.compute_flops for c in fast.clients] == [c.compute_flops for c in paper.clients]
    assert fast.server == paper.server
    assert make_fleet("paper10", 10, links="paper") == make_fleet("paper10", 10)
    with pytest.raises(FleetError, match="'links' must be one of 'paper', 'fastest'"):
        make_fleet("paper10", 10, links="fast")
    with pytest.raises(FleetError, match="'links'"):
        make_fleet("uniform", 10, links="fastest")
