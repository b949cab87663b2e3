"""Flower run config -> prfl experiment config and driver settings.

Flower hands a ServerApp and a ClientApp the app's run config as flat ``key: value`` pairs
(``[tool.flwr.app.config]`` of the app's ``pyproject.toml``, nested tables joined with ``.``,
then ``flwr run --run-config`` overrides). Three families of keys are understood:

- ``prfl.<path>``: any field of prfl's :class:`~prfl.config.ExperimentConfig`, e.g.
  ``prfl.data.dataset``, ``prfl.policy.name``, ``prfl.policy.options.interval``,
  ``prfl.sim.max_rounds``. TOML has no lists or nulls in a run config, so a string that starts
  with ``[`` or ``{`` is parsed as YAML (``"[32]"`` -> ``[32]``) and ``"none"`` means None.
- ``policy-options.<policy>.<option>``: an option of one policy, used only when
  ``prfl.policy.name`` is that policy, so that one app config can hold every policy's options
  and ``--run-config 'prfl.policy.name="fedbuff"'`` switches between them;
- driver keys (:data:`DRIVER_KEYS`): reply timeout, where the history goes, per-partition delays...

``config-file`` names a prfl YAML config (the one ``prfl run`` takes) applied before the
``prfl.*`` keys. This module does not import Flower.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from prfl.config import ConfigError, ExperimentConfig, error_text, load_config

PRFL_PREFIX = "prfl."
OPTIONS_PREFIX = "policy-options."

DRIVER_KEYS: dict[str, str] = {
    "config-file": "a prfl YAML config applied before the prfl.* keys ('' for none)",
    "out-dir": "the run folder ('': a new ~/prfl-runs/flower/<name>-<time>; relative: to the ServerApp's working directory)",
    "overwrite": "replace an earlier run in out-dir (otherwise the run is refused and the earlier one kept)",
    "reply-timeout": "seconds after which a dispatched task without reply becomes TaskFailed "
                     "(a dead node is noticed sooner when the SuperLink declares it offline)",
    "hello-timeout": "seconds a describe query lives (its TTL); a node is not asked again while one lives, and "
                     "after one expires unanswered the next lives twice as long (up to 4x)",
    "wait-for-nodes": "seconds to wait at start until every client has a node (then start anyway)",
    "poll-interval": "seconds between pulls of replies",
    "discover-interval": "seconds between listings of the federation's nodes",
    "probe-interval": "seconds between describe queries to a node whose task failed",
    "idle-timeout": "seconds with no task in flight before the run stops (a describe query already sent may defer the stop until it is answered)",
    "client-delays": "comma-separated artificial delay (s) per partition id; node config delay-seconds wins",
    "max-client-errors": "consecutive ClientApp errors from one node before the run fails",
    "stop-file": "path whose appearance ends the run gracefully (history and summary written; '' for none)",
    "checkpoint-every-rounds": "server rounds between checkpoints of the server's state in out-dir (0: none)",
    "resume": "continue from the checkpoint in out-dir if there is one (tasks then in flight are failed)",
}

# Where runs go when out-dir is empty: a new timestamped folder under this, on the ServerApp's machine.
DEFAULT_RUNS_ROOT = "~/prfl-runs/flower"

# Defaults of the driver keys (the example app's pyproject.toml repeats them).
DRIVER_DEFAULTS: dict[str, Any] = {
    "config-file": "",
    "out-dir": "",
    "overwrite": False,
    "reply-timeout": 120.0,
    "hello-timeout": 30.0,
    "wait-for-nodes": 60.0,
    "poll-interval": 0.1,
    "discover-interval": 2.0,
    "probe-interval": 5.0,
    "idle-timeout": 120.0,
    "client-delays": "",
    "max-client-errors": 3,
    "stop-file": "",
    "checkpoint-every-rounds": 20,
    "resume": False,
}

# prfl.* values used when neither the run config nor a config file sets them. The simulator's
# fleet is unused on Flower (devices are real), so it is always "uniform" (any number of clients).
PRFL_DEFAULTS: dict[str, Any] = {
    "fleet": {"preset": "uniform"},
    "sim": {"checkpoint_every_rounds": None},
}


@dataclass(frozen=True)
class DriverSettings:
    """How the real-time driver talks to the federation (all durations in seconds)."""

    out_dir: str = DRIVER_DEFAULTS["out-dir"]
    reply_timeout: float = DRIVER_DEFAULTS["reply-timeout"]
    hello_timeout: float = DRIVER_DEFAULTS["hello-timeout"]
    wait_for_nodes: float = DRIVER_DEFAULTS["wait-for-nodes"]
    poll_interval: float = DRIVER_DEFAULTS["poll-interval"]
    discover_interval: float = DRIVER_DEFAULTS["discover-interval"]
    probe_interval: float = DRIVER_DEFAULTS["probe-interval"]
    idle_timeout: float = DRIVER_DEFAULTS["idle-timeout"]
    client_delays: tuple[float, ...] = ()
    max_client_errors: int = DRIVER_DEFAULTS["max-client-errors"]
    stop_file: str = ""
    checkpoint_every_rounds: int = DRIVER_DEFAULTS["checkpoint-every-rounds"]
    resume: bool = False
    overwrite: bool = False

    def __post_init__(self) -> None:
        for name in ("reply_timeout", "hello_timeout", "poll_interval", "discover_interval", "probe_interval", "idle_timeout"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ConfigError(f"{name.replace('_', '-')} must be a positive number of seconds, got {value!r}")
        if not (isinstance(self.wait_for_nodes, (int, float)) and self.wait_for_nodes >= 0):
            raise ConfigError(f"wait-for-nodes must be >= 0 seconds, got {self.wait_for_nodes!r}")
        if any(d < 0 or not math.isfinite(d) for d in self.client_delays):
            raise ConfigError(f"client-delays must be non-negative seconds, got {list(self.client_delays)}")
        if self.checkpoint_every_rounds < 0:
            raise ConfigError(f"checkpoint-every-rounds must be >= 0 (0: no checkpoints), got {self.checkpoint_every_rounds}")
        if self.max_client_errors < 1:
            raise ConfigError(f"max-client-errors must be at least 1, got {self.max_client_errors}")

    def delay_for(self, partition: int) -> float:
        """Artificial delay of ``partition`` from ``client-delays`` (0 when not listed)."""
        return self.client_delays[partition] if 0 <= partition < len(self.client_delays) else 0.0


@dataclass(frozen=True)
class AppSettings:
    """Everything an app needs from the run config."""

    experiment: ExperimentConfig
    driver: DriverSettings
    out_dir: Path | None  # None: a new timestamped folder under DEFAULT_RUNS_ROOT


def _value(raw: Any) -> Any:
    """A run-config value as prfl expects it: YAML lists/maps and 'none' decoded."""
    if isinstance(raw, str):
        text = raw.strip()
        if text.lower() in ("none", "null"):
            return None
        if text.startswith(("[", "{")):
            try:
                return yaml.safe_load(text)
            except yaml.YAMLError as exc:
                raise ConfigError(f"value {raw!r} looks like a YAML list or map but does not parse: {exc}") from exc
    return raw


def parse_bool(raw: Any, key: str) -> bool:
    """A TOML bool, or the strings true/false/1/0/yes/no."""
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no", ""):
        return False
    raise ConfigError(f"{key} must be true or false, got {raw!r}")


def parse_delays(text: str) -> tuple[float, ...]:
    """``"0, 0, 2.5"`` -> (0.0, 0.0, 2.5); an empty string -> ()."""
    text = text.strip()
    if not text:
        return ()
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise ConfigError(f"client-delays must be comma-separated seconds like '0,0,2.5', got {text!r}") from None


_SIMULATOR_ONLY: dict[str, str] = {
    "privacy": "client-level differential privacy is applied by the simulator's executors; the Flower "
               "ClientApp trains without it, so the run would not be private",
    "fleet.availability": "on/off periods model simulated devices; on Flower, nodes come and go for real",
    "fleet.changes": "speed changes model simulated devices; on Flower, nodes have the speeds they have",
}


def refuse_simulator_only(data: Mapping[str, Any], where: str) -> None:
    """Raise a :class:`ConfigError` naming the field if ``data`` (an experiment config as a dict)
    sets something only the simulator honours (:data:`_SIMULATOR_ONLY`)."""
    for key, why in _SIMULATOR_ONLY.items():
        node: Any = data
        for part in key.split("."):
            node = node.get(part) if isinstance(node, Mapping) else None
        if node not in (None, [], {}):  # an empty list of changes sets nothing
            raise ConfigError(f"prfl.{key} is set ({where}), but {why}; remove it to run on Flower, "
                              f"or run the experiment in the simulator (prfl run)")


def app_settings(run_config: Mapping[str, Any], defaults: Mapping[str, Any] | None = None) -> AppSettings:
    """Build the experiment config and driver settings from a Flower run config.

    ``defaults`` (flat keys, same spelling) fill keys the run config lacks: Flower's
    ``run_simulation`` passes an empty run config, so apps built in Python carry their own.
    """
    flat: dict[str, Any] = dict(defaults or {})
    flat.update(run_config)
    unknown = sorted(k for k in flat if not k.startswith((PRFL_PREFIX, OPTIONS_PREFIX)) and k not in DRIVER_KEYS)
    if unknown:
        raise ConfigError(
            f"unknown run-config key {unknown[0]!r}; use prfl.<field> for the experiment "
            f"(e.g. prfl.policy.name), policy-options.<policy>.<option>, or one of: {', '.join(DRIVER_KEYS)}"
        )
    drv = {**DRIVER_DEFAULTS, **{k: v for k, v in flat.items() if k in DRIVER_KEYS}}

    # Experiment: defaults <- config file <- prfl.* keys, validated by prfl's own config model.
    data: dict[str, Any] = copy.deepcopy(PRFL_DEFAULTS)
    config_file = str(drv["config-file"]).strip()
    if config_file:
        base = load_config(config_file).model_dump()
        refuse_simulator_only(base, f"in config-file {config_file}")
        data = {**data, **base}
    data["fleet"] = copy.deepcopy(PRFL_DEFAULTS["fleet"])  # devices are real on Flower: the modelled fleet is unused
    overrides = [(k[len(PRFL_PREFIX):], _value(v)) for k, v in sorted(flat.items()) if k.startswith(PRFL_PREFIX)]
    for key, value in overrides:
        if not key or any(not p for p in key.split(".")):
            raise ConfigError(f"run-config key 'prfl.{key}' has an empty part")
    for key, value in overrides:
        node = data
        parts = key.split(".")
        for p in parts[:-1]:
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"run-config key 'prfl.{key}': {p!r} is not a section")
            node = nxt
        node[parts[-1]] = value
    # policy-options.<name>.<option>: options of one policy, applied only when that policy runs
    policy = data.setdefault("policy", {})
    chosen = policy.get("name", ExperimentConfig().policy.name)
    for key, value in sorted(flat.items()):
        if not key.startswith(OPTIONS_PREFIX):
            continue
        name, _, option = key[len(OPTIONS_PREFIX):].partition(".")
        if not name or not option or "." in option:
            raise ConfigError(f"run-config key {key!r} must look like policy-options.<policy>.<option>")
        if name == chosen:
            options = policy.get("options")
            if options is None:
                options = policy["options"] = {}
            options.setdefault(option, _value(value))  # an explicit prfl.policy.options.<option> wins
    try:
        experiment = ExperimentConfig.model_validate(data)
    except ValidationError as err:  # name the fields in the run-config spelling
        parts = [f"prfl.{'.'.join(str(p) for p in e['loc'])}: {error_text(e)}" for e in err.errors()]
        raise ConfigError("invalid prfl.* run config: " + "; ".join(parts)) from None
    refuse_simulator_only(experiment.model_dump(), "in the run config")

    try:
        driver = DriverSettings(
            out_dir=str(drv["out-dir"]),
            reply_timeout=float(drv["reply-timeout"]),
            hello_timeout=float(drv["hello-timeout"]),
            wait_for_nodes=float(drv["wait-for-nodes"]),
            poll_interval=float(drv["poll-interval"]),
            discover_interval=float(drv["discover-interval"]),
            probe_interval=float(drv["probe-interval"]),
            idle_timeout=float(drv["idle-timeout"]),
            client_delays=parse_delays(str(drv["client-delays"])),
            max_client_errors=int(drv["max-client-errors"]),
            stop_file=str(drv["stop-file"]).strip(),
            checkpoint_every_rounds=int(drv["checkpoint-every-rounds"]),
            resume=parse_bool(drv["resume"], "resume"),
            overwrite=parse_bool(drv["overwrite"], "overwrite"),
        )
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"driver run-config keys: {exc}") from exc
    out_dir = Path(driver.out_dir).expanduser() if driver.out_dir.strip() else None
    return AppSettings(experiment, driver, out_dir)


__all__ = [
    "DRIVER_DEFAULTS",
    "DRIVER_KEYS",
    "DEFAULT_RUNS_ROOT",
    "OPTIONS_PREFIX",
    "PRFL_PREFIX",
    "AppSettings",
    "DriverSettings",
    "app_settings",
    "parse_delays",
]
