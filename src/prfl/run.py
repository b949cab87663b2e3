"""Build a scenario from a config and run experiments into run directories.

A run directory holds ``config.yaml`` (resolved), ``partition.json``, ``history.jsonl``,
``summary.json``, ``accuracy.png``, ``round_time.png`` and ``checkpoint.pt`` with the one before it,
``checkpoint.prev.pt`` (for ``prfl run --resume DIR``; a torn checkpoint falls back to the
previous one and the history is cut back to that checkpoint).
"""

from __future__ import annotations

import logging
import math
import os
import weakref
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from prfl.client.trainer import TrainConfig, evaluate
from prfl.config import ConfigError, ExperimentConfig, PolicyConfig, load_run_config, save_config
from prfl.data import Dataset, Partition, load_dataset, partition_dataset
from prfl.models import build_model, model_cost
from prfl.models.cost import ModelCost
from prfl.params import ParamLayout
from prfl.policies import build_policy
from prfl.policies.base import Policy, PolicyContext
from prfl.report.plots import plot_accuracy, plot_round_time, speed_change_marks
from prfl.sim.devices import Fleet, FleetError, load_fleet, make_fleet, parse_changes
from prfl.runtime.checkpoint import CHECKPOINT, CheckpointError
from prfl.sim.accounting import ReferenceSizes
from prfl.sim.engine import Simulation
from prfl.sim.executors import WorkerSpec, make_executor
from prfl.runtime.history import HistoryWriter, time_breakdown
from prfl.runtime.rundir import ResumeError, RunDirectory

log = logging.getLogger(__name__)


class StepCost:
    """FLOPs of one local training step under a mask, with a sparse-efficiency factor.

    A layer at density d costs as if at ``1 - e (1 - d)``: e = 1 means compute shrinks with the
    sub-model, e = 0 means masked training costs as much as dense training.
    """

    def __init__(
        self,
        cost: ModelCost,
        layout: ParamLayout,
        efficiency: float = 1.0,
        width_cost: Callable[[float], ModelCost] | None = None,
    ) -> None:
        self.cost = cost
        self.layout = layout
        self.efficiency = efficiency
        self.width_cost = width_cost
        self._width_costs: dict[float, ModelCost] = {1.0: cost}
        # per-mask cache keyed by identity (tensors hash by id but compare element-wise)
        self._cache: dict[int, tuple[weakref.ref[torch.Tensor], dict[str, float]]] = {}

    def layer_density(self, mask: torch.Tensor) -> dict[str, float]:
        entry = self._cache.get(id(mask))
        hit = entry[1] if entry is not None and entry[0]() is mask else None
        if hit is None:
            counts = torch.cumsum(mask.to(torch.int64), 0)
            hit = {}
            for e in self.layout.prunable_entries:
                kept = int(counts[e.stop - 1]) - (int(counts[e.offset - 1]) if e.offset > 0 else 0)
                d = kept / e.numel
                hit[e.name] = 1.0 - self.efficiency * (1.0 - d)
            if len(self._cache) > 256:
                self._cache = {k: v for k, v in self._cache.items() if v[0]() is not None}
            self._cache[id(mask)] = (weakref.ref(mask), hit)
        return hit

    def __call__(self, mask: torch.Tensor | None, batch_size: int, width: float = 1.0) -> float:
        if width != 1.0:
            # a width-sliced sub-network is a smaller dense network: cost it as such
            cost = self._width_costs.get(width)
            if cost is None:
                if self.width_cost is None:
                    raise ValueError("this scenario cannot cost width-sliced sub-models")
                cost = self._width_costs[width] = self.width_cost(width)
            return cost.train_step_flops(batch_size)
        if mask is None:
            return self.cost.train_step_flops(batch_size)
        return self.cost.train_step_flops(batch_size, self.layer_density(mask))


@dataclass
class Scenario:
    """Everything a run needs besides its policy: data, partition, model, fleet, evaluation."""

    cfg: ExperimentConfig
    dataset: Dataset
    partition: Partition
    layout: ParamLayout
    cost: ModelCost
    initial_weights: torch.Tensor
    fleet: Fleet
    train_cfg: TrainConfig
    worker_spec: WorkerSpec
    model: torch.nn.Module

    def evaluator(self) -> Callable[[torch.Tensor], tuple[float, float]]:
        model = build_model(self.cfg.model.name, self.dataset.input_shape, self.dataset.num_classes, **self.cfg.model.options)
        bound = self.layout.flatten(model)
        self.layout.bind(model, bound)
        n = self.cfg.data.eval_samples
        x, y = self.dataset.x_test, self.dataset.y_test
        if n is not None:
            x, y = x[:n], y[:n]
        xt, yt = torch.as_tensor(x), torch.as_tensor(y, dtype=torch.int64)
        loss = self.train_cfg.loss

        def run(weights: torch.Tensor) -> tuple[float, float]:
            return evaluate(model, self.layout, bound, weights, xt, yt, loss)

        return run

    def width_cost(self, width: float) -> ModelCost:
        """Cost of the model built at ``width`` times every hidden width."""
        return model_cost(self.build_at_width(width), self.dataset.input_shape)

    def policy_context(self, accounting: str = "honest") -> PolicyContext:
        """The policy's view of the federation; ``accounting="reference"`` adds the reference's
        step-closing rule (the server's nominal uplink and the reference's download sizes)."""
        step_timing = None
        if accounting == "reference":
            sizes = ReferenceSizes(self.layout.num_prunable, int(self.initial_weights.numel()))
            step_timing = sizes.step_timing(self.fleet.server.up_bps)
        return PolicyContext(
            num_clients=self.cfg.data.num_clients,
            num_samples=tuple(int(s) for s in self.partition.sizes()),
            initial_weights=self.initial_weights,
            num_prunable=self.layout.num_prunable,
            seed=self.cfg.seed,
            max_rounds=self.cfg.sim.max_rounds,
            max_time=self.cfg.sim.max_time,
            layer_bounds=tuple(self.layout.layer_bounds()),
            client_labels=tuple(
                tuple(int(c) for c in np.unique(self.partition.labels[idx])) for idx in self.partition.client_indices
            ),
            num_classes=self.dataset.num_classes,
            model_builder=self.build_at_width,
            nominal_round_times=self.nominal_round_times(),
            layer_cost=self.layer_cost(),
            step_timing=step_timing,
        )

    def _task_steps(self, client: int) -> int:
        return self.train_cfg.num_steps(int(self.partition.sizes()[client]))

    def nominal_round_times(self) -> tuple[float, ...]:
        """Seconds of a dense task at each client's mean speeds: download + compute + upload of
        the whole model, with the server link not in the way."""
        nbytes = 4 * self.layout.total
        step = self.cost.train_step_flops(self.train_cfg.batch_size)
        return tuple(
            nbytes / d.down_bps + step * self._task_steps(c) / d.compute_flops + nbytes / d.up_bps
            for c, d in enumerate(self.fleet.clients)
        )

    def layer_cost(self) -> tuple[float, ...]:
        """Per prunable layer, the seconds one kept weight costs the fleet's median client per task.

        ``4 B * (1/down + 1/up)`` to move its value both ways plus ``3 * batch * steps * f_l / C``
        of compute, with ``f_l`` the layer's forward FLOPs per sample per weight and ``C`` the
        device's FLOP/s (the PR-FL reference's per-layer communication + computation coefficient,
        from this scenario's model and fleet instead of measurements).
        """
        times = self.nominal_round_times()
        median = sorted(range(len(times)), key=lambda c: (times[c], c))[len(times) // 2]
        dev = self.fleet.clients[median]
        steps = self._task_steps(median)
        per_weight = {}
        for layer in self.cost.layers:
            if layer.prunable and layer.param_name is not None:
                per_weight[layer.param_name] = layer.prunable_flops / layer.prunable
        comm = 4.0 * (1.0 / dev.down_bps + 1.0 / dev.up_bps)
        out = []
        for e in self.layout.prunable_entries:
            f = per_weight.get(e.name, 0.0)
            out.append(comm + 3.0 * self.train_cfg.batch_size * steps * f / dev.compute_flops)
        return tuple(out)

    def build_at_width(self, width: float = 1.0) -> torch.nn.Module:
        """A fresh model of this scenario at ``width`` times every hidden width."""
        options = dict(self.cfg.model.options)
        if width != 1.0:
            options["width_mult"] = width * options.get("width_mult", 1.0)
        return build_model(self.cfg.model.name, self.dataset.input_shape, self.dataset.num_classes, **options)


def build_scenario(cfg: ExperimentConfig, dataset: Dataset | None = None) -> Scenario:
    """Load data, partition it, build the model and fleet named by ``cfg``."""
    d = cfg.data
    ds = dataset if dataset is not None else load_dataset(d.dataset, d.data_dir, **d.options)
    try:
        part = partition_dataset(ds, d.partition, d.num_clients, seed=cfg.seed, **d.partition_options)
    except TypeError as exc:
        raise ConfigError(f"data.partition_options: {exc}") from exc
    torch.manual_seed(cfg.model.seed)
    model = build_model(cfg.model.name, ds.input_shape, ds.num_classes, **cfg.model.options)
    layout = ParamLayout(model)
    cost = model_cost(model, ds.input_shape)
    if cfg.fleet.file:
        fleet = load_fleet(cfg.fleet.file)
        if len(fleet) != d.num_clients:
            raise ConfigError(f"fleet file {cfg.fleet.file} has {len(fleet)} clients but data.num_clients is {d.num_clients}")
    else:
        fleet = make_fleet(cfg.fleet.preset, d.num_clients, seed=cfg.seed, **cfg.fleet.options)
    if cfg.fleet.changes:
        if fleet.changes:
            raise ConfigError(f"fleet file {cfg.fleet.file} has its own speed changes and fleet.changes sets more; "
                              "keep them in one place")
        try:
            fleet = replace(fleet, changes=parse_changes(cfg.fleet.changes, "fleet.changes"))
        except FleetError as exc:
            raise ConfigError(str(exc)) from None
    train_cfg = cfg.train
    spec = WorkerSpec(
        dataset=d.dataset,
        model=cfg.model.name,
        train=train_cfg,
        dataset_options=dict(d.options),
        model_options=dict(cfg.model.options),
        data_dir=d.data_dir,
    )
    return Scenario(cfg, ds, part, layout, cost, layout.flatten(model), fleet, train_cfg, spec, model)


def _availability(cfg: ExperimentConfig) -> Any:
    a = cfg.fleet.availability
    if a is None:
        return None
    from prfl.sim.availability import OnOffAvailability

    return OnOffAvailability(mean_on=a.mean_on, mean_off=a.mean_off, run_seed=cfg.seed, start_online_prob=a.start_online_prob)


def _privacy(cfg: ExperimentConfig) -> Any:
    if cfg.privacy is None:
        return None
    from prfl.privacy import ClientDP

    return ClientDP(**cfg.privacy.model_dump())


def make_policy(sc: Scenario, pcfg: PolicyConfig, accounting: str | None = None) -> Policy:
    """Build ``pcfg``'s policy on the scenario. Under the simulator's ``reference`` accounting
    (``accounting``, default the scenario's ``sim.accounting``) the policy closes server steps by
    the reference's rule and FedAsync takes one arrival per step with the reference's mixing
    weight (``steps: reference``) unless its options say otherwise."""
    accounting = sc.cfg.sim.accounting if accounting is None else accounting
    options = dict(pcfg.options)
    if accounting == "reference" and pcfg.name == "fedasync":
        options.setdefault("steps", "reference")
    try:
        return build_policy(pcfg.name, sc.policy_context(accounting), **options)
    except ValueError as exc:
        raise ConfigError(f"policy.options: {exc}") from exc


def make_simulation(
    sc: Scenario,
    policy: Policy,
    out_dir: Path | None,
    history: HistoryWriter,
    executor: Any,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
) -> Simulation:
    s = sc.cfg.sim
    settings = s.settings(checkpoints=out_dir is not None)
    return Simulation(
        policy=policy,
        fleet=sc.fleet,
        executor=executor,
        client_indices=sc.partition.client_indices,
        train_cfg=sc.train_cfg,
        step_flops=StepCost(sc.cost, sc.layout, s.sparse_efficiency, sc.width_cost),
        evaluator=sc.evaluator(),
        settings=settings,
        seed=sc.cfg.seed,
        history=history,
        availability=_availability(sc.cfg),
        checkpoint_dir=out_dir,
        on_progress=on_progress,
        privacy=_privacy(sc.cfg),
    )


def _executor(sc: Scenario) -> Any:
    s = sc.cfg.sim
    return make_executor(
        s.executor, sc.worker_spec, workers=s.workers, dataset=sc.dataset if s.executor in ("inline", "process") else None,
        address=s.ray_address, spill_dir=s.spill_dir,
    )


def run_policy(
    sc: Scenario,
    pcfg: PolicyConfig | None = None,
    out_dir: str | Path | None = None,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run one policy on the scenario; write the run directory when ``out_dir`` is given."""
    pcfg = pcfg or sc.cfg.policy
    cfg = sc.cfg.with_policy(pcfg)
    rd = RunDirectory(out_dir).create() if out_dir is not None else None
    if rd is not None:
        save_config(cfg, rd.config)
        sc.partition.save(rd.partition)
        rd.clear_run()
    history = rd.open_history() if rd is not None else HistoryWriter(None)
    executor = _executor(sc)
    try:
        sim = make_simulation(sc, make_policy(sc, pcfg), rd.path if rd is not None else None, history, executor,
                              on_progress)
        summary = sim.run()
    finally:
        executor.close()
        history.close()
    summary["name"] = cfg.name
    summary["seed"] = cfg.seed
    if rd is not None:
        _finish_run_dir(rd, summary, history.records, cfg)
    summary["history"] = history.records
    return summary


def resume_run(run_dir: str | Path, on_progress: Callable[[dict[str, Any]], None] | None = None,
               max_time: float | None = None) -> dict[str, Any]:
    """Continue a run from its last good checkpoint; the history is cut back to that point first.

    ``checkpoint.pt`` is used unless it is torn or corrupted (its checksum fails) or ahead of the
    history file; then ``checkpoint.prev.pt`` is.

    ``max_time`` (virtual seconds, not before the run's own ``sim.max_time``) takes the run on to
    that time instead, finished or not, and becomes the run's ``sim.max_time`` in its config. The
    time limit only stops a run, so the result is the run a longer ``max_time`` would have given
    from the start (``sim.max_rounds``, if set, still applies).
    """
    rd = RunDirectory(run_dir)
    try:
        rd.check_resumable()
    except ResumeError as exc:
        raise ConfigError(str(exc)) from None
    cfg = load_run_config(rd.config)
    if max_time is not None:
        old = cfg.sim.max_time
        if not (math.isfinite(max_time) and max_time > 0):
            raise ConfigError(f"the new max_time must be a positive number of virtual seconds, got {max_time!r}")
        if old is not None and max_time < old:
            raise ConfigError(f"{rd.path} runs to {old:g} virtual s; a new max_time of {max_time:g} s would end it "
                              "sooner: give a later time")
        cfg = cfg.with_max_time(float(max_time))
    try:
        state, used = rd.load_checkpoint()
    except CheckpointError as exc:
        raise ConfigError(str(exc)) from None
    if max_time is not None:  # from here on the run is one to the new time (a later resume continues it)
        tmp = rd.config.with_suffix(".yaml.tmp")
        save_config(cfg, tmp)
        os.replace(tmp, rd.config)
    if used.name != CHECKPOINT:
        log.warning("%s: resuming from %s", rd.path, used.name)
    sc = build_scenario(cfg)
    history = rd.open_history(truncate_at=state["history_offset"])
    executor = _executor(sc)
    try:
        sim = make_simulation(sc, make_policy(sc, cfg.policy), rd.path, history, executor, on_progress)
        sim.resume(state)
        del state  # what the run needs now lives in the simulation
        summary = sim.run()
    finally:
        executor.close()
        history.close()
    summary["name"] = cfg.name
    summary["seed"] = cfg.seed
    records = list(rd.records())
    _finish_run_dir(rd, summary, records, cfg)
    summary["history"] = records
    return summary


def _finish_run_dir(rd: RunDirectory, summary: dict[str, Any], records: list[dict[str, Any]],
                    cfg: ExperimentConfig) -> None:
    rd.write_summary(summary)  # atomically: a run killed here leaves the old summary or none
    plot_accuracy({summary["policy"]: records}, rd.accuracy_plot, title=summary.get("name", ""),
                  marks=speed_change_marks(cfg.fleet.changes))
    clients = len(summary.get("local_rounds", ())) or None
    plot_round_time({summary["policy"]: time_breakdown(records, clients)}, rd.round_time_plot,
                    title=summary.get("name", ""))
