"""Splitting a training set across federated clients: iid, Dirichlet, shards and natural groups.

Every scheme assigns each training index to exactly one client, and is deterministic
for a given seed (all randomness comes from ``np.random.default_rng(seed)``).
"""

from __future__ import annotations

import inspect
import json
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from .base import Dataset

logger = logging.getLogger(__name__)

SCHEMES = ("iid", "dirichlet", "shards", "natural")
FORMAT_VERSION = 1


class PartitionError(ValueError):
    """A partition was requested that cannot be built (bad parameters or data)."""


@dataclass
class Partition:
    """Which training indices each client owns, plus the labels needed for histograms."""

    scheme: str
    client_indices: list[np.ndarray]
    num_classes: int
    labels: np.ndarray
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.client_indices = [np.sort(np.asarray(ix, dtype=np.int64)) for ix in self.client_indices]
        self.labels = np.asarray(self.labels, dtype=np.int64)

    @property
    def num_clients(self) -> int:
        """Number of clients."""
        return len(self.client_indices)

    def sizes(self) -> np.ndarray:
        """Samples per client, int64 ``(num_clients,)``."""
        return np.array([ix.size for ix in self.client_indices], dtype=np.int64)

    def label_histogram(self) -> np.ndarray:
        """Label counts per client, int64 ``(num_clients, num_classes)``."""
        hist = np.zeros((self.num_clients, self.num_classes), dtype=np.int64)
        for c, ix in enumerate(self.client_indices):
            hist[c] = np.bincount(self.labels[ix], minlength=self.num_classes)[: self.num_classes]
        return hist

    def check(self, num_samples: int | None = None) -> None:
        """Raise :class:`PartitionError` unless clients are disjoint and cover every index once."""
        n = self.labels.shape[0] if num_samples is None else num_samples
        allidx = np.concatenate(self.client_indices) if self.client_indices else np.zeros(0, np.int64)
        if allidx.size != n or not np.array_equal(np.sort(allidx), np.arange(n)):
            raise PartitionError(
                f"{self.scheme} partition does not cover indices 0..{n - 1} exactly once "
                f"({allidx.size} assignments, {np.unique(allidx).size} distinct)"
            )

    def format_histogram(self, max_rows: int | None = None) -> str:
        """Plain-text table: one row per client with its size and per-class counts."""
        hist = self.label_histogram()
        sizes = self.sizes()
        width = max(3, len(str(int(hist.max()) if hist.size else 0)), len(str(self.num_classes - 1)))
        size_w = max(4, len(str(int(sizes.sum()))))
        client_w = max(6, len(str(self.num_clients - 1)))
        header = (
            f"{'client':>{client_w}} {'size':>{size_w}} | "
            + " ".join(f"{c:>{width}}" for c in range(self.num_classes))
        )
        lines = [f"partition '{self.scheme}': {self.num_clients} clients, {int(sizes.sum())} samples", header]
        lines.append("-" * len(header))
        rows = range(self.num_clients) if max_rows is None else range(min(max_rows, self.num_clients))
        for c in rows:
            counts = " ".join(f"{v:>{width}}" for v in hist[c])
            lines.append(f"{c:>{client_w}} {sizes[c]:>{size_w}} | {counts}")
        if max_rows is not None and self.num_clients > max_rows:
            lines.append(f"... {self.num_clients - max_rows} more clients")
        lines.append("-" * len(header))
        total = " ".join(f"{v:>{width}}" for v in hist.sum(axis=0))
        lines.append(f"{'total':>{client_w}} {int(sizes.sum()):>{size_w}} | {total}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: scheme, parameters, indices, labels and the label histogram."""
        return {
            "format_version": FORMAT_VERSION,
            "scheme": self.scheme,
            "params": {str(k): _plain(v) for k, v in self.params.items()},
            "num_clients": self.num_clients,
            "num_classes": self.num_classes,
            "sizes": self.sizes().tolist(),
            "label_histogram": self.label_histogram().tolist(),
            "client_indices": [ix.tolist() for ix in self.client_indices],
            "labels": self.labels.tolist(),
        }

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the partition as JSON so a run can be repeated with the same clients."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(self.to_dict()), encoding="utf-8")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Partition:
        """Read a partition written by :meth:`save`, checking the stored histogram still matches."""
        try:
            doc = json.loads(Path(path).read_text(encoding="utf-8"))
            part = cls(
                scheme=str(doc["scheme"]),
                client_indices=[np.asarray(ix, dtype=np.int64) for ix in doc["client_indices"]],
                num_classes=int(doc["num_classes"]),
                labels=np.asarray(doc["labels"], dtype=np.int64),
                params=dict(doc.get("params", {})),
            )
            stored = np.asarray(doc.get("label_histogram", []), dtype=np.int64)
            recomputed = part.label_histogram()
        except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
            raise PartitionError(f"cannot read partition file {path}: {exc}") from exc
        if stored.shape != recomputed.shape or not np.array_equal(stored, recomputed):
            raise PartitionError(f"partition file {path}: stored label histogram does not match its indices")
        return part


def _plain(value: Any) -> Any:
    """Convert numpy scalars and arrays in partition parameters to JSON-ready values."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _split_iid(labels: np.ndarray, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Random equal split: every client gets floor or ceil of n / num_clients samples."""
    return list(np.array_split(rng.permutation(labels.shape[0]), num_clients))


def _split_dirichlet(
    labels: np.ndarray,
    num_clients: int,
    rng: np.random.Generator,
    *,
    alpha: float = 0.5,
    min_samples: int = 10,
    max_attempts: int = 1000,
) -> list[np.ndarray]:
    """Per class, split its samples across clients in proportions drawn from Dir(alpha).

    Draws are repeated until every client holds at least ``min_samples`` samples; small
    ``alpha`` gives clients dominated by few classes.
    """
    if not alpha > 0:
        raise PartitionError(f"dirichlet needs alpha > 0, got {alpha}")
    if min_samples < 0:
        raise PartitionError(f"min_samples must be >= 0, got {min_samples}")
    if max_attempts < 1:
        raise PartitionError(f"max_attempts must be >= 1, got {max_attempts}")
    n = labels.shape[0]
    if num_clients * min_samples > n:
        raise PartitionError(
            f"dirichlet: {num_clients} clients x min_samples={min_samples} needs "
            f"{num_clients * min_samples} samples, the training set has {n}"
        )
    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    for attempt in range(1, max_attempts + 1):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for members in by_class:
            members = rng.permutation(members)
            share = rng.dirichlet(np.full(num_clients, alpha))
            cuts = np.floor(np.cumsum(share)[:-1] * members.size).astype(np.int64)
            for client, piece in enumerate(np.split(members, cuts)):
                parts[client].append(piece)
        clients = [np.concatenate(p) for p in parts]
        smallest = min(c.size for c in clients)
        if smallest >= min_samples:
            logger.debug("dirichlet(alpha=%s): accepted after %d attempt(s)", alpha, attempt)
            return clients
    raise PartitionError(
        f"dirichlet(alpha={alpha}): no draw in {max_attempts} attempts gave every one of "
        f"{num_clients} clients at least {min_samples} samples; raise alpha, lower "
        "min_samples or use fewer clients"
    )


def _shards_per_class(class_sizes: np.ndarray, total: int) -> np.ndarray:
    """Shard counts per class, proportional to class size, each >= 1 and <= its size, summing to total."""
    target = class_sizes * (total / class_sizes.sum())
    counts = np.clip(np.floor(target).astype(np.int64), 1, class_sizes)
    while counts.sum() > total:
        excess = np.where(counts > 1, counts - target, -np.inf)
        counts[int(np.argmax(excess))] -= 1
    while counts.sum() < total:
        room = np.where(counts < class_sizes, target - counts, -np.inf)
        counts[int(np.argmax(room))] += 1
    return counts


def _split_shards(
    labels: np.ndarray,
    num_clients: int,
    rng: np.random.Generator,
    *,
    classes_per_client: int = 2,
) -> list[np.ndarray]:
    """McMahan et al.'s split: sort by label, cut into num_clients*k shards, deal k to each client.

    When there are at least as many shards as classes, shards are cut inside each class
    (class shard counts proportional to class sizes), so a client sees at most k classes.
    Otherwise the label-sorted order is cut into equal shards that may straddle classes.
    """
    k = classes_per_client
    if k < 1:
        raise PartitionError(f"shards needs classes_per_client >= 1, got {k}")
    n = labels.shape[0]
    total = num_clients * k
    if total > n:
        raise PartitionError(
            f"shards: {num_clients} clients x {k} shards = {total} shards, more than the "
            f"{n} training samples"
        )
    # Shuffle first so the order inside each class is random, then sort stably by label.
    order = rng.permutation(n)
    order = order[np.argsort(labels[order], kind="stable")]
    classes, class_sizes = np.unique(labels, return_counts=True)
    if total >= classes.size:
        per_class = _shards_per_class(class_sizes, total)
        shards: list[np.ndarray] = []
        start = 0
        for size, count in zip(class_sizes, per_class):
            shards.extend(np.array_split(order[start : start + size], int(count)))
            start += size
    else:
        logger.warning(
            "shards: %d shards for %d classes; shards span several classes, so clients may "
            "see more than %d classes",
            total,
            classes.size,
            k,
        )
        shards = list(np.array_split(order, total))
    deal = rng.permutation(total)
    return [np.concatenate([shards[s] for s in deal[c * k : (c + 1) * k]]) for c in range(num_clients)]


def _split_natural(
    groups: np.ndarray,
    num_clients: int,
    rng: np.random.Generator,
    *,
    shuffle_groups: bool = False,
) -> list[np.ndarray]:
    """Clients follow natural groups; surplus groups are merged consecutively by sample count.

    Groups are taken in id order (or a seeded random order with ``shuffle_groups``) and
    cut into ``num_clients`` runs of consecutive groups with roughly equal sample totals.
    """
    ids, counts = np.unique(groups, return_counts=True)
    if ids.size < num_clients:
        raise PartitionError(
            f"natural: the data set has {ids.size} groups, fewer than the {num_clients} "
            "clients requested; use fewer clients or another scheme"
        )
    if shuffle_groups:
        perm = rng.permutation(ids.size)
        ids, counts = ids[perm], counts[perm]
    cum = np.cumsum(counts)
    total = int(cum[-1])
    bounds = [0]
    for j in range(1, num_clients):
        # bounds[j] = number of groups in the first j clients; their sample total should
        # be as close as possible to j/N of the data, leaving a group for every later client.
        target = total * j / num_clients
        pos = int(np.searchsorted(cum, target))
        best = min((e for e in (pos, pos + 1) if 1 <= e <= ids.size), key=lambda e: abs(cum[e - 1] - target))
        bounds.append(min(max(best, bounds[-1] + 1), ids.size - (num_clients - j)))
    bounds.append(ids.size)
    order = np.argsort(groups, kind="stable")
    sorted_groups = groups[order]
    starts = np.searchsorted(sorted_groups, ids, side="left")
    ends = np.searchsorted(sorted_groups, ids, side="right")
    members = {int(g): order[s:e] for g, s, e in zip(ids, starts, ends)}
    return [
        np.concatenate([members[int(g)] for g in ids[bounds[c] : bounds[c + 1]]])
        for c in range(num_clients)
    ]


_SPLITTERS: Mapping[str, Callable[..., list[np.ndarray]]] = MappingProxyType(
    {
        "iid": _split_iid,
        "dirichlet": _split_dirichlet,
        "shards": _split_shards,
        "natural": _split_natural,
    }
)


def partition_dataset(
    ds: Dataset, scheme: str, num_clients: int, seed: int = 0, **options: Any
) -> Partition:
    """Split ``ds``'s training set across ``num_clients`` clients.

    Schemes and options: ``iid``; ``dirichlet`` (``alpha=0.5``, ``min_samples=10``,
    ``max_attempts=1000``); ``shards`` (``classes_per_client=2``); ``natural``
    (``shuffle_groups=False``; needs ``ds.groups_train``). Impossible requests raise
    :class:`PartitionError`.
    """
    if scheme not in SCHEMES:
        raise PartitionError(f"unknown partition scheme {scheme!r}; expected one of {', '.join(SCHEMES)}")
    if not isinstance(num_clients, (int, np.integer)) or num_clients < 1:
        raise PartitionError(f"num_clients must be a positive integer, got {num_clients!r}")
    num_clients = int(num_clients)
    labels = np.asarray(ds.y_train, dtype=np.int64)
    n = labels.shape[0]
    if num_clients > n:
        raise PartitionError(f"{num_clients} clients but only {n} training samples in {ds.name}")
    splitter = _SPLITTERS[scheme]
    allowed = [
        p.name for p in inspect.signature(splitter).parameters.values() if p.kind is p.KEYWORD_ONLY
    ]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise PartitionError(f"{scheme}: unknown option(s) {unknown}; accepted: {allowed or 'none'}")
    rng = np.random.default_rng(seed)
    if scheme == "natural":
        if ds.groups_train is None:
            raise PartitionError(
                f"natural partition needs natural groups, but {ds.name} has none; "
                "use iid, dirichlet or shards"
            )
        source = np.asarray(ds.groups_train, dtype=np.int64)
    else:
        source = labels
    clients = splitter(source, num_clients, rng, **options)
    part = Partition(
        scheme=scheme,
        client_indices=clients,
        num_classes=ds.num_classes,
        labels=labels,
        params={"seed": seed, "num_clients": num_clients, "dataset": ds.name, **options},
    )
    part.check(n)
    logger.info(
        "%s partition of %s: %d clients, sizes %d..%d",
        scheme,
        ds.name,
        num_clients,
        int(part.sizes().min()),
        int(part.sizes().max()),
    )
    return part
