"""scripts/make_results_md.py renders docs/RESULTS.md from result files: checked on a small fixture."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "make_results_md.py"
HEADER = ("scenario,method,seed,final_accuracy,best_accuracy,virtual_seconds,server_rounds,local_rounds,"
          "local_rounds_min,local_rounds_max,server_egress_mb,wall_seconds,time_to_0.75,time_to_0.8")
ROWS = [
    # iid: PR-FL reaches 0.75 at 100 and 140 s, FedAsync at 300 and 340 s -> speed-up 320 / 120
    "iid,fedasync,0,0.77,0.78,3000,900,10 20 40,10,40,1500,60,300,",
    "iid,fedasync,1,0.76,0.77,3000,880,5 20 40,5,40,2500,61,340,",
    "iid,prfl,0,0.81,0.82,3000,950,30 30 40,30,40,1000,70,100,200",
    "iid,prfl,1,0.79,0.80,3000,940,3 30 40,3,40,1000,71,140,",
    "dirichlet,prfl,0,0.70,0.71,3000,900,0 30 40,0,40,900,70,,",
    "dirichlet,prfl-norecovery,0,0.69,0.70,3000,900,20 30 40,20,40,900,70,,",
]


@pytest.fixture
def script():
    spec = importlib.util.spec_from_file_location("make_results_md", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def results(tmp_path: Path) -> Path:
    root = tmp_path / "results"
    (root / "paper_fmnist").mkdir(parents=True)
    (root / "paper_fmnist" / "results.csv").write_text("\n".join([HEADER, *ROWS]) + "\n", encoding="utf-8")
    (root / "masked_training.json").write_text(json.dumps({
        "benchmark": "masked_training", "date": "2026-01-01T00:00:00+00:00", "command": "python bench.py",
        "setup": {"model": "conv2", "steps_per_task": 5, "train_config": {"batch_size": 20}},
        "ratios_vs_dense": {"0.5": {"wall": {"paired_ratio_median": 1.08, "paired_ratio_p10": 0.9, "paired_ratio_p90": 1.3,
                                             "ratio_of_medians": 1.07}, "pass": True}},
        "target": 1.15, "verdict": "PASS", "worst_paired_ratio": 1.08,
    }), encoding="utf-8")
    (root / "simulator.json").write_text(json.dumps({
        "benchmark": "simulator", "inline_overhead_median": 1.042, "goal_overhead": 1.1,
        "process_speedup_median": 1.71, "histories_identical": True, "workload": {"rounds": 200},
    }), encoding="utf-8")
    (root / "flower_sim.json").write_text(json.dumps({
        "benchmark": "flower", "workload": {"rounds": 10},
        "runs": {"prfl-process": {"wall": 30.0, "final_accuracy": 0.7}, "flower": {"wall": 90.0, "final_accuracy": 0.69}},
        "wall_ratio_flower_over_prfl_process": 3.0, "wall_ratio_flower_over_prfl_inline": 2.5,
    }), encoding="utf-8")
    (root / "other.json").write_text(json.dumps({"benchmark": "something else", "score": 3, "nested": {"x": 1}}),
                                     encoding="utf-8")
    return root


def table_row(text: str, method: str, after: str) -> list[str]:
    """The cells of ``method``'s row in the first table after the heading ``after``."""
    section = text.split(after, 1)[1]
    for line in section.splitlines():
        if line.startswith(f"| {method} |"):
            return [c.strip() for c in line.strip("|").split("|")]
    raise AssertionError(f"no row for {method} after {after!r}")


def test_results_md_from_a_fixture(script, results, tmp_path) -> None:
    out = tmp_path / "RESULTS.md"
    assert script.main(["--results", str(results), "--out", str(out)]) == 0
    text = out.read_text(encoding="utf-8")
    assert "python scripts/make_results_md.py" in text and "do not edit by hand" in text
    prfl = table_row(text, "prfl", "### iid")
    fedasync = table_row(text, "fedasync", "### iid")
    # method, seeds, t0.75, speed-up, t0.8, speed-up, final, best, local rounds min-max, max/min, egress GB
    assert prfl[:6] == ["prfl", "2", "120 ± 28", "2.67x", "200 (1/2 reached)", "-"]
    assert fedasync[:6] == ["fedasync", "2", "320 ± 28", "1.00x", "not reached (0/2)", "-"]
    assert prfl[6] == "0.800 ± 0.014" and prfl[8] == "3-40"
    assert prfl[9] == "7.33 ± 8.49"  # 40/30 and 40/3
    assert fedasync[10] == "2.00 ± 0.71"  # 1.5 and 2.5 GB
    assert text.index("| prfl |") < text.index("| fedasync |")  # PR-FL first, then the paper's order
    noniid = table_row(text, "prfl", "### dirichlet")
    assert noniid[2] == "not reached (0/1)" and noniid[9] == "∞"  # a client without a round
    assert table_row(text, "prfl-norecovery", "### dirichlet")[9] == "2.00"
    assert "Verdict: **PASS**" in text and "| 0.5 | 1.080 | 0.900 | 1.300 | 1.070 | yes |" in text
    assert "| inline overhead (wall / training, median) | 1.042 | <= 1.10 |" in text
    assert "| process speed-up vs inline (median) | 1.71 | - |" in text  # an older file's keys
    assert "| flower | 90.0 | - | 0.690 |" in text and "Flower / prfl wall time: 3.00" in text
    assert "## something else" in text and "| score | 3 |" in text
    # --check passes on the file just written and fails once a source changes
    assert script.main(["--results", str(results), "--out", str(out), "--check"]) == 0
    (results / "simulator.json").unlink()
    assert script.main(["--results", str(results), "--out", str(out), "--check"]) == 1


def test_simulator_section_lists_every_executor(script) -> None:
    lines = script.simulator_section({
        "inline_overhead_median": 1.06, "goal_overhead": 1.1, "speedup_median": {"process": 1.1, "ray": 0.9},
        "histories_identical": {"process": True, "ray": False},
    }, "simulator.json")
    text = "\n".join(lines)
    assert "| ray speed-up vs inline (median) | 0.90 | - |" in text
    assert "| ray history identical to inline | False | True |" in text


def test_scale_and_vmap_sections(script) -> None:
    scale = "\n".join(script.scale_section({
        "server_rounds": 2000, "peak_rss_bytes": 3 * 2**30, "target_peak_rss_bytes": 4 * 2**30,
        "dense_buffer_would_need_bytes": 26 * 2**30, "wall_seconds": 1234.4, "final_accuracy": 0.71,
        "workload": {"clients": 1000},
    }, "scale.json"))
    assert "| peak RSS of the server process (GiB) | 3.00 | <= 4 |" in scale
    assert "| a dense buffer alone would hold (GiB) | 26.00 | - |" in scale and "| wall time (s) | 1234 | - |" in scale
    assert "Workload: clients 1000." in scale
    vm = "\n".join(script.vmap_section({"results": [
        {"model": "conv2", "k": 4, "sequential_median_s": 2.0, "vmap_median_s": 2.5, "paired_speedup_median": 0.8,
         "max_abs_diff": 2e-8}]}, "vmap.json"))
    assert "| conv2 | 4 | 2.000 | 2.500 | 0.80 | 2.0e-08 |" in vm
    mib = 2**20
    buf = "\n".join(script.buffer_section({"dense_storage_would_need_bytes": 26 * 2**30, "runs": [
        {"variant": "file", "aggregate_seconds_median": 1.234, "buffer_nbytes": 3000 * mib,
         "rss_before": {"RssAnon": 100 * mib, "RssFile": 10 * mib}, "rss_filled": {"RssAnon": 120 * mib, "RssFile": 20 * mib},
         "rss_peak_during_aggregations": {"RssAnon": 150 * mib, "RssFile": 10 * mib}}]}, "buffer.json"))
    assert "| file | 1.23 | 30 | 50 | 3000 |" in buf and "Dense storage would hold 26.0 GiB." in buf


def test_results_md_without_run_results(script, tmp_path) -> None:
    (tmp_path / "results").mkdir()
    out = tmp_path / "RESULTS.md"
    assert script.main(["--results", str(tmp_path / "results"), "--out", str(out)]) == 0
    assert "No run results yet" in out.read_text(encoding="utf-8")


def test_ablation_tables_borrow_the_baseline_runs_of_the_same_seeds(script, results, tmp_path) -> None:
    (results / "ablations").mkdir()
    (results / "ablations" / "results.csv").write_text("\n".join([
        HEADER, "iid,prfl-lean,0,0.85,0.86,3000,990,20 30 40,20,40,900,70,60,100",
        "iid,prfl-lean,1,0.84,0.85,3000,990,20 30 40,20,40,900,70,68,",
        "iid,prfl-magnitude,0,0.84,0.85,3000,990,20 30 40,20,40,900,70,100,",
    ]) + "\n", encoding="utf-8")
    out = tmp_path / "RESULTS.md"
    assert script.main(["--results", str(results), "--out", str(out)]) == 0
    text = out.read_text(encoding="utf-8")
    section = text.split("### iid (ablations)\n\nFrom `", 1)[1]  # the ablations' table is named after its directory
    assert "ablations/results.csv" in section.split("\n")[0]
    assert "Rows of prfl, fedasync are the same seeds' runs" in section.split("\n")[0]
    section = "### iid\n" + section
    lean = table_row(section, "prfl-lean", "### iid")
    assert lean[2] == "64 ± 6" and lean[3] == "5.00x"  # fedasync 320 s over seeds 0 and 1 / 64 s
    assert table_row(section, "fedasync", "### iid")[2] == "320 ± 28"
    # a method with fewer seeds is compared with the baseline's runs of its own seeds: 300 / 100
    assert table_row(section, "prfl-magnitude", "### iid")[3] == "3.00x"


def test_real_links_section(script) -> None:
    d = {
        "command": "python benchmarks/bench_real_links.py", "workload": {"server_updates": 15},
        "links": {"down_bps": [30000.0, 13000.0], "up_bps": [40000.0, 20000.0], "server_up_bps": 60000.0,
                  "server_down_bps": 100000.0, "shaping": "tc htb on lo"},
        "compute": "measured", "goals": {"task_duration_median_abs_rel_error": 0.15, "time_to_updates_abs_rel_error": 0.1},
        "policies": {"fedasync": {
            "pairs": 14, "tasks_real": 14,
            "median_abs_rel_error": {"download": 0.071, "upload": 0.115, "duration": 0.083},
            "median_rel_error": {"download": -0.053, "upload": -0.035},
            "time_to_updates": {"real": 293.0, "simulated": 276.3, "rel_error": -0.057},
            "median_real_seconds": {"duration": 80.4, "download": 24.7, "upload": 30.8, "compute": 22.1},
            "median_gap_seconds": {"poll": 2.57, "reply": 0.55},
        }},
    }
    text = "\n".join(script.real_links_section(d, "benchmarks/results/real_links.json"))
    assert "node downloads 30/13, uploads 40/20; the server sends 60" in text and "receives 100" in text
    assert "| fedasync | 14/14 | 7.1% | 11.5% | 8.3% | 293 / 276 | -5.7% |" in text
    assert "| fedasync | 80.4 | 24.7 | 30.8 | 22.1 | 2.57 | 0.55 | -5.3% | -3.5% |" in text
    assert "`benchmarks/results/real_links.png`" in text


def test_fuzz_section(script) -> None:
    text = "\n".join(script.fuzz_section({
        "sequences": 30, "failed": 1, "commit": "abc1234",
        "policies": {"prfl": {"sequences": 10, "steps": 60, "failed": 1, "failures": [{"seed": 7, "error": "x"}],
                              "seconds": 12.4},
                     "fedavg": {"sequences": 10, "steps": 60, "failed": 0, "failures": [], "seconds": 3.0}},
        "flower_driver": {"sequences": 10, "failed": 0, "failures": [], "seconds": 40.2},
    }, "fuzz.json"))
    assert "| prfl | 10 | 60 | 1 | 7 | 12 |" in text and "| fedavg | 10 | 60 | 0 | - | 3 |" in text
    assert "| Flower driver | 10 | - | 0 | - | 40 |" in text and "30 sequences in all, 1 failed" in text
    assert "## Event-order fuzzing of the policies and the Flower driver" in text
    rerun = "\n".join(script.fuzz_section({"sequences": 5, "failed": 0, "flower_driver": {"sequences": 5, "failed": 0}},
                                          "benchmarks/results/fuzz_flower_driver.json"))
    assert "## Event-order fuzzing: flower driver" in rerun and "5 sequences in all, 0 failed" in rerun
def test_flower_and_training_step_sections(script) -> None:
    flower = "\n".join(script.flower_section({
        "runs": {"prfl-process": {"wall": 20.0, "final_accuracy": 0.7, "walls": [19.0, 20.0, 25.0]},
                 "plain-loop": {"wall": 30.0, "final_accuracy": 0.7}, "flower": {"wall": 90.0, "final_accuracy": 0.69}},
        "wall_ratio_flower_over_prfl_process": 4.5, "wall_ratio_flower_over_plain_loop": 3.0,
        "wall_ratio_plain_loop_over_prfl_process": 1.5, "goal_flower_over_prfl": 5.0,
        "median_cpu_seconds": {"prfl-process": 30.0}, "flower_cpu_seconds_undercounted": True,
    }, "flower_sim.json"))
    assert "| prfl-process | 20.0 | 30.0 | 0.700 | 19.0, 20.0, 25.0 |" in flower
    assert "Flower's CPU seconds miss Ray's daemonised processes: a lower bound" in flower
    assert "4.50 against prfl's process pool" in flower and "3.00 against the plain PyTorch loop" in flower
    assert "Plain loop / prfl process pool: 1.50" in flower and "Goal: Flower / prfl >= 5" in flower
    step = "\n".join(script.train_step_section({
        "reference": "per-parameter",
        "tasks": {"per-parameter": {"median_wall_s": 0.2, "median_cpu_s": 0.15, "paired_cpu_ratio": 1.0,
                                    "paired_wall_ratio": 1.0, "bit_identical_to_per_parameter": True, "max_abs_diff": 0.0},
                  "compiled": {"median_wall_s": 0.25, "median_cpu_s": 0.19, "paired_cpu_ratio": 1.25,
                               "paired_wall_ratio": 1.3, "bit_identical_to_per_parameter": False, "max_abs_diff": 1.5e-8}},
        "notes": {"compiled": {"compiler": "/usr/bin/g++", "first_task_seconds": 40.0}},
        "evaluation": [{"mode": "no_grad", "batch_size": 1000, "median_cpu_s": 0.9, "accuracy": 0.1}],
        "process_pool": {"slots": {"median_wall_per_task_s": 0.02, "median_cpu_per_task_s": 0.03, "startup_s": 4.0},
                         "workers": 2, "rounds": 8, "tasks_per_round": 10},
    }, "train_step.json"))
    assert "| per-parameter | 200.0 | 150.0 | 1.000 | 1.000 | yes |" in step
    assert "| compiled | 250.0 | 190.0 | 1.250 | 1.300 | 1.5e-08 |" in step
    assert "compiled: compiler /usr/bin/g++, first_task_seconds 40.0." in step
    assert "| no_grad | 1000 | 0.900 | 0.1000 |" in step and "| slots | 20.0 | 30.0 | 4.0 |" in step
def _record(group: str, method: str, seed: int, cross: float, end: float = 600.0) -> dict:
    """A compact record whose accuracy jumps from 0.5 to 0.9 at the first 60 s step >= ``cross``."""
    times = [float(t) for t in range(0, int(end) + 1, 60)]
    accs = [0.9 if t >= cross else 0.5 for t in times]
    return {"cell": {"group": group, "method": method, "seed": seed}, "evals": {"time": times, "accuracy": accs},
            "summary": {"virtual_seconds": end, "final_accuracy": accs[-1], "best_accuracy": max(accs),
                        "server_rounds": 100, "local_rounds": [10, 5], "server_egress_bytes": 2e9,
                        "server_ingress_bytes": 1e9},
            "arrivals": {"count": [10, 5], "mean_seconds": {p: [1.0, 2.0] for p in
                                                            ("download", "link_wait", "compute", "upload", "duration")}},
            "slow_clients": [1], "timing_missing": []}


def test_headline_section(script, results, tmp_path) -> None:
    head = results / "headline"
    planned = []
    for group, crosses in (("honest/paper10/dirichlet", {"prfl": 120, "fedasync-a0.3-poly": 480, "fedasync-a0.6-poly": 360}),
                           ("honest/allfast/dirichlet", {"prfl": 60, "fedasync-a0.6-poly": 180})):
        for method, cross in crosses.items():
            for seed in (0, 1):
                p = head / "records" / group / method / f"seed{seed}.json"
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_text(json.dumps(_record(group, method, seed, cross)), encoding="utf-8")
                planned.append({"group": group, "method": method, "seed": seed, "status": "done"})
    planned.append({"group": "reference/paper10/dirichlet", "method": "prfl", "seed": 0, "status": "unavailable",
                    "reason": "sim.accounting is not in this build"})
    (head / "manifest.json").write_text(json.dumps({
        "updated": "2026-01-01T00:00:00+00:00", "command": "python benchmarks/headline.py run",
        "settings": {"targets": [0.8], "seeds": [0, 1], "max_time": 600, "eval_every_seconds": 60,
                     "base_overrides": ["data.dataset=fashion-mnist", "model.name=conv2", "data.num_clients=10"]},
        "cells": planned}), encoding="utf-8")
    out = tmp_path / "docs" / "RESULTS.md"
    assert script.main(["--results", str(results), "--out", str(out)]) == 0
    text = out.read_text(encoding="utf-8")
    assert "10 of 11 planned cells are done" in text and "Fashion-MNIST, conv2, 10 clients; 600 virtual s" in text
    # the headline comes before the 3,000 s tables
    assert text.index("## Headline") < text.index("## Time to accuracy")
    best = table_row(text, "fedasync (best per target)", "### honest/paper10/dirichlet")
    assert best[2] == "360 ± 0 [a0.6-poly; 2/2 configs]"
    prfl = table_row(text, "prfl", "### honest/paper10/dirichlet")
    assert prfl[2:4] == ["120 ± 0", "3.00x"]
    cost = table_row(text, "prfl", "Costs and where")
    assert cost[2:] == ["100 ± 0", "2.00 ± 0.00", "2.00 ± 0.00", "1.00 ± 0.00", "20.0 ± 0.0",
                        "2.0 + 2.0 + 2.0 + 2.0 + 118.0 = 120.0"]
    limit = table_row(text, "prfl", "against its all-fast limit")
    assert limit[1:] == ["120 ± 0", "60 ± 0", "2.00"]
    assert "| reference/paper10/dirichlet | prfl | 0 | unavailable: sim.accounting is not in this build |" in text
    # the goals open the section, read on the fixture (accuracy jumps to 0.9: 360 / 120 s to 0.85 too)
    goals = text[text.index("### The goals, as they stand"):text.index("### honest/paper10/dirichlet")]
    assert ("| honest/paper10/dirichlet: prfl at least 3x faster than the best-tuned fedasync to 0.85 | "
            "3.00x to 0.85 | seeds 0, 1 | met |") in goals
    assert "| 2.00 to 0.8 | seeds 0, 1 | not met |" in goals  # real 120 s against all-fast 60 s
    assert "| 2.00 ± 0.00 (worst seed 2.00) | seeds 0, 1 | not met |" in goals  # local rounds 10 / 5
    # the sweep's note comes after the groups' tables
    (head / "NOTE.md").write_text("Ran on two cores.\n", encoding="utf-8")
    assert script.main(["--results", str(results), "--out", str(out)]) == 0
    text = out.read_text(encoding="utf-8")
    assert text.index("against its all-fast limit") < text.index("### Notes on the sweep") < text.index("Ran on two cores.")
    assert (out.parent / "figures" / "headline-honest-paper10-dirichlet.png").is_file()
    assert script.main(["--results", str(results), "--out", str(out), "--check"]) == 0


def test_nested_run_tables_are_labelled_by_their_folder_and_quote_their_note(script, results, tmp_path) -> None:
    """results/<set>/<variant>/results.csv is rendered too, named after <set>/<variant>; a NOTE.md
    beside a results.csv is quoted under each of its tables (and nowhere else)."""
    nested = results / "check" / "reference"
    nested.mkdir(parents=True)
    (nested / "results.csv").write_text("\n".join([HEADER, *ROWS]) + "\n", encoding="utf-8")
    (results / "paper_fmnist" / "NOTE.md").write_text("Made by an older build.\n", encoding="utf-8")
    out = tmp_path / "RESULTS.md"
    assert script.main(["--results", str(results), "--out", str(out)]) == 0
    text = out.read_text(encoding="utf-8")
    assert "### iid (check/reference)" in text and "### dirichlet (check/reference)" in text
    assert "check/reference/results.csv`: 4 runs" in text
    main_part = text.split("(check/reference)", 1)[0]
    assert main_part.count("Made by an older build.") == 2  # under both scenarios of paper_fmnist
    assert "Made by an older build." not in text.split("### iid (check/reference)", 1)[1]
    assert table_row(text.split("### iid (check/reference)", 1)[1], "prfl", "From")[3] == "2.67x"


def test_checkpoint_size_breakdown_and_section(script, tmp_path) -> None:
    """benchmarks/bench_checkpoint.py credits every stored tensor's bytes to the part of the state
    that refers to it first and says how the part is stored; the RESULTS.md section lists each
    policy's largest checkpoint against the model and, part by part, where its bytes go."""
    import torch

    from prfl.runtime.checkpoint import Near, Streamed, write_checkpoint

    spec = importlib.util.spec_from_file_location("bench_checkpoint", SCRIPT.parents[1] / "benchmarks" / "bench_checkpoint.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(20_000, generator=g)
    state = {"policy": {"weights": w, "buffer": {f"slot.{c}.values": Near(w + 1e-4 * torch.randn(20_000, generator=g), w)
                                                  for c in range(3)}},
             "inflight": {"$ids": None, 7: {"job": {"start": Near(Streamed(read=lambda: w + 1e-3), w)}}},
             "history_offset": 0, "now": 1.0}
    state["inflight"].pop("$ids")
    path = write_checkpoint(state, tmp_path)
    parts = bench.breakdown(path)
    assert set(parts) == {"policy/weights", "policy/buffer/slot.*.values", "inflight/*/job/start"}
    assert parts["policy/buffer/slot.*.values"]["tensors"] == 3 and parts["policy/buffer/slot.*.values"]["stored_as"] == ["delta"]
    assert parts["policy/weights"]["stored_as"] in (["hi-zlib"], ["plain"])
    stored = sum(p["bytes"] for p in parts.values())
    assert 0 < stored < path.stat().st_size  # the arrays of the tensors, without the state's JSON
    model = w.numel() * 4
    section = "\n".join(script.checkpoint_size_section({
        "model_bytes": model, "goal_x_model": 10.0, "command": "python benchmarks/bench_checkpoint.py",
        "runs": [{"policy": "prfl", "checkpoints": [{"round": 50, "bytes": 3 * model, "x_model": 3.0, "seconds": 1.5},
                                                   {"round": 100, "bytes": 2 * model, "x_model": 2.0, "seconds": 2.5}],
                  "largest": {"round": 50, "bytes": 3 * model, "x_model": 3.0}, "last": {"x_model": 2.0},
                  "largest_parts": parts}]}, "demo_checkpoints.json"))
    assert "| prfl | 2 | 3.00x (0 MB, update 50) | 2.00x | 2.5 |" in section
    assert "goal: at most 10x the model" in section and "| `policy/buffer/slot.*.values` | 3 |" in section


def test_headline_fleet_with_speed_changes_is_described_and_marked(script, monkeypatch, tmp_path) -> None:
    settings = {"fleets": {"paper10": ["fleet.preset=paper10"],
                           "reversed": ["fleet.preset=paper10", "fleet.changes=[{at: 2400, like: reversed}]"]}}
    assert script._change_marks(settings, "reversed") == [(2400.0, "speeds change")]
    assert script._change_marks(settings, "paper10") == [] and script._reversal_words({}) == ""
    assert "`reversed`: the paper10 devices until 2,400 virtual s" in script._reversal_words(settings)
    import prfl.report.bands as bands
    from prfl.report.sweep import Run

    seen = []
    monkeypatch.setattr(bands, "plot_bands", lambda *a, **k: seen.append(k["marks"]))
    run = Run.from_record({"cell": {"group": "honest/reversed/dirichlet", "method": "prfl", "seed": 0},
                           "policy": "prfl", "seed": 0, "summary": {}, "evals": {"time": [0, 60], "accuracy": [0.1, 0.5]}})
    job = script._headline_plot_job(tmp_path / "f.png", {"prfl": [run]}, "g", (0.8,), "fedasync", [0],
                                    marks=[(2400.0, "speeds change")])
    job[1]()
    assert seen == [[(2400.0, "speeds change")]]
