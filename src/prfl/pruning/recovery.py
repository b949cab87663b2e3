"""Early-stopping monitor that drives recovery of pruned weights.

The monitor sees a score every ``I`` server rounds. When the score has not improved on its best
for ``patience`` consecutive checks, it *fires*: PR-FL rolls back to the best checkpoint and
raises the minimum densities by ``delta_rho``. Once every density is 1, patience is multiplied by
``final_patience_factor`` (8, as the reference runs it) and the next firing ends training.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class EarlyStopping:
    """Best-score tracker with patience (higher scores are better)."""

    patience: int = 10
    min_delta: float = 0.0
    best: float = float("-inf")
    best_round: int = -1
    bad_checks: int = 0

    def __post_init__(self) -> None:
        if self.patience < 1:
            raise ValueError(f"patience must be at least 1, got {self.patience}")

    def check(self, score: float, round_: int) -> tuple[bool, bool]:
        """Feed a score; returns (improved, fired). Firing resets the count of bad checks."""
        if score > self.best + self.min_delta:
            self.best, self.best_round, self.bad_checks = float(score), int(round_), 0
            return True, False
        self.bad_checks += 1
        if self.bad_checks >= self.patience:
            self.bad_checks = 0
            return False, True
        return False, False

    def state_dict(self) -> dict[str, Any]:
        return {"patience": self.patience, "best": self.best, "best_round": self.best_round, "bad_checks": self.bad_checks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.patience = int(state["patience"])
        self.best = float(state["best"])
        self.best_round = int(state["best_round"])
        self.bad_checks = int(state["bad_checks"])
