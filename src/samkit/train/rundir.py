"""The run directory's rules, one home for every experiment (train, compare, eos, correlate).

* :class:`RunLock`: ``<run_dir>/.lock`` holds the owner's host and process id; a second run of
  the same name is refused while the owner lives, a lock left by a dead process is taken over;
* :meth:`RunLock.replace_old`: ``--overwrite`` deletes the old run's files only when the new run
  has loaded its data and model (so a run that fails to start leaves the old one whole);
* :func:`strict_dumps`: strict JSON (NaN and inf written as ``null``), for every JSON file;
* :func:`versions`: samkit, torch, Python, CUDA and the git commit of a checkout, for the run.

Files are written atomically with the user's umask (:mod:`samkit.train.checkpoint`).
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

LOCK = ".lock"


# ------------------------------------------------------------------------- strict JSON


def finite(value: Any) -> Any:
    """``value`` with NaN and inf replaced by None, tuples as lists (strict JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # numpy / torch scalars
        return finite(value.item())
    return value


def strict_dumps(value: Any, **kwargs: Any) -> str:
    """``json.dumps`` that never writes ``NaN``/``Infinity`` (they become ``null``)."""
    return json.dumps(finite(value), allow_nan=False, **kwargs)


# ------------------------------------------------------------------------- versions


def versions() -> dict[str, Any]:
    """What made the run: samkit, torch, Python, CUDA (None without), the git commit of a
    checkout samkit runs from (None outside one; ``dirty`` when it has changes)."""
    import torch

    import samkit

    info: dict[str, Any] = {
        "samkit": getattr(samkit, "__version__", None),
        "torch": str(torch.__version__),
        "python": platform.python_version(),
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "git_commit": None,
        "git_dirty": None,
    }
    where = Path(samkit.__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"],
                                capture_output=True, text=True, timeout=5)
        if commit.returncode == 0:
            info["git_commit"] = commit.stdout.strip()
            status = subprocess.run(["git", "-C", str(where), "status", "--porcelain",
                                     "--untracked-files=no"], capture_output=True, text=True,
                                    timeout=5)
            info["git_dirty"] = bool(status.stdout.strip()) if status.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        pass
    return info


# ------------------------------------------------------------------------- the lock


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


class RunLock:
    """Hold ``<run_dir>/.lock`` while a run writes there.

    Args:
        run_dir: the run directory (created).
        overwrite: the run replaces an old one (:meth:`replace_old` deletes its files).

    Raises:
        FileExistsError: another live process holds the lock (on this host: its pid is
            checked; on another host the lock is trusted and named, to delete by hand).
    """

    def __init__(self, run_dir: str | Path, overwrite: bool = False) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK
        self.overwrite = overwrite
        self.old = [] if not self.run_dir.exists() else sorted(
            p.name for p in self.run_dir.iterdir() if p.name != LOCK)
        self.created = not self.run_dir.exists()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.held = False
        self.took_over: dict[str, Any] | None = None
        self._acquire()

    def _acquire(self) -> None:
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                owner = self._owner()
                if owner is None or (owner.get("host") == me["host"]
                                     and not _alive(int(owner.get("pid", -1)))):
                    self.took_over = owner or {}
                    self.path.unlink(missing_ok=True)  # stale: its process is gone
                    continue
                if owner.get("pid") == me["pid"] and owner.get("host") == me["host"]:
                    raise FileExistsError(
                        f"{self.run_dir} is in use by this process already (a run of the same "
                        "name is still open); choose another --name") from None
                where = "" if owner.get("host") == me["host"] else f" on {owner.get('host')}"
                raise FileExistsError(
                    f"{self.run_dir} is in use by process {owner.get('pid')}{where} (lock "
                    f"{self.path}); wait for it to end, or choose another --name (delete the "
                    "lock file only if that process is gone)") from None
            with os.fdopen(fd, "w") as handle:
                handle.write(json.dumps(me))
            self.held = True
            return
        raise FileExistsError(f"Cannot take the lock {self.path} (it keeps coming back)")

    def _owner(self) -> dict[str, Any] | None:
        try:
            owner = json.loads(self.path.read_text() or "null")
        except (OSError, ValueError):
            # half written (its writer is between open and write) or garbage: wait once
            time.sleep(0.2)
            try:
                owner = json.loads(self.path.read_text() or "null")
            except (OSError, ValueError):
                return None
        return owner if isinstance(owner, dict) else None

    def replace_old(self, keep: tuple[str, ...] = (), only: tuple[str, ...] | None = None
                    ) -> None:
        """With ``overwrite``: delete what the old run left (the files found when the lock was
        taken; ``only`` those names, if given; never ``keep``); call it once the new run has
        loaded its data and model."""
        if not self.overwrite:
            return
        for name in self.old:
            if name in keep or (only is not None and name not in only):
                continue
            path = self.run_dir / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        self.old = []

    def release(self) -> None:
        """Drop the lock (and the directory, when this lock made it and nothing was written)."""
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False
            if self.created:
                try:
                    self.run_dir.rmdir()  # only when empty
                except OSError:
                    pass

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()
