"""The run directory's rules, one home for every experiment (train, compare, eos, correlate).

* :class:`RunDir`: a run folder samkit owns (a marker lists what samkit wrote there); what a
  run may do to a folder that exists (continue it, replace samkit's files in it, never touch a
  user's), the same for every experiment and the runs inside them;
* :class:`RunLock`: ``<run_dir>/.lock``, an advisory lock that the kernel holds for the owning
  process (a second run of the same folder is refused while the owner lives, whatever it does);
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


class RunLock:
    """Hold ``<run_dir>/.lock`` while a run writes there: an advisory ``flock`` on the file.

    The kernel holds the lock for the process and drops it when the process ends, however it
    ends, so a lock is never "stale" and never taken over from a live process: a second run of
    the same folder (another process, or this one again) is refused at once. The file holds the
    owner's pid, host and start time, for the message only.

    Args:
        run_dir: an existing directory.

    Raises:
        FileExistsError: another open run (in this or another process) holds the lock.
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK
        self.held = False
        self._fd: int | None = None
        self._acquire()

    def _acquire(self) -> None:
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        for _ in range(20):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            if not _try_lock(fd):
                owner = _read_owner(fd)
                os.close(fd)
                raise FileExistsError(_in_use(self.run_dir, self.path, owner, me))
            try:  # the file we locked must still be the one at the path (a releasing owner
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))  # unlinks it)
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(me).encode(), 0)
            self._fd, self.held = fd, True
            return
        raise FileExistsError(f"Cannot take the lock {self.path} (it keeps being replaced)")

    def release(self) -> None:
        """Drop the lock (the file is removed while still locked, then closed)."""
        if self.held and self._fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd, self.held = None, False

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _try_lock(fd: int) -> bool:
    """Take an exclusive lock on ``fd`` without waiting: True when taken."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: a byte-range lock on the first byte
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _read_owner(fd: int) -> dict[str, Any] | None:
    try:
        owner = json.loads(os.pread(fd, 4096, 0) or b"null")
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None


def _in_use(run_dir: Path, path: Path, owner: dict[str, Any] | None, me: dict[str, Any]) -> str:
    if owner and owner.get("pid") == me["pid"] and owner.get("host") == me["host"]:
        return (f"{run_dir} is in use by this process already (a run of the same name is still "
                "open); choose another --name")
    if not owner:  # the owner has locked the file and not yet written its name
        who = "another process"
    else:
        where = "" if owner.get("host") == me["host"] else f" on {owner.get('host')}"
        who = f"process {owner.get('pid')}{where}"
    return (f"{run_dir} is in use by {who} (lock {path}); wait for it to end, or choose another "
            "--name")


# ------------------------------------------------------------------------- the run folder

MARKER = ".samkit-run.json"
# What a samkit run writes, by name: a folder without a marker (made by a samkit before 0.2) is
# samkit's when it holds only these names and folders that are samkit's by the same rule, and at
# least one result.
RESULT_FILES = ("checkpoint.pt", "metrics.jsonl", "summary.json", "report.md", "measures.json",
                "edge.jsonl", "train.jsonl")
# What a run writes before its first result: a folder holding only these (and empty folders)
# holds no run yet, so the retry of a run that failed early is not refused.
SETTINGS_FILES = ("config.yaml", "config.json", "run.json", "spec.json")
KNOWN_FILES = RESULT_FILES + SETTINGS_FILES + (
    "tensorboard", "results.csv", "curves.png", "time_to_accuracy.png", "overview.png",
    "eos.png", "scatter.png")
HOLDS_A_RUN = "pass --overwrite to replace it, or choose another --name"


class RunDir:
    """A run folder that samkit owns, opened for one run: the one rule for ``train``,
    ``compare``, ``eos``, ``correlate`` and the runs inside them.

    1. The folder is made (its parents too) or found, then locked (:class:`RunLock`); every
       check below runs on the folder as it is while locked, so two starts cannot both pass.
    2. The folder is samkit's when its marker (``.samkit-run.json``) lists what samkit wrote
       there, or when (a run of an older samkit, without a marker) it holds only names samkit
       writes and at least one result. Anything else in it is *foreign*: samkit never deletes
       or replaces it.
    3. A folder holding a run is refused unless the caller continues it (``keep``: ``--resume``,
       a cache) or replaces it (``overwrite``). ``overwrite`` refuses a folder with foreign
       files, and deletes samkit's files only at :meth:`start`, once the new run has loaded its
       data and model (a run that fails to start leaves the old one whole).
    4. The names a run writes are claimed in the marker before they are written (``outputs``,
       :meth:`claim`), and whatever appeared while the run held the folder is added when it
       ends, so a killed run leaves nothing a later ``--overwrite`` takes for a user's file.
    5. A start that fails before :meth:`start` leaves the folder as it was (a folder it made
       is removed); a run that fails after it but before any result leaves only its settings
       files, which do not count as a run: nothing a failed start leaves blocks the retry.

    Args:
        path: the run folder (``<out_dir>/<name>``, the name checked by the caller).
        kind: ``train``, ``compare``, ... (for messages and the marker).
        outputs: names the run will write (files or folders directly in ``path``).
        overwrite: replace the run the folder holds.
        keep: continue the run the folder holds (its files are kept).
        advice: what to do when the folder holds a run (default: ``--overwrite`` or ``--name``).

    Attributes:
        holds_a_run: the folder held a run of samkit's with a result when it was opened (more
            than the settings files and empty folders of a run that failed early).

    Raises:
        FileExistsError: the folder holds a run (without ``overwrite`` or ``keep``), holds
            foreign files, is a symbolic link, or is in use by another run.
    """

    def __init__(self, path: str | Path, kind: str, outputs: tuple[str, ...] = (), *,
                 overwrite: bool = False, keep: bool = False, advice: str = HOLDS_A_RUN
                 ) -> None:
        self.path = Path(path)
        self.kind = kind
        self.overwrite = overwrite
        self.started = False
        if self.path.is_symlink():
            raise FileExistsError(f"{self.path} is a symbolic link: samkit writes runs only into "
                                  "real folders under --out-dir; choose another --name")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.path.mkdir()
            self.created = True
        except FileExistsError:
            if not self.path.is_dir():
                raise FileExistsError(f"{self.path} exists and is not a folder; choose another "
                                      "--name") from None
            self.created = False
        try:
            self.lock = RunLock(self.path)
        except BaseException:
            self._remove_if_made()
            raise
        try:
            self._marker_before = read_marker(self.path)
            self.old, foreign = owned_and_foreign(self.path)
            self.holds_a_run = any(_holds_results(self.path / name) for name in self.old)
            self._check(foreign, keep, advice)
            self._found = set(_entries(self.path))
            self.claim(*outputs)
        except BaseException:
            self.lock.release()
            self._remove_if_made()
            raise

    def _check(self, foreign: list[str], keep: bool, advice: str) -> None:
        shown = ", ".join(foreign[:8]) + (f" and {len(foreign) - 8} more" if len(foreign) > 8
                                           else "")
        if foreign and self.overwrite:
            raise FileExistsError(
                f"{self.path} holds files samkit did not write ({shown}); --overwrite replaces "
                "only samkit's own files and leaves this folder alone: move them out, or choose "
                "another --name")
        if foreign and not (keep and self.holds_a_run):
            raise FileExistsError(
                f"{self.path} exists and holds files samkit did not write ({shown}); samkit "
                "writes only into a new or empty folder or one of its own runs: choose another "
                "--name (or --out-dir)")
        if self.holds_a_run and not (keep or self.overwrite):
            raise FileExistsError(f"{self.path} already holds a run: {advice}")

    def claim(self, *names: str) -> None:
        """Record in the marker that the run writes ``names`` (before it writes them)."""
        marker = read_marker(self.path) or {}
        owned = set(marker.get("owned", [])) | set(self.old) | set(names)
        if marker and owned == set(marker.get("owned", [])):
            return
        write_marker(self.path, self.kind, owned)

    def start(self) -> None:
        """The run has loaded its inputs: with ``overwrite`` (or when the old run never got to
        a result), delete the old run's files now."""
        if self.overwrite or not self.holds_a_run:
            for name in self.old:
                _delete(self.path / name)
            self.old = []
            self._found = set(_entries(self.path))
        self.started = True

    def release(self) -> None:
        """End the run: record what it wrote and drop the lock; a start that failed before
        :meth:`start` leaves the folder as it found it."""
        if not self.lock.held:
            return
        try:
            if self.started:
                self.claim(*(set(_entries(self.path)) - self._found))
            elif self._marker_before is None and not (set(_entries(self.path)) - self._found):
                (self.path / MARKER).unlink(missing_ok=True)
            elif self._marker_before is not None:
                write_marker(self.path, self._marker_before.get("kind", self.kind),
                             set(self._marker_before.get("owned", [])))
        finally:
            self.lock.release()
            self._remove_if_made()

    def _remove_if_made(self) -> None:
        if self.created:
            try:
                self.path.rmdir()  # only when empty: a run that wrote nothing leaves nothing
            except OSError:
                pass

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _holds_results(path: Path) -> bool:
    """``path`` (an entry of a run folder) is a result: not a settings file or a temporary
    file, and not a folder holding none."""
    if path.name in SETTINGS_FILES or path.name.endswith(".tmp"):
        return False
    if path.is_dir() and not path.is_symlink():
        return any(_holds_results(path / name) for name in _entries(path))
    return path.exists()


def _entries(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.name not in (LOCK, MARKER))


def read_marker(path: Path) -> dict[str, Any] | None:
    """The marker of the run folder ``path`` (None: no marker, or not readable)."""
    try:
        marker = json.loads((Path(path) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or not isinstance(marker.get("owned"), list):
        return None
    return marker


def write_marker(path: Path, kind: str, owned: set[str]) -> None:
    from samkit.train.checkpoint import atomic_write_text

    atomic_write_text(Path(path) / MARKER, json.dumps(
        {"kind": kind, "owned": sorted(owned)}, indent=1) + "\n")


def _temporary_of(name: str, owned: set[str]) -> bool:
    """``.<owned name>.XXXX.tmp``: an atomic write of an owned file that did not finish."""
    if not (name.startswith(".") and name.endswith(".tmp")):
        return False
    return any(name.startswith(f".{o}.") for o in owned)


def is_samkit_folder(path: Path) -> bool:
    """``path`` is a run folder of samkit (a marker, or an older samkit's run) with nothing
    foreign in it."""
    owned, foreign = owned_and_foreign(path)
    return not foreign and (bool(owned) or read_marker(path) is not None)


def owned_and_foreign(path: Path) -> tuple[list[str], list[str]]:
    """The entries of the run folder ``path`` that samkit wrote, and those it did not (a
    folder of samkit's with foreign files inside counts its foreign files as ``sub/name``)."""
    entries = _entries(path)
    marker = read_marker(path)
    if marker is not None:
        names = set(marker["owned"])
    elif any(e in RESULT_FILES for e in entries) or any(
            (path / e).is_dir() and is_samkit_folder(path / e) for e in entries):
        names = set(KNOWN_FILES)  # an older samkit's run: its names, and its runs inside
    else:
        return [], entries
    owned, foreign = [], []
    for name in entries:
        full = path / name
        folder = full.is_dir() and not full.is_symlink()
        if name in names or _temporary_of(name, names):
            if folder and read_marker(full) is not None:  # a run inside: its own rule
                foreign += [f"{name}/{f}" for f in owned_and_foreign(full)[1]]
            owned.append(name)
        elif folder and is_samkit_folder(full):  # a run of samkit's inside
            owned.append(name)
        else:
            foreign.append(name)
    return owned, foreign


def _delete(path: Path) -> None:
    """Delete a file, a link, or a folder samkit wrote (a run folder inside: its own files)."""
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
        return
    if read_marker(path) is not None:
        owned, _ = owned_and_foreign(path)
        for name in owned:
            _delete(path / name)
        (path / MARKER).unlink(missing_ok=True)
        try:
            path.rmdir()
        except OSError:
            pass
        return
    shutil.rmtree(path, ignore_errors=True)
