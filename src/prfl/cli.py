"""The ``prfl`` command line: run experiments, resume them, compare methods, build reports, and
inspect presets, data sets and the configuration.

Every error a user can fix (a bad configuration, a missing or corrupt data file, a bad fleet
file, a bad checkpoint, a bad directory) is printed as one line, ``error: what``, sometimes with a
second, ``fix: how``, and exits with code 2. ``--debug`` (anywhere on the command line) or
``PRFL_DEBUG=1`` prints the traceback as well. An unexpected failure exits with code 1.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import traceback
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

import click
import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from typer.core import TyperGroup

from prfl.config import ConfigError, ExperimentConfig, format_errors, load_config, load_run_config, preset_names

console = Console(stderr=False)
err_console = Console(stderr=True)
DEFAULT_PRESET = "demo"
DEBUG_ENV = "PRFL_DEBUG"


class UserError(Exception):
    """A problem the user can fix: ``what`` went wrong and, when known, ``fix``."""

    def __init__(self, what: str, fix: str | None = None) -> None:
        super().__init__(what if fix is None else f"{what}\n{fix}")
        self.what, self.fix = what, fix


def _user_error_types() -> tuple[type[BaseException], ...]:
    """Exceptions that describe bad input (their message names the problem)."""
    import yaml

    from prfl.data import DataError
    from prfl.runtime.checkpoint import CheckpointError

    # ConfigError, FleetError, PartitionError, CheckpointError and pydantic's ValidationError are
    # ValueErrors; OSError covers unreadable files and directories
    return (UserError, ConfigError, DataError, CheckpointError, ValueError, OSError, yaml.YAMLError)


def split_message(text: str) -> tuple[str, str | None]:
    """A possibly multi-line error message as (what, fix).

    Indented list items (``  - a``) are joined onto the line before them (``searched: a, b``); the
    first line is what went wrong and the remaining lines, joined, are the fix.
    """
    merged: list[str] = []
    for raw in text.strip().splitlines():
        line = raw.strip()
        if not line:
            continue
        if merged and (line.startswith(("- ", "* ")) or (raw[:1].isspace() and line.startswith("("))):
            item = line[2:] if line.startswith(("- ", "* ")) else line[1:].rstrip(")").replace(": ", " (", 1) + (
                ")" if ": " in line else "")
            merged[-1] += (" " if merged[-1].endswith(":") else ", ") + item
        else:
            merged.append(line)
    if not merged:
        return "unknown error", None
    return merged[0], (" ".join(merged[1:]) or None)


def describe_error(exc: BaseException) -> tuple[str, str | None]:
    """(what, fix) for an exception raised by bad input."""
    from pydantic import ValidationError

    if isinstance(exc, UserError):
        return exc.what, exc.fix
    if isinstance(exc, ValidationError):
        return split_message(format_errors(exc, exc.title))
    if isinstance(exc, FileNotFoundError) and exc.filename is not None:
        return f"{exc.filename}: no such file or directory", None
    if isinstance(exc, PermissionError) and exc.filename is not None:
        return f"{exc.filename}: permission denied", "check the file's permissions"
    if isinstance(exc, IsADirectoryError) and exc.filename is not None:
        return f"{exc.filename} is a directory, not a file", None
    text = str(exc) or type(exc).__name__
    return split_message(text)


def _fail(what: str, fix: str | None = None, code: int = 2) -> None:
    """Print ``error: what`` (and ``fix: ...``) on stderr, one line each, and exit with ``code``."""
    # soft wrap: a long path in the message stays on one line, ready to copy
    err_console.print(f"[bold red]error:[/] {escape(what)}", soft_wrap=True, highlight=False)
    if fix:
        err_console.print(f"[bold]fix:[/] {escape(fix)}", soft_wrap=True, highlight=False)
    raise typer.Exit(code=code)


def _debug_requested(args: list[str]) -> tuple[bool, list[str]]:
    """(--debug given or PRFL_DEBUG set, the arguments without --debug); ``--`` ends options."""
    stop = args.index("--") if "--" in args else len(args)
    flag = "--debug" in args[:stop]
    rest = [a for i, a in enumerate(args) if not (i < stop and a == "--debug")]
    env = os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")
    return flag or env, rest


def _restore_argument_help(command: click.Command) -> None:
    """Give positional arguments back the help text their declaration carries.

    Typer stores an argument's help on the click parameter before click's own constructor runs,
    and click 8.2+ then resets it to None, so ``--help`` would list arguments without meaning.
    """
    import inspect

    callback = getattr(command, "callback", None)
    if callback is None:
        return
    try:
        infos = {name: p.default for name, p in inspect.signature(callback).parameters.items()}
    except (TypeError, ValueError):
        return
    for param in command.params:
        info = infos.get(param.name or "")
        if isinstance(param, click.Argument) and getattr(param, "help", None) is None:
            param.help = getattr(info, "help", None)  # type: ignore[attr-defined]


class PrflGroup(TyperGroup):
    """The ``prfl`` command group: ``--debug`` anywhere, one-line errors, exit codes."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for command in self.commands.values():
            _restore_argument_help(command)

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        debug, rest = _debug_requested(list(args))
        ctx.meta["prfl.debug"] = debug
        return super().parse_args(ctx, rest)

    def invoke(self, ctx: click.Context) -> Any:
        debug = bool(ctx.meta.get("prfl.debug"))
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.exceptions.Abort):
            raise
        except KeyboardInterrupt:
            err_console.print("[bold yellow]interrupted[/]", highlight=False)
            raise typer.Exit(code=130) from None
        except _user_error_types() as exc:
            if debug:
                sys.stderr.write(traceback.format_exc())
            what, fix = describe_error(exc)
            _fail(what, fix)
        except Exception as exc:  # noqa: BLE001 - a bug: say so in two lines, the traceback on request
            if debug:
                raise
            _fail(f"unexpected {type(exc).__name__}: {split_message(str(exc))[0]}",
                  f"run the command again with --debug for the traceback, and report it", code=1)


app = typer.Typer(
    cls=PrflGroup,
    add_completion=False,
    no_args_is_help=False,
    pretty_exceptions_enable=False,
    help="prfl: federated learning across heterogeneous devices.",
)


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help=f"on an error, print the traceback too (or set {DEBUG_ENV}=1)"),
) -> None:
    """prfl: federated learning across heterogeneous devices (PR-FL, baselines, a virtual-clock
    simulator, reports, and a Flower deployment path)."""


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


def _table(title: str | None = None) -> Table:
    """A table that fits 80 columns: no vertical rules, headers may span two lines."""
    return Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True, title_justify="left")


def _summary_table(results: list[dict[str, Any]], targets: list[float]) -> Table:
    """One row per policy: accuracy, time to each target, rounds, time spent."""
    table = _table("results (test accuracy; times in virtual seconds)")
    table.add_column("policy", no_wrap=True)
    table.add_column("final\nacc", justify="right", no_wrap=True)
    table.add_column("best\nacc", justify="right", no_wrap=True)
    for t in targets:
        table.add_column(f"time to\n{t:g}", justify="right", no_wrap=True)
    table.add_column("server\nrounds", justify="right", no_wrap=True)
    table.add_column("virtual\ns", justify="right", no_wrap=True)
    table.add_column("client\nrounds", justify="right", no_wrap=True)
    table.add_column("wall\ns", justify="right", no_wrap=True)
    for r in results:
        tta = r.get("time_to_accuracy", {})
        lr = r["local_rounds"]
        acc = [("-" if r.get(k) is None else f"{r[k]:.3f}") for k in ("final_accuracy", "best_accuracy")]
        row = [r["policy"], *acc]
        row += [_seconds(tta.get(f"{t:g}")) for t in targets]
        row += [str(r["server_rounds"]), _seconds(r["virtual_seconds"]), f"{min(lr)}-{max(lr)}" if lr else "-",
                f"{r['wall_seconds']:.0f}"]
        table.add_row(*row)
    table.caption = "time to X: first evaluation with accuracy >= X\nclient rounds: fewest-most tasks one client finished"
    table.caption_justify = "left"
    return table


def _say(text: str) -> None:
    """One line on stdout, never wrapped (paths stay whole); rich markup allowed."""
    console.print(text, soft_wrap=True, highlight=False)


@app.command()
def run(
    config: Optional[Path] = typer.Argument(None, help="experiment YAML (default: the 'demo' preset)", show_default=False),
    preset: Optional[str] = typer.Option(None, "--preset", "-p", help="a preset scenario shipped with prfl (`prfl presets`)"),
    set_: list[str] = typer.Option([], "--set", "-s", help="override a field: key.path=value (repeatable)"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="output directory (default runs/<name>-<time>)"),
    resume: Optional[Path] = typer.Option(None, "--resume", help="continue the run in this directory from its checkpoint"),
    extend_to: Optional[float] = typer.Option(None, "--extend-to", metavar="SECONDS",
                                              help="with --resume: take the run (finished or not) on to this virtual time"),
    baselines: bool = typer.Option(True, "--baselines/--no-baselines", help="also run the config's baselines"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress display"),
) -> None:
    """Run an experiment (the main policy and its baselines) in the virtual-clock simulator."""
    from prfl.run import build_scenario, resume_run, run_policy

    logging.basicConfig(level=logging.WARNING)
    if extend_to is not None and resume is None:
        raise UserError("--extend-to continues a run and needs --resume",
                        "e.g. prfl run --resume runs/demo-<time>/prfl --extend-to 3000")
    if resume is not None:
        if not (resume / "config.yaml").is_file():
            raise UserError(f"{resume} is not a run directory (no config.yaml)",
                            "give one policy's run directory, e.g. runs/demo-<time>/prfl")
        with _progress(quiet) as progress:
            cfg = load_run_config(resume / "config.yaml")
            if extend_to is not None:  # the bar's total; resume_run checks the time and records it
                cfg = cfg.with_max_time(extend_to)
            bar = RunProgress(progress, cfg.policy.name, cfg)
            # the engine's notes on a torn checkpoint are shown once the run goes on; when no
            # checkpoint is usable, the one-line error says it all
            with _HeldLogs("prfl.sim.engine") as held:
                def on_progress(rec: dict[str, Any]) -> None:
                    held.release()
                    if not quiet:
                        bar(rec)

                res = resume_run(resume, on_progress=on_progress, max_time=extend_to)
            bar.finish()
        res.pop("history", None)
        console.print(_summary_table([res], cfg.sim.targets))
        _say(f"results: [bold]{escape(str(resume))}[/] (config, history, summary, accuracy.png)")
        _say(f"next: [bold]prfl report {escape(str(resume))}[/]  (one HTML page: tables, plots, configuration)")
        _exit_if_aborted([res])
        return
    if config is None and preset is None:
        preset = DEFAULT_PRESET
    cfg = load_config(config, set_, preset=preset)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    root = out or Path("runs") / f"{cfg.name}-{stamp}"
    policies = [cfg.policy] + (list(cfg.baselines) if baselines else [])
    names = [p.name if [q.name for q in policies].count(p.name) == 1 else f"{p.name}-{i}" for i, p in enumerate(policies)]
    from prfl.explain import check_policy

    for i, pcfg in enumerate(policies):
        check_policy(pcfg, "policy" if i == 0 else f"baselines[{i - 1}]")
    sc = build_scenario(cfg)  # data, split, model and fleet: bad input fails here, before any output
    _say(f"[bold]{escape(cfg.name)}[/]: {cfg.data.dataset} / {cfg.model.name} / {cfg.data.num_clients} clients "
         f"({cfg.data.partition}) / fleet {escape(cfg.fleet.file or cfg.fleet.preset)} / seed {cfg.seed}")
    if sc.fleet.changes:
        from prfl.sim.devices import describe_change

        for ch in sc.fleet.changes:
            _say(f"  from {ch.at:g} virtual s: {escape(describe_change(ch, len(sc.fleet)))}")
    _say(f"policies: {', '.join(names)}; each stops at {cfg.sim.budget()}")
    results = []
    with _progress(quiet) as progress:
        for name, pcfg in zip(names, policies):
            bar = RunProgress(progress, name, cfg)
            res = run_policy(sc, pcfg, root / name, on_progress=None if quiet else bar)
            bar.finish()
            res.pop("history", None)
            results.append(res)
    console.print(_summary_table(results, cfg.sim.targets))
    _say(f"results: [bold]{escape(str(root))}[/]")
    dirs = " ".join(n + "/" for n in names)
    width = max(len(dirs), len("accuracy.png"))
    _say(f"  {escape(dirs):<{width}}  run directories (config, history, summary, accuracy.png)")
    if len(results) > 1:
        from prfl.report.plots import plot_accuracy, speed_change_marks
        from prfl.runtime.history import read_history

        curves = {n: list(read_history(root / n / "history.jsonl")) for n in names if (root / n).exists()}
        plot_accuracy(curves, root / "accuracy.png", title=cfg.name, marks=speed_change_marks(cfg.fleet.changes))
        (root / "results.json").write_text(json.dumps(results, indent=2, default=float), encoding="utf-8")
        _say(f"  {'accuracy.png':<{width}}  every policy's accuracy against virtual time (and .svg)")
        _say(f"  {'results.json':<{width}}  the table above, as numbers")
    _say(f"next: [bold]prfl report {escape(str(root))}[/]  (one HTML page: tables, plots, configuration)")
    _exit_if_aborted(results)


class _HeldLogs(logging.Filter):
    """Holds back a logger's records until :meth:`release` (or a clean exit); drops them when the
    block raises."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.logger = logging.getLogger(name)
        self.records: list[logging.LogRecord] = []
        self.holding = False

    def filter(self, record: logging.LogRecord) -> bool:
        if self.holding:
            self.records.append(record)
            return False
        return True

    def __enter__(self) -> "_HeldLogs":
        self.holding = True
        self.logger.addFilter(self)
        return self

    def release(self) -> None:
        if self.holding:
            self.holding = False
            for record in self.records:
                self.logger.handle(record)
            self.records.clear()

    def __exit__(self, exc_type: Any, *rest: Any) -> None:
        if exc_type is None:
            self.release()
        self.holding = False
        self.records.clear()
        self.logger.removeFilter(self)


def _exit_if_aborted(results: list[dict[str, Any]]) -> None:
    """Exit with code 3 when a run ended because every client was quarantined (its results are
    kept, but they are not an experiment's outcome)."""
    from prfl.policies.fleet import QUARANTINED_STOP

    aborted = [r for r in results if str(r.get("stopped") or "").startswith(QUARANTINED_STOP)]
    for r in aborted:
        console.print(f"[bold red]aborted:[/] {escape(str(r.get('policy')))}: {escape(r['stopped'])}", highlight=False)
    if aborted:
        raise typer.Exit(code=3)


@app.command()
def config(
    config: Optional[Path] = typer.Argument(None, help="experiment YAML (default: prfl's defaults)", show_default=False),
    preset: Optional[str] = typer.Option(None, "--preset", "-p", help="a preset scenario shipped with prfl (`prfl presets`)"),
    set_: list[str] = typer.Option([], "--set", "-s", help="override a field: key.path=value (repeatable)"),
    explain: bool = typer.Option(False, "--explain", "-e", help="put each field's meaning above it, as a comment"),
) -> None:
    """Print the resolved configuration: defaults, then the file or preset, then the overrides,
    with every option of the policy and baselines (their defaults where not set)."""
    from prfl.explain import explained_yaml, missing_options, resolved_yaml

    cfg = load_config(config, set_, preset=preset)
    text = explained_yaml(cfg) if explain else resolved_yaml(cfg)
    for item in missing_options(cfg):
        text += f"# {item} has no default: set it, or the run stops with an error\n"
    console.print(text, end="", markup=False, highlight=False, soft_wrap=True)


@app.command()
def presets() -> None:
    """List the preset scenarios shipped with prfl (run one with `prfl run --preset NAME`)."""
    for name in preset_names():
        cfg = load_config(preset=name)
        policies = ", ".join(p.name for p in [cfg.policy, *cfg.baselines])
        _say(f"[bold]{name:<20}[/] {cfg.data.dataset} / {cfg.model.name} / {cfg.data.num_clients} clients / "
             f"{cfg.sim.budget()}")
        _say(f"{'':<20} {policies}")


@app.command()
def datasets() -> None:
    """List the data sets and whether their files are available here (nothing is downloaded)."""
    from prfl.data import DATASETS, DataError, load_dataset

    for name in DATASETS:
        try:
            t0 = time.perf_counter()
            ds = load_dataset(name)
            status = (f"ok: {len(ds.y_train)} train / {len(ds.y_test)} test, {ds.num_classes} classes, "
                      f"shape {ds.input_shape} ({time.perf_counter() - t0:.1f}s)")
            fix = None
        except (DataError, OSError, ValueError) as exc:
            what, fix = describe_error(exc)
            status = "missing: " + what.removeprefix(f"{name}: ")
        console.print(f"{name:<13} {status}", markup=False, highlight=False, soft_wrap=True)
        if fix:
            console.print(f"{'':<13} fix: {fix}", markup=False, highlight=False, soft_wrap=True)


def main() -> None:
    app()


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
    """A report table for the terminal: headers broken over lines so that it fits 80 columns."""
    import textwrap

    headers, rows = table
    out = _table(title)
    for i, h in enumerate(headers):
        longest = max((len(w) for w in h.split()), default=1)
        label = "\n".join(textwrap.wrap(h, width=max(12, longest))) or h
        out.add_column(label, justify="left" if i == 0 else "right", overflow="fold")
    for r in rows:
        out.add_row(*r)
    return out


@app.command(cls=_SpaceSeparatedLists)
def compare(
    config: Optional[Path] = typer.Argument(None, help="scenario YAML, may hold a methods: mapping (default: the 'demo' preset)",
                                            show_default=False),
    preset: Optional[str] = typer.Option(None, "--preset", "-p", help="a preset scenario shipped with prfl (`prfl presets`)"),
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

    from prfl.compare import describe_plan, pending_runs, plan_comparison, run_comparison
    from prfl.report import tables

    logging.basicConfig(level=logging.WARNING)
    if config is None and preset is None:
        preset = DEFAULT_PRESET
    plan = plan_comparison(config, preset, set_, _split_words(methods) or None, seeds or None, targets or None,
                           baseline, out, command=shlex.join(["prfl", *sys.argv[1:]]))
    _, done = pending_runs(plan, restart)
    n_runs = len(plan.methods) * len(plan.seeds)
    _say(f"[bold]{escape(plan.scenario.name)}[/] ({escape(plan.source)}): {len(plan.methods)} methods x "
         f"{len(plan.seeds)} seeds = {n_runs} runs, {len(done)} already complete")
    _say(f"each run stops at {plan.scenario.sim.budget()}; output [bold]{escape(str(plan.out))}[/]")
    for line in describe_plan(plan):
        console.print(f"  {line}", highlight=False, markup=False, soft_wrap=True)
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
    except KeyboardInterrupt:
        console.print("[bold yellow]interrupted:[/] finished runs are kept; run the same command again to resume")
        raise typer.Exit(code=130) from None
    summ = result.runset.summaries() if result.runset is not None else []
    if plan.targets:
        console.print(_rich_table(f"time to accuracy (virtual s, mean ± sd over seeds; speed-up vs {plan.baseline})",
                                  tables.time_to_accuracy_table(summ, plan.targets, plan.baseline)))
    console.print(_rich_table("test accuracy (mean ± sd over seeds)", tables.accuracy_table(summ)))
    console.print(_rich_table("participation (local rounds per client)", tables.participation_table(summ)))
    for (method, seed), err in result.failed.items():
        console.print(f"[bold red]failed:[/] {method} seed {seed}: {escape(err)}", highlight=False, soft_wrap=True)
    root = escape(str(plan.out))
    _say(f"results: [bold]{root}[/]")
    _say("  report.html               every table, the plots, each method's configuration")
    _say("  results.md, summary.json  the tables as Markdown and as numbers (CSV: tables/)")
    _say("  plots/                    accuracy, egress, local rounds, densities (PNG, SVG)")
    _say("  runs/<method>/seed<k>/    one run directory per method and seed")
    _say(f"next: open [bold]{root}/report.html[/], or rebuild it with [bold]prfl report {root}[/]")
    if result.failed:
        raise typer.Exit(code=1)


@app.command()
def report(
    directory: Path = typer.Argument(..., help="a run directory, a `prfl run` output root or a `prfl compare` directory",
                                     show_default=False),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="HTML file to write (default DIR/report.html)"),
) -> None:
    """Build one self-contained HTML page (tables, embedded plots, configuration) from results."""
    from prfl.report.html import write_report

    path = write_report(directory, out)
    _say(f"report: [bold]{escape(str(path))}[/] (self-contained: open it in any browser)")


if __name__ == "__main__":
    main()
