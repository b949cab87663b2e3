"""Synthetic(alpha, beta): determinism, group structure and heterogeneity."""

from __future__ import annotations

import numpy as np
import pytest

from prfl.data import load_dataset


def test_same_seed_same_data_other_seed_other_data() -> None:
    a = load_dataset("synthetic", seed=3)
    b = load_dataset("synthetic", seed=3)
    c = load_dataset("synthetic", seed=4)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    np.testing.assert_array_equal(a.y_test, b.y_test)
    np.testing.assert_array_equal(a.groups_train, b.groups_train)
    assert a.num_train != c.num_train or not np.array_equal(a.x_train, c.x_train)


@pytest.mark.parametrize("num_groups", [1, 5, 30])
def test_group_count_shapes_and_split(num_groups: int) -> None:
    ds = load_dataset("synthetic", num_groups=num_groups, dim=12, num_classes=4)
    assert ds.kind == "tabular" and ds.input_shape == (12,) and ds.num_classes == 4
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int64
    assert ds.num_groups == num_groups and ds.group_names[0] == "device-0"
    per_group = np.bincount(ds.groups_train, minlength=num_groups)
    assert per_group.min() >= int(0.8 * 50)  # every device has at least 50 samples
    total = ds.num_train + ds.num_test
    assert abs(ds.num_train / total - 0.8) < 0.02


def test_devices_differ_more_with_larger_beta() -> None:
    """beta shifts each device's input mean; device means spread further apart with it."""

    def spread(beta: float) -> float:
        ds = load_dataset("synthetic", alpha=0.0, beta=beta, num_groups=20, seed=1)
        means = np.stack([ds.x_train[ds.groups_train == g].mean(axis=0) for g in range(20)])
        return float(means.std(axis=0).mean())

    assert spread(5.0) > 2 * spread(0.0)


def test_iid_devices_share_one_model() -> None:
    ds = load_dataset("synthetic", iid=True, num_groups=10, seed=2)
    means = np.stack([ds.x_train[ds.groups_train == g].mean(axis=0) for g in range(10)])
    assert np.abs(means).max() < 1.0
    ds_niid = load_dataset("synthetic", iid=False, num_groups=10, seed=2)
    assert ds.num_train == ds_niid.num_train  # same lognormal draw of device sizes


def test_labels_come_from_a_linear_model_per_device() -> None:
    """Within one device the labels are linearly separable (argmax of an affine map)."""
    from sklearn.linear_model import LogisticRegression

    ds = load_dataset("synthetic", num_groups=3, seed=0)
    for g in range(3):
        rows = ds.groups_train == g
        if len(np.unique(ds.y_train[rows])) < 2:
            continue
        clf = LogisticRegression(C=1e4, max_iter=5000).fit(ds.x_train[rows], ds.y_train[rows])
        assert clf.score(ds.x_train[rows], ds.y_train[rows]) > 0.9
