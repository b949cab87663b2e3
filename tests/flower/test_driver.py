"""The real-time driver and the apps over an in-process Grid (fast; no SuperLink, no Ray)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("flwr", reason="Flower is not installed: pip install 'prfl[flower]' to run the Flower tests")

from flower_fakegrid import FakeGrid
from flower_support import EXAMPLE_APP, SMALL_RUN, events, read_history

from prfl.config import ConfigError
from prfl.distribution import PackedIndex, prunable_piece_bytes, sparse_model_bytes
from prfl.flower import codec
from prfl.flower.client_app import make_client_app
from prfl.flower.server_app import run_server
from prfl.flower.settings import DRIVER_KEYS, app_settings
from prfl.seeding import int_seed
from prfl.sim.executors import TrainJob


def _config(extra: dict[str, Any]) -> dict[str, Any]:
    return {**SMALL_RUN, **extra}


def _run(tmp_path: Path, extra: dict[str, Any], node_configs: list[dict[str, Any]] | None = None,
         grid_hook: Any = None, latency: float = 0.0) -> tuple[dict[str, Any], list[dict[str, Any]], FakeGrid]:
    rc = {**_config(extra), "out-dir": str(tmp_path / "run"), "reply-timeout": 5.0, "wait-for-nodes": 2.0,
          "poll-interval": 0.01, "discover-interval": 0.05, "probe-interval": 0.05, "idle-timeout": 5.0, **extra}
    if node_configs is None:
        node_configs = [{"partition-id": i, "num-partitions": 3} for i in range(3)]
    grid = FakeGrid(make_client_app(), rc, node_configs, latency=latency)
    if grid_hook is not None:
        grid_hook(grid)
    summary = run_server(grid, rc)
    return summary, read_history(tmp_path / "run" / "history.jsonl"), grid


def test_prfl_bytes_match_accounting_and_accuracy_rises(tmp_path: Path) -> None:
    summary, recs, _ = _run(tmp_path, {"prfl.sim.max_rounds": 8, "prfl.sim.eval_every_rounds": 2,
                                       "policy-options.prfl.initial_densities": "[1.0, 0.6, 0.3]"})
    assert summary["server_rounds"] == 8
    evals = events(recs, "eval")
    assert evals[-1]["accuracy"] > evals[0]["accuracy"] + 0.2
    arrivals = events(recs, "arrival")
    assert {a["client"] for a in arrivals} == {0, 1, 2}
    for a in arrivals:
        assert a["bytes_down"] == a["accounted_down"] == a["received_bytes"]
        assert a["bytes_up"] == a["accounted_up"]
    assert any(a["density"] < 1 for a in arrivals)
    assert summary["client_download_bytes"] == summary["accounted_download_bytes"]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["server_rounds"] == 8


def test_node_trains_what_the_simulator_trains(tmp_path: Path) -> None:
    """The first task's result equals the simulator's executor on the same job, bit for bit."""
    captured: dict[str, Any] = {}

    def hook(grid: FakeGrid) -> None:
        original = grid.push_messages

        def push(messages):  # keep the first train message and its reply
            msgs = list(messages)
            ids = list(original(msgs))
            for m, i in zip(msgs, ids):
                if m.metadata.message_type == codec.TRAIN_TYPE and "task" not in captured:
                    captured["task"] = codec.decode_task(m.content)
                    captured["reply"] = grid.replies[i]
            return ids

        grid.push_messages = push

    _run(tmp_path, {"prfl.sim.max_rounds": 1, "prfl.policy.name": "fedasync", "prfl.policy.options": "{}"},
         grid_hook=hook)
    from prfl.config import ExperimentConfig
    from prfl.run import build_scenario

    task = captured["task"]
    cfg = app_settings(_config({"prfl.policy.name": "fedasync", "prfl.policy.options": "{}"})).experiment
    assert isinstance(cfg, ExperimentConfig)
    sc = build_scenario(cfg)
    from prfl.sim.executors import InlineExecutor

    job = TrainJob(task.task_id, task.client, sc.initial_weights, sc.partition.client_indices[task.client],
                   int_seed(cfg.seed, "train", task.client, task.task_id))
    expected = InlineExecutor(sc.worker_spec, sc.dataset).submit(job).result().weights
    got, _ = codec.result_weights(codec.decode_result(captured["reply"].content), None, expected.numel(),
                                  sc.layout.num_prunable)
    assert torch.equal(got, expected)


@pytest.mark.parametrize(
    "policy, options",
    [
        ("fedasync", "{}"),
        ("fedavg", "{}"),
        ("fedbuff", "{k: 2}"),
        ("fedfix", "{dt: 0.05}"),  # timers fire from the driver loop
        ("heterofl", "{mode: width, rates: [1.0, 0.5, 0.25]}"),
        ("heterofl", "{mode: mask, densities: [1.0, 0.5, 0.25]}"),
        ("prfl", "{interval: 2, residual_split: false}"),
        ("prfl", "{interval: 2, importance_dtype: bfloat16}"),
    ],
)
def test_any_policy_runs(tmp_path: Path, policy: str, options: str) -> None:
    summary, recs, _ = _run(tmp_path, {"prfl.sim.max_rounds": 3, "prfl.policy.name": policy,
                                       "prfl.policy.options": options})
    assert summary["server_rounds"] == 3, summary["stopped"]
    arrivals = events(recs, "arrival")
    assert arrivals and all(a["bytes_down"] == a["received_bytes"] == a["accounted_down"] for a in arrivals)
    for a in arrivals:  # HeteroFL's mask form accounts an index in the upload too; values only are sent
        assert a["bytes_up"] == a["accounted_up"] or ("mask" in options and a["bytes_up"] < a["accounted_up"])


def test_dead_node_times_out_and_a_new_node_rejoins(tmp_path: Path) -> None:
    """No reply -> TaskFailed after the timeout; a new node with the same partition -> ClientIdle."""
    state: dict[str, Any] = {}

    def hook(grid: FakeGrid) -> None:
        original = grid.push_messages

        def push(messages):
            msgs = list(messages)
            for m in msgs:
                if "killed" not in state and m.metadata.message_type == codec.TRAIN_TYPE:
                    task = codec.decode_task(m.content)
                    if task.client == 2 and task.task_id >= 3:  # its node dies with this task
                        state["killed"], state["at"] = m.metadata.dst_node_id, time.monotonic()
                        grid.dead.add(m.metadata.dst_node_id)
            if "killed" in state and "restarted" not in state and time.monotonic() - state["at"] > 1.0:
                state["restarted"] = True
                grid.add_node(9999, {"partition-id": 2, "num-partitions": 3})
            return original(msgs)

        grid.push_messages = push

    summary, recs, _ = _run(tmp_path, {"prfl.sim.max_rounds": 80, "prfl.sim.eval_every_rounds": 1,
                                       "reply-timeout": 0.5, "policy-options.prfl.window": 0.0},
                            grid_hook=hook, latency=0.03)
    fail = events(recs, "task_failed", client=2)[0]
    assert fail["reason"].startswith("timeout") and fail["node"] == state["killed"]
    join = events(recs, "node", client=2, status="joined")[0]
    assert join["node"] == 9999
    i_fail, i_join = recs.index(fail), recs.index(join)
    assert events(recs[i_fail:i_join], "server_update")
    stale = [e["buffer_staleness"][2] for e in events(recs[i_fail:i_join], "eval")]
    assert len(stale) >= 2 and stale == sorted(stale) and stale[-1] > stale[0]
    assert events(recs[i_join:], "availability", client=2, online=True)
    assert [a for a in events(recs[i_join:], "arrival", client=2) if a["node"] == 9999]
    assert summary["nodes"]["2"] == 9999


def test_nodes_without_partition_id_take_clients_in_node_id_order(tmp_path: Path) -> None:
    summary, _recs, _ = _run(tmp_path, {"prfl.sim.max_rounds": 2}, node_configs=[{}, {}, {}])
    assert summary["nodes"] == {"0": 1000, "1": 1017, "2": 1034}


def test_client_errors_fail_tasks_then_the_run(tmp_path: Path) -> None:
    def hook(grid: FakeGrid) -> None:
        app = grid.client_app

        def failing(msg, ctx):
            if msg.metadata.message_type == codec.TRAIN_TYPE and ctx.node_id == 1017:
                raise RuntimeError("boom")
            return app(msg, ctx)

        grid.client_app = failing

    with pytest.raises(RuntimeError, match="failed 2 tasks in a row"):
        _run(tmp_path, {"prfl.sim.max_rounds": 50, "max-client-errors": 2}, grid_hook=hook, latency=0.01)
    recs = read_history(tmp_path / "run" / "history.jsonl")
    assert events(recs, "task_failed", client=1) and recs[-1]["event"] == "end"
    assert recs[-1]["reason"].startswith("error: node 1017")


# --------------------------------------------------------------------------- codec and settings
def test_sparse_and_index_encodings_cost_the_formulas() -> None:
    gen = torch.Generator().manual_seed(0)
    n, m = 1000, 7
    w = torch.randn(n + m, generator=gen)
    for keep in (0, 3, 30, 500, 1000):
        mask = torch.zeros(n, dtype=torch.bool)
        mask[torch.randperm(n, generator=gen)[:keep]] = True
        arrays = codec.sparse_arrays(w, mask, n)
        assert sum(len(a.data) for a in arrays.values()) == sparse_model_bytes(keep, n, m)
        assert len(arrays["values"].data) + len(arrays["index"].data) == prunable_piece_bytes(keep, n)
        weights, got_mask = codec.decode_sparse(arrays, n + m, n)
        assert torch.equal(got_mask, mask)
        assert torch.equal(weights[:n][mask], w[:n][mask]) and torch.equal(weights[n:], w[n:])
        pos = codec.decode_index(codec.encode_index(PackedIndex.from_mask(mask)), n)
        assert torch.equal(pos, mask.nonzero().view(-1))


def test_importance_scores_cross_the_wire_at_the_chosen_precision() -> None:
    g = torch.tensor([0.0, 3e-30, 1e-3, 2.5, 7.5e4])
    exact = codec.importance_array(g, "float32")
    assert exact.dtype == "float32" and len(exact.data) == 4 * 5
    assert torch.equal(torch.from_numpy(codec.importance_values(exact)), g)
    half = codec.importance_array(g, "bfloat16")
    assert half.dtype == "bfloat16" and len(half.data) == 2 * 5
    back = torch.from_numpy(codec.importance_values(half))
    assert torch.allclose(back, g, rtol=2 ** -8) and bool(back[1] > 0)
    with pytest.raises(ValueError, match="even number of bytes"):
        codec.importance_values(type(half)(dtype="bfloat16", shape=(1,), stype=half.stype, data=b"abc"))
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        codec.importance_values(codec.raw_array(np.zeros(3, dtype=np.int32), "int32"))


def test_example_app_config_parses_and_declares_every_key() -> None:
    import tomllib

    from flwr.common.config import flatten_dict

    conf = tomllib.loads((EXAMPLE_APP / "pyproject.toml").read_text(encoding="utf-8"))
    flat = flatten_dict(conf["tool"]["flwr"]["app"]["config"])
    assert set(DRIVER_KEYS) <= set(flat)
    assert set(SMALL_RUN) <= set(flat)  # the tests override only declared keys
    settings = app_settings(flat)
    assert settings.experiment.policy.name == "prfl" and settings.experiment.model.options == {"hidden": [32]}
    comps = conf["tool"]["flwr"]["app"]["components"]
    assert comps == {"serverapp": "prfl.flower.server_app:app", "clientapp": "prfl.flower.client_app:app"}


def test_policy_options_follow_the_chosen_policy() -> None:
    import tomllib

    from flwr.common.config import flatten_dict

    conf = tomllib.loads((EXAMPLE_APP / "pyproject.toml").read_text(encoding="utf-8"))
    flat = flatten_dict(conf["tool"]["flwr"]["app"]["config"])
    assert app_settings(flat).experiment.policy.options == {"interval": 5, "window": 0.3, "min_density": 0.2}
    fedbuff = app_settings({**flat, "prfl.policy.name": "fedbuff"}).experiment.policy
    assert fedbuff.name == "fedbuff" and fedbuff.options == {"k": 3}
    explicit = app_settings({**flat, "prfl.policy.options.window": 0.0}).experiment.policy.options
    assert explicit["window"] == 0.0 and explicit["interval"] == 5
    with pytest.raises(ConfigError, match="policy-options.<policy>.<option>"):
        app_settings({"policy-options.prfl": 1})


def test_bad_run_config_names_the_key() -> None:
    with pytest.raises(ConfigError, match="unknown run-config key 'reply_timeout'"):
        app_settings({"reply_timeout": 3.0})
    with pytest.raises(ConfigError, match="prfl.data.num_clients"):
        app_settings({"prfl.data.num_clients": 0})
    with pytest.raises(ConfigError, match="reply-timeout"):
        app_settings({"reply-timeout": -1.0})
    with pytest.raises(ConfigError, match="client-delays"):
        app_settings({"client-delays": "0,fast"})
    assert app_settings({"client-delays": "0, 1.5"}).driver.delay_for(1) == 1.5
    assert np.isclose(app_settings({}).driver.reply_timeout, 120.0)


@pytest.mark.parametrize("keys, field", [
    ({"prfl.privacy.clip_norm": 1.0, "prfl.privacy.noise_multiplier": 0.5}, "prfl.privacy"),
    ({"prfl.fleet.availability.mean_on": 10.0, "prfl.fleet.availability.mean_off": 5.0}, "prfl.fleet.availability"),
    ({"prfl.fleet.changes": "[{at: 10, like: reversed}]"}, "prfl.fleet.changes"),
])
def test_settings_only_the_simulator_honours_are_refused(tmp_path: Path, keys: dict[str, Any], field: str) -> None:
    """Flower would run without them, silently: the config is refused, naming the field."""
    with pytest.raises(ConfigError, match=field.replace(".", r"\.") + " is set"):
        app_settings({**SMALL_RUN, **keys})
    section = field.split(".")[1]
    body = {"privacy": "privacy: {clip_norm: 1.0, noise_multiplier: 0.5}\n",
            "availability": "fleet: {availability: {mean_on: 10.0, mean_off: 5.0}}\n",
            "changes": "fleet: {changes: [{at: 10, like: reversed}]}\n"}[field.split(".")[-1] if section == "fleet" else section]
    (tmp_path / "exp.yaml").write_text(body)
    with pytest.raises(ConfigError, match=field.replace(".", r"\.") + r" is set \(in config-file"):
        app_settings({**SMALL_RUN, "config-file": str(tmp_path / "exp.yaml")})


# --------------------------------------------------------------------------- checkpoint and resume
def test_server_resumes_from_its_checkpoint_after_a_crash(tmp_path: Path) -> None:
    extra = {"prfl.sim.max_rounds": 12, "prfl.sim.eval_every_rounds": 2, "checkpoint-every-rounds": 3}

    def crash_after(n: int):
        def hook(grid: FakeGrid) -> None:
            push = grid.push_messages

            def pushing(messages):
                trains = sum(m.metadata.message_type == codec.TRAIN_TYPE for m in grid.pushed)
                if trains >= n:
                    raise KeyboardInterrupt("server killed")  # not an Exception: nothing is tidied up
                return push(messages)

            grid.push_messages = pushing
        return hook

    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, extra, grid_hook=crash_after(14), latency=0.01)
    run = tmp_path / "run"
    before = read_history(run / "history.jsonl")
    checkpoints = events(before, "checkpoint")
    assert checkpoints and not (run / "summary.json").exists()
    last = checkpoints[-1]["round"]
    assert 3 <= last < 12 and last % 3 == 0

    summary, recs, _ = _run(tmp_path, {**extra, "resume": True}, latency=0.01)
    assert summary["server_rounds"] == 12 and summary["stopped"] == "reached max_rounds=12"
    resume = events(recs, "resume")
    assert len(resume) == 1 and resume[0]["round"] == last
    cut = recs.index(resume[0])
    # the history up to the checkpoint is kept as it was; nothing after it survives
    assert recs[:cut] == before[: cut] and recs[cut - 1]["event"] == "checkpoint"
    assert all(r["round"] >= last for r in recs[cut:] if "round" in r)
    rounds = [r["round"] for r in events(recs, "server_update")]
    assert rounds == list(range(1, 13))  # every round once: the lost ones are not counted twice
    assert recs[cut]["time"] >= recs[cut - 1]["time"]  # the clock goes on
    lost = set(resume[0]["lost_tasks"])
    failed = {r["task"] for r in events(recs, "task_failed")[-len(lost):]} if lost else set()
    assert failed == lost
    assert sum(summary["local_rounds"]) >= 12


def test_resume_refuses_another_experiment(tmp_path: Path) -> None:
    _run(tmp_path, {"prfl.sim.max_rounds": 3, "checkpoint-every-rounds": 1})
    with pytest.raises(ConfigError, match="changes train"):
        _run(tmp_path, {"prfl.sim.max_rounds": 6, "checkpoint-every-rounds": 1, "resume": True,
                        "prfl.train.lr": 0.5})


# --------------------------------------------------------------------------- hostile replies


def test_result_decoder_fuzz_never_crashes_the_server() -> None:
    """Random mutations of a well-formed result decode or raise MalformedResult/ValueError only."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
    from hypothesis import given, settings
    from hypothesis import strategies as st

    n, m = 40, 3
    w = torch.arange(n + m, dtype=torch.float32)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[::3] = True
    good_cfg = {"task-id": 7, "client": 1, "version": 2, "num-samples": 10, "mean-loss": 0.5, "steps": 5,
                "compute-seconds": 0.1, "delay-seconds": 0.0, "received-payload-bytes": 100,
                "received-record-bytes": 120, "partition-id": 1, "update-payload-bytes": 4,
                "importance-bytes": 0}
    values = codec.raw_array(torch.cat([w[:n][mask], w[n:]]), "float32")
    junk = st.one_of(st.integers(-2**70, 2**70), st.floats(allow_nan=True), st.text(max_size=5), st.booleans(),
                     st.lists(st.integers(0, 5), max_size=3))

    @settings(max_examples=300, deadline=None, derandomize=True)
    @given(drop=st.sets(st.sampled_from(sorted(good_cfg)), max_size=2),
           changes=st.dictionaries(st.sampled_from(sorted(good_cfg)), junk, max_size=3),
           data=st.binary(max_size=200), dtype=st.sampled_from(["float32", "int32", "uint8", "float64"]),
           name=st.sampled_from(["values", "weights", "grad_sq", "junk"]), keep_values=st.booleans())
    def check(drop, changes, data, dtype, name, keep_values):
        cfg = {k: v for k, v in good_cfg.items() if k not in drop}
        cfg.update(changes)
        arrays = {"values": values} if keep_values else {}
        arrays[name] = Array(dtype=dtype, shape=(len(data),), stype=codec.RAW, data=data)
        try:
            content = RecordDict({codec.RESULT: ConfigRecord(cfg), codec.UPDATE: ArrayRecord(array_dict=arrays)})
        except (TypeError, ValueError):
            return  # Flower itself refuses to build such a record: it never reaches the decoder
        try:
            res = codec.decode_result(content)
            got, _ = codec.result_weights(res, mask, n + m, n)
        except ValueError as exc:
            assert str(exc)  # MalformedResult is a ValueError; every refusal says why
            return
        assert got.shape == (n + m,) and got.dtype == torch.float32

    check()


def test_a_node_sending_garbage_is_rejected_then_ends_the_run(tmp_path: Path) -> None:
    from flwr.app import RecordDict

    def hook(grid: FakeGrid) -> None:
        app = grid.client_app

        def garbage(msg, ctx):
            reply = app(msg, ctx)
            if msg.metadata.message_type == codec.TRAIN_TYPE and ctx.node_id == 1017:
                return Message(RecordDict(), reply_to=msg)  # an empty result
            return reply

        grid.client_app = garbage

    from flwr.app import Message

    with pytest.raises(RuntimeError, match="sent 2 unusable results in a row"):
        _run(tmp_path, {"prfl.sim.max_rounds": 50, "max-client-errors": 2}, grid_hook=hook, latency=0.01)
    recs = read_history(tmp_path / "run" / "history.jsonl")
    rejected = events(recs, "rejected", client=1)
    assert len(rejected) == 2 and all(r["check"] == "decode" and "needs records" in r["reason"] for r in rejected)
    assert events(recs, "task_failed", client=1)
    assert any(r["client"] != 1 for r in events(recs, "arrival"))  # the others kept training


def test_a_node_whose_update_is_rejected_is_told(tmp_path: Path) -> None:
    from prfl.flower.client_app import NOTICES

    def hook(grid: FakeGrid) -> None:
        app = grid.client_app

        def poisoned(msg, ctx):  # node 1017 trains, then reports NaN weights in a well-formed reply
            if msg.metadata.message_type == codec.TRAIN_TYPE and ctx.node_id == 1017:
                reply = app(msg, ctx)
                arrays = reply.content[codec.UPDATE]
                name = "values" if "values" in arrays else "weights"
                bad = np.full(len(arrays[name].data) // 4, np.nan, dtype=np.float32)
                arrays[name] = codec.raw_array(bad, "float32")
                return reply
            return app(msg, ctx)

        grid.client_app = poisoned

    summary, recs, grid = _run(tmp_path, {"prfl.sim.max_rounds": 6}, grid_hook=hook, latency=0.01)
    assert summary["server_rounds"] == 6
    rejected = events(recs, "rejected", client=1)
    assert rejected and all(r["check"] == "finite" for r in rejected)
    state = grid.contexts[1017].state.config_records[NOTICES]
    assert int(state["count"]) == len(rejected) and state["last-check"] == "finite"
    assert NOTICES not in grid.contexts[1000].state.config_records  # the honest nodes heard nothing
