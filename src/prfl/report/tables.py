"""Comparison tables as rows, Markdown and CSV: time to accuracy (with speed-ups), final accuracy,
participation and its imbalance, bytes sent by the server and by each client, and one row per run.

Each ``*_table`` function returns ``(headers, rows)`` of display strings for Markdown and HTML;
each ``*_records`` function returns dictionaries of raw numbers for CSV and JSON.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prfl.report.analysis import (
    MB,
    MethodSummary,
    RunData,
    Stat,
    auto_digits,
    run_metrics,
    target_key,
)

Table = tuple[list[str], list[list[str]]]


def _speedup(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _ratio(stat: Stat) -> str:
    text = stat.fmt(2)
    missing = stat.total - stat.n
    if missing:
        text = ("∞" if stat.n == 0 else text) + (f" (∞ in {missing}/{stat.total})" if stat.n else "")
    return text


# ---------------------------------------------------------------------------- display tables
def time_to_accuracy_table(summaries: Sequence[MethodSummary], targets: Sequence[float], baseline: str | None) -> Table:
    """Virtual seconds to each target (mean ± sd over seeds) and the speed-up against ``baseline``."""
    headers = ["method", "seeds"]
    for t in targets:
        headers.append(f"time to {target_key(t)} (s)")
        if baseline:
            headers.append(f"speed-up vs {baseline} ({target_key(t)})")
    rows = []
    for s in summaries:
        row = [s.method, str(len(s.runs))]
        for t in targets:
            tr = s.target(t)
            row.append(tr.cell() if tr else "-")
            if baseline:
                row.append(_speedup(tr.speedup if tr else None))
        rows.append(row)
    return headers, rows


def _count(stat: Stat, digits: int | None = None) -> str:
    """A count (rounds): an integer when it is one (a single seed), else ``Stat.fmt(digits)``."""
    if stat.mean is not None and stat.n <= 1 and float(stat.mean).is_integer():
        return str(int(stat.mean))
    return stat.fmt(digits)


def _count_value(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:.1f}"


def accuracy_table(summaries: Sequence[MethodSummary], clock: str = "virtual") -> Table:
    """Final and best test accuracy, server rounds and the run's length (``clock`` seconds)."""
    headers = ["method", "seeds", "final accuracy", "best accuracy", "server rounds", f"{clock} s"]
    rows = [
        [s.method, str(len(s.runs)), s.final_accuracy.fmt(3), s.best_accuracy.fmt(3), s.server_rounds.fmt(0), s.virtual_seconds.fmt()]
        for s in summaries
    ]
    return headers, rows


def participation_table(summaries: Sequence[MethodSummary]) -> Table:
    """Local rounds per client: total, the smallest and largest client (means over seeds), imbalance."""
    headers = ["method", "local rounds (all clients)", "min client", "max client", "max/min", "CV"]
    rows = []
    for s in summaries:
        per = [c.mean for c in s.local_rounds_per_client if c.mean is not None]
        lo = _count_value(min(per)) if per else "-"
        hi = _count_value(max(per)) if per else "-"
        rows.append([s.method, _count(s.local_rounds_total), lo, hi, _ratio(s.imbalance_ratio), s.imbalance_cv.fmt(3)])
    return headers, rows


def bytes_table(summaries: Sequence[MethodSummary]) -> Table:
    """MB sent by the server (egress) and received (ingress); MB each client sent, mean [min-max]."""
    headers = ["method", "server egress (MB)", "server ingress (MB)", "client upload (MB per client)", "client download (MB per client)"]
    rows = []
    for s in summaries:
        cells = [s.method, s.server_egress_mb.fmt(), s.server_ingress_mb.fmt()]
        for per in (s.client_upload_mb, s.client_download_mb):
            vals = [c.mean for c in per if c.mean is not None]
            if vals:
                mean = sum(vals) / len(vals)
                d = auto_digits(mean)
                cells.append(f"{mean:.{d}f} [{min(vals):.{d}f}-{max(vals):.{d}f}]")
            else:
                cells.append("-")
        rows.append(cells)
    return headers, rows


def clients_table(summaries: Sequence[MethodSummary]) -> Table:
    """One row per client: local rounds and MB uploaded, one column pair per method."""
    n = max((len(s.local_rounds_per_client) for s in summaries), default=0)
    headers = ["client"]
    for s in summaries:
        headers += [f"{s.method} rounds", f"{s.method} up MB"]
    rows = []
    for c in range(n):
        row = [str(c)]
        for s in summaries:
            lr = s.local_rounds_per_client[c] if c < len(s.local_rounds_per_client) else Stat(None, None, 0, 0)
            up = s.client_upload_mb[c] if c < len(s.client_upload_mb) else Stat(None, None, 0, 0)
            row += [_count(lr, 1), up.fmt()]
        rows.append(row)
    return headers, rows


# ---------------------------------------------------------------------------- raw records
def _num(x: float | None) -> float | None:
    if x is None:
        return None
    return float(x) if math.isfinite(float(x)) else None


def _stat_fields(prefix: str, st: Stat) -> dict[str, Any]:
    return {f"{prefix}_mean": _num(st.mean), f"{prefix}_std": _num(st.std), f"{prefix}_min": _num(st.min), f"{prefix}_max": _num(st.max)}


def time_to_accuracy_records(summaries: Sequence[MethodSummary], baseline: str | None) -> list[dict[str, Any]]:
    out = []
    for s in summaries:
        for tr in s.targets:
            out.append({
                "method": s.method, "target": tr.target, "seeds": tr.time.total, "reached": tr.time.n,
                **_stat_fields("seconds", tr.time), "speedup": _num(tr.speedup), "baseline": baseline or "",
            })
    return out


def method_records(summaries: Sequence[MethodSummary]) -> list[dict[str, Any]]:
    """One row per method: accuracy, rounds, participation imbalance and bytes (mean/std/min/max)."""
    out = []
    for s in summaries:
        row: dict[str, Any] = {"method": s.method, "policy": s.policy, "seeds": len(s.runs)}
        row.update(_stat_fields("final_accuracy", s.final_accuracy))
        row.update(_stat_fields("best_accuracy", s.best_accuracy))
        row.update(_stat_fields("server_rounds", s.server_rounds))
        row.update(_stat_fields("virtual_seconds", s.virtual_seconds))
        row.update(_stat_fields("local_rounds_total", s.local_rounds_total))
        row.update(_stat_fields("imbalance_max_over_min", s.imbalance_ratio))
        row["imbalance_infinite_runs"] = s.imbalance_ratio.total - s.imbalance_ratio.n
        row.update(_stat_fields("imbalance_cv", s.imbalance_cv))
        row.update(_stat_fields("server_egress_mb", s.server_egress_mb))
        row.update(_stat_fields("server_ingress_mb", s.server_ingress_mb))
        out.append(row)
    return out


def client_records(summaries: Sequence[MethodSummary]) -> list[dict[str, Any]]:
    """Long form: one row per method and client (local rounds, MB up and down; mean and std over seeds)."""
    out = []
    for s in summaries:
        for c, lr in enumerate(s.local_rounds_per_client):
            up = s.client_upload_mb[c] if c < len(s.client_upload_mb) else Stat(None, None, 0, 0)
            down = s.client_download_mb[c] if c < len(s.client_download_mb) else Stat(None, None, 0, 0)
            out.append({
                "method": s.method, "client": c,
                "local_rounds_mean": _num(lr.mean), "local_rounds_std": _num(lr.std),
                "upload_mb_mean": _num(up.mean), "upload_mb_std": _num(up.std),
                "download_mb_mean": _num(down.mean), "download_mb_std": _num(down.std),
            })
    return out


def run_records(scenario: str, methods: dict[str, list[RunData]], targets: Sequence[float]) -> list[dict[str, Any]]:
    """One row per complete run, in the columns of ``benchmarks/paper_fmnist.py``'s ``results.csv``."""
    out = []
    for method, runs in methods.items():
        for i, run in enumerate(runs):
            if not run.complete:
                continue
            m = run_metrics(run.records, run.summary, targets)
            row: dict[str, Any] = {
                "scenario": scenario,
                "method": method,
                "seed": run.seed if run.seed is not None else i,
                "final_accuracy": m.final_accuracy,
                "best_accuracy": m.best_accuracy,
                "virtual_seconds": m.virtual_seconds,
                "server_rounds": m.server_rounds,
                "local_rounds": " ".join(str(x) for x in m.local_rounds),
                "local_rounds_min": min(m.local_rounds, default=0),
                "local_rounds_max": max(m.local_rounds, default=0),
                "server_egress_mb": m.server_egress_bytes / MB,
                "wall_seconds": m.wall_seconds,
            }
            for t in targets:
                row[f"time_to_{target_key(t)}"] = m.time_to.get(float(t))
            out.append(row)
    return out


# ---------------------------------------------------------------------------- rendering
def _md_escape(cell: str) -> str:
    return cell.replace("|", "\\|")


def markdown(table: Table) -> str:
    """A GitHub-flavoured Markdown table (numbers right-aligned)."""
    headers, rows = table
    align = ["---"] + ["---:"] * (len(headers) - 1)
    lines = ["| " + " | ".join(_md_escape(h) for h in headers) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(_md_escape(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def csv_text(records: Sequence[dict[str, Any]]) -> str:
    """CSV with a header from the union of the records' keys (first-seen order); None -> empty."""
    fields: list[str] = []
    for r in records:
        fields += [k for k in r if k not in fields]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    w.writeheader()
    for r in records:
        w.writerow({k: ("" if v is None else v) for k, v in r.items()})
    return buf.getvalue()


def write_csv(records: Sequence[dict[str, Any]], path: str | Path) -> Path:
    path = Path(path)
    path.write_text(csv_text(records), encoding="utf-8")
    return path
