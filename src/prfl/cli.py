"""The ``prfl`` command line: run experiments, resume them, inspect presets and data sets."""

from __future__ import annotations

import json
import logging
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from prfl.config import ConfigError, ExperimentConfig, load_config, preset_names

app = typer.Typer(add_completion=False, no_args_is_help=False, help="prfl: federated learning across heterogeneous devices.")
console = Console(stderr=False)
DEFAULT_PRESET = "demo"


def _fail(msg: str) -> None:
    from rich.markup import escape

    # soft wrap: a long path in the message stays on one line, ready to copy
    console.print(f"[bold red]error:[/] {escape(msg)}", soft_wrap=True, highlight=False)
    raise typer.Exit(code=2)


class RunProgress:
    """A rich progress bar per run: virtual time, server round, latest accuracy, wall-clock ETA."""

    def __init__(self, progress: Progress, label: str, cfg: ExperimentConfig) -> None:
        self.progress = progress
        self.by_rounds = cfg.sim.max_rounds is not None
        total = cfg.sim.max_rounds if self.by_rounds else cfg.sim.max_time
        self.task = progress.add_task(label, total=total, vt="0s", rnd=0, acc="-")

    def __call__(self, rec: dict[str, Any]) -> None:
        done = rec["round"] if self.by_rounds else rec["time"]
        self.progress.update(
            self.task, completed=done, vt=f"{rec['time']:.0f}s", rnd=rec["round"], acc=f"{rec['accuracy']:.3f}"
        )

    def finish(self) -> None:
        t = self.progress.tasks[self.task]
        self.progress.update(self.task, completed=t.total)


def _progress(quiet: bool = False) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description:<10}"),
        BarColumn(),
        TextColumn("virtual {task.fields[vt]:>7}"),
        TextColumn("round {task.fields[rnd]:>5}"),
        TextColumn("acc {task.fields[acc]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        disable=quiet,
    )


def _seconds(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.0f}" if x >= 100 else f"{x:.3g}"


def _summary_table(results: list[dict[str, Any]], targets: list[float]) -> Table:
    table = Table(title="results (virtual time)")
    table.add_column("policy", no_wrap=True)
    table.add_column("final", justify="right")
    table.add_column("best", justify="right")
    for t in targets:
        table.add_column(f"t({t:g}) s", justify="right")
    table.add_column("rounds", justify="right")
    table.add_column("virtual s", justify="right")
    table.add_column("local min/max", justify="right")
    table.add_column("wall s", justify="right")
    for r in results:
        tta = r.get("time_to_accuracy", {})
        lr = r["local_rounds"]
        row = [r["policy"], f"{r['final_accuracy']:.3f}", f"{r['best_accuracy']:.3f}"]
        row += [_seconds(tta.get(f"{t:g}")) for t in targets]
        row += [str(r["server_rounds"]), _seconds(r["virtual_seconds"]), f"{min(lr)}/{max(lr)}", f"{r['wall_seconds']:.1f}"]
        table.add_row(*row)
    return table


@app.command()
def run(
    config: Optional[Path] = typer.Argument(None, help="experiment YAML (default: the 'demo' preset)"),
    preset: Optional[str] = typer.Option(None, "--preset", "-p", help="a preset scenario shipped with prfl"),
    set_: list[str] = typer.Option([], "--set", "-s", help="override a field: key.path=value (repeatable)"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="output directory (default runs/<name>-<time>)"),
    resume: Optional[Path] = typer.Option(None, "--resume", help="continue the run in this directory from its checkpoint"),
    baselines: bool = typer.Option(True, "--baselines/--no-baselines", help="also run the config's baselines"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress display"),
) -> None:
    """Run an experiment (the main policy and its baselines) in the virtual-clock simulator."""
    from prfl.run import build_scenario, resume_run, run_policy

    logging.basicConfig(level=logging.WARNING)
    try:
        if resume is not None:
            with _progress(quiet) as progress:
                cfg = load_config(resume / "config.yaml")
                bar = RunProgress(progress, cfg.policy.name, cfg)
                res = resume_run(resume, on_progress=None if quiet else bar)
                bar.finish()
            res.pop("history", None)
            console.print(_summary_table([res], cfg.sim.targets))
            console.print(f"results: [bold]{resume}[/]")
            _exit_if_aborted([res])
            return
        if config is None and preset is None:
            preset = DEFAULT_PRESET
        cfg = load_config(config, set_, preset=preset)
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        root = out or Path("runs") / f"{cfg.name}-{stamp}"
        policies = [cfg.policy] + (list(cfg.baselines) if baselines else [])
        console.print(f"[bold]{cfg.name}[/]: {cfg.data.dataset} / {cfg.model.name} / {cfg.data.num_clients} clients "
                      f"({cfg.data.partition}) / fleet {cfg.fleet.file or cfg.fleet.preset} / seed {cfg.seed}")
        sc = build_scenario(cfg)
        results = []
        with _progress(quiet) as progress:
            for i, pcfg in enumerate(policies):
                name = pcfg.name if [p.name for p in policies].count(pcfg.name) == 1 else f"{pcfg.name}-{i}"
                bar = RunProgress(progress, name, cfg)
                res = run_policy(sc, pcfg, root / name, on_progress=None if quiet else bar)
                bar.finish()
                res.pop("history", None)
                results.append(res)
        console.print(_summary_table(results, cfg.sim.targets))
        if len(results) > 1:
            from prfl.report.plots import plot_accuracy
            from prfl.sim.history import read_history

            curves = {p.name: list(read_history(root / p.name / "history.jsonl")) for p in policies if (root / p.name).exists()}
            plot_accuracy(curves, root / "accuracy.png", title=cfg.name)
            (root / "results.json").write_text(json.dumps(results, indent=2, default=float), encoding="utf-8")
        console.print(f"results: [bold]{root}[/] (config.yaml, history.jsonl, summary.json, accuracy.png per policy)")
        _exit_if_aborted(results)
    except ConfigError as exc:
        _fail(str(exc))
    except (ValueError, FileNotFoundError) as exc:
        _fail(str(exc))


def _exit_if_aborted(results: list[dict[str, Any]]) -> None:
    """Exit with code 3 when a run ended because every client was quarantined (its results are
    kept, but they are not an experiment's outcome)."""
    from rich.markup import escape

    from prfl.policies.fleet import QUARANTINED_STOP

    aborted = [r for r in results if str(r.get("stopped") or "").startswith(QUARANTINED_STOP)]
    for r in aborted:
        console.print(f"[bold red]aborted:[/] {escape(str(r.get('policy')))}: {escape(r['stopped'])}", highlight=False)
    if aborted:
        raise typer.Exit(code=3)


@app.command()
def config(
    config: Optional[Path] = typer.Argument(None, help="experiment YAML"),
    preset: Optional[str] = typer.Option(None, "--preset", "-p"),
    set_: list[str] = typer.Option([], "--set", "-s", help="override a field: key.path=value"),
) -> None:
    """Print the resolved configuration (defaults, file or preset, then overrides)."""
    import yaml

    try:
        cfg = load_config(config, set_, preset=preset)
    except ConfigError as exc:
        _fail(str(exc))
        return
    console.print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), end="", markup=False, highlight=False)


@app.command()
def presets() -> None:
    """List the preset scenarios shipped with prfl."""
    for name in preset_names():
        cfg = load_config(preset=name)
        console.print(f"{name:<22} {cfg.data.dataset:<14} {cfg.model.name:<9} {cfg.policy.name} "
                      f"+ {', '.join(p.name for p in cfg.baselines) or '-'}")


@app.command()
def datasets() -> None:
    """List the data sets and whether their files are available here."""
    from prfl.data import DATASETS, DataError, load_dataset

    for name in DATASETS:
        try:
            t0 = time.perf_counter()
            ds = load_dataset(name)
            status = f"ok: {len(ds.y_train)} train / {len(ds.y_test)} test, {ds.num_classes} classes, shape {ds.input_shape} ({time.perf_counter() - t0:.1f}s)"
        except DataError as exc:
            status = "missing: " + str(exc).splitlines()[0]
        console.print(f"{name:<14} {status}", markup=False, highlight=False)


def main() -> None:
    app()


if __name__ == "__main__":
    main()


# ---------------------------------------------------------------------------- compare and report
class _SpaceSeparatedLists(typer.core.TyperCommand):
    """Lets list options take several values after one flag (``--seeds 0 1 2``).

    The words after ``--methods``, ``--seeds`` or ``--targets`` up to the next option are rewritten
    into repeated options (``--seeds 0 --seeds 1 --seeds 2``), which is what click parses; numbers
    only for seeds and targets, and not a ``.yaml``/``.yml`` path for methods (that is the scenario).
    """

    MULTI = {"--methods": "word", "-m": "word", "--seeds": "int", "--targets": "float"}

    @staticmethod
    def _fits(kind: str, token: str) -> bool:
        if token.startswith("-") and kind == "word":
            return False
        if kind == "word":
            return not token.endswith((".yaml", ".yml"))
        try:
            (int if kind == "int" else float)(token)
        except ValueError:
            return False
        return True

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        return super().parse_args(ctx, self.rewrite(args))

    @classmethod
    def rewrite(cls, args: list[str]) -> list[str]:
        """The arguments with every extra list value behind its own flag."""
        out: list[str] = []
        flag: str | None = None
        fresh = False
        for token in args:
            if token in cls.MULTI:
                flag, fresh = token, True
                out.append(token)
                continue
            if flag is not None and not fresh and cls._fits(cls.MULTI[flag], token):
                out += [flag, token]
                continue
            if not fresh:
                flag = None
            fresh = False
            out.append(token)
        return out


def _split_words(values: list[str]) -> list[str]:
    return [w for v in values for w in v.replace(",", " ").split()]


class CompareProgress:
    """Rich progress for a comparison: one bar over all runs and one bar per run that starts."""

    def __init__(self, progress: Progress, plan: Any, total: int) -> None:
        self.progress = progress
        self.plan = plan
        self.overall = progress.add_task("all runs", total=total, info="")
        self.tasks: dict[tuple[str, int], Any] = {}
        self.closed: set[tuple[str, int]] = set()
        self.counts = {"done": 0, "skip": 0, "failed": 0}

    def _info(self) -> str:
        c = self.counts
        return f"{c['done']} ran, {c['skip']} already done, {c['failed']} failed"

    def __call__(self, ev: Any) -> None:
        key = (ev.method, ev.seed)
        label = f"{ev.method} s{ev.seed}"
        sim = self.plan.scenario.sim
        by_rounds = sim.max_rounds is not None
        if ev.kind == "start":
            total = sim.max_rounds if by_rounds else sim.max_time
            note = "resumed" if ev.data.get("action") == "resume" else ""
            self.tasks[key] = self.progress.add_task(label, total=total, info=note)
        elif ev.kind == "progress" and key in self.tasks and key not in self.closed:
            d = ev.data
            done = d["round"] if by_rounds else d["time"]
            self.progress.update(self.tasks[key], completed=done,
                                 info=f"virtual {d['time']:.0f}s  round {d['round']}  acc {d['accuracy']:.3f}")
        elif ev.kind in ("done", "failed", "skip"):
            self.closed.add(key)
            self.counts[ev.kind] += 1
            if key in self.tasks:
                t = self.progress.tasks[self.tasks[key]]
                info = (f"final acc {ev.data.get('final_accuracy') or 0:.3f}, {ev.data.get('server_rounds')} rounds"
                        if ev.kind == "done" else "[red]failed[/]")
                self.progress.update(self.tasks[key], completed=t.total, info=info)
            self.progress.update(self.overall, advance=1, info=self._info())


def _rich_table(title: str, table: tuple[list[str], list[list[str]]]) -> Table:
    headers, rows = table
    out = Table(title=title)
    for i, h in enumerate(headers):
        out.add_column(h, justify="left" if i == 0 else "right")
    for r in rows:
        out.add_row(*r)
    return out


@app.command(cls=_SpaceSeparatedLists)
def compare(
    config: Optional[Path] = typer.Argument(None, help="scenario YAML, may hold a methods: mapping (default: the 'demo' preset)"),
    preset: Optional[str] = typer.Option(None, "--preset", "-p", help="a preset scenario shipped with prfl"),
    set_: list[str] = typer.Option([], "--set", "-s", help="override a scenario field: key.path=value (repeatable)"),
    methods: list[str] = typer.Option([], "--methods", "-m", help="methods: policies, prfl-<ablation> or methods: variants "
                                      "(--methods prfl fedasync; default: policy, baselines and methods: variants)"),
    seeds: list[int] = typer.Option([], "--seeds", help="seeds (--seeds 0 1 2; default: the scenario's seed)"),
    targets: list[float] = typer.Option([], "--targets", help="target accuracies for time-to-accuracy (default: sim.targets)"),
    baseline: Optional[str] = typer.Option(None, "--baseline", "-b", help="speed-ups against this method (default: fedasync if compared, else the first)"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="output directory (default runs/<name>-compare; rerun to resume)"),
    jobs: int = typer.Option(0, "--jobs", "-j", help="runs at once (process pool, inline executor per run); 0 = one per CPU"),
    restart: bool = typer.Option(False, "--restart", help="run again runs that are complete or made by another configuration"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress display"),
) -> None:
    """Compare methods (and ablations) over several seeds on one scenario; resumable."""
    import shlex
    import sys

    from rich.markup import escape

    from prfl.compare import describe_plan, pending_runs, plan_comparison, run_comparison
    from prfl.report import tables

    logging.basicConfig(level=logging.WARNING)
    if config is None and preset is None:
        preset = DEFAULT_PRESET
    try:
        plan = plan_comparison(config, preset, set_, _split_words(methods) or None, seeds or None, targets or None,
                               baseline, out, command=shlex.join(["prfl", *sys.argv[1:]]))
        _, done = pending_runs(plan, restart)
    except ConfigError as exc:
        _fail(str(exc))
        return
    n_runs = len(plan.methods) * len(plan.seeds)
    console.print(f"[bold]{plan.scenario.name}[/] ({plan.source}): {len(plan.methods)} methods x {len(plan.seeds)} seeds "
                  f"= {n_runs} runs, {len(done)} already complete; output [bold]{plan.out}[/]")
    for line in describe_plan(plan):
        console.print(f"  {line}", highlight=False, markup=False)
    progress = Progress(
        TextColumn("[bold]{task.description:<18}"),
        BarColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=console,
        disable=quiet,
    )
    try:
        with progress:
            tracker = CompareProgress(progress, plan, n_runs)
            result = run_comparison(plan, jobs=jobs, restart=restart, on_event=tracker)
    except ConfigError as exc:
        _fail(str(exc))
        return
    except KeyboardInterrupt:
        console.print("[bold yellow]interrupted:[/] finished runs are kept; run the same command again to resume")
        raise typer.Exit(code=130) from None
    summ = result.runset.summaries() if result.runset is not None else []
    if plan.targets:
        console.print(_rich_table(f"time to accuracy (virtual s, mean ± sd over seeds; speed-up vs {plan.baseline})",
                                  tables.time_to_accuracy_table(summ, plan.targets, plan.baseline)))
    console.print(_rich_table("final accuracy", tables.accuracy_table(summ)))
    console.print(_rich_table("participation (local rounds per client)", tables.participation_table(summ)))
    for (method, seed), err in result.failed.items():
        console.print(f"[bold red]failed:[/] {method} seed {seed}: {escape(err)}", highlight=False)
    console.print(f"results: [bold]{plan.out}[/] (results.md, tables/, plots/, report.html)")
    if result.failed:
        raise typer.Exit(code=1)


@app.command()
def report(
    directory: Path = typer.Argument(..., help="a run directory, a `prfl run` output root or a `prfl compare` directory"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="HTML file to write (default DIR/report.html)"),
) -> None:
    """Build one self-contained HTML page (tables, embedded plots, configuration) from results."""
    from prfl.report.html import write_report

    try:
        path = write_report(directory, out)
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
        return
    console.print(f"report: [bold]{path}[/]")
