"""Accuracy against virtual time per method, the mean over seeds with a ±1 sd band, from
evaluation series (e.g. the compact records of :mod:`prfl.report.sweep`).

Each seed's series is interpolated linearly on one grid of ``points`` times from 0 to the end of
the longest series in the figure (:func:`prfl.report.analysis.on_grid`: a seed counts only inside
its own time span); the line is the mean of the seeds defined at a grid time and the band is
± their sample sd (:func:`prfl.report.analysis.band`). Targets are drawn as dotted horizontal
lines. With ``zoom`` a second panel shows the same curves between two accuracies (the range
where the targets lie). The PNG is written without a timestamp, so the same inputs give the same
file.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib
import numpy as np

from prfl.report.analysis import band, on_grid

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

Series = tuple[Sequence[float], Sequence[float]]  # (virtual seconds, accuracy) of one seed


def plot_bands(
    curves: Mapping[str, Sequence[Series]],
    path: str | Path,
    title: str = "",
    targets: Sequence[float] = (),
    points: int = 300,
    zoom: tuple[float, float] | None = None,
    marks: Sequence[tuple[float, str]] = (),
) -> Path:
    """Write ``path`` (PNG): per label of ``curves``, the mean accuracy over its seeds and a ±1 sd
    band, and ``marks`` (time, label) as dashed vertical lines. Labels keep their order and take
    the ``tab10`` (``tab20`` beyond ten) colours."""
    from prfl.report.plots import draw_marks

    labels = list(curves)
    end = max((float(max(ts)) for seeds in curves.values() for ts, _ in seeds if len(ts)), default=1.0)
    grid = np.linspace(0.0, end, points)
    cmap = plt.get_cmap("tab10" if len(labels) <= 10 else "tab20")
    fig, axes = plt.subplots(1, 2 if zoom else 1, figsize=(12.0 if zoom else 7.5, 4.8), dpi=110, squeeze=False)
    drawn = []
    for i, label in enumerate(labels):
        seeds = [(np.asarray(ts, float), np.asarray(vs, float)) for ts, vs in curves[label] if len(ts)]
        if seeds:
            drawn.append((label, cmap(i % cmap.N), len(seeds), band([on_grid(ts, vs, grid) for ts, vs in seeds])))
    for k, ax in enumerate(axes[0]):
        for label, color, n, (mean, lo, hi) in drawn:
            ax.plot(grid, mean, color=color, linewidth=1.5, label=f"{label} (n={n})")
            if n > 1:
                ax.fill_between(grid, lo, hi, color=color, alpha=0.18, linewidth=0)
        for t in targets:
            ax.axhline(t, color="0.5", linestyle=":", linewidth=0.9)
        draw_marks(ax, marks)
        if not drawn:
            ax.text(0.5, 0.5, "no evaluations yet", ha="center", va="center", transform=ax.transAxes, color="0.4")
        if k == 1 and zoom is not None:
            ax.set_ylim(*zoom)
            ax.set_title(f"accuracy {zoom[0]:g}-{zoom[1]:g}")
        else:
            ax.set_title(title or "accuracy (mean ± sd over seeds)")
        ax.set_xlabel("virtual time (s)")
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
    if drawn:
        axes[0][-1].legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", metadata={"Software": None})
    plt.close(fig)
    return path
