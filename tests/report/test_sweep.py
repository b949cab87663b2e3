"""The headline tables' maths (prfl.report.sweep) on synthetic evaluation series and run directories."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from prfl.report import sweep
from prfl.report.sweep import Run


def run(method: str, seed: int, times, accs, group: str = "g", **summary) -> Run:
    """A compact record with just what the tables read."""
    rec = {"cell": {"group": group, "method": method, "seed": seed},
           "evals": {"time": list(times), "accuracy": list(accs)},
           "summary": {"virtual_seconds": max(times), "final_accuracy": accs[-1], "best_accuracy": max(accs), **summary}}
    return Run.from_record(rec)


def ramp(t_cross: float, end: float = 1000.0, step: float = 60.0, top: float = 0.9):
    """Accuracy 0.5 until just before ``t_cross``, then ``top``: the first evaluation >= 0.8 is the
    first grid time at or after ``t_cross``."""
    times = [i * step for i in range(int(end // step) + 1)]
    return times, [top if t >= t_cross else 0.5 for t in times]


# ---------------------------------------------------------------------------- one run
def test_time_to_target_first_and_consecutive() -> None:
    times = [0, 60, 120, 180, 240, 300]
    accs = [0.5, 0.81, 0.79, 0.80, 0.83, 0.85]
    assert sweep.time_to_target(times, accs, 0.8) == 60  # first evaluation at or above
    assert sweep.time_to_target(times, accs, 0.8, consecutive=3) == 180  # 0.79 at 120 s breaks the run
    assert sweep.time_to_target(times, accs, 0.85) == 300  # equality counts
    assert sweep.time_to_target(times, accs, 0.85, consecutive=2) is None  # only the last one
    assert sweep.time_to_target(times, accs, 0.9) is None
    with pytest.raises(ValueError, match="consecutive"):
        sweep.time_to_target(times, accs, 0.8, consecutive=0)


def test_levelling_criterion() -> None:
    times = list(range(0, 1001, 100))  # the last 20%: t > 800, i.e. 900 and 1000
    climbing = [0.5 + 0.04 * i for i in range(11)]  # +0.08 in the last 20%
    assert sweep.late_gain(times, climbing, 1000) == pytest.approx(0.08)
    assert sweep.levelled(times, climbing, 1000) is False
    flat = [0.5, 0.8, 0.85, 0.86, 0.87, 0.88, 0.885, 0.886, 0.887, 0.889, 0.891]  # +0.004
    assert sweep.levelled(times, flat, 1000) is True
    just_over = flat[:-1] + [0.8931]  # +0.0061
    assert sweep.levelled(times, just_over, 1000) is False
    assert sweep.levelled(times, just_over, 1000, tolerance=0.01) is True
    peaked = [0.5, 0.9, 0.91, 0.9, 0.88, 0.87, 0.86, 0.85, 0.85, 0.84, 0.84]  # declines: negative gain
    assert sweep.late_gain(times, peaked, 1000) == pytest.approx(0.84 - 0.91)
    assert sweep.levelled(times, peaked, 1000) is True
    assert sweep.levelled([0, 100], [0.5, 0.6], 1000) is None  # no evaluation in the last 20%
    with pytest.raises(ValueError, match="tail"):
        sweep.late_gain(times, flat, 1000, tail=1.0)


def test_late_climb_compares_window_means() -> None:
    times = [60.0 * i for i in range(51)]  # to 3,000 s: windows (1800, 2400] and (2400, 3000], 10 evaluations each
    ramp_up = [0.5 + 0.0001 * t for t in times]  # 0.1 per 1,000 s
    assert sweep.late_climb(times, ramp_up, 3000.0) == pytest.approx(0.1)
    # a plateau with alternating noise of +-1 point: the best-so-far criterion sees a late gain
    # whenever the late window's noise peaks higher, the window means do not move
    noisy = [0.88 + (0.01 if i % 2 else -0.01) for i in range(51)]
    noisy[-1] = 0.897  # one lucky late reading
    assert sweep.late_gain(times, noisy, 3000.0) == pytest.approx(0.007)
    assert sweep.levelled(times, noisy, 3000.0) is False
    # the lucky reading moves the late window's mean by 0.027 / 10 over its 600 s: 0.0045 per 1,000 s
    assert sweep.late_climb(times, noisy, 3000.0) == pytest.approx(0.0045)
    noisy[-1] = 0.87
    assert sweep.late_climb(times, noisy, 3000.0) == pytest.approx(0.0)
    # a decline climbs negatively; a window without evaluations cannot be told
    assert sweep.late_climb(times, [1.0 - 0.0001 * t for t in times], 3000.0) == pytest.approx(-0.1)
    assert sweep.late_climb([0.0, 2900.0], [0.5, 0.6], 3000.0) is None
    with pytest.raises(ValueError, match="tail"):
        sweep.late_climb(times, ramp_up, 3000.0, tail=0.5)


def test_climb_table_per_group_and_method() -> None:
    times = [60.0 * i for i in range(51)]
    flat = [0.9] * 51
    rising = [0.5 + 0.0001 * t for t in times]
    groups = sweep.by_group([run("fedasync-a0.6-hinge", 0, times, rising), run("fedasync-a0.6-hinge", 1, times, rising),
                             run("prfl", 0, times, flat), run("prfl", 1, times, rising), run("prfl", 2, times, flat),
                             run("fedavg", 0, times, flat, group="h")])
    headers, rows = sweep.climb_table(groups, seeds=[0, 1])  # seed 2 is not asked for
    assert headers[4] == "late climb (points per 1,000 s)"
    assert [r[:2] for r in rows] == [["g", "prfl"], ["g", "fedasync-a0.6-hinge"], ["h", "fedavg"]]
    prfl, fedasync, fedavg = rows
    assert prfl[2:4] == ["2", "1/2"] and prfl[4] == "5.00 ± 7.07"  # 0 and 10 points per 1,000 s
    assert fedasync[3:5] == ["0/2", "10.00 ± 0.00"] and fedavg[2:5] == ["1", "1/1", "0.00"]
    assert prfl[6] == "3,000"


def test_slow_clients_of_the_paper_fleets() -> None:
    from prfl.sim.devices import make_fleet

    assert sweep.slow_clients(make_fleet("paper10", 10).clients) == [6, 7, 8, 9]
    # equal links: the compute speeds decide (they follow the paper's ranking)
    assert sweep.slow_clients(make_fleet("paper10", 10, links="fastest").clients) == [6, 7, 8, 9]
    assert sweep.slow_clients(make_fleet("paper10", 10).clients, fraction=0.1) == [9]


# ---------------------------------------------------------------------------- over seeds and methods
def grid_runs() -> dict[str, list[Run]]:
    """FedAsync grid: a0.3 crosses 0.8 at 600 and 720 s, a0.6 at 360 and 480 s but not at all on seed
    2, a0.1 is fastest but has no seed 2; PR-FL at 120 and 240 and 240 s."""
    runs = [
        run("fedasync-a0.3-poly", 0, *ramp(600)), run("fedasync-a0.3-poly", 1, *ramp(720)),
        run("fedasync-a0.3-poly", 2, *ramp(600)),
        run("fedasync-a0.6-poly", 0, *ramp(360)), run("fedasync-a0.6-poly", 1, *ramp(480)),
        run("fedasync-a0.6-poly", 2, *ramp(5000)),
        run("fedasync-a0.1-poly", 0, *ramp(60)), run("fedasync-a0.1-poly", 1, *ramp(60)),
        run("prfl", 0, *ramp(120)), run("prfl", 1, *ramp(240)), run("prfl", 2, *ramp(240)),
    ]
    return sweep.by_group(runs)["g"]


def test_best_tuned_needs_every_seed_and_a_complete_member() -> None:
    methods = grid_runs()
    b = sweep.best_tuned(methods, "fedasync", 0.8, [0, 1, 2])
    # a0.1 lacks seed 2 (not complete); a0.6 missed the target on seed 2; a0.3 it is
    assert b.method == "fedasync-a0.3-poly" and b.members == 2 and b.planned == 3
    assert b.time is not None and b.time.mean == pytest.approx(640.0)
    # on seeds 0 and 1 alone every member is complete and a0.1 is fastest
    assert sweep.best_tuned(methods, "fedasync", 0.8, [0, 1]).method == "fedasync-a0.1-poly"
    # nobody reaches 0.95
    none = sweep.best_tuned(methods, "fedasync", 0.95, [0, 1, 2])
    assert none.method is None and none.time is None


def test_best_tuned_ties_go_to_the_smaller_name() -> None:
    methods = sweep.by_group([run("fedasync-b", 0, *ramp(300)), run("fedasync-a", 0, *ramp(300))])["g"]
    assert sweep.best_tuned(methods, "fedasync", 0.8, [0]).method == "fedasync-a"


def test_speedup_only_when_every_seed_reached() -> None:
    methods = grid_runs()
    base = sweep.best_tuned(methods, "fedasync", 0.8, [0, 1, 2]).time
    prfl = sweep.seed_times(methods["prfl"], 0.8, [0, 1, 2])
    assert sweep.speedup(base, prfl) == pytest.approx(640.0 / 200.0)
    partial = sweep.seed_times(methods["fedasync-a0.6-poly"], 0.8, [0, 1, 2])
    assert partial.n == 2 and sweep.speedup(base, partial) is None
    assert sweep.speedup(None, prfl) is None


def test_time_table_rows() -> None:
    headers, rows = sweep.time_table(grid_runs(), ["prfl"], [0.8], [0, 1, 2])
    assert headers[:4] == ["method", "seeds", "time to 0.8 (s)", "speed-up vs best fedasync"]
    by = {r[0]: r for r in rows}
    assert by["fedasync (best per target)"][2] == "640 ± 69 [a0.3-poly; 2/3 configs]"
    assert by["prfl"][2:4] == ["200 ± 69", "3.20x"]
    assert by["prfl"][-1] == "3/3"  # flat after the jump: levelled off at every seed
    _, grid = sweep.grid_table(grid_runs(), "fedasync", [0.8], [0, 1, 2])
    g = {r[0]: r for r in grid}
    assert g["fedasync-a0.3-poly"][2] == "640 ± 69 *"
    assert g["fedasync-a0.6-poly"][2] == "420 ± 85 (2/3 reached)"
    assert g["fedasync-a0.1-poly"][1] == "2"
    # a seed without a run is named, not counted as a seed that missed the target
    assert g["fedasync-a0.1-poly"][2] == "60 ± 0 (seeds 0, 1 only)"


def test_time_cells_tell_seeds_not_run_from_targets_missed() -> None:
    methods = sweep.by_group([
        run("prfl", 0, *ramp(120)),  # seed 0 only: reached
        run("fedfix", 0, *ramp(120)), run("fedfix", 1, *ramp(9000)),  # seeds 0, 1: one reached
        run("fedavg", 1, *ramp(9000)),  # seed 1 only: not reached
    ])["g"]
    _, rows = sweep.time_table(methods, ["prfl", "fedfix", "fedavg"], [0.8], [0, 1, 2])
    by = {r[0]: r for r in rows}
    assert by["prfl"][1:4] == ["1", "120 (seed 0 only)", "-"]
    assert by["fedfix"][2] == "120 (1/2 reached, seeds 0, 1 only)"
    assert by["fedavg"][2] == "not reached (seed 1 only)"
    # every seed run: the count is over all of them, as before
    _, full = sweep.time_table(grid_runs(), ["prfl"], [0.8], [0, 1, 2])
    assert {r[0]: r for r in full}["prfl"][2] == "200 ± 69"


def test_missing_cells_in_plan_order() -> None:
    planned = [{"group": "g", "method": m, "seed": s} for m in ("prfl", "fedasync-a0.1-poly") for s in (0, 1, 2)]
    missing = sweep.missing_cells(planned, [r for rs in grid_runs().values() for r in rs])
    assert [(c["method"], c["seed"]) for c in missing] == [("fedasync-a0.1-poly", 2)]
    headers, rows = sweep.missing_table([{**c, "status": "unavailable", "reason": "no option x"} for c in missing])
    assert rows == [["g", "fedasync-a0.1-poly", "2", "unavailable: no option x"]]


# ---------------------------------------------------------------------------- compact records
def write_run_dir(d: Path, arrivals: list[dict], *, fleet: dict | None = None, end: float = 100.0) -> None:
    d.mkdir(parents=True)
    config = {"seed": 0, "data": {"num_clients": 10}, "policy": {"name": "fedasync", "options": {}},
              "fleet": fleet or {"preset": "paper10", "file": None, "options": {}}}
    (d / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    counts = [sum(1 for a in arrivals if a["client"] == c) for c in range(10)]
    summary = {"policy": "fedasync", "virtual_seconds": end, "server_rounds": len(arrivals), "final_accuracy": 0.8,
               "best_accuracy": 0.82, "local_rounds": counts, "server_egress_bytes": 4e9, "server_ingress_bytes": 2e9,
               "history": "not copied"}
    (d / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    lines = [{"event": "start", "time": 0.0, "round": 0, "clients": 10}]
    lines += [{"event": "eval", "time": t, "round": i, "accuracy": a, "loss": 1.0, "server_egress": i, "server_ingress": i}
              for i, (t, a) in enumerate([(0.0, 0.1), (50.0, 0.82), (100.0, 0.8)])]
    lines += [{"event": "arrival", "round": 1, **a} for a in arrivals]
    (d / "history.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")


def test_compact_run_and_the_slow_clients_split(tmp_path: Path) -> None:
    split = {"download": 10.0, "link_wait": 5.0, "compute": 3.0, "upload": 20.0, "duration": 38.0}
    arrivals = [{"client": c, "time": 50.0, "staleness": 1, **split} for c in (6, 7, 8, 9, 9)]
    arrivals += [{"client": 0, "time": 10.0, "staleness": 0, "download": 1.0, "link_wait": 0.0, "compute": 1.0,
                  "upload": 1.0, "duration": 3.0}]
    write_run_dir(tmp_path / "r", arrivals)
    rec = sweep.compact_run(tmp_path / "r", {"group": "g", "method": "fedasync-a0.6-poly", "seed": 0})
    assert rec["slow_clients"] == [6, 7, 8, 9] and rec["timing_missing"] == []
    assert "history" not in rec["summary"] and rec["summary"]["server_rounds"] == 6
    assert rec["evals"]["accuracy"] == [0.1, 0.82, 0.8] and rec["history"]["records"] == 10
    assert rec["arrivals"]["count"][9] == 2 and rec["arrivals"]["mean_seconds"]["upload"][9] == 20.0
    r = Run.from_record(rec)
    s = r.slow_split()
    # rounds per slow client: 100 s over 1, 1, 1, 2 arrivals -> mean 87.5 s; the task takes 38 s
    assert s["round"] == pytest.approx(87.5) and s["idle"] == pytest.approx(49.5)
    assert sweep.split_cell([s], [[]]) == "10.0 + 5.0 + 3.0 + 20.0 + 49.5 = 87.5"
    _, rows = sweep.cost_table({"fedasync-a0.6-poly": [r]}, [], [0])
    # 6 updates, max/min of local rounds = inf (clients 1-5 never arrived), 4 GB out, 2 GB in, 4e9/6 B per update
    assert rows[0][:7] == ["fedasync-a0.6-poly", "1", "6", "∞", "4.00", "2.00", "666.7"]


def test_compact_run_counts_recoveries_and_keeps_the_last_densities(tmp_path: Path) -> None:
    write_run_dir(tmp_path / "r", [{"client": 0, "time": 10.0, "staleness": 0}])
    with open(tmp_path / "r" / "history.jsonl", "a", encoding="utf-8") as fh:
        for x in ({"event": "recovery", "time": 60.0, "scope": "client", "client": 3},
                  {"event": "recovery", "time": 70.0, "scope": "armed"},
                  {"event": "recovery", "time": 80.0, "scope": "client", "client": 4},
                  {"event": "eval", "time": 90.0, "accuracy": 0.85, "loss": 0.5, "density": [1.0, 0.5]},
                  {"event": "eval", "time": 95.0, "accuracy": 0.86, "loss": 0.5}):
            fh.write(json.dumps(x) + "\n")
    rec = sweep.compact_run(tmp_path / "r")["recoveries"]
    assert rec == {"count": {"client": 2, "armed": 1}, "first_time": {"client": 60.0, "armed": 70.0},
                   "final_density": [1.0, 0.5]}
    fedasync = tmp_path / "f"
    write_run_dir(fedasync, [{"client": 0, "time": 10.0, "staleness": 0}])
    assert sweep.compact_run(fedasync)["recoveries"] == {"count": {}, "first_time": {}, "final_density": None}


def test_compact_run_says_which_parts_the_history_lacks(tmp_path: Path) -> None:
    arrivals = [{"client": c, "time": 50.0, "staleness": 0, "compute": 2.0, "duration": 30.0} for c in range(10)]
    write_run_dir(tmp_path / "r", arrivals)
    rec = sweep.compact_run(tmp_path / "r")
    assert rec["timing_missing"] == ["download", "link_wait", "upload"]
    assert rec["arrivals"]["mean_seconds"]["download"] == [None] * 10
    cell = sweep.split_cell([Run.from_record(rec).slow_split()], [rec["timing_missing"]])
    assert cell == "compute 2.0, duration 30.0, idle 70.0; round 100.0 (not in the histories: download, link wait, upload)"
    with pytest.raises(FileNotFoundError, match="no summary.json"):
        sweep.compact_run(tmp_path)


def test_limit_table_ratio_real_over_all_fast() -> None:
    real = grid_runs()
    fast = sweep.by_group([run("prfl", s, *ramp(t)) for s, t in ((0, 60), (1, 120), (2, 120))]
                          + [run("fedasync-a0.3-poly", s, *ramp(300)) for s in (0, 1, 2)])["g"]
    headers, rows = sweep.limit_table(real, fast, [0.8], [0, 1, 2])
    assert headers == ["method", "time to 0.8 (s)", "all-fast (s)", "ratio"]
    assert rows[0] == ["prfl", "200 ± 69", "100 ± 35", "2.00"]
    assert rows[1] == ["fedasync (best per target)", "640 ± 69", "300 ± 0", "2.13"]
    _, rows = sweep.limit_table(real, {}, [0.8], [0, 1, 2])
    assert rows[0] == ["prfl", "200 ± 69", "-", "-"]


def test_cost_projection_uses_the_closest_finished_pace() -> None:
    def timed(group: str, method: str, seed: int, end: float, wall: float, train: float = 0.0) -> Run:
        rec = {"cell": {"group": group, "method": method, "seed": seed}, "evals": {"time": [0.0, end], "accuracy": [0.1, 0.5]},
               "summary": {"virtual_seconds": end, "train_seconds": train}, "wall_seconds_total": wall}
        return Run.from_record(rec)

    runs = [
        timed("honest/paper10/dirichlet", "prfl", 0, 1000.0, 3600.0),  # 3.6 wall s per virtual s
        timed("honest/paper10/dirichlet", "prfl", 1, 2000.0, 3600.0),  # taken further: 1.8
        timed("honest/paper10/dirichlet", "prfl", 2, 1000.0, 1800.0),  # 1.8
        timed("honest/allfast/dirichlet", "prfl", 0, 1000.0, 7200.0),  # 7.2
        timed("reference/paper10/dirichlet", "fedavg", 0, 1000.0, 360.0),  # 0.36
        timed("reference/paper10/dirichlet", "fedavg", 1, 1000.0, 10.0, train=300.0),  # wall lost: left out
    ]
    missing = [
        {"group": "honest/paper10/iid", "method": "prfl", "seed": 0},  # same accounting and fleet: 1.8
        {"group": "honest/allfast/iid", "method": "prfl", "seed": 1, "status": "partial", "virtual_seconds": 500.0},
        {"group": "honest/reversed/dirichlet", "method": "prfl", "seed": 0},  # same accounting: median 2.7
        {"group": "honest/paper10/dirichlet", "method": "fedavg", "seed": 0},  # the method alone: 0.36
        {"group": "honest/paper10/dirichlet", "method": "fedfix", "seed": 2},  # nothing to go by
        {"group": "honest/allfast/iid", "method": "prfl-norecovery", "seed": 0},  # its family, same fleet: 7.2
    ]
    (headers, rows), proj = sweep.cost_projection(runs, missing, horizon=1000.0)
    assert headers[3] == "wall h per 1000 virtual s (median)"
    by = {(r[0], r[1]): r for r in rows}
    assert by[("honest/paper10", "prfl")][2:] == ["3", "0.50", "0.50-1.00"]
    assert by[("honest/allfast", "prfl")][3] == "2.00"
    assert proj.cells == 5 and proj.no_basis == ("honest/paper10/dirichlet fedfix seed 2",)
    assert proj.short == ("reference/paper10/dirichlet fedavg seed 1",)
    assert by[("reference/paper10", "fedavg")][2] == "1"
    expected = (1.8 * 1000 + 7.2 * 500 + 2.7 * 1000 + 0.36 * 1000 + 7.2 * 1000) / 3600
    assert proj.hours == pytest.approx(expected)
    assert proj.waiting_cells == proj.kept_cells == 0
    # cells that wait for a tuning grid: one configuration per group, family and seed is expected to stay
    runs.append(timed("honest/paper10/dirichlet", "fedasync-a0.1-poly", 0, 1000.0, 720.0))  # 0.72
    waiting = [{"group": "honest/paper10/iid", "method": f"fedasync-a{a}-{s}", "seed": seed, "status": "waiting"}
               for a in ("0.1", "0.6") for s in ("poly", "hinge") for seed in (1, 2)]
    _, proj = sweep.cost_projection(runs, missing + waiting, horizon=1000.0)
    assert proj.cells == 5 + 8 and proj.waiting_cells == 8 and proj.kept_cells == 2
    assert proj.waiting_hours == pytest.approx(8 * 0.72 * 1000 / 3600)  # the family's pace, same accounting
    assert proj.kept_hours == pytest.approx(2 * 0.72 * 1000 / 3600)
    assert proj.hours == pytest.approx(expected + proj.waiting_hours)


def test_goals_table_reads_each_goal_on_the_seeds_its_runs_share() -> None:
    H, F, R = "honest/paper10/dirichlet", "honest/allfast/dirichlet", "reference/paper10/dirichlet"
    runs = [
        # honest: PR-FL reaches 0.8 at 120 s on every seed, the tuned FedAsync at 480 / 300 s: 4x and 2.5x
        *(run("prfl", s, *ramp(120, end=2000), group=H, local_rounds=[100, 90, 80]) for s in (0, 1, 2)),
        *(run("fedasync-a0.6-hinge", s, *ramp(480, end=2000), group=H) for s in (0, 1, 2)),
        *(run("fedasync-a0.1-poly", s, *ramp(900, end=2000), group=H) for s in (0, 1, 2)),
        # HeteroFL (mask) is ahead on seed 0 only (60 s), and (width) has seed 0 alone, behind PR-FL
        run("heterofl-mask", 0, *ramp(60, end=2000), group=H),
        *(run("heterofl-mask", s, *ramp(600, end=2000), group=H) for s in (1, 2)),
        run("heterofl-width", 0, *ramp(240, end=2000), group=H),
        # all-fast: seed 0 only, PR-FL twice as fast there (ratio 2.0 > 1.5)
        run("prfl", 0, *ramp(60, end=2000), group=F),
        # reference: FedAsync never reaches the target, PR-FL does
        *(run("prfl", s, *ramp(600, end=2000), group=R) for s in (0, 1, 2)),
        *(run("fedasync-a0.6-hinge", s, *ramp(99999, end=2000), group=R) for s in (0, 1, 2)),
    ]
    groups = sweep.by_group(runs)
    goals = sweep.Goals(speedup_target=0.8)
    headers, rows = sweep.goals_table(groups, [0.8], [0, 1, 2], goals=goals)
    assert headers == ["goal", "measured", "on", "verdict"]
    speed, mask, width, fair, limit, ref = rows
    assert speed[1:] == ["4.00x to 0.8", "seeds 0, 1, 2", "met"]
    # the mean over seeds decides: (60 + 600 + 600) / 3 = 420 against 120
    assert mask[1:] == ["3.50x to 0.8", "seeds 0, 1, 2", "met"]
    assert width[1:] == ["2.00x to 0.8", "seeds 0 of 0, 1, 2", "met so far (1 of 3 seeds)"]
    assert fair[1:] == ["1.25 ± 0.00 (worst seed 1.25)", "seeds 0, 1, 2", "met"]
    assert limit[1:] == ["2.00 to 0.8", "seeds 0 of 0, 1, 2", "not met so far (1 of 3 seeds)"]
    assert ref[1:] == ["only prfl reaches to 0.8", "seeds 0, 1, 2", "met"]
    # a stricter goal fails on the same runs; a split without runs says so
    _, rows = sweep.goals_table(groups, [0.8], [0, 1, 2], goals=sweep.Goals(speedup_target=0.8, speedup=5.0))
    assert rows[0][3] == "not met"
    _, rows = sweep.goals_table(groups, [0.8], [0, 1, 2], split="iid", goals=goals)
    assert {r[3] for r in rows} == {"no runs yet"} and {r[1] for r in rows} == {"-"}
    # a changing fleet with runs adds its own rows after the steady fleet's
    runs += [run("prfl", 0, *ramp(120, end=2000), group="honest/reversed/dirichlet"),
             run("heterofl-mask", 0, *ramp(99999, end=2000), group="honest/reversed/dirichlet")]
    _, rows = sweep.goals_table(sweep.by_group(runs), [0.8], [0, 1, 2], goals=goals)
    assert len(rows) == 8 and rows[3][0].startswith("honest/reversed/dirichlet: prfl ahead of heterofl-mask")
    assert rows[3][1:] == ["only prfl reaches to 0.8", "seeds 0 of 0, 1, 2", "met so far (1 of 3 seeds)"]
    assert rows[4][1:] == ["-", "-", "no runs yet"]  # no HeteroFL (width) there
    # HeteroFL (mask) reaching a target PR-FL misses counts against PR-FL
    slow = sweep.by_group([*(run("prfl", s, *ramp(99999, end=2000), group=H) for s in (0, 1, 2)),
                           *(run("heterofl-mask", s, *ramp(60, end=2000), group=H) for s in (0, 1, 2))])
    _, rows = sweep.goals_table(slow, [0.8], [0, 1, 2], goals=goals)
    assert rows[1][1:] == ["only heterofl-mask reaches to 0.8", "seeds 0, 1, 2", "not met"]
