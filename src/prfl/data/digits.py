"""scikit-learn's 8x8 handwritten digits, a small image set that ships with the library."""

from __future__ import annotations

import os

import numpy as np

from .base import DataError, Dataset

TEST_FRACTION = 0.2


def load_digits(data_dir: str | os.PathLike[str] | None = None, *, seed: int = 0) -> Dataset:
    """Load sklearn ``load_digits`` as (1, 8, 8) float32 images in [0, 1].

    The 80/20 train/test split is stratified by class and fixed by ``seed`` so that runs
    are comparable. ``data_dir`` is unused: the data ship with scikit-learn.
    """
    del data_dir
    try:
        from sklearn.datasets import load_digits as sk_load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:  # pragma: no cover - scikit-learn is a dependency
        raise DataError(
            "digits: expected scikit-learn's bundled digits data; scikit-learn is not "
            "importable (looked in the current Python environment). Install it with "
            "`pip install scikit-learn`."
        ) from exc
    bunch = sk_load_digits()
    x = (np.asarray(bunch.images, dtype=np.float32) / 16.0).reshape(-1, 1, 8, 8)
    y = np.asarray(bunch.target, dtype=np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=TEST_FRACTION, random_state=seed, stratify=y
    )
    return Dataset(
        name="digits",
        x_train=np.ascontiguousarray(x_train),
        y_train=np.ascontiguousarray(y_train),
        x_test=np.ascontiguousarray(x_test),
        y_test=np.ascontiguousarray(y_test),
        num_classes=10,
        input_shape=(1, 8, 8),
        kind="image",
    )
