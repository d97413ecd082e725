"""The IDX format of MNIST and Fashion-MNIST (LeCun et al.), plain or gzipped."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

# The third byte of the magic number gives the element type.
_IDX_DTYPES = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


class CorruptFileError(ValueError):
    """A data file exists but cannot be what it claims to be."""


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (``.gz`` is decompressed) into an array of its declared shape.

    Raises :class:`CorruptFileError` naming the file when the header or the size is wrong.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as err:
        raise CorruptFileError(f"{path}: cannot be read as IDX ({err})") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise CorruptFileError(f"{path}: not an IDX file (bad magic number {raw[:4]!r})")
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise CorruptFileError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise CorruptFileError(
            f"{path}: IDX header says shape {shape} ({expected} bytes) but the file holds "
            f"{len(raw) - header} bytes of data (truncated or corrupt: delete it and fetch it "
            "again)"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="))
