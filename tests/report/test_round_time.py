"""The report's "Round time" section and the run's stacked-bar plot of where task time goes."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from prfl.report.html import write_report
from prfl.report.plots import plot_round_time

from .conftest import EVALS, LOCAL_ROUNDS, make_history, make_summary, write_run
from .test_html import PNG_MAGIC, assert_self_contained

# per client: (download, link_wait, compute, upload) seconds of every one of its tasks
PARTS = {0: (1.0, 1.0, 2.0, 4.0), 1: (2.0, 0.0, 4.0, 2.0), 2: (0.5, 0.5, 1.0, 2.0)}


def timed_history(seed: int) -> list[dict]:
    recs = make_history(EVALS["fast", seed], LOCAL_ROUNDS["fast", seed], 1e6)
    for r in recs:
        if r["event"] == "arrival":
            r.update(zip(("download", "link_wait", "compute", "upload"), PARTS[r["client"]]))
            r.update(bytes_up_values=600, bytes_up_index=100, bytes_up_importance=300)
    return recs


def test_report_shows_where_the_round_time_goes(tmp_path: Path) -> None:
    root = tmp_path / "root"
    recs = timed_history(0)
    cfg = {"name": "timed", "seed": 0, "policy": {"name": "prfl"}, "sim": {"targets": [0.5]}}
    write_run(root / "prfl", recs, make_summary(recs, LOCAL_ROUNDS["fast", 0], 1e6, 0, "prfl"), cfg)
    out = write_report(root / "prfl", tmp_path / "timed.html")
    s = assert_self_contained(out, images=5)  # the four usual figures and the round-time bars
    assert {"round-time", "fig-round_time"} <= s.ids
    text = " ".join(s.text)
    # mean over clients: download (1 + 2 + 0.5) / 3 = 7/6, link wait 1.5 / 3 = 1/2, compute 7/3,
    # upload 8/3; total 40/6 = 6.67 s -> shares 17.5, 7.5, 35.0, 40.0 %;
    # upload bytes 600 / 100 / 300 per task -> 60.0, 10.0, 30.0 %
    assert "17.5 7.5 35.0 40.0 6.67 60.0 10.0 30.0" in " ".join(text.split())


def test_histories_without_timings_get_a_note(handmade) -> None:
    s = assert_self_contained(write_report(handmade), images=4)
    assert "round-time" in s.ids and "carry no per-arrival timings" in " ".join(s.text)


def test_round_time_plot_draws_stacked_bars(tmp_path: Path) -> None:
    breakdown = {"download": [1.0, None], "link_wait": [0.5, None], "compute": [2.0, None], "upload": [1.0, None]}
    png = plot_round_time({"prfl": breakdown, "empty": {p: [None, None] for p in breakdown}}, tmp_path / "rt.png", "t")
    assert png.read_bytes()[:8] == PNG_MAGIC and png.with_suffix(".svg").is_file()
    svg = png.with_suffix(".svg").read_text()
    assert "link wait (server link)" in svg and "empty" not in svg  # a method with no timing gets no panel
    none = plot_round_time({}, tmp_path / "none.png")
    assert none.read_bytes()[:8] == PNG_MAGIC


def test_round_time_plot_of_a_large_fleet_draws_one_shape_per_part(tmp_path: Path) -> None:
    from prfl.report.plots import ROUND_TIME_LABELS, STAIRS_FROM

    n = 1000
    rng = np.random.default_rng(0)
    breakdown = {p: [float(v) for v in rng.uniform(0.5, 3.0, n)] for p in ("download", "link_wait", "compute", "upload")}
    breakdown["compute"][7] = None  # a client that finished no task
    assert n > STAIRS_FROM
    png = plot_round_time({"prfl": breakdown}, tmp_path / "big.png", "1,000 clients")
    assert png.read_bytes()[:8] == PNG_MAGIC
    svg = png.with_suffix(".svg").read_text()
    assert svg.count("<path") < 200  # four filled outlines (and the axes), not 4,000 bars
    assert all(ROUND_TIME_LABELS[p] in svg for p in breakdown)
