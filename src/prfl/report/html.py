"""One self-contained HTML page for a run directory or a comparison directory.

The page needs nothing but itself: the plots are PNG data URIs, the styles are inline, there is no
script, and a Content-Security-Policy forbids loading anything else (``img-src data:``), so a page
that renders in a browser with the network off renders the same anywhere.
"""

from __future__ import annotations

import base64
import html
import tempfile
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import yaml

from prfl import __version__
from prfl.report import plots, tables
from prfl.report.analysis import MethodSummary
from prfl.report.outputs import PLOT_TITLES, write_plots
from prfl.report.plots import density_marks, method_colors
from prfl.report.runset import RunSet, load_runset
from prfl.sim.history import TIME_PARTS, UPLOAD_PARTS, time_breakdown, upload_split

REPORT_NAME = "report.html"
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

STYLE = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto; max-width: 1100px;
       padding: 1.5rem; color: #1d1d1f; }
h1 { font-size: 1.6rem; margin-bottom: 0.2rem; }
h2 { font-size: 1.2rem; margin-top: 2rem; border-bottom: 1px solid #ddd; padding-bottom: 0.2rem; }
p.meta { color: #555; margin-top: 0; }
nav a { margin-right: 1rem; }
table { border-collapse: collapse; margin: 0.6rem 0; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #d0d0d0; padding: 0.25rem 0.6rem; }
th { background: #f3f3f3; text-align: left; }
td.num { text-align: right; }
figure { margin: 1rem 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9rem; }
h3 { font-size: 1.0rem; margin: 1.2rem 0 0.3rem; }
.swatch { display: inline-block; width: 0.9em; height: 0.9em; margin: 0 0.35em 0 0; vertical-align: -0.1em;
          border-radius: 2px; }
p.key .method { margin-right: 1.1rem; white-space: nowrap; }
pre { background: #f7f7f7; padding: 0.8rem; overflow-x: auto; font-size: 0.85rem; }
.warn { background: #fff4e5; border-left: 4px solid #f0a020; padding: 0.5rem 0.8rem; }
"""

CAPTIONS = {
    "accuracy": "Test accuracy against {time}; line: mean over seeds, band: ±1 sample sd "
                "(each seed interpolated linearly on a common time grid).",
    "egress": "Cumulative bytes sent by the server against {time} (mean ± sd over seeds).",
    "local_rounds": "Local rounds finished by each client; bars: mean over seeds, whiskers: sd.",
    "density": "Density of each client's sub-model over {time}, one line per client{marks}.",
}
DENSITY_MARKS = {
    "recovery": "red dashed lines: recovery (every minimum density raised)",
    "client": "red triangles: one client's minimum density raised",
    "stop": "black line: early stop",
}


def caption(name: str, rs: RunSet) -> str:
    """The caption of plot ``name``: what is drawn, in the run set's time (virtual or wall)."""
    time = "wall-clock time" if rs.clock == "wall" else "virtual time"
    text = CAPTIONS.get(name, PLOT_TITLES.get(name, name))
    marks = ""
    if name == "density":
        first = {m: rr[0].records for m, rr in rs.complete_runs().items()}
        drawn = [DENSITY_MARKS[k] for k in density_marks(first)]
        marks = "; " + ", ".join(drawn) if drawn else ""
    return text.replace("{time}", time).replace("{marks}", marks)


def method_key(rs: RunSet) -> str:
    """Each method's colour (the one every plot uses) and policy, as a line of swatches."""
    colors = method_colors(rs.methods)
    items = []
    for method, color in colors.items():
        policy = rs.policies.get(method, method)
        extra = f" ({_esc(policy)})" if policy != method else ""
        items.append(f'<span class="method" data-method="{_esc(method)}"><span class="swatch" '
                     f'style="background:{color}"></span>{_esc(method)}{extra}</span>')
    return '<p class="key">Methods: ' + " ".join(items) + "</p>"


def config_section(rs: RunSet) -> list[str]:
    """Every method's policy with all its options (defaults filled in), then the shared scenario."""
    parts = ['<h2 id="config">Configuration</h2>',
             "<p>Each method's policy, every option shown (the defaults where the run did not set one):</p>"]
    colors = method_colors(rs.methods)
    for method, pcfg in rs.policy_configs().items():
        text = yaml.safe_dump(pcfg["options"], sort_keys=False, width=10**6) if pcfg["options"] else "{}\n"
        parts.append(f'<h3 id="config-{_esc(method)}"><span class="swatch" style="background:{colors[method]}"></span>'
                     f"{_esc(method)}: policy {_esc(pcfg['name'])}</h3><pre>{_esc(text)}</pre>")
    plan = {}
    if rs.kind == "comparison":
        manifest = yaml.safe_load(rs.config_text) or {}
        plan = {k: v for k, v in manifest.items() if k not in ("methods", "scenario")}
    if plan:
        parts.append("<h3>Comparison</h3><pre>" + _esc(yaml.safe_dump(plan, sort_keys=False, width=10**6)) + "</pre>")
    if rs.scenario:
        parts.append("<h3>Scenario (shared by every run)</h3><pre>"
                     + _esc(yaml.safe_dump(rs.scenario, sort_keys=False, width=10**6)) + "</pre>")
    else:
        parts.append(f"<pre>{_esc(rs.config_text)}</pre>")
    return parts


def _esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def html_table(table: tables.Table) -> str:
    """An HTML table; every column but the first is right-aligned."""
    headers, rows = table
    head = "".join(f"<th>{_esc(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = "".join(f"<td{' class=num' if i else ''}>{_esc(c)}</td>" for i, c in enumerate(row))
        body.append(f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def data_uri(path: str | Path, mime: str = "image/png") -> str:
    """A file as a base64 ``data:`` URI."""
    return f"data:{mime};base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def render(rs: RunSet, plot_paths: dict[str, Path], summaries: Sequence[MethodSummary] | None = None) -> str:
    """The HTML text of the report of ``rs`` with the PNGs in ``plot_paths`` embedded."""
    summ = list(summaries) if summaries is not None else rs.summaries()
    kind = {"comparison": "comparison", "run": "run", "runs": "runs"}.get(rs.kind, rs.kind)
    unit = "wall-clock seconds (real time, measured on Flower)" if rs.clock == "wall" else "virtual seconds"
    seeds = sorted({s for m in summ for s in m.seeds})
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_esc(rs.title)} - prfl report</title>",
        f"<style>{STYLE}</style></head><body>",
        f"<h1>{_esc(rs.title)}</h1>",
        (f'<p class="meta">{_esc(kind)} report of <code>{_esc(rs.root)}</code>: {len(summ)} method(s), '
         f"seeds {_esc(', '.join(str(s) for s in seeds) or '-')}; generated {stamp} by prfl {__version__}. "
         f"Times are {unit}; ± is the sample standard deviation over seeds.</p>"),
        method_key(rs),
    ]
    if rs.command:
        parts.append(f'<p class="meta">Made by <code>{_esc(rs.command)}</code>; rebuild this page with '
                     f"<code>prfl report {_esc(rs.root)}</code>.</p>")
    sections = [("tta", "Time to accuracy"), ("accuracy", "Final accuracy"), ("participation", "Participation"),
                ("bytes", "Bytes"), ("plots", "Plots"), ("clients", "Per client"), ("round-time", "Round time"),
                ("config", "Configuration")]
    parts.append("<nav>" + "".join(f'<a href="#{k}">{_esc(v)}</a>' for k, v in sections) + "</nav>")
    if rs.missing:
        parts.append(f'<p class="warn">Missing or unfinished runs, left out of every table and plot: '
                     f"{_esc(', '.join(rs.missing))}.</p>")
    if not summ:
        parts.append('<p class="warn">No run has finished yet: nothing to report.</p>')

    base = f" (speed-up against {rs.baseline})" if rs.baseline else ""
    parts.append(f'<h2 id="tta">Time to accuracy{_esc(base)}</h2>')
    if rs.targets:
        parts.append(html_table(tables.time_to_accuracy_table(summ, rs.targets, rs.baseline)))
        parts.append('<p class="meta">The first evaluation at or above the target. A speed-up is given when '
                     "every seed of both methods reached the target.</p>")
    else:
        parts.append("<p>No target accuracies were set (<code>sim.targets</code> or <code>--targets</code>).</p>")
    parts.append('<h2 id="accuracy">Final accuracy</h2>' + html_table(tables.accuracy_table(summ, rs.clock)))
    parts.append('<h2 id="participation">Participation</h2>' + html_table(tables.participation_table(summ)))
    parts.append('<p class="meta">Local rounds: tasks each client finished. max/min and the coefficient of '
                 "variation (CV) of the local rounds per client measure the imbalance; mean ± sd over seeds.</p>")
    parts.append('<h2 id="bytes">Bytes</h2>' + html_table(tables.bytes_table(summ)))
    parts.append('<h2 id="plots">Plots</h2>')
    for name, path in plot_paths.items():
        title = PLOT_TITLES.get(name, name)
        parts.append(f'<figure id="fig-{_esc(name)}"><img src="{data_uri(path)}" alt="{_esc(title)}">'
                     f"<figcaption>{_esc(caption(name, rs))}</figcaption></figure>")
    parts.append('<h2 id="clients">Per client</h2>' + html_table(tables.clients_table(summ)))
    parts.append(round_time_section(rs))
    parts += config_section(rs)
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def method_round_time(rs: RunSet) -> dict[str, dict[str, list[float | None]]]:
    """Per method, per client: the mean seconds per task of each part of :data:`TIME_PARTS`,
    averaged over the method's complete seeds (a seed in which a client finished nothing is left
    out of that client's mean). Methods whose histories carry no timings are left out."""
    out: dict[str, dict[str, list[float | None]]] = {}
    for method, runs in rs.complete_runs().items():
        per_seed = [time_breakdown(r.records) for r in runs]
        n = max((len(b[TIME_PARTS[0]]) for b in per_seed), default=0)
        if n == 0:
            continue
        merged: dict[str, list[float | None]] = {}
        for part in TIME_PARTS:
            col: list[float | None] = []
            for c in range(n):
                vals = [b[part][c] for b in per_seed if c < len(b[part]) and b[part][c] is not None]
                col.append(sum(vals) / len(vals) if vals else None)
            merged[part] = col
        out[method] = merged
    return out


def round_time_table(rs: RunSet, breakdowns: dict[str, dict[str, list[float | None]]]) -> tables.Table:
    """Per method: the share of the clients' task time in each part (mean over clients of the
    per-client seconds, as a share of their sum) and the share of upload bytes by kind."""
    headers = ["method", *(f"{p.replace('_', ' ')} %" for p in TIME_PARTS), "mean task s",
               *(f"upload {p} %" for p in UPLOAD_PARTS)]
    rows = []
    runs = rs.complete_runs()
    for method, b in breakdowns.items():
        means = []
        for part in TIME_PARTS:
            vals = [v for v in b[part] if v is not None]
            means.append(sum(vals) / len(vals) if vals else 0.0)
        total = sum(means)
        split = dict.fromkeys(UPLOAD_PARTS, 0)
        for r in runs.get(method, []):
            for k, v in upload_split(r.records).items():
                split[k] += v
        up = sum(split.values())
        rows.append([method, *(f"{100 * m / total:.1f}" if total else "-" for m in means), f"{total:.3g}",
                     *(f"{100 * split[p] / up:.1f}" if up else "-" for p in UPLOAD_PARTS)])
    return headers, rows


def round_time_section(rs: RunSet) -> str:
    """The report's "Round time" section: where each client's task time goes (stacked bars) and
    the shares per method; histories without per-arrival timings get a note instead."""
    head = '<h2 id="round-time">Round time</h2>'
    breakdowns = method_round_time(rs)
    if not breakdowns:
        return head + "<p>These runs' histories carry no per-arrival timings (written by an older prfl).</p>"
    with tempfile.TemporaryDirectory(prefix="prfl-report-") as tmp:
        png = plots.plot_round_time(breakdowns, Path(tmp) / "round_time.png", title=f"{rs.title}: round time")
        uri = data_uri(png)
    caption = ("Where a task's time goes, per client: mean seconds per task (mean over seeds) of the download "
               "and the upload at the client's own link speeds, compute, and link wait, the time the transfers "
               "were queued or slowed by the server's shared link beyond that.")
    return (head + f'<figure id="fig-round_time"><img src="{uri}" alt="Round time per client">'
            f"<figcaption>{_esc(caption)}</figcaption></figure>" + html_table(round_time_table(rs, breakdowns))
            + '<p class="meta">Shares of the clients\' mean task time, and of all bytes their uploads held '
            "(under the reference accounting only the values are charged).</p>")


def write_report(
    path: str | Path,
    out: str | Path | None = None,
    plot_paths: dict[str, Path] | None = None,
    runset: RunSet | None = None,
) -> Path:
    """Build the report of the run, run root or comparison directory ``path``.

    Writes ``out`` (default ``path/report.html``). Plots are drawn afresh in a temporary directory
    unless ``plot_paths`` (PNG files, e.g. those ``prfl compare`` just wrote) are given.
    """
    rs = runset if runset is not None else load_runset(path)
    target = Path(out) if out is not None else Path(path) / REPORT_NAME
    summ = rs.summaries()
    if plot_paths is not None:
        text = render(rs, plot_paths, summ)
    else:
        with tempfile.TemporaryDirectory(prefix="prfl-report-") as tmp:
            text = render(rs, write_plots(rs, tmp), summ)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text, encoding="utf-8")
    return target
