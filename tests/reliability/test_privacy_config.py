import pytest

from prfl.config import ConfigError, load_config
from prfl.run import build_scenario, run_policy


def test_privacy_section_privatises_the_run_and_reports_epsilon():
    pytest.importorskip("dp_accounting", reason="epsilon needs the privacy extra: pip install 'prfl[privacy]'")
    base = ["data.dataset=digits", "model.name=mlp", "model.options={hidden: [16]}", "sim.max_rounds=10",
            "policy.name=fedasync", "sim.checkpoint_every_rounds=null"]
    noisy = run_policy(build_scenario(load_config(overrides=base + ["privacy={clip_norm: 1.0, noise_multiplier: 1.0}"])))
    clean = run_policy(build_scenario(load_config(overrides=base)))
    assert noisy["privacy"]["epsilon"] > 0 and noisy["privacy"]["noise_multiplier"] == 1.0
    assert "privacy" not in clean or clean["privacy"] is None
    losses = lambda s: [r["train_loss"] for r in s["history"] if r["event"] == "arrival"]  # noqa: E731
    assert losses(noisy)[0] == losses(clean)[0]  # the first task trains the same; its update is then privatised
    assert noisy["final_accuracy"] != clean["final_accuracy"]


def test_bad_privacy_settings_are_named():
    with pytest.raises(ConfigError, match="privacy.clip_norm"):
        load_config(overrides=["privacy={clip_norm: 0, noise_multiplier: 1.0}"])
