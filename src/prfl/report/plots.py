"""Plots computed from run histories (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping

import matplotlib

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


def plot_accuracy(curves: Mapping[str, Iterable[Mapping[str, Any]]], path: str | Path, title: str = "") -> Path:
    """Accuracy against virtual time, one line per run; writes PNG (and SVG beside it)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for label, records in curves.items():
        ts, accs = eval_curve(records)
        ax.plot(ts, accs, label=label, linewidth=1.6)
    ax.set_xlabel("virtual time (s)")
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
