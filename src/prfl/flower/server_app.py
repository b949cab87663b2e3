"""The prfl ServerApp: builds the scenario and the policy, then runs the real-time driver.

The server builds the same scenario as ``prfl run`` (data, partition sizes, model and initial
weights from the run config's seeds), evaluates on the data set's test split, and writes a run
folder laid out as the simulator's: ``config.yaml``, ``partition.json``, ``history.jsonl``,
``summary.json`` and ``accuracy.png``, times in wall-clock seconds. The folder is ``out-dir``, or
by default a new ``~/prfl-runs/flower/<name>-<time>``; a folder holding an earlier run is refused
unless ``overwrite = true`` (or ``resume = true`` continues it). Every ``checkpoint-every-rounds`` server
rounds it saves its state there (``checkpoint.pt``, written atomically, the previous one kept);
with ``resume = true`` a new ServerApp continues from it: the history is cut back to the
checkpoint and goes on, and the tasks that were in flight are failed and sent again.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

import yaml

from prfl.config import ConfigError, save_config
from prfl.flower.driver import FlowerDriver
from prfl.flower.grid import PromptGrid
from prfl.flower.settings import DEFAULT_RUNS_ROOT, AppSettings, app_settings
from prfl.report.plots import plot_accuracy
from prfl.run import build_scenario, make_policy
from prfl.runtime.checkpoint import CheckpointError
from prfl.runtime.rundir import RUN_FILES, RunDirectory

log = logging.getLogger(__name__)


def _ensure_log_handler() -> None:
    """Show prfl's INFO logs in the ServerApp's output (Flower streams it with ``flwr log``)."""
    logger = logging.getLogger("prfl")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


__all__ = ["RUN_FILES", "holds_run", "new_run_folder", "run_folder", "run_server", "make_server_app", "app"]


def holds_run(folder: Path) -> bool:
    """Does ``folder`` hold (part of) an earlier run?"""
    return RunDirectory(folder).holds_run()


def new_run_folder(root: Path, name: str, now: datetime | None = None) -> Path:
    """Create and return ``root/<name>-<YYYYmmdd-HHMMSS>`` (``-2``, ``-3``... when taken)."""
    return RunDirectory.new_timestamped(root, name, now).path


def run_folder(settings: AppSettings) -> Path:
    """Where this run writes: ``out-dir``, or a new timestamped folder under :data:`DEFAULT_RUNS_ROOT`."""
    cfg = settings.experiment
    if settings.out_dir is None:
        if settings.driver.resume:
            raise ConfigError("resume = true needs out-dir, the folder of the run to continue "
                              "(the ServerApp's log of that run names it)")
        return new_run_folder(Path(DEFAULT_RUNS_ROOT).expanduser(), cfg.name)
    out = settings.out_dir
    out.mkdir(parents=True, exist_ok=True)
    return out


def run_server(grid: Grid, run_config: Mapping[str, Any], defaults: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Run one experiment on ``grid``; return its summary (also written to ``summary.json``).

    The run folder gets what a simulator run directory holds: ``config.yaml``, ``partition.json``,
    ``history.jsonl``, ``summary.json`` and ``accuracy.png``/``.svg``, with times in wall-clock
    seconds (``"clock": "wall"`` in the summary). An earlier run in the folder is never
    overwritten unless ``overwrite = true``; ``resume = true`` continues it from its checkpoint.
    """
    settings = app_settings(run_config, defaults)
    cfg = settings.experiment
    sc = build_scenario(cfg)
    policy = make_policy(sc, cfg.policy)
    out = run_folder(settings)
    rd = RunDirectory(out)
    state = _checkpoint_to_resume(rd, cfg) if settings.driver.resume else None
    if state is None and rd.holds_run():
        if not settings.driver.overwrite:
            raise ConfigError(
                f"{out} already holds a run (kept as it is); leave out-dir empty for a new timestamped folder or "
                "name another one, set resume = true to continue this run, or overwrite = true to replace it")
        rd.clear_run()
    rd.summary.unlink(missing_ok=True)
    save_config(cfg, rd.config)
    sc.partition.save(rd.partition)
    log.info("prfl on Flower: policy %s, %d clients, %s/%s; stops at %s; run folder %s", policy.name,
             cfg.data.num_clients, cfg.data.dataset, cfg.model.name, cfg.sim.budget("s (wall clock)"), out.resolve())
    history = rd.open_history(truncate_at=None if state is None else int(state["history_offset"]))
    s = cfg.sim
    driver = FlowerDriver(
        PromptGrid(grid), policy, sc.evaluator(), settings.driver, seed=cfg.seed, history=history,
        eval_every_rounds=s.eval_every_rounds, eval_every_seconds=s.eval_every_seconds, max_time=s.max_time,
        target_accuracies=s.targets,
    )
    if settings.driver.checkpoint_every_rounds:
        driver.checkpoint_dir = out
    if state is not None:
        driver.load_state_dict(state)
    try:
        summary = driver.run()
    finally:
        history.close()
    summary["name"] = cfg.name
    summary["seed"] = cfg.seed
    summary["clock"] = "wall"  # times are real seconds since Start (the simulator's are virtual)
    rd.write_summary(summary)
    plot_accuracy({summary["policy"]: rd.records()}, rd.accuracy_plot, title=cfg.name, clock="wall")
    log.info("run folder %s: config.yaml, history.jsonl, summary.json, accuracy.png; "
             "`prfl report %s` builds its HTML page", out.resolve(), out.resolve())
    log.info("done: %s after %d server updates, %.1f s; final accuracy %s; %d messages sent",
             summary["stopped"], summary["server_rounds"], summary["seconds"], summary["final_accuracy"],
             summary["messages_sent"])
    return summary


def _checkpoint_to_resume(rd: RunDirectory, cfg: Any) -> dict[str, Any] | None:
    """The checkpoint a resumed run continues from; None (start afresh) when out-dir has none."""
    out = rd.path
    if not rd.has_checkpoint():
        log.warning("resume requested but %s holds no checkpoint: starting a new run", out)
        return None
    saved = rd.config
    if saved.exists():
        old = yaml.safe_load(saved.read_text(encoding="utf-8")) or {}
        new = cfg.model_dump(mode="json")
        # the budget may grow on resume; anything else would continue a different experiment
        changed = sorted(k for k in set(old) | set(new) if k not in ("sim", "name") and old.get(k) != new.get(k))
        if changed:
            raise ConfigError(
                f"cannot resume the run in {out}: the run config changes {', '.join(changed)} "
                f"(compare with {saved}); use the same config, or another out-dir to start afresh"
            )
    try:
        state, path = rd.load_checkpoint()
    except CheckpointError as exc:
        raise ConfigError(f"{exc}; or set resume = false to start afresh") from None
    log.info("resuming from %s", path)
    return state


def make_server_app(defaults: Mapping[str, Any] | None = None) -> ServerApp:
    """A ServerApp; ``defaults`` (flat run-config keys) fill keys the run config lacks."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        _ensure_log_handler()
        run_server(grid, context.run_config, defaults)

    return server_app


app = make_server_app()
"""The ServerApp ``[tool.flwr.app.components] serverapp`` points at."""
