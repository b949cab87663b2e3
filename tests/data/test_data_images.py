"""digits, Fashion-MNIST and CIFAR-10 loaders: layout, value ranges, search order and errors."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
from data_file_writers import (
    cifar_batch,
    cifar_members,
    idx_bytes,
    write_cifar_dir,
    write_cifar_tar,
    write_fashion_mnist,
    write_gz,
)

from prfl.data import DATASETS, DataError, load_dataset
from prfl.data import fashion_mnist as fm

# ----------------------------------------------------------------------------- registry


def test_registry_lists_every_dataset() -> None:
    assert set(DATASETS) == {"digits", "fashion-mnist", "cifar10", "femnist", "shakespeare", "synthetic"}


def test_unknown_name_says_what_exists() -> None:
    with pytest.raises(DataError, match="expected one of .*fashion-mnist"):
        load_dataset("mnist-ish")


def test_unknown_option_is_rejected_with_the_accepted_ones() -> None:
    with pytest.raises(TypeError, match="seed"):
        load_dataset("digits", colour=True)


def test_name_spelling_is_normalised() -> None:
    assert load_dataset("Fashion_MNIST").name == "fashion-mnist"


# ----------------------------------------------------------------------------- digits


def test_digits_shapes_range_and_stratified_split() -> None:
    ds = load_dataset("digits")
    assert ds.kind == "image" and ds.input_shape == (1, 8, 8) and ds.num_classes == 10
    assert ds.x_train.shape == (1437, 1, 8, 8) and ds.x_test.shape == (360, 1, 8, 8)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int64
    assert ds.x_train.min() == 0.0 and ds.x_train.max() == 1.0
    # Stratified: every class keeps roughly 20% of its samples in the test split.
    train_counts = np.bincount(ds.y_train, minlength=10)
    test_counts = np.bincount(ds.y_test, minlength=10)
    share = test_counts / (train_counts + test_counts)
    assert np.all(np.abs(share - 0.2) < 0.02)
    assert ds.groups_train is None


def test_digits_split_depends_only_on_seed() -> None:
    a, b = load_dataset("digits"), load_dataset("digits", seed=0)
    c = load_dataset("digits", seed=1)
    np.testing.assert_array_equal(a.x_test, b.x_test)
    assert not np.array_equal(a.y_test, c.y_test)
    # Same pool of images either way.
    assert np.isclose(a.x_train.sum() + a.x_test.sum(), c.x_train.sum() + c.x_test.sum())


def test_normalize_uses_train_statistics() -> None:
    ds = load_dataset("digits", normalize=True)
    assert abs(float(ds.x_train.mean())) < 1e-4
    assert abs(float(ds.x_train.std()) - 1.0) < 1e-3
    assert ds.x_test.dtype == np.float32


# ----------------------------------------------------------------------------- Fashion-MNIST


def test_fashion_mnist_real_files() -> None:
    try:
        folder = fm.find_fashion_mnist_dir()
    except DataError:
        pytest.skip(
            "Fashion-MNIST IDX files not found (install Debian package dataset-fashion-mnist) "
            "in /usr/share/datasets/fashion-mnist"
        )
    ds = load_dataset("fashion-mnist")
    assert folder.is_dir()
    assert ds.x_train.shape == (60000, 1, 28, 28) and ds.x_test.shape == (10000, 1, 28, 28)
    assert ds.x_train.dtype == np.float32 and 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0
    np.testing.assert_array_equal(np.bincount(ds.y_train), np.full(10, 6000))
    np.testing.assert_array_equal(np.bincount(ds.y_test), np.full(10, 1000))


@pytest.mark.parametrize("nested", [False, True])
def test_fashion_mnist_fixture_roundtrip(tmp_path: Path, nested: bool) -> None:
    folder = tmp_path / "fashion-mnist" if nested else tmp_path
    raw = write_fashion_mnist(folder, n_train=7, n_test=3)
    ds = load_dataset("fashion-mnist", data_dir=tmp_path)
    assert ds.x_train.shape == (7, 1, 28, 28) and ds.x_test.shape == (3, 1, 28, 28)
    np.testing.assert_allclose(ds.x_train[:, 0] * 255.0, raw["train-images-idx3-ubyte.gz"], atol=1e-4)
    np.testing.assert_array_equal(ds.y_test, raw["t10k-labels-idx1-ubyte.gz"])
    assert ds.y_train.dtype == np.int64


def test_fashion_mnist_env_var_is_searched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_fashion_mnist(tmp_path / "fashion-mnist", n_train=5, n_test=2)
    monkeypatch.setenv("PRFL_DATA", str(tmp_path))
    assert load_dataset("fashion-mnist").num_train == 5


def test_fashion_mnist_explicit_dir_beats_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_fashion_mnist(tmp_path / "env", n_train=5, n_test=2)
    write_fashion_mnist(tmp_path / "explicit", n_train=4, n_test=2)
    monkeypatch.setenv("PRFL_DATA", str(tmp_path / "env"))
    assert load_dataset("fashion-mnist", data_dir=tmp_path / "explicit").num_train == 4


def test_fashion_mnist_absent_lists_places_and_fix(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        fm.find_fashion_mnist_dir(tmp_path, system_dirs=(str(tmp_path / "system"),))
    msg = str(info.value)
    assert "train-images-idx3-ubyte.gz" in msg
    assert str(tmp_path / "fashion-mnist") in msg and str(tmp_path / "system") in msg
    assert "apt-get install dataset-fashion-mnist" in msg


def test_fashion_mnist_absent_via_load_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fm, "SYSTEM_DIRS", (str(tmp_path / "nowhere"),))
    with pytest.raises(DataError, match="searched"):
        load_dataset("fashion-mnist", data_dir=tmp_path)


def test_fashion_mnist_partial_download_names_missing_file(tmp_path: Path) -> None:
    write_fashion_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="missing t10k-labels-idx1-ubyte.gz"):
        load_dataset("fashion-mnist", data_dir=tmp_path)


def test_fashion_mnist_bad_magic_names_file(tmp_path: Path) -> None:
    raw = write_fashion_mnist(tmp_path)
    write_gz(tmp_path / "train-labels-idx1-ubyte.gz", idx_bytes(raw["train-labels-idx1-ubyte.gz"], magic=2051))
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte\.gz has IDX magic number 2051, expected 2049") as info:
        load_dataset("fashion-mnist", data_dir=tmp_path)
    assert "apt-get install dataset-fashion-mnist" in str(info.value)


def test_fashion_mnist_truncated_payload_names_file(tmp_path: Path) -> None:
    raw = write_fashion_mnist(tmp_path)
    blob = idx_bytes(raw["t10k-images-idx3-ubyte.gz"])
    write_gz(tmp_path / "t10k-images-idx3-ubyte.gz", blob[:-100])
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte\.gz is truncated"):
        load_dataset("fashion-mnist", data_dir=tmp_path)


def test_fashion_mnist_truncated_gzip_names_file(tmp_path: Path) -> None:
    write_fashion_mnist(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz is not a complete gzip file"):
        load_dataset("fashion-mnist", data_dir=tmp_path)


def test_fashion_mnist_wrong_image_size(tmp_path: Path) -> None:
    write_fashion_mnist(tmp_path)
    write_gz(tmp_path / "train-images-idx3-ubyte.gz", idx_bytes(np.zeros((6, 27, 28), np.uint8)))
    with pytest.raises(DataError, match=r"dimensions \(6, 27, 28\), expected \(n, 28, 28\)"):
        load_dataset("fashion-mnist", data_dir=tmp_path)


def test_fashion_mnist_label_count_must_match_images(tmp_path: Path) -> None:
    write_fashion_mnist(tmp_path, n_train=6)
    write_gz(tmp_path / "train-labels-idx1-ubyte.gz", idx_bytes(np.zeros(5, np.uint8)))
    with pytest.raises(DataError, match="5 labels but .* 6 images"):
        load_dataset("fashion-mnist", data_dir=tmp_path)


def test_fashion_mnist_label_out_of_range(tmp_path: Path) -> None:
    write_fashion_mnist(tmp_path, n_test=4)
    write_gz(tmp_path / "t10k-labels-idx1-ubyte.gz", idx_bytes(np.array([0, 1, 10, 2], np.uint8)))
    with pytest.raises(DataError, match="label 10"):
        load_dataset("fashion-mnist", data_dir=tmp_path)


def test_idx_header_is_big_endian(tmp_path: Path) -> None:
    """A little-endian header must not be accepted by accident."""
    arr = np.zeros(3, np.uint8)
    header = (2049).to_bytes(4, "little") + (3).to_bytes(4, "little")
    path = tmp_path / "labels.gz"
    with gzip.open(path, "wb") as fh:
        fh.write(header + arr.tobytes())
    with pytest.raises(DataError, match="magic"):
        fm.read_idx(path, fm.LABELS_MAGIC, ())


# ----------------------------------------------------------------------------- CIFAR-10


def _check_cifar(ds, images) -> None:  # noqa: ANN001 - test helper
    assert ds.input_shape == (3, 32, 32) and ds.num_classes == 10
    assert ds.x_train.shape == (15, 3, 32, 32) and ds.x_test.shape == (3, 3, 32, 32)
    expected_train = np.concatenate([images[f"data_batch_{i}"] for i in range(1, 6)])
    np.testing.assert_allclose(ds.x_train * 255.0, expected_train, atol=1e-4)
    np.testing.assert_allclose(ds.x_test * 255.0, images["test_batch"], atol=1e-4)


def test_cifar10_directory_and_parent(tmp_path: Path) -> None:
    files, images = cifar_members()
    folder = write_cifar_dir(tmp_path, files)
    _check_cifar(load_dataset("cifar10", data_dir=folder), images)
    _check_cifar(load_dataset("cifar10", data_dir=tmp_path), images)


def test_cifar10_tarball_read_without_extraction(tmp_path: Path) -> None:
    files, images = cifar_members()
    archive = write_cifar_tar(tmp_path / "cifar-10-python.tar.gz", files)
    _check_cifar(load_dataset("cifar10", data_dir=archive), images)
    _check_cifar(load_dataset("cifar10", data_dir=tmp_path), images)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cifar-10-python.tar.gz"]


def test_cifar10_pixel_layout_is_chw(tmp_path: Path) -> None:
    """Byte c*1024 + h*32 + w of a row is channel c, row h, column w."""
    files, _ = cifar_members(per_batch=2)
    row = np.zeros((2, 3072), np.uint8)
    c, h, w = 2, 5, 17
    row[1, c * 1024 + h * 32 + w] = 255
    files["test_batch"] = cifar_batch(row, [3, 7])
    ds = load_dataset("cifar10", data_dir=write_cifar_dir(tmp_path, files))
    assert ds.x_test[1, c, h, w] == 1.0
    assert ds.x_test.sum() == 1.0
    np.testing.assert_array_equal(ds.y_test, [3, 7])


def test_cifar10_absent(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        load_dataset("cifar10", data_dir=tmp_path)
    msg = str(info.value)
    assert "data_batch_1" in msg and "cifar-10-python.tar.gz" in msg and str(tmp_path) in msg


def test_cifar10_bad_label_range(tmp_path: Path) -> None:
    files, _ = cifar_members(per_batch=2)
    files["data_batch_3"] = cifar_batch(np.zeros((2, 3072), np.uint8), [1, 10])
    with pytest.raises(DataError, match=r"data_batch_3 has labels in \[1, 10\]"):
        load_dataset("cifar10", data_dir=write_cifar_dir(tmp_path, files))


def test_cifar10_bad_row_shape(tmp_path: Path) -> None:
    files, _ = cifar_members(per_batch=2)
    files["test_batch"] = cifar_batch(np.zeros((2, 3000), np.uint8), [1, 2])
    with pytest.raises(DataError, match=r"test_batch b'data' is uint8 \(2, 3000\)"):
        load_dataset("cifar10", data_dir=write_cifar_dir(tmp_path, files))


def test_cifar10_missing_member_in_tar(tmp_path: Path) -> None:
    files, _ = cifar_members(per_batch=2)
    del files["data_batch_5"]
    archive = write_cifar_tar(tmp_path / "cifar-10-python.tar.gz", files)
    with pytest.raises(DataError, match="no member cifar-10-batches-py/data_batch_5"):
        load_dataset("cifar10", data_dir=archive)


def test_cifar10_refuses_code_in_pickles(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self):  # noqa: ANN204 - pickle protocol
            return (print, ("should never run",))

    files, _ = cifar_members(per_batch=2)
    files["data_batch_1"] = pickle.dumps({b"data": Evil(), b"labels": [0]}, protocol=2)
    with pytest.raises(DataError, match="not allowed"):
        load_dataset("cifar10", data_dir=write_cifar_dir(tmp_path, files))


def test_cifar10_corrupt_pickle(tmp_path: Path) -> None:
    files, _ = cifar_members(per_batch=2)
    files["data_batch_2"] = files["data_batch_2"][:50]
    with pytest.raises(DataError, match="data_batch_2 is not a readable CIFAR batch"):
        load_dataset("cifar10", data_dir=write_cifar_dir(tmp_path, files))
