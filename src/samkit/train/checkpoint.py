"""Atomic files: checkpoints and text are written to a temporary file, then renamed.

A write that fails (a full disk, a file-size limit) raises :class:`WriteFailed` naming the
file, and leaves the old file whole; :func:`remove_stale_temporaries` deletes the temporary files
of a write that was killed (a run calls it when it starts or resumes, holding its lock).

Files get the permissions of a plain ``open`` (0666 less the user's umask), not the 0600 of a
temporary file. Checkpoints hold tensors and plain Python values only, so they load with
``torch.load(path, weights_only=True)``; the RNG states are stored that way too.
"""

from __future__ import annotations

import os
import pickle
import random
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch


class WriteFailed(OSError):
    """A file of the run could not be written (a full disk, a file-size limit, an I/O error);
    the message names the file. The file's previous content, if any, is kept."""


def reason(err: BaseException) -> str:
    """The first line of ``err``'s message (its type's name when it has none)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# atomic_write's temporary files: ".<name>.<8 random characters>.tmp" (tempfile.mkstemp)
_TEMPORARY = re.compile(r"\..+\.[A-Za-z0-9_]{8}\.tmp")


def atomic_write(path: str | Path, write) -> Path:
    """Call ``write(handle)`` on a temporary file next to ``path``, then rename it to ``path``.

    Raises:
        WriteFailed: the temporary file could not be written or renamed (``path`` is left as it
            was; the temporary file is removed).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise WriteFailed(f"could not save {path}: {reason(err)}") from err
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)  # atomic on POSIX and Windows: readers see old or new, never half
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        # torch.save reports a short write as a RuntimeError of its zip writer, after the OSError
        cause = err.__context__ if isinstance(err, RuntimeError) and isinstance(
            err.__context__, OSError) else err
        if isinstance(cause, OSError) and not isinstance(cause, WriteFailed):
            raise WriteFailed(f"could not save {path}: {reason(cause)}") from err
        raise
    return path


def remove_stale_temporaries(directory: str | Path) -> list[Path]:
    """Delete the temporary files that a killed :func:`atomic_write` left in ``directory`` (not
    in its subfolders); returns them. Call it only while no other process writes there (a run
    holding its lock)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for path in directory.iterdir():
        if _TEMPORARY.fullmatch(path.name) and path.is_file() and not path.is_symlink():
            path.unlink(missing_ok=True)
            removed.append(path)
    return sorted(removed)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda handle: handle.write(text.encode()))


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """``torch.save(state)`` to ``path`` through a temporary file in the same directory."""
    return atomic_write(path, lambda handle: torch.save(state, handle))


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """The state saved by :func:`save_checkpoint`, loaded with ``weights_only=True``.

    Raises:
        FileNotFoundError: there is no file at ``path``.
        ValueError: the file is not a readable checkpoint (truncated, corrupt, not ours).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint at {path} (nothing to resume)")
    try:
        try:
            state = torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError:
            # an older samkit stored numpy's RNG state as an array: allow exactly those types
            with torch.serialization.safe_globals(_NUMPY_RNG_TYPES):
                state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure to read is the same fix
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"checkpoint {path} is not readable: {first} (rerun with --overwrite "
                         "to start again)") from err
    if not isinstance(state, dict) or "model" not in state:
        raise ValueError(f"checkpoint {path} is not readable: not a samkit checkpoint (rerun "
                         "with --overwrite to start again)")
    return state


_NUMPY_RNG_TYPES = [
    (getattr(np, "_core", None) or np.core).multiarray._reconstruct,
    np.ndarray, np.dtype, type(np.dtype(np.uint32)),
]


def rng_states() -> dict[str, Any]:
    """Every global RNG a training step may draw from (dropout uses torch's), as tensors and
    plain values (so a checkpoint loads with ``weights_only=True``)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002 - saved
    states = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss),
                  float(cached)],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    kind, keys, pos, has_gauss, cached = states["numpy"]
    if isinstance(keys, torch.Tensor):
        keys = keys.numpy().astype(np.uint32)
    np.random.set_state((kind, keys, pos, has_gauss, cached))  # noqa: NPY002
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
