"""Shared fixtures: small models and data that need no files; interrupts that clean up.

A test run stopped by SIGTERM (a time limit) or SIGHUP (a closed terminal) is stopped as by
Ctrl-C: the signal raises KeyboardInterrupt, so pytest tears every fixture down and the processes
the tests started (federations, simulations) are ended. A run killed outright (SIGKILL) leaves
that to the reaper of :mod:`prfl.flower.processes`.
"""

from __future__ import annotations

import signal

import pytest
import torch
from torch import nn


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"{signal.Signals(signum).name} received")


def pytest_configure(config: pytest.Config) -> None:
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)


class TinyCNN(nn.Module):
    """A small conv net (conv, linear, biases) for 8x8 single-channel inputs."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc1 = nn.Linear(4 * 4 * 4, 16)
        self.fc2 = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv(x))
        x = nn.functional.max_pool2d(x, 2).flatten(1)
        return self.fc2(torch.relu(self.fc1(x)))


@pytest.fixture
def tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    return TinyCNN()


@pytest.fixture
def digits_xy():
    """scikit-learn's bundled digits as float images in [0, 1] and int64 labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    return x, y
