"""``load_dataset``: every data set of the experiments, as train and test :class:`DataSplit`."""

from __future__ import annotations

import functools
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from samkit.data.fetch import fetch_resources
from samkit.data.idx import CorruptFileError, read_idx
from samkit.data.mnist1d import make_mnist1d
from samkit.data.paths import (
    FILE_SPECS,
    DataDirError,
    DataNotFoundError,
    default_download_dir,
    find_file,
    not_found_message,
    resolve_data_dir,
)
from samkit.data.split import (
    DataSplit,
    check_seed,
    flip_labels,
    standardization_stats,
    subset_indices,
)
from samkit.data.verify import SPLIT_SIZES, verify_dataset, verify_requested

DATASETS = ("fashion-mnist", "mnist", "cifar10", "cifar100", "digits", "mnist1d", "synthetic")
_ALIASES = {
    "fashion_mnist": "fashion-mnist", "fashionmnist": "fashion-mnist", "fmnist": "fashion-mnist",
    "cifar-10": "cifar10", "cifar_10": "cifar10", "cifar-100": "cifar100",
    "cifar_100": "cifar100", "mnist-1d": "mnist1d", "mnist_1d": "mnist1d",
}  # fmt: skip


def canonical_name(name: str) -> str:
    """The data set's canonical name (``"FashionMNIST"`` → ``"fashion-mnist"``), or a
    ValueError listing the known ones."""
    key = name.strip().lower() if isinstance(name, str) else name
    key = _ALIASES.get(key, key)
    if key not in DATASETS:
        raise ValueError(f"Unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    return key

FASHION_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip


@dataclass(frozen=True)
class _Raw:
    """A data set as loaded: arrays in their stored dtype, before any processing."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    classes: tuple[str, ...]
    scale: float  # multiply x by this to get floats (1/255 for bytes)


# ---------------------------------------------------------------------------------------------
# On-disk formats


def _corrupt(name: str, err: Exception) -> CorruptFileError:
    how = FILE_SPECS[name].how_to_get
    return CorruptFileError(f"{err}\nTo fix it, delete the file and get it again: {how}.")


def _load_idx(name: str, folder: Path) -> _Raw:
    spec = FILE_SPECS[name]
    paths = [find_file(folder, alts) for alts in spec.files]
    if any(p is None for p in paths):
        raise DataNotFoundError(not_found_message(name, [folder]))
    try:
        arrays = [read_idx(p) for p in paths]
    except CorruptFileError as err:
        raise _corrupt(name, err) from err
    x_train, y_train, x_test, y_test = arrays
    for x, y, px, py in ((x_train, y_train, paths[0], paths[1]), (x_test, y_test, paths[2],
                                                                   paths[3])):
        if x.ndim != 3 or y.ndim != 1 or x.dtype != np.uint8:
            raise _corrupt(name, CorruptFileError(
                f"{px}: expected uint8 images N×H×W and labels N, got {x.dtype} {x.shape} and "
                f"{y.shape} in {py}"))
        if len(x) != len(y):
            raise _corrupt(name, CorruptFileError(
                f"{px} holds {len(x)} images but {py} holds {len(y)} labels"))
        if len(y) and (y.min() < 0 or y.max() > 9):
            raise _corrupt(name, CorruptFileError(f"{py}: labels outside 0..9"))
    classes = FASHION_CLASSES if name == "fashion-mnist" else tuple(str(i) for i in range(10))
    return _Raw(x_train[:, None], y_train.astype(np.int64), x_test[:, None],
                y_test.astype(np.int64), 10, classes, 1.0 / 255.0)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR batches (dicts of bytes, lists and numpy arrays) and nothing else:
    a pickle that names any other global is refused rather than executed."""

    _ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):  # noqa: D102
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        if module.startswith("numpy") and name in ("_reconstruct", "scalar"):
            try:
                from numpy._core import multiarray  # numpy >= 2
            except ImportError:  # pragma: no cover - numpy 1.x
                from numpy.core import multiarray
            return getattr(multiarray, name)
        return super().find_class(module, name)


def _read_cifar_batch(name: str, path: Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            batch = _NumpyOnlyUnpickler(f, encoding="bytes").load()
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[label_key], dtype=np.int64)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
            raise ValueError(
                f"expected data N×3072 and N labels, got data {data.shape}, {len(labels)} labels")
    except (OSError, EOFError, pickle.UnpicklingError, KeyError, TypeError, ValueError,
            AttributeError, IndexError) as err:
        raise _corrupt(name, CorruptFileError(
            f"{path}: not a CIFAR python batch ({type(err).__name__}: {err})")) from err
    return data.reshape(-1, 3, 32, 32), labels


def _load_cifar10(folder: Path) -> _Raw:
    base = folder / "cifar-10-batches-py"
    train = [_read_cifar_batch("cifar10", base / f"data_batch_{i}", b"labels") for i in range(1, 6)]
    x_test, y_test = _read_cifar_batch("cifar10", base / "test_batch", b"labels")
    x_train = np.concatenate([x for x, _ in train])
    y_train = np.concatenate([y for _, y in train])
    _check_labels("cifar10", base, 10, y_train, y_test)
    return _Raw(x_train, y_train, x_test, y_test, 10, CIFAR10_CLASSES, 1.0 / 255.0)


def _load_cifar100(folder: Path) -> _Raw:
    base = folder / "cifar-100-python"
    x_train, y_train = _read_cifar_batch("cifar100", base / "train", b"fine_labels")
    x_test, y_test = _read_cifar_batch("cifar100", base / "test", b"fine_labels")
    _check_labels("cifar100", base, 100, y_train, y_test)
    classes = tuple(str(i) for i in range(100))
    if (base / "meta").is_file():
        try:
            with open(base / "meta", "rb") as f:
                meta = _NumpyOnlyUnpickler(f, encoding="bytes").load()
            names = tuple(n.decode() for n in meta[b"fine_label_names"])
            if len(names) == 100:
                classes = names
        except Exception:  # noqa: BLE001 - class names are cosmetic; the numbers still work
            pass
    return _Raw(x_train, y_train, x_test, y_test, 100, classes, 1.0 / 255.0)


def _check_labels(name: str, base: Path, k: int, *labels: np.ndarray) -> None:
    for y in labels:
        if len(y) and (y.min() < 0 or y.max() >= k):
            raise _corrupt(name, CorruptFileError(f"{base}: labels outside 0..{k - 1}"))


# ---------------------------------------------------------------------------------------------
# Data sets made in memory


def _stratified_split(y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        k = int(round(len(idx) * test_fraction))
        test.append(idx[:k])
        train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _load_digits() -> _Raw:
    from samkit._extras import require_dataset

    require_dataset("digits")
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = bunch.images.astype(np.float32)[:, None]  # N×1×8×8, values 0..16
    y = bunch.target.astype(np.int64)
    # A fixed stratified 80/20 split (1,438 / 359): the same test set for every run and seed.
    tr, te = _stratified_split(y, 0.2, seed=0)
    return _Raw(x[tr], y[tr], x[te], y[te], 10, tuple(str(i) for i in range(10)), 1.0 / 16.0)


def _load_mnist1d() -> _Raw:
    x_train, y_train, x_test, y_test = make_mnist1d()
    return _Raw(x_train, y_train, x_test, y_test, 10, tuple(str(i) for i in range(10)), 1.0)


def make_synthetic(
    n_train: int = 2048, n_test: int = 1024, dim: int = 32, num_classes: int = 10,
    separation: float = 0.5, seed: int = 1234,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A seeded Gaussian mixture: class means ``N(0, separation² I)`` in ``dim`` dimensions,
    unit-variance examples, balanced classes. Learnable but not separable (about 85-90% Bayes
    accuracy at the defaults). Returns ``(x_train, y_train, x_test, y_test)``."""
    rng = np.random.default_rng(seed)
    means = separation * rng.standard_normal((num_classes, dim))

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.permutation(np.arange(n) % num_classes).astype(np.int64)
        x = means[y] + rng.standard_normal((n, dim))
        return x.astype(np.float32), y

    x_train, y_train = draw(n_train)
    x_test, y_test = draw(n_test)
    return x_train, y_train, x_test, y_test


def _load_synthetic() -> _Raw:
    x_train, y_train, x_test, y_test = make_synthetic()
    return _Raw(x_train, y_train, x_test, y_test, 10, tuple(str(i) for i in range(10)), 1.0)


# ---------------------------------------------------------------------------------------------
# The public loader


@functools.lru_cache(maxsize=4)
def _load_raw_cached(name: str, folder: str | None, stamp: tuple[float, ...]) -> _Raw:
    # Cached so that `samkit compare` (several optimizers and seeds in one process) reads and
    # decompresses the files once; `stamp` (file mtimes) invalidates the cache when they change.
    if name in ("fashion-mnist", "mnist"):
        return _load_idx(name, Path(folder))
    if name == "cifar10":
        return _load_cifar10(Path(folder))
    if name == "cifar100":
        return _load_cifar100(Path(folder))
    if name == "digits":
        return _load_digits()
    if name == "mnist1d":
        return _load_mnist1d()
    return _load_synthetic()


def _load_raw(name: str, data_dir: str | Path | None, download: bool, verify: bool = True
              ) -> _Raw:
    if name not in FILE_SPECS:
        return _load_raw_cached(name, None, ())
    try:
        folder = resolve_data_dir(name, data_dir)
    except (DataNotFoundError, DataDirError):  # with download, a missing folder is made
        if not download:
            raise
        folder = default_download_dir(name, data_dir)
        fetch_resources(FILE_SPECS[name].resources, folder)
        folder = resolve_data_dir(name, folder)
    if verify:  # the official files? split sizes and checksums (digests cached on disk)
        verify_dataset(name, folder)
    stamp = tuple(
        p.stat().st_mtime for alts in FILE_SPECS[name].files if (p := find_file(folder, alts))
    )
    raw = _load_raw_cached(name, str(folder), stamp)
    if verify:
        for split, (n, expected) in enumerate(zip((len(raw.y_train), len(raw.y_test)),
                                                  SPLIT_SIZES[name], strict=True)):
            if n != expected:
                raise CorruptFileError(
                    f"{folder}: the {('training', 'test')[split]} set of {name} holds {n} "
                    f"examples, but the official one has {expected}")
    return raw


def load_dataset(
    name: str,
    data_dir: str | Path | None = None,
    subset: int | None = None,
    stratified: bool = True,
    label_noise: float = 0.0,
    seed: int = 0,
    standardize: bool = True,
    device: str | torch.device = "cpu",
    download: bool = False,
    verify: bool | None = None,
) -> tuple[DataSplit, DataSplit]:
    """Load a data set as ``(train, test)`` :class:`DataSplit` on ``device``.

    Args:
        name: one of ``"fashion-mnist"``, ``"mnist"``, ``"cifar10"``, ``"cifar100"`` (read from
            disk), ``"digits"`` (scikit-learn's 8×8 digits, a fixed 1,438/359 split),
            ``"mnist1d"`` (generated locally, 4,000/1,000, length 40) or ``"synthetic"`` (a
            Gaussian mixture, 2,048/1,024, 32 features).
        data_dir: a folder to search first (``--data-dir``); then ``$SAMKIT_DATA`` and the
            standard places, see :func:`samkit.data.resolve_data_dir`.
        subset: keep only this many training examples (the test split is never reduced).
        stratified: with ``subset``, keep each class's share (drawn with ``seed``); if False
            take the first ``subset`` examples.
        label_noise: symmetric label noise: exactly ``round(label_noise * N)`` training labels,
            chosen with ``seed``, each changed to a different class drawn uniformly.
        seed: seeds the subset and the noise (the data set itself is the same for every seed).
        standardize: subtract the training mean and divide by the training standard deviation,
            per channel for images and per feature for vectors (train statistics for both
            splits). Otherwise pixels are scaled to [0, 1].
        device: where the tensors go; they stay there (iterate with
            :func:`samkit.data.iterate_batches`).
        download: if the files are not found, download them from the official URLs (checksums
            verified) into ``data_dir``, ``$SAMKIT_DATA/<name>`` or ``~/.cache/samkit/<name>``.
        verify: check that files read from disk are the official data set: each split's size
            and each file's published checksum (hashed once, then cached by path, size and
            modification time in ``~/.cache/samkit/verified.json``); see
            :mod:`samkit.data.verify`. None (the default): on, unless ``$SAMKIT_VERIFY_DATA=0``.
            Turn it off only for data that is knowingly not the official files (your own
            files in the IDX or CIFAR format, tests' fakes).

    Images are float32 ``N×C×H×W``, vectors float32 ``N×D``, labels int64.

    Raises:
        ValueError: an unknown ``name`` or a bad ``subset``, ``label_noise`` or ``seed``.
        DataNotFoundError: the files are nowhere; the message says where samkit looked and how
            to get them.
        CorruptFileError: a file is truncated or not in the expected format, or (``verify``)
            a split has the wrong size (swapped train and test files).
        ChecksumError: (``verify``) a file is not the official one (another data set under
            these names, an altered copy).
    """
    name = canonical_name(name)
    if isinstance(label_noise, bool) or not isinstance(label_noise, (int, float)) or not (
        0.0 <= label_noise <= 1.0
    ):
        raise ValueError(f"Invalid label_noise: {label_noise!r} (a fraction in [0, 1])")
    seed = check_seed(seed)
    device = torch.device(device)
    raw = _load_raw(name, data_dir, download, verify_requested(verify))

    # 1. Subset of the training set (indices into the stored arrays, nothing copied yet).
    x_train_np, y_train_np = raw.x_train, raw.y_train
    if subset is not None:
        idx = subset_indices(y_train_np, subset, stratified=stratified, seed=seed)
        x_train_np, y_train_np = x_train_np[idx], y_train_np[idx]

    # 2. To float tensors (new memory: the cached arrays are never modified).
    def to_float(a: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.array(a, dtype=np.float32))
        return t.mul_(raw.scale) if raw.scale != 1.0 else t

    x_train, x_test = to_float(x_train_np), to_float(raw.x_test)
    y_train = torch.from_numpy(np.array(y_train_np, dtype=np.int64))
    y_test = torch.from_numpy(np.array(raw.y_test, dtype=np.int64))

    # 3. Label noise on the training labels only.
    if label_noise > 0:
        y_train, _ = flip_labels(y_train, raw.num_classes, label_noise, seed=seed)

    # 4. Standardize with the training statistics.
    if standardize:
        mean, std = standardization_stats(x_train)
        x_train = x_train.sub_(mean).div_(std)
        x_test = x_test.sub_(mean).div_(std)

    shape = tuple(x_train.shape[1:])
    train = DataSplit(x_train.to(device), y_train.to(device), raw.num_classes, shape, name,
                      raw.classes)
    test = DataSplit(x_test.to(device), y_test.to(device), raw.num_classes, shape, name,
                     raw.classes)
    return train, test


def download_dataset(name: str, data_dir: str | Path | None = None) -> Path:
    """Download data set ``name`` from its official URLs (checksums verified, written
    atomically) unless it is already found; returns the folder that holds it."""
    name = canonical_name(name)
    if name not in FILE_SPECS:
        raise ValueError(
            f"Data set {name!r} is not downloaded; downloadable: {', '.join(sorted(FILE_SPECS))}"
        )
    try:
        return resolve_data_dir(name, data_dir)
    except (DataNotFoundError, DataDirError):  # a folder that does not exist yet is made
        folder = default_download_dir(name, data_dir)
        fetch_resources(FILE_SPECS[name].resources, folder)
        return resolve_data_dir(name, folder)
