"""End to end: ``prfl run`` on digits through the CLI, the run directory it writes, and resuming a
run that was killed after a checkpoint.

How the crash is simulated: the same experiment is run a second time through
:func:`prfl.run.run_policy` with an ``on_progress`` callback that raises at the evaluation of round
100. Checkpoints are taken every 30 rounds, so the run dies 10 rounds after its checkpoint at
round 90, exactly as a killed process would: ``checkpoint.pt`` holds round 90, ``history.jsonl``
already holds records past it (which the resume must cut away) and there is no ``summary.json``.
:func:`prfl.run.resume_run` then continues from the checkpoint, and everything it writes must match
the uninterrupted CLI run (apart from measured wall-clock seconds).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from prfl.checkpoint import read_checkpoint
from prfl.cli import app
from prfl.config import load_config
from prfl.run import build_scenario, resume_run, run_policy
from prfl.sim.history import read_history

CONFIG = """\
name: e2e
seed: 1
data: {dataset: digits, num_clients: 8, partition: iid}
model: {name: mlp, options: {hidden: [32]}}
train: {lr: 0.1, batch_size: 20, local_steps: 5}
fleet: {preset: lognormal}
policy: {name: fedasync}
sim:
  executor: inline
  max_rounds: 200
  eval_every_rounds: 20
  checkpoint_every_rounds: 30
"""
POLICY = "fedasync"
KILL_AT_ROUND = 100  # the last checkpoint before it is at round 90
WALL_FIELDS = ("wall_seconds", "train_seconds")  # measured, so allowed to differ between runs


class Killed(Exception):
    """Stands in for the process being killed."""


def without_wall(summary: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in summary.items() if k not in WALL_FIELDS and k != "history"}


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory) -> tuple[Path, Path]:
    """One uninterrupted ``prfl run CONFIG --out ROOT --no-baselines -q``; returns (config, run dir)."""
    root = tmp_path_factory.mktemp("e2e")
    cfg_path = root / "experiment.yaml"
    cfg_path.write_text(CONFIG, encoding="utf-8")
    result = CliRunner().invoke(app, ["run", str(cfg_path), "--out", str(root / "out"), "--no-baselines", "-q"])
    assert result.exit_code == 0, f"prfl run failed:\n{result.output}\n{result.exception!r}"
    assert "fedasync" in result.output
    return cfg_path, root / "out" / POLICY


def test_cli_run_writes_a_complete_run_directory(cli_run) -> None:
    cfg_path, run_dir = cli_run
    for name in ("config.yaml", "history.jsonl", "summary.json", "accuracy.png", "partition.json", "checkpoint.pt"):
        assert (run_dir / name).is_file(), f"{name} missing from {sorted(p.name for p in run_dir.iterdir())}"
    assert (run_dir / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # config.yaml is the resolved configuration: it loads back to the experiment that ran
    assert load_config(run_dir / "config.yaml") == load_config(cfg_path)

    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    assert summary["policy"] == POLICY and summary["name"] == "e2e" and summary["seed"] == 1
    assert summary["stopped"] == "reached max_rounds=200"
    assert summary["server_rounds"] == 200
    assert sum(summary["aggregated_rounds"]) == 200  # FedAsync: one client per update
    # clearly better than chance (0.1 for 10 classes)
    assert summary["final_accuracy"] > 0.5
    assert summary["best_accuracy"] >= summary["final_accuracy"]

    history = list(read_history(run_dir / "history.jsonl"))
    assert history[0]["event"] == "start" and history[-1]["event"] == "end"
    evals = [r for r in history if r["event"] == "eval"]
    assert [e["round"] for e in evals] == list(range(0, 201, 20))
    assert evals[-1]["accuracy"] == summary["final_accuracy"]
    assert max(e["accuracy"] for e in evals) == summary["best_accuracy"]
    assert evals[0]["accuracy"] < 0.3  # it did learn
    times = [r["time"] for r in history]
    assert times == sorted(times)  # virtual time never runs backwards in the history
    assert history[-1]["time"] == summary["virtual_seconds"]
    arrivals = [r for r in history if r["event"] == "arrival"]
    assert len(arrivals) == 200
    assert all(math.isfinite(r["train_loss"]) for r in arrivals)
    checkpoints = [r["round"] for r in history if r["event"] == "checkpoint"]
    assert checkpoints == [30, 60, 90, 120, 150, 180]


def test_cli_rejects_a_bad_override(cli_run, tmp_path) -> None:
    cfg_path, _ = cli_run
    result = CliRunner().invoke(
        app, ["run", str(cfg_path), "--set", "sim.executor=bogus", "--out", str(tmp_path / "x"), "-q"]
    )
    assert result.exit_code == 2
    assert "sim.executor" in result.output
    assert not (tmp_path / "x").exists()


def test_cli_run_whose_clients_are_all_quarantined_exits_3(cli_run, tmp_path) -> None:
    """A learning rate that blows every update up to inf/NaN: each client's updates are rejected,
    every client is quarantined, the run stops, and the command says so with exit code 3."""
    cfg_path, _ = cli_run
    out = tmp_path / "diverged"
    result = CliRunner().invoke(
        app, ["run", str(cfg_path), "--set", "train.lr=1e30", "--set", "sim.max_rounds=50", "--out", str(out),
              "--no-baselines", "-q"]
    )
    assert result.exit_code == 3, result.output
    assert "aborted" in result.output and "every client is quarantined" in result.output
    summary = json.loads((out / POLICY / "summary.json").read_text())
    assert summary["server_rounds"] < 50 and summary["stopped"].startswith("every client is quarantined")


@pytest.fixture(scope="module")
def resumed_run(cli_run, tmp_path_factory) -> tuple[Path, dict[str, Any]]:
    """The same experiment killed at round 100 and resumed; returns (run dir, resume summary)."""
    cfg_path, _ = cli_run
    run_dir = tmp_path_factory.mktemp("crash") / POLICY

    def kill(rec: dict[str, Any]) -> None:
        if rec["round"] >= KILL_AT_ROUND:
            raise Killed

    sc = build_scenario(load_config(cfg_path))
    with pytest.raises(Killed):
        run_policy(sc, out_dir=run_dir, on_progress=kill)
    # the state a killed run leaves behind
    assert not (run_dir / "summary.json").exists()
    state = read_checkpoint(run_dir / "checkpoint.pt")
    assert state["policy"]["version"] == 90
    written = list(read_history(run_dir / "history.jsonl"))
    assert max(r["round"] for r in written) >= KILL_AT_ROUND  # records past the checkpoint

    summary = resume_run(run_dir)
    return run_dir, summary


def test_killed_run_resumes_to_the_uninterrupted_summary(cli_run, resumed_run) -> None:
    _, full_dir = cli_run
    run_dir, summary = resumed_run
    full = json.loads((full_dir / "summary.json").read_text(encoding="utf-8"))
    resumed = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    assert without_wall(resumed) == without_wall(full)
    assert without_wall(summary) == without_wall(full)
    assert resumed["server_rounds"] == 200
    assert (run_dir / "accuracy.png").is_file()


def test_killed_run_resumes_to_the_uninterrupted_evaluations_and_arrivals(cli_run, resumed_run) -> None:
    _, full_dir = cli_run
    run_dir, _ = resumed_run
    full = list(read_history(full_dir / "history.jsonl"))
    resumed = list(read_history(run_dir / "history.jsonl"))
    for kind in ("eval", "arrival", "server_update", "end"):
        assert [r for r in resumed if r["event"] == kind] == [r for r in full if r["event"] == kind], kind


def test_killed_run_resumes_to_the_uninterrupted_history(cli_run, resumed_run) -> None:
    """The whole history file of the resumed run is the uninterrupted run's, record for record."""
    _, full_dir = cli_run
    run_dir, _ = resumed_run
    full = (full_dir / "history.jsonl").read_text(encoding="utf-8").splitlines()
    resumed = (run_dir / "history.jsonl").read_text(encoding="utf-8").splitlines()
    for i, (a, b) in enumerate(zip(full, resumed)):
        assert a == b, f"history line {i + 1} differs:\n uninterrupted: {a}\n resumed:       {b}"
    assert len(resumed) == len(full)
