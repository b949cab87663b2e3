"""Generate docs/RESULTS.md from the committed benchmark result files; never edit it by hand.

Sources (under ``--results``, default ``benchmarks/results``):

* ``paper_fmnist/results.csv`` -- one row per run, as written by ``benchmarks/paper_fmnist.py``
  (scenario, method, seed, final_accuracy, best_accuracy, virtual_seconds, server_rounds,
  local_rounds, local_rounds_min, local_rounds_max, server_egress_mb, wall_seconds,
  time_to_<target>...). Any other ``*/results.csv``, ``*/*/results.csv`` or ``*/tables/runs.csv`` (``prfl compare``)
  with these columns is rendered the same way; a ``NOTE.md`` beside a ``results.csv`` is quoted under
  each of its tables.
* ``headline/manifest.json`` and ``headline/records/<group>/<method>/seed<k>.json``
  (``benchmarks/headline.py``): the plan of the headline sweep and one compact record per
  finished run; rendered as the headline section (tables per group, a plot per group written to
  ``figures/`` beside the output, the cells still missing). Definitions: ``prfl.report.sweep``.
* ``masked_training.json`` (``benchmarks/bench_masked_training.py``), ``simulator.json``
  (``benchmarks/bench_simulator.py``), ``flower_sim.json`` (``benchmarks/bench_flower_sim.py``),
  ``scale-<clients>.json`` and ``scale-kill-<clients>.json`` (``benchmarks/bench_scale.py``),
  ``vmap.json`` (``benchmarks/bench_vmap.py``), ``buffer.json`` (``benchmarks/bench_buffer.py``),
  ``fuzz.json`` (``benchmarks/fuzz_policies.py``), ``train_step.json``
  (``benchmarks/bench_train_step.py``) and ``real_links.json`` (``benchmarks/bench_real_links.py``);
  any other ``*.json`` at the top level is listed by its scalar fields.

Statistics follow ``prfl.report``: mean ± sample sd over seeds; a time to accuracy is the first
evaluation at or above the target; a speed-up (baseline time / method time) is given only when
every seed of both methods reached the target.

Usage:
  .venv/bin/python scripts/make_results_md.py            # writes docs/RESULTS.md
  .venv/bin/python scripts/make_results_md.py --check    # exit 1 if docs/RESULTS.md is stale
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from prfl.report.analysis import Stat, describe, imbalance
from prfl.report.tables import markdown
from prfl.report import sweep
from prfl.runtime.machine import describe as describe_machine

ROOT = Path(__file__).resolve().parent.parent
COMMAND = "python scripts/make_results_md.py"
METHOD_ORDER = ("prfl", "fedasync", "fedbuff", "fedfix", "heterofl", "fedavg")
RUN_COLUMNS = ("scenario", "method", "seed", "final_accuracy")


def _float(x: str | None) -> float | None:
    if x is None or x.strip() == "" or x.strip().lower() in ("none", "nan"):
        return None
    return float(x)


def read_runs(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def target_columns(rows: Sequence[dict[str, str]]) -> list[tuple[float, str]]:
    """(target, column) of the ``time_to_<target>`` columns, by target."""
    cols = [c for c in (rows[0] if rows else {}) if c.startswith("time_to_")]
    return sorted(((float(c[len("time_to_"):]), c) for c in cols), key=lambda p: p[0])


def method_key(name: str) -> tuple[int, int, str]:
    """PR-FL and its variants first, then the baselines in the paper's order, then the rest."""
    base = name.split("-")[0]
    idx = METHOD_ORDER.index(base) if base in METHOD_ORDER else len(METHOD_ORDER)
    return idx, 0 if name == base else 1, name


def _cell(st: Stat, digits: int | None = None) -> str:
    if st.n == 0:
        return f"not reached (0/{st.total})"
    text = st.fmt(digits)
    if not st.all_present:
        text += f" ({st.n}/{st.total} reached)"
    return text


def scenario_table(rows: Sequence[dict[str, str]], baseline: str) -> str:
    """The Markdown table of one scenario: time to each target with speed-ups, accuracy, rounds, bytes."""
    targets = target_columns(rows)
    methods = sorted({r["method"] for r in rows}, key=method_key)
    by_method = {m: [r for r in rows if r["method"] == m] for m in methods}
    times = {m: {t: describe(_float(r.get(col)) for r in rs) for t, col in targets} for m, rs in by_method.items()}
    headers = ["method", "seeds"]
    for t, _ in targets:
        headers += [f"time to {t:g} (s)", f"speed-up vs {baseline}"]
    headers += ["final accuracy", "best accuracy", "local rounds min-max", "max/min", "server egress (GB)"]
    body = []
    for m, rs in by_method.items():
        row = [m, str(len(rs))]
        seeds = {r.get("seed") for r in rs}
        base_rows = [r for r in by_method.get(baseline, []) if r.get("seed") in seeds]
        for t, col in targets:
            st = times[m][t]
            # against the baseline's runs of the same seeds
            ref = describe(_float(r.get(col)) for r in base_rows) if base_rows else None
            speed = "-"
            if ref is not None and ref.all_present and st.all_present and st.mean:
                speed = f"{ref.mean / st.mean:.2f}x"
            row += [_cell(st, 0), speed]
        lows = [_float(r.get("local_rounds_min")) for r in rs]
        highs = [_float(r.get("local_rounds_max")) for r in rs]
        ratios = []
        for r in rs:
            per = [float(x) for x in (r.get("local_rounds") or "").split()]
            ratios.append(imbalance(per)[0] if per else None)
        ratio = describe(ratios)
        lo = min((x for x in lows if x is not None), default=None)
        hi = max((x for x in highs if x is not None), default=None)
        egress = describe((_float(r.get("server_egress_mb")) or 0.0) / 1e3 for r in rs)
        row += [
            describe(_float(r.get("final_accuracy")) for r in rs).fmt(3),
            describe(_float(r.get("best_accuracy")) for r in rs).fmt(3),
            "-" if lo is None or hi is None else f"{lo:.0f}-{hi:.0f}",
            ratio.fmt(2) if ratio.all_present else ("∞" if ratio.n == 0 else f"{ratio.fmt(2)} (∞ in {ratio.total - ratio.n})"),
            egress.fmt(),
        ]
        body.append(row)
    return markdown((headers, body))


def runs_section(path: Path, results: Path, baseline: str,
                 reference: tuple[str, Sequence[dict[str, str]]] | None = None) -> list[str]:
    """One table per scenario of a run CSV. ``reference`` (name, rows): where a scenario lacks
    the baseline or ``prfl``, their runs of the same scenario and seeds are taken from there (an
    ablation table then shows the speed-up against the same baseline runs)."""
    rows = read_runs(path)
    rel = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.relative_to(results.parent)
    if not rows or any(c not in rows[0] for c in RUN_COLUMNS):
        return [f"`{rel.as_posix()}` has no run rows in the expected columns; skipped.\n"]
    lines = []
    note_file = path.parent / "NOTE.md"
    for scenario in sorted({r["scenario"] for r in rows}):
        sub = [r for r in rows if r["scenario"] == scenario]
        seeds = sorted({int(float(r["seed"])) for r in sub})
        borrowed: list[str] = []
        if reference is not None:
            have = {r["method"] for r in sub}
            for method in (m for m in ("prfl", baseline) if m not in have):
                extra = [r for r in reference[1] if r["scenario"] == scenario and r["method"] == method
                         and int(float(r["seed"])) in seeds]
                if extra:
                    sub = sub + extra
                    borrowed.append(method)
        # a second run set (ablations) names its directory, so its tables are not mistaken for the main ones
        where = path.parent.relative_to(results) if path.parent.is_relative_to(results) else Path(path.parent.name)
        label = "" if reference is None else f" ({where.as_posix()})"
        lines.append(f"### {scenario}{label}\n")
        note = f" Rows of {', '.join(borrowed)} are the same seeds' runs from `{reference[0]}`." if borrowed else ""
        lines.append(f"From `{rel.as_posix()}`: {len(sub)} runs, seeds {', '.join(map(str, seeds))}. "
                     f"Times are virtual seconds (mean ± sd over seeds).{note}\n")
        if note_file.is_file():  # what the reader must know about these runs (e.g. the build that made them)
            lines.append(note_file.read_text(encoding="utf-8").strip() + "\n")
        lines.append(scenario_table(sub, baseline))
    return lines


def _get(d: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _num(x: Any, fmt: str = ".3f") -> str:
    return "-" if not isinstance(x, (int, float)) or isinstance(x, bool) else format(x, fmt)


def _provenance(d: dict[str, Any]) -> str:
    parts = []
    if d.get("date"):
        parts.append(f"run {d['date']}")
    if d.get("command"):
        parts.append(f"command `{d['command']}`")
    return ("; ".join(parts) + ".\n") if parts else ""


def _section_head(title: str, d: dict[str, Any], name: str, workload: bool = True) -> list[str]:
    """A benchmark section's heading, provenance and (if the file has one) workload line."""
    lines = [f"## {title}\n", f"From `{name}`; {_provenance(d)}"]
    w = (d.get("workload") or {}) if workload else {}
    if w:
        lines.append("Workload: " + ", ".join(f"{k} {v}" for k, v in w.items()) + ".\n")
    return lines


def masked_training_section(d: dict[str, Any], name: str) -> list[str]:
    lines = _section_head("Masked against dense local training", d, name, workload=False)
    setup = d.get("setup") or {}
    lines.append(f"Model `{setup.get('model', '?')}`, {setup.get('steps_per_task', '?')} local steps of batch "
                 f"{_get(setup, 'train_config', 'batch_size') or '?'}; target overhead at most "
                 f"{_num(d.get('target'), '.2f')}x ({d.get('verdict_metric', 'paired ratio')}). "
                 f"Verdict: **{d.get('verdict', '?')}** (worst paired ratio {_num(d.get('worst_paired_ratio'))}).\n")
    rows = []
    for dens, r in sorted((d.get("ratios_vs_dense") or {}).items(), key=lambda p: float(p[0])):
        w = r.get("wall") or {}
        rows.append([str(dens), _num(w.get("paired_ratio_median")), _num(w.get("paired_ratio_p10")),
                     _num(w.get("paired_ratio_p90")), _num(w.get("ratio_of_medians")),
                     "yes" if r.get("pass") else "no"])
    if rows:
        lines.append(markdown((["density", "paired ratio (median)", "p10", "p90", "ratio of medians", "pass"], rows)))
    m = d.get("machine") or {}
    if m:
        lines.append(f"Machine: {m.get('cpu_model', '?')}, {m.get('cpu_count', '?')} CPUs, torch "
                     f"{m.get('torch_version', '?')}, {m.get('torch_num_threads', '?')} thread(s).\n")
    return lines


def simulator_section(d: dict[str, Any], name: str) -> list[str]:
    policy = _get(d, "workload", "policy")
    title = "Simulator overhead and parallel speed-ups" + (f": {policy}" if isinstance(policy, str) else "")
    lines = _section_head(title, d, name)
    rows = [
        ["inline overhead (wall / training, median)", _num(d.get("inline_overhead_median")),
         f"<= {_num(d.get('goal_overhead'), '.2f')}" if d.get("goal_overhead") is not None else "-"],
    ]
    speedups = d.get("speedup_median")
    if not isinstance(speedups, dict):  # files written before the Ray executor was measured
        speedups = {"process": d.get("process_speedup_median")}
    for kind, value in speedups.items():
        rows.append([f"{kind} speed-up vs inline (median)", _num(value, ".2f"), "-"])
    per_worker = d.get("per_worker_overhead_median")
    if isinstance(per_worker, dict):
        workers = _get(d, "workload", "workers")
        for kind, value in per_worker.items():
            rows.append([f"{kind}: wall / (training / {workers} workers), median", _num(value), "-"])
    same = d.get("histories_identical", "-")
    if isinstance(same, dict):
        for kind, value in same.items():
            rows.append([f"{kind} history identical to inline", str(value), "True"])
    else:
        rows.append(["histories identical across executors", str(same), "True"])
    lines.append(markdown((["measure", "value", "goal"], rows)))
    prof = d.get("profile")
    if isinstance(prof, dict) and isinstance(prof.get("seconds"), dict):
        lines.append(f"Where the time of one inline run goes (cProfile; wall {_num(prof.get('wall'), '.1f')} s, "
                     f"training {_num(prof.get('train'), '.1f')} s):\n")
        share = prof.get("share") or {}
        lines.append(markdown((["part", "seconds", "share of wall"],
                               [[k, _num(v, ".2f"), _num(100 * share.get(k, 0.0), ".1f") + " %"]
                                for k, v in prof["seconds"].items()])))
    m = d.get("machine") or {}
    if m:
        lines.append("Machine: " + ", ".join(f"{k} {v}" for k, v in m.items()) + ".\n")
    return lines


def flower_section(d: dict[str, Any], name: str) -> list[str]:
    lines = _section_head("FedAvg: prfl's simulator against Flower's Simulation Engine", d, name)
    runs = d.get("runs") or {}
    rows = []
    for run, r in runs.items():
        walls = r.get("walls")
        rows.append([run, _num(r.get("wall"), ".1f"), _num(_get(d, "median_cpu_seconds", run), ".1f"),
                     _num(r.get("final_accuracy")),
                     ", ".join(_num(w, ".1f") for w in walls) if isinstance(walls, list) else "-"])
    lines.append(markdown((["run", "wall (s, median)", "CPU (s, median)", "final accuracy", "every run's wall (s)"], rows)))
    goal = d.get("goal_flower_over_prfl")
    text = (f"Flower / prfl wall time: {_num(d.get('wall_ratio_flower_over_prfl_process'), '.2f')} against prfl's "
            f"process pool, {_num(d.get('wall_ratio_flower_over_prfl_inline'), '.2f')} against prfl inline")
    if d.get("wall_ratio_flower_over_plain_loop") is not None:
        text += f"; {_num(d.get('wall_ratio_flower_over_plain_loop'), '.2f')} against the plain PyTorch loop (the floor)"
    if d.get("wall_ratio_plain_loop_over_prfl_process") is not None:
        text += (f". Plain loop / prfl process pool: {_num(d.get('wall_ratio_plain_loop_over_prfl_process'), '.2f')} "
                 "(above 1: prfl is faster than the bare loop)")
    if d.get("flower_cpu_seconds_undercounted"):
        text += ". Flower's CPU seconds miss Ray's daemonised processes: a lower bound"
    if goal is not None:
        text += f". Goal: Flower / prfl >= {_num(goal, '.0f')}"
    lines.append(text + ".\n")
    return lines


def train_step_section(d: dict[str, Any], name: str) -> list[str]:
    lines = _section_head("One local training task: step variants", d, name)
    ref = d.get("reference", "per-parameter")
    rows = []
    for variant, r in (d.get("tasks") or {}).items():
        same = next((v for k, v in r.items() if k.startswith("bit_identical_to_")), None)
        rows.append([variant, _num(_mul(r.get("median_wall_s"), 1e3), ".1f"), _num(_mul(r.get("median_cpu_s"), 1e3), ".1f"),
                     _num(r.get("paired_cpu_ratio")), _num(r.get("paired_wall_ratio")),
                     "yes" if same else _num(r.get("max_abs_diff"), ".1e")])
    lines.append(markdown((["variant", "wall (ms)", "CPU (ms)", f"CPU / {ref} (paired)", f"wall / {ref} (paired)",
                            f"floats equal to {ref} (else max abs diff)"], rows)))
    notes = d.get("notes") or {}
    for key, note in notes.items():
        if isinstance(note, dict):
            note = ", ".join(f"{k} {_num(v, '.1f') if isinstance(v, float) else v}" for k, v in note.items())
        lines.append(f"{key}: {note}.\n")
    evals = d.get("evaluation") or []
    if evals:
        lines.append(markdown((["evaluation mode", "batch size", "CPU (s)", "accuracy"],
                               [[str(e.get("mode")), str(e.get("batch_size")), _num(e.get("median_cpu_s")),
                                 _num(e.get("accuracy"), ".4f")] for e in evals])))
    pool = d.get("process_pool")
    if isinstance(pool, dict):
        lines.append(f"The process pool's own cost per task ({pool.get('workers', '?')} workers, one-step tasks, "
                     f"{pool.get('rounds', '?')} rounds of {pool.get('tasks_per_round', '?')} tasks, medians):\n")
        lines.append(markdown((["pool", "wall per task (ms)", "CPU per task, workers + caller (ms)", "workers ready after (s)"],
                               [[name, _num(_mul(r.get("median_wall_per_task_s"), 1e3), ".1f"),
                                 _num(_mul(r.get("median_cpu_per_task_s"), 1e3), ".1f"), _num(r.get("startup_s"), ".1f")]
                                for name, r in pool.items() if isinstance(r, dict)])))
    m = d.get("machine") or {}
    if m:
        lines.append("Machine: " + ", ".join(f"{k} {v}" for k, v in m.items()) + ".\n")
    return lines


def _mul(x: Any, k: float) -> Any:
    return x * k if isinstance(x, (int, float)) and not isinstance(x, bool) else x


def scale_section(d: dict[str, Any], name: str) -> list[str]:
    clients = _get(d, "workload", "clients")
    lines = _section_head(f"A large fleet ({clients} clients): server memory, checkpoints, time", d, name)
    gib = 2**30

    def _gib(key: str) -> str:
        v = d.get(key)
        return f"{v / gib:.2f}" if isinstance(v, (int, float)) else "-"

    target = d.get("target_peak_rss_bytes")
    ratio_goal = d.get("target_wall_over_train")
    cks = d.get("checkpoints") or []
    rows = [
        ["server updates", str(d.get("server_rounds", "-")), "-"],
        ["peak RSS of the server process (GiB)", _gib("peak_rss_bytes"),
         f"<= {target / gib:.0f}" if isinstance(target, (int, float)) else "-"],
        ["RSS after loading the scenario (GiB)", _gib("rss_after_scenario_bytes"), "-"],
        ["a dense buffer alone would hold (GiB)", _gib("dense_buffer_would_need_bytes"), "-"],
        ["wall time (s)", _num(d.get("wall_seconds"), ".0f"), "-"],
        ["local training time (s)", _num(d.get("train_seconds"), ".0f"), "-"],
        ["wall / training time", _num(d.get("wall_over_train"), ".2f"),
         f"<= {ratio_goal:g}" if isinstance(ratio_goal, (int, float)) else "-"],
        ["virtual time (s)", _num(d.get("virtual_seconds"), ".0f"), "-"],
        ["clients that arrived", str(d.get("clients_that_arrived", "-")), "-"],
        ["final accuracy", _num(d.get("final_accuracy")), "-"],
        ["pieces the run went in (resumed from checkpoints)", str(d.get("pieces", 1)), "-"],
    ]
    lines.append(markdown((["measure", "value", "goal"], rows)))
    if cks:
        ck_rows = [[str(c.get("round")), _num((c.get("bytes") or 0) / 1e9, ".2f"), _num(c.get("seconds"), ".0f"),
                    _num((c.get("rss_before_bytes") or 0) / gib, ".2f"),
                    _num((c.get("peak_rss_while_writing_bytes") or 0) / gib, ".2f")] for c in cks]
        lines.append(markdown((["checkpoint at update", "size (GB)", "written in (s)", "RSS before (GiB)",
                                "peak RSS while writing (GiB)"], ck_rows)))
    return lines


def scale_kill_section(d: dict[str, Any], name: str) -> list[str]:
    clients = _get(d, "workload", "clients")
    lines = _section_head(f"A large fleet ({clients} clients): SIGKILL, then resume", d, name)
    rows = [
        ["server updates (the kill check's run length)", str(d.get("server_rounds", "-"))],
        ["last checkpoint before the kill (update)", str(d.get("last_checkpoint_round_before_kill", "-"))],
        ["killed after the first checkpoint (s)", _num(d.get("kill_after_first_checkpoint_seconds"), ".0f")],
        ["killed at history line (random, after the first checkpoint)", str(d.get("kill_at_history_line", "-"))],
        ["history lines: uninterrupted / killed and resumed", f"{d.get('history_lines', '-')} / "
                                                               f"{d.get('resumed_history_lines', '-')}"],
        ["first differing line", str(d.get("first_differing_line"))],
        ["history and summary identical", "**yes**" if d.get("identical") else "**no**"],
    ]
    lines.append(markdown((["measure", "value"], rows)))
    return lines


def buffer_section(d: dict[str, Any], name: str) -> list[str]:
    lines = _section_head("MaskFedAvg over a buffer of sparse models: RAM or file", d, name)
    mib = 2**20

    def grown(run: dict[str, Any], key: str) -> str:
        a, b = run.get("rss_before") or {}, run.get(key) or {}
        try:
            return f"{(b['RssAnon'] + b['RssFile'] - a['RssAnon'] - a['RssFile']) / mib:.0f}"
        except (KeyError, TypeError):
            return "-"

    rows = [[str(r.get("variant")), _num(r.get("aggregate_seconds_median"), ".2f"), grown(r, "rss_filled"),
             grown(r, "rss_peak_during_aggregations"), _num((r.get("buffer_nbytes") or 0) / mib, ".0f")]
            for r in d.get("runs") or []]
    lines.append(markdown((["buffer values", "one aggregation (s, median)", "resident growth, filled (MiB)",
                            "resident growth, aggregating (MiB)", "buffer holds (MiB)"], rows)))
    dense = d.get("dense_storage_would_need_bytes")
    if isinstance(dense, (int, float)):
        lines.append(f"Dense storage would hold {dense / 2**30:.1f} GiB.\n")
    return lines


def fuzz_section(d: dict[str, Any], name: str) -> list[str]:
    """fuzz.json (every policy and the Flower driver) or fuzz_<what>.json (a run of some cases)."""
    stem = Path(name).stem
    title = ("Event-order fuzzing of the policies and the Flower driver" if stem == "fuzz"
             else f"Event-order fuzzing: {stem.removeprefix('fuzz_').replace('_', ' ')}")
    lines = _section_head(title, d, name, workload=False)
    rows = [[case, str(r.get("sequences")), str(r.get("steps", "-")), str(r.get("failed")),
             ", ".join(str(f.get("seed")) for f in (r.get("failures") or [])[:5]) or "-", _num(r.get("seconds"), ".0f")]
            for case, r in (d.get("policies") or {}).items()]
    fl = d.get("flower_driver")
    if isinstance(fl, dict):
        rows.append(["Flower driver", str(fl.get("sequences")), "-", str(fl.get("failed")),
                     ", ".join(str(f.get("seed")) for f in (fl.get("failures") or [])[:5]) or "-",
                     _num(fl.get("seconds"), ".0f")])
    lines.append(markdown((["policy case", "sequences", "moves each", "failed", "failing seeds", "seconds"], rows)))
    lines.append(f"{d.get('sequences')} sequences in all, {d.get('failed')} failed (commit {d.get('commit')}).\n")
    return lines


def vmap_section(d: dict[str, Any], name: str) -> list[str]:
    lines = _section_head("Several clients at once with torch.func.vmap", d, name, workload=False)
    rows = [[str(r.get("model")), str(r.get("k")), _num(r.get("sequential_median_s")), _num(r.get("vmap_median_s")),
             _num(r.get("paired_speedup_median"), ".2f"), _num(r.get("max_abs_diff"), ".1e")]
            for r in d.get("results") or []]
    lines.append(markdown((["model", "clients K", "one after the other (s)", "vmapped (s)",
                            "speed-up (paired median)", "max abs diff"], rows)))
    return lines


def _pct(x: Any, signed: bool = False) -> str:
    if not isinstance(x, (int, float)) or isinstance(x, bool):
        return "-"
    return f"{x:+.1%}" if signed else f"{x:.1%}"


def real_links_section(d: dict[str, Any], name: str) -> list[str]:
    lines = _section_head("The virtual clock against real links: a shaped Flower deployment", d, name)
    links = d.get("links") or {}
    kb = lambda v: "/".join(f"{x / 1000:g}" for x in v) if isinstance(v, list) else "-"  # noqa: E731
    lines.append(
        f"Links (kB/s): node downloads {kb(links.get('down_bps'))}, uploads {kb(links.get('up_bps'))}; the server "
        f"sends {kb([links.get('server_up_bps', 0)])} (shared by downloads) and receives "
        f"{kb([links.get('server_down_bps', 0)])} (shared by uploads); {links.get('shaping', '')}. Compute: "
        f"{d.get('compute', '-')}. Errors are simulated / real - 1, tasks paired by client and their number on it."
        + (f" Deployments: {d['deployments']}." if d.get("deployments") else "") + "\n")
    goals = d.get("goals") or {}
    rows = []
    for policy, r in (d.get("policies") or {}).items():
        mare = r.get("median_abs_rel_error") or {}
        t = r.get("time_to_updates") or {}
        rows.append([policy, f"{r.get('pairs', '-')}/{r.get('tasks_real', '-')}", _pct(mare.get("download")),
                     _pct(mare.get("upload")), _pct(mare.get("duration")),
                     f"{_num(t.get('real'), '.0f')} / {_num(t.get('simulated'), '.0f')}",
                     _pct(t.get("rel_error"), signed=True)])
    lines.append(markdown((["policy", "tasks paired", "download, median abs error", "upload, median abs error",
                            f"task, median abs error (goal <= {_pct(goals.get('task_duration_median_abs_rel_error'))})",
                            f"time to {_get(d, 'workload', 'server_updates') or 'K'} updates, real / simulated (s)",
                            f"error (goal within {_pct(goals.get('time_to_updates_abs_rel_error'))})"], rows)))
    gap_rows = []
    for policy, r in (d.get("policies") or {}).items():
        g = r.get("median_gap_seconds") or {}
        m = r.get("median_real_seconds") or {}
        e = r.get("median_rel_error") or {}
        t = r.get("time_to_updates") or {}
        gap_rows.append([policy, _num(m.get("duration"), ".1f"), _num(m.get("download"), ".1f"), _num(m.get("upload"), ".1f"),
                         _num(m.get("compute"), ".1f"), _num(g.get("poll"), ".2f"), _num(g.get("reply"), ".2f"),
                         _pct(e.get("download"), signed=True), _pct(e.get("upload"), signed=True),
                         _pct(e.get("duration"), signed=True),
                         " / ".join(_num((r.get("median_excess_seconds") or {}).get(x), "+.2f") for x in ("download", "upload")),
                         _num(t.get("protocol_waits_in_chain"), ".1f"),
                         _pct(t.get("rel_error_without_protocol_waits"), signed=True)])
    lines.append("Where real time goes (medians over tasks, seconds) and the signed median errors: `poll` is the "
                 "wait for the SuperNode's next pull (Flower polls every 3 s when idle), `reply` the server's pull "
                 "interval; the simulator models neither. `excess` is the median of real - simulated seconds "
                 "per transfer: a fixed cost per transfer (the node's object pulls or pushes and their confirmation, "
                 "each a request round trip to the SuperLink) shows as a constant there. `waits behind K` sums them over the tasks behind the K-th "
                 "update (its client's tasks, one after the other); the last column is the time-to-K error with "
                 "them taken out of the real time: an explanation of the gap, not the figure. These costs are "
                 "fixed per task and per transfer, so they weigh more when tasks are short: one run is one sample "
                 "on a shared machine whose load sets the device times.\n")
    lines.append(markdown((["policy", "task", "download", "upload", "device (fed as compute)", "poll", "reply",
                            "download error", "upload error", "task error", "excess, download / upload (s)",
                            "waits behind K (s)",
                            "time-to-K error without them"], gap_rows)))
    png = Path(name).with_suffix(".png").as_posix()
    lines.append(f"Predicted against real per-task times, per client: `{png}`.\n")
    return lines


def checkpoint_size_section(d: dict[str, Any], name: str) -> list[str]:
    """demo_checkpoints.json: every checkpoint of the demo's policies, and the largest one in parts."""
    lines = _section_head("The demo's checkpoints, part by part", d, name)
    model = d.get("model_bytes")
    goal = d.get("goal_x_model")
    rows = []
    for r in d.get("runs") or []:
        big, last = r.get("largest") or {}, r.get("last") or {}
        cks = r.get("checkpoints") or []
        rows.append([str(r.get("policy")), str(len(cks)), f"{_num(big.get('x_model'), '.2f')}x "
                     f"({_num((big.get('bytes') or 0) / 1e6, '.0f')} MB, update {big.get('round', '-')})",
                     f"{_num(last.get('x_model'), '.2f')}x", _num(max((c.get('seconds') or 0) for c in cks) if cks else None,
                                                               '.1f')])
    lines.append(f"Model: {_num((model or 0) / 1e6, '.1f')} MB of float32 weights; goal: at most "
                 f"{_num(goal, '.0f')}x the model per checkpoint.\n")
    lines.append(markdown((["policy", "checkpoints", "largest (x model)", "last", "slowest write (s)"], rows)))
    for r in d.get("runs") or []:
        parts = r.get("largest_parts") or {}
        if not parts or not model:
            continue
        lines.append(f"Where the largest {r.get('policy')} checkpoint's bytes go:\n")
        prow = [[f"`{k}`", str(v.get("tensors")), _num(v.get("bytes", 0) / model, ".2f"), ", ".join(v.get("stored_as") or [])]
                for k, v in parts.items() if v.get("bytes", 0) >= 0.005 * model]
        lines.append(markdown((["part of the state", "tensors", "x model", "stored as"], prow)))
    return lines


def generic_section(d: Any, name: str) -> list[str]:
    title = (d.get("benchmark") if isinstance(d, dict) else None) or Path(name).stem
    lines = [f"## {title}\n", f"From `{name}`.\n"]
    if isinstance(d, dict):
        rows = [[str(k), str(v)] for k, v in d.items() if isinstance(v, (str, int, float, bool)) or v is None]
        if rows:
            lines.append(markdown((["field", "value"], rows)))
    return lines


# ---------------------------------------------------------------------------- headline
FigureJob = tuple[Path, Any]  # (path of a figure, a callable that writes it there)
# the row order when the plan does not give its methods
HEADLINE_ORDER = ("prfl", "heterofl-mask", "heterofl-width", "fedbuff-k5", "fedbuff-k10", "fedfix", "fedavg",
                  "prfl-oldimportance", "prfl-serversteps", "prfl-norecovery", "prfl-noresidual", "prfl-reaged")


def _stand_in(methods: dict[str, list[sweep.Run]], fam: str, targets: Sequence[float], seeds: Sequence[int],
              consecutive: int = 1) -> str | None:
    """The member of ``fam`` that stands for it in a figure: the best-tuned at the middle target,
    else at the other targets in order, else the one with the highest mean best accuracy."""
    middle = targets[len(targets) // 2] if targets else None
    for t in ([middle] if middle is not None else []) + list(targets):
        best = sweep.best_tuned(methods, fam, t, seeds, consecutive).method
        if best is not None:
            return best
    members = [m for m in methods if sweep.family(m) == fam]
    return max(members, key=lambda m: (describe(r.summary.get("best_accuracy") for r in methods[m]).mean or 0.0, m),
               default=None)


def _headline_plot_job(path: Path, methods: dict[str, list[sweep.Run]], title: str, targets: Sequence[float],
                       baseline: str, seeds: Sequence[int], consecutive: int = 1,
                       order: Sequence[str] = HEADLINE_ORDER, marks: Sequence[tuple[float, str]] = ()) -> FigureJob | None:
    """The accuracy-band figure of one group: every method, the baseline's grid stood for by one
    member; ``marks`` (time, label) drawn as vertical lines (the fleet's speed changes)."""
    from prfl.report.bands import plot_bands

    stand_in = _stand_in(methods, baseline, targets, seeds, consecutive)
    listed = [m for m in order if m in methods and sweep.family(m) != baseline] + sorted(
        m for m in methods if m not in order and sweep.family(m) != baseline)
    if stand_in is not None:
        listed.insert(1 if listed[:1] == ["prfl"] else 0, stand_in)
    curves = {(f"{m} (best {baseline})" if m == stand_in else m): [(r.times, r.accs) for r in methods[m]] for m in listed}
    if not curves:
        return None
    top = max((a for rs in methods.values() for r in rs for a in r.accs), default=1.0)
    zoom = (round(min(targets) - 0.05, 2), round(min(1.0, top + 0.01), 2)) if targets and top > min(targets) - 0.05 else None
    return path, lambda: plot_bands(curves, path, title=f"{title} (mean ± sd over seeds)", targets=targets, zoom=zoom,
                                    marks=marks)


def _change_marks(settings: dict[str, Any], fleet: str) -> list[tuple[float, str]]:
    """When a headline fleet's speeds change (one mark per time), from its `fleet.changes=` override
    in the manifest's settings."""
    import yaml

    from prfl.report.plots import speed_change_marks

    for override in (settings.get("fleets") or {}).get(fleet) or []:
        key, _, value = str(override).partition("=")
        if key == "fleet.changes":
            return speed_change_marks(yaml.safe_load(value))
    return []


def _reversal_words(settings: dict[str, Any]) -> str:
    """What the headline's `reversed` fleet is, with the time its device order reverses read from the
    manifest's settings ("" when the plan has no such fleet)."""
    marks = _change_marks(settings, "reversed")
    if not marks:
        return ""
    return (f"; `reversed`: the paper10 devices until {marks[0][0]:,.0f} virtual s, then client i on client 9-i's "
            "starting device, so the slow clients below are the fast ones after the change")


def _scenario_words(settings: dict[str, Any]) -> str:
    """``data set, model, N clients`` from the plan's base overrides."""
    base = dict(str(o).split("=", 1) for o in settings.get("base_overrides") or [] if "=" in str(o))
    names = {"fashion-mnist": "Fashion-MNIST", "digits": "scikit-learn digits"}
    return (f"{names.get(base.get('data.dataset', ''), base.get('data.dataset', '?'))}, {base.get('model.name', '?')}, "
            f"{base.get('data.num_clients', '?')} clients")


def _estimate_lines(path: Path, rel_root: str) -> list[str]:
    """The projected cost of the sweep from ``headline/estimate.json`` (``headline.py estimate``)."""
    if not path.is_file():
        return []
    e = json.loads(path.read_text(encoding="utf-8"))
    ev = e.get("evaluation") or {}
    two = e.get("wall_hours_two_free_cores") or ["?", "?"]
    lines = [
        "### What the sweep costs\n",
        (f"From `{rel_root}/headline/estimate.json`; {_provenance(e)}"
         f"Each probe ran {_g(e.get('probe_virtual_seconds'))} virtual s (seed 0, Dirichlet); one evaluation of "
         f"the test set took {_num(ev.get('wall_seconds'), '.2f')} s wall, {_num(ev.get('cpu_seconds'), '.2f')} s "
         f"CPU, {_g(ev.get('per_run'))} per run. Projected for the {e.get('cells_projected', '?')} cells this build "
         f"can run at {_g(e.get('horizon_virtual_seconds'))} virtual s: {_num(e.get('cpu_hours_total'), '.1f')} CPU "
         f"hours, i.e. {_num(two[0], '.1f')}-{_num(two[1], '.1f')} wall hours on two free cores (wall times "
         "measured on a loaded machine say little; CPU seconds do not grow with the load); "
         f"{len(e.get('cells_unavailable') or [])} cells were unavailable to it."
         + ("" if e.get("complete", True) else
            f" The estimate was cut short: {e.get('cells_not_measured', '?')} more cells have no probe yet.")
         + "\n"),
    ]
    rows = [[str(m.get("group")), str(m.get("method")), str(m.get("server_rounds")), _num(m.get("wall_seconds"), ".0f"),
             _num(m.get("cpu_seconds"), ".0f"), _num(m.get("cpu_per_virtual_second"), ".3f"), _num(m.get("load_average"), ".1f")]
            for m in e.get("measured") or []]
    lines.append(markdown((["group", "method", "server updates", "wall (s)", "CPU (s)",
                            "CPU s per virtual s (outside evaluation)", "load average"], rows)))
    by_tier = e.get("cpu_hours_by_tier") or {}
    if by_tier:
        lines.append("CPU hours by tier of the plan: " + ", ".join(f"{k}: {_num(v, '.1f')}" for k, v in by_tier.items())
                     + ".\n")
    return lines


def _machine_lines(runs: Sequence[sweep.Run]) -> list[str]:
    """Which machines the runs computed on (records name them since `prfl.runtime.machine`): a
    seed fixes a run's history on one kind of machine, so runs are comparable line for line only
    within one kind."""
    kinds: dict[str, list[str]] = {}
    unnamed = 0
    for r in runs:
        ms = r.record.get("machines") or []
        if not ms:
            unnamed += 1
            continue
        kinds.setdefault(" then ".join(describe_machine(m) for m in ms), []).append(f"{r.group} {r.method} seed {r.seed}")
    if not kinds:
        return []
    parts = [f"{k}: {', '.join(cells)}" for k, cells in kinds.items()]
    if unnamed:
        parts.append(f"{unnamed} runs made before the records named their machine")
    return ["Machines the runs computed on (processor, the kernel level PyTorch dispatches to, PyTorch and NumPy "
            "releases). A seed fixes a run's history on one kind of machine; on another the kernels round "
            "differently and the run follows another trajectory of the same quality (`prfl.runtime.machine`). "
            + "; ".join(parts) + ".\n"]


def _g(x: Any) -> str:
    return f"{x:g}" if isinstance(x, (int, float)) else "?"


def headline_section(results: Path, rel_root: str, figure_dir: Path | None, figure_link: str,
                     jobs: list[FigureJob] | None) -> list[str]:
    """The headline sweep's section: settings, per group its plot and tables, and the cells still
    missing. Figures are written by the caller (``jobs``), so ``--check`` compares text only."""
    root = results / "headline"
    manifest_path = root / "manifest.json"
    if not manifest_path.is_file():
        return []
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    settings = manifest.get("settings") or {}
    targets = [float(t) for t in settings.get("targets") or []]
    seeds = [int(s) for s in settings.get("seeds") or []]
    k = int(settings.get("consecutive") or 1)
    row_order = list(settings.get("methods") or HEADLINE_ORDER)  # the plan's order of methods
    runs = [sweep.Run.from_record(json.loads(p.read_text(encoding="utf-8")))
            for p in sorted((root / "records").glob("**/seed*.json"))]
    every = manifest.get("cells") or []
    planned = [c for c in every if c.get("status") != "skipped"]  # the cells the protocol runs
    left_out = len(every) - len(planned)
    missing = sweep.missing_cells(planned, runs)
    groups = sweep.by_group(runs)
    order = list(dict.fromkeys([str(c["group"]) for c in planned] + sorted(groups)))
    lines = [
        "## Headline: PR-FL against tuned baselines over a paper-length horizon\n",
        f"From `{rel_root}/headline/` (`benchmarks/headline.py`; plan of {manifest.get('updated', '?')}, "
        f"command `{manifest.get('command', '?')}`). {len(planned) - len(missing)} of {len(planned)} planned "
        f"cells are done"
        + (f"; {left_out} more cells of the full grid are left out by the protocol (below)" if left_out else "")
        + ".\n",
        (f"{_scenario_words(settings)}; {_g(settings.get('max_time'))} virtual s per run; accuracy on "
         f"{settings.get('evaluated_on', 'the test set')} every {_g(settings.get('eval_every_seconds'))} virtual s; seeds "
         f"{', '.join(map(str, seeds))}. Groups are accounting/fleet/split (`allfast`: every client on the "
         "fastest client's links" + _reversal_words(settings) + "). Time to a target: "
         f"{settings.get('time_to_target', 'the first evaluation at or above it')} (mean ± sd over "
         "seeds). FedAsync is run over a grid (alpha 0.1, 0.3, 0.6 x staleness poly, hinge); at each target "
         "its best configuration on the same seeds is the baseline of the speed-ups (chosen on the seeds it "
         "is compared on, which favours FedAsync), and a speed-up is given only when every seed of both "
         "reached the target. Levelled off: the last 20% of a run raised its best accuracy by at most 0.005 "
         "(seeds that held it / seeds). Slow clients: the 40% with the slowest links, compute breaking ties "
         "(clients 6-9 of both fleets); their local round in seconds is download + link wait + compute + upload (the task) + "
         "idle (waiting for the next dispatch). Honest accounting: every byte is charged, and what a model version "
         "publishes (PR-FL's residual pieces, any other policy's sub-model of one density and width) crosses the "
         "server's uplink once, later copies coming from a relay at the client's own speed (`sim.model_relay`). "
         "Definitions: `prfl.report.sweep`.\n"),
    ]
    splits = ["dirichlet"] + sorted({g.rsplit("/", 1)[-1] for g in groups} - {"dirichlet"})
    lines.append("### The goals, as they stand\n")
    lines.append("What the results are read against (`prfl.report.sweep.Goals`), each on the seeds every run it "
                 "needs has finished; `so far` while seeds are missing. Speed-ups are ratios of mean times over "
                 "those seeds, as in the tables below.\n")
    for split in splits:
        lines.append(markdown(sweep.goals_table(groups, targets, seeds, split=split, consecutive=k)))
    flags = [(r, r.levelled()) for r in runs]
    if runs:  # the horizon is long enough when every run has levelled off
        lines.append(f"Levelled off by the criterion above: {sum(1 for _, f in flags if f)} of {len(runs)} finished "
                     "runs. How far each method was from a plateau at its horizon: the late climb is its mean "
                     "accuracy over the last 20% of the run minus its mean over the 20% before, in accuracy points "
                     "per 1,000 virtual s (`prfl.report.sweep.late_climb`; a mean over a window averages out the "
                     "noise of single evaluations, which the best-accuracy criterion picks up).\n")
        lines.append(markdown(sweep.climb_table(groups, seeds)))
    unrelayed = [r for r in runs if r.group.startswith("honest/") and r.record.get("model_relay") is False
                 and not r.method.startswith("prfl")]
    if unrelayed:  # made before sim.model_relay: each copy of a baseline's model crossed the server's link
        lines.append("Runs made under the earlier relay rule (only PR-FL's pieces relayed, every copy of another "
                     "policy's model charged to the server's uplink): "
                     + ", ".join(f"{r.group} {r.method} seed {r.seed}" for r in unrelayed) + ".\n")
    horizon = settings.get("max_time")
    longer = [r for r in runs if isinstance(horizon, (int, float)) and r.end > horizon + 1e-9]
    if longer:  # runs `headline.py extend` took past the horizon because they had not levelled off
        lines.append(f"Runs taken past {_g(horizon)} virtual s because they had not levelled off there: "
                     + ", ".join(f"{r.group} {r.method} seed {r.seed} to {_g(r.end)} s" for r in longer) + ".\n")
    again = [r for r in runs if isinstance(r.record.get("rerun"), dict)]
    if again:  # `headline.py extend --rerun`: no checkpoint was kept, so they ran again from the start
        lines.append("Runs run again from the start to be taken further (they had kept no checkpoint), and whether "
                     "each new history repeats the earlier run's line for line up to its end: "
                     + ", ".join(f"{r.group} {r.method} seed {r.seed} (earlier run to "
                                 f"{_g(r.record['rerun'].get('earlier_end'))} s: "
                                 f"{'repeated' if r.record['rerun'].get('history_continues_earlier') else 'DIFFERENT'})"
                                 for r in again) + ".\n")
    lines += _machine_lines(runs)
    for g in order:
        methods = groups.get(g, {})
        n_planned = sum(1 for c in planned if c["group"] == g)
        lines.append(f"### {g}\n")
        if not methods:
            lines.append(f"No finished runs yet ({n_planned} cells planned).\n")
            continue
        n_runs = sum(len(rs) for rs in methods.values())
        # the seeds the group's tables average over: those PR-FL has finished (else any run has),
        # so a sweep part-way through its seeds reports the seeds it has rather than nothing
        done = {r.seed for rs in methods.values() for r in rs}
        prfl_done = {r.seed for r in methods.get("prfl", [])}
        gseeds = [s for s in seeds if s in (prfl_done or done)] or sorted(prfl_done or done)
        pending = [s for s in seeds if s not in gseeds]
        lines.append(f"{n_runs} runs of {n_planned} planned. Tables over seeds {', '.join(map(str, gseeds))}"
                     + (f" (seeds {', '.join(map(str, pending))} not finished yet)" if pending else "") + ".\n")
        if figure_dir is not None and targets:
            slug = g.replace("/", "-")
            fleet = (g.split("/") + ["", ""])[1]
            marks = _change_marks(settings, fleet)
            job = _headline_plot_job(figure_dir / f"headline-{slug}.png", methods, g, targets, "fedasync", gseeds, k,
                                     row_order, marks)
            if job is not None:
                if jobs is not None:
                    jobs.append(job)
                lines.append(f"![accuracy against virtual time, {g}]({figure_link}/headline-{slug}.png)\n")
        lines.append(markdown(sweep.time_table(methods, row_order, targets, gseeds, consecutive=k)))
        if any(sweep.family(m) == "fedasync" for m in methods):
            lines.append("The FedAsync grid (`*`: best at that target):\n")
            lines.append(markdown(sweep.grid_table(methods, "fedasync", targets, gseeds, consecutive=k)))
        lines.append("Costs and where the slow clients' round time goes:\n")
        lines.append(markdown(sweep.cost_table(methods, row_order, gseeds)))
    for g in order:  # each group with an all-fast twin: how far the fleet is from its all-fast limit
        acc, fleet, part = (g.split("/") + ["", "", ""])[:3]
        twin = f"{acc}/allfast/{part}"
        if fleet == "paper10" and twin in groups and g in groups:
            lines.append(f"### {g} against its all-fast limit ({twin})\n")
            lines.append("Time to each target on the real fleet, with every client on the fastest client's links, "
                         "and their ratio (real / all-fast; given when every seed of both reached the target).\n")
            both = [s for s in seeds if all(any(r.seed == s for rs in groups[x].values() for r in rs) for x in (g, twin))]
            lines.append(markdown(sweep.limit_table(groups[g], groups[twin], targets, both or seeds, consecutive=k)))
    note = root / "NOTE.md"
    if note.is_file():  # how the sweep is being run, and what it has met on the way
        lines.append("### Notes on the sweep\n")
        lines.append(f"From `{rel_root}/headline/NOTE.md`.\n")
        lines.append(note.read_text(encoding="utf-8").strip() + "\n")
    lines += _estimate_lines(root / "estimate.json", rel_root)
    if isinstance(horizon, (int, float)) and runs:
        pace_table, proj = sweep.cost_projection(runs, missing, float(horizon))
        lines.append("### What the finished runs took\n")
        lines.append("Wall time of the finished runs over all their pieces, scaled to the horizon (one core each, "
                     "usually beside another run on the second core)"
                     + (". Left out, because their records' wall time is below their training time (a piece that "
                        "ended before pieces left their own record is missing from it): " + ", ".join(proj.short)
                        if proj.short else "") + ".\n")
        lines.append(markdown(pace_table))
        if missing:
            lines.append(f"At these paces the {proj.cells} missing cells with a finished run to go by (of their method "
                         "under the same accounting and fleet, else the same accounting, else any; failing those, of "
                         "their method's family the same way) need about "
                         f"{proj.hours:.0f} wall hours of one core, i.e. about {proj.hours / 2:.0f} hours on two cores"
                         + (f"; {len(proj.no_basis)} more have none"
                            if proj.no_basis else "") + "."
                         + (f" Of those, {proj.waiting_cells} cells ({proj.waiting_hours:.0f} h) wait for a tuning grid; "
                            f"if each grid keeps one configuration per group and seed, as the honest Dirichlet grid "
                            f"did, {proj.kept_cells} of them run ({proj.kept_hours:.0f} h), and the missing cells "
                            f"need about {proj.hours - proj.waiting_hours + proj.kept_hours:.0f} wall hours of one "
                            f"core ({(proj.hours - proj.waiting_hours + proj.kept_hours) / 2:.0f} on two)."
                            if proj.waiting_cells else "") + "\n")
    if missing:
        states = {(str(c["group"]), str(c["method"]), int(c["seed"])): c for c in planned}
        lines.append("### Cells still missing\n")
        lines.append(f"{len(missing)} cells, with their state when the plan was written "
                     "(`unavailable`: the build that wrote it lacks an option or setting the cell needs).\n")
        lines.append(markdown(sweep.missing_table(
            [states[(str(c["group"]), str(c["method"]), int(c["seed"]))] for c in missing])))
    if left_out:
        lines.append("### Cells the protocol leaves out\n")
        lines.append(f"{left_out} cells of the full grid, and why (`benchmarks/headline.py`, `Sweep.protocol`).\n")
        lines.append(markdown(sweep.missing_table([c for c in every if c.get("status") == "skipped"])))
    return lines


def run_files(results: Path) -> list[Path]:
    """``paper_fmnist/results.csv`` first, then other run tables, without duplicates."""
    found = [results / "paper_fmnist" / "results.csv"]
    found += (sorted(results.glob("*/results.csv")) + sorted(results.glob("*/*/results.csv"))
              + sorted(results.glob("**/tables/runs.csv")))
    out: list[Path] = []
    for p in found:
        if p.is_file() and p not in out and "tmp" not in p.relative_to(results).parts:
            out.append(p)
    return out


def render(results: Path, baseline: str = "fedasync", figure_dir: Path | None = None, figure_link: str = "figures",
           jobs: list[FigureJob] | None = None) -> str:
    """The text of RESULTS.md for the result files under ``results``. Figures go to ``figure_dir``
    (linked as ``figure_link/<name>``): the jobs that write them are appended to ``jobs``."""
    rel_root = results.relative_to(ROOT).as_posix() if results.is_relative_to(ROOT) else results.as_posix()
    lines = [
        "# Results\n",
        f"<!-- Generated by `{COMMAND}` from the files in {rel_root}/; do not edit by hand. -->\n",
        (f"Generated from the committed result files in `{rel_root}/`; regenerate with `{COMMAND}` "
         "(`--check` tells whether this file is stale).\n"),
    ]
    lines += headline_section(results, rel_root, figure_dir, figure_link, jobs)
    lines.append("## Time to accuracy\n")
    csvs = run_files(results)
    if csvs:
        lines.append(f"Speed-ups are against {baseline}; a speed-up is given when every seed of both methods "
                     "reached the target.\n")
        main = results / "paper_fmnist" / "results.csv"
        reference = None
        if main.is_file():
            rel_main = main.relative_to(ROOT) if main.is_relative_to(ROOT) else main.relative_to(results.parent)
            reference = (rel_main.as_posix(), read_runs(main))
        for p in csvs:
            lines += runs_section(p, results, baseline, reference if p != main else None)
    else:
        lines.append(f"No run results yet: run `benchmarks/paper_fmnist.py`, which writes "
                     f"`{rel_root}/paper_fmnist/results.csv`.\n")
    for p in sorted(results.glob("*.json")):
        try:
            d = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            lines.append(f"## {p.stem}\n\n`{p.name}` is not valid JSON; skipped.\n")
            continue
        name = f"{rel_root}/{p.name}"
        if p.name == "masked_training.json":
            lines += masked_training_section(d, name)
        elif p.name.startswith("simulator"):  # simulator.json (FedAsync), simulator_<policy>.json
            lines += simulator_section(d, name)
        elif p.name.startswith("flower_sim"):  # flower_sim.json, flower_sim_<variant>.json
            lines += flower_section(d, name)
        elif p.name.startswith("scale-kill"):  # scale-kill-<clients>.json
            lines += scale_kill_section(d, name)
        elif p.name.startswith("scale"):  # scale-<clients>.json
            lines += scale_section(d, name)
        elif p.name == "vmap.json":
            lines += vmap_section(d, name)
        elif p.name == "train_step.json":
            lines += train_step_section(d, name)
        elif p.name == "buffer.json":
            lines += buffer_section(d, name)
        elif p.name == "demo_checkpoints.json":
            lines += checkpoint_size_section(d, name)
        elif p.name == "real_links.json":
            lines += real_links_section(d, name)
        elif p.name == "fuzz.json" or (p.name.startswith("fuzz_") and p.suffix == ".json"):
            lines += fuzz_section(d, name)
        else:
            lines += generic_section(d, name)
    return "\n".join(lines).rstrip() + "\n"


def main(argv: Iterable[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="generate docs/RESULTS.md from benchmark result files")
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "RESULTS.md")
    ap.add_argument("--baseline", default="fedasync", help="method the speed-ups are measured against")
    ap.add_argument("--check", action="store_true", help="only check that --out is up to date (exit 1 if not)")
    args = ap.parse_args(list(argv) if argv is not None else None)
    jobs: list[FigureJob] = []
    text = render(args.results.resolve(), args.baseline, args.out.parent / "figures", "figures", jobs)
    if args.check:
        current = args.out.read_text(encoding="utf-8") if args.out.is_file() else None
        absent = [p for p, _ in jobs if not p.is_file()]
        if current != text or absent:
            what = f" (figures missing: {', '.join(p.name for p in absent)})" if absent else ""
            sys.stderr.write(f"{args.out} is stale{what}; run `{COMMAND}`\n")
            return 1
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    for _, write in jobs:
        write()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
