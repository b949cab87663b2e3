"""prfl.report.analysis on histories built by hand: every expected number is worked out here."""

from __future__ import annotations

import math

import numpy as np
import pytest

from prfl.report.analysis import (
    add_speedups,
    auto_digits,
    band,
    density_series,
    describe,
    imbalance,
    on_grid,
    recovery_events,
    run_metrics,
    series,
    summarise_method,
    time_to_accuracy,
)
from prfl.report.runset import load_runset

from .conftest import BYTES_DOWN, BYTES_UP, make_history


def test_time_to_accuracy_is_the_first_evaluation_at_or_above_the_target() -> None:
    recs = make_history([(0.0, 0.1), (10.0, 0.5), (20.0, 0.79), (30.0, 0.8), (40.0, 0.7)], [1, 1], 0.0)
    assert time_to_accuracy(recs, 0.5) == 10.0  # equal counts
    assert time_to_accuracy(recs, 0.6) == 20.0  # 0.79 at 20 s
    assert time_to_accuracy(recs, 0.8) == 30.0
    assert time_to_accuracy(recs, 0.05) == 0.0
    assert time_to_accuracy(recs, 0.81) is None


def test_describe_uses_the_sample_sd_and_counts_missing_values() -> None:
    st = describe([10.0, 20.0, 30.0])
    assert (st.mean, st.std, st.n, st.total, st.min, st.max) == (20.0, 10.0, 3, 3, 10.0, 30.0)
    assert st.fmt() == "20.0 ± 10.0" and st.fmt(0) == "20 ± 10"
    part = describe([60.0, None, math.inf])
    assert (part.mean, part.std, part.n, part.total) == (60.0, None, 1, 3) and not part.all_present
    assert part.fmt() == "60.0"
    assert describe([]).fmt() == "-" and describe([None]).n == 0
    assert [auto_digits(x) for x in (1234.0, 45.0, 6.33, 0.11, 0.0)] == [0, 1, 2, 3, 0]


def test_imbalance_is_max_over_min_and_the_coefficient_of_variation() -> None:
    ratio, cv = imbalance([2, 4, 6])
    assert ratio == 3.0
    assert cv == pytest.approx(math.sqrt(8 / 3) / 4)  # pstdev of 2, 4, 6 is sqrt(8/3); mean 4
    assert imbalance([5, 0, 1])[0] == math.inf
    assert imbalance([3, 3, 3]) == (1.0, 0.0)
    assert imbalance([]) == (None, None) and imbalance([0, 0]) == (None, None)


def test_run_metrics_from_the_history_alone_sums_arrivals() -> None:
    recs = make_history([(0.0, 0.1), (10.0, 0.6), (20.0, 0.85)], [4, 2, 2], 2e6)
    m = run_metrics(recs, None, targets=[0.5, 0.9])
    assert m.local_rounds == [4, 2, 2]
    assert m.client_upload_bytes == [4 * BYTES_UP, 2 * BYTES_UP, 2 * BYTES_UP]
    assert m.client_download_bytes == [4 * BYTES_DOWN, 2 * BYTES_DOWN, 2 * BYTES_DOWN]
    assert m.server_egress_bytes == 2e6  # the last evaluation's cumulative count
    assert (m.final_accuracy, m.best_accuracy, m.virtual_seconds) == (0.85, 0.85, 20.0)
    assert m.time_to == {0.5: 10.0, 0.9: None}
    assert m.imbalance_ratio == 2.0


def test_method_summary_and_speedups_over_seeds(handmade) -> None:
    rs = load_runset(handmade)
    fast = summarise_method("fast", "prfl", rs.methods["fast"], [0.5, 0.8])
    slow = summarise_method("slow", "fedasync", rs.methods["slow"], [0.5, 0.8])
    add_speedups([fast, slow], "slow")
    t05, t08 = fast.target(0.5), fast.target(0.8)
    assert (t05.time.mean, t05.time.std) == (15.0, pytest.approx(math.sqrt(50)))  # times 10 and 20
    assert (t08.time.mean, t08.time.n) == (25.0, 2)  # 20 and 30
    s05, s08 = slow.target(0.5), slow.target(0.8)
    assert (s05.time.mean, s05.time.std) == (45.0, pytest.approx(math.sqrt(450)))  # 30 and 60
    assert (s08.time.mean, s08.time.n, s08.time.total) == (60.0, 1, 2)  # seed 1 never reaches 0.8
    assert t05.speedup == pytest.approx(3.0)  # 45 / 15
    assert t08.speedup is None  # the baseline did not reach 0.8 on every seed
    assert s05.speedup == pytest.approx(1.0)
    assert fast.final_accuracy.mean == pytest.approx(0.85) and fast.final_accuracy.std == pytest.approx(0.0)
    assert slow.final_accuracy.mean == pytest.approx(0.785)
    assert slow.final_accuracy.std == pytest.approx(math.sqrt(2 * 0.035**2))
    assert [c.mean for c in fast.local_rounds_per_client] == [3.5, 2.5, 2.5]
    assert fast.local_rounds_total.mean == 8.5  # 8 and 9
    assert (fast.imbalance_ratio.mean, fast.imbalance_ratio.n) == (1.5, 2)  # 4/2 and 3/3
    assert (slow.imbalance_ratio.mean, slow.imbalance_ratio.n, slow.imbalance_ratio.total) == (6.0, 1, 2)
    assert slow.server_egress_mb.mean == pytest.approx(2.0)  # 1e6 and 3e6 bytes
    assert [c.mean for c in fast.client_upload_mb] == pytest.approx([3.5e-3, 2.5e-3, 2.5e-3])


def test_curves_on_a_common_grid_and_their_band() -> None:
    grid = np.array([0.0, 5.0, 10.0, 15.0, 20.0])
    a = on_grid(np.array([0.0, 10.0]), np.array([0.0, 1.0]), grid)
    assert a[:3].tolist() == [0.0, 0.5, 1.0] and np.isnan(a[3:]).all()  # NaN after the run ends
    b = on_grid(np.array([0.0, 20.0]), np.array([1.0, 1.0]), grid)
    mean, _, hi = band([a, b])
    assert mean.tolist() == [0.5, 0.75, 1.0, 1.0, 1.0]
    assert (hi - mean)[0] == pytest.approx(math.sqrt(0.5))  # sample sd of 0 and 1
    assert (hi - mean)[3] == 0.0  # one curve left: the band collapses onto it
    ts, accs = series([{"event": "eval", "time": 3, "accuracy": 0.4}, {"event": "arrival", "time": 4}], "accuracy")
    assert ts.tolist() == [3.0] and accs.tolist() == [0.4]


def test_densities_and_recovery_events() -> None:
    recs = make_history([(0.0, 0.1), (10.0, 0.6), (20.0, 0.85)], [1, 1, 1], 0.0, densities=True)
    ts, mat = density_series(recs)
    assert ts.tolist() == [0.0, 10.0, 10.0, 20.0]  # evals at 0, 10, 20; a densities event at 10
    assert mat[1].tolist() == [1.0, 0.3, 0.1]
    assert mat.shape == (4, 3)
    evs = recovery_events(recs)
    assert [(e.time, e.scope, e.client) for e in evs] == [(10.0, "server", None), (15.0, "client", 1)]
