"""Fashion-MNIST from the four gzipped IDX files, parsed with numpy and checked thoroughly."""

from __future__ import annotations

import gzip
import logging
import os
import zlib
from pathlib import Path

import numpy as np

from ._paths import format_places, search_roots, suggested_dir
from .base import DataError, Dataset

logger = logging.getLogger(__name__)

SUBDIR = "fashion-mnist"
SYSTEM_DIRS: tuple[str, ...] = ("/usr/share/datasets/fashion-mnist",)
TRAIN_IMAGES = "train-images-idx3-ubyte.gz"
TRAIN_LABELS = "train-labels-idx1-ubyte.gz"
TEST_IMAGES = "t10k-images-idx3-ubyte.gz"
TEST_LABELS = "t10k-labels-idx1-ubyte.gz"
FILES = (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)
IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension
NUM_CLASSES = 10
SIDE = 28


def _how_to_get(target: str) -> str:
    return (
        "Install the Debian package with `apt-get install dataset-fashion-mnist` "
        f"(files land in {SYSTEM_DIRS[0]}), or download the four .gz files from the "
        f"official Fashion-MNIST repository (zalandoresearch/fashion-mnist, data/fashion) into {target}."
    )


def find_fashion_mnist_dir(
    data_dir: str | os.PathLike[str] | None = None,
    system_dirs: tuple[str, ...] | None = None,
) -> Path:
    """Return the first searched directory holding the IDX files.

    Order: ``data_dir`` (itself, then ``data_dir/fashion-mnist``), each ``$PRFL_DATA`` entry
    in the same two forms, then the system directories. A directory holding only some
    of the files is reported rather than skipped, since it is almost always a broken
    download the user wants to know about.
    """
    dirs = SYSTEM_DIRS if system_dirs is None else system_dirs
    places = search_roots(data_dir, SUBDIR, dirs)
    for place in places:
        present = [f for f in FILES if (place / f).is_file()]
        if len(present) == len(FILES):
            return place
        if present:
            missing = [f for f in FILES if f not in present]
            raise DataError(
                f"fashion-mnist: {place} holds {', '.join(present)} but is missing "
                f"{', '.join(missing)}. {_how_to_get(str(place))}"
            )
    raise DataError(
        f"fashion-mnist: expected the IDX files {', '.join(FILES)}; searched:\n"
        f"{format_places(places)}\n{_how_to_get(suggested_dir(data_dir, SUBDIR))}"
    )


def read_idx(path: Path, magic: int, item_shape: tuple[int, ...]) -> np.ndarray:
    """Parse one gzipped IDX file of unsigned bytes into an array ``(n, *item_shape)``.

    Checks the magic number, the dimensions and that the payload holds exactly as many
    bytes as the header promises, so truncated or mislabelled files fail loudly.
    """
    fix = _how_to_get(str(path.parent))
    try:
        with gzip.open(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(
            f"fashion-mnist: {path} is not a complete gzip file ({exc}). Replace it. {fix}"
        ) from exc
    ndim = 1 + len(item_shape)
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise DataError(
            f"fashion-mnist: {path} is truncated: {len(raw)} bytes, shorter than the "
            f"{header_len}-byte IDX header. Replace it. {fix}"
        )
    found_magic = int.from_bytes(raw[:4], "big")
    if found_magic != magic:
        raise DataError(
            f"fashion-mnist: {path} has IDX magic number {found_magic}, expected {magic}; "
            f"the file is corrupt or is not the file its name says. Replace it. {fix}"
        )
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    if dims[1:] != item_shape:
        raise DataError(
            f"fashion-mnist: {path} has dimensions {dims}, expected (n, {', '.join(map(str, item_shape))}). "
            f"Replace it. {fix}"
        )
    expected = int(np.prod(dims))
    payload = len(raw) - header_len
    if payload != expected:
        state = "truncated" if payload < expected else "longer than its header says"
        raise DataError(
            f"fashion-mnist: {path} is {state}: header promises {expected} bytes of data, "
            f"found {payload}. Replace it. {fix}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape(dims)


def _read_split(folder: Path, images_name: str, labels_name: str) -> tuple[np.ndarray, np.ndarray]:
    images = read_idx(folder / images_name, IMAGES_MAGIC, (SIDE, SIDE))
    labels = read_idx(folder / labels_name, LABELS_MAGIC, ())
    if labels.shape[0] != images.shape[0]:
        raise DataError(
            f"fashion-mnist: {folder / labels_name} has {labels.shape[0]} labels but "
            f"{folder / images_name} has {images.shape[0]} images; the pair must match. "
            f"{_how_to_get(str(folder))}"
        )
    if labels.size and labels.max() >= NUM_CLASSES:
        raise DataError(
            f"fashion-mnist: {folder / labels_name} has label {int(labels.max())}, "
            f"expected 0..{NUM_CLASSES - 1}. {_how_to_get(str(folder))}"
        )
    x = (images.astype(np.float32) / 255.0).reshape(-1, 1, SIDE, SIDE)
    return x, labels.astype(np.int64)


def load_fashion_mnist(data_dir: str | os.PathLike[str] | None = None) -> Dataset:
    """Load Fashion-MNIST as (1, 28, 28) float32 images in [0, 1], 10 classes."""
    folder = find_fashion_mnist_dir(data_dir)
    logger.info("fashion-mnist: reading IDX files from %s", folder)
    x_train, y_train = _read_split(folder, TRAIN_IMAGES, TRAIN_LABELS)
    x_test, y_test = _read_split(folder, TEST_IMAGES, TEST_LABELS)
    return Dataset(
        name="fashion-mnist",
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        num_classes=NUM_CLASSES,
        input_shape=(1, SIDE, SIDE),
        kind="image",
    )
