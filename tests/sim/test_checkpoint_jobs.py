"""Checkpoints of the simulator: in-flight tasks are saved as their jobs (nothing is trained to take
a checkpoint), their start values once per model version and mask, and a run killed after a
checkpoint resumes to the uninterrupted history on either executor (the process pool's jobs are
packed when saved and go back to the pool packed).

The experiment: PR-FL on digits / mlp with 6 clients under density rule B, so tasks carry masks
(their jobs are packed) and several tasks share a start model; a checkpoint every 8 rounds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from prfl.runtime.checkpoint import Streamed, read_checkpoint
from prfl.config import ConfigError, load_config
from prfl.run import build_scenario, resume_run, run_policy
from prfl.sim.executors import InlineExecutor, TrainJob, make_executor

BASE = [
    "data.dataset=digits", "data.num_clients=6", "data.partition=iid", "model.name=mlp", "model.options={hidden: [32]}",
    "train.lr=0.1", "train.local_steps=5", "fleet.preset=lognormal", "policy.name=prfl",
    "policy.options={interval: 4, density_rule: B, initial_densities: [1.0, 0.6, 0.6, 0.3, 0.3, 0.1], window: 0.2}",
    "sim.max_rounds=28", "sim.eval_every_rounds=4", "sim.checkpoint_every_rounds=8", "seed=5",
]
WALL_FIELDS = ("wall_seconds", "train_seconds", "history")


class Killed(Exception):
    """Stands in for the process being killed."""


def _lines(run_dir: Path) -> list[str]:
    return (run_dir / "history.jsonl").read_text(encoding="utf-8").splitlines()


def _stored_as(path: Path) -> dict[str, str]:
    """How each float tensor of a checkpoint is stored ("values" of its table row), by its path in
    the state (the first path that refers to it)."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    begin, end = json.loads(data[8 : 8 + n])["prfl.state"]["data_offsets"]
    doc = json.loads(data[8 + n + begin : 8 + n + end])
    out: dict[str, str] = {}

    def walk(x: Any, where: str) -> None:
        if isinstance(x, dict) and len(x) == 1 and ("$t" in x or "$s" in x):
            row = doc["tensors"][x.get("$t", x.get("$s"))]
            out.setdefault(where, str(row.get("values", "plain")))
        elif isinstance(x, dict) and "$dict" in x:
            for k, v in x["$dict"]:
                walk(v, f"{where}/{k}")
        elif isinstance(x, dict):
            for k, v in x.items():
                walk(v, f"{where}/{k}" if where else k)

    walk(doc["state"], "")
    return out


def _strip(summary: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in summary.items() if k not in WALL_FIELDS}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference")
    run_policy(build_scenario(load_config(overrides=[*BASE, "sim.executor=inline"])), out_dir=out)
    return out


@pytest.mark.parametrize("executor", ["inline", "inline-spill", "process"])
def test_a_killed_run_resumes_to_the_uninterrupted_history(reference: Path, tmp_path: Path, executor: str) -> None:
    extra = {"inline": ["sim.executor=inline"], "inline-spill": ["sim.executor=inline", f"sim.spill_dir={tmp_path / 'spill'}"],
             "process": ["sim.executor=process", "sim.workers=2"]}[executor]
    out = tmp_path / "run"

    def kill(rec: dict[str, Any]) -> None:
        if rec["round"] >= 20:  # the last checkpoint was at round 16
            raise Killed

    with pytest.raises(Killed):
        run_policy(build_scenario(load_config(overrides=[*BASE, *extra])), out_dir=out, on_progress=kill)
    state = read_checkpoint(out / "checkpoint.pt")
    assert state["policy"]["version"] == 16
    inflight = state["inflight"]
    # every task in flight is saved as its job, with its start values streamed from the executor
    assert inflight and all("job" in d and "output" not in d for d in inflight.values())
    assert all(isinstance(d["job"]["start"], Streamed) for d in inflight.values())
    masked = [d for d in inflight.values() if d["spec"].mask is not None]
    assert masked
    if executor == "inline":  # whole start vectors, held by reference while they fit FULL_START_BYTES
        assert not any(d["job"]["packed"] for d in masked)
    else:  # values at the mask only
        assert all(d["job"]["packed"] for d in masked)
    # The starts (older versions of the model) and the buffered models are stored as their
    # difference from the model; the ranking as the scores it was built from and its floor.
    stored = _stored_as(out / "checkpoint.pt")
    assert all(stored[f"inflight/{tid}/job/start"].startswith("delta:") for tid in inflight)
    slots = [k for k in stored if k.startswith("policy/buffer/slot.") and k.endswith(".values")]
    assert slots and all(stored[k].startswith("delta:") for k in slots)
    assert stored["policy/weights"] in ("plain", "hi-zlib") and state["policy"]["ranking_order"] is None
    summary = resume_run(out)
    ref = _lines(reference)
    got = _lines(out)
    for i, (a, b) in enumerate(zip(ref, got)):
        assert a == b, f"history line {i + 1} differs:\n uninterrupted: {a}\n resumed:       {b}"
    assert len(got) == len(ref)
    full = json.loads((reference / "summary.json").read_text(encoding="utf-8"))
    assert _strip(summary) == _strip(full) and summary["server_rounds"] == 28


def test_taking_a_checkpoint_trains_nothing(tmp_path: Path, monkeypatch) -> None:
    trained: list[int] = []
    original = InlineExecutor.submit

    def counting_submit(self: InlineExecutor, job: TrainJob):
        fut = original(self, job)
        inner = fut._fn

        def run():
            trained.append(job.task_id)
            return inner()

        fut._fn = run
        return fut

    monkeypatch.setattr(InlineExecutor, "submit", counting_submit)
    from prfl.sim import engine

    at_checkpoint: list[tuple[int, int, set[int]]] = []
    save = engine.Simulation.save_checkpoint

    def watched(sim: engine.Simulation) -> Path:
        before = len(trained)
        path = save(sim)
        at_checkpoint.append((before, len(trained), set(sim.inflight)))
        return path

    monkeypatch.setattr(engine.Simulation, "save_checkpoint", watched)
    run_policy(build_scenario(load_config(overrides=[*BASE, "sim.executor=inline", "sim.max_rounds=17"])), out_dir=tmp_path)
    assert [a == b for a, b, _ in at_checkpoint] == [True, True]  # rounds 8 and 16: no task trained to save it
    assert all(inflight for _, _, inflight in at_checkpoint)


def test_jobs_from_one_model_and_mask_share_their_start_values(tmp_path: Path) -> None:
    sc = build_scenario(load_config(overrides=[*BASE, "sim.executor=inline"]))
    ex = make_executor("inline", sc.worker_spec, dataset=sc.dataset, spill_dir=tmp_path / "spill")
    npr = sc.layout.num_prunable
    w = sc.initial_weights.clone()
    masks = [torch.rand(npr, generator=torch.Generator().manual_seed(k)) < 0.3 for k in range(2)]
    futures = [ex.submit(TrainJob(task_id=t, client=t % 6, weights=w, indices=sc.partition.client_indices[t % 6],
                                  seed=t, mask=masks[t % 2])) for t in range(6)]
    own = [d for d in (tmp_path / "spill").iterdir()]
    assert len(own) == 1 and len(list(own[0].iterdir())) == 2  # one file per (weights, mask), not per job
    sources = [f.job_source for f in futures]
    assert len({s.key for s in sources}) == 2
    assert sources[0].values().numel() == int(masks[0].sum()) + w.numel() - npr  # packed
    for f in futures[:3]:
        f.result()
    futures[3].cancel()
    assert len(list(own[0].iterdir())) == 2  # still waited for by tasks 4 and 5
    futures[4].result()
    futures[5].result()
    assert list(own[0].iterdir()) == []
    ex.close()
    assert not own[0].exists()


def test_inline_jobs_keep_whole_start_vectors_within_their_budget(monkeypatch) -> None:
    """Without a spill directory, masked jobs keep their start vector itself (shared by every
    mask, no copy) while the vectors held fit FULL_START_BYTES; beyond that they are packed.
    Training from either gives the same weights, and a start edited in place is refused."""
    from prfl.sim import executors

    sc = build_scenario(load_config(overrides=[*BASE, "sim.executor=inline"]))
    npr = sc.layout.num_prunable
    w = sc.initial_weights.clone()
    monkeypatch.setattr(executors, "FULL_START_BYTES", w.numel() * w.element_size())  # room for one vector
    ex = make_executor("inline", sc.worker_spec, dataset=sc.dataset)
    masks = [torch.rand(npr, generator=torch.Generator().manual_seed(k)) < 0.3 for k in range(2)]

    def job(t: int, weights: torch.Tensor) -> TrainJob:
        return TrainJob(task_id=t, client=t % 6, weights=weights, indices=sc.partition.client_indices[t % 6],
                        seed=t, mask=masks[t % 2])

    whole = [ex.submit(job(t, w)) for t in range(4)]
    sources = [f.job_source for f in whole]
    assert len({s.key for s in sources}) == 1 and sources[0].values() is w  # one start for both masks, no copy
    assert not any(s.job.packed for s in sources)
    w2 = w.clone()
    over = ex.submit(job(0, w2))  # a second vector would exceed the budget: packed
    assert over.job_source.job.packed and over.job_source.values().numel() == int(masks[0].sum()) + w.numel() - npr
    assert torch.equal(over.result().weights, whole[0].result().weights)  # same start values, same training
    for f in whole[1:]:
        f.result()
    w3 = w.clone()
    later = ex.submit(job(1, w3))  # the first vector's jobs are done: room again
    assert not later.job_source.job.packed
    w3.add_(1.0)
    with pytest.raises(RuntimeError, match="changed in place"):
        later.result()
    ex.close()


def test_a_checkpoint_stores_a_shared_start_once(tmp_path: Path) -> None:
    """Tasks started from one model under one mask: their start values are in the file once."""
    out = tmp_path / "run"
    overrides = [*BASE, "sim.executor=inline", "sim.max_rounds=9", "sim.checkpoint_every_rounds=1",
                 "policy.options={interval: 50, density_rule: B, initial_densities: 0.5, window: 0.0}"]
    run_policy(build_scenario(load_config(overrides=overrides)), out_dir=out)
    first = read_checkpoint(out / "checkpoint.prev.pt")
    starts = {id(d["job"]["start"]) for d in first["inflight"].values()}  # one Streamed per stored tensor
    assert len(first["inflight"]) > len(starts) >= 1  # tasks started from one model and mask share one copy


def test_width_sliced_start_models_are_stored_as_they_are(tmp_path: Path, caplog) -> None:
    """HeteroFL's width form starts tasks from narrower sub-networks, which do not line up with the
    model: their start values are stored as they are, without a warning (full-width ones as deltas)."""
    overrides = [*BASE[:8], "policy.name=heterofl", "policy.options={mode: width}", "sim.max_rounds=6",
                 "sim.eval_every_rounds=3", "sim.checkpoint_every_rounds=2", "seed=5", "sim.executor=inline"]
    out = tmp_path / "run"
    with caplog.at_level("WARNING", logger="prfl.runtime.checkpoint"):
        run_policy(build_scenario(load_config(overrides=overrides)), out_dir=out)
    assert "without its delta" not in caplog.text
    stored = _stored_as(out / "checkpoint.pt")
    starts = {k: v for k, v in stored.items() if k.endswith("/job/start")}
    assert any(not v.startswith("delta:") for v in starts.values())  # the narrow ones, as they are


def test_a_finished_run_taken_on_to_a_later_time_is_the_longer_run(tmp_path: Path) -> None:
    """resume_run(max_time=...) continues a finished run from its last checkpoint to the new end:
    the same history and summary as a run to that time from the start; the config records it."""
    by_time = [o for o in BASE if not o.startswith("sim.max_rounds")] + ["sim.max_rounds=null"]
    short, longer = tmp_path / "short", tmp_path / "longer"
    first = run_policy(build_scenario(load_config(overrides=[*by_time, "sim.max_time=20"])), out_dir=short)
    full = run_policy(build_scenario(load_config(overrides=[*by_time, "sim.max_time=40"])), out_dir=longer)
    assert first["virtual_seconds"] == 20 and first["server_rounds"] < full["server_rounds"]
    with pytest.raises(ConfigError, match="would end it sooner"):
        resume_run(short, max_time=10)
    assert load_config(short / "config.yaml").sim.max_time == 20  # a refused extension changes nothing
    extended = resume_run(short, max_time=40)
    assert load_config(short / "config.yaml").sim.max_time == 40
    assert _lines(short) == _lines(longer)
    assert _strip(extended) == _strip(full)
    saved = json.loads((short / "summary.json").read_text(encoding="utf-8"))
    assert saved["server_rounds"] == full["server_rounds"]
