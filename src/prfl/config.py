"""Typed experiment configuration: YAML in, ``--set key=value`` overrides, clear errors out."""

from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from prfl.settings import Accounting, SimSettings, TrainConfig, check_accounting


class ConfigError(ValueError):
    """A configuration problem a user can fix; the message names the field and the fix."""


class _Strict(BaseModel):
    # NaN and inf are refused everywhere: no setting of prfl means "infinitely many" (use null)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class DataConfig(_Strict):
    """Which data set, where it lives, and how it is split across clients."""

    dataset: str = Field("digits", description="data set name (`prfl datasets` lists them and whether their files are here)")
    data_dir: str | None = Field(None, description="directory holding the data set's files (default: $PRFL_DATA, then system dirs)")
    options: dict[str, Any] = Field(default_factory=dict, description="options of the data set's loader (e.g. normalize: true)")
    num_clients: int = Field(10, ge=1, description="number of clients the training data is split over")
    partition: Literal["iid", "dirichlet", "shards", "natural"] = Field(
        "iid", description="how the data is split: iid, dirichlet (label skew), shards or natural (per writer/role)")
    partition_options: dict[str, Any] = Field(
        default_factory=dict, description="options of the split (dirichlet: alpha; shards: classes_per_client)")
    eval_samples: int | None = Field(None, ge=1, description="evaluate on the first N test samples (null: all)")

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, v: str) -> str:
        from prfl.data import DATASETS

        if v not in DATASETS:
            raise ValueError(f"unknown data set {v!r}; choose one of: {', '.join(DATASETS)}")
        return v


class ModelConfig(_Strict):
    """The model every client trains (a sub-model of it, for sparse policies)."""

    name: str = Field("conv2", description="model from prfl's zoo (mlp, conv2, ...)")
    options: dict[str, Any] = Field(default_factory=dict, description="options of the model builder (e.g. hidden: [32])")
    seed: int = Field(0, ge=0, description="seed of the initial weights")

    @field_validator("name")
    @classmethod
    def _known_model(cls, v: str) -> str:
        from prfl.models import MODELS

        if v not in MODELS:
            raise ValueError(f"unknown model {v!r}; choose one of: {', '.join(MODELS)}")
        return v


TrainSection = TrainConfig
"""The ``train`` section is the trainer's own settings (:class:`prfl.settings.TrainConfig`)."""


def _shared(name: str) -> Any:
    """The field ``name`` of :class:`~prfl.settings.SimSettings` (default, bounds, meaning), for
    the ``sim`` section to declare it exactly as the simulator does."""
    return copy.copy(SimSettings.model_fields[name])


class AvailabilityConfig(_Strict):
    """Clients go offline and come back (exponential on/off periods, virtual seconds)."""

    mean_on: float = Field(..., gt=0, description="mean seconds online")
    mean_off: float = Field(..., gt=0, description="mean seconds offline")
    start_online_prob: float = Field(1.0, ge=0, le=1, description="probability a client is online at time 0")


class FleetConfig(_Strict):
    """The simulated devices: link speeds and compute of every client and the server."""

    preset: Literal["paper10", "lognormal", "uniform"] = Field(
        "paper10", description="built-in fleet: paper10 (the PR-FL paper's 10 devices), lognormal or uniform")
    file: str | None = Field(None, description="a fleet CSV or YAML file; overrides preset")
    options: dict[str, Any] = Field(default_factory=dict, description="options of the preset (e.g. sigma, compute_spread)")
    availability: AvailabilityConfig | None = Field(None, description="on/off periods of clients (null: always online)")
    changes: list[dict[str, Any]] = Field(
        default_factory=list,
        description="speed changes over virtual time, e.g. [{at: 3000, like: reversed}] (client i takes client n-1-i's "
                    "device from 3000 s on) or [{at: 6000, clients: [0, 1], compute: 0.5, up: 0.25}]; keys: at, "
                    "clients, like, compute, down, up (prfl.sim.devices.SpeedChange)")

    @field_validator("changes")
    @classmethod
    def _valid_changes(cls, v: list[dict[str, Any]]) -> list[dict[str, Any]]:
        from prfl.sim.devices import FleetError, parse_changes

        try:
            parse_changes(v, "fleet.changes")
        except FleetError as exc:
            raise ValueError(str(exc)) from None
        return v


class PolicyConfig(_Strict):
    """A server policy and its options (`prfl config --explain` lists every option and default)."""

    name: str = Field("fedasync", description="policy: prfl, fedasync, fedbuff, fedfix, fedavg or heterofl")
    options: dict[str, Any] = Field(default_factory=dict, description="the policy's options; unset ones take their defaults")

    @field_validator("name")
    @classmethod
    def _known_policy(cls, v: str) -> str:
        from prfl.policies import POLICIES

        if v not in POLICIES:
            raise ValueError(f"unknown policy {v!r}; choose one of: {', '.join(sorted(POLICIES))}")
        return v


class SimConfig(_Strict):
    """The virtual-clock simulator: who trains, how time is modelled, and when the run stops.

    Budget: a run stops at ``max_rounds`` server updates or at ``max_time`` virtual seconds,
    whichever comes first. A configuration that sets only ``max_time`` runs on time alone (the
    default ``max_rounds`` does not apply); one that sets neither runs ``max_rounds`` = 300.
    """

    executor: Literal["inline", "process", "ray"] = Field(
        "inline", description="where tasks train: inline (this process), process (a pool) or ray")
    workers: int = Field(2, ge=1, description="processes of the process/ray executor")
    ray_address: str | None = Field(None, description="an existing Ray cluster (ray executor); None starts one")
    spill_dir: str | None = Field(
        None, description="inline executor: keep the start weights of tasks in flight in this directory, not in memory"
    )
    max_rounds: int | None = Field(
        300, ge=1, description="stop after this many server updates (null: no round limit; unset with max_time: null)")
    max_time: float | None = _shared("max_time")
    eval_every_rounds: int | None = _shared("eval_every_rounds")
    eval_every_seconds: float | None = _shared("eval_every_seconds")
    compute_time: Literal["flops", "measured"] = _shared("compute_time")
    sparse_efficiency: float = _shared("sparse_efficiency")
    shared_server_link: bool = _shared("shared_server_link")
    piece_relay: bool = _shared("piece_relay")
    model_relay: bool = _shared("model_relay")
    accounting: Accounting = _shared("accounting")
    checkpoint_every_rounds: int | None = Field(
        50, ge=1, description="server updates between checkpoints of the run (null: no checkpoints)")
    targets: list[float] = Field(default_factory=list, description="accuracies for time-to-accuracy")

    @model_validator(mode="before")
    @classmethod
    def _time_budget_alone(cls, data: Any) -> Any:
        # only max_time given: the run is on a time budget, so the default round budget is dropped
        if isinstance(data, dict) and data.get("max_time") is not None and "max_rounds" not in data:
            data = {**data, "max_rounds": None}
        return data

    @field_validator("accounting", mode="before")
    @classmethod
    def _known_accounting(cls, v: Any) -> Any:
        return check_accounting(v) if isinstance(v, str) else v

    def settings(self, checkpoints: bool = True) -> SimSettings:
        """The simulator's settings from this (validated) section, without validating again;
        ``checkpoints`` False: none (a run without a directory to write them to)."""
        shared = {name: getattr(self, name) for name in _SIM_SHARED}
        return SimSettings.model_construct(
            **shared, checkpoint_every_rounds=self.checkpoint_every_rounds if checkpoints else None,
            target_accuracies=tuple(self.targets),
        )

    def budget(self, unit: str = "virtual s") -> str:
        """The limits that stop the run, in words (``300 server updates or 1200 virtual s``)."""
        parts = []
        if self.max_rounds is not None:
            parts.append(f"{self.max_rounds} server updates")
        if self.max_time is not None:
            parts.append(f"{self.max_time:g} {unit}")
        return " or ".join(parts) + (", whichever comes first" if len(parts) > 1 else "")

    @model_validator(mode="after")
    def _some_budget(self) -> "SimConfig":
        if self.max_rounds is None and self.max_time is None:
            raise ValueError("set sim.max_rounds or sim.max_time, or the run never ends")
        if self.accounting == "reference" and not self.piece_relay:
            raise ValueError("sim.piece_relay: false says where honest downloads come from; the reference accounting "
                             "has its own download model: set sim.accounting: honest or sim.piece_relay: true")
        return self


_SIM_SHARED = ("max_time", "eval_every_rounds", "eval_every_seconds", "compute_time", "sparse_efficiency",
               "shared_server_link", "piece_relay", "model_relay", "accounting")


class PrivacyConfig(_Strict):
    """Client-level differential privacy: clip each update to ``clip_norm`` and add Gaussian noise
    of std ``noise_multiplier * clip_norm`` on the held weights; epsilon is reported for ``delta``."""

    clip_norm: float = Field(..., gt=0, description="L2 norm each client update is clipped to")
    noise_multiplier: float = Field(..., ge=0, description="Gaussian noise std as a multiple of clip_norm")
    delta: float = Field(1e-5, gt=0, lt=1, description="delta of the reported (epsilon, delta) guarantee")
    sampling_rate: float = Field(1.0, gt=0, le=1, description="fraction of clients sampled per round, for the accountant")


class ExperimentConfig(_Strict):
    """One experiment: data, model, training, fleet, the policy under test, and baselines."""

    name: str = Field("experiment", description="experiment name (names the run directory)")
    seed: int = Field(0, ge=0, description="run seed: fixes the split, the fleet, every task's randomness")
    data: DataConfig = Field(default_factory=DataConfig, description="the data set and its split over clients")
    model: ModelConfig = Field(default_factory=ModelConfig, description="the model")
    train: TrainSection = Field(default_factory=TrainSection, description="local training on each client")
    fleet: FleetConfig = Field(default_factory=FleetConfig, description="the simulated devices")
    policy: PolicyConfig = Field(default_factory=PolicyConfig, description="the policy under test")
    baselines: list[PolicyConfig] = Field(default_factory=list, description="policies run beside the main one")
    sim: SimConfig = Field(default_factory=SimConfig, description="the simulator and the run's budget")
    privacy: PrivacyConfig | None = Field(None, description="client-level DP (needs the privacy extra)")

    def with_policy(self, policy: PolicyConfig) -> "ExperimentConfig":
        """This experiment with another policy and no baselines."""
        data = self.model_dump()
        data["policy"] = policy.model_dump()
        data["baselines"] = []
        return ExperimentConfig.model_validate(data)

    def with_max_time(self, max_time: float) -> "ExperimentConfig":
        """This experiment with ``sim.max_time`` set to ``max_time`` (validated)."""
        data = self.model_dump()
        data["sim"]["max_time"] = max_time
        return ExperimentConfig.model_validate(data)


# ---------------------------------------------------------------------------- loading
def error_text(e: Any) -> str:
    """The message of one pydantic error without pydantic's ``Value error, `` prefix."""
    if e["type"] == "value_error" and e.get("ctx", {}).get("error") is not None:
        return str(e["ctx"]["error"])
    msg = str(e["msg"])
    if e["type"] == "literal_error":
        msg = f"{msg} (got {e.get('input')!r})"
    return msg


def format_errors(err: ValidationError, source: str) -> str:
    """A validation error as one line naming every bad field, plus a second line with the fix
    when a field name is unknown."""
    parts, unknown = [], False
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            unknown = True
            parts.append(f"{loc}: unknown field")
        else:
            parts.append(f"{loc}: {error_text(e)}")
    text = f"invalid configuration ({source}): " + "; ".join(parts)
    if unknown:
        text += "\ncheck the spelling; `prfl config --explain` lists every field with its meaning"
    return text


def yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML syntax error in one line: ``line 2, column 1: expected ... (while parsing ...)``."""
    mark = getattr(exc, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    problem = getattr(exc, "problem", None) or (str(exc).splitlines() or ["invalid YAML"])[0]
    context = getattr(exc, "context", None)
    return where + str(problem) + (f" ({context})" if context else "")


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], YAML-parsed value)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.path=value, e.g. policy.name=fedbuff")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"override {item!r} has an empty key part")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {item!r}: value is not valid YAML ({yaml_problem(exc)})") from exc
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    out = copy.deepcopy(data)
    for item in overrides:
        path, value = parse_override(item)
        node = out
        for p in path[:-1]:
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {item!r}: {p!r} is not a section")
            node = nxt
        node[path[-1]] = value
    return out


def preset_names() -> list[str]:
    return sorted(p.stem for p in resources.files("prfl.presets").iterdir() if p.name.endswith(".yaml"))


def preset_data(name: str) -> dict[str, Any]:
    names = preset_names()
    if name not in names:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(names)}")
    text = resources.files("prfl.presets").joinpath(f"{name}.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text) or {}


def read_yaml_mapping(path: str | Path, what: str, sections: str) -> dict[str, Any]:
    """The mapping a YAML file holds; a clear ConfigError if it is missing, invalid or not a mapping."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p} is not valid YAML: {yaml_problem(exc)}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{p} must hold a mapping of sections ({sections})")
    return data


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, preset: str | None = None
) -> ExperimentConfig:
    """Build a config from a YAML file or a preset (or the defaults), then apply overrides."""
    if path is not None and preset is not None:
        raise ConfigError("give a config file or a preset, not both")
    source = "defaults"
    data: dict[str, Any] = {}
    if path is not None:
        source = str(path)
        data = read_yaml_mapping(path, "config file", "data, model, policy, ...")
    elif preset is not None:
        source = f"preset {preset}"
        data = preset_data(preset)
    if overrides:
        data = apply_overrides(data, overrides)
        source += " + overrides"
    return _validated(data, source)


def _validated(data: dict[str, Any], source: str) -> ExperimentConfig:
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_errors(err, source)) from None


# Settings added after run directories were already being written, with the value that gives the
# behaviour those runs had: a saved config.yaml without the key is read with that value, so a run
# resumes (and is compared) under the rules it started with, whatever the default is now.
EARLIER_RULES: dict[tuple[str, str], Any] = {("sim", "model_relay"): False}


def load_run_config(path: str | Path) -> ExperimentConfig:
    """The config a run directory saved (``config.yaml``), read with :data:`EARLIER_RULES` for
    the settings it predates."""
    data = read_yaml_mapping(path, "config file", "data, model, policy, ...")
    for (section, key), value in EARLIER_RULES.items():
        part = data.get(section)
        if part is None:
            data[section] = part = {}
        if isinstance(part, dict) and key not in part:
            part[key] = value
    return _validated(data, str(path))


def save_config(cfg: ExperimentConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), encoding="utf-8")
