"""Downloading data files: official URLs, checksums verified, written atomically.

Nothing in samkit downloads unless asked (``load_dataset(..., download=True)`` or
``samkit.data.download_dataset(name)``). A download goes to a temporary file next to its
destination and is renamed into place only after its checksum matched, so an interrupted or
corrupt download never leaves a file that looks complete.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from samkit.data.idx import CorruptFileError

_CHUNK = 1 << 20


class ChecksumError(CorruptFileError):
    """A downloaded (or found) file does not have the published checksum."""


@dataclass(frozen=True)
class Resource:
    """One published file of a data set.

    Attributes:
        filename: name of the file on disk.
        url: the official URL.
        md5: the published MD5 (what the data set authors publish; used for integrity only).
        sha256: a SHA-256, where one is known (checked in addition to ``md5``).
        extract_to: for an archive, the folder its contents create (``"cifar-10-batches-py"``);
            ``None`` for a file used as is.
    """

    filename: str
    url: str
    md5: str | None = None
    sha256: str | None = None
    extract_to: str | None = None


def file_digest(path: str | Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file, read in chunks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _verify(path: Path, md5: str | None, sha256: str | None, source: str) -> None:
    for algorithm, expected in (("md5", md5), ("sha256", sha256)):
        if expected is None:
            continue
        got = file_digest(path, algorithm)
        if got.lower() != expected.lower():
            raise ChecksumError(
                f"{source}: {algorithm} checksum mismatch (expected {expected}, got {got}); "
                "the download is corrupt or the file changed upstream"
            )


def download(
    url: str,
    dest: str | Path,
    *,
    md5: str | None = None,
    sha256: str | None = None,
    timeout: float = 60.0,
    progress: bool = False,
) -> Path:
    """Download ``url`` to the file ``dest`` and verify its checksum(s).

    The bytes go to a temporary file in ``dest``'s folder, are hashed on the way, and the file
    is renamed to ``dest`` only when every given checksum matches; on any failure the
    temporary file is removed and nothing is left at ``dest``. If ``dest`` already exists with
    the right checksum, nothing is downloaded. Any URL that :mod:`urllib` opens works
    (``https://``, ``http://``, ``file://``).

    Raises:
        ChecksumError: the bytes do not have the expected checksum.
        OSError: the URL cannot be fetched (``urllib.error.URLError`` is an ``OSError``).
    """
    dest = Path(dest)
    if dest.is_file():
        try:
            _verify(dest, md5, sha256, str(dest))
            return dest
        except ChecksumError:
            pass  # a stale or corrupt copy: fetch it again, it is replaced atomically below
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        hashes = {a: hashlib.new(a) for a, e in (("md5", md5), ("sha256", sha256)) if e}
        out = os.fdopen(fd, "wb")
        try:
            resp = urllib.request.urlopen(url, timeout=timeout)  # noqa: S310 - our URLs
        except urllib.error.HTTPError as err:  # the server answered: keep its error type
            out.close()
            err.msg = (f"{err.msg} for {url}; fetch that file elsewhere and put it at {dest} "
                       "(checksums are verified), then run again")
            raise
        except (OSError, ValueError) as err:
            out.close()
            reason = getattr(err, "reason", None) or err
            raise DownloadError(
                f"Cannot download {url}: {reason}. Without a network, fetch that file "
                f"elsewhere and put it at {dest} (checksums are verified), then run again"
            ) from err
        with out, resp:
            total = int(resp.headers.get("Content-Length") or 0)
            done, next_report = 0, 0.1
            for chunk in iter(lambda: resp.read(_CHUNK), b""):
                out.write(chunk)
                for h in hashes.values():
                    h.update(chunk)
                done += len(chunk)
                if progress and total and done / total >= next_report:
                    print(f"  {dest.name}: {done / total:4.0%} of {total / 1e6:.1f} MB",
                          file=sys.stderr)
                    next_report += 0.1
            out.flush()
            os.fsync(out.fileno())
        for algorithm, h in hashes.items():
            expected = md5 if algorithm == "md5" else sha256
            if h.hexdigest().lower() != str(expected).lower():
                raise ChecksumError(
                    f"{url}: {algorithm} checksum mismatch (expected {expected}, got "
                    f"{h.hexdigest()}); the download is corrupt or the file changed upstream. "
                    f"Nothing was written to {dest}"
                )
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dest


class DownloadError(urllib.error.URLError):
    """A URL could not be fetched; the message names it and where to put the file by hand
    (a :class:`urllib.error.URLError`, so an :class:`OSError`)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


def _safe_extract(archive: Path, into: Path) -> None:
    with tarfile.open(archive) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(into, filter="data")
        else:  # Python < 3.11.4: refuse absolute paths, parent references and links
            root = into.resolve()
            for member in tar.getmembers():
                target = (into / member.name).resolve()
                if root not in target.parents and target != root:
                    raise CorruptFileError(f"{archive}: unsafe path in archive: {member.name!r}")
                if member.issym() or member.islnk() or member.isdev():
                    raise CorruptFileError(f"{archive}: unsupported member type: {member.name!r}")
            tar.extractall(into)


def fetch_resources(
    resources: tuple[Resource, ...], root: str | Path, progress: bool = True
) -> Path:
    """Download every resource into ``root`` (verified), extracting archives atomically.

    An archive is extracted into a temporary folder inside ``root`` and its top folder renamed
    into place, so a failed extraction leaves no partial folder behind. Returns ``root``.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for res in resources:
        if res.extract_to is not None and (root / res.extract_to).is_dir():
            continue
        path = download(res.url, root / res.filename, md5=res.md5, sha256=res.sha256,
                        progress=progress)
        if res.extract_to is None:
            continue
        tmp = Path(tempfile.mkdtemp(prefix=".extract.", dir=root))
        try:
            _safe_extract(path, tmp)
            if not (tmp / res.extract_to).is_dir():
                raise CorruptFileError(f"{path}: the archive holds no folder {res.extract_to!r}")
            os.replace(tmp / res.extract_to, root / res.extract_to)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        path.unlink(missing_ok=True)  # the extracted folder is what the loaders read
    return root
