"""``prfl compare``: method resolution, presets, running methods x seeds on digits, resuming an
interrupted comparison, the process pool, and the command line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from prfl.cli import app
from prfl.compare import ABLATIONS, RunEvent, plan_comparison, run_comparison, run_state
from prfl.config import ConfigError, load_config
from prfl.report.analysis import time_to_accuracy
from prfl.sim.history import read_history

SCENARIO = {
    "name": "tiny",
    "seed": 0,
    "data": {"dataset": "digits", "num_clients": 4, "partition": "iid"},
    "model": {"name": "mlp", "options": {"hidden": [32]}},
    "train": {"lr": 0.1, "batch_size": 20, "local_steps": 5},
    "fleet": {"preset": "lognormal"},
    "policy": {"name": "prfl", "options": {"interval": 5, "patience": 2}},
    "baselines": [{"name": "fedasync", "options": {"alpha": 0.5}}, {"name": "fedfix", "options": {"dt": 2.0}}],
    "methods": {
        "prfl-i3": {"name": "prfl", "options": {"interval": 3}},
        # two initial densities for a fleet of more clients: valid options, a failure at run time
        "broken": {"name": "prfl", "options": {"initial_densities": [1.0, 0.5]}},
    },
    "sim": {"executor": "inline", "max_rounds": 30, "eval_every_rounds": 5, "checkpoint_every_rounds": 20,
            "targets": [0.3, 0.6]},
}
METHODS = ["prfl", "fedasync"]
SEEDS = [0, 1]
NEW_PRESETS = ("paper-fmnist-iid", "paper-fmnist-noniid", "shakespeare-natural", "cifar10-paper", "femnist-paper")


@pytest.fixture(scope="module")
def scenario_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("scenario") / "tiny.yaml"
    path.write_text(yaml.safe_dump(SCENARIO, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def compared(scenario_file, tmp_path_factory) -> tuple[Path, list[RunEvent]]:
    """prfl and fedasync, seeds 0 and 1, run one after the other in this process."""
    out = tmp_path_factory.mktemp("compare") / "out"
    plan = plan_comparison(scenario_file, methods=METHODS, seeds=SEEDS, out=out)
    events: list[RunEvent] = []
    result = run_comparison(plan, jobs=1, on_event=events.append)
    assert result.failed == {}
    assert sorted(result.ran) == sorted((m, s) for m in METHODS for s in SEEDS)
    return out, events


def copy_of(compared, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(compared[0], dst)
    return dst


def history_without_wall(path: Path) -> list[dict]:
    return [r for r in read_history(path) if r["event"] != "checkpoint"]


# ---------------------------------------------------------------------------- planning
def test_methods_resolve_from_the_yaml_the_scenario_the_registry_and_ablations(scenario_file) -> None:
    plan = plan_comparison(scenario_file, methods=["prfl-i3", "fedasync", "fedbuff", "prfl-norecovery", "prfl"])
    got = {m.name: (m.source, m.policy.name, m.policy.options) for m in plan.methods}
    assert got["prfl-i3"] == ("methods", "prfl", {"interval": 3})
    assert got["fedasync"] == ("scenario", "fedasync", {"alpha": 0.5})  # the scenario's options
    assert got["fedbuff"] == ("default", "fedbuff", {})
    # an ablation keeps the scenario's PR-FL options and turns one switch
    assert got["prfl-norecovery"] == ("ablation", "prfl", {"interval": 5, "patience": 2, "recovery": False})
    assert plan.baseline == "fedasync" and plan.seeds == [0] and plan.targets == [0.3, 0.6]
    assert set(ABLATIONS) == {"norecovery", "nobuffer", "nomaskfedavg", "noresidual", "sync"}
    cfg = plan.run_config("prfl-i3", 7)
    assert cfg.seed == 7 and cfg.policy.options == {"interval": 3} and cfg.baselines == []
    assert (cfg.data.dataset, cfg.data.num_clients, cfg.model.options) == ("digits", 4, {"hidden": [32]})


def test_default_methods_targets_and_baseline(scenario_file, tmp_path) -> None:
    plan = plan_comparison(scenario_file, seeds=[2, 3], targets=[0.5], baseline="prfl", out=tmp_path)
    assert [m.name for m in plan.methods] == ["prfl", "fedasync", "fedfix", "prfl-i3", "broken"]
    assert (plan.seeds, plan.targets, plan.baseline) == ([2, 3], [0.5], "prfl")
    assert plan.run_dir("prfl", 2) == tmp_path / "runs" / "prfl" / "seed2"
    assert plan_comparison(scenario_file, methods=["prfl", "fedbuff"]).baseline == "prfl"  # no fedasync: the first
    assert plan_comparison(preset="demo", methods=["fedasync"]).out == Path("runs") / "demo-compare"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"methods": ["nope"]}, "unknown method 'nope'"),
        ({"methods": ["fedfix"], "overrides": ["baselines=[]"]}, "needs option 'dt'"),
        ({"methods": ["prfl", "prfl"]}, "listed twice"),
        ({"methods": ["prfl"], "baseline": "fedavg"}, "baseline 'fedavg' is not among"),
        ({"methods": ["prfl"], "seeds": [1, 1]}, "distinct"),
        ({"methods": ["prfl"], "targets": [80]}, "targets are accuracies"),
        ({"methods": ["bad/name"]}, "names a directory"),
        ({"overrides": ["methods.x={name: fedasync, options: {beta: 1}}"], "methods": ["x"]}, "unknown option 'beta'"),
        ({"overrides": ["data.partition=random"]}, "data.partition"),
    ],
)
def test_planning_errors_name_the_problem(scenario_file, kwargs, message) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        plan_comparison(scenario_file, **kwargs)


@pytest.mark.parametrize("name", NEW_PRESETS)
def test_presets_load_and_plan(name) -> None:
    cfg = load_config(preset=name)
    plan = plan_comparison(preset=name, methods=None)
    assert plan.methods[0].name == "prfl" and plan.baseline == "fedasync" and plan.targets
    if name.startswith("paper-fmnist"):
        assert (cfg.data.dataset, cfg.model.name, cfg.fleet.preset, cfg.data.num_clients) == ("fashion-mnist", "conv2", "paper10", 10)
        assert cfg.data.partition == ("iid" if name.endswith("-iid") else "dirichlet")
        assert [m.name for m in plan.methods] == ["prfl", "fedasync", "fedfix", "fedbuff", "heterofl", "fedavg"]
    if name == "shakespeare-natural":
        assert (cfg.data.dataset, cfg.model.name, cfg.data.partition) == ("shakespeare", "char_lstm", "natural")
    if name in ("cifar10-paper", "femnist-paper"):
        assert cfg.model.name == ("vgg11" if name == "cifar10-paper" else "conv2") and cfg.data.data_dir is None


# ---------------------------------------------------------------------------- running
def test_comparison_writes_runs_tables_plots_and_report(compared) -> None:
    out, events = compared
    kinds = [(e.kind, e.method, e.seed) for e in events if e.kind != "progress"]
    assert [k for k in kinds if k[0] == "start"] == [("start", m, s) for s in SEEDS for m in METHODS]
    assert sum(e.kind == "progress" for e in events) >= 4 * 7  # evaluations at rounds 0, 5, ..., 30
    for m in METHODS:
        for s in SEEDS:
            d = out / "runs" / m / f"seed{s}"
            assert (d / "summary.json").is_file() and (d / "history.jsonl").is_file()
            assert load_config(d / "config.yaml").seed == s
    for name in ("comparison.yaml", "results.md", "summary.json", "report.html", "tables/time_to_accuracy.csv",
                 "tables/time_to_accuracy.md", "tables/runs.csv", "tables/methods.csv", "tables/clients.csv"):
        assert (out / name).is_file(), name
    for plot in ("accuracy", "egress", "local_rounds", "density"):
        assert (out / "plots" / f"{plot}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (out / "plots" / f"{plot}.svg").read_text(encoding="utf-8").lstrip().startswith("<?xml")


def test_tables_agree_with_the_engines_own_numbers(compared) -> None:
    out, _ = compared
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    for row in summary["runs"]:
        run = out / "runs" / row["method"] / f"seed{row['seed']}"
        engine = json.loads((run / "summary.json").read_text(encoding="utf-8"))
        hist = list(read_history(run / "history.jsonl"))
        for t in (0.3, 0.6):  # the engine records the time it first saw each sim.targets accuracy
            assert row[f"time_to_{t:g}"] == engine["time_to_accuracy"][f"{t:g}"] == time_to_accuracy(hist, t)
        assert row["local_rounds"] == " ".join(map(str, engine["local_rounds"]))
        assert row["final_accuracy"] == engine["final_accuracy"]
    for m in summary["methods"]:
        finals = [r["final_accuracy"] for r in summary["runs"] if r["method"] == m["method"]]
        assert m["final_accuracy"]["mean"] == pytest.approx(sum(finals) / len(finals))


def test_running_again_skips_complete_runs(compared, tmp_path) -> None:
    out = copy_of(compared, tmp_path)
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*/history.jsonl")}
    events: list[RunEvent] = []
    plan = plan_comparison(compared_plan_source(compared), methods=METHODS, seeds=SEEDS, out=out)
    result = run_comparison(plan, jobs=1, on_event=events.append)
    assert {e.kind for e in events} == {"skip"} and len(events) == 4
    assert result.ran == [] and len(result.skipped) == 4
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def compared_plan_source(compared) -> Path:
    manifest = yaml.safe_load((compared[0] / "comparison.yaml").read_text(encoding="utf-8"))
    return Path(manifest["source"])


def test_an_interrupted_comparison_resumes_and_matches(compared, tmp_path) -> None:
    out = copy_of(compared, tmp_path)
    killed = out / "runs" / "prfl" / "seed1"  # killed after its checkpoint at round 20
    before = json.loads((killed / "summary.json").read_text(encoding="utf-8"))
    (killed / "summary.json").unlink()
    lost = out / "runs" / "fedasync" / "seed0"  # killed before any checkpoint
    for name in ("summary.json", "checkpoint.pt"):
        (lost / name).unlink()
    plan = plan_comparison(compared_plan_source(compared), methods=METHODS, seeds=SEEDS, out=out)
    assert run_state(plan, "prfl", 1) == "resume" and run_state(plan, "fedasync", 0) == "new"
    assert run_state(plan, "prfl", 0) == "done"
    events: list[RunEvent] = []
    result = run_comparison(plan, jobs=1, on_event=events.append)
    starts = {(e.method, e.seed): e.data["action"] for e in events if e.kind == "start"}
    assert starts == {("prfl", 1): "resume", ("fedasync", 0): "new"}
    assert len(result.skipped) == 2 and not result.failed
    after = json.loads((killed / "summary.json").read_text(encoding="utf-8"))
    for key in ("final_accuracy", "server_rounds", "virtual_seconds", "local_rounds", "server_egress_bytes"):
        assert after[key] == before[key], key
    assert history_without_wall(killed / "history.jsonl") == history_without_wall(
        compared[0] / "runs" / "prfl" / "seed1" / "history.jsonl")


def test_a_changed_scenario_is_an_error_unless_restarted(compared, tmp_path) -> None:
    out = copy_of(compared, tmp_path)
    src = compared_plan_source(compared)
    changed = plan_comparison(src, overrides=["sim.max_rounds=10"], methods=["fedasync"], seeds=[0], out=out)
    with pytest.raises(ConfigError, match=r"sim\.max_rounds: 30 there, 10 now"):
        run_state(changed, "fedasync", 0)
    assert run_state(changed, "fedasync", 0, restart=True) == "new"
    neutral = plan_comparison(src, overrides=["sim.executor=process", "sim.workers=3"], methods=["fedasync"], seeds=[0], out=out)
    assert run_state(neutral, "fedasync", 0) == "done"  # executors do not change results


def test_a_process_pool_gives_the_same_runs_and_survives_a_failing_run(compared, tmp_path) -> None:
    out = tmp_path / "pool"
    plan = plan_comparison(compared_plan_source(compared), methods=["broken", "fedasync"], seeds=SEEDS, out=out)
    events: list[RunEvent] = []
    result = run_comparison(plan, jobs=2, on_event=events.append)
    assert sorted(result.ran) == [("fedasync", 0), ("fedasync", 1)]
    assert sorted(result.failed) == [("broken", 0), ("broken", 1)]
    assert "initial densities" in result.failed["broken", 0]
    for seed in SEEDS:  # the events of a run arrive in order: start, progress..., done
        kinds = [e.kind for e in events if e.seed == seed and e.method == "fedasync"]
        assert kinds[0] == "start" and kinds[-1] == "done" and set(kinds[1:-1]) == {"progress"}
        rel = Path("runs") / "fedasync" / f"seed{seed}" / "history.jsonl"
        assert history_without_wall(out / rel) == history_without_wall(compared[0] / rel)
        assert load_config(out / rel.parent / "config.yaml").sim.executor == "inline"
    assert "broken seed 0" in (out / "report.html").read_text(encoding="utf-8")  # listed as missing


# ---------------------------------------------------------------------------- command line
def test_cli_compare(compared, tmp_path) -> None:
    src = compared_plan_source(compared)
    runner = CliRunner()
    res = runner.invoke(app, ["compare", str(src), "--methods", "prfl", "fedasync", "--seeds", "0", "1",
                              "--targets", "0.3", "0.6", "--out", str(copy_of(compared, tmp_path)), "-q"])
    assert res.exit_code == 0, res.output
    assert "4 already complete" in res.output and "time to accuracy" in res.output

    res = runner.invoke(app, ["compare", str(src), "-m", "broken", "--seeds", "0", "--out", str(tmp_path / "f"), "-q"])
    assert res.exit_code == 1, res.output
    assert "failed:" in res.output and "broken seed 0" in res.output

    res = runner.invoke(app, ["compare", str(src), "--methods", "nope", "--out", str(tmp_path / "g")])
    assert res.exit_code == 2 and "unknown method 'nope'" in res.output


def test_space_separated_lists_on_the_command_line() -> None:
    from prfl.cli import _SpaceSeparatedLists

    parse = _SpaceSeparatedLists.rewrite
    assert parse(["s.yaml", "--methods", "prfl", "fedasync", "--seeds", "0", "1", "-q"]) == [
        "s.yaml", "--methods", "prfl", "--methods", "fedasync", "--seeds", "0", "--seeds", "1", "-q"]
    assert parse(["--methods", "prfl", "s.yaml", "--targets", "0.5", "0.8", "--out", "x"]) == [
        "--methods", "prfl", "s.yaml", "--targets", "0.5", "--targets", "0.8", "--out", "x"]
    assert parse(["--seeds", "0", "fifty"]) == ["--seeds", "0", "fifty"]
