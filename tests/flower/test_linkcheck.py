"""prfl.linkcheck: per-task phases from both sides' stamps, measured compute, pairing."""

from __future__ import annotations

import tomllib
from concurrent.futures import Future
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr", reason="Flower is not installed: pip install 'prfl[flower]' to run the Flower tests")

from prfl.client.trainer import TrainOutput
from prfl.config import ExperimentConfig
from prfl import linkcheck as lc
from prfl.flower.shaping import NodeTransfer
from prfl.sim.executors import TrainJob


def _arrival(client: int, task: int, time: float, duration: float, stamps: list[float | None], message: str) -> dict:
    return {"event": "arrival", "client": client, "task": task, "time": time, "duration": duration,
            "bytes_down": 100, "bytes_up": 50, "density": 1.0, "stamps": stamps, "message": message}


def test_real_tasks_split_each_task_with_the_server_app_and_node_stamps() -> None:
    t0 = 1000.0  # wall clock of the run's t = 0
    records = [
        {"event": "start", "time": 0.0},
        # dispatched at t = 1 (wall 1001); node pulls at 1003, has it at 1013; app gets it at 1020,
        # trains till 1021; node sends at 1022, done at 1037; server pulls the reply at 1037.5
        _arrival(0, 0, 37.6, 36.6, [1001.0, 1020.0, 1021.0, 1037.5], "m0"),
        _arrival(1, 1, 50.0, 45.0, [1005.0, None, None, 1050.0], "m1"),  # an old node: no stamps
        {"event": "task_failed", "time": 48.0, "client": 0, "task": 2, "reason": "timeout"},
        _arrival(0, 3, 90.0, 40.0, [1050.0, 1060.0, 1061.0, 1090.0], "m2"),
    ]
    transfers = {
        "m0": NodeTransfer("m0", "train", receiving=1003.0, received=1013.0, sending=1022.0, sent=1037.0),
        "m1": NodeTransfer("m1", "train", receiving=1007.0, received=1010.0, sending=1030.0, sent=1049.0),
        "m2": NodeTransfer("m2", "train", receiving=1052.0, received=1058.0, sending=1062.0, sent=1089.0),
    }
    tasks = lc.real_tasks(records, transfers)
    # numbered by dispatch: client 0's failed task 2 keeps its number, task 3 is its third
    assert [(t.client, t.index, t.task) for t in tasks] == [(0, 0, 0), (0, 2, 3)]
    first = tasks[0]
    assert first.dispatched == pytest.approx(1.0) and t0 + first.dispatched == pytest.approx(1001.0)
    assert (first.poll, first.download, first.compute, first.upload, first.reply) == pytest.approx((2, 10, 9, 15, 0.5))
    assert (first.spawn, first.train, first.finish) == pytest.approx((7, 1, 1))
    assert first.duration == pytest.approx(36.5)
    assert first.poll + first.download + first.compute + first.upload + first.reply == pytest.approx(first.duration)
    assert tasks[1].dispatched == pytest.approx(50.0)
    assert lc.device_times(tasks) == {0: [pytest.approx(9.0), None, pytest.approx(4.0)]}


class _Inner:
    def __init__(self) -> None:
        self.jobs: list[TrainJob] = []

    def submit(self, job: TrainJob) -> Future[TrainOutput]:
        self.jobs.append(job)
        fut: Future[TrainOutput] = Future()
        fut.set_result(TrainOutput(weights=torch.full((3,), float(job.task_id)), num_samples=5, mean_loss=0.1,
                                   steps=2, compute_seconds=0.001, grad_sq=None))
        return fut

    def close(self) -> None:
        pass


def _job(task: int, client: int) -> TrainJob:
    return TrainJob(task_id=task, client=client, weights=torch.zeros(3), indices=torch.arange(5).numpy(), seed=task)


def test_the_kth_job_of_a_client_gets_its_kth_measured_compute_time() -> None:
    ex = lc.MeasuredComputeExecutor(_Inner(), {0: [10.0, None, 12.0, 20.0], 1: [5.0]})
    outs = [ex.submit(_job(t, c)).result() for t, c in [(0, 0), (1, 1), (2, 0), (3, 1), (4, 0), (5, 0), (6, 0)]]
    # unmeasured (a failed task, or beyond the deployment): the client's median
    assert [o.compute_seconds for o in outs] == [10.0, 5.0, 12.0, 5.0, 12.0, 20.0, 12.0]
    assert ex.fallbacks == 3
    assert [float(o.weights[0]) for o in outs] == [0, 1, 2, 3, 4, 5, 6]  # what training returned, untouched
    assert lc.MeasuredComputeExecutor(_Inner(), {0: [2.0, 4.0]}).next_seconds(3) == 3.0  # unmeasured: everyone's


def _task(client: int, index: int, download: float, upload: float, duration: float) -> lc.TaskTimes:
    return lc.TaskTimes(client=client, index=index, task=index * 10 + client, dispatched=0.0, duration=duration,
                        download=download, compute=duration - download - upload, upload=upload, bytes_down=100,
                        bytes_up=50, density=1.0, poll=1.0, reply=0.5)


def test_sim_tasks_take_the_observed_transfers_from_the_arrival_records() -> None:
    """download / upload of a simulated task: own-link seconds plus that transfer's wait on the
    server's link (link_wait_down, and the rest of link_wait), as a deployment's stamps see them."""
    rec = {"event": "arrival", "client": 1, "task": 7, "time": 30.0, "duration": 20.0, "download": 4.0,
           "link_wait": 3.0, "link_wait_down": 2.0, "compute": 5.0, "upload": 8.0, "bytes_down": 100,
           "bytes_up": 50, "density": 1.0}
    (task,) = lc.sim_tasks([{"event": "start", "time": 0.0}, rec])
    assert (task.download, task.compute, task.upload, task.dispatched) == (6.0, 5.0, 9.0, 10.0)
    assert task.download + task.compute + task.upload == task.duration
    with pytest.raises(KeyError, match="link_wait_down"):
        lc.sim_tasks([{k: v for k, v in rec.items() if k != "link_wait_down"}])


def test_compare_pairs_tasks_by_client_and_number_and_reports_relative_errors() -> None:
    real = [_task(0, 0, 10, 20, 40), _task(0, 1, 10, 20, 40), _task(1, 0, 20, 10, 50), _task(2, 0, 5, 5, 20)]
    sim = [_task(0, 0, 9, 18, 36), _task(0, 1, 11, 20, 44), _task(1, 0, 20, 12, 50)]  # client 2 never arrived
    res = lc.compare(real, sim, [10.0, 20.0, 40.0], [9.0, 19.0, 44.0, 50.0], updates=3)
    assert res["pairs"] == 3 and res["tasks_real"] == 4 and res["tasks_simulated"] == 3
    assert res["median_abs_rel_error"]["download"] == pytest.approx(0.1)  # |-0.1|, |+0.1|, 0
    assert res["median_rel_error"]["upload"] == pytest.approx(0.0)  # -0.1, 0, +0.2
    assert res["max_abs_rel_error"]["upload"] == pytest.approx(0.2)
    assert res["median_abs_rel_error"]["duration"] == pytest.approx(0.1)
    assert res["time_to_updates"] == {"updates": 3, "real": 40.0, "simulated": 44.0, "rel_error": pytest.approx(0.1),
                                      "protocol_waits_in_chain": 1.5,  # client 0's first task: poll 1 + reply 0.5
                                      "rel_error_without_protocol_waits": pytest.approx(44.0 / 38.5 - 1)}
    assert res["median_gap_seconds"]["poll"] == 1.0
    assert res["median_excess_seconds"]["download"] == pytest.approx(0.0)  # 10-9, 10-11, 20-20
    assert res["median_excess_seconds"]["upload"] == pytest.approx(0.0)  # 20-18, 20-20, 10-12
    assert res["median_excess_seconds"]["compute"] == pytest.approx(1.0)  # 10-9, 10-13, 20-18
    assert res["pairs_detail"][0]["download"] == [10, 9]


def test_the_simulator_runs_the_experiment_as_the_deployment_did(tmp_path: Path) -> None:
    exp = ExperimentConfig.model_validate({"sim": {"max_rounds": 5, "compute_time": "flops", "executor": "process",
                                                   "accounting": "reference"}})
    cfg = lc.simulation_config(exp)
    assert cfg.sim.compute_time == "measured" and cfg.sim.piece_relay is False and cfg.sim.executor == "inline"
    assert cfg.sim.accounting == "honest"  # a deployment moves every byte
    relayed = ExperimentConfig.model_validate({"sim": {"max_rounds": 5, "model_relay": True}})
    assert lc.simulation_config(relayed).sim.model_relay is False  # nor does a deployment relay models
    assert cfg.sim.max_rounds == 5 and cfg.policy == exp.policy
    app = lc.write_app(tmp_path / "app", tmp_path / "exp.yaml", tmp_path / "out", {"reply-timeout": 900.0})
    doc = tomllib.loads((app / "pyproject.toml").read_text())
    assert doc["tool"]["flwr"]["app"]["components"]["clientapp"] == "prfl.flower.client_app:app"
    assert doc["tool"]["flwr"]["app"]["config"] == {"config-file": str(tmp_path / "exp.yaml"),
                                                    "out-dir": str(tmp_path / "out"), "reply-timeout": 900.0}


def test_the_simulated_policy_has_the_deployed_policys_priors(tmp_path: Path) -> None:
    """The ServerApp replaces the fleet (devices are real), so PR-FL there starts from uniform
    priors; the simulator's policy must too, while its clock keeps the fleet file's speeds."""
    from prfl.config import save_config
    from prfl.flower.settings import app_settings
    from prfl.flower.shaping import LinkSpeeds
    from prfl.run import build_scenario, make_policy

    k = 1000.0
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(lc.fleet_yaml(LinkSpeeds((40 * k, 20 * k, 10 * k, 5 * k), (40 * k, 20 * k, 10 * k, 5 * k)), "t"))
    exp = ExperimentConfig.model_validate({
        "data": {"dataset": "digits", "num_clients": 4}, "model": {"name": "mlp", "options": {"hidden": [16]}},
        "fleet": {"file": str(fleet)}, "policy": {"name": "prfl", "options": {"min_density": 0.1}}})
    save_config(exp, tmp_path / "exp.yaml")
    deployed = app_settings({"config-file": str(tmp_path / "exp.yaml")}).experiment
    on_flower = make_policy(build_scenario(deployed), deployed.policy).densities
    simulated = make_policy(build_scenario(lc.deployed_policy_config(exp)), exp.policy).densities
    with_fleet = make_policy(build_scenario(lc.simulation_config(exp)), exp.policy).densities
    assert simulated == on_flower
    assert with_fleet != on_flower  # the fleet file's speeds would have changed PR-FL's start
    assert lc.deployed_policy_config(exp).sim == lc.simulation_config(exp).sim


def test_chain_waits_sum_the_polls_and_replies_behind_the_kth_update() -> None:
    def task(client: int, k: int, dispatched: float, duration: float, poll: float, reply: float) -> lc.TaskTimes:
        return lc.TaskTimes(client=client, index=k, task=10 * client + k, dispatched=dispatched, duration=duration,
                            download=1.0, compute=1.0, upload=1.0, bytes_down=1, bytes_up=1, density=1.0,
                            poll=poll, reply=reply)

    real = [task(0, 0, 0.0, 10.0, 1.0, 0.5), task(0, 1, 10.0, 10.0, 2.0, 0.25), task(1, 0, 0.0, 15.0, 3.0, 0.5),
            task(1, 1, 15.0, 12.0, 2.5, 0.5)]
    assert lc.chain_waits(real, 20.0) == pytest.approx(1.0 + 0.5 + 2.0 + 0.25)  # client 0's second arrival
    assert lc.chain_waits(real, 26.0) == pytest.approx(1.0 + 0.5 + 2.0 + 0.25)  # client 1's second is not in yet
    assert lc.chain_waits(real, 27.0) == pytest.approx(3.0 + 0.5 + 2.5 + 0.5)
    assert lc.chain_waits(real, 5.0) is None
    res = lc.compare(real, real, [10.0, 15.0, 20.0], [9.0, 14.0, 18.0], 3)
    t = res["time_to_updates"]
    assert t["protocol_waits_in_chain"] == pytest.approx(3.75)
    assert t["rel_error"] == pytest.approx(18.0 / 20.0 - 1) and t["rel_error_without_protocol_waits"] == pytest.approx(18.0 / 16.25 - 1)
