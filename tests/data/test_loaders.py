"""The on-disk loaders on tiny files in the real formats; missing and corrupt files."""

from __future__ import annotations

import gzip
import os
import pickle

import numpy as np
import pytest
import torch
from dataformats import make_cifar10, make_cifar100, make_idx_dataset, write_cifar_batch, write_idx

from samkit.data import (
    DATASETS,
    CorruptFileError,
    DataNotFoundError,
    DataSplit,
    load_dataset,
    read_idx,
    resolve_data_dir,
    search_dirs,
)


@pytest.mark.parametrize("gz", [True, False], ids=["gzipped", "raw"])
@pytest.mark.parametrize("name", ["fashion-mnist", "mnist"])
def test_idx_loader_reads_the_files_exactly(isolated, name, gz):
    folder = isolated / "d"
    arrays = make_idx_dataset(folder, gz=gz)
    train, test = load_dataset(name, data_dir=folder, standardize=False)
    assert isinstance(train, DataSplit) and train.name == name
    assert train.x.shape == (40, 1, 28, 28) and test.x.shape == (20, 1, 28, 28)
    assert train.x.dtype == torch.float32 and train.y.dtype == torch.int64
    assert train.input_shape == (1, 28, 28) and train.num_classes == 10
    expected = torch.from_numpy(arrays["train-images-idx3-ubyte"].astype(np.float32) / 255)
    torch.testing.assert_close(train.x[:, 0], expected)
    assert train.y.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    assert test.y.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    if name == "fashion-mnist":
        assert train.classes[0] == "T-shirt/top" and len(train.classes) == 10


def test_standardize_uses_train_statistics(isolated):
    make_idx_dataset(isolated / "d")
    raw_train, raw_test = load_dataset("mnist", data_dir=isolated / "d", standardize=False)
    train, test = load_dataset("mnist", data_dir=isolated / "d")
    assert abs(train.x.mean().item()) < 1e-5 and abs(train.x.std(unbiased=False).item() - 1) < 1e-4
    mean, std = raw_train.x.double().mean(), raw_train.x.double().std(unbiased=False)
    torch.testing.assert_close(test.x.double(), (raw_test.x.double() - mean) / std,
                               atol=1e-5, rtol=1e-5)


def test_cifar10_pickles(isolated):
    written = make_cifar10(isolated / "c10")
    train, test = load_dataset("cifar10", data_dir=isolated / "c10", standardize=False)
    assert train.x.shape == (50, 3, 32, 32) and test.x.shape == (10, 3, 32, 32)
    data, labels = written["train"][0]
    # Row-major N×3072: 1024 red, then 1024 green, then 1024 blue values.
    torch.testing.assert_close(train.x[:10], torch.from_numpy(
        data.reshape(10, 3, 32, 32).astype(np.float32) / 255))
    assert train.y[:10].tolist() == list(labels)
    assert train.classes[0] == "airplane"
    std_train, _ = load_dataset("cifar10", data_dir=isolated / "c10")
    per_channel = std_train.x.transpose(0, 1).reshape(3, -1)
    torch.testing.assert_close(per_channel.mean(1), torch.zeros(3), atol=1e-5, rtol=0)


def test_cifar100_pickles_fine_labels(isolated):
    written = make_cifar100(isolated / "c100")
    train, test = load_dataset("cifar100", data_dir=isolated / "c100", standardize=False)
    assert train.num_classes == 100 and train.x.shape == (50, 3, 32, 32)
    assert test.y.tolist() == list(written["test"][1])
    assert train.classes[3] == "class3"


def test_search_order_data_dir_then_env_then_standard_places(isolated, monkeypatch):
    env = isolated / "env"
    make_idx_dataset(env / "mnist", seed=1)  # $SAMKIT_DATA/<name>
    monkeypatch.setenv("SAMKIT_DATA", str(env))
    assert resolve_data_dir("mnist") == env / "mnist"
    explicit = isolated / "explicit"
    make_idx_dataset(explicit, seed=2)
    assert resolve_data_dir("mnist", explicit) == explicit  # --data-dir first
    dirs = search_dirs("mnist", explicit)
    assert dirs[:4] == [explicit, explicit / "mnist", env, env / "mnist"]
    assert dirs[4] == isolated / "system" / "mnist"  # then /usr/share/datasets/<name>, ...
    assert dirs[5] == isolated / "home" / ".cache" / "samkit" / "mnist"


def test_standard_place_home_cache(isolated):
    make_idx_dataset(isolated / "home" / ".cache" / "samkit" / "fashion-mnist")
    train, _ = load_dataset("fashion-mnist")
    assert len(train) == 40


def test_missing_files_say_where_and_how(isolated):
    # a --data-dir that does not exist is an error of its own, naming it (issue 14)
    from samkit.data.paths import DataDirError

    with pytest.raises(DataDirError, match="--data-dir '.*nowhere' does not exist"):
        load_dataset("fashion-mnist", data_dir=isolated / "nowhere")
    (isolated / "nowhere").mkdir()  # an existing folder without the files: where samkit looked
    with pytest.raises(DataNotFoundError) as info:
        load_dataset("fashion-mnist", data_dir=isolated / "nowhere")
    msg = str(info.value)
    assert str(isolated / "nowhere") in msg
    assert str(isolated / "system" / "fashion-mnist") in msg
    assert "apt-get install dataset-fashion-mnist" in msg
    assert "SAMKIT_DATA" in msg and "--data-dir" in msg and "download=True" in msg
    assert isinstance(info.value, FileNotFoundError)
    with pytest.raises(DataNotFoundError, match="cifar-10-python.tar.gz"):
        load_dataset("cifar10")


def test_one_file_missing_is_not_found(isolated):
    make_idx_dataset(isolated / "d")
    (isolated / "d" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataNotFoundError, match="t10k-labels-idx1-ubyte"):
        load_dataset("mnist", data_dir=isolated / "d")


def _truncate(path, keep):
    raw = gzip.decompress(path.read_bytes())
    with gzip.open(path, "wb") as f:
        f.write(raw[:keep])


@pytest.mark.parametrize("damage", ["truncated", "bad-magic", "not-gzip", "count-mismatch"])
def test_corrupt_idx_files_are_reported(isolated, damage):
    folder = isolated / "d"
    make_idx_dataset(folder)
    images = folder / "train-images-idx3-ubyte.gz"
    if damage == "truncated":
        _truncate(images, 1000)
    elif damage == "bad-magic":
        with gzip.open(images, "wb") as f:
            f.write(b"\x12\x34\x56\x78" + bytes(100))
    elif damage == "not-gzip":
        images.write_bytes(b"this is not gzip data at all")
    else:
        write_idx(folder / "train-labels-idx1-ubyte.gz", np.zeros(39, dtype=np.uint8))
    with pytest.raises(CorruptFileError) as info:
        load_dataset("mnist", data_dir=folder)
    msg = str(info.value)
    assert "train-" in msg and str(folder) in msg
    assert "get it again" in msg


def test_read_idx_raw_matches(tmp_path):
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a-idx3-ubyte", arr)
    np.testing.assert_array_equal(read_idx(tmp_path / "a-idx3-ubyte"), arr)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "wrong-shape", "missing-key"])
def test_corrupt_cifar_batches_are_reported(isolated, damage):
    make_cifar10(isolated / "c")
    batch = isolated / "c" / "cifar-10-batches-py" / "data_batch_3"
    if damage == "garbage":
        batch.write_bytes(b"\x00garbage")
    elif damage == "truncated":
        batch.write_bytes(batch.read_bytes()[:500])
    elif damage == "wrong-shape":
        write_cifar_batch(batch, np.zeros((10, 100), dtype=np.uint8), range(10))
    else:
        with open(batch, "wb") as f:
            pickle.dump({b"labels": [0]}, f, protocol=2)
    with pytest.raises(CorruptFileError, match="data_batch_3"):
        load_dataset("cifar10", data_dir=isolated / "c")


def test_cifar_pickle_with_foreign_globals_is_refused(isolated):
    """A pickle can run code when loaded; the CIFAR reader only accepts numpy arrays."""
    make_cifar10(isolated / "c")

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with open(isolated / "c" / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": [0]}, f, protocol=2)
    with pytest.raises(CorruptFileError, match="refusing"):
        load_dataset("cifar10", data_dir=isolated / "c")


def test_unknown_dataset_names_the_allowed_ones():
    with pytest.raises(ValueError, match=r"'imagenet'.*fashion-mnist.*cifar10"):
        load_dataset("imagenet")


def test_aliases():
    train, _ = load_dataset("MNIST-1D", subset=50)
    assert train.name == "mnist1d"


def test_all_names_listed():
    assert set(DATASETS) == {"fashion-mnist", "mnist", "cifar10", "cifar100", "digits",
                             "mnist1d", "synthetic"}
