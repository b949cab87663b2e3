"""A run's outcome is fixed by its config: the executor that trains does not change a bit of it.

* The inline executor and a pool of two worker processes give identical histories (every record,
  every float), identical summaries (apart from measured wall-clock seconds) and identical final
  global weights, for an asynchronous (FedAsync) and a synchronous (FedAvg) policy.
* FedAvg with a single client that holds all the data is plain mini-batch SGD: after R rounds the
  global weights equal R * local_steps steps of ``torch.optim.SGD`` on the same batch sequence.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from prfl.client.trainer import TrainOutput, batch_schedule
from prfl.config import load_config
from prfl.models import build_model
from prfl.params import ParamLayout
from prfl.run import Scenario, build_scenario, make_policy, make_simulation
from prfl.seeding import int_seed
from prfl.sim.executors import make_executor
from prfl.runtime.history import HistoryWriter

# Measured wall-clock quantities: the only fields of a summary allowed to differ between runs.
WALL_FIELDS = ("wall_seconds", "train_seconds")

BASE = [
    "data.dataset=digits",
    "data.num_clients=4",
    "model.name=mlp",
    "model.options={hidden: [32]}",
    "train.lr=0.1",
    "train.local_steps=5",
    "fleet.preset=lognormal",  # heterogeneous clients, per-task speed draws (sigma 0.3)
    "sim.max_rounds=30",
    "sim.eval_every_rounds=5",
    "seed=3",
]


def config(*extra: str):
    return load_config(overrides=[*BASE, *extra])


def run_with(sc: Scenario, executor: Any) -> tuple[list[dict[str, Any]], torch.Tensor, dict[str, Any]]:
    """Run the scenario's policy on ``executor``; return history records, final weights, summary."""
    history = HistoryWriter(None)
    sim = make_simulation(sc, make_policy(sc, sc.cfg.policy), None, history, executor)
    summary = sim.run()
    return history.records, sim.policy.weights.clone(), summary


@pytest.fixture(scope="module")
def process_executor():
    """One pool of two spawned workers, shared by both policies (their WorkerSpec is the same).
    The workers map the caller's training data, as in ``prfl run``."""
    sc = build_scenario(config())
    ex = make_executor("process", sc.worker_spec, workers=2, dataset=sc.dataset)
    yield ex, sc.worker_spec
    ex.close()


@pytest.mark.parametrize("policy, accounting", [("fedasync", "honest"), ("fedavg", "honest"), ("fedasync", "reference")])
def test_inline_and_process_executors_agree_bit_for_bit(policy: str, accounting: str, process_executor) -> None:
    acc = f"sim.accounting={accounting}"
    sc_inline = build_scenario(config(f"policy.name={policy}", "sim.executor=inline", acc))
    sc_proc = build_scenario(config(f"policy.name={policy}", "sim.executor=process", "sim.workers=2", acc))
    pool, pool_spec = process_executor
    # neither the executor choice nor the policy enters what the workers build
    assert sc_proc.worker_spec == sc_inline.worker_spec == pool_spec

    inline = make_executor("inline", sc_inline.worker_spec, dataset=sc_inline.dataset)
    rec_a, w_a, sum_a = run_with(sc_inline, inline)
    rec_b, w_b, sum_b = run_with(sc_proc, pool)

    assert sum_a["server_rounds"] == 30 and sum_a["stopped"] == "reached max_rounds=30"
    arrivals = [r for r in rec_a if r["event"] == "arrival"]
    assert len(arrivals) >= 30
    if accounting == "reference":  # one arrival per server step; results wait for theirs, so go stale
        updates = [r for r in rec_a if r["event"] == "server_update"]
        assert all(len(r["clients"]) == 1 for r in updates) and any(r["staleness"][0] > 0 for r in updates)
        assert {r["bytes_down"] for r in arrivals} == {20 * 2368 + 4 * 42}  # hidden 32: N = 2,368, M = 42
    elif policy == "fedasync":  # the scenario really is asynchronous: some results are stale
        assert any(r["staleness"] > 0 for r in arrivals)

    # Every history record is equal, floats included (times, train_loss, FLOP-based compute,
    # accuracies). Compare record by record for a readable failure, then as a whole.
    assert len(rec_a) == len(rec_b)
    for i, (a, b) in enumerate(zip(rec_a, rec_b)):
        assert a == b, f"history record {i} differs:\n inline:  {a}\n process: {b}"
    assert torch.equal(w_a, w_b)
    strip = lambda s: {k: v for k, v in s.items() if k not in WALL_FIELDS}  # noqa: E731
    assert strip(sum_a) == strip(sum_b)
    # and the histories are not trivially equal: training happened and the model learned
    evals = [r for r in rec_a if r["event"] == "eval"]
    assert evals[-1]["accuracy"] > evals[0]["accuracy"] + 0.1


def test_history_depends_on_the_seed() -> None:
    """Guard against a vacuous comparison: another seed gives another history."""
    sc0 = build_scenario(config("policy.name=fedasync", "sim.max_rounds=8"))
    sc1 = build_scenario(config("policy.name=fedasync", "sim.max_rounds=8", "seed=4"))
    rec0, w0, _ = run_with(sc0, make_executor("inline", sc0.worker_spec, dataset=sc0.dataset))
    rec1, w1, _ = run_with(sc1, make_executor("inline", sc1.worker_spec, dataset=sc1.dataset))
    assert rec0 != rec1
    assert not torch.equal(w0, w1)


def test_fedavg_with_one_client_is_plain_sgd() -> None:
    rounds = 8
    cfg = load_config(
        overrides=[
            "data.dataset=digits",
            "data.num_clients=1",
            "model.name=mlp",
            "model.options={hidden: [32]}",
            "train.lr=0.1",
            "train.batch_size=20",
            "train.local_steps=5",
            "fleet.preset=uniform",
            "policy.name=fedavg",
            f"sim.max_rounds={rounds}",
            "sim.eval_every_rounds=null",
            "seed=5",
        ]
    )
    sc = build_scenario(cfg)
    sim = make_simulation(sc, make_policy(sc, cfg.policy), None, HistoryWriter(None),
                          make_executor("inline", sc.worker_spec, dataset=sc.dataset))
    summary = sim.run()
    assert summary["server_rounds"] == rounds
    assert summary["local_rounds"] == [rounds]

    # The reference: one torch model, torch.optim.SGD, the same batches in the same order.
    # FedAvg's round r is task r on client 0, seeded at address (run seed, "train", 0, r).
    model = build_model("mlp", sc.dataset.input_shape, sc.dataset.num_classes, hidden=[32])
    layout = ParamLayout(model)
    layout.load(model, sc.initial_weights)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.train.lr)
    indices = torch.as_tensor(sc.partition.client_indices[0], dtype=torch.int64)
    assert len(indices) == len(sc.dataset.y_train)  # the one client holds all the data
    x = torch.as_tensor(sc.dataset.x_train)
    y = torch.as_tensor(sc.dataset.y_train, dtype=torch.int64)
    model.train()
    steps = 0
    for task_id in range(rounds):
        seed = int_seed(cfg.seed, "train", 0, task_id)
        for pos in batch_schedule(len(indices), sc.train_cfg, seed):
            sel = indices[torch.from_numpy(pos)]
            opt.zero_grad()
            F.cross_entropy(model(x[sel]), y[sel]).backward()
            opt.step()
            steps += 1
    assert steps == rounds * cfg.train.local_steps
    expected = layout.flatten(model)

    got = sim.policy.weights
    assert not torch.equal(got, sc.initial_weights)
    max_diff = float((got - expected).abs().max())
    assert torch.equal(got, expected), f"FedAvg(1 client) differs from SGD by up to {max_diff:g}"


def test_ray_executor_agrees_with_inline_bit_for_bit() -> None:
    pytest.importorskip("ray", reason="Ray is installed with the flower extra (pip install 'prfl[flower]')")
    sc = build_scenario(config("policy.name=prfl", "policy.options={interval: 5, window: 0.0}"))
    inline = make_executor("inline", sc.worker_spec, dataset=sc.dataset)
    rec_a, w_a, _ = run_with(sc, inline)
    ray_ex = make_executor("ray", sc.worker_spec, workers=2)
    try:
        rec_b, w_b, _ = run_with(sc, ray_ex)
    finally:
        ray_ex.close()
    assert rec_a == rec_b
    assert torch.equal(w_a, w_b)
    assert any(r["event"] == "densities" for r in rec_a)  # PR-FL's density control really ran


def test_process_pool_captures_the_job_when_it_is_submitted(process_executor) -> None:
    """The pool must not read a job's tensors after ``submit`` returns: the caller may go on
    using (or reusing) their memory. Overwriting the start weights right after submitting
    leaves the result equal to the inline executor's."""
    pool, spec = process_executor
    sc = build_scenario(config())
    from prfl.sim.executors import TrainJob

    jobs = [TrainJob(task_id=k, client=k % 4, weights=sc.initial_weights.clone(),
                     indices=sc.partition.client_indices[k % 4], seed=100 + k) for k in range(6)]
    inline = make_executor("inline", spec, dataset=sc.dataset)
    expected = [inline.submit(j).result().weights for j in jobs]
    futures = []
    for j in jobs:
        futures.append(pool.submit(j))
        j.weights.fill_(float("nan"))  # the caller's buffer is reused at once
    for f, w in zip(futures, expected):
        got = f.result(timeout=120).weights
        assert torch.equal(got, w)


def test_conv_model_histories_agree_across_executors() -> None:
    """Convolutions take other kernels than the MLP: a small conv2 (quarter width) on digits."""
    extra = ("model.name=conv2", "model.options={width_mult: 0.25}", "policy.name=fedasync", "sim.max_rounds=24")
    sc = build_scenario(config(*extra))
    rec_a, w_a, _ = run_with(sc, make_executor("inline", sc.worker_spec, dataset=sc.dataset))
    pool = make_executor("process", sc.worker_spec, workers=2)
    try:
        runs = [run_with(sc, pool) for _ in range(2)]
    finally:
        pool.close()
    for rec_b, w_b, _ in runs:
        for i, (a, b) in enumerate(zip(rec_a, rec_b)):
            assert a == b, f"history record {i} differs:\n inline:  {a}\n process: {b}"
        assert len(rec_a) == len(rec_b) and torch.equal(w_a, w_b)


def test_packed_and_spilled_jobs_train_exactly_like_full_ones(tmp_path, monkeypatch) -> None:
    """A job keeps its whole start vector (by reference), only W at its mask (packed), or waits
    on disk (spill_dir): same history."""
    from prfl.sim import executors

    extra = ("policy.name=prfl", "policy.options={interval: 5, density_rule: B, initial_densities: [1.0, 0.5, 0.3, 0.1]}",
             "sim.max_rounds=20")
    sc = build_scenario(config(*extra))
    rec_a, w_a, _ = run_with(sc, make_executor("inline", sc.worker_spec, dataset=sc.dataset))
    spill = tmp_path / "spill"
    rec_b, w_b, _ = run_with(sc, make_executor("inline", sc.worker_spec, dataset=sc.dataset, spill_dir=spill))
    assert rec_a == rec_b and torch.equal(w_a, w_b)
    monkeypatch.setattr(executors, "FULL_START_BYTES", 0)  # every masked job packed, in memory
    rec_c, w_c, _ = run_with(sc, make_executor("inline", sc.worker_spec, dataset=sc.dataset))
    assert rec_a == rec_c and torch.equal(w_a, w_c)
    assert any(r["event"] == "arrival" and r["density"] < 1 for r in rec_a)  # masked jobs were packed
    assert list(spill.iterdir()) == []  # every waiting job's file is gone (trained or cancelled)

    from prfl.sim.executors import TrainJob

    w = torch.randn(sc.initial_weights.numel())
    mask = torch.rand(sc.layout.num_prunable) < 0.3
    job = TrainJob(task_id=1, client=0, weights=w, indices=sc.partition.client_indices[0], seed=1, mask=mask)
    packed = job.pack()
    assert packed.packed and packed.weights.numel() == int(mask.sum()) + w.numel() - mask.numel()
    full = packed.unpacked_weights(w.numel())
    assert torch.equal(full[: mask.numel()][mask], w[: mask.numel()][mask]) and torch.equal(full[mask.numel():], w[mask.numel():])
    assert not bool(full[: mask.numel()][~mask].any())


def test_process_pool_output_slots_change_no_bit(tmp_path) -> None:
    """Workers train into shared output slots (PR-FL's importance scores travel in slots too);
    with slots off, results travel as pickled tensors; without the caller's data set, workers
    load their own. All three give the inline history, and closing the pool removes the slots."""
    from prfl.sim.executors import ProcessPoolExecutorAdapter

    extra = ("policy.name=prfl",
             "policy.options={interval: 4, counting: server_steps, round_time: task, time_basis: dense, density_rule: B, "
             "initial_densities: [1.0, 0.5, 0.3, 0.1]}",
             "sim.max_rounds=12")
    sc = build_scenario(config(*extra))
    rec_a, w_a, _ = run_with(sc, make_executor("inline", sc.worker_spec, dataset=sc.dataset))
    for kwargs in ({"dataset": sc.dataset, "slots": True}, {"dataset": sc.dataset, "slots": False}, {"slots": True}):
        pool = ProcessPoolExecutorAdapter(sc.worker_spec, workers=2, **kwargs)
        slot_dir = pool._slot_dir
        try:
            rec_b, w_b, _ = run_with(sc, pool)
            if kwargs["slots"]:
                assert slot_dir is not None and len(os.listdir(slot_dir)) >= 2  # the workers made and used slots
        finally:
            pool.close()
        assert rec_a == rec_b and torch.equal(w_a, w_b), f"differs with {sorted(kwargs)}"
        assert slot_dir is None or not os.path.exists(slot_dir)
    assert any(r["event"] == "densities" for r in rec_a)  # importance-driven density control ran


def test_output_slots_hand_values_over_and_fall_back_when_none_is_free(tmp_path) -> None:
    """The slot protocol in one process: a worker takes a slot, the caller copies the values
    out and frees it; past its own quota with none free, a worker gets no slot and its tensor
    goes back as it is."""
    import queue as queue_mod

    from prfl.sim.executors import _OutputSlots, _SlotRef

    free: queue_mod.Queue[str] = queue_mod.Queue()
    worker = _OutputSlots(str(tmp_path), free, per_worker=2)
    worker.capacity = 10
    caller = _OutputSlots(str(tmp_path), free, per_worker=2)
    a = worker.give(torch.arange(10, dtype=torch.float32))
    b = worker.give(torch.arange(4, dtype=torch.float32) + 100)  # a smaller tensor uses a slot's prefix
    assert isinstance(a, _SlotRef) and isinstance(b, _SlotRef) and a.name != b.name
    spare = torch.ones(3)
    assert worker.give(spare) is spare  # quota reached, nothing free: no slot
    got_a = caller.receive(a)
    assert torch.equal(got_a, torch.arange(10, dtype=torch.float32))
    assert free.qsize() == 1  # a's slot is free again
    reused = worker.give(torch.full((7,), 5.0))
    assert isinstance(reused, _SlotRef) and reused.name == a.name
    assert torch.equal(got_a, torch.arange(10, dtype=torch.float32))  # the copy out is the caller's own
    assert torch.equal(caller.receive(b), torch.arange(4, dtype=torch.float32) + 100)
    assert worker.take(11) is None and free.qsize() == 1  # the free slot is too small: put back
    too_big = _OutputSlots(str(tmp_path), queue_mod.Queue(), per_worker=1)
    too_big.capacity = 10
    assert too_big.take(11) is None  # larger than any slot it may make


def test_a_collected_pool_result_is_freed_without_the_cycle_collector(tmp_path) -> None:
    """A pool future's done callback refers to the caller's future; once the result is collected
    nothing may keep the two in a cycle, or every finished task's model and start values wait for
    Python's cycle collector (a long PR-FL run piled up gigabytes that way)."""
    import gc
    import queue as queue_mod
    import weakref
    from concurrent.futures import Future

    from prfl.sim.executors import _OutputSlots, _SlotFuture

    slots = _OutputSlots(str(tmp_path), queue_mod.Queue(), per_worker=1)
    inner: Future = Future()
    outer = _SlotFuture(inner, slots)
    outer.payload = torch.zeros(1000)  # as a JobSource's start values ride on the caller's future
    seen = weakref.ref(outer)
    gc.disable()
    try:
        inner.set_result(TrainOutput(weights=torch.ones(3), num_samples=1, mean_loss=0.0, steps=1,
                                     compute_seconds=0.0, grad_sq=None))
        assert torch.equal(outer.result().weights, torch.ones(3))
        del outer, inner
        assert seen() is None  # freed by reference counting alone
    finally:
        gc.enable()


ORPHAN = """
import sys, time
from prfl.config import load_config
from prfl.run import build_scenario
from prfl.sim.executors import ProcessPoolExecutorAdapter
sc = build_scenario(load_config(overrides=sys.argv[1:]))
pool = ProcessPoolExecutorAdapter(sc.worker_spec, workers=2, dataset=sc.dataset)
print(" ".join(str(f.result()) for f in pool._started), flush=True)
time.sleep(600)
"""


def test_pool_workers_exit_when_the_process_that_started_them_is_killed() -> None:
    """SIGKILL gives the pool no chance to shut its workers down: they notice they were re-parented
    and exit (within about a second), rather than wait for jobs for ever."""
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-c", ORPHAN, *BASE], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip()  # the pool is up (one worker may still be starting)
        workers = [p for p in _children(proc.pid) if "spawn_main" in _cmdline(p)]
        assert len(workers) == 2
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(_running(p) for p in workers):
        time.sleep(0.2)
    assert not any(_running(p) for p in workers), "pool workers outlived the killed process"


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    if int(fh.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(entry))
            except (FileNotFoundError, ProcessLookupError):
                continue
    return out


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace")
    except FileNotFoundError:
        return ""


def _running(pid: int) -> bool:
    """The process exists and is not a zombie waiting to be reaped."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
