"""Data sets for the experiments: on-disk loaders, subsets, label noise, augmentation.

>>> from samkit.data import load_dataset, iterate_batches, augment_batch
>>> train, test = load_dataset("fashion-mnist", subset=10_000, label_noise=0.4, seed=0)
>>> gen = torch.Generator().manual_seed(0)
>>> for x, y in iterate_batches(train, 128, shuffle=True, generator=gen):
...     x = augment_batch(x, gen)   # random crop (padding 4) and horizontal flip
"""

from samkit.data.augment import augment_batch
from samkit.data.datasets import DATASETS, download_dataset, load_dataset, make_synthetic
from samkit.data.fetch import ChecksumError, Resource, download, fetch_resources, file_digest
from samkit.data.idx import CorruptFileError, read_idx
from samkit.data.mnist1d import MNIST1DConfig, make_mnist1d
from samkit.data.paths import (
    DataNotFoundError,
    IncompleteDataError,
    resolve_data_dir,
    search_dirs,
)
from samkit.data.split import (
    DataSplit,
    flip_labels,
    iterate_batches,
    standardization_stats,
    subset_indices,
)
from samkit.data.text import load_text
from samkit.data.verify import verify_dataset

__all__ = [
    "DATASETS",
    "ChecksumError",
    "CorruptFileError",
    "DataNotFoundError",
    "DataSplit",
    "IncompleteDataError",
    "MNIST1DConfig",
    "Resource",
    "augment_batch",
    "download",
    "download_dataset",
    "fetch_resources",
    "file_digest",
    "flip_labels",
    "iterate_batches",
    "load_dataset",
    "load_text",
    "make_mnist1d",
    "make_synthetic",
    "read_idx",
    "resolve_data_dir",
    "search_dirs",
    "standardization_stats",
    "subset_indices",
    "verify_dataset",
]
