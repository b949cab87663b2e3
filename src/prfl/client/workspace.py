"""A worker's workspace: the model, layout and trainer it builds once, and the jobs it trains.

Neutral ground for every place local training runs: the simulator's executors
(:mod:`prfl.sim.executors`) and the Flower ClientApp (:mod:`prfl.flower.client_app`) both train
a :class:`TrainJob` in a :class:`Workspace` built from a :class:`WorkerSpec`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from prfl import masks
from prfl.allocator import tune_allocator
from prfl.client.trainer import LocalTrainer, TrainConfig, TrainOutput

@dataclass(frozen=True)
class WorkerSpec:
    """How a worker builds its trainer: data set, model and optimiser settings."""

    dataset: str
    model: str
    train: TrainConfig
    dataset_options: dict[str, Any] = field(default_factory=dict)
    model_options: dict[str, Any] = field(default_factory=dict)
    data_dir: str | None = None
    threads: int = 1  # torch threads per task: the float results depend on it, keep it equal across executors
    compile: bool = False  # torch.compile the training step where possible (see prfl.client.trainer.CompiledForward)


@dataclass(frozen=True)
class TrainJob:
    """One local task, self-contained."""

    task_id: int
    client: int
    weights: torch.Tensor
    indices: np.ndarray
    seed: int
    mask: torch.Tensor | None = None
    want_importance: bool = False
    width: float = 1.0  # < 1: train the width-sliced sub-network (HeteroFL)
    packed: bool = False  # weights hold only the values at the mask (ascending) then the suffix

    def pack(self) -> TrainJob:
        """The same job carrying only what training reads: W at the mask and the suffix.

        Training starts from W ⊙ m, so the values outside the mask are never used; a job of
        density rho then holds rho N + suffix values instead of the whole vector."""
        if self.mask is None or self.packed:
            return self
        npr = int(self.mask.numel())
        pos = masks.positions(self.mask)
        values = torch.empty(pos.numel() + self.weights.numel() - npr, dtype=self.weights.dtype)
        torch.index_select(self.weights[:npr], 0, pos, out=values[: pos.numel()])
        values[pos.numel():] = self.weights[npr:]
        return dataclasses.replace(self, weights=values, packed=True)

    def unpacked_weights(self, total: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """The start weights as a full vector (zeros outside the mask for a packed job), written
        into ``out`` when given and the job is packed."""
        if not self.packed:
            return self.weights
        assert self.mask is not None
        npr = int(self.mask.numel())
        count = self.weights.numel() - (total - npr)
        if count < 0 or count != masks.count(self.mask):
            raise ValueError(f"packed job {self.task_id}: {self.weights.numel()} values do not fit its mask and suffix")
        if out is None:
            out = torch.empty(total, dtype=self.weights.dtype)
        masks.scatter_into(out[:npr], self.mask, self.weights[:count])
        out[npr:] = self.weights[count:]
        return out


class Workspace:
    """A worker's model, layout and trainer, built once from a :class:`WorkerSpec`."""

    def __init__(self, spec: WorkerSpec, dataset: Any | None = None) -> None:
        from prfl.data import load_dataset

        tune_allocator()
        torch.set_num_threads(max(1, spec.threads))
        ds = dataset if dataset is not None else load_dataset(spec.dataset, spec.data_dir, **spec.dataset_options)
        self.dataset = ds
        self.spec = spec
        self._trainers: dict[float, LocalTrainer] = {}
        self.trainer = self.trainer_for(1.0)
        self.layout = self.trainer.layout
        # The last job's tensors stay referenced until the next job: jobs of one model version
        # share one shared-memory copy, which the next job then finds mapped already.
        self._recent: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def trainer_for(self, width: float) -> LocalTrainer:
        """The trainer of the model at ``width`` (1: the full model), built on first use."""
        from prfl.models import build_model
        from prfl.params import ParamLayout

        trainer = self._trainers.get(width)
        if trainer is None:
            options = dict(self.spec.model_options)
            if width != 1.0:
                options["width_mult"] = width * options.get("width_mult", 1.0)
            ds = self.dataset
            model = build_model(self.spec.model, ds.input_shape, ds.num_classes, **options)
            trainer = LocalTrainer(model, ParamLayout(model), ds.x_train, ds.y_train, self.spec.train, compile=self.spec.compile)
            self._trainers[width] = trainer
        return trainer

    def run(self, job: TrainJob, out: torch.Tensor | None = None) -> TrainOutput:
        """Train ``job``; the new weights go into ``out`` when given (see :meth:`LocalTrainer.train`)."""
        trainer = self.trainer_for(job.width)
        if job.packed and out is None:  # unpack straight into the vector the task trains in
            out = torch.empty(trainer.layout.total, dtype=torch.float32)
        weights = job.unpacked_weights(trainer.layout.total, out=out)
        self._recent = (job.weights, job.mask)
        return trainer.train(weights, job.indices, job.seed, mask=job.mask, want_importance=job.want_importance, out=out)
