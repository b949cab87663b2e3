"""Plots computed from run histories (matplotlib, Agg backend: no display needed).

``plot_accuracy`` draws one line per run; the comparison plots (accuracy and server egress with
seed bands, client densities with recovery events, local rounds per client) take several seeds
per method.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def eval_curve(records: Iterable[Mapping[str, Any]]) -> tuple[list[float], list[float]]:
    """(virtual seconds, accuracy) of every ``eval`` event in a history."""
    ts, accs = [], []
    for r in records:
        if r.get("event") == "eval" and r.get("accuracy") is not None:
            ts.append(float(r["time"]))
            accs.append(float(r["accuracy"]))
    return ts, accs


Marks = Sequence[tuple[float, str]]  # (time, label) of events drawn as vertical lines, e.g. speed changes


def speed_change_marks(changes: Iterable[Mapping[str, Any]] | None) -> list[tuple[float, str]]:
    """One mark per distinct time of a fleet's speed changes (``fleet.changes`` as configured)."""
    times = sorted({float(ch["at"]) for ch in changes or () if isinstance(ch, Mapping) and "at" in ch})
    return [(t, "speeds change") for t in times]


def draw_marks(ax: Any, marks: Marks) -> None:
    """Dashed vertical lines at the marks' times, each labelled at the top of the axes."""
    for t, label in marks:
        ax.axvline(t, color="0.35", linestyle="--", linewidth=0.9, zorder=1)
        ax.annotate(label, xy=(t, 1.0), xycoords=("data", "axes fraction"), xytext=(3, -3),
                    textcoords="offset points", ha="left", va="top", fontsize="x-small", color="0.3")


def plot_accuracy(curves: Mapping[str, Iterable[Mapping[str, Any]]], path: str | Path, title: str = "",
                  clock: str = "virtual", marks: Marks = ()) -> Path:
    """Accuracy against time (``clock``: virtual or wall seconds), one line per run in its
    method's colour (:func:`method_colors`), ``marks`` as dashed vertical lines; writes PNG (and
    SVG beside it)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    colors = method_colors(curves)
    for label, records in curves.items():
        ts, accs = eval_curve(records)
        ax.plot(ts, accs, label=label, linewidth=1.6, color=colors[label])
    draw_marks(ax, marks)
    ax.set_xlabel(time_label(clock))
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    fig.savefig(path.with_suffix(".svg"))
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------- colours
# One colour per method everywhere: a run's accuracy.png, the plots of `prfl run` and `prfl compare`
# and the HTML report all take their colours from method_colors, which depends on the names only.
POLICY_COLORS = {
    "prfl": "#1f77b4",  # tab:blue
    "fedasync": "#ff7f0e",  # tab:orange
    "fedbuff": "#2ca02c",  # tab:green
    "fedfix": "#d62728",  # tab:red
    "fedavg": "#9467bd",  # tab:purple
    "heterofl": "#8c564b",  # tab:brown
}
# other method names (variants, ablations, "fedasync-1"): tab10's remaining colours, then a few
# more. No greys (axes, grid and text are grey), and no colour is a blend of another with white,
# black or grey (an anti-aliased edge must not look like another method).
OTHER_COLORS = ("#e377c2", "#bcbd22", "#17becf", "#393b79", "#b5cf6b", "#ff00ff")


def method_color(method: str, taken: Iterable[str] = ()) -> str:
    """The colour (``#rrggbb``) of ``method``: fixed for each policy name; any other name gets a
    colour of :data:`OTHER_COLORS` chosen by a stable hash of the name, skipping ``taken``."""
    if method in POLICY_COLORS:
        return POLICY_COLORS[method]
    used = set(taken)
    start = zlib.crc32(method.encode("utf-8")) % len(OTHER_COLORS)
    for k in range(len(OTHER_COLORS)):
        color = OTHER_COLORS[(start + k) % len(OTHER_COLORS)]
        if color not in used:
            return color
    return OTHER_COLORS[start]


def method_colors(methods: Iterable[str]) -> dict[str, str]:
    """A colour per method (:func:`method_color`): the policies' colours first, then the other
    names' in sorted order, so the same set of methods gets the same colours in any order."""
    names = list(dict.fromkeys(methods))
    out = {m: POLICY_COLORS[m] for m in names if m in POLICY_COLORS}
    for m in sorted(n for n in names if n not in POLICY_COLORS):
        out[m] = method_color(m, out.values())
    return {m: out[m] for m in names}


def time_label(clock: str = "virtual") -> str:
    """The time axis' label: ``virtual time (s)`` for the simulator, ``wall time (s)`` on Flower."""
    return "wall time (s)" if clock == "wall" else "virtual time (s)"


# ---------------------------------------------------------------------------- comparison plots
# Every function below writes ``path`` as PNG and the same figure as SVG beside it, and returns the
# PNG path. A method has its method_colors colour in every figure.
Records = Sequence[Mapping[str, Any]]


def save_figure(fig: Any, path: str | Path) -> Path:
    """Write ``fig`` to ``path`` (PNG) and ``path`` with suffix ``.svg``; close it."""
    path = Path(path).with_suffix(".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    fig.savefig(path.with_suffix(".svg"))
    plt.close(fig)
    return path


def _empty(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


def _banded(
    ax: Any,
    runs: Mapping[str, Sequence[Records]],
    key: str,
    scale: float,
    points: int,
) -> bool:
    from prfl.report.analysis import band, on_grid, series, time_grid

    colors = method_colors(runs)
    drawn = False
    for method, seeds in runs.items():
        grid = time_grid(seeds, points)  # common to the seeds of a method, ends with the longest
        curves = [on_grid(*series(rec, key), grid) * scale for rec in seeds]
        curves = [c for c in curves if not np.all(np.isnan(c))]
        if not curves:
            continue
        mean, lo, hi = band(curves)
        label = method if len(curves) == 1 else f"{method} (n={len(curves)})"
        ax.plot(grid, mean, color=colors[method], label=label, linewidth=1.6)
        if len(curves) > 1:
            ax.fill_between(grid, lo, hi, color=colors[method], alpha=0.2, linewidth=0)
        drawn = True
    return drawn


def plot_accuracy_bands(runs: Mapping[str, Sequence[Records]], path: str | Path, title: str = "", points: int = 200,
                        clock: str = "virtual", marks: Marks = ()) -> Path:
    """Accuracy against time: per method the mean over seeds and a ±1 sd band.

    The seeds of a method are linearly interpolated on a common grid of ``points`` times from 0 to
    the end of its longest run; a seed counts only within its own time span.
    """
    fig, ax = plt.subplots(figsize=(7.0, 4.2), dpi=110)
    if _banded(ax, runs, "accuracy", 1.0, points):
        draw_marks(ax, marks)
        ax.set_xlabel(time_label(clock))
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize="small")
    else:
        _empty(ax, "no evaluations")
    ax.set_title(title or "accuracy (mean ± sd over seeds)")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_egress(runs: Mapping[str, Sequence[Records]], path: str | Path, title: str = "", points: int = 200,
                clock: str = "virtual") -> Path:
    """Cumulative bytes sent by the server (MB) against time, mean ± sd over seeds."""
    fig, ax = plt.subplots(figsize=(7.0, 4.2), dpi=110)
    if _banded(ax, runs, "server_egress", 1e-6, points):
        ax.set_xlabel(time_label(clock))
        ax.set_ylabel("server egress (MB, cumulative)")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize="small")
    else:
        _empty(ax, "no byte counts")
    ax.set_title(title or "bytes sent by the server")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_local_rounds(rounds: Mapping[str, Sequence[Sequence[float]]], path: str | Path, title: str = "") -> Path:
    """Local rounds per client as grouped bars (one bar per method), mean over seeds with sd whiskers.

    ``rounds`` maps a method to its runs' local rounds per client.
    """
    methods = [m for m, runs in rounds.items() if runs]
    n = max((len(r) for m in methods for r in rounds[m]), default=0)
    fig, ax = plt.subplots(figsize=(max(6.0, min(16.0, 1.0 + 0.12 * n * max(1, len(methods)))), 4.4), dpi=110,
                           layout="constrained")
    if not methods or n == 0:
        _empty(ax, "no local rounds")
    else:
        colors = method_colors(rounds)
        width = 0.8 / len(methods)
        x = np.arange(n)
        for i, m in enumerate(methods):
            mat = np.full((len(rounds[m]), n), np.nan)
            for j, r in enumerate(rounds[m]):
                mat[j, : len(r)] = r
            mean = np.nanmean(mat, axis=0)
            yerr = None
            if mat.shape[0] > 1:
                sd = np.nanstd(mat, axis=0, ddof=1)
                yerr = np.vstack([np.minimum(sd, mean), sd])  # whiskers stop at zero
            ax.bar(x - 0.4 + width * (i + 0.5), mean, width, yerr=yerr, color=colors[m], label=m,
                   error_kw={"elinewidth": 0.8, "capsize": 1.5})
        ax.set_xticks(x if n <= 40 else x[:: max(1, n // 20)])
        ax.set_xlabel("client")
        ax.set_ylabel("local rounds")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title(title or "local rounds per client")
    return save_figure(fig, path)


def _density_panels(runs: Mapping[str, Records]) -> list[tuple[str, tuple[np.ndarray, np.ndarray], list[Any]]]:
    from prfl.report.analysis import density_series, recovery_events

    panels = [(m, density_series(rec), recovery_events(rec)) for m, rec in runs.items()]
    return [p for p in panels if p[1][0].size]


def density_marks(runs: Mapping[str, Records]) -> list[str]:
    """Which marks :func:`plot_density` draws for ``runs``: ``recovery`` (server-wide step),
    ``client`` (one client's minimum raised) and ``stop`` (early stop), in that order."""
    seen = set()
    for _, (_, mat), recs in _density_panels(runs):
        for ev in recs:
            if ev.scope == "client":
                if ev.client is not None and 0 <= ev.client < mat.shape[1]:
                    seen.add("client")
            else:
                seen.add("stop" if ev.scope == "stop" else "recovery")
    return [k for k in ("recovery", "client", "stop") if k in seen]


def plot_density(runs: Mapping[str, Records], path: str | Path, title: str = "", clock: str = "virtual") -> Path:
    """Density of each client's sub-model over time, one panel per method.

    Densities come from ``densities`` events and the ``density`` field of evaluations (a step
    function); ``recovery`` events are marked (see :func:`density_marks`): server-wide steps as red
    dashed lines, per-client steps as red triangles on that client's curve, early stopping as a
    black line.
    """
    panels = _density_panels(runs)
    fig, axes = plt.subplots(max(1, len(panels)), 1, figsize=(7.6, 2.6 * max(1, len(panels)) + 0.6), dpi=110,
                             sharex=True, squeeze=False, layout="constrained")
    if not panels:
        _empty(axes[0][0], "no density records (the policies train dense models)")
        axes[0][0].set_title(title or "client densities")
    for (method, (ts, mat), recs), row in zip(panels, axes):
        ax = row[0]
        cmap = plt.get_cmap("viridis")
        k = mat.shape[1]
        for c in range(k):
            ax.step(ts, mat[:, c], where="post", color=cmap(c / max(1, k - 1)), linewidth=1.0,
                    label=f"client {c}" if k <= 12 else None)
        labelled: set[str] = set()
        for ev in recs:
            if ev.scope == "client":
                if ev.client is None or not 0 <= ev.client < k:
                    continue
                idx = max(0, int(np.searchsorted(ts, ev.time, side="right")) - 1)
                ax.plot([ev.time], [mat[idx, ev.client]], marker="^", color="tab:red", markersize=6,
                        label=None if "client" in labelled else "recovery (client)")
                labelled.add("client")
            else:
                color, style = ("black", "-") if ev.scope == "stop" else ("tab:red", "--")
                name = "early stop" if ev.scope == "stop" else "recovery"
                ax.axvline(ev.time, color=color, linestyle=style, linewidth=1.0,
                           label=None if name in labelled else name)
                labelled.add(name)
        ax.set_ylim(0.0, 1.05)
        ax.set_ylabel("density")
        ax.set_title(method if len(panels) > 1 or not title else f"{title}: {method}", fontsize="medium")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    axes[-1][0].set_xlabel(time_label(clock))
    if title and len(panels) > 1:
        fig.suptitle(title)
    return save_figure(fig, path)


ROUND_TIME_PARTS = ("download", "link_wait", "compute", "upload")
ROUND_TIME_LABELS = {"download": "download (own link)", "link_wait": "link wait (server link)",
                     "compute": "compute", "upload": "upload (own link)"}
ROUND_TIME_COLORS = {"download": "tab:blue", "link_wait": "tab:gray", "compute": "tab:green", "upload": "tab:orange"}


#: Clients from which plot_round_time draws each part as one filled step outline, not a bar per client.
STAIRS_FROM = 100


def plot_round_time(breakdowns: Mapping[str, Mapping[str, Sequence[float | None]]], path: str | Path,
                    title: str = "") -> Path:
    """Where a local round's time goes: per client, a stacked bar of the mean seconds per task of
    download, link wait, compute and upload (see :mod:`prfl.runtime.history`); one panel per method.

    ``breakdowns`` maps a method to ``{part: [seconds per client]}`` as returned by
    :func:`prfl.runtime.history.time_breakdown` (None: the client finished no task; drawn as 0).
    """
    panels = [(m, b) for m, b in breakdowns.items()
              if any(v is not None for p in ROUND_TIME_PARTS for v in b.get(p, ()))]
    n = max((len(b.get(p, ())) for _, b in panels for p in ROUND_TIME_PARTS), default=0)
    rows = max(1, len(panels))
    fig, axes = plt.subplots(rows, 1, figsize=(max(6.0, min(16.0, 2.0 + 0.35 * n)), 2.6 * rows + 0.8), dpi=110,
                             sharex=True, squeeze=False, layout="constrained")
    if not panels:
        _empty(axes[0][0], "no arrival timings in the history")
        axes[0][0].set_title(title or "where the round time goes")
        return save_figure(fig, path)
    x = np.arange(n)
    edges = np.arange(n + 1) - 0.5
    for (method, b), row in zip(panels, axes):
        ax = row[0]
        bottom = np.zeros(n)
        for part in ROUND_TIME_PARTS:
            vals = np.array([float(v) if v is not None else 0.0 for v in b.get(part, [])] + [0.0] * n)[:n]
            if n <= STAIRS_FROM:
                ax.bar(x, vals, 0.7, bottom=bottom, color=ROUND_TIME_COLORS[part], label=ROUND_TIME_LABELS[part])
            else:  # a large fleet: one filled step outline per part rather than a patch per client
                ax.stairs(bottom + vals, edges, baseline=bottom.copy(), fill=True, color=ROUND_TIME_COLORS[part],
                          label=ROUND_TIME_LABELS[part])
            bottom += vals
        ax.set_ylabel("seconds per task")
        ax.set_title(method if len(panels) > 1 or not title else f"{title}: {method}", fontsize="medium")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    last = axes[-1][0]
    last.set_xticks(x if n <= 40 else x[:: max(1, n // 20)])
    last.set_xlabel("client")
    if title and len(panels) > 1:
        fig.suptitle(title)
    return save_figure(fig, path)
