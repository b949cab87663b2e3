"""docs/RESULTS.md sections of benchmarks/bench_scale.py: checkpoints and the SIGKILL check."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "make_results_md.py"


def _script():
    spec = importlib.util.spec_from_file_location("make_results_md", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_scale_section_lists_checkpoints_and_the_time_ratio() -> None:
    gib = 2**30
    text = "\n".join(_script().scale_section({
        "server_rounds": 2000, "peak_rss_bytes": 3.5 * gib, "target_peak_rss_bytes": 4 * gib, "wall_seconds": 900.0,
        "train_seconds": 500.0, "wall_over_train": 1.8, "target_wall_over_train": 2.0, "pieces": 2,
        "workload": {"clients": 10000},
        "checkpoints": [{"round": 500, "bytes": 2.5e9, "seconds": 41.0, "rss_before_bytes": 2 * gib,
                         "peak_rss_while_writing_bytes": 2.25 * gib}],
    }, "scale-10000.json"))
    assert "## A large fleet (10000 clients)" in text
    assert "| wall / training time | 1.80 | <= 2 |" in text
    assert "| 500 | 2.50 | 41 | 2.00 | 2.25 |" in text
    assert "| pieces the run went in (resumed from checkpoints) | 2 | - |" in text


def test_kill_section_says_whether_the_histories_are_identical() -> None:
    script = _script()
    same = "\n".join(script.scale_kill_section({"identical": True, "server_rounds": 200, "history_lines": 900,
                                                "resumed_history_lines": 900, "workload": {"clients": 10000}},
                                               "scale-kill-10000.json"))
    assert "| history and summary identical | **yes** |" in same and "| 900 / 900 |" in same
    differ = "\n".join(script.scale_kill_section({"identical": False, "first_differing_line": 17}, "k.json"))
    assert "**no**" in differ and "| first differing line | 17 |" in differ
