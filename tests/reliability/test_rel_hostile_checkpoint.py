"""A run directory received from someone else cannot run code: ``prfl run --resume DIR`` (and the
Flower server's resume, in tests/flower/test_resume_hostile.py) refuses a pickle checkpoint with
a one-line error naming the file and what to do, and the pickle's payload never runs.

The crafted checkpoint is what an attacker would write: a ``torch.save`` pickle that creates a
marker file when unpickled, with the trailer of the old checkpoint format and a correct checksum
(whoever crafts the file writes the checksum too).
"""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from prfl.cli import app

CONFIG = """\
name: hostile
seed: 0
data: {dataset: digits, num_clients: 4, partition: iid}
model: {name: mlp, options: {hidden: [16]}}
train: {lr: 0.1, batch_size: 20, local_steps: 2}
fleet: {preset: lognormal}
policy: {name: fedasync}
sim: {executor: inline, max_rounds: 6, eval_every_rounds: 3, checkpoint_every_rounds: 2}
"""


class Marker:
    """Unpickling this calls open(path, "w"): it creates the marker file."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def crafted_checkpoint(marker: Path) -> bytes:
    buf = io.BytesIO()
    torch.save({"policy": {"version": 1, "payload": Marker(marker)}, "history_offset": 0, "now": 0.0}, buf)
    data = buf.getvalue()
    return data + b"PRFLCKP1" + len(data).to_bytes(8, "little") + hashlib.sha256(data).digest()


@pytest.fixture()
def hostile_run_dir(tmp_path: Path) -> tuple[Path, Path]:
    """A real run directory whose checkpoints were replaced by crafted pickles: (run dir, marker)."""
    cfg = tmp_path / "experiment.yaml"
    cfg.write_text(CONFIG, encoding="utf-8")
    result = CliRunner().invoke(app, ["run", str(cfg), "--out", str(tmp_path / "out"), "--no-baselines", "-q"])
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "out" / "fedasync"
    (run_dir / "summary.json").unlink()  # as a killed run leaves it
    marker = tmp_path / "marker"
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        assert (run_dir / name).is_file()
        (run_dir / name).write_bytes(crafted_checkpoint(marker))
    return run_dir, marker


def test_prfl_run_resume_refuses_a_pickle_and_runs_none_of_it(hostile_run_dir) -> None:
    run_dir, marker = hostile_run_dir
    result = CliRunner().invoke(app, ["run", "--resume", str(run_dir), "-q"])
    assert result.exit_code != 0 and not marker.exists()
    error = [line for line in result.output.splitlines() if line.strip()]
    assert len(error) == 1, result.output  # one line...
    assert str(run_dir / "checkpoint.pt") in result.output.replace("\n", "")  # ...naming the file...
    assert "pickle" in result.output and "prfl run" in result.output  # ...and what to do
    assert not (run_dir / "summary.json").exists()


def test_the_same_in_a_fresh_process(hostile_run_dir) -> None:
    """As a user would run it; the payload would create the marker if anything unpickled it."""
    run_dir, marker = hostile_run_dir
    done = subprocess.run([sys.executable, "-m", "prfl", "run", "--resume", str(run_dir), "-q"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and not marker.exists()
    assert "pickle" in done.stderr + done.stdout and "Traceback" not in done.stderr
    # the crafted file is not inert: unpickling it does create the marker
    torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert marker.exists()


def test_a_pickle_beside_a_good_checkpoint_is_never_read(tmp_path: Path) -> None:
    """A good checkpoint.pt is used; a crafted checkpoint.prev.pt is left alone."""
    cfg = tmp_path / "experiment.yaml"
    cfg.write_text(CONFIG, encoding="utf-8")
    assert CliRunner().invoke(app, ["run", str(cfg), "--out", str(tmp_path / "out"), "--no-baselines", "-q"]).exit_code == 0
    run_dir = tmp_path / "out" / "fedasync"
    summary = json.loads((run_dir / "summary.json").read_text())
    (run_dir / "summary.json").unlink()
    marker = tmp_path / "marker"
    (run_dir / "checkpoint.prev.pt").write_bytes(crafted_checkpoint(marker))
    result = CliRunner().invoke(app, ["run", "--resume", str(run_dir), "-q"])
    assert result.exit_code == 0, result.output
    assert not marker.exists()
    assert json.loads((run_dir / "summary.json").read_text())["server_rounds"] == summary["server_rounds"]
