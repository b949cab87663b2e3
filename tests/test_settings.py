"""One definition of every trainer and simulator setting: the config builds them, validated once."""

from __future__ import annotations

from typing import Any, Callable

import pytest

from prfl.config import ConfigError, ExperimentConfig, SimConfig, load_config
from prfl.settings import SimSettings, TrainConfig


def test_the_train_section_is_the_trainers_config() -> None:
    cfg = ExperimentConfig()
    assert type(cfg.train) is TrainConfig
    assert cfg.train == TrainConfig()  # one set of defaults: the learning rate is 0.05 in both
    assert TrainConfig().lr == 0.05


def test_the_sim_section_builds_the_simulators_settings() -> None:
    cfg = load_config(overrides=["sim.max_rounds=7", "sim.eval_every_rounds=3", "sim.targets=[0.5, 0.8]",
                                 "sim.accounting=reference", "sim.sparse_efficiency=0.5", "sim.max_time=99"])
    built = cfg.sim.settings()
    assert built == SimSettings(eval_every_rounds=3, max_time=99.0, sparse_efficiency=0.5, accounting="reference",
                                checkpoint_every_rounds=50, target_accuracies=(0.5, 0.8))
    assert cfg.sim.settings(checkpoints=False).checkpoint_every_rounds is None


@pytest.mark.parametrize("name", ["max_time", "eval_every_rounds", "eval_every_seconds", "compute_time",
                                  "sparse_efficiency", "shared_server_link", "accounting"])
def test_a_shared_sim_field_has_one_definition(name: str) -> None:
    ours, theirs = SimConfig.model_fields[name], SimSettings.model_fields[name]
    assert (ours.default, ours.description, ours.metadata) == (theirs.default, theirs.description, theirs.metadata)


BAD: list[tuple[str, str, Callable[[], Any]]] = [
    ("sim.sparse_efficiency=2", "sim.sparse_efficiency", lambda: SimSettings(sparse_efficiency=2)),
    ("sim.eval_every_rounds=0", "sim.eval_every_rounds", lambda: SimSettings(eval_every_rounds=0)),
    ("sim.accounting=fair", "honest, reference", lambda: SimSettings(accounting="fair")),
    ("train.lr=0", "train.lr", lambda: TrainConfig(lr=0)),
    ("train.local_steps=null", "local_steps or local_epochs", lambda: TrainConfig(local_steps=None)),
]


@pytest.mark.parametrize("override, named, direct", BAD, ids=[b[0] for b in BAD])
def test_a_bad_value_is_named_in_the_config_and_refused_when_built_directly(override: str, named: str,
                                                                             direct: Callable[[], Any]) -> None:
    with pytest.raises(ConfigError, match=named):
        load_config(overrides=[override])
    with pytest.raises(ValueError, match=named.rpartition(".")[2]):
        direct()
