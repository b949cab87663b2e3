"""A Flower run's folder: never an earlier run overwritten, the simulator's layout, wall seconds in
the report, and every documented run-config key declared by the example app and overridable."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("flwr", reason="Flower is not installed: pip install 'prfl[flower]' to run the Flower tests")

from flower_fakegrid import FakeGrid
from flower_support import EXAMPLE_APP, SMALL_RUN
from flwr.common.config import flatten_dict, fuse_dicts, parse_config_args

from prfl.config import ConfigError
from prfl.flower.client_app import make_client_app
from prfl.flower.server_app import run_server
from prfl.flower.settings import DRIVER_KEYS, app_settings
from prfl.report.html import write_report

ROOT = Path(__file__).resolve().parents[2]
FAST = {"reply-timeout": 5.0, "wait-for-nodes": 2.0, "poll-interval": 0.01, "discover-interval": 0.05,
        "probe-interval": 0.05, "idle-timeout": 5.0, "prfl.sim.max_rounds": 3, "prfl.sim.eval_every_rounds": 1}


def serve(run_config: dict[str, Any]) -> dict[str, Any]:
    rc = {**SMALL_RUN, **FAST, **run_config}
    grid = FakeGrid(make_client_app(), rc, [{"partition-id": i, "num-partitions": 3} for i in range(3)])
    return run_server(grid, rc)


def test_an_earlier_run_is_never_overwritten(tmp_path: Path) -> None:
    out = tmp_path / "run"
    serve({"out-dir": str(out)})
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(ConfigError, match="already holds a run.*overwrite = true"):
        serve({"out-dir": str(out), "prfl.seed": 1})
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    serve({"out-dir": str(out), "prfl.seed": 1, "overwrite": True})  # asked for: replaced
    assert (out / "config.yaml").read_bytes() != before["config.yaml"]


def test_the_default_folder_is_new_for_every_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    serve({"out-dir": ""})
    serve({"out-dir": ""})
    runs = sorted((tmp_path / "home" / "prfl-runs" / "flower").iterdir())
    assert len(runs) == 2 and all(re.fullmatch(r"experiment-\d{8}-\d{6}(-\d+)?", p.name) for p in runs), runs
    assert all((p / "summary.json").is_file() for p in runs)
    assert [p for p in tmp_path.iterdir() if p.name != "home"] == []  # nothing in the working directory
    with pytest.raises(ConfigError, match="resume = true needs out-dir"):
        serve({"out-dir": "", "resume": True})


def test_the_run_folder_has_the_simulators_layout_and_reports_wall_seconds(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from prfl.cli import app

    out = tmp_path / "flower"
    serve({"out-dir": str(out), "checkpoint-every-rounds": 0})
    sim = tmp_path / "sim"
    cfg = tmp_path / "sim.yaml"
    cfg.write_text("data: {dataset: digits, num_clients: 3}\nmodel: {name: mlp, options: {hidden: [32]}}\n"
                   "fleet: {preset: uniform}\npolicy: {name: prfl}\n"
                   "sim: {max_rounds: 3, eval_every_rounds: 1, checkpoint_every_rounds: null}\n", encoding="utf-8")
    result = CliRunner().invoke(app, ["run", str(cfg), "--out", str(sim), "--no-baselines", "-q"])
    assert result.exit_code == 0, result.output
    # the round-time split (download, link wait, compute, upload) comes from the simulator's clock;
    # a Flower run's arrival records do not carry it, so only the simulator draws round_time.*
    sim_only = {"round_time.png", "round_time.svg"}
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in (sim / "prfl").iterdir()
                                                           if p.name not in sim_only)
    page = write_report(out).read_text(encoding="utf-8")
    assert "Times are wall-clock seconds" in page and "<th>wall s</th>" in page
    assert "virtual" not in page.split('<h2 id="config">')[0]
    sim_page = write_report(sim / "prfl").read_text(encoding="utf-8")
    assert "Times are virtual seconds" in sim_page


def documented_run_configs() -> list[str]:
    """Every `--run-config '...'` argument written in the docs and the example's README."""
    found = []
    for doc in ("README.md", "docs/FLOWER.md", "examples/flower/README.md"):
        text = (ROOT / doc).read_text(encoding="utf-8")
        found += re.findall(r"--run-config\s+'([^']*)'", text)
    return found


def test_every_documented_run_config_key_is_declared_and_overridable() -> None:
    declared = flatten_dict(tomllib.loads((EXAMPLE_APP / "pyproject.toml").read_text(encoding="utf-8"))
                            ["tool"]["flwr"]["app"]["config"])
    assert set(DRIVER_KEYS) <= set(declared)
    docs = documented_run_configs()
    assert len(docs) >= 4 and any("prfl.sim.max_time" in d for d in docs), docs
    for arg in docs:
        overrides = parse_config_args([arg])
        fused = fuse_dicts(declared, overrides)  # what Flower does: an undeclared key is an error
        settings = app_settings(fused)
        for key, value in overrides.items():
            if key == "prfl.sim.max_time":
                assert settings.experiment.sim.max_time == float(value)
    # the driver keys' table in docs/FLOWER.md lists every key
    table = (ROOT / "docs" / "FLOWER.md").read_text(encoding="utf-8")
    for key in DRIVER_KEYS:
        assert f"| `{key}` |" in table, key
