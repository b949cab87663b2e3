"""FEMNIST from LEAF's JSON shards, keeping each training sample's writer as its group."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from ._paths import format_places, search_roots, suggested_dir
from .base import DataError, Dataset

logger = logging.getLogger(__name__)

SUBDIR = "femnist"
NUM_CLASSES = 62
PIXELS = 28 * 28
# LEAF writes shards to leaf/data/femnist/data/{train,test}; accept that layout too.
_LAYOUTS = ("", "data", "femnist/data")


def _how_to_get(target: str) -> str:
    return (
        "Generate the shards with LEAF (TalwalkarLab/leaf: in data/femnist run e.g. "
        "`./preprocess.sh -s niid --sf 0.05 -k 0 -t sample`), then pass the folder holding "
        f"train/ and test/ (leaf/data/femnist/data) as data_dir, or copy it to {target}."
    )


def find_femnist_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return the first searched directory with ``train/*.json`` and ``test/*.json``.

    Each base (``data_dir`` and ``data_dir/femnist``, then the same for ``$PRFL_DATA``
    entries) is tried as is and with LEAF's ``data/`` layout.
    """
    looked: list[Path] = []
    for base in search_roots(data_dir, SUBDIR):
        for layout in _LAYOUTS:
            cand = base / layout if layout else base
            if cand in looked:
                continue
            looked.append(cand)
            if any((cand / "train").glob("*.json")) and any((cand / "test").glob("*.json")):
                return cand
    raise DataError(
        "femnist: expected LEAF JSON shards train/*.json and test/*.json; searched:\n"
        f"{format_places(looked)}\n{_how_to_get(suggested_dir(data_dir, SUBDIR))}"
    )


def _read_shard(path: Path, fix: str) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Parse one shard into (writer, x (n, 784) float32, y (n,) int64) in file order."""
    try:
        with path.open("r", encoding="utf-8") as fh:
            doc: Any = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"femnist: {path} is not valid JSON ({exc}). {fix}") from exc
    if not isinstance(doc, dict) or not all(k in doc for k in ("users", "num_samples", "user_data")):
        raise DataError(f"femnist: {path} lacks the LEAF keys users/num_samples/user_data. {fix}")
    users, counts, user_data = doc["users"], doc["num_samples"], doc["user_data"]
    if not isinstance(users, list) or not isinstance(counts, list) or len(users) != len(counts):
        raise DataError(f"femnist: {path} must list as many num_samples as users. {fix}")
    out: list[tuple[str, np.ndarray, np.ndarray]] = []
    for user, count in zip(users, counts):
        where = f"femnist: {path}, user {user!r}"
        record = user_data.get(user) if isinstance(user_data, dict) else None
        if not isinstance(record, dict) or "x" not in record or "y" not in record:
            raise DataError(f"{where}: missing from user_data or without x/y. {fix}")
        try:
            x = np.asarray(record["x"], dtype=np.float32)
            y = np.asarray(record["y"])
        except (ValueError, TypeError) as exc:
            raise DataError(f"{where}: x/y are not rectangular numeric lists ({exc}). {fix}") from exc
        if x.ndim != 2 or x.shape[1] != PIXELS:
            raise DataError(f"{where}: x has shape {x.shape}, expected rows of {PIXELS} pixels. {fix}")
        if x.shape[0] != count or y.shape != (count,):
            raise DataError(
                f"{where}: num_samples says {count} but x has {x.shape[0]} rows and y {y.shape}. {fix}"
            )
        integral = np.issubdtype(y.dtype, np.integer) or (
            np.issubdtype(y.dtype, np.floating) and bool(np.all(y == np.round(y)))
        )
        if count and not integral:
            raise DataError(f"{where}: labels must be integers, got {y.dtype}. {fix}")
        y = y.astype(np.int64)
        if count and (y.min() < 0 or y.max() >= NUM_CLASSES):
            raise DataError(
                f"{where}: labels span [{y.min()}, {y.max()}], expected 0..{NUM_CLASSES - 1}. {fix}"
            )
        if count and (x.min() < 0.0 or x.max() > 1.0):
            raise DataError(f"{where}: pixel values leave [0, 1]; LEAF shards store them in [0, 1]. {fix}")
        out.append((str(user), x, y))
    return out


def _read_split(folder: Path, fix: str) -> list[tuple[str, np.ndarray, np.ndarray]]:
    records: list[tuple[str, np.ndarray, np.ndarray]] = []
    for path in sorted(folder.glob("*.json")):
        records.extend(_read_shard(path, fix))
    return records


def load_femnist(data_dir: str | os.PathLike[str] | None = None) -> Dataset:
    """Load FEMNIST as (1, 28, 28) float32 images, 62 classes, writers as groups.

    Writer ids are numbered by first appearance in the sorted train shard names, so the
    same files always give the same group ids. Pixel values are kept as LEAF stores them.
    """
    folder = find_femnist_dir(data_dir)
    logger.info("femnist: reading LEAF shards from %s", folder)
    fix = _how_to_get(str(folder))
    train = _read_split(folder / "train", fix)
    test = _read_split(folder / "test", fix)

    writer_ids: dict[str, int] = {}
    groups: list[np.ndarray] = []
    for user, _, y in train:
        gid = writer_ids.setdefault(user, len(writer_ids))
        groups.append(np.full(y.shape[0], gid, dtype=np.int64))

    def stack(records: list[tuple[str, np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
        if not records:
            return np.zeros((0, 1, 28, 28), np.float32), np.zeros(0, np.int64)
        x = np.concatenate([r[1] for r in records]).reshape(-1, 1, 28, 28)
        return x, np.concatenate([r[2] for r in records])

    x_train, y_train = stack(train)
    x_test, y_test = stack(test)
    return Dataset(
        name="femnist",
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        num_classes=NUM_CLASSES,
        input_shape=(1, 28, 28),
        kind="image",
        groups_train=np.concatenate(groups) if groups else np.zeros(0, np.int64),
        group_names=list(writer_ids),
    )
