"""Write the tables (Markdown, CSV), the plots (PNG, SVG) and ``summary.json`` of a run set."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from prfl.report import plots, tables
from prfl.report.analysis import MethodSummary, Stat
from prfl.report.runset import RunSet

PLOTS = ("accuracy", "egress", "local_rounds", "density")
PLOT_TITLES = {
    "accuracy": "Accuracy against time",
    "egress": "Bytes sent by the server",
    "local_rounds": "Local rounds per client",
    "density": "Client densities and recovery",
}


def write_plots(rs: RunSet, out_dir: str | Path) -> dict[str, Path]:
    """The four figures of a run set as ``<name>.png`` and ``<name>.svg`` in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = rs.complete_runs()
    histories = {m: [r.records for r in rr] for m, rr in runs.items()}
    clock = rs.clock
    # speed changes are in virtual time: a wall-clock figure (a Flower run) has none to mark
    marks = plots.speed_change_marks((rs.scenario.get("fleet") or {}).get("changes")) if clock == "virtual" else []
    paths = {
        "accuracy": plots.plot_accuracy_bands(histories, out / "accuracy.png", title=f"{rs.title}: accuracy",
                                              clock=clock, marks=marks),
        "egress": plots.plot_egress(histories, out / "egress.png", title=f"{rs.title}: bytes sent by the server",
                                    clock=clock),
    }
    local = {m: [[float(x) for x in s.local_rounds] for s in summ.runs] for m, summ in ((s.method, s) for s in rs.summaries())}
    paths["local_rounds"] = plots.plot_local_rounds(local, out / "local_rounds.png", title=f"{rs.title}: local rounds per client")
    first = {m: rr[0].records for m, rr in runs.items()}
    seeds = {rr[0].seed for rr in runs.values()}
    suffix = f" (seed {seeds.pop()})" if len(seeds) == 1 and None not in seeds else " (first seed)"
    paths["density"] = plots.plot_density(first, out / "density.png", title=f"{rs.title}: client densities{suffix}",
                                          clock=clock)
    return paths


def _stat(st: Stat) -> dict[str, Any]:
    d = asdict(st)
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


def summary_json(rs: RunSet, summaries: Sequence[MethodSummary]) -> dict[str, Any]:
    """Machine-readable results: every statistic of every method, and the run rows."""
    methods = []
    for s in summaries:
        methods.append({
            "method": s.method,
            "policy": s.policy,
            "seeds": s.seeds,
            "final_accuracy": _stat(s.final_accuracy),
            "best_accuracy": _stat(s.best_accuracy),
            "server_rounds": _stat(s.server_rounds),
            "virtual_seconds": _stat(s.virtual_seconds),
            "time_to_accuracy": {f"{t.target:g}": {**_stat(t.time), "speedup": t.speedup} for t in s.targets},
            "local_rounds_per_client": [_stat(c) for c in s.local_rounds_per_client],
            "local_rounds_total": _stat(s.local_rounds_total),
            "imbalance_max_over_min": _stat(s.imbalance_ratio),
            "imbalance_cv": _stat(s.imbalance_cv),
            "server_egress_mb": _stat(s.server_egress_mb),
            "server_ingress_mb": _stat(s.server_ingress_mb),
            "client_upload_mb": [_stat(c) for c in s.client_upload_mb],
            "client_download_mb": [_stat(c) for c in s.client_download_mb],
        })
    return {
        "name": rs.title,
        "kind": rs.kind,
        "targets": rs.targets,
        "baseline": rs.baseline,
        "missing_runs": rs.missing,
        "methods": methods,
        "runs": tables.run_records(rs.title, rs.methods, rs.targets),
    }


def results_markdown(rs: RunSet, summaries: Sequence[MethodSummary], plot_paths: dict[str, Path] | None = None,
                     base: Path | None = None) -> str:
    """All tables in one Markdown document (with links to the plots when given)."""
    lines = [f"# {rs.title}\n"]
    unit = "wall-clock seconds (real time, on Flower)" if rs.clock == "wall" else "virtual seconds"
    if rs.command:
        lines.append(f"Made by `{rs.command}`; times are {unit}, ± is the sample sd over seeds.\n")
    else:
        lines.append(f"Times are {unit}, ± is the sample sd over seeds.\n")
    if rs.missing:
        lines.append(f"Missing or unfinished runs (left out): {', '.join(rs.missing)}.\n")
    base_note = f" against {rs.baseline}" if rs.baseline else ""
    lines.append(f"## Time to accuracy{base_note}\n")
    if rs.targets:
        lines.append(tables.markdown(tables.time_to_accuracy_table(summaries, rs.targets, rs.baseline)))
    else:
        lines.append("No target accuracies were given (`--targets` or `sim.targets`).\n")
    lines.append("## Final accuracy\n")
    lines.append(tables.markdown(tables.accuracy_table(summaries, rs.clock)))
    lines.append("## Participation (local rounds per client)\n")
    lines.append(tables.markdown(tables.participation_table(summaries)))
    lines.append("## Bytes\n")
    lines.append(tables.markdown(tables.bytes_table(summaries)))
    if plot_paths:
        lines.append("## Plots\n")
        for name, p in plot_paths.items():
            rel = p.relative_to(base) if base is not None else p
            lines.append(f"![{PLOT_TITLES.get(name, name)}]({rel.as_posix()})\n")
    return "\n".join(lines)


def write_tables(rs: RunSet, out_dir: str | Path, summaries: Sequence[MethodSummary] | None = None) -> dict[str, Path]:
    """Markdown and CSV tables of a run set in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summ = list(summaries) if summaries is not None else rs.summaries()
    written: dict[str, Path] = {}

    def md(name: str, table: tables.Table) -> None:
        p = out / f"{name}.md"
        p.write_text(tables.markdown(table), encoding="utf-8")
        written[f"{name}.md"] = p

    def csv(name: str, records: list[dict[str, Any]]) -> None:
        written[f"{name}.csv"] = tables.write_csv(records, out / f"{name}.csv")

    md("time_to_accuracy", tables.time_to_accuracy_table(summ, rs.targets, rs.baseline))
    csv("time_to_accuracy", tables.time_to_accuracy_records(summ, rs.baseline))
    md("accuracy", tables.accuracy_table(summ, rs.clock))
    md("participation", tables.participation_table(summ))
    md("bytes", tables.bytes_table(summ))
    md("clients", tables.clients_table(summ))
    csv("methods", tables.method_records(summ))
    csv("clients", tables.client_records(summ))
    csv("runs", tables.run_records(rs.title, rs.methods, rs.targets))
    return written


def write_outputs(rs: RunSet, out_dir: str | Path) -> dict[str, Path]:
    """Tables under ``tables/``, plots under ``plots/``, ``results.md`` and ``summary.json``."""
    out = Path(out_dir)
    summ = rs.summaries()
    written = {f"tables/{k}": v for k, v in write_tables(rs, out / "tables", summ).items()}
    plot_paths = write_plots(rs, out / "plots")
    written.update({f"plots/{k}.png": v for k, v in plot_paths.items()})
    (out / "results.md").write_text(results_markdown(rs, summ, plot_paths, out), encoding="utf-8")
    written["results.md"] = out / "results.md"
    (out / "summary.json").write_text(json.dumps(summary_json(rs, summ), indent=2, default=float), encoding="utf-8")
    written["summary.json"] = out / "summary.json"
    return written
