"""Compare methods over seeds on one scenario: plan the runs, run them (in parallel when asked),
resume an interrupted comparison, then write tables, plots and a report.

A *method* is a name for a policy configuration. ``--methods`` names are resolved in this order:

1. a variant defined under the ``methods:`` mapping of the scenario YAML, e.g.
   ``methods: {prfl-fast: {name: prfl, options: {interval: 20}}}`` (name -> policy config);
2. a policy used by the scenario (``policy`` or ``baselines``) with the options given there;
3. a registered policy (``fedavg``, ``fedasync``, ...) with its default options;
4. a built-in PR-FL ablation ``prfl-<switch>`` (see :data:`ABLATIONS`): the scenario's PR-FL
   options (rule 1 or 2 for ``prfl``, else the defaults) with one switch turned.

Without ``--methods`` a comparison runs the scenario's policy, its baselines and every variant of
``methods:``. Each run differs from the scenario only in its policy and ``seed``; it is written to
``<out>/runs/<method>/seed<k>/`` (a normal run directory) and ``<out>/comparison.yaml`` records the
plan. A run whose ``summary.json`` exists is skipped, one with only a checkpoint is resumed from
it, so running the same command again finishes an interrupted comparison. A run directory made by
a different configuration is an error (use another ``--out`` or ``restart=True``), except for
``sim.executor`` and ``sim.workers``, which do not change results.
"""

from __future__ import annotations

import copy
import dataclasses
import multiprocessing as mp
import os
import queue as queue_mod
import re
import shutil
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from prfl.config import (
    ConfigError,
    ExperimentConfig,
    PolicyConfig,
    format_errors,
    apply_overrides,
    load_run_config,
    read_yaml_mapping,
    preset_data,
)
from prfl.report.runset import MANIFEST, RunSet, load_comparison, run_dir_of
from prfl.runtime.rundir import RunDirectory

#: Built-in PR-FL ablations: ``prfl-<key>`` is PR-FL with these options changed.
ABLATIONS: dict[str, dict[str, Any]] = {
    "norecovery": {"recovery": False},
    "nobuffer": {"buffer": False},
    "nomaskfedavg": {"mask_fedavg": False},
    "noresidual": {"residual_split": False},
    "sync": {"synchronous": True},
}
METHOD_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
#: Settings that do not change a run's results: a run made with other values still counts.
NEUTRAL_FIELDS = (("sim", "executor"), ("sim", "workers"))


@dataclass(frozen=True)
class Method:
    """A named policy configuration; ``source`` says where the name was resolved."""

    name: str
    policy: PolicyConfig
    source: str


@dataclass(frozen=True)
class RunSpec:
    """One run of a comparison, as sent to a worker process (plain data only)."""

    method: str
    seed: int
    config: dict[str, Any]  # the run's ExperimentConfig (JSON mode)
    out_dir: str
    action: str  # "new" or "resume"


@dataclass(frozen=True)
class RunEvent:
    """What the runner reports: ``skip``, ``start``, ``progress``, ``done`` or ``failed`` of a run."""

    kind: str
    method: str
    seed: int
    data: dict[str, Any] = field(default_factory=dict)


OnEvent = Callable[[RunEvent], None]


# ---------------------------------------------------------------------------- planning
def read_scenario(
    path: str | Path | None = None, preset: str | None = None, overrides: Sequence[str] = ()
) -> tuple[ExperimentConfig, dict[str, PolicyConfig], str]:
    """(scenario, named methods, source) from a YAML file or a preset, after ``--set`` overrides.

    The YAML is an experiment config with an optional top-level ``methods:`` mapping of variant
    name -> policy config (``{name: <policy>, options: {...}}``).
    """
    if path is not None and preset is not None:
        raise ConfigError("give a scenario file or a preset, not both")
    if path is not None:
        source = str(path)
        data = read_yaml_mapping(path, "scenario file", "data, model, policy, methods, ...")
    elif preset is not None:
        source = f"preset {preset}"
        data = preset_data(preset)
    else:
        source = "defaults"
        data = {}
    if overrides:
        data = apply_overrides(data, list(overrides))
        source += " + overrides"
    raw_methods = data.pop("methods", None) or {}
    try:
        scenario = ExperimentConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_errors(err, source)) from None
    if not isinstance(raw_methods, dict):
        raise ConfigError(f"methods ({source}): expected a mapping of name -> policy config, e.g. "
                          "methods: {prfl-norecovery: {name: prfl, options: {recovery: false}}}")
    named: dict[str, PolicyConfig] = {}
    for name, spec in raw_methods.items():
        name = str(name)
        _check_name(name)
        if not isinstance(spec, dict) or "name" not in spec:
            raise ConfigError(f"methods.{name} ({source}): give a policy config with a name, "
                              "e.g. {name: prfl, options: {recovery: false}}")
        try:
            named[name] = PolicyConfig.model_validate(spec)
        except ValidationError as err:
            raise ConfigError(format_errors(err, f"methods.{name} in {source}")) from None
    return scenario, named, source


def _check_name(name: str) -> None:
    if not METHOD_NAME.match(name):
        raise ConfigError(f"method name {name!r} must be letters, digits, '.', '_', '+' or '-' "
                          "(it names a directory)")


def _check_options(method: str, pcfg: PolicyConfig) -> None:
    """Fail early, naming the method, when the policy's options are unknown, missing or invalid."""
    from prfl.policies import POLICIES

    config_cls = POLICIES[pcfg.name].config_cls  # type: ignore[attr-defined]
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(pcfg.options) - set(fields))
    if unknown:
        raise ConfigError(f"method {method!r}: unknown option {unknown[0]!r} for policy {pcfg.name!r}; "
                          f"valid options: {', '.join(fields)}")
    try:
        config_cls(**pcfg.options)
    except TypeError as exc:
        missing = [n for n, f in fields.items() if n not in pcfg.options
                   and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        hint = f"policy {pcfg.name!r} needs option {missing[0]!r}" if missing else str(exc)
        raise ConfigError(f"method {method!r}: {hint}; define the method under methods: in the scenario "
                          "YAML or give the policy these options in policy/baselines") from None
    except ValueError as exc:
        raise ConfigError(f"method {method!r}: policy {pcfg.name!r}: {exc}") from None


def _scenario_policies(scenario: ExperimentConfig) -> list[PolicyConfig]:
    return [scenario.policy, *scenario.baselines]


def resolve_method(name: str, scenario: ExperimentConfig, named: dict[str, PolicyConfig]) -> Method:
    """The policy configuration a method name stands for (see the module docstring for the order)."""
    from prfl.policies import POLICIES

    _check_name(name)
    if name in named:
        method = Method(name, named[name], "methods")
    elif (used := next((p for p in _scenario_policies(scenario) if p.name == name), None)) is not None:
        method = Method(name, used, "scenario")
    elif name in POLICIES:
        method = Method(name, PolicyConfig(name=name), "default")
    elif name.startswith("prfl-") and name[5:] in ABLATIONS:
        base = named.get("prfl") or next((p for p in _scenario_policies(scenario) if p.name == "prfl"), None)
        options = {**(base.options if base else {}), **ABLATIONS[name[5:]]}
        method = Method(name, PolicyConfig(name="prfl", options=options), "ablation")
    else:
        known = sorted(set(named) | set(POLICIES) | {f"prfl-{k}" for k in ABLATIONS})
        raise ConfigError(f"unknown method {name!r}; use a policy, a PR-FL ablation or a variant from the "
                          f"scenario's methods: mapping ({', '.join(known)})")
    _check_options(name, method.policy)
    return method


def default_methods(scenario: ExperimentConfig, named: dict[str, PolicyConfig]) -> list[str]:
    """The scenario's policy, then its baselines, then the ``methods:`` variants (each name once)."""
    out: list[str] = []
    for name in [p.name for p in _scenario_policies(scenario)] + list(named):
        if name not in out:
            out.append(name)
    return out


@dataclass
class ComparisonPlan:
    """What a comparison runs: the scenario, the methods, the seeds, and what the tables show."""

    scenario: ExperimentConfig
    methods: list[Method]
    seeds: list[int]
    targets: list[float]
    baseline: str | None
    out: Path
    source: str = ""
    command: str | None = None

    def method(self, name: str) -> Method:
        for m in self.methods:
            if m.name == name:
                return m
        raise KeyError(name)

    def run_config(self, method: str, seed: int) -> ExperimentConfig:
        """The configuration of one run: the scenario with this method's policy and this seed."""
        data = self.scenario.model_dump(mode="json")
        data["seed"] = seed
        data["policy"] = self.method(method).policy.model_dump(mode="json")
        data["baselines"] = []
        return ExperimentConfig.model_validate(data)

    def run_dir(self, method: str, seed: int) -> Path:
        return run_dir_of(self.out, method, seed)

    def manifest(self) -> dict[str, Any]:
        """The content of ``comparison.yaml``."""
        return {
            "name": self.scenario.name,
            "source": self.source,
            "command": self.command,
            "seeds": list(self.seeds),
            "targets": list(self.targets),
            "baseline": self.baseline,
            "methods": {m.name: m.policy.model_dump(mode="json") for m in self.methods},
            "scenario": self.scenario.model_dump(mode="json"),
        }

    def write_manifest(self) -> Path:
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / MANIFEST
        path.write_text(yaml.safe_dump(self.manifest(), sort_keys=False), encoding="utf-8")
        return path


def plan_comparison(
    config: str | Path | None = None,
    preset: str | None = None,
    overrides: Sequence[str] = (),
    methods: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    targets: Sequence[float] | None = None,
    baseline: str | None = None,
    out: str | Path | None = None,
    command: str | None = None,
) -> ComparisonPlan:
    """Resolve everything a comparison needs; raises :class:`ConfigError` naming what is wrong.

    Defaults: the methods of :func:`default_methods`, the scenario's seed, its ``sim.targets``,
    ``fedasync`` as the baseline when compared (else the first method), and
    ``runs/<name>-compare`` as the output directory (fixed, so the same command resumes).
    """
    scenario, named, source = read_scenario(config, preset, overrides)
    names = list(methods) if methods else default_methods(scenario, named)
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"method {dupes[0]!r} is listed twice")
    resolved = [resolve_method(n, scenario, named) for n in names]
    seed_list = [int(s) for s in seeds] if seeds else [scenario.seed]
    if any(s < 0 for s in seed_list) or len(set(seed_list)) != len(seed_list):
        raise ConfigError(f"seeds must be distinct non-negative integers, got {seed_list}")
    target_list = [float(t) for t in targets] if targets else list(scenario.sim.targets)
    if any(not 0 < t <= 1 for t in target_list):
        raise ConfigError(f"targets are accuracies in (0, 1], got {target_list}")
    if baseline is None:
        baseline = "fedasync" if "fedasync" in names else names[0]
    elif baseline not in names:
        raise ConfigError(f"baseline {baseline!r} is not among the methods compared ({', '.join(names)})")
    root = Path(out) if out is not None else Path("runs") / f"{scenario.name}-compare"
    return ComparisonPlan(scenario, resolved, seed_list, target_list, baseline, root, source, command)


# ---------------------------------------------------------------------------- run states
def _comparable(cfg: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(cfg)
    for section, key in NEUTRAL_FIELDS:
        out.get(section, {}).pop(key, None)
    return out


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        diffs = []
        for k in sorted(set(a) | set(b), key=str):
            diffs += _differences(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else str(k))
        return diffs
    return [] if a == b else [f"{prefix}: {a!r} there, {b!r} now"]


def run_state(plan: ComparisonPlan, method: str, seed: int, restart: bool = False) -> str:
    """``done`` (summary written), ``resume`` (checkpoint only) or ``new``.

    Raises :class:`ConfigError` when the directory holds a run of another configuration, unless
    ``restart`` (then it is run again from scratch).
    """
    d = plan.run_dir(method, seed)
    rd = RunDirectory(d)
    if restart or not rd.config.is_file():
        return "new"
    try:
        there = load_run_config(rd.config).model_dump(mode="json")
    except ConfigError as exc:
        raise ConfigError(f"{d}/config.yaml cannot be read ({exc}); remove the directory or pass --restart") from None
    now = plan.run_config(method, seed).model_dump(mode="json")
    diffs = _differences(_comparable(there), _comparable(now))
    if diffs:
        raise ConfigError(f"{d} holds a run of another configuration ({'; '.join(diffs[:3])}"
                          f"{'; ...' if len(diffs) > 3 else ''}); use another --out, or --restart to run it again")
    if rd.is_finished():
        return "done"
    if rd.checkpoint.is_file():
        return "resume"
    return "new"


# ---------------------------------------------------------------------------- running
def _execute(spec: RunSpec, scenario_cache: dict[Any, Any] | None, on_progress: Callable[[dict[str, Any]], None] | None) -> dict[str, Any]:
    """Run (or resume) one run and return its summary without the history."""
    from prfl.run import build_scenario, resume_run, run_policy

    out = Path(spec.out_dir)
    if spec.action == "resume":
        summary = resume_run(out, on_progress=on_progress)
    else:
        if out.exists():
            shutil.rmtree(out)
        cfg = ExperimentConfig.model_validate(spec.config)
        key = yaml.safe_dump({**spec.config, "policy": None}, sort_keys=True)
        sc = scenario_cache.get(key) if scenario_cache is not None else None
        if sc is None:
            sc = build_scenario(cfg)
            if scenario_cache is not None:
                scenario_cache.clear()  # keep one scenario (one seed's data) in memory
                scenario_cache[key] = sc
        summary = run_policy(sc, cfg.policy, out, on_progress=on_progress)
    summary.pop("history", None)
    return summary


def _progress_data(rec: dict[str, Any]) -> dict[str, Any]:
    return {"time": rec.get("time"), "round": rec.get("round"), "accuracy": rec.get("accuracy")}


_EVENTS: Any = None  # the queue a pool worker reports through (set by the initializer)


def _init_pool_worker(events: Any, threads: int) -> None:
    global _EVENTS
    _EVENTS = events
    import torch

    torch.set_num_threads(threads)


def _pool_run(spec: RunSpec) -> dict[str, Any]:
    _EVENTS.put(("start", spec.method, spec.seed, {"action": spec.action}))

    def progress(rec: dict[str, Any]) -> None:
        _EVENTS.put(("progress", spec.method, spec.seed, _progress_data(rec)))

    return _execute(spec, None, progress)


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


@dataclass
class ComparisonResult:
    """What a comparison did and wrote."""

    plan: ComparisonPlan
    ran: list[tuple[str, int]]
    skipped: list[tuple[str, int]]
    failed: dict[tuple[str, int], str]
    outputs: dict[str, Path]
    report: Path | None
    runset: RunSet | None


def pending_runs(plan: ComparisonPlan, restart: bool = False) -> tuple[list[RunSpec], list[tuple[str, int]]]:
    """(runs to do, runs already complete); checks every existing run directory first."""
    todo, done = [], []
    for seed in plan.seeds:
        for m in plan.methods:
            state = run_state(plan, m.name, seed, restart)
            if state == "done":
                done.append((m.name, seed))
                continue
            cfg = plan.run_config(m.name, seed)
            todo.append(RunSpec(m.name, seed, cfg.model_dump(mode="json"), str(plan.run_dir(m.name, seed)), state))
    return todo, done


def run_comparison(
    plan: ComparisonPlan,
    jobs: int = 1,
    restart: bool = False,
    on_event: OnEvent | None = None,
    report: bool = True,
) -> ComparisonResult:
    """Run every pending run of ``plan``, then write tables, plots and (``report``) ``report.html``.

    ``jobs`` > 1 runs that many runs at once in a process pool, each on the inline executor with
    ``cpus // jobs`` torch threads; ``jobs`` = 0 picks ``min(pending runs, cpus)``; ``jobs`` = 1 runs
    in this process with the scenario's own executor. A failing run is reported (``failed`` event
    and :attr:`ComparisonResult.failed`) and the others go on.
    """
    emit = on_event or (lambda ev: None)
    todo, done = pending_runs(plan, restart)
    cpus = available_cpus()
    if jobs <= 0:
        jobs = max(1, min(len(todo), cpus))
    if jobs > 1:  # parallel runs: each on the inline executor
        todo = [dataclasses.replace(s, config={**s.config, "sim": {**s.config["sim"], "executor": "inline"}}) for s in todo]
    plan.write_manifest()
    for method, seed in done:
        emit(RunEvent("skip", method, seed))
    failed: dict[tuple[str, int], str] = {}
    ran: list[tuple[str, int]] = []

    def finished(spec: RunSpec, summary: dict[str, Any] | None, error: BaseException | None) -> None:
        key = (spec.method, spec.seed)
        if error is not None:
            failed[key] = f"{type(error).__name__}: {error}"
            emit(RunEvent("failed", spec.method, spec.seed, {"error": failed[key]}))
        else:
            ran.append(key)
            emit(RunEvent("done", spec.method, spec.seed, dict(summary or {})))

    if jobs == 1 or len(todo) <= 1:
        cache: dict[Any, Any] = {}
        for spec in todo:
            emit(RunEvent("start", spec.method, spec.seed, {"action": spec.action}))

            def progress(rec: dict[str, Any], spec: RunSpec = spec) -> None:
                emit(RunEvent("progress", spec.method, spec.seed, _progress_data(rec)))

            try:
                summary = _execute(spec, cache, progress)
            except Exception as exc:  # noqa: BLE001 - one failed run must not stop the others
                finished(spec, None, exc)
            else:
                finished(spec, summary, None)
    else:
        _run_pool(todo, jobs, max(1, cpus // jobs), emit, finished)

    rs = load_comparison(plan.out)
    from prfl.report.html import write_report
    from prfl.report.outputs import write_outputs

    outputs = write_outputs(rs, plan.out)
    report_path = None
    if report:
        plots = {k.split("/")[1][: -len(".png")]: v for k, v in outputs.items() if k.startswith("plots/")}
        report_path = write_report(plan.out, plot_paths=plots, runset=rs)
    return ComparisonResult(plan, ran, done, failed, outputs, report_path, rs)


def _run_pool(
    todo: list[RunSpec],
    jobs: int,
    threads: int,
    emit: OnEvent,
    finished: Callable[[RunSpec, dict[str, Any] | None, BaseException | None], None],
) -> None:
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        events = manager.Queue()

        def drain() -> None:
            while True:
                try:
                    kind, method, seed, data = events.get_nowait()
                except queue_mod.Empty:
                    return
                emit(RunEvent(kind, method, seed, data))

        with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_init_pool_worker,
                                 initargs=(events, threads)) as pool:
            futures: dict[Future[dict[str, Any]], RunSpec] = {pool.submit(_pool_run, s): s for s in todo}
            try:
                while futures:
                    done, _ = wait(futures, timeout=0.25, return_when=FIRST_COMPLETED)
                    drain()
                    for fut in done:
                        spec = futures.pop(fut)
                        exc = fut.exception()
                        finished(spec, None if exc else fut.result(), exc)
            except BaseException:  # e.g. Ctrl-C: queued runs are dropped, running ones keep their checkpoints
                pool.shutdown(wait=False, cancel_futures=True)
                raise
        drain()


def describe_plan(plan: ComparisonPlan) -> Iterable[str]:
    """Human-readable lines: the methods and where each came from."""
    for m in plan.methods:
        opts = ", ".join(f"{k}={v}" for k, v in m.policy.options.items()) or "defaults"
        yield f"{m.name}: {m.policy.name} ({opts}) [{m.source}]"
