"""Offline data sets and federated partitions.

``load_dataset(name, data_dir=None, **options)`` returns a :class:`Dataset` from local
files or packaged data only (nothing is downloaded); ``partition_dataset`` splits its
training set across clients.
"""

from .base import DataError, Dataset
from .partition import SCHEMES, Partition, PartitionError, partition_dataset
from .registry import DATASETS, load_dataset

__all__ = [
    "DATASETS",
    "SCHEMES",
    "DataError",
    "Dataset",
    "Partition",
    "PartitionError",
    "load_dataset",
    "partition_dataset",
]
