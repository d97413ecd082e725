"""The download code against file:// URLs and a local HTTP server: checksums, atomic writes,
archive extraction, and load_dataset(download=True)."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import http.server
import io
import tarfile
import threading
import urllib.error

import pytest
from dataformats import make_cifar10, make_idx_dataset

from samkit.data import ChecksumError, Resource, download, fetch_resources, load_dataset, paths


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


@pytest.fixture
def source(tmp_path):
    src = tmp_path / "server" / "file.bin"
    src.parent.mkdir()
    src.write_bytes(b"samkit" * 1000)
    return src


def test_file_url_with_matching_checksums(tmp_path, source):
    data = source.read_bytes()
    dest = tmp_path / "out" / "file.bin"
    got = download(source.as_uri(), dest, md5=_md5(data), sha256=hashlib.sha256(data).hexdigest())
    assert got == dest and dest.read_bytes() == data
    assert sorted(p.name for p in dest.parent.iterdir()) == ["file.bin"]  # no temporary left


def test_checksum_mismatch_leaves_nothing(tmp_path, source):
    dest = tmp_path / "out" / "file.bin"
    with pytest.raises(ChecksumError, match="md5 checksum mismatch") as info:
        download(source.as_uri(), dest, md5="0" * 32)
    assert "Nothing was written" in str(info.value)
    assert not dest.exists() and list(dest.parent.iterdir()) == []
    with pytest.raises(ChecksumError, match="sha256"):
        download(source.as_uri(), dest, sha256="f" * 64)
    assert list(dest.parent.iterdir()) == []


def test_unreachable_url_leaves_nothing(tmp_path):
    dest = tmp_path / "out" / "file.bin"
    with pytest.raises(urllib.error.URLError):
        download((tmp_path / "absent.bin").as_uri(), dest, md5="0" * 32)
    assert list(dest.parent.iterdir()) == []


def test_existing_good_file_is_kept_and_bad_one_replaced(tmp_path, source):
    data = source.read_bytes()
    dest = tmp_path / "file.bin"
    dest.write_bytes(data)
    absent = (tmp_path / "absent").as_uri()
    assert download(absent, dest, md5=_md5(data)) == dest  # verified, nothing fetched
    dest.write_bytes(b"stale")
    download(source.as_uri(), dest, md5=_md5(data))
    assert dest.read_bytes() == data


def test_local_http_server(tmp_path, source):
    handler = functools.partial(
        http.server.SimpleHTTPRequestHandler, directory=str(source.parent)
    )
    handler.log_message = lambda *a, **k: None  # type: ignore[attr-defined]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/file.bin"
        dest = tmp_path / "http" / "file.bin"
        download(url, dest, md5=_md5(source.read_bytes()), progress=True)
        assert dest.read_bytes() == source.read_bytes()
        with pytest.raises(urllib.error.HTTPError):
            download(url.replace("file.bin", "missing.bin"), tmp_path / "http" / "m.bin")
        assert sorted(p.name for p in dest.parent.iterdir()) == ["file.bin"]
    finally:
        server.shutdown()
        server.server_close()


def _tar_gz(folder, arcname) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(folder, arcname=arcname)
    return buf.getvalue()


def test_load_dataset_downloads_and_extracts_cifar(isolated, monkeypatch):
    make_cifar10(isolated / "staging")
    archive = isolated / "server" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    folder = isolated / "staging" / "cifar-10-batches-py"
    archive.write_bytes(_tar_gz(folder, "cifar-10-batches-py"))
    spec = paths.FILE_SPECS["cifar10"]
    res = dataclasses.replace(spec.resources[0], url=archive.as_uri(),
                              md5=_md5(archive.read_bytes()))
    monkeypatch.setitem(paths.FILE_SPECS, "cifar10", dataclasses.replace(spec, resources=(res,)))
    target = isolated / "downloads"
    train, test = load_dataset("cifar10", data_dir=target, download=True)
    assert len(train) == 50 and len(test) == 10
    assert sorted(p.name for p in target.iterdir()) == ["cifar-10-batches-py"]  # archive removed


def test_corrupt_archive_download_leaves_nothing(isolated, monkeypatch):
    archive = isolated / "cifar-10-python.tar.gz"
    archive.write_bytes(b"not an archive")
    spec = paths.FILE_SPECS["cifar10"]
    res = dataclasses.replace(spec.resources[0], url=archive.as_uri(), md5="0" * 32)
    monkeypatch.setitem(paths.FILE_SPECS, "cifar10", dataclasses.replace(spec, resources=(res,)))
    with pytest.raises(ChecksumError):
        load_dataset("cifar10", data_dir=isolated / "dl", download=True)
    assert list((isolated / "dl").iterdir()) == []


def test_archive_escaping_its_folder_is_refused(isolated):
    evil = io.BytesIO()
    with tarfile.open(fileobj=evil, mode="w:gz") as tar:
        info = tarfile.TarInfo("../escaped.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"bad"))
    archive = isolated / "evil.tar.gz"
    archive.write_bytes(evil.getvalue())
    res = Resource("evil.tar.gz", archive.as_uri(), md5=_md5(evil.getvalue()), extract_to="x")
    with pytest.raises(Exception):  # noqa: B017 - tarfile's filter error or ours
        fetch_resources((res,), isolated / "root", progress=False)
    assert not (isolated / "escaped.txt").exists()
    assert [p.name for p in (isolated / "root").iterdir()] == ["evil.tar.gz"]


def test_load_dataset_downloads_idx_files(isolated, monkeypatch):
    make_idx_dataset(isolated / "server")
    spec = paths.FILE_SPECS["fashion-mnist"]
    resources = tuple(
        dataclasses.replace(r, url=(isolated / "server" / r.filename).as_uri(),
                            md5=_md5((isolated / "server" / r.filename).read_bytes()))
        for r in spec.resources
    )
    monkeypatch.setitem(paths.FILE_SPECS, "fashion-mnist",
                        dataclasses.replace(spec, resources=resources))
    monkeypatch.setenv("SAMKIT_DATA", str(isolated / "env"))
    train, _ = load_dataset("fashion-mnist", download=True)
    assert len(train) == 40
    assert (isolated / "env" / "fashion-mnist" / "train-images-idx3-ubyte.gz").is_file()


def test_official_resources_are_pinned():
    for name, spec in paths.FILE_SPECS.items():
        for res in spec.resources:
            assert res.url.startswith(("http://", "https://")), name
            assert res.md5 is not None and len(res.md5) == 32, name


def test_cli_download_command(isolated, monkeypatch, capsys):
    from samkit.cli import main

    make_idx_dataset(isolated / "server")
    spec = paths.FILE_SPECS["mnist"]
    resources = tuple(
        dataclasses.replace(r, url=(isolated / "server" / r.filename).as_uri(),
                            md5=_md5((isolated / "server" / r.filename).read_bytes()))
        for r in spec.resources
    )
    monkeypatch.setitem(paths.FILE_SPECS, "mnist", dataclasses.replace(spec, resources=resources))
    assert main(["download", "mnist", "--data-dir", str(isolated / "dl")]) == 0
    assert (isolated / "dl" / "t10k-labels-idx1-ubyte.gz").is_file()
    assert main(["download", "digits"]) == 2
    assert "not downloaded" in capsys.readouterr().err
