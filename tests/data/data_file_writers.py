"""Writers for tiny data files in the exact on-disk formats the loaders read."""

from __future__ import annotations

import gzip
import io
import json
import pickle
import tarfile
from pathlib import Path

import numpy as np


def idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    """IDX encoding of a uint8 array: big-endian magic (0x0000, 0x08, ndim), dims, data."""
    array = np.asarray(array, dtype=np.uint8)
    if magic is None:
        magic = 0x0800 | array.ndim
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.tobytes()


def write_gz(path: Path, payload: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wb") as fh:
        fh.write(payload)
    return path


def write_fashion_mnist(folder: Path, n_train: int = 6, n_test: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
    """Write the four IDX .gz files with random content; return the raw arrays."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte.gz": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte.gz": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte.gz": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for name, arr in arrays.items():
        write_gz(folder / name, idx_bytes(arr))
    return arrays


def cifar_batch(data: np.ndarray, labels: list[int]) -> bytes:
    """Pickle one batch like the official files: protocol 2, bytes keys, uint8 rows."""
    batch = {
        b"batch_label": b"testing batch 1 of 1",
        b"labels": labels,
        b"data": np.ascontiguousarray(data, dtype=np.uint8),
        b"filenames": [f"img_{i}.png".encode() for i in range(len(labels))],
    }
    return pickle.dumps(batch, protocol=2)


def cifar_members(per_batch: int = 3, seed: int = 0) -> tuple[dict[str, bytes], dict[str, np.ndarray]]:
    """Bytes of every batch file plus the (n, 3, 32, 32) uint8 images written per batch."""
    rng = np.random.default_rng(seed)
    files: dict[str, bytes] = {}
    images: dict[str, np.ndarray] = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        img = rng.integers(0, 256, (per_batch, 3, 32, 32), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, per_batch)]
        # Official row layout: channel-major, each channel row-major (CHW flattened).
        files[name] = cifar_batch(img.reshape(per_batch, 3072), labels)
        images[name] = img
    meta = {b"label_names": [b"airplane", b"automobile", b"bird", b"cat", b"deer",
                             b"dog", b"frog", b"horse", b"ship", b"truck"],
            b"num_cases_per_batch": per_batch, b"num_vis": 3072}
    files["batches.meta"] = pickle.dumps(meta, protocol=2)
    return files, images


def write_cifar_dir(parent: Path, files: dict[str, bytes]) -> Path:
    folder = parent / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    for name, blob in files.items():
        (folder / name).write_bytes(blob)
    return folder


def write_cifar_tar(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, blob in files.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return path


def femnist_user(rng: np.random.Generator, n: int) -> dict[str, list]:
    return {
        "x": rng.random((n, 784)).round(4).tolist(),
        "y": [int(v) for v in rng.integers(0, 62, n)],
    }


def write_femnist(root: Path, seed: int = 0) -> dict[str, dict[str, int]]:
    """Two train shards, one test shard, three writers (f0001 appears in both train shards)."""
    rng = np.random.default_rng(seed)
    layout = {
        "train/all_data_0_niid_train.json": {"f0003": 4, "f0001": 3},
        "train/all_data_1_niid_train.json": {"f0002": 5, "f0001": 2},
        "test/all_data_0_niid_test.json": {"f0003": 1, "f0001": 2, "f0002": 1},
    }
    for rel, users in layout.items():
        doc = {
            "users": list(users),
            "num_samples": list(users.values()),
            "user_data": {u: femnist_user(rng, n) for u, n in users.items()},
        }
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc))
    return layout
