"""Partitions: exact cover, determinism, label skew, shard class limits, natural groups, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prfl.data import Dataset, Partition, PartitionError, load_dataset, partition_dataset


def make_dataset(labels: np.ndarray, num_classes: int = 10, groups: np.ndarray | None = None) -> Dataset:
    """A tabular data set with the given labels and 2 dummy features."""
    labels = np.asarray(labels, dtype=np.int64)
    n = labels.shape[0]
    return Dataset(
        name="toy",
        x_train=np.zeros((n, 2), np.float32),
        y_train=labels,
        x_test=np.zeros((0, 2), np.float32),
        y_test=np.zeros(0, np.int64),
        num_classes=num_classes,
        input_shape=(2,),
        kind="tabular",
        groups_train=None if groups is None else np.asarray(groups, dtype=np.int64),
        group_names=None if groups is None else [f"g{i}" for i in range(int(np.max(groups)) + 1)],
    )


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_dataset("digits")


def assert_exact_cover(part: Partition, n: int) -> None:
    joined = np.concatenate(part.client_indices)
    assert joined.size == n
    np.testing.assert_array_equal(np.sort(joined), np.arange(n))
    for ix in part.client_indices:
        assert ix.dtype == np.int64
        assert np.all(np.diff(ix) > 0)  # sorted, no duplicates


SCHEME_OPTIONS = [
    ("iid", {}),
    ("dirichlet", {"alpha": 0.3}),
    ("shards", {"classes_per_client": 2}),
]


@pytest.mark.parametrize(("scheme", "options"), SCHEME_OPTIONS)
def test_cover_and_determinism(digits: Dataset, scheme: str, options: dict) -> None:
    a = partition_dataset(digits, scheme, 20, seed=7, **options)
    b = partition_dataset(digits, scheme, 20, seed=7, **options)
    c = partition_dataset(digits, scheme, 20, seed=8, **options)
    assert_exact_cover(a, digits.num_train)
    assert a.scheme == scheme and a.num_clients == 20
    for x, y in zip(a.client_indices, b.client_indices):
        np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(x, y) for x, y in zip(a.client_indices, c.client_indices))
    np.testing.assert_array_equal(a.labels, digits.y_train)


def test_iid_sizes_are_floor_or_ceil(digits: Dataset) -> None:
    part = partition_dataset(digits, "iid", 13)
    n = digits.num_train
    assert set(part.sizes().tolist()) <= {n // 13, -(-n // 13)}


def _mean_max_share(part: Partition) -> float:
    hist = part.label_histogram().astype(float)
    return float((hist.max(axis=1) / hist.sum(axis=1)).mean())


def test_dirichlet_small_alpha_is_skewed(digits: Dataset) -> None:
    skewed = partition_dataset(digits, "dirichlet", 10, alpha=0.1, min_samples=5)
    balanced = partition_dataset(digits, "dirichlet", 10, alpha=100.0)
    assert _mean_max_share(skewed) > 0.4
    assert _mean_max_share(balanced) < 0.2
    assert _mean_max_share(skewed) > 2 * _mean_max_share(balanced)


def test_dirichlet_min_samples_holds(digits: Dataset) -> None:
    part = partition_dataset(digits, "dirichlet", 30, alpha=0.2, min_samples=20)
    assert part.sizes().min() >= 20


def test_dirichlet_gives_up_with_a_clear_error(digits: Dataset) -> None:
    with pytest.raises(PartitionError, match="no draw in 3 attempts"):
        partition_dataset(digits, "dirichlet", 100, alpha=0.001, min_samples=14, max_attempts=3)


def test_shards_limit_classes_per_client(digits: Dataset) -> None:
    for k in (1, 2, 3):
        part = partition_dataset(digits, "shards", 25, classes_per_client=k)
        classes_seen = (part.label_histogram() > 0).sum(axis=1)
        assert classes_seen.max() <= k
        assert_exact_cover(part, digits.num_train)
    sizes = partition_dataset(digits, "shards", 25, classes_per_client=2).sizes()
    assert sizes.max() - sizes.min() <= 0.25 * sizes.mean()


def test_shards_with_fewer_shards_than_classes_still_cover() -> None:
    ds = make_dataset(np.repeat(np.arange(10), 5))
    part = partition_dataset(ds, "shards", 2, classes_per_client=2)
    assert_exact_cover(part, 50)


def test_natural_keeps_groups_whole_and_balances() -> None:
    rng = np.random.default_rng(0)
    counts = rng.integers(5, 40, size=50)
    groups = np.repeat(np.arange(50), counts)
    perm = rng.permutation(groups.size)  # group members need not be contiguous
    ds = make_dataset(rng.integers(0, 10, groups.size), groups=groups[perm])
    part = partition_dataset(ds, "natural", 8)
    assert_exact_cover(part, groups.size)
    owner = {}
    for c, ix in enumerate(part.client_indices):
        for g in np.unique(ds.groups_train[ix]):
            assert g not in owner, "a group was split across clients"
            owner[int(g)] = c
    # Consecutive groups: client ids are non-decreasing in group id.
    assert [owner[g] for g in range(50)] == sorted(owner[g] for g in range(50))
    sizes = part.sizes()
    assert sizes.max() < 2 * sizes.mean()


def test_natural_one_group_per_client_when_counts_match() -> None:
    groups = np.array([0, 0, 1, 2, 2, 2])
    part = partition_dataset(make_dataset(np.zeros(6), groups=groups), "natural", 3)
    assert [ix.tolist() for ix in part.client_indices] == [[0, 1], [2], [3, 4, 5]]


@pytest.mark.parametrize(
    ("scheme", "num_clients", "options", "pattern"),
    [
        ("iid", 0, {}, "positive integer"),
        ("iid", 1000, {}, "only 20 training samples"),
        ("dirichlet", 2, {"alpha": 0.0}, "alpha > 0"),
        ("dirichlet", 2, {"alpha": -1.0}, "alpha > 0"),
        ("dirichlet", 3, {"min_samples": 10}, "needs 30 samples"),
        ("shards", 5, {"classes_per_client": 5}, "more than the 20"),
        ("shards", 2, {"classes_per_client": 0}, "classes_per_client >= 1"),
        ("natural", 2, {}, "has none"),
        ("stripes", 2, {}, "unknown partition scheme"),
        ("iid", 2, {"alpha": 0.5}, "unknown option"),
    ],
)
def test_impossible_requests(scheme: str, num_clients: int, options: dict, pattern: str) -> None:
    ds = make_dataset(np.arange(20) % 4, num_classes=4)
    with pytest.raises(PartitionError, match=pattern):
        partition_dataset(ds, scheme, num_clients, **options)


def test_natural_with_too_few_groups() -> None:
    ds = make_dataset(np.zeros(10), groups=np.repeat([0, 1], 5))
    with pytest.raises(PartitionError, match="2 groups, fewer than the 3 clients"):
        partition_dataset(ds, "natural", 3)


def test_partition_error_is_a_value_error() -> None:
    assert issubclass(PartitionError, ValueError)


def test_histogram_and_table(digits: Dataset) -> None:
    part = partition_dataset(digits, "shards", 5, classes_per_client=2)
    hist = part.label_histogram()
    assert hist.shape == (5, 10)
    np.testing.assert_array_equal(hist.sum(axis=0), np.bincount(digits.y_train, minlength=10))
    np.testing.assert_array_equal(hist.sum(axis=1), part.sizes())
    table = part.format_histogram()
    lines = table.splitlines()
    assert "5 clients" in lines[0] and lines[1].split()[:2] == ["client", "size"]
    assert lines[-1].split()[:2] == ["total", str(digits.num_train)]
    assert len(lines) == 5 + 5


def test_save_load_round_trip(digits: Dataset, tmp_path: Path) -> None:
    part = partition_dataset(digits, "dirichlet", 7, seed=3, alpha=0.5)
    path = tmp_path / "sub" / "part.json"
    part.save(path)
    doc = json.loads(path.read_text())
    assert doc["scheme"] == "dirichlet" and doc["params"]["alpha"] == 0.5 and doc["params"]["seed"] == 3
    assert doc["label_histogram"] == part.label_histogram().tolist()
    back = Partition.load(path)
    assert back.scheme == part.scheme and back.num_classes == part.num_classes
    for x, y in zip(back.client_indices, part.client_indices):
        np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(back.label_histogram(), part.label_histogram())


def test_load_detects_tampering(digits: Dataset, tmp_path: Path) -> None:
    part = partition_dataset(digits, "iid", 3)
    path = tmp_path / "part.json"
    part.save(path)
    doc = json.loads(path.read_text())
    doc["client_indices"][0] = doc["client_indices"][0][:-1]
    path.write_text(json.dumps(doc))
    with pytest.raises(PartitionError, match="histogram does not match"):
        Partition.load(path)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 400),
    num_clients=st.integers(1, 30),
    num_classes=st.integers(1, 8),
    seed=st.integers(0, 2**32 - 1),
)
def test_iid_cover_property(n: int, num_clients: int, num_classes: int, seed: int) -> None:
    labels = np.random.default_rng(seed).integers(0, num_classes, n)
    ds = make_dataset(labels, num_classes=num_classes)
    if num_clients > n:
        with pytest.raises(PartitionError):
            partition_dataset(ds, "iid", num_clients, seed=seed)
        return
    part = partition_dataset(ds, "iid", num_clients, seed=seed)
    assert_exact_cover(part, n)
    assert part.sizes().max() - part.sizes().min() <= 1


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(20, 400),
    num_clients=st.integers(1, 10),
    alpha=st.floats(0.05, 50.0),
    min_samples=st.integers(0, 2),
    seed=st.integers(0, 2**32 - 1),
)
def test_dirichlet_cover_property(n: int, num_clients: int, alpha: float, min_samples: int, seed: int) -> None:
    labels = np.random.default_rng(seed).integers(0, 5, n)
    ds = make_dataset(labels, num_classes=5)
    try:
        part = partition_dataset(ds, "dirichlet", num_clients, seed=seed, alpha=alpha, min_samples=min_samples)
    except PartitionError as exc:
        assert "attempts" in str(exc)
        return
    assert_exact_cover(part, n)
    assert part.sizes().min() >= min_samples


@settings(max_examples=60, deadline=None)
@given(
    counts=st.lists(st.integers(1, 30), min_size=1, max_size=40),
    num_clients=st.integers(1, 40),
    shuffle=st.booleans(),
)
def test_natural_cover_property(counts: list[int], num_clients: int, shuffle: bool) -> None:
    groups = np.repeat(np.arange(len(counts)), counts)
    ds = make_dataset(np.zeros(groups.size), groups=groups)
    if num_clients > len(counts):
        with pytest.raises(PartitionError):
            partition_dataset(ds, "natural", num_clients)
        return
    part = partition_dataset(ds, "natural", num_clients, shuffle_groups=shuffle)
    assert_exact_cover(part, groups.size)
    assert all(len(np.unique(groups[ix])) >= 1 for ix in part.client_indices)
    for g in range(len(counts)):
        assert sum(bool(np.any(groups[ix] == g)) for ix in part.client_indices) == 1


@settings(max_examples=40, deadline=None)
@given(
    class_sizes=st.lists(st.integers(1, 40), min_size=1, max_size=10),
    num_clients=st.integers(1, 20),
    k=st.integers(1, 4),
    seed=st.integers(0, 1000),
)
def test_shards_cover_property(class_sizes: list[int], num_clients: int, k: int, seed: int) -> None:
    labels = np.repeat(np.arange(len(class_sizes)), class_sizes)
    ds = make_dataset(labels, num_classes=len(class_sizes))
    if num_clients * k > labels.size:
        with pytest.raises(PartitionError):
            partition_dataset(ds, "shards", num_clients, seed=seed, classes_per_client=k)
        return
    part = partition_dataset(ds, "shards", num_clients, seed=seed, classes_per_client=k)
    assert_exact_cover(part, labels.size)
    assert part.sizes().min() >= 1
    if num_clients * k >= len(class_sizes):
        assert (part.label_histogram() > 0).sum(axis=1).max() <= k


def test_save_accepts_numpy_parameters_and_load_rejects_bad_indices(digits: Dataset, tmp_path: Path) -> None:
    part = partition_dataset(digits, "shards", np.int64(4), seed=np.int64(2), classes_per_client=np.int64(2))
    path = tmp_path / "part.json"
    part.save(path)
    assert Partition.load(path).params["classes_per_client"] == 2
    doc = json.loads(path.read_text())
    doc["client_indices"][0].append(10**9)
    path.write_text(json.dumps(doc))
    with pytest.raises(PartitionError, match="cannot read partition file"):
        Partition.load(path)
