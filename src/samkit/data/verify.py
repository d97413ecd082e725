"""Are the files on disk the official data set? Split sizes and checksums, checked once.

``load_dataset`` calls :func:`verify_dataset` before it reads a data set from disk (unless told
``verify=False`` or ``$SAMKIT_VERIFY_DATA=0``, for data that is knowingly not the official files,
such as the tiny fakes of samkit's tests). It catches what a loader alone would accept: the
train and test files swapped (10,000 training examples, 60,000 "test" ones), MNIST under the
Fashion-MNIST names, a truncated or altered copy.

1. **Split sizes** from the headers (IDX) or the loaded arrays (CIFAR): cheap, and the message
   says what is wrong ("holds 10000 images; the training set has 60000").
2. **Checksums** (MD5) of the *content*: an IDX file is hashed decompressed, so the original
   ``.gz``, a re-compressed copy (Debian's ``dataset-fashion-mnist`` package re-gzips the files)
   and a gunzipped file all pass. A file's digest is cached in ``~/.cache/samkit/verified.json``,
   keyed by its path, size and modification time, so each file is hashed once; when the cache
   cannot be written the files are still verified, every time.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import struct
import tempfile
from pathlib import Path

from samkit.data.fetch import ChecksumError
from samkit.data.idx import CorruptFileError

VERIFY_ENV_VAR = "SAMKIT_VERIFY_DATA"

# MD5 of each file's (uncompressed) content, as published with the data sets (Fashion-MNIST's and
# MNIST's uncompressed files; CIFAR's extracted batches, as torchvision lists them).
CONTENT_MD5: dict[str, dict[str, str]] = {
    "fashion-mnist": {
        "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
        "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
        "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
        "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
    },
    "mnist": {
        "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
        "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
        "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
        "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
    },
    "cifar10": {
        "cifar-10-batches-py/data_batch_1": "c99cafc152244af753f735de768cd75f",
        "cifar-10-batches-py/data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
        "cifar-10-batches-py/data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
        "cifar-10-batches-py/data_batch_4": "634d18415352ddfa80567beed471001a",
        "cifar-10-batches-py/data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
        "cifar-10-batches-py/test_batch": "40351d587109b95175f43aff81a1287e",
    },
    "cifar100": {
        "cifar-100-python/train": "16019d7e3df5f24257cddd939b257f8d",
        "cifar-100-python/test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
    },
}

# (training examples, test examples) of each data set read from disk.
SPLIT_SIZES: dict[str, tuple[int, int]] = {
    "fashion-mnist": (60000, 10000),
    "mnist": (60000, 10000),
    "cifar10": (50000, 10000),
    "cifar100": (50000, 10000),
}

_IDX_SPLITS = {"train-images-idx3-ubyte": 0, "train-labels-idx1-ubyte": 0,
               "t10k-images-idx3-ubyte": 1, "t10k-labels-idx1-ubyte": 1}
_CHUNK = 1 << 20


def verify_requested(verify: bool | None) -> bool:
    """``verify``, or when None, ``$SAMKIT_VERIFY_DATA`` (``0``/``false``/``no``: off; on by
    default)."""
    if verify is not None:
        if not isinstance(verify, bool):
            raise ValueError(f"Invalid verify: {verify!r} (allowed: True, False)")
        return verify
    value = os.environ.get(VERIFY_ENV_VAR, "").strip().lower()
    if value in ("", "1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"Invalid ${VERIFY_ENV_VAR}: {value!r} (allowed: 1 or 0, true or false)")


def _stem(rel: str) -> str:
    return rel[:-3] if rel.endswith(".gz") else rel


def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def idx_count(path: Path) -> int:
    """The number of items an IDX file's header declares (its first dimension)."""
    try:
        with _open(path) as f:
            head = f.read(8)
    except (OSError, EOFError) as err:
        raise CorruptFileError(f"{path}: cannot be read as IDX ({err})") from err
    if len(head) < 8 or head[0] != 0 or head[1] != 0 or head[3] < 1:
        raise CorruptFileError(f"{path}: not an IDX file (bad header {head!r})")
    return struct.unpack(">I", head[4:8])[0]


def split_message(name: str, path: Path, count: int, split: int, what: str) -> str:
    expected = SPLIT_SIZES[name]
    other = expected[1 - split]
    hint = (f" (the {'test' if split == 0 else 'training'} set has {other}: are the train and "
            "test files swapped?)" if count == other else "")
    return (f"{path}: holds {count} {what}, but the {'training' if split == 0 else 'test'} set "
            f"of {name} has {expected[split]}{hint}")


def check_idx_sizes(name: str, paths: dict[str, Path]) -> None:
    """Each IDX file of ``name`` declares its split's size (``paths``: stem -> file)."""
    for stem, path in paths.items():
        split = _IDX_SPLITS[stem]
        count = idx_count(path)
        if count != SPLIT_SIZES[name][split]:
            what = "images" if "images" in stem else "labels"
            raise CorruptFileError(split_message(name, path, count, split, what))


def _cache_file() -> Path:
    return Path.home() / ".cache" / "samkit" / "verified.json"


def _read_cache() -> dict:
    try:
        data = json.loads(_cache_file().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_cache(cache: dict) -> None:
    """Best effort: a cache that cannot be written only means hashing again next time."""
    path = _cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".verified.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(cache, f, indent=0, sort_keys=True)
        os.replace(tmp, path)
    except OSError:
        try:
            os.unlink(tmp)  # type: ignore[possibly-undefined]
        except (OSError, UnboundLocalError):
            pass


def content_md5(path: Path) -> str:
    """MD5 of the file's content (decompressed for ``.gz``)."""
    h = hashlib.md5()  # noqa: S324 - the published checksums are MD5; integrity, not security
    try:
        with _open(path) as f:
            for chunk in iter(lambda: f.read(_CHUNK), b""):
                h.update(chunk)
    except (OSError, EOFError) as err:
        raise CorruptFileError(f"{path}: cannot be read ({err})") from err
    return h.hexdigest()


def check_checksums(name: str, paths: dict[str, Path]) -> None:
    """Each file's content MD5 is the published one (``paths``: key of CONTENT_MD5 -> file);
    digests are cached by path, size and modification time."""
    expected = CONTENT_MD5.get(name, {})
    cache = _read_cache()
    changed = False
    for key, path in paths.items():
        want = expected.get(key)
        if want is None:
            continue
        stat = path.stat()
        ident = str(path.resolve())
        stamp = [stat.st_size, stat.st_mtime_ns]
        entry = cache.get(ident)
        if isinstance(entry, dict) and entry.get("stamp") == stamp:
            got = entry.get("md5")
        else:
            got = content_md5(path)
            cache[ident] = {"stamp": stamp, "md5": got}
            changed = True
        if got != want:
            if changed:
                _write_cache(cache)
            raise ChecksumError(
                f"{path}: not the official {name} file {key} (MD5 of its content {got}, "
                f"expected {want}). Another data set under these names, a swapped or altered "
                "file? Get the official files again; for data that is knowingly not the "
                f"official set, load it with verify=False (or ${VERIFY_ENV_VAR}=0)")
    if changed:
        _write_cache(cache)


def verify_dataset(name: str, folder: Path) -> None:
    """Check the files of ``name`` in ``folder``: the IDX split sizes, then the content
    checksums (CIFAR's split sizes are checked by the loader, from the arrays)."""
    from samkit.data.paths import FILE_SPECS, find_file

    if name not in FILE_SPECS:
        return
    paths = {}
    for alts in FILE_SPECS[name].files:
        path = find_file(folder, alts)
        if path is not None:
            paths[_stem(alts[0])] = path
    if name in ("fashion-mnist", "mnist"):
        check_idx_sizes(name, paths)
    check_checksums(name, paths)
