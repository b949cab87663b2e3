"""Synthetic(alpha, beta): the LEAF/FedProx generator of heterogeneous per-device logistic models.

``alpha`` controls how much the devices' models differ, ``beta`` how much their input
distributions differ. Everything is drawn from one ``np.random.default_rng(seed)``.
"""

from __future__ import annotations

import os

import numpy as np

from .base import Dataset

TRAIN_FRACTION = 0.8


def load_synthetic(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    alpha: float = 1.0,
    beta: float = 1.0,
    num_groups: int = 30,
    dim: int = 60,
    num_classes: int = 10,
    seed: int = 0,
    iid: bool = False,
) -> Dataset:
    """Generate the data set; ``data_dir`` is unused (nothing is read from disk).

    Device k draws n_k = floor(lognormal(4, 2)) + 50 samples, u_k ~ N(0, alpha),
    B_k ~ N(0, beta), v_k ~ N(B_k, 1) per dimension, x ~ N(v_k, diag(j^-1.2)),
    W_k, b_k ~ N(u_k, 1) and y = argmax(softmax(W_k x + b_k)). With ``iid=True`` every
    device shares v = 0 and one global (W, b) drawn from N(0, 1). The first 80% of each
    device's samples are its training data, the rest its test data.
    """
    del data_dir
    if alpha < 0 or beta < 0:
        raise ValueError(f"alpha and beta must be >= 0, got {alpha} and {beta}")
    if num_groups < 1 or dim < 1 or num_classes < 2:
        raise ValueError("need num_groups >= 1, dim >= 1 and num_classes >= 2")
    rng = np.random.default_rng(seed)
    counts = rng.lognormal(4.0, 2.0, num_groups).astype(np.int64) + 50
    u = rng.normal(0.0, alpha, num_groups)
    b_shift = rng.normal(0.0, beta, num_groups)
    std_x = np.power(np.arange(1, dim + 1, dtype=np.float64), -1.2 / 2.0)
    if iid:
        w_global = rng.normal(0.0, 1.0, (dim, num_classes))
        b_global = rng.normal(0.0, 1.0, num_classes)

    xs_tr, ys_tr, gs_tr, xs_te, ys_te = [], [], [], [], []
    for k in range(num_groups):
        if iid:
            mean_x = np.zeros(dim)
            w, b = w_global, b_global
        else:
            mean_x = rng.normal(b_shift[k], 1.0, dim)
            w = rng.normal(u[k], 1.0, (dim, num_classes))
            b = rng.normal(u[k], 1.0, num_classes)
        n = int(counts[k])
        x = mean_x + std_x * rng.standard_normal((n, dim))
        # softmax is monotone, so its argmax is the argmax of the logits.
        y = np.argmax(x @ w + b, axis=1).astype(np.int64)
        n_train = int(TRAIN_FRACTION * n)
        xs_tr.append(x[:n_train])
        ys_tr.append(y[:n_train])
        gs_tr.append(np.full(n_train, k, dtype=np.int64))
        xs_te.append(x[n_train:])
        ys_te.append(y[n_train:])

    return Dataset(
        name="synthetic",
        x_train=np.concatenate(xs_tr).astype(np.float32),
        y_train=np.concatenate(ys_tr),
        x_test=np.concatenate(xs_te).astype(np.float32),
        y_test=np.concatenate(ys_te),
        num_classes=num_classes,
        input_shape=(dim,),
        kind="tabular",
        groups_train=np.concatenate(gs_tr),
        group_names=[f"device-{k}" for k in range(num_groups)],
    )
