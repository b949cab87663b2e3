"""Aggregates of arrival records: per-client time split and upload bytes by kind."""

from __future__ import annotations

import pytest

from prfl.sim.history import time_breakdown, upload_split


def arrival(client: int, d: float, w: float, c: float, u: float, **extra: int) -> dict:
    return {"event": "arrival", "client": client, "download": d, "link_wait": w, "compute": c, "upload": u, **extra}


def test_time_breakdown_is_the_mean_per_client() -> None:
    recs = [
        {"event": "start", "time": 0.0},
        arrival(0, 1.0, 0.0, 2.0, 3.0),
        arrival(0, 3.0, 1.0, 2.0, 1.0),
        arrival(2, 0.5, 0.25, 1.0, 2.0),
        {"event": "arrival", "client": 1, "duration": 4.0},  # an older history's record: skipped
    ]
    b = time_breakdown(recs)
    assert b == {"download": [2.0, None, 0.5], "link_wait": [0.5, None, 0.25], "compute": [2.0, None, 1.0],
                 "upload": [2.0, None, 2.0]}
    assert time_breakdown(recs, num_clients=4)["compute"] == [2.0, None, 1.0, None]
    assert time_breakdown([]) == {"download": [], "link_wait": [], "compute": [], "upload": []}


def test_upload_split_sums_each_kind() -> None:
    recs = [arrival(0, 0, 0, 0, 0, bytes_up_values=10, bytes_up_index=2, bytes_up_importance=5),
            arrival(1, 0, 0, 0, 0, bytes_up_values=7),
            {"event": "eval", "bytes_up_values": 1000}]
    assert upload_split(recs) == {"values": 17, "index": 2, "importance": 5}
    assert upload_split([]) == pytest.approx({"values": 0, "index": 0, "importance": 0})
