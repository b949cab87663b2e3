"""A set of runs to report on: methods, each with one run per seed.

Three kinds of directory are understood (see :func:`load_runset`):

* a **comparison directory** written by ``prfl compare``: ``comparison.yaml`` (the manifest: the
  scenario, the methods and their policy configs, seeds, targets, baseline) and one run directory
  per method and seed under ``runs/<method>/seed<k>/``;
* a **run directory** (``config.yaml`` + ``history.jsonl``): one method, one seed;
* a **run root** written by ``prfl run`` (a directory of run directories, one per policy).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from prfl.report.analysis import (
    MethodSummary,
    RunData,
    add_speedups,
    is_run_dir,
    load_run,
    summarise_method,
)

MANIFEST = "comparison.yaml"
RUNS_DIR = "runs"


def run_dir_of(root: str | Path, method: str, seed: int) -> Path:
    """Where a comparison keeps the run of ``method`` with ``seed``."""
    return Path(root) / RUNS_DIR / method / f"seed{seed}"


@dataclass
class RunSet:
    """Runs grouped by method (in display order), with the targets and baseline of the tables."""

    title: str
    kind: str  # "comparison", "run" or "runs"
    root: Path
    methods: dict[str, list[RunData]]
    policies: dict[str, str]
    targets: list[float]
    baseline: str | None
    config_text: str
    missing: list[str] = field(default_factory=list)  # runs that are absent or unfinished
    command: str | None = None
    # each method's policy configuration ({"name": ..., "options": {...}}) as the runs were given it
    method_policies: dict[str, dict[str, Any]] = field(default_factory=dict)
    scenario: dict[str, Any] = field(default_factory=dict)  # the configuration every run shares, less its policy

    @property
    def clock(self) -> str:
        """``wall`` when every run ran in real time (on Flower), else ``virtual`` (the simulator)."""
        clocks = {run_clock(r) for runs in self.methods.values() for r in runs}
        return "wall" if clocks == {"wall"} else "virtual"

    def policy_configs(self) -> dict[str, dict[str, Any]]:
        """Each method's policy with every option, the defaults filled in (what the runs used)."""
        from prfl.explain import resolved_policy

        out = {}
        for method in self.methods:
            pcfg = self.method_policies.get(method) or {"name": self.policies.get(method, method), "options": {}}
            out[method] = resolved_policy(pcfg)
        return out

    def summaries(self) -> list[MethodSummary]:
        """Per-method summaries of the complete runs, with speed-ups against the baseline."""
        out = []
        for method, runs in self.methods.items():
            done = [r for r in runs if r.complete]
            if done:
                out.append(summarise_method(method, self.policies.get(method, method), done, self.targets))
        add_speedups(out, self.baseline)
        return out

    def complete_runs(self) -> dict[str, list[RunData]]:
        return {m: [r for r in runs if r.complete] for m, runs in self.methods.items() if any(r.complete for r in runs)}


def run_clock(run: RunData) -> str:
    """``wall`` for a run made on Flower (real seconds), ``virtual`` for a simulator run."""
    summary = run.summary or {}
    return "wall" if summary.get("clock") == "wall" or summary.get("driver") == "flower" else "virtual"


def _policy_of(config: dict[str, Any] | None) -> dict[str, Any]:
    pol = (config or {}).get("policy") or {}
    return {"name": pol.get("name"), "options": dict(pol.get("options") or {})} if pol.get("name") else {}


def _scenario_of(config: dict[str, Any] | None) -> dict[str, Any]:
    return {k: v for k, v in (config or {}).items() if k not in ("policy", "baselines")}


def _targets_of(config: dict[str, Any] | None) -> list[float]:
    if not config:
        return []
    return [float(t) for t in (config.get("sim") or {}).get("targets") or []]


def load_comparison(root: str | Path) -> RunSet:
    """Read a comparison directory (its manifest and every run directory it names)."""
    root = Path(root)
    manifest = yaml.safe_load((root / MANIFEST).read_text(encoding="utf-8")) or {}
    methods: dict[str, list[RunData]] = {}
    policies: dict[str, str] = {}
    missing: list[str] = []
    for method, pcfg in (manifest.get("methods") or {}).items():
        policies[method] = str((pcfg or {}).get("name", method))
        methods[method] = []
        for seed in manifest.get("seeds") or []:
            d = run_dir_of(root, method, int(seed))
            run = load_run(d) if d.is_dir() else None
            if run is None or not run.complete:
                missing.append(f"{method} seed {seed}")
            if run is not None:
                methods[method].append(run)
    return RunSet(
        title=str(manifest.get("name", root.name)),
        kind="comparison",
        root=root,
        methods=methods,
        policies=policies,
        targets=[float(t) for t in manifest.get("targets") or []],
        baseline=manifest.get("baseline"),
        config_text=(root / MANIFEST).read_text(encoding="utf-8"),
        missing=missing,
        command=manifest.get("command"),
        method_policies={m: _policy_of({"policy": p}) for m, p in (manifest.get("methods") or {}).items()},
        scenario=_scenario_of(manifest.get("scenario")),
    )


def load_single_run(path: str | Path) -> RunSet:
    """A run directory as a run set of one method and one seed."""
    path = Path(path)
    run = load_run(path)
    policy = str(((run.config or {}).get("policy") or {}).get("name") or (run.summary or {}).get("policy") or path.name)
    return RunSet(
        title=str((run.config or {}).get("name", path.name)),
        kind="run",
        root=path,
        methods={policy: [run]},
        policies={policy: policy},
        targets=_targets_of(run.config),
        baseline=None,
        config_text=(path / "config.yaml").read_text(encoding="utf-8"),
        missing=[] if run.complete else [f"{policy} (unfinished)"],
        method_policies={policy: _policy_of(run.config)},
        scenario=_scenario_of(run.config),
    )


def load_run_root(path: str | Path) -> RunSet:
    """A directory of run directories (``prfl run`` with baselines): one method per directory."""
    path = Path(path)
    dirs = sorted(d for d in path.iterdir() if d.is_dir() and is_run_dir(d))
    if not dirs:
        raise FileNotFoundError(f"{path} holds no run directories (config.yaml + history.jsonl)")
    methods = {d.name: [load_run(d)] for d in dirs}
    policies = {d.name: str(((r[0].config or {}).get("policy") or {}).get("name", d.name)) for d, r in zip(dirs, methods.values())}
    first = methods[dirs[0].name][0]
    baseline = "fedasync" if "fedasync" in methods else None
    return RunSet(
        title=str((first.config or {}).get("name", path.name)),
        kind="runs",
        root=path,
        methods=methods,
        policies=policies,
        targets=_targets_of(first.config),
        baseline=baseline,
        config_text=(dirs[0] / "config.yaml").read_text(encoding="utf-8"),
        missing=[f"{m} (unfinished)" for m, r in methods.items() if not r[0].complete],
        method_policies={m: _policy_of(r[0].config) for m, r in methods.items()},
        scenario=_scenario_of(first.config),
    )


def load_runset(path: str | Path) -> RunSet:
    """Load a comparison directory, a run directory or a directory of run directories."""
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"{p} is not a directory")
    if (p / MANIFEST).is_file():
        return load_comparison(p)
    if is_run_dir(p):
        return load_single_run(p)
    return load_run_root(p)
