"""Client side: local training of a (masked) model and evaluation."""

from prfl.client.result import TaskResult
from prfl.client.trainer import LocalTrainer, TrainConfig, TrainOutput, batch_schedule, evaluate

__all__ = ["LocalTrainer", "TaskResult", "TrainConfig", "TrainOutput", "batch_schedule", "evaluate"]
