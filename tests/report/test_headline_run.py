"""benchmarks/headline.py end to end on a seconds-long stand-in (digits / mlp): a run paused by the
wall budget right after a checkpoint and resumed by the next invocation gives the history of an
uninterrupted run; finished cells are skipped; the manifest and RESULTS.md say what is missing."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def headline():
    return load("headline_bench", ROOT / "benchmarks" / "headline.py")


class Clock:
    """A wall clock that moves one second per reading."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        self.t += 1.0
        return self.t


def args(out: Path, runs: Path, *extra: str) -> list[str]:
    return ["run", "--base", "digits", "--out", str(out), "--runs", str(runs), "--tiers", "1", "--seeds", "0",
            "--methods", "fedasync-a0.6-poly", "--max-time", "2", "--eval-every", "0.25", "--checkpoint-every", "5",
            "--grace-minutes", "10", *extra]


def test_pause_resume_skip_and_report(headline, tmp_path: Path) -> None:
    out, runs = tmp_path / "results" / "headline", tmp_path / "runs"
    cell = "honest/paper10/dirichlet/fedasync-a0.6-poly"
    record = out / "records" / cell / "seed0.json"
    run_dir = runs / cell / "seed0"

    # a budget of 3 clock readings: the run passes the deadline and stops after its next checkpoint
    assert headline.main(args(out, runs, "--budget-minutes", "0.05"), clock=Clock()) == 0
    assert not record.exists() and (run_dir / "checkpoint.pt").is_file()
    pieces = [json.loads(x) for x in (run_dir / "pieces.jsonl").read_text().splitlines()]
    assert len(pieces) == 1 and pieces[0]["ended"].startswith("paused: paused after the checkpoint")
    assert 0 < pieces[0]["virtual_to"] < 2
    manifest = json.loads((out / "manifest.json").read_text())
    state = next(c for c in manifest["cells"] if c["method"] == "fedasync-a0.6-poly")
    assert state["status"] == "partial"

    # the next invocation resumes it to the end; a finished run keeps its last checkpoint only
    # while it has not levelled off (this one has not: 2 virtual s), so it can be taken further
    assert headline.main(args(out, runs), clock=Clock()) == 0
    rec = json.loads(record.read_text())
    assert rec["pieces"] == 2 and rec["summary"]["virtual_seconds"] == 2.0
    from prfl.report.sweep import Run

    assert Run.from_record(rec).levelled() is False
    assert (run_dir / "checkpoint.pt").is_file() and not (run_dir / "checkpoint.prev.pt").exists()
    assert rec["run_dir"] is None  # outside the repository: no machine path in the record
    assert rec["model_relay"] is True  # the run's rule for relaying published models (the default)
    # both pieces ran here: the record names this machine once (a seed fixes a history per machine)
    from prfl.runtime.machine import fingerprint

    assert [p["machine"] for p in map(json.loads, (run_dir / "pieces.jsonl").read_text().splitlines())] == [
        fingerprint()] * 2
    assert rec["machines"] == [fingerprint()]

    # the same cell run in one piece gives the same evaluations and totals
    out2, runs2 = tmp_path / "one" / "headline", tmp_path / "runs-one"
    assert headline.main(args(out2, runs2), clock=Clock()) == 0
    one = json.loads((out2 / "records" / cell / "seed0.json").read_text())
    assert one["pieces"] == 1
    assert one["evals"] == rec["evals"] and one["arrivals"] == rec["arrivals"]
    assert one["history"]["sha256"] == rec["history"]["sha256"]

    # a finished cell is skipped
    before = record.read_bytes()
    assert headline.main(args(out, runs), clock=Clock()) == 0
    assert record.read_bytes() == before

    # `extend` takes the unlevelled cell on from that checkpoint: the record of a run to 3 s
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    assert headline.main(["extend", *args(out, runs)[1:], "--extend-to", "3"], clock=Clock()) == 0
    ext = json.loads(record.read_text())
    assert ext["summary"]["virtual_seconds"] == 3.0 and ext["extended_to"] == 3.0 and ext["pieces"] == 3
    assert "sim.max_time=3" in ext["overrides"]
    three = args(out3 := tmp_path / "three" / "headline", tmp_path / "runs-three")
    three[three.index("--max-time") + 1] = "3"
    assert headline.main(three, clock=Clock()) == 0
    direct = json.loads((out3 / "records" / cell / "seed0.json").read_text())
    assert ext["history"]["sha256"] == direct["history"]["sha256"] and ext["evals"] == direct["evals"]
    md = load("make_results_md_x", ROOT / "scripts" / "make_results_md.py")
    assert md.main(["--results", str(out.parent), "--out", str(tmp_path / "x" / "RESULTS.md")]) == 0
    text = (tmp_path / "x" / "RESULTS.md").read_text()
    assert ("Runs taken past 2 virtual s because they had not levelled off there: honest/paper10/dirichlet "
            "fedasync-a0.6-poly seed 0 to 3 s.") in text
    from prfl.runtime.machine import describe

    assert f"{describe(fingerprint())}: honest/paper10/dirichlet fedasync-a0.6-poly seed 0." in text
    shutil.rmtree(run_dir)
    shutil.copytree(copy, run_dir)
    record.write_bytes(before)

    # a copy of the run taken on from that checkpoint to a longer horizon is the longer run
    from prfl.run import resume_run

    longer = tmp_path / "longer"
    shutil.copytree(run_dir, longer)
    assert resume_run(longer, max_time=3.0)["virtual_seconds"] == 3.0
    lines = (longer / "history.jsonl").read_text().splitlines()
    kept = (run_dir / "history.jsonl").read_text().splitlines()
    assert len(lines) > len(kept) and lines[:10] == kept[:10]

    # RESULTS.md: the group's tables, a figure, the missing cells; --check sees it fresh
    md = load("make_results_md_h", ROOT / "scripts" / "make_results_md.py")
    doc = tmp_path / "docs" / "RESULTS.md"
    assert md.main(["--results", str(out.parent), "--out", str(doc)]) == 0
    text = doc.read_text()
    assert "### honest/paper10/dirichlet" in text and "| fedasync (best per target) | 1 |" in text
    assert "Tables over seeds 0 (seeds 1, 2 not finished yet)." in text  # the seeds it has, not nothing
    assert "(figures/headline-honest-paper10-dirichlet.png)" in text
    assert (doc.parent / "figures" / "headline-honest-paper10-dirichlet.png").is_file()
    assert "| honest/paper10/dirichlet | prfl | 0, 1, 2 | pending |" in text  # the whole plan, every seed
    assert md.main(["--results", str(out.parent), "--out", str(doc), "--check"]) == 0
    (doc.parent / "figures" / "headline-honest-paper10-dirichlet.png").unlink()
    assert md.main(["--results", str(out.parent), "--out", str(doc), "--check"]) == 1

    # a baseline record made before the model relay is named as such
    assert "earlier relay rule" not in text
    old_rule = tmp_path / "old-rule" / "headline"
    shutil.copytree(out, old_rule)
    stale = old_rule / "records" / cell / "seed0.json"
    stale.write_text(json.dumps({**json.loads(stale.read_text()), "model_relay": False}))
    assert md.main(["--results", str(old_rule.parent), "--out", str(tmp_path / "old-doc" / "RESULTS.md")]) == 0
    assert ("Runs made under the earlier relay rule (only PR-FL's pieces relayed, every copy of another policy's "
            "model charged to the server's uplink): honest/paper10/dirichlet fedasync-a0.6-poly seed 0.") in (
        tmp_path / "old-doc" / "RESULTS.md").read_text()


def test_plan_order_and_availability(headline) -> None:
    cells = headline.plan_cells((0, 1, 2))
    first = [(c.group.name, c.method, c.seed) for c in cells[:7]]
    assert first[0] == ("honest/paper10/dirichlet", "prfl", 0)
    assert {m for _, m, _ in first} == {"prfl", *headline.FEDASYNC_GRID}
    assert len(headline.FEDASYNC_GRID) == 6
    assert [c.tier for c in cells] == sorted(c.tier for c in cells)
    keys = [c.key for c in cells]
    assert len(keys) == len(set(keys))
    # a method whose options this build lacks is unavailable, with the option named
    fake = headline.Cell(5, headline.Group.parse("honest/paper10/dirichlet"), "prfl-reaged", 0)
    from prfl.policies import PRFLConfig

    if "staleness_mode" not in PRFLConfig.__dataclass_fields__:
        assert "staleness_mode" in headline.unavailable(fake)
    ref = headline.Cell(3, headline.Group.parse("reference/paper10/dirichlet"), "prfl", 0)
    assert (headline.unavailable(ref) is None) == headline.accounting_known()
    with pytest.raises(Exception, match="group 'honest/paper10' must be"):
        headline.Group.parse("honest/paper10")


def test_config_differences_ignore_executor_fields(headline) -> None:
    a = {"seed": 0, "sim": {"executor": "process", "workers": 2, "max_time": 12000}, "policy": {"name": "prfl"}}
    b = {"seed": 0, "sim": {"executor": "inline", "workers": 1, "max_time": 15000}, "policy": {"name": "prfl"}}
    assert headline.config_differences(a, b) == ["sim.max_time"]


def test_recorded_commands_name_no_path_outside_the_repository(headline, tmp_path) -> None:
    """Result files keep commands relative to the repository; a scratch folder elsewhere is named
    by its last part only."""
    root = headline.ROOT
    assert headline._shown_path("--runs") == "--runs"
    assert headline._shown_path(str(root / "benchmarks" / "results" / "x")) == "benchmarks/results/x"
    assert headline._shown_path(str(tmp_path / "runs")) == "<scratch>/runs"
    assert str(tmp_path) not in headline._shown_path(str(tmp_path / "a" / "runs"))


def test_side_by_side_invocations_claim_cells(headline, tmp_path) -> None:
    """A cell claimed by a live process is left to it; a claim whose process has ended is taken
    over; a finished cell's claim is released."""
    import os
    import subprocess

    out, runs = tmp_path / "results" / "headline", tmp_path / "runs"
    cell = "honest/paper10/dirichlet/fedasync-a0.6-poly"
    claim = runs / cell / "seed0" / "claim"
    claim.parent.mkdir(parents=True)
    claim.write_text(f"{os.getppid()}\n")  # pytest's parent: alive for the whole test
    assert headline.main(args(out, runs), clock=Clock()) == 0
    assert not (out / "records" / cell / "seed0.json").exists()
    assert not (runs / cell / "seed0" / "config.yaml").exists()  # not started
    assert claim.read_text() == f"{os.getppid()}\n"

    ended = subprocess.Popen(["true"])
    ended.wait()  # reaped: no process has its pid now
    claim.write_text(f"{ended.pid}\n")
    assert headline.main(args(out, runs), clock=Clock()) == 0
    assert (out / "records" / cell / "seed0.json").is_file()
    assert not claim.exists()


def _record(method: str, group: str, seed: int, accuracy: list[float]) -> dict:
    """A compact record with just what the tuning reads: evaluations every 60 s, the summary."""
    times = [60.0 * i for i in range(len(accuracy))]
    return {"format": 1, "cell": {"tier": 1, "group": group, "method": method, "seed": seed}, "policy": "fedasync",
            "seed": seed, "summary": {"final_accuracy": accuracy[-1], "best_accuracy": max(accuracy),
                                      "virtual_seconds": times[-1]},
            "evals": {"time": times, "round": list(range(len(accuracy))), "accuracy": accuracy,
                      "loss": [1.0] * len(accuracy), "server_egress": [0] * len(accuracy),
                      "server_ingress": [0] * len(accuracy)}}


def test_fit_starts_only_the_cells_expected_to_finish_within_the_budget(headline, tmp_path, capsys) -> None:
    """``--fit`` passes over a cell no finished run can price, and one whose expected wall time
    (the pace of finished runs of its method under the same accounting and fleet, times the
    margin) exceeds what is left of the budget; a cell that fits runs to its end."""
    out, runs = tmp_path / "results" / "headline", tmp_path / "runs"
    cell = "honest/paper10/dirichlet/fedasync-a0.6-poly"
    run_dir = runs / cell / "seed0"

    def counts() -> dict:
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])["this invocation"]

    assert headline.main(args(out, runs, "--fit"), clock=Clock()) == 0
    assert counts()["does not fit"] == 1 and not (run_dir / "config.yaml").exists()  # nothing to go by
    with pytest.raises(SystemExit, match="--fit-margin must be a positive factor"):
        headline.main(args(out, runs, "--fit", "--fit-margin", "0"), clock=Clock())

    # a finished run of the method on the other split: 10 wall s per virtual s, so 2 virtual s
    # are expected to take 20 s, 23 s with the default margin of 1.15
    other = out / "records" / "honest/paper10/iid/fedasync-a0.6-poly" / "seed0.json"
    other.parent.mkdir(parents=True)
    other.write_text(json.dumps({**_record("fedasync-a0.6-poly", "honest/paper10/iid", 0, [0.1] * 17),
                                 "wall_seconds_total": 9600.0}))  # 960 virtual s
    sw = headline.Sweep(out, runs, headline.Settings(base="digits", max_time=2.0))
    target = headline.Cell(1, headline.Group.parse("honest/paper10/dirichlet"), "fedasync-a0.6-poly", 0)
    assert headline.expected_wall(sw, target) == pytest.approx(20.0)
    # a paused cell is charged the rest of the horizon
    assert headline.expected_wall(sw, target, {"status": "partial", "virtual_seconds": 1.5}) == pytest.approx(5.0)
    # 0.3 wall minutes (18 clock readings) are too few
    assert headline.main(args(out, runs, "--fit", "--budget-minutes", "0.3"), clock=Clock()) == 0
    assert counts()["does not fit"] == 1 and not (run_dir / "config.yaml").exists()
    # with a margin of 0.5 the same budget is enough, and the run finishes within it
    assert headline.main(args(out, runs, "--fit", "--fit-margin", "0.5", "--budget-minutes", "0.3"), clock=Clock()) == 0
    assert counts() == {"complete": 1, "paused": 0, "failed": 0, "skipped": 0, "claimed elsewhere": 0, "does not fit": 0}
    assert (out / "records" / cell / "seed0.json").is_file()


def test_the_protocol_runs_the_tuned_fedasync_configurations_beyond_seed_0(headline, tmp_path) -> None:
    """Until seed 0's grid is complete, FedAsync cells that depend on it wait; then seeds 1 and 2,
    the reference accounting and the all-fast fleet run the configurations best at some target
    (here alpha 0.6 poly at 0.80, alpha 0.3 hinge at 0.85); ablations run on seed 0 only."""
    import json

    settings = headline.Settings(targets=(0.80, 0.85), consecutive=1)
    sw = headline.Sweep(tmp_path / "out", tmp_path / "runs", settings)
    group = headline.Group.parse("honest/paper10/dirichlet")
    cell = lambda g, m, s: headline.Cell(1, headline.Group.parse(g), m, s)  # noqa: E731
    assert sw.status(cell("honest/paper10/dirichlet", "fedasync-a0.1-poly", 0))["status"] == "pending"
    assert sw.status(cell("honest/paper10/dirichlet", "fedasync-a0.1-poly", 1))["status"] == "waiting"
    assert sw.status(cell("honest/paper10/dirichlet", "prfl", 1))["status"] == "pending"
    assert sw.status(cell("honest/paper10/dirichlet", "prfl-norecovery", 1))["status"] == "skipped"
    assert sw.status(cell("honest/paper10/dirichlet", "prfl-norecovery", 0))["status"] == "pending"
    curves = {m: [0.1, 0.5, 0.7, 0.75, 0.79] for m in headline.FEDASYNC_GRID}
    curves["fedasync-a0.6-poly"] = [0.1, 0.81, 0.82, 0.83, 0.84]  # first to 0.80, never 0.85
    curves["fedasync-a0.3-hinge"] = [0.1, 0.5, 0.6, 0.86, 0.87]  # the only one to 0.85
    for m, acc in curves.items():
        path = sw.record_path(headline.Cell(1, group, m, 0))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(_record(m, group.name, 0, acc)))
    assert sw.tuned(group) == {"fedasync-a0.6-poly", "fedasync-a0.3-hinge"}
    for g in ("honest/paper10/dirichlet", "reference/paper10/dirichlet", "honest/allfast/dirichlet"):
        for s in (1, 2):
            assert sw.status(cell(g, "fedasync-a0.6-poly", s))["status"] == "pending"
            st = sw.status(cell(g, "fedasync-a0.1-poly", s))
            assert st["status"] == "skipped" and "best: fedasync-a0.3-hinge, fedasync-a0.6-poly" in st["reason"]
    # the other split tunes on its own seed 0
    assert sw.status(cell("reference/paper10/iid", "fedasync-a0.6-poly", 0))["status"] == "waiting"
    assert sw.status(cell("honest/paper10/iid", "fedasync-a0.1-poly", 0))["status"] == "pending"


def test_extend_reruns_a_cell_that_kept_no_checkpoint(headline, tmp_path: Path) -> None:
    """`extend --rerun`: a finished, unlevelled cell without a checkpoint runs again from the start
    to the new horizon (paused and resumed on the way), keeps the earlier run beside the new one,
    and its record says the new history repeats the earlier one."""
    out, runs = tmp_path / "results" / "headline", tmp_path / "runs"
    cell = "honest/paper10/dirichlet/fedasync-a0.6-poly"
    record, run_dir = out / "records" / cell / "seed0.json", runs / cell / "seed0"
    assert headline.main(args(out, runs), clock=Clock()) == 0
    (run_dir / "checkpoint.pt").unlink()  # as the cells finished before unlevelled runs kept one
    before = record.read_bytes()
    extend = ["extend", *args(out, runs)[1:], "--extend-to", "3"]

    assert headline.main(extend, clock=Clock()) == 0  # without --rerun: left as it is
    assert record.read_bytes() == before and not run_dir.with_name("seed0.before-rerun").exists()

    # a budget of 3 clock readings pauses the rerun after its first checkpoint; the record stays
    assert headline.main([*extend, "--rerun", "--budget-minutes", "0.05"], clock=Clock()) == 0
    aside = run_dir.with_name("seed0.before-rerun")
    assert (aside / "summary.json").is_file() and not (aside / "claim").exists()
    assert (run_dir / "checkpoint.pt").is_file() and not (run_dir / "summary.json").exists()
    assert record.read_bytes() == before
    assert headline.main([*extend, "--rerun"], clock=Clock()) == 0  # goes on from that checkpoint
    rec = json.loads(record.read_text())
    assert rec["summary"]["virtual_seconds"] == 3.0 and rec["extended_to"] == 3.0
    assert rec["rerun"] == {"earlier_run_dir": "seed0.before-rerun", "earlier_end": 2.0,
                            "history_continues_earlier": True}
    assert not (run_dir / "claim").exists() and (aside / "history.jsonl").is_file()

    # the same as a run to 3 s from the start
    three = args(out3 := tmp_path / "three" / "headline", tmp_path / "runs-three")
    three[three.index("--max-time") + 1] = "3"
    assert headline.main(three, clock=Clock()) == 0
    direct = json.loads((out3 / "records" / cell / "seed0.json").read_text())
    assert rec["history"]["sha256"] == direct["history"]["sha256"] and rec["evals"] == direct["evals"]

    # the check fails on a history that differs before the earlier end, or stops short of it
    assert headline.history_continues(aside, run_dir)
    lines = (aside / "history.jsonl").read_text().splitlines(keepends=True)
    k = next(i for i, x in enumerate(lines) if json.loads(x)["event"] == "eval" and json.loads(x)["time"] == 1.0)
    changed = json.loads(lines[k])
    changed["accuracy"] = changed["accuracy"] + 0.5
    (aside / "history.jsonl").write_text("".join([*lines[:k], json.dumps(changed) + "\n", *lines[k + 1:]]))
    assert not headline.history_continues(aside, run_dir)
    (aside / "history.jsonl").write_text("".join(lines[:k]))  # an earlier history cut short
    assert not headline.history_continues(aside, run_dir) and not headline.history_continues(run_dir, aside)
    (aside / "history.jsonl").write_text("".join(lines))
    assert headline.history_continues(aside, run_dir)

    md = load("make_results_md_r", ROOT / "scripts" / "make_results_md.py")
    assert md.main(["--results", str(out.parent), "--out", str(tmp_path / "x" / "RESULTS.md")]) == 0
    assert ("honest/paper10/dirichlet fedasync-a0.6-poly seed 0 (earlier run to 2 s: repeated)"
            in (tmp_path / "x" / "RESULTS.md").read_text())


def test_the_reversed_fleet_swaps_devices_at_its_time_and_runs_the_adaptive_variant_on_seed_0(headline, tmp_path) -> None:
    from prfl.run import build_scenario

    cells = [c for c in headline.plan_cells((0, 1, 2)) if c.group.fleet == "reversed"]
    assert {c.tier for c in cells} == {11} and cells[0].method == "prfl"
    assert {c.method for c in cells} == {"prfl", "prfl-adaptive", "heterofl-mask", "heterofl-width", "fedbuff-k5",
                                         *headline.FEDASYNC_GRID}
    cfg = headline.Settings(base="digits").config(cells[0])
    fleet = build_scenario(cfg).fleet
    at = headline.REVERSE_AT
    assert [fleet.profile_at(c, at - 1) for c in range(10)] == list(fleet.clients)
    assert [fleet.profile_at(c, at) for c in range(10)] == list(reversed(fleet.clients))
    sweep = headline.Sweep(tmp_path / "out", tmp_path / "runs", headline.Settings(base="digits"))
    adaptive = [c for c in cells if c.method == "prfl-adaptive"]
    assert [sweep.protocol(c) for c in adaptive] == [
        None, ("skipped", "PR-FL's adaptive variant runs on seed 0 only"), ("skipped", "PR-FL's adaptive variant runs on seed 0 only")]
    spec = headline.METHODS["prfl-adaptive"]
    assert headline.unavailable(adaptive[0]) is None and spec["options"]["adapt_after_recovery"] is True


def test_the_recovery_probe_runs_last_on_seed_0_of_the_dirichlet_split_with_patience_3(headline, tmp_path) -> None:
    cells = headline.plan_cells((0, 1, 2))
    probe = [c for c in cells if c.method == "prfl-patience3"]
    assert [(c.tier, c.group.name, c.seed) for c in probe] == [(12, "honest/paper10/dirichlet", s) for s in (0, 1, 2)]
    assert max(c.tier for c in cells if c.method != "prfl-refminimums") == 12
    sweep = headline.Sweep(tmp_path / "out", tmp_path / "runs", headline.Settings(base="digits"))
    assert [sweep.protocol(c) for c in probe] == [None] + [("skipped", "the recovery probe runs on seed 0 only")] * 2
    cfg = headline.Settings(base="digits").config(probe[0])
    assert cfg.policy.name == "prfl" and cfg.policy.options["patience"] == 3


def test_the_reference_minimum_rule_runs_last_on_seed_0_of_the_dirichlet_split(headline, tmp_path) -> None:
    cells = headline.plan_cells((0, 1, 2))
    ref = [c for c in cells if c.method == "prfl-refminimums"]
    assert [(c.tier, c.group.name, c.seed) for c in ref] == [(13, "honest/paper10/dirichlet", s) for s in (0, 1, 2)]
    assert cells[-len(ref):] == ref
    sweep = headline.Sweep(tmp_path / "out", tmp_path / "runs", headline.Settings(base="digits"))
    assert [sweep.protocol(c) for c in ref] == [None] + [("skipped", "the reference's minimum rule runs on seed 0 only")] * 2
    options = headline.Settings(base="digits").config(ref[0]).policy.options
    assert options["minimum_rule"] == "follow" and options["client_recovery"] == "density"
    assert headline.unavailable(ref[0]) is None


def test_sigterm_pauses_the_run_at_its_next_checkpoint(headline, tmp_path: Path) -> None:
    """A SIGTERM mid-run spends the budget: the run pauses after its next checkpoint with a piece
    record (instead of dying without one and losing the work since the checkpoint), and the
    handlers are put back when the invocation ends."""
    before = signal.getsignal(signal.SIGTERM)

    class SignalClock(Clock):
        def __call__(self) -> float:
            t = super().__call__()
            if t == 4.0:  # once the run is under way
                os.kill(os.getpid(), signal.SIGTERM)
            return t

    out, runs = tmp_path / "results" / "headline", tmp_path / "runs"
    run_dir = runs / "honest/paper10/dirichlet/fedasync-a0.6-poly" / "seed0"
    assert headline.main(args(out, runs, "--budget-minutes", "1000"), clock=SignalClock()) == 0
    pieces = [json.loads(x) for x in (run_dir / "pieces.jsonl").read_text().splitlines()]
    assert len(pieces) == 1 and pieces[0]["ended"].startswith("paused: paused after the checkpoint")
    assert 0 < pieces[0]["virtual_to"] < 2 and (run_dir / "checkpoint.pt").is_file()
    assert signal.getsignal(signal.SIGTERM) is before


def test_second_signal_drops_the_grace_and_the_third_is_not_caught(headline) -> None:
    clock = Clock()
    budget = headline.WallBudget(1000.0, 600.0, clock)
    before = signal.getsignal(signal.SIGINT)
    restore = headline.stop_on_signals(budget)
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert budget.expired() and budget.grace == 600.0  # pauses at the next checkpoint
        os.kill(os.getpid(), signal.SIGINT)
        assert budget.grace == 0.0  # stops at the next step
        assert signal.getsignal(signal.SIGINT) is before  # a third signal is not caught
    finally:
        restore()


def test_status_says_where_a_started_cell_stands(headline, tmp_path: Path, capsys) -> None:
    """`status` reads the run directories only: a paused cell with the virtual time its history
    reached; one whose claim a live process holds as running, with its pace since the claim; a
    cell with a record or not started is not listed."""
    out, runs = tmp_path / "results" / "headline", tmp_path / "runs"
    run_dir = runs / "honest/paper10/dirichlet/fedasync-a0.6-poly" / "seed0"
    assert headline.main(args(out, runs, "--budget-minutes", "0.05"), clock=Clock()) == 0
    piece = json.loads((run_dir / "pieces.jsonl").read_text().splitlines()[0])
    status = ["status", "--base", "digits", "--out", str(out), "--runs", str(runs), "--max-time", "2"]
    capsys.readouterr()
    assert headline.main(status) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].startswith("honest/paper10/dirichlet/fedasync-a0.6-poly/seed0: paused at ")
    assert "1 earlier pieces" in lines[0]

    # a running piece, set up by hand: the last piece ended at 100 virtual s, the history has
    # reached 160 s, and the claim was written 10 wall s ago
    sweep = headline.Sweep(out, runs, headline.Settings(base="digits", max_time=400.0), (0, 1))
    cell = next(c for c in headline.plan_cells((0, 1)) if c.key == "honest/paper10/dirichlet/prfl/seed1")
    rd = sweep.run_dir(cell)
    rd.mkdir(parents=True)
    (rd / "config.yaml").write_text("name: x\n")
    (rd / "pieces.jsonl").write_text(json.dumps({"wall_seconds": 120.0, "virtual_to": 100.0}) + "\n")
    (rd / "history.jsonl").write_text("".join(json.dumps({"kind": "eval", "time": float(t)}) + "\n"
                                              for t in range(0, 161, 20)) + '{"kind": "arr')  # a line being written
    claim = rd / "claim"
    claim.write_text(f"{os.getppid()}\n")  # pytest's parent: alive
    st = headline.progress(sweep, cell, now=claim.stat().st_mtime + 10.0)
    assert st["state"] == "running" and st["pid"] == os.getppid() and st["virtual"] == 160.0
    assert st["pace"] == pytest.approx(6.0) and st["eta_s"] == 40
    assert st["pieces"] == 1 and st["wall_seconds"] == 120.0
    claim.write_text("999999999\n")  # no such process: the cell is paused
    assert headline.progress(sweep, cell)["state"] == "paused"
    shutil.rmtree(rd)

    assert headline.main(args(out, runs), clock=Clock()) == 0  # finishes and is recorded
    capsys.readouterr()
    assert headline.main(status) == 0
    assert capsys.readouterr().out == ""
