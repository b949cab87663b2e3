"""Name -> loader registry and the single entry point :func:`load_dataset`."""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

from .base import DataError, Dataset, standardize_images
from .cifar10 import load_cifar10
from .digits import load_digits
from .fashion_mnist import load_fashion_mnist
from .femnist import load_femnist
from .shakespeare import load_shakespeare
from .synthetic import load_synthetic

logger = logging.getLogger(__name__)

Loader = Callable[..., Dataset]

LOADERS: Mapping[str, Loader] = MappingProxyType(
    {
        "digits": load_digits,
        "fashion-mnist": load_fashion_mnist,
        "cifar10": load_cifar10,
        "femnist": load_femnist,
        "shakespeare": load_shakespeare,
        "synthetic": load_synthetic,
    }
)
DATASETS: tuple[str, ...] = tuple(LOADERS)


def canonical_name(name: str) -> str:
    """Normalise spelling (case, ``_`` for ``-``) and check the name is registered."""
    key = name.strip().lower().replace("_", "-")
    if key not in LOADERS:
        raise DataError(
            f"unknown data set {name!r}; expected one of {', '.join(DATASETS)} "
            "(registered in prfl.data.registry)."
        )
    return key


def load_dataset(
    name: str, data_dir: str | os.PathLike[str] | None = None, **options: Any
) -> Dataset:
    """Load a data set by name; nothing is ever downloaded.

    ``options`` go to the loader (e.g. ``seed`` for digits, ``stride`` for shakespeare);
    ``normalize=True`` additionally standardises image channels with train statistics.
    """
    key = canonical_name(name)
    normalize = bool(options.pop("normalize", False))
    loader = LOADERS[key]
    signature = inspect.signature(loader)
    try:
        signature.bind(data_dir, **options)
    except TypeError as exc:
        allowed = [p for p in signature.parameters if p != "data_dir"]
        raise TypeError(f"{key}: {exc}; options accepted: {allowed or 'none'}") from exc
    ds = loader(data_dir, **options)
    if normalize:
        standardize_images(ds)
    logger.info("loaded %s", ds.summary())
    return ds
