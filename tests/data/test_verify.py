"""Wrong data is refused (issue 26, finding 8): swapped splits, another data set under the names,
a named folder with only some files; checksums are checked once and cached."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from dataformats import make_cifar10, make_idx_dataset
from realdata import require_fashion_mnist

import samkit.data
from samkit.data import ChecksumError, CorruptFileError, DataNotFoundError, load_dataset, paths


class _Verify:
    """``samkit.data.verify``, imported when a test uses it (so that the tests of the behaviour
    alone also run, and fail, against a samkit without the module)."""

    def __getattr__(self, name):
        from samkit.data import verify

        return getattr(verify, name)


V = _Verify()

REAL = Path("/usr/share/datasets/fashion-mnist")
IDX = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
       "t10k-labels-idx1-ubyte")


@pytest.fixture
def verifying(isolated, monkeypatch):
    """The isolated folders, with verification on (the default for users)."""
    monkeypatch.delenv("SAMKIT_VERIFY_DATA")
    return isolated


def real_folder() -> Path:
    require_fashion_mnist()
    return paths.resolve_data_dir("fashion-mnist")


def link_real(folder: Path, mapping: dict[str, str]) -> Path:
    """``folder`` with symbolic links to the real files (name -> real name)."""
    src = real_folder()
    folder.mkdir(parents=True)
    for name, real in mapping.items():
        (folder / (name + ".gz")).symlink_to(src / (real + ".gz"))
    return folder


def test_the_real_files_are_the_official_ones(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # the digest cache goes there
    V.verify_dataset("fashion-mnist", real_folder())  # Debian's re-gzipped files pass


def test_swapped_train_and_test_files_are_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # the digest cache goes there
    monkeypatch.delenv("SAMKIT_VERIFY_DATA", raising=False)
    swapped = {"train-images-idx3-ubyte": "t10k-images-idx3-ubyte",
               "train-labels-idx1-ubyte": "t10k-labels-idx1-ubyte",
               "t10k-images-idx3-ubyte": "train-images-idx3-ubyte",
               "t10k-labels-idx1-ubyte": "train-labels-idx1-ubyte"}
    folder = link_real(tmp_path / "swapped", swapped)
    with pytest.raises(CorruptFileError, match="swapped") as err:
        load_dataset("fashion-mnist", data_dir=folder)
    assert "train-images-idx3-ubyte.gz: holds 10000 images" in str(err.value)
    assert "has 60000" in str(err.value)


def test_another_data_set_under_the_names_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("SAMKIT_VERIFY_DATA", raising=False)
    folder = link_real(tmp_path / "mnist", {n: n for n in IDX})  # Fashion-MNIST as "mnist"
    with pytest.raises(ChecksumError, match="not the official mnist file") as err:
        load_dataset("mnist", data_dir=folder)
    assert "verify=False" in str(err.value)  # the way out, for data knowingly not official


def test_fake_data_under_the_official_names_is_refused(verifying, monkeypatch):
    make_idx_dataset(verifying / "d", n_train=40, n_test=20)
    monkeypatch.setitem(V.SPLIT_SIZES, "fashion-mnist", (40, 20))  # sizes right, content not
    with pytest.raises(ChecksumError, match="train-images-idx3-ubyte"):
        load_dataset("fashion-mnist", data_dir=verifying / "d")
    # explicitly off (argument or environment): the fakes load
    train, test = load_dataset("fashion-mnist", data_dir=verifying / "d", verify=False)
    assert (len(train), len(test)) == (40, 20)
    monkeypatch.setenv("SAMKIT_VERIFY_DATA", "0")
    assert len(load_dataset("fashion-mnist", data_dir=verifying / "d")[0]) == 40
    monkeypatch.setenv("SAMKIT_VERIFY_DATA", "maybe")
    with pytest.raises(ValueError, match="SAMKIT_VERIFY_DATA"):
        load_dataset("fashion-mnist", data_dir=verifying / "d")


def test_swapped_fake_splits_are_named(verifying, monkeypatch):
    make_idx_dataset(verifying / "d", n_train=20, n_test=40)  # the sizes of the other split
    monkeypatch.setitem(V.SPLIT_SIZES, "mnist", (40, 20))
    with pytest.raises(CorruptFileError, match=r"holds 20 images, but the training set of mnist "
                                               r"has 40 \(the test set has 20: are the train"):
        load_dataset("mnist", data_dir=verifying / "d")


def test_cifar_split_sizes_are_checked(verifying, monkeypatch):
    make_cifar10(verifying / "c")
    monkeypatch.setitem(V.CONTENT_MD5, "cifar10", {})  # fakes: only the sizes are checked
    with pytest.raises(CorruptFileError, match="training set of cifar10 holds 50 examples, but "
                                               "the official one has 50000"):
        load_dataset("cifar10", data_dir=verifying / "c")


def test_a_named_folder_with_some_files_is_an_error_not_a_fallback(isolated, monkeypatch):
    make_idx_dataset(isolated / "system" / "mnist")  # a complete copy in the standard place
    partial = isolated / "mine"
    make_idx_dataset(partial)
    (partial / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataNotFoundError, match="not t10k-labels-idx1-ubyte or "
                                                "t10k-labels-idx1-ubyte.gz") as err:
        load_dataset("mnist", data_dir=partial)
    assert str(partial) in str(err.value)
    assert isinstance(err.value, samkit.data.IncompleteDataError)
    with monkeypatch.context() as m:  # the same for $SAMKIT_DATA
        m.setenv("SAMKIT_DATA", str(partial))
        with pytest.raises(DataNotFoundError, match="holds some of its files"):
            load_dataset("mnist")
    # a folder with none of the files is still skipped, and the standard places searched
    assert len(load_dataset("mnist", data_dir=isolated / "work")[0]) == 40


def test_digests_are_cached_by_path_size_and_mtime(verifying, monkeypatch):
    arrays = make_idx_dataset(verifying / "d", n_train=40, n_test=20)
    files = {n: verifying / "d" / (n + ".gz") for n in IDX}
    digests = {n: V.content_md5(p) for n, p in files.items()}
    monkeypatch.setitem(V.CONTENT_MD5, "mnist", digests)
    monkeypatch.setitem(V.SPLIT_SIZES, "mnist", (40, 20))
    assert len(load_dataset("mnist", data_dir=verifying / "d")[0]) == 40
    cache = json.loads((verifying / "home" / ".cache" / "samkit" / "verified.json").read_text())
    assert {cache[str(p.resolve())]["md5"] for p in files.values()} == set(digests.values())

    def no_hashing(path):
        raise AssertionError(f"hashed {path} again")

    with monkeypatch.context() as m:
        m.setattr(V, "content_md5", no_hashing)
        V.verify_dataset("mnist", verifying / "d")  # from the cache
    # a changed file (new size and mtime) is hashed again, and refused
    labels = arrays["train-labels-idx1-ubyte"].copy()
    labels[0] = 9
    from dataformats import write_idx

    write_idx(files["train-labels-idx1-ubyte"], labels)
    os.utime(files["train-labels-idx1-ubyte"], ns=(1, 1))
    with pytest.raises(ChecksumError, match="train-labels-idx1-ubyte"):
        V.verify_dataset("mnist", verifying / "d")


def test_an_unwritable_cache_still_verifies(verifying, monkeypatch):
    make_idx_dataset(verifying / "d", n_train=40, n_test=20)
    home = verifying / "home-is-a-file"
    home.write_text("")
    monkeypatch.setenv("HOME", str(home))  # ~/.cache cannot be created
    monkeypatch.setitem(V.SPLIT_SIZES, "mnist", (40, 20))
    for _ in range(2):
        with pytest.raises(ChecksumError):
            load_dataset("mnist", data_dir=verifying / "d")


def test_idx_header_count(tmp_path):
    from dataformats import write_idx

    path = write_idx(tmp_path / "x-idx1-ubyte", np.zeros(7, dtype=np.uint8))
    assert V.idx_count(path) == 7
    (tmp_path / "bad").write_bytes(b"\x01\x02")
    with pytest.raises(CorruptFileError, match="not an IDX file"):
        V.idx_count(tmp_path / "bad")
