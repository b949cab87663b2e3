"""The trainer's and the simulator's settings, each field defined (default, bounds, meaning) once.

:class:`TrainConfig` is both the experiment config's ``train`` section and what the local trainer
takes; :class:`SimSettings` is what the simulator takes, and the config's ``sim`` section reuses
its fields and builds it (:meth:`prfl.config.SimConfig.settings`) without validating them again.
Both are frozen pydantic models: a bad value raises a ``ValueError`` naming the field. This
module imports neither torch nor the simulator, so the config can use it cheaply.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Accounting = Literal["honest", "reference"]
ACCOUNTING_MODES: tuple[str, ...] = ("honest", "reference")


def check_accounting(mode: str) -> str:
    """``mode`` if it is an accounting mode, else a ValueError naming the valid ones."""
    if mode not in ACCOUNTING_MODES:
        raise ValueError(f"accounting must be one of {', '.join(ACCOUNTING_MODES)}, got {mode!r}")
    return mode


class _Settings(BaseModel):
    # NaN and inf are refused everywhere: no setting of prfl means "infinitely many" (use null)
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class TrainConfig(_Settings):
    """Local training: SGD with optional momentum and weight decay on mini-batches.

    Give either ``local_steps`` (mini-batch steps per task) or ``local_epochs`` (passes over the
    client's samples); steps take precedence when both are set. (The PR-FL paper trains with lr
    0.25, batch 20 and 5 local steps; prfl's default learning rate is 0.05.)
    """

    lr: float = Field(0.05, gt=0, description="learning rate of local SGD")
    momentum: float = Field(0.0, ge=0, lt=1, description="SGD momentum (0: plain SGD)")
    weight_decay: float = Field(0.0, ge=0, description="L2 weight decay of local SGD")
    batch_size: int = Field(20, ge=1, description="samples per local step")
    local_steps: int | None = Field(5, ge=1, description="local SGD steps per task (null: use local_epochs)")
    local_epochs: float | None = Field(None, gt=0, description="local epochs per task, used when local_steps is null")
    loss: Literal["ce", "bce"] = Field("ce", description="training loss: ce (cross-entropy) or bce (binary, multi-label)")

    @model_validator(mode="after")
    def _steps_or_epochs(self) -> TrainConfig:
        if self.local_steps is None and self.local_epochs is None:
            raise ValueError("set local_steps or local_epochs")
        return self

    def num_steps(self, num_samples: int) -> int:
        """Mini-batch steps one task takes on ``num_samples`` samples."""
        if self.local_steps is not None:
            return self.local_steps
        assert self.local_epochs is not None
        return max(1, math.ceil(self.local_epochs * math.ceil(num_samples / self.batch_size)))


class SimSettings(_Settings):
    """How the simulator models time, and when it evaluates and checkpoints."""

    eval_every_rounds: int | None = Field(10, ge=1, description="evaluate every N server updates (null: not by rounds)")
    eval_every_seconds: float | None = Field(None, gt=0, description="evaluate every N virtual seconds (null: not by time)")
    max_time: float | None = Field(None, gt=0, description="stop at this virtual time, in seconds (null: no time limit)")
    compute_time: Literal["flops", "measured"] = Field(
        "flops", description="task compute time: flops (model FLOPs / device speed) or measured (wall time here)")
    sparse_efficiency: float = Field(
        1.0, ge=0, le=1, description="how much of a sub-model's sparsity turns into saved compute (1: all, 0: none)")
    shared_server_link: bool = Field(True, description="the server's links are shared by concurrent transfers (max-min fair)")
    piece_relay: bool = Field(
        True, description="pieces already published for a model version reach later clients from a relay at the "
        "client's speed; false: every downloaded byte crosses the server's shared link (as on Flower; honest "
        "accounting only)")
    model_relay: bool = Field(
        True, description="the relay publishes every policy's models once per model version, not only PR-FL's "
        "residual pieces: a later client of the same version and sub-model (density, width) fetches it from the "
        "relay at its own speed (false: only PR-FL's pieces are relayed, as before this option; no effect with "
        "piece_relay false or the reference accounting, which broadcasts each step's models once by itself)")
    checkpoint_every_rounds: int | None = Field(
        None, ge=1, description="server updates between checkpoints of the run (null: no checkpoints)")
    target_accuracies: tuple[float, ...] = Field((), description="accuracies for time-to-accuracy")
    accounting: Accounting = Field(
        "honest",
        description="what tasks cost: honest (every byte, fully asynchronous FedAsync) or reference "
                    "(the PR-FL reference code's cost model; see README)",
    )

    @field_validator("accounting", mode="before")
    @classmethod
    def _known_accounting(cls, v: object) -> object:
        return check_accounting(v) if isinstance(v, str) else v

    @model_validator(mode="after")
    def _relay_is_honest(self) -> SimSettings:
        if self.accounting == "reference" and not self.piece_relay:
            raise ValueError("piece_relay: false describes where honest downloads come from; the reference "
                             "accounting has its own download model: use accounting 'honest' or piece_relay true")
        return self
