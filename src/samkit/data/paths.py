"""Where data files live: the search order, the files each data set needs, how to get them."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from samkit.data.fetch import Resource

ENV_VAR = "SAMKIT_DATA"
# Where Debian's dataset-* packages install (dataset-fashion-mnist: <root>/fashion-mnist).
SYSTEM_DATA_ROOT = Path("/usr/share/datasets")

_FASHION_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
_MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
_IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


class DataNotFoundError(FileNotFoundError):
    """A data set's files are in none of the places samkit looks."""


class IncompleteDataError(DataNotFoundError):
    """A folder the user named (``--data-dir``, ``$SAMKIT_DATA``) holds some of a data set's
    files but not all: an error naming the missing ones, never a reason to use another copy."""


class DataDirError(FileNotFoundError):
    """``--data-dir`` or ``$SAMKIT_DATA`` names a folder that does not exist (never a reason to
    look elsewhere: the user asked for that folder)."""


def check_data_roots(data_dir: str | Path | None = None) -> None:
    """Raise :class:`DataDirError` when ``data_dir`` or ``$SAMKIT_DATA`` is given and is not an
    existing folder."""
    for what, root in (("--data-dir", data_dir), (f"${ENV_VAR}", os.environ.get(ENV_VAR) or None)):
        if root is not None and not Path(root).expanduser().is_dir():
            raise DataDirError(
                f"{what} {str(root)!r} does not exist or is not a folder (point it at the folder "
                "that holds the data files, or leave it unset to use the standard places)")


@dataclass(frozen=True)
class FileSpec:
    """The files of an on-disk data set.

    Attributes:
        files: required files relative to the data folder; each entry is a tuple of
            alternatives (``("x", "x.gz")``: either one).
        resources: the official downloads (URL and checksum).
        how_to_get: a human sentence on obtaining the files by hand.
    """

    files: tuple[tuple[str, ...], ...]
    resources: tuple[Resource, ...]
    how_to_get: str


FILE_SPECS: dict[str, FileSpec] = {
    "fashion-mnist": FileSpec(
        files=tuple((f, f + ".gz") for f in _IDX_FILES),
        resources=(
            Resource(
                "train-images-idx3-ubyte.gz",
                _FASHION_URL + "train-images-idx3-ubyte.gz",
                md5="8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            ),
            Resource(
                "train-labels-idx1-ubyte.gz",
                _FASHION_URL + "train-labels-idx1-ubyte.gz",
                md5="25c81989df183df01b3e8a0aad5dffbe",
            ),
            Resource(
                "t10k-images-idx3-ubyte.gz",
                _FASHION_URL + "t10k-images-idx3-ubyte.gz",
                md5="bef4ecab320f06d8554ea6380940ec79",
            ),
            Resource(
                "t10k-labels-idx1-ubyte.gz",
                _FASHION_URL + "t10k-labels-idx1-ubyte.gz",
                md5="bb300cfdad3c16e7a12a480ee83cd310",
            ),
        ),
        how_to_get=(
            "on Debian/Ubuntu install it with `sudo apt-get install dataset-fashion-mnist` "
            "(files go to /usr/share/datasets/fashion-mnist); or put the four IDX files "
            "(train-images-idx3-ubyte.gz, ...) in a folder and pass --data-dir DIR or set "
            f"{ENV_VAR}=DIR; or run `samkit download fashion-mnist` "
            f"(load_dataset(..., download=True)) to fetch them from {_FASHION_URL}"
        ),
    ),
    "mnist": FileSpec(
        files=tuple((f, f + ".gz") for f in _IDX_FILES),
        resources=(
            Resource(
                "train-images-idx3-ubyte.gz",
                _MNIST_URL + "train-images-idx3-ubyte.gz",
                md5="f68b3c2dcbeaaa9fbdd348bbdeb94873",
            ),
            Resource(
                "train-labels-idx1-ubyte.gz",
                _MNIST_URL + "train-labels-idx1-ubyte.gz",
                md5="d53e105ee54ea40749a09fcbcd1e9432",
            ),
            Resource(
                "t10k-images-idx3-ubyte.gz",
                _MNIST_URL + "t10k-images-idx3-ubyte.gz",
                md5="9fb629c4189551a2d022fa330f9573f3",
            ),
            Resource(
                "t10k-labels-idx1-ubyte.gz",
                _MNIST_URL + "t10k-labels-idx1-ubyte.gz",
                md5="ec29112dd5afa0611ce80d1b7f02629c",
            ),
        ),
        how_to_get=(
            "put the four MNIST IDX files (train-images-idx3-ubyte.gz, ...) in a folder and pass "
            f"--data-dir DIR or set {ENV_VAR}=DIR; or run `samkit download mnist` "
            f"(load_dataset(..., download=True)) to fetch them from {_MNIST_URL}"
        ),
    ),
    "cifar10": FileSpec(
        files=tuple(
            (f"cifar-10-batches-py/{f}",)
            for f in (
                "data_batch_1",
                "data_batch_2",
                "data_batch_3",
                "data_batch_4",
                "data_batch_5",
                "test_batch",
            )
        ),
        resources=(
            Resource(
                "cifar-10-python.tar.gz",
                "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                md5="c58f30108f718f92721af3b95e74349a",
                extract_to="cifar-10-batches-py",
            ),
        ),
        how_to_get=(
            "download https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz, extract it (it "
            "creates cifar-10-batches-py/) in a folder and pass --data-dir DIR or set "
            f"{ENV_VAR}=DIR; or run `samkit download cifar10`"
        ),
    ),
    "cifar100": FileSpec(
        files=(("cifar-100-python/train",), ("cifar-100-python/test",)),
        resources=(
            Resource(
                "cifar-100-python.tar.gz",
                "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                md5="eb9058c3a382ffc7106e4002c42a8d85",
                extract_to="cifar-100-python",
            ),
        ),
        how_to_get=(
            "download https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz, extract it (it "
            "creates cifar-100-python/) in a folder and pass --data-dir DIR or set "
            f"{ENV_VAR}=DIR; or run `samkit download cifar100`"
        ),
    ),
}


def search_dirs(name: str, data_dir: str | Path | None = None) -> list[Path]:
    """The folders searched for data set ``name``, in order.

    ``data_dir`` (``--data-dir``) and then ``$SAMKIT_DATA``, each as given and with ``name``
    appended; then the standard places: ``/usr/share/datasets/<name>`` (where Debian's
    ``dataset-*`` packages install), ``~/.cache/samkit/<name>``, ``./data/<name>`` and ``./data``.
    """
    check_data_roots(data_dir)
    dirs: list[Path] = []
    for root in (data_dir, os.environ.get(ENV_VAR) or None):
        if root is not None:
            root = Path(root).expanduser()
            dirs += [root, root / name]
    dirs += [
        SYSTEM_DATA_ROOT / name,
        Path.home() / ".cache" / "samkit" / name,
        Path("data") / name,
        Path("data"),
    ]
    unique: list[Path] = []
    for d in dirs:
        if d not in unique:
            unique.append(d)
    return unique


def default_download_dir(name: str, data_dir: str | Path | None = None) -> Path:
    """Where a download of ``name`` goes: ``data_dir``, else ``$SAMKIT_DATA/<name>``, else
    ``~/.cache/samkit/<name>``."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser() / name
    return Path.home() / ".cache" / "samkit" / name


def find_file(folder: Path, alternatives: tuple[str, ...]) -> Path | None:
    """The first of ``alternatives`` that exists as a file in ``folder``."""
    for rel in alternatives:
        if (folder / rel).is_file():
            return folder / rel
    return None


def _spec(name: str) -> FileSpec:
    if name not in FILE_SPECS:
        raise ValueError(
            f"Data set {name!r} has no files to find; data sets read from disk: "
            f"{', '.join(sorted(FILE_SPECS))}"
        )
    return FILE_SPECS[name]


def resolve_data_dir(name: str, data_dir: str | Path | None = None) -> Path:
    """The folder that holds every file of data set ``name``.

    Searches ``data_dir`` (``--data-dir``), then ``$SAMKIT_DATA``, then the standard places
    (see :func:`search_dirs`), and returns the first folder where all the files are.

    Raises:
        DataNotFoundError: in none of them; the message lists where samkit looked and how to
            get the data.
        ValueError: ``name`` is not a data set read from disk.
    """
    spec = _spec(name)
    dirs = search_dirs(name, data_dir)
    named = set()  # the folders the user asked for: a partial data set there is an error
    for root in (data_dir, os.environ.get(ENV_VAR) or None):
        if root is not None:
            named |= {Path(root).expanduser(), Path(root).expanduser() / name}
    for d in dirs:
        found = [find_file(d, alts) for alts in spec.files]
        if all(p is not None for p in found):
            return d
        if d in named and any(p is not None for p in found):
            missing = [" or ".join(alts) for alts, p in zip(spec.files, found, strict=True)
                       if p is None]
            raise IncompleteDataError(
                f"Data set {name!r}: {d} holds some of its files but not {', '.join(missing)} "
                f"(samkit uses no other copy when a folder is named). To get it: "
                f"{spec.how_to_get}.")
    raise DataNotFoundError(not_found_message(name, dirs))


def not_found_message(name: str, dirs: list[Path]) -> str:
    """The message of :class:`DataNotFoundError`: what was wanted, where, and how to get it."""
    spec = _spec(name)
    wanted = ", ".join(" or ".join(alts) for alts in spec.files)
    looked = "\n".join(f"  - {d.resolve() if not d.is_absolute() else d}" for d in dirs)
    return (
        f"Data set {name!r} not found. samkit looked for {wanted} in:\n{looked}\n"
        f"To get it: {spec.how_to_get}."
    )
