"""Tests for prfl.sim.availability: on/off models and traces."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from prfl.sim.availability import (
    AlwaysOn,
    AvailabilityError,
    AvailabilityModel,
    OnOffAvailability,
    TraceAvailability,
)


def online_time(model: AvailabilityModel, client: int, horizon: float) -> float:
    """Total online time on [0, horizon], walking the change points."""
    t, total = 0.0, 0.0
    while t < horizon:
        nxt = min(model.next_change(client, t), horizon)
        if model.is_online(client, t):
            total += nxt - t
        t = nxt
    return total


def test_always_on() -> None:
    model = AlwaysOn()
    assert isinstance(model, AvailabilityModel)
    assert model.is_online(3, 1e9) and model.next_change(3, 0.0) == math.inf


def test_on_off_deterministic_and_random_access() -> None:
    a = OnOffAvailability(100.0, 50.0, run_seed=9)
    b = OnOffAvailability(100.0, 50.0, run_seed=9)
    times = [0.0, 5000.0, 10.0, 12345.6, 300.0]
    # b answers the same questions in another order (and asks far ahead first)
    b.is_online(2, 1e5)
    assert [a.is_online(2, t) for t in times] == [b.is_online(2, t) for t in times]
    assert [a.next_change(2, t) for t in times] == [b.next_change(2, t) for t in times]
    assert a.change_times(2, 1e4) == b.change_times(2, 1e4)
    assert a.change_times(2, 1e4) != a.change_times(3, 1e4)
    assert OnOffAvailability(100.0, 50.0, run_seed=10).change_times(2, 1e4) != a.change_times(2, 1e4)
    assert isinstance(a, AvailabilityModel)


def test_on_off_alternation() -> None:
    model = OnOffAvailability(10.0, 5.0, run_seed=1)
    assert model.is_online(0, 0.0)  # start_online_prob = 1
    changes = model.change_times(0, 500.0)
    assert all(x < y for x, y in zip(changes, changes[1:]))
    state = True
    for s in changes:
        assert model.is_online(0, math.nextafter(s, 0.0)) == state  # just before the change
        state = not state
        assert model.is_online(0, s) == state  # at the change: new state (right-continuous)
        assert model.next_change(0, math.nextafter(s, 0.0)) == s
    assert model.next_change(0, changes[0]) == changes[1]


def test_start_online_prob() -> None:
    off = OnOffAvailability(10.0, 5.0, run_seed=1, start_online_prob=0.0)
    assert not any(off.is_online(c, 0.0) for c in range(20))
    mixed = OnOffAvailability(10.0, 5.0, run_seed=1, start_online_prob=0.5)
    starts = [mixed.is_online(c, 0.0) for c in range(400)]
    # Binomial(400, 0.5): sd = 10, so 200 +- 50 is a 5-sigma band
    assert 150 <= sum(starts) <= 250


def test_long_run_online_fraction() -> None:
    # Each on/off cycle (mean 4 s) contributes one renewal; over 20000 s per client ~ 5000 cycles.
    # The fraction's sd is about sqrt(2/5000) * 0.75 * 0.25 ~ 0.004 per client, so a 0.02
    # tolerance over the mean of 3 clients is > 8 standard errors.
    model = OnOffAvailability(mean_on=3.0, mean_off=1.0, run_seed=5)
    horizon = 20000.0
    fraction = sum(online_time(model, c, horizon) for c in range(3)) / (3 * horizon)
    assert fraction == pytest.approx(model.online_fraction, abs=0.02)
    assert model.online_fraction == 0.75


def test_infinite_mean() -> None:
    leaver = OnOffAvailability(mean_on=10.0, mean_off=math.inf, run_seed=0)
    s = leaver.next_change(0, 0.0)
    assert math.isfinite(s) and not leaver.is_online(0, s + 1e6)
    assert leaver.next_change(0, s) == math.inf
    assert OnOffAvailability(math.inf, 1.0, run_seed=0).next_change(4, 0.0) == math.inf


def test_on_off_errors() -> None:
    with pytest.raises(AvailabilityError, match="mean_on"):
        OnOffAvailability(0.0, 1.0, run_seed=0)
    with pytest.raises(AvailabilityError, match="mean_off"):
        OnOffAvailability(1.0, -1.0, run_seed=0)
    with pytest.raises(AvailabilityError, match="start_online_prob"):
        OnOffAvailability(1.0, 1.0, run_seed=0, start_online_prob=1.5)
    with pytest.raises(AvailabilityError, match="t >= 0"):
        OnOffAvailability(1.0, 1.0, run_seed=0).is_online(0, -1.0)


def test_trace() -> None:
    trace = TraceAvailability({1: [(10.0, 20.0), (20.0, 25.0), (40.0, math.inf)], 2: [(0.0, 5.0)]})
    assert trace.periods == {1: [(10.0, 25.0), (40.0, math.inf)], 2: [(0.0, 5.0)]}  # touching merged
    assert trace.is_online(0, 123.0) and trace.next_change(0, 0.0) == math.inf  # absent: always on
    assert trace.is_online(1, 9.99) and not trace.is_online(1, 10.0) and not trace.is_online(1, 24.9)
    assert trace.is_online(1, 25.0) and not trace.is_online(1, 1e9)
    assert [trace.next_change(1, t) for t in (0.0, 10.0, 30.0, 40.0)] == [10.0, 25.0, 40.0, math.inf]
    assert not trace.is_online(2, 0.0) and trace.next_change(2, 0.0) == 5.0


@pytest.mark.parametrize(
    ("periods", "pattern"),
    [
        ({0: [(5.0, 5.0)]}, "t_on must be after t_off"),
        ({0: [(-1.0, 5.0)]}, "t_off must be a finite time >= 0"),
        ({0: [(10.0, 20.0), (15.0, 30.0)]}, "overlaps"),
        ({0: [(10.0, 20.0), (1.0, 3.0)]}, "overlaps or precedes"),
        ({0: [(1.0,)]}, "expected a pair"),
        ({-1: [(1.0, 2.0)]}, "client ids"),
    ],
)
def test_trace_errors(periods: dict, pattern: str) -> None:
    with pytest.raises(AvailabilityError, match=pattern):
        TraceAvailability(periods)


def test_trace_files(tmp_path: Path) -> None:
    yml = tmp_path / "trace.yaml"
    yml.write_text("clients:\n  1: [[10, 20], [40, null]]\n  3: [[0, 5.5]]\n")
    csv = tmp_path / "trace.csv"
    csv.write_text("client,t_off,t_on\n1,10,20\n1,40,\n3,0,5.5\n")
    expected = {1: [(10.0, 20.0), (40.0, math.inf)], 3: [(0.0, 5.5)]}
    assert TraceAvailability.load(yml).periods == expected
    assert TraceAvailability.load(csv).periods == expected
    flat = tmp_path / "flat.yml"
    flat.write_text("0: [[1, 2]]\n")
    assert TraceAvailability.load(flat).periods == {0: [(1.0, 2.0)]}


@pytest.mark.parametrize(
    ("name", "text", "pattern"),
    [
        ("t.csv", "client,start,end\n", "header must be client,t_off,t_on"),
        ("t.csv", "client,t_off,t_on\n0,abc,3\n", r"line 2: field 't_off' is not a number"),
        ("t.csv", "client,t_off,t_on\n0,5,3\n", "client 0, period 0: t_on must be after t_off"),
        ("t.yaml", "x: [[1, 2]]\n", "client key 'x' is not an integer"),
        ("t.yaml", "0: [[1, 2, 3]]\n", r"client 0, period 0: expected \[t_off, t_on\]"),
        ("t.txt", "", "unknown trace file type"),
    ],
)
def test_trace_file_errors(tmp_path: Path, name: str, text: str, pattern: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(AvailabilityError, match=pattern) as err:
        TraceAvailability.load(path)
    assert str(path) in str(err.value)
