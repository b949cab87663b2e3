"""Tables, outputs and plots of the hand-made comparison (see conftest for its numbers)."""

from __future__ import annotations

import csv
import io
import json
import xml.etree.ElementTree as ET
from pathlib import Path

from prfl.report import tables
from prfl.report.outputs import write_outputs
from prfl.report.runset import load_runset

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")  # IHDR
    assert width > 100 and height > 100


def assert_svg(path: Path) -> None:
    root = ET.parse(path).getroot()  # well-formed XML
    assert root.tag.endswith("svg") and root.get("width") and root.get("height")


def rows_by_method(table: tables.Table) -> dict[str, dict[str, str]]:
    headers, rows = table
    return {r[0]: dict(zip(headers, r)) for r in rows}


def test_time_to_accuracy_table(handmade) -> None:
    rs = load_runset(handmade)
    t = rows_by_method(tables.time_to_accuracy_table(rs.summaries(), rs.targets, rs.baseline))
    assert t["fast"]["time to 0.5 (s)"] == "15.0 ± 7.1"  # 10, 20
    assert t["fast"]["time to 0.8 (s)"] == "25.0 ± 7.1"  # 20, 30
    assert t["fast"]["speed-up vs slow (0.5)"] == "3.00x"  # 45 / 15
    assert t["fast"]["speed-up vs slow (0.8)"] == "-"  # the baseline missed 0.8 on seed 1
    assert t["slow"]["speed-up vs slow (0.5)"] == "1.00x"
    assert t["slow"]["time to 0.5 (s)"] == "45.0 ± 21.2"  # 30, 60
    assert t["slow"]["time to 0.8 (s)"] == "60.0 (1/2 reached)"
    md = tables.markdown(tables.time_to_accuracy_table(rs.summaries(), rs.targets, rs.baseline))
    assert md.splitlines()[0] == ("| method | seeds | time to 0.5 (s) | speed-up vs slow (0.5) | time to 0.8 (s) "
                                  "| speed-up vs slow (0.8) |")
    assert "| fast | 2 | 15.0 ± 7.1 | 3.00x | 25.0 ± 7.1 | - |" in md


def test_accuracy_participation_and_bytes_tables(handmade) -> None:
    summ = load_runset(handmade).summaries()
    acc = rows_by_method(tables.accuracy_table(summ))
    assert acc["fast"]["final accuracy"] == "0.850 ± 0.000"
    assert acc["slow"]["final accuracy"] == "0.785 ± 0.049"
    part = rows_by_method(tables.participation_table(summ))
    assert part["fast"]["local rounds (all clients)"] == "8.50 ± 0.71"  # 8 and 9
    assert part["fast"]["max/min"] == "1.50 ± 0.71"  # 2 and 1
    assert part["slow"]["max/min"] == "6.00 (∞ in 1/2)"  # 6/1, and a client with no round
    assert part["fast"]["CV"] == "0.177 ± 0.250"  # 0.354 (4, 2, 2) and 0 (3, 3, 3)
    assert (part["slow"]["min client"], part["slow"]["max client"]) == ("0.5", "5.5")
    b = rows_by_method(tables.bytes_table(summ))
    assert b["slow"]["server egress (MB)"] == "2.00 ± 1.41"  # 1 and 3 MB
    assert b["fast"]["client upload (MB per client)"] == "0.0028 [0.0025-0.0035]"  # 8.5 kB / 3 clients; at most 4 decimals


def test_csv_records_hold_the_raw_numbers(handmade) -> None:
    rs = load_runset(handmade)
    summ = rs.summaries()
    rows = list(csv.DictReader(io.StringIO(tables.csv_text(tables.time_to_accuracy_records(summ, "slow")))))
    fast05 = next(r for r in rows if r["method"] == "fast" and r["target"] == "0.5")
    assert float(fast05["seconds_mean"]) == 15.0 and float(fast05["speedup"]) == 3.0 and fast05["reached"] == "2"
    slow08 = next(r for r in rows if r["method"] == "slow" and r["target"] == "0.8")
    assert slow08["reached"] == "1" and slow08["speedup"] == ""
    runs = tables.run_records(rs.title, rs.methods, rs.targets)
    assert [(r["method"], r["seed"], r["time_to_0.8"]) for r in runs] == [
        ("fast", 0, 20.0), ("fast", 1, 30.0), ("slow", 0, 60.0), ("slow", 1, None)]
    assert runs[2]["local_rounds"] == "6 1 2" and runs[2]["local_rounds_min"] == 1
    m = {r["method"]: r for r in tables.method_records(summ)}
    assert m["slow"]["imbalance_infinite_runs"] == 1 and m["fast"]["final_accuracy_mean"] == 0.85


def test_write_outputs_writes_tables_plots_and_summary(handmade) -> None:
    written = write_outputs(load_runset(handmade), handmade)
    for name in ("accuracy", "egress", "local_rounds", "density"):
        assert_png(handmade / "plots" / f"{name}.png")
        assert_svg(handmade / "plots" / f"{name}.svg")
    for name in ("time_to_accuracy.md", "time_to_accuracy.csv", "accuracy.md", "participation.md", "bytes.md",
                 "clients.md", "methods.csv", "clients.csv", "runs.csv"):
        assert (handmade / "tables" / name).is_file(), name
        assert f"tables/{name}" in written
    md = (handmade / "results.md").read_text(encoding="utf-8")
    assert "## Time to accuracy against slow" in md and "![Accuracy against time](plots/accuracy.png)" in md
    summary = json.loads((handmade / "summary.json").read_text(encoding="utf-8"))
    fast = next(m for m in summary["methods"] if m["method"] == "fast")
    assert fast["time_to_accuracy"]["0.5"]["mean"] == 15.0 and fast["time_to_accuracy"]["0.5"]["speedup"] == 3.0


def test_unfinished_runs_are_listed_and_left_out(handmade) -> None:
    (handmade / "runs" / "slow" / "seed1" / "summary.json").unlink()
    rs = load_runset(handmade)
    assert rs.missing == ["slow seed 1"]
    slow = next(s for s in rs.summaries() if s.method == "slow")
    assert len(slow.runs) == 1 and slow.target(0.8).time.all_present  # seed 0 alone reached 0.8
