"""The record a client returns after a local training task."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TaskResult:
    """Outcome of one local training task.

    ``weights`` is the client's new flat parameter vector (all parameters, prunable ones first,
    see :mod:`prfl.params`); outside the task's mask its prunable entries are exactly zero.
    ``grad_sq`` is the squared gradient of the last local step over the prunable weights times
    the client's sample count (PR-FL's importance statistic), or None when not requested.
    """

    task_id: int
    client: int
    version: int
    weights: torch.Tensor
    num_samples: int
    mean_loss: float
    steps: int
    compute_seconds: float
    grad_sq: torch.Tensor | None = None
    density: float = 1.0
    width: float = 1.0

    def delta(self, start: torch.Tensor) -> torch.Tensor:
        """The update ``weights - start`` against the weights the task started from."""
        return self.weights - start
