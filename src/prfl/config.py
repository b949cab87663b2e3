"""Typed experiment configuration: YAML in, ``--set key=value`` overrides, clear errors out."""

from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A configuration problem a user can fix; the message names the field and the fix."""


class _Strict(BaseModel):
    # NaN and inf are refused everywhere: no setting of prfl means "infinitely many" (use null)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class DataConfig(_Strict):
    """Which data set, where it lives, and how it is split across clients."""

    dataset: str = "digits"
    data_dir: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)
    num_clients: int = Field(10, ge=1)
    partition: Literal["iid", "dirichlet", "shards", "natural"] = "iid"
    partition_options: dict[str, Any] = Field(default_factory=dict)
    eval_samples: int | None = Field(None, ge=1, description="evaluate on the first N test samples")

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, v: str) -> str:
        from prfl.data import DATASETS

        if v not in DATASETS:
            raise ValueError(f"unknown data set {v!r}; choose one of: {', '.join(DATASETS)}")
        return v


class ModelConfig(_Strict):
    name: str = "conv2"
    options: dict[str, Any] = Field(default_factory=dict)
    seed: int = Field(0, ge=0, description="seed of the initial weights")

    @field_validator("name")
    @classmethod
    def _known_model(cls, v: str) -> str:
        from prfl.models import MODELS

        if v not in MODELS:
            raise ValueError(f"unknown model {v!r}; choose one of: {', '.join(MODELS)}")
        return v


class TrainSection(_Strict):
    """Local training (the PR-FL paper: SGD lr 0.25, batch 20, 5 local steps)."""

    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(20, ge=1)
    local_steps: int | None = Field(5, ge=1)
    local_epochs: float | None = Field(None, gt=0)
    loss: Literal["ce", "bce"] = "ce"

    @model_validator(mode="after")
    def _steps_or_epochs(self) -> "TrainSection":
        if self.local_steps is None and self.local_epochs is None:
            raise ValueError("set train.local_steps or train.local_epochs")
        return self

    def to_train_config(self):
        from prfl.client.trainer import TrainConfig

        return TrainConfig(**self.model_dump())


class AvailabilityConfig(_Strict):
    mean_on: float = Field(..., gt=0, description="mean seconds online")
    mean_off: float = Field(..., gt=0, description="mean seconds offline")
    start_online_prob: float = Field(1.0, ge=0, le=1)


class FleetConfig(_Strict):
    preset: Literal["paper10", "lognormal", "uniform"] = "paper10"
    file: str | None = Field(None, description="a fleet CSV or YAML file; overrides preset")
    options: dict[str, Any] = Field(default_factory=dict)
    availability: AvailabilityConfig | None = None


class PolicyConfig(_Strict):
    name: str = "fedasync"
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _known_policy(cls, v: str) -> str:
        from prfl.policies import POLICIES

        if v not in POLICIES:
            raise ValueError(f"unknown policy {v!r}; choose one of: {', '.join(sorted(POLICIES))}")
        return v


class SimConfig(_Strict):
    executor: Literal["inline", "process", "ray"] = "inline"
    workers: int = Field(2, ge=1)
    ray_address: str | None = Field(None, description="an existing Ray cluster (ray executor); None starts one")
    spill_dir: str | None = Field(
        None, description="inline executor: keep the start weights of tasks in flight in this directory, not in memory"
    )
    max_rounds: int | None = Field(300, ge=1)
    max_time: float | None = Field(None, gt=0)
    eval_every_rounds: int | None = Field(10, ge=1)
    eval_every_seconds: float | None = Field(None, gt=0)
    compute_time: Literal["flops", "measured"] = "flops"
    sparse_efficiency: float = Field(1.0, ge=0, le=1)
    shared_server_link: bool = True
    piece_relay: bool = Field(
        True, description="pieces already published for a model version reach later clients from a relay at the "
        "client's speed; false: every downloaded byte crosses the server's shared link (as on Flower)")
    checkpoint_every_rounds: int | None = Field(50, ge=1)
    targets: list[float] = Field(default_factory=list, description="accuracies for time-to-accuracy")

    @model_validator(mode="after")
    def _some_budget(self) -> "SimConfig":
        if self.max_rounds is None and self.max_time is None:
            raise ValueError("set sim.max_rounds or sim.max_time, or the run never ends")
        return self


class PrivacyConfig(_Strict):
    """Client-level differential privacy: clip each update to ``clip_norm`` and add Gaussian noise
    of std ``noise_multiplier * clip_norm`` on the held weights; epsilon is reported for ``delta``."""

    clip_norm: float = Field(..., gt=0)
    noise_multiplier: float = Field(..., ge=0)
    delta: float = Field(1e-5, gt=0, lt=1)
    sampling_rate: float = Field(1.0, gt=0, le=1)


class ExperimentConfig(_Strict):
    """One experiment: data, model, training, fleet, the policy under test, and baselines."""

    name: str = "experiment"
    seed: int = Field(0, ge=0)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainSection = Field(default_factory=TrainSection)
    fleet: FleetConfig = Field(default_factory=FleetConfig)
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    baselines: list[PolicyConfig] = Field(default_factory=list, description="policies run beside the main one")
    sim: SimConfig = Field(default_factory=SimConfig)
    privacy: PrivacyConfig | None = Field(None, description="client-level DP (needs the privacy extra)")

    def with_policy(self, policy: PolicyConfig) -> "ExperimentConfig":
        """This experiment with another policy and no baselines."""
        data = self.model_dump()
        data["policy"] = policy.model_dump()
        data["baselines"] = []
        return ExperimentConfig.model_validate(data)


# ---------------------------------------------------------------------------- loading
def format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field; check the spelling (see `prfl config --show` for every field)"
        elif e["type"] == "literal_error":
            msg = f"{msg} (got {e.get('input')!r})"
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


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
        raise ConfigError(f"override {item!r}: value is not valid YAML ({exc})") from exc
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
        raise ConfigError(f"{p} is not valid YAML: {exc}") from exc
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
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_errors(err, source)) from None


def save_config(cfg: ExperimentConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), encoding="utf-8")
