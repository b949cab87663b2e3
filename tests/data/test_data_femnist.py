"""FEMNIST LEAF shards: writers kept as groups, ordering, validation and natural partitions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from data_file_writers import write_femnist

from prfl.data import DataError, load_dataset, partition_dataset


def _shard_records(root: Path, split: str) -> list[tuple[str, list, list]]:
    out = []
    for path in sorted((root / split).glob("*.json")):
        doc = json.loads(path.read_text())
        out.extend((u, doc["user_data"][u]["x"], doc["user_data"][u]["y"]) for u in doc["users"])
    return out


def test_femnist_keeps_writers_in_first_appearance_order(tmp_path: Path) -> None:
    write_femnist(tmp_path)
    ds = load_dataset("femnist", data_dir=tmp_path)
    # Sorted shard names: shard 0 lists f0003 then f0001, shard 1 adds f0002.
    assert ds.group_names == ["f0003", "f0001", "f0002"]
    assert ds.num_classes == 62 and ds.input_shape == (1, 28, 28) and ds.kind == "image"
    assert ds.num_train == 4 + 3 + 5 + 2 and ds.num_test == 4
    sizes = np.bincount(ds.groups_train, minlength=3)
    np.testing.assert_array_equal(sizes, [4, 5, 5])  # f0001 merges its two shards


def test_femnist_pixels_and_labels_follow_their_writer(tmp_path: Path) -> None:
    write_femnist(tmp_path)
    ds = load_dataset("femnist", data_dir=tmp_path)
    records = _shard_records(tmp_path, "train")
    offset = 0
    for user, x, y in records:
        n = len(y)
        np.testing.assert_allclose(ds.x_train[offset : offset + n].reshape(n, 784), np.asarray(x, np.float32))
        np.testing.assert_array_equal(ds.y_train[offset : offset + n], y)
        assert {ds.group_names[g] for g in ds.groups_train[offset : offset + n]} == {user}
        offset += n
    assert ds.x_train.dtype == np.float32 and 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0


def test_femnist_natural_partition_keeps_writers_whole(tmp_path: Path) -> None:
    write_femnist(tmp_path)
    ds = load_dataset("femnist", data_dir=tmp_path)
    part = partition_dataset(ds, "natural", 2)
    owners = [set(ds.groups_train[ix].tolist()) for ix in part.client_indices]
    # Consecutive writers, roughly equal sample counts: {f0003} (4) then {f0001, f0002} (10)
    # or {f0003, f0001} (9) then {f0002} (5); the second is closer to 7/7.
    assert owners == [{0, 1}, {2}]
    three = partition_dataset(ds, "natural", 3)
    assert [set(ds.groups_train[ix].tolist()) for ix in three.client_indices] == [{0}, {1}, {2}]


@pytest.mark.parametrize("layout", ["femnist", "data", "femnist/data"])
def test_femnist_leaf_layouts_are_found(tmp_path: Path, layout: str) -> None:
    write_femnist(tmp_path / layout)
    assert load_dataset("femnist", data_dir=tmp_path).num_groups == 3


def test_femnist_absent(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        load_dataset("femnist", data_dir=tmp_path)
    msg = str(info.value)
    assert "train/*.json" in msg and str(tmp_path / "femnist") in msg and "LEAF" in msg


def _corrupt(root: Path, mutate) -> None:  # noqa: ANN001 - test helper
    path = root / "train" / "all_data_1_niid_train.json"
    doc = json.loads(path.read_text())
    mutate(doc)
    path.write_text(json.dumps(doc))


def test_femnist_num_samples_mismatch_names_file_and_user(tmp_path: Path) -> None:
    write_femnist(tmp_path)
    _corrupt(tmp_path, lambda d: d["num_samples"].__setitem__(0, 9))
    with pytest.raises(DataError, match=r"all_data_1_niid_train\.json, user 'f0002': num_samples says 9"):
        load_dataset("femnist", data_dir=tmp_path)


def test_femnist_short_pixel_row(tmp_path: Path) -> None:
    write_femnist(tmp_path)
    _corrupt(tmp_path, lambda d: d["user_data"]["f0001"].__setitem__("x", [[0.5] * 783] * 2))
    with pytest.raises(DataError, match=r"user 'f0001': x has shape \(2, 783\)"):
        load_dataset("femnist", data_dir=tmp_path)


def test_femnist_label_out_of_range(tmp_path: Path) -> None:
    write_femnist(tmp_path)
    _corrupt(tmp_path, lambda d: d["user_data"]["f0002"]["y"].__setitem__(0, 62))
    with pytest.raises(DataError, match=r"user 'f0002': labels span"):
        load_dataset("femnist", data_dir=tmp_path)


def test_femnist_broken_json(tmp_path: Path) -> None:
    write_femnist(tmp_path)
    (tmp_path / "test" / "all_data_0_niid_test.json").write_text('{"users": [')
    with pytest.raises(DataError, match=r"all_data_0_niid_test\.json is not valid JSON"):
        load_dataset("femnist", data_dir=tmp_path)
