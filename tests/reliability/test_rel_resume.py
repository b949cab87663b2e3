"""Exact resume after SIGKILL, and fallback from a torn checkpoint.

The experiment is PR-FL on digits / mlp with 10 clients, with the recovery monitor firing often
(interval 5, patience 3), the reference's minimum rule and client recovery (minimums that follow
the densities), and a checkpoint every 7 rounds, so checkpoints fall on rounds where the policy
asks for evaluations, sets window timers and rebuilds its ranking.

1. An uninterrupted ``prfl run`` (in process, through the CLI) is the reference.
2. The same ``prfl run`` as a subprocess is killed with SIGKILL after a random delay once its
   first checkpoint exists, then continued with ``prfl run --resume DIR`` (another subprocess).
   Its history must equal the reference line for line and its summary field for field, apart
   from the measured wall-clock seconds.
3. A finished run directory whose ``checkpoint.pt`` is torn (and whose history holds records past
   it) resumes from ``checkpoint.prev.pt`` to the same history.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from prfl.cli import app
from prfl.config import ConfigError
from prfl.run import resume_run
from prfl.runtime.checkpoint import CheckpointError, load_checkpoint, read_checkpoint, write_checkpoint

pytestmark = pytest.mark.slow

CONFIG = """\
name: kill
seed: 3
data: {dataset: digits, num_clients: 10, partition: iid}
model: {name: mlp, options: {hidden: [32]}}
train: {lr: 0.1, batch_size: 20, local_steps: 5}
fleet: {preset: lognormal}
policy: {name: prfl, options: {interval: 5, patience: 3, window: 0.5, delta_rho: 0.1, minimum_rule: follow,
                                client_recovery: density}}
sim:
  executor: inline
  max_rounds: 290
  eval_every_rounds: 10
  checkpoint_every_rounds: 7
"""
POLICY = "prfl"
WALL_FIELDS = ("wall_seconds", "train_seconds")  # measured, so allowed to differ


def without_wall(summary: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in summary.items() if k not in WALL_FIELDS and k != "history"}


def history_lines(run_dir: Path) -> list[str]:
    return (run_dir / "history.jsonl").read_text(encoding="utf-8").splitlines()


def assert_same_run(run_dir: Path, ref_dir: Path) -> None:
    ref, got = history_lines(ref_dir), history_lines(run_dir)
    for i, (a, b) in enumerate(zip(ref, got)):
        assert a == b, f"history line {i + 1} differs:\n uninterrupted: {a}\n resumed:       {b}"
    assert len(got) == len(ref)
    full = json.loads((ref_dir / "summary.json").read_text(encoding="utf-8"))
    resumed = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    assert without_wall(resumed) == without_wall(full)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, Path]:
    """(config file, run directory) of one uninterrupted run."""
    root = tmp_path_factory.mktemp("reference")
    cfg = root / "experiment.yaml"
    cfg.write_text(CONFIG, encoding="utf-8")
    result = CliRunner().invoke(app, ["run", str(cfg), "--out", str(root / "out"), "--no-baselines", "-q"])
    assert result.exit_code == 0, f"prfl run failed:\n{result.output}\n{result.exception!r}"
    run_dir = root / "out" / POLICY
    records = [json.loads(line) for line in history_lines(run_dir)]
    kinds = {r["event"] for r in records}
    assert {"recovery", "minimums", "ranking", "checkpoint", "end"} <= kinds  # the state worth checkpointing is there
    return cfg, run_dir


def _prfl(*args: str) -> list[str]:
    return [sys.executable, "-m", "prfl", *args]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def test_sigkill_at_a_random_moment_then_resume_gives_the_uninterrupted_run(reference, tmp_path) -> None:
    cfg, ref_dir = reference
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    killed_at = None
    for attempt in range(3):  # a run that finished before the kill proves nothing: try again sooner
        root = tmp_path / f"attempt{attempt}"
        run_dir = root / POLICY
        proc = subprocess.Popen(_prfl("run", str(cfg), "--out", str(root), "--no-baselines", "-q"),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_env())
        try:
            deadline = time.monotonic() + 300
            while not (run_dir / "checkpoint.pt").exists():
                assert proc.poll() is None, f"prfl run ended before its first checkpoint: {proc.stderr.read()!r}"
                assert time.monotonic() < deadline, "no checkpoint after 300 s"
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 4.0) / (attempt + 1))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                killed_at = proc.wait(timeout=60)
                break
            proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if proc.stderr is not None:
                proc.stderr.close()
    assert killed_at == -signal.SIGKILL, f"could not kill the run while it was running (random seed {seed})"

    # what a killed run leaves behind: a checkpoint, a history possibly running past it, no summary
    assert not (run_dir / "summary.json").exists()
    state, _ = load_checkpoint(run_dir)
    assert 0 < state["policy"]["version"] < 290

    done = subprocess.run(_prfl("run", "--resume", str(run_dir), "-q"), capture_output=True, text=True, env=_env(),
                          timeout=600)
    assert done.returncode == 0, f"prfl run --resume failed (random seed {seed}):\n{done.stdout}\n{done.stderr}"
    assert_same_run(run_dir, ref_dir)


def test_torn_checkpoint_falls_back_to_the_previous_one(reference, tmp_path) -> None:
    _, ref_dir = reference
    run_dir = tmp_path / POLICY
    shutil.copytree(ref_dir, run_dir)
    (run_dir / "summary.json").unlink()
    last = read_checkpoint(run_dir / "checkpoint.pt")
    prev = read_checkpoint(run_dir / "checkpoint.prev.pt")
    assert prev["policy"]["version"] == 280 and last["policy"]["version"] == 287
    # tear the newest checkpoint as a crash in the middle of writing it in place would
    data = (run_dir / "checkpoint.pt").read_bytes()
    (run_dir / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="torn"):
        read_checkpoint(run_dir / "checkpoint.pt")
    with open(run_dir / "history.jsonl", "a", encoding="utf-8") as fh:
        fh.write('{"event":"eval","time":1e9,"rou')  # a torn last line past every checkpoint

    summary = resume_run(run_dir)
    assert summary["server_rounds"] == 290
    assert_same_run(run_dir, ref_dir)


def test_corrupted_checkpoints_are_detected_and_named(reference, tmp_path) -> None:
    _, ref_dir = reference
    run_dir = tmp_path / POLICY
    shutil.copytree(ref_dir, run_dir)
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        data = bytearray((run_dir / name).read_bytes())
        data[len(data) // 3] ^= 0xFF  # one flipped bit pattern in the payload
        (run_dir / name).write_bytes(bytes(data))
        with pytest.raises(CheckpointError, match="checksum mismatch"):
            read_checkpoint(run_dir / name)
    with pytest.raises(ConfigError, match=r"no usable checkpoint.*checkpoint\.pt.*checkpoint\.prev\.pt"):
        resume_run(run_dir)


def test_checkpoint_files_rotate_and_a_kill_between_the_renames_leaves_prev(tmp_path) -> None:
    base = {"policy": {"version": 1}, "history_offset": 10, "now": 1.0}
    write_checkpoint(base, tmp_path)
    assert not (tmp_path / "checkpoint.prev.pt").exists()
    write_checkpoint({**base, "policy": {"version": 2}, "history_offset": 20}, tmp_path)
    assert read_checkpoint(tmp_path / "checkpoint.prev.pt")["policy"]["version"] == 1
    state, used = load_checkpoint(tmp_path)
    assert used.name == "checkpoint.pt" and state["policy"]["version"] == 2
    # a history shorter than the newest checkpoint expects: the previous one fits it
    state, used = load_checkpoint(tmp_path, history_size=15)
    assert used.name == "checkpoint.prev.pt" and state["history_offset"] == 10
    # killed after checkpoint.pt became checkpoint.prev.pt, before the new file was renamed
    (tmp_path / "checkpoint.pt").unlink()
    state, used = load_checkpoint(tmp_path)
    assert used.name == "checkpoint.prev.pt"
    (tmp_path / "checkpoint.prev.pt").unlink()
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        load_checkpoint(tmp_path)


def test_checkpoints_are_written_and_read_without_a_copy_of_the_file_in_memory(tmp_path) -> None:
    """A checkpoint of a large state is streamed to its file and hashed and loaded from there:
    neither side holds the whole payload as Python bytes (what an in-memory copy would cost)."""
    import tracemalloc

    import torch

    weights = torch.randn(8_000_000)  # 32 MB
    state = {"policy": {"version": 3, "weights": weights}, "history_offset": 0, "now": 2.0}
    tracemalloc.start()
    try:
        write_checkpoint(state, tmp_path)
        _, written = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        back = read_checkpoint(tmp_path / "checkpoint.pt")
        _, read = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert torch.equal(back["policy"]["weights"], weights)
    assert (tmp_path / "checkpoint.pt").stat().st_size > 24_000_000  # at least the low 3 bytes of every value
    assert written < 8 * 2**20 and read < 8 * 2**20, (written, read)
