"""The in-memory data set record shared by every loader, and the loaders' error type."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)

KINDS = ("image", "tabular", "sequence")


class DataError(Exception):
    """A data set could not be loaded.

    The message says which files were expected, where they were looked for and how to
    obtain them, so that the user can fix the problem without reading the source.
    """


@dataclass
class Dataset:
    """A fully loaded train/test data set, kept as numpy arrays.

    Images are float32 ``(n, C, H, W)`` in [0, 1] (or standardised per channel when
    loaded with ``normalize=True``), tabular features float32 ``(n, d)``, sequences int64
    token ids ``(n, seq_len)``. Labels are int64 ``(n,)``. ``groups_train`` holds the
    natural owner of each training sample (writer, play/role, synthetic device) so that
    federated partitions can follow it.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    input_shape: tuple[int, ...]
    kind: str
    groups_train: np.ndarray | None = None
    group_names: list[str] | None = None
    vocab: str | None = None

    def __post_init__(self) -> None:
        self.validate()

    @property
    def num_train(self) -> int:
        """Number of training samples."""
        return int(self.y_train.shape[0])

    @property
    def num_test(self) -> int:
        """Number of test samples."""
        return int(self.y_test.shape[0])

    @property
    def num_groups(self) -> int:
        """Number of natural groups (0 when the data set has none)."""
        return 0 if self.group_names is None else len(self.group_names)

    def validate(self) -> None:
        """Check shapes, dtypes and label ranges; a loader bug must not reach training."""
        if self.kind not in KINDS:
            raise ValueError(f"{self.name}: kind must be one of {KINDS}, got {self.kind!r}")
        self.input_shape = tuple(int(d) for d in self.input_shape)
        for split, x, y in (("train", self.x_train, self.y_train), ("test", self.x_test, self.y_test)):
            if x.shape[0] != y.shape[0]:
                raise ValueError(
                    f"{self.name}: {split} has {x.shape[0]} inputs but {y.shape[0]} labels"
                )
            if tuple(x.shape[1:]) != self.input_shape:
                raise ValueError(
                    f"{self.name}: {split} inputs have per-sample shape {tuple(x.shape[1:])}, "
                    f"expected {self.input_shape}"
                )
            if y.dtype != np.int64 or y.ndim != 1:
                raise ValueError(f"{self.name}: {split} labels must be int64 of shape (n,)")
            if y.size and (y.min() < 0 or y.max() >= self.num_classes):
                raise ValueError(
                    f"{self.name}: {split} labels must lie in [0, {self.num_classes}), "
                    f"found [{y.min()}, {y.max()}]"
                )
            expected = np.int64 if self.kind == "sequence" else np.float32
            if x.dtype != expected:
                raise ValueError(
                    f"{self.name}: {split} inputs must be {np.dtype(expected)}, got {x.dtype}"
                )
        if self.groups_train is not None:
            g = self.groups_train
            if g.dtype != np.int64 or g.shape != (self.num_train,):
                raise ValueError(f"{self.name}: groups_train must be int64 of shape (n_train,)")
            if self.group_names is None:
                raise ValueError(f"{self.name}: groups_train given without group_names")
            if g.size and (g.min() < 0 or g.max() >= len(self.group_names)):
                raise ValueError(f"{self.name}: groups_train ids exceed the group_names list")

    def summary(self) -> str:
        """One line describing sizes, for logs."""
        groups = f", {self.num_groups} groups" if self.group_names is not None else ""
        return (
            f"{self.name}: {self.kind} {self.input_shape}, {self.num_classes} classes, "
            f"{self.num_train} train / {self.num_test} test{groups}"
        )


def standardize_images(ds: Dataset) -> Dataset:
    """Standardise image channels in place with the training set's mean and std.

    Statistics come from the training split only, so the test split stays unseen.
    """
    if ds.kind != "image":
        raise ValueError(f"{ds.name}: normalize applies to image data sets only")
    axes = (0, 2, 3)
    mean = ds.x_train.mean(axis=axes, dtype=np.float64).reshape(1, -1, 1, 1)
    std = ds.x_train.std(axis=axes, dtype=np.float64).reshape(1, -1, 1, 1)
    std = np.where(std > 0, std, 1.0)
    ds.x_train = ((ds.x_train - mean) / std).astype(np.float32)
    ds.x_test = ((ds.x_test - mean) / std).astype(np.float32)
    logger.debug("%s: standardised with mean %s std %s", ds.name, mean.ravel(), std.ravel())
    return ds
