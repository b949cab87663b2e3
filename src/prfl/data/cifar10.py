"""CIFAR-10 from the official python version, as a directory or straight from the .tar.gz."""

from __future__ import annotations

import io
import logging
import os
import pickle
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ._paths import format_places, search_roots, suggested_dir
from .base import DataError, Dataset

logger = logging.getLogger(__name__)

BATCHES_DIR = "cifar-10-batches-py"
ARCHIVE = "cifar-10-python.tar.gz"
SUBDIR = "cifar10"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
MEMBERS = (*TRAIN_BATCHES, TEST_BATCH)
NUM_CLASSES = 10
ROW_LEN = 3 * 32 * 32

# Only what numpy needs to rebuild an ndarray may be loaded from a batch pickle.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _BatchUnpickler(pickle.Unpickler):
    """Unpickler that refuses anything beyond plain containers and numpy arrays."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch")


def _how_to_get(target: str) -> str:
    return (
        f"Download {ARCHIVE} (the 'CIFAR-10 python version') from the official CIFAR page "
        f"(www.cs.toronto.edu/~kriz/cifar.html) and pass its path, the extracted {BATCHES_DIR} "
        f"directory or its parent as data_dir (or put it under {target})."
    )


def _is_batches_dir(path: Path) -> bool:
    return path.is_dir() and any((path / m).is_file() for m in MEMBERS)


def find_cifar10_source(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return the batches directory or the archive to read CIFAR-10 from.

    For each base (``data_dir``, then ``data_dir/cifar10``, then the same for each
    ``$PRFL_DATA`` entry) accept: the archive file itself, a directory holding the batch
    files, ``base/cifar-10-batches-py`` and ``base/cifar-10-python.tar.gz``.
    """
    places = search_roots(data_dir, SUBDIR)
    looked: list[Path] = []
    for base in places:
        for cand in (base, base / BATCHES_DIR, base / ARCHIVE):
            looked.append(cand)
            if cand.is_file() and cand.name.endswith((".tar.gz", ".tgz", ".tar")):
                return cand
            if _is_batches_dir(cand):
                return cand
    raise DataError(
        f"cifar10: expected the directory {BATCHES_DIR}/ with {', '.join(MEMBERS)} "
        f"(or the archive {ARCHIVE}); searched:\n{format_places(looked)}\n"
        f"{_how_to_get(suggested_dir(data_dir, SUBDIR))} Nothing is downloaded automatically."
    )


def _unpickle(blob: bytes, where: str, fix: str) -> dict[bytes, Any]:
    try:
        obj = _BatchUnpickler(io.BytesIO(blob), encoding="bytes").load()
    except Exception as exc:  # any failure here means a corrupt or foreign file
        raise DataError(f"cifar10: {where} is not a readable CIFAR batch pickle ({exc}). {fix}") from exc
    if not isinstance(obj, dict):
        raise DataError(f"cifar10: {where} holds a {type(obj).__name__}, expected a dict. {fix}")
    return obj


def _parse_batch(obj: dict[bytes, Any], where: str, fix: str) -> tuple[np.ndarray, np.ndarray]:
    """Turn one batch dict into (n, 3, 32, 32) float32 images and int64 labels."""
    if b"data" not in obj or b"labels" not in obj:
        keys = sorted(k.decode("latin-1") if isinstance(k, bytes) else str(k) for k in obj)
        raise DataError(f"cifar10: {where} lacks b'data'/b'labels' (keys: {keys}). {fix}")
    data = np.asarray(obj[b"data"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != ROW_LEN:
        raise DataError(
            f"cifar10: {where} b'data' is {data.dtype} {data.shape}, expected uint8 (n, {ROW_LEN}). {fix}"
        )
    labels = np.asarray(obj[b"labels"])
    if labels.ndim != 1 or labels.shape[0] != data.shape[0] or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(
            f"cifar10: {where} has {labels.shape} labels of type {labels.dtype} for "
            f"{data.shape[0]} images; expected one integer label per image. {fix}"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise DataError(
            f"cifar10: {where} has labels in [{labels.min()}, {labels.max()}], expected 0..9. {fix}"
        )
    # Rows are channel-major: 1024 red, then 1024 green, then 1024 blue, each row-major.
    x = data.reshape(-1, 3, 32, 32).astype(np.float32) / 255.0
    return x, labels.astype(np.int64)


def _reader(source: Path) -> tuple[Callable[[str], bytes], Callable[[], None]]:
    """Return (read member by name, close) for a batches directory or an archive."""
    fix = _how_to_get(str(source.parent))
    if source.is_dir():

        def read_dir(member: str) -> bytes:
            path = source / member
            if not path.is_file():
                raise DataError(f"cifar10: {path} is missing; expected all of {', '.join(MEMBERS)}. {fix}")
            return path.read_bytes()

        return read_dir, lambda: None
    try:
        tar = tarfile.open(source, "r:*")
        members = {m.name: m for m in tar.getmembers() if m.isfile()}
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DataError(f"cifar10: {source} is not a readable tar archive ({exc}). {fix}") from exc

    def read_tar(member: str) -> bytes:
        info = members.get(f"{BATCHES_DIR}/{member}") or members.get(member)
        if info is None:
            raise DataError(
                f"cifar10: {source} has no member {BATCHES_DIR}/{member}; expected all of "
                f"{', '.join(MEMBERS)} under {BATCHES_DIR}/. {fix}"
            )
        fh = tar.extractfile(info)
        if fh is None:  # pragma: no cover - regular members always yield a file
            raise DataError(f"cifar10: cannot read {member} from {source}. {fix}")
        try:
            return fh.read()
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise DataError(f"cifar10: {source} member {member} is truncated ({exc}). {fix}") from exc

    return read_tar, tar.close


def load_cifar10(data_dir: str | os.PathLike[str] | None = None) -> Dataset:
    """Load CIFAR-10 as (3, 32, 32) float32 images in [0, 1], 10 classes."""
    source = find_cifar10_source(data_dir)
    logger.info("cifar10: reading batches from %s", source)
    fix = _how_to_get(str(source.parent))
    read, close = _reader(source)
    try:
        parts = [
            _parse_batch(_unpickle(read(m), f"{source}:{m}", fix), f"{source}:{m}", fix)
            for m in MEMBERS
        ]
    finally:
        close()
    x_train = np.concatenate([p[0] for p in parts[:-1]])
    y_train = np.concatenate([p[1] for p in parts[:-1]])
    x_test, y_test = parts[-1]
    return Dataset(
        name="cifar10",
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        num_classes=NUM_CLASSES,
        input_shape=(3, 32, 32),
        kind="image",
    )
