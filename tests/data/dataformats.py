"""Writers for tiny data files in the real on-disk formats (IDX, CIFAR python pickles)."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np


def write_idx(path: Path, array: np.ndarray) -> Path:
    """An IDX file as LeCun's MNIST files are: magic 0x0000_08_<ndim>, big-endian dims, bytes."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    raw = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    raw += array.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(raw)
    else:
        path.write_bytes(raw)
    return path


def make_idx_dataset(folder: Path, n_train=40, n_test=20, gz=True, seed=0) -> dict:
    """The four MNIST/Fashion-MNIST files with random 28×28 images and balanced labels."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": (np.arange(n_train) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(n_test) % 10).astype(np.uint8),
    }
    for name, arr in arrays.items():
        write_idx(folder / (name + (".gz" if gz else "")), arr)
    return arrays


def write_cifar_batch(
    path: Path, data: np.ndarray, labels, label_key=b"labels", extra: dict | None = None
) -> None:
    """A CIFAR python batch: a pickled dict of bytes keys, data N×3072 uint8, labels a list."""
    batch = {b"batch_label": b"testing batch", label_key: list(map(int, labels)),
             b"data": np.ascontiguousarray(data, dtype=np.uint8), **(extra or {})}
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(batch, f, protocol=2)


def make_cifar10(root: Path, n_per_batch=10, n_test=10, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    base = root / "cifar-10-batches-py"
    out = {"train": [], "test": None}
    for i in range(1, 6):
        data = rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, n_per_batch)
        write_cifar_batch(base / f"data_batch_{i}", data, labels)
        out["train"].append((data, labels))
    data = rng.integers(0, 256, (n_test, 3072), dtype=np.uint8)
    labels = np.arange(n_test) % 10
    write_cifar_batch(base / "test_batch", data, labels)
    out["test"] = (data, labels)
    return out


def make_cifar100(root: Path, n_train=50, n_test=20, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    base = root / "cifar-100-python"
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        fine = np.arange(n) % 100
        write_cifar_batch(base / split, data, fine, label_key=b"fine_labels",
                          extra={b"coarse_labels": [int(f) // 5 for f in fine]})
        out[split] = (data, fine)
    names = [f"class{i}".encode() for i in range(100)]
    with open(base / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": names, b"coarse_label_names": names[:20]}, f,
                    protocol=2)
    return out
