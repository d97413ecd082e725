"""What every experiment (train, compare, eos, correlate) shares: a config, a run, a report.

* subcommands: :func:`subcommand` adds one to the ``samkit`` command and records its handler
  (``args.handler(args, argv)``), so ``samkit.cli`` only lists the modules; :func:`run_main`
  is the ``python -m samkit.experiments.<name>`` entry point with the CLI's error style;
* the run directory: :func:`run_dir_of` (the name confined to the out-dir),
  :class:`~samkit.train.rundir.RunDir` (the one rule for a folder that exists: lock, ownership,
  ``--overwrite`` once the data have loaded), :func:`save_experiment_config` (``config.yaml``),
  strict JSON and versions from :mod:`samkit.train.rundir`;
* caching and resume: :func:`finished_state` tells a finished training run from one to resume;
* data: :func:`load_data` (one process-wide cache), :func:`with_fallback` (scikit-learn's
  digits when the Fashion-MNIST files are missing, with the note that says so);
* the report: :func:`save_figure`, :func:`write_json` (strict JSON: NaN and inf become null),
  :func:`write_markdown`, :func:`command_line`.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from samkit.config import TrainConfig, check_name, total_steps
from samkit.train.checkpoint import atomic_write, atomic_write_text
from samkit.train.rundir import RunDir, finite, strict_dumps, versions  # noqa: F401 - shared

# ------------------------------------------------------------------------- subcommands

Handler = Callable[[argparse.Namespace, Sequence[str]], int]
# The errors a bad input raises; the CLI turns them into one line and exit status 2.
INPUT_ERRORS = (ValueError, OSError, ImportError)


def subcommand(sub, name: str, handler: Handler, **kwargs: Any) -> argparse.ArgumentParser:
    """Add ``samkit <name>`` to the subparsers ``sub``; ``handler(args, argv)`` runs it."""
    kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
    parser = sub.add_parser(name, **kwargs)
    parser.set_defaults(handler=handler, command_parser=parser)
    return parser


def parse_command(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """``parser.parse_args(argv)``, but an unknown flag is reported by the subcommand's own
    parser (its usage, not the top-level one)."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        (getattr(args, "command_parser", None) or parser).error(
            f"unrecognized arguments: {' '.join(extra)}")
    return args


def error(err: BaseException) -> int:
    """Print ``err`` the CLI's way (one line, ``samkit: error: ...``); exit status 2, or 4 when
    a file could not be written (:class:`~samkit.train.checkpoint.WriteFailed`: a full disk)."""
    from samkit.train.checkpoint import WriteFailed

    print(f"samkit: error: {err}", file=sys.stderr)
    return 4 if isinstance(err, WriteFailed) else 2


def run_main(add_parser: Callable[[Any], argparse.ArgumentParser], name: str,
             argv: Sequence[str] | None = None) -> int:
    """``python -m samkit.experiments.<name> ...``: the same as ``samkit <name> ...``."""
    parser = argparse.ArgumentParser(prog="samkit")
    add_parser(parser.add_subparsers(dest="command"))
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_command(parser, [name, *argv])
    try:
        return args.handler(args, [name, *argv])
    except INPUT_ERRORS as err:
        return error(err)


def command_line(argv: Sequence[str]) -> str:
    """The command as a person would type it again (``samkit compare --epochs 2``)."""
    return "samkit " + " ".join(shlex.quote(a) for a in argv)


def add_run_flags(parser: argparse.ArgumentParser, resume: bool = True) -> None:
    """``--resume``, ``--overwrite`` and ``--quiet``, the same for every experiment."""
    if resume:
        parser.add_argument("--resume", action="store_true",
                            help="continue from runs/<name>/checkpoint.pt")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing run of the same name")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress output")


def add_config_flags(parser: argparse.ArgumentParser, what: str = "config keys") -> None:
    """``--config FILE`` and ``--set KEY=VALUE ...``."""
    parser.add_argument("--config", help=f"YAML config ({what})")
    parser.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[],
                        metavar="KEY=VALUE", help="override config keys, e.g. --set lr=1e-3 "
                        "model_kwargs.width=512 (values are YAML, checked against the key's type)")


# ------------------------------------------------------------------------- the run directory


def run_dir_of(out_dir: str | Path, name: str) -> Path:
    """``<out_dir>/<name>``, the name checked (:func:`~samkit.config.check_name`: one folder
    inside ``out_dir``, never a path out of it)."""
    check_name(name)
    return Path(out_dir) / name


def save_experiment_config(config: Any, path: str | Path, values: dict[str, Any] | None = None
                           ) -> Path:
    """``config.yaml`` of an experiment: its resolved config, each key with its help."""
    from samkit.config import save_yaml

    save_yaml(config, path, f"samkit {type(config).__name__} (resolved)", values)
    return Path(path)


# ------------------------------------------------------------------------- caching and resume

STOPS = ("threshold", "diverged")  # a callback's reasons to end a run before its budget


def finished_state(cfg: TrainConfig, n_train: int) -> dict[str, Any] | None:
    """The checkpoint's state when the run of ``cfg`` (``n_train`` training examples) has
    finished: at an epoch end, and its budget spent or a stop rule met (``record["stop"]``);
    None when there is no checkpoint or the run is to be resumed."""
    from samkit.train.checkpoint import load_checkpoint

    path = cfg.run_dir / "checkpoint.pt"
    if not path.is_file():
        return None
    state = load_checkpoint(path)
    record = state.get("last_record")
    if state.get("batch") != 0 or not record:
        return None
    saved = state.get("config", {})
    if (saved.get("epochs"), saved.get("steps")) != (cfg.epochs, cfg.steps):
        return None  # a changed budget: resume extends (or the trainer refuses) it
    if record.get("stop") in STOPS or record["step"] >= total_steps(cfg, n_train):
        return state
    return None


# ------------------------------------------------------------------------- data

def shared_setting(key: str, default: Any = None, note: str = "", *, factory: Any = None) -> Any:
    """A key of :class:`~samkit.config.TrainConfig`'s data, model or run sections in another
    experiment's config (``samkit eos``): the same name and meaning (TrainConfig's help, then
    ``note``), the experiment's own default. Saved configs keep their keys."""
    from samkit.config import fields_of, setting

    help_text = fields_of(TrainConfig)[key].metadata.get("help", "")
    help_text = f"{help_text}; {note}" if note else help_text
    if factory is not None:
        return setting(factory=factory, help=help_text)
    return setting(default, help_text)


def load_data(cfg: TrainConfig, device: Any = "cpu", cache: bool = False):
    """The (train, test) splits of ``cfg`` (standardized; subset and label noise seeded by
    ``data_seed``); with ``cache``, loaded once per process (the last one is kept). The one
    data-loading home: :func:`samkit.train.data.load_data`."""
    from samkit.train.data import config_data

    return config_data(cfg, device, cache=cache)


def fallback_note(dataset: str, data_dir: str | None) -> str | None:
    """None when ``dataset``'s files are found (or it is not Fashion-MNIST); else the note that
    says the experiment falls back to scikit-learn's digits, and how to get Fashion-MNIST."""
    from samkit.data import DataNotFoundError, resolve_data_dir

    if dataset != "fashion-mnist":
        return None
    try:
        resolve_data_dir("fashion-mnist", data_dir)
    except DataNotFoundError as err:
        first = str(err).splitlines()[0]
        return (
            f"Fashion-MNIST not found ({first}); falling back to scikit-learn's digits "
            "(8x8 images, 1,438 train / 359 test). To run the default on Fashion-MNIST install "
            "it (Debian: apt-get install dataset-fashion-mnist) or point --data-dir / "
            "SAMKIT_DATA at the four IDX files."
        )
    return None


def with_fallback(config: TrainConfig, changes: dict[str, Any] | None = None
                  ) -> tuple[TrainConfig, list[str]]:
    """``config``, or ``config`` with ``changes`` (default: digits, the whole set) when its
    Fashion-MNIST files cannot be found, and the note that says so."""
    note = fallback_note(config.dataset, config.data_dir)
    if note is None:
        return config, []
    return config.replace(**(changes or {"dataset": "digits", "subset": None})), [note]


# ------------------------------------------------------------------------- the report


def save_figure(fig, path: str | Path, dpi: int = 110) -> Path:
    """Write a matplotlib ``Figure`` as PNG, atomically (no pyplot, no display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    path = Path(path)
    atomic_write(path, lambda handle: fig.savefig(handle, format="png", dpi=dpi))
    return path


def write_json(path: str | Path, value: Any, strict: bool = True) -> Path:
    """``value`` as indented strict JSON (NaN and inf written as null), atomically. ``strict``
    is kept for older callers: samkit writes strict JSON only."""
    return atomic_write_text(Path(path), strict_dumps(value, indent=2) + "\n")


def write_markdown(path: str | Path, lines: Sequence[str]) -> Path:
    """The report: ``lines`` joined, atomically."""
    return atomic_write_text(Path(path), "\n".join(lines) + "\n")


# ---------------------------------------------------------------------------- parallel jobs
#
# A job process dies with its parent and a parent's signal reaches its jobs once:
# * each job process runs in its own process group (a terminal's Ctrl-C reaches only the
#   parent, which forwards it: a job never sees it twice, which would abort its checkpoint);
# * on Linux the kernel signals it when its parent dies (prctl PR_SET_PDEATHSIG, SIGUSR1 turned
#   into one SIGTERM); a watchdog thread sees the parent go on every system (and sends the
#   SIGTERM where the kernel does not), lets the running job stop with its checkpoint, then
#   ends the process;
# * the parent, on SIGINT / SIGTERM, forwards the signal to its jobs, cancels the tasks not
#   started, waits for the running ones to save their checkpoints, then raises
#   :class:`JobsInterrupted` (the CLI exits 128 + the signal).

_WORKER_SHARED: Any = None  # what a job process was given once (e.g. the data)
_STOP: Any = None  # a multiprocessing Event: set by the parent when it is interrupted
_SIGNALLED: int | None = None  # a signal that reached this job process between tasks
_RUNNING = threading.Event()  # a task runs in this job process
ORPHAN_GRACE = 120.0  # seconds an orphaned job process gives its task to save and stop


class JobsInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped :func:`map_jobs`: the running tasks stopped (a training run
    with its checkpoint), the others did not start. ``signum``: the signal."""

    def __init__(self, message: str = "interrupted", signum: int = signal.SIGINT) -> None:
        super().__init__(message)
        self.signum = int(signum)

    def __reduce__(self):
        return type(self), (str(self), self.signum)


def interrupt_signal(err: BaseException) -> int:
    """The signal behind a ``KeyboardInterrupt`` (SIGINT unless it says otherwise)."""
    return int(getattr(err, "signum", None) or signal.SIGINT)


def _init_worker(shared: Any, parent: int | None = None, stop: Any = None) -> None:
    global _WORKER_SHARED, _STOP
    _WORKER_SHARED = shared
    if parent is None:  # map_jobs with jobs == 1: this very process
        return
    _STOP = stop
    if hasattr(os, "setpgrp"):
        os.setpgrp()  # the parent alone gets a terminal's Ctrl-C (and forwards it)
    for s in _SIGNALS:  # between tasks a signal only means: start no other task
        signal.signal(s, _note_signal)
    # The kernel's parent-death signal comes once per thread of the parent that exits (the
    # child is reparented to the next thread, and signalled again): it arrives as SIGUSR1 and
    # becomes one SIGTERM, since a second SIGTERM would abort the task without its checkpoint.
    pdeathsig = False
    if hasattr(signal, "SIGUSR1"):
        signal.signal(signal.SIGUSR1, _parent_died)  # before the kernel may send it
        pdeathsig = _set_parent_death_signal(signal.SIGUSR1)
    threading.Thread(target=_watch_parent, args=(parent, not pdeathsig), daemon=True,
                     name="samkit-watch-parent").start()


_ORPHANED = threading.Event()  # the parent died and this job process was told to stop


def _parent_died(signum=None, frame=None) -> None:
    """The parent is gone: SIGTERM this process once (a training task saves and stops)."""
    if not _ORPHANED.is_set():
        _ORPHANED.set()
        os.kill(os.getpid(), signal.SIGTERM)


_SIGNALS = (signal.SIGINT,) + ((signal.SIGTERM,) if hasattr(signal, "SIGTERM") else ())


def _note_signal(signum, frame) -> None:
    global _SIGNALLED
    _SIGNALLED = signum


def _raise_interrupt(signum, frame) -> None:
    raise JobsInterrupted(f"{signal.Signals(signum).name} in a job", signum)


def _set_parent_death_signal(signum: int) -> bool:
    """Linux: have the kernel send ``signum`` to this process when its parent dies."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(1, int(signum), 0, 0, 0) == 0  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return False


def _watch_parent(parent: int, send_signal: bool, poll: float = 0.25) -> None:
    """Wait for the parent to go; then stop the running task (SIGTERM: a training run saves
    its checkpoint) and end this process, which would otherwise wait for tasks forever."""
    while os.getppid() == parent:
        time.sleep(poll)
    if send_signal:  # where the kernel sends no parent-death signal (not Linux)
        _parent_died()
    deadline = time.monotonic() + ORPHAN_GRACE
    while _RUNNING.is_set() and time.monotonic() < deadline:
        time.sleep(0.05)
    os._exit(128 + signal.SIGTERM)


def _run_job(fn: Callable[[Any], Any], task: Any) -> Any:
    """``fn(task)`` in a job process; a task is not started once the jobs are interrupted, and
    a signal during it raises :class:`JobsInterrupted` (the Trainer's own handlers, while it
    trains, finish the step and save a checkpoint first)."""
    global _SIGNALLED
    if _SIGNALLED is not None or (_STOP is not None and _STOP.is_set()):
        raise JobsInterrupted("not started: the jobs were interrupted",
                              _SIGNALLED or signal.SIGINT)
    _RUNNING.set()
    previous = {s: signal.signal(s, _raise_interrupt) for s in _SIGNALS}
    try:
        return fn(task)
    except KeyboardInterrupt as err:  # signalled: start no other task here either
        _SIGNALLED = interrupt_signal(err)
        raise
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _RUNNING.clear()


def worker_shared() -> Any:
    """In a job of :func:`map_jobs`: the ``shared`` value it was started with."""
    return _WORKER_SHARED


def map_jobs(fn: Callable[[Any], Any], tasks: Sequence[Any], jobs: int = 1,
             shared: Any = None, on_done: Callable[[int, Any], None] | None = None) -> list[Any]:
    """``[fn(task) for task in tasks]``, with ``jobs`` tasks at once in separate processes.

    ``fn`` must be a module-level function; ``shared`` (e.g. the data set) is sent once to each
    process and read there with :func:`worker_shared`. ``jobs == 1`` runs here, in order.
    ``on_done(i, result)`` is called here as each task ends (in the order they end, e.g. for
    progress lines). The results come back in the order of ``tasks``. Processes are spawned,
    not forked, so a job never inherits threads or a CUDA context.

    Stopping: the first error stops the other tasks as SIGTERM does (the running ones stop
    with their checkpoints, the others do not start) and is raised here. SIGINT / SIGTERM
    here is forwarded to the running tasks, which stop the same way; then
    :class:`JobsInterrupted` is raised (a second signal is forwarded too: the tasks abort). A
    task that raises ``KeyboardInterrupt`` (its process was signalled) stops them all too. A
    job process whose parent dies (even by SIGKILL) stops its task and ends.
    """
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"Invalid jobs: {jobs!r} (allowed: an integer >= 1)")
    results: list[Any] = [None] * len(tasks)
    if jobs == 1 or len(tasks) <= 1:
        previous = _WORKER_SHARED
        _init_worker(shared)
        try:
            for i, task in enumerate(tasks):
                results[i] = fn(task)
                if on_done is not None:
                    on_done(i, results[i])
            return results
        finally:
            _init_worker(previous)
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    context = multiprocessing.get_context("spawn")
    stop = context.Event()
    pool = ProcessPoolExecutor(max_workers=min(jobs, len(tasks)), mp_context=context,
                               initializer=_init_worker, initargs=(shared, os.getpid(), stop))
    futures: dict[Any, int] = {}
    caught: list[int] = []  # the signals that reached this process
    stopped: list[int] = []  # the signal the jobs were stopped with (once)

    def send(signum: int) -> None:
        for pid in list(getattr(pool, "_processes", None) or {}):
            try:
                os.kill(pid, signum)
            except (ProcessLookupError, PermissionError):
                pass

    def on_signal(signum, frame) -> None:
        # only what is safe in a handler: the loop below cancels the tasks not started
        caught.append(signum)
        send(signum)

    def stop_all(signum: int, forward: bool = True) -> None:
        """Start no other task; send ``signum`` to the job processes (the running tasks stop
        with their checkpoints)."""
        if stopped:
            return
        stopped.append(signum)
        stop.set()
        for future in futures:
            future.cancel()  # only those not handed to a process yet
        if forward and not caught:  # a caught signal was forwarded by the handler
            send(signum)

    restore = _install_handlers(on_signal)
    error: BaseException | None = None
    interrupted: int | None = None
    try:
        for i, task in enumerate(tasks):
            futures[pool.submit(_run_job, fn, task)] = i
        pending = set(futures)
        while pending:
            if caught:
                stop_all(caught[0])
            done, pending = wait(pending, timeout=0.25, return_when=FIRST_COMPLETED)
            for future in done:
                if future.cancelled():
                    continue
                exc = future.exception()
                if exc is None:
                    i = futures[future]
                    results[i] = future.result()
                    if on_done is not None and error is None and not stopped:
                        try:
                            on_done(i, results[i])
                        except Exception as err:  # noqa: BLE001 - raised below, once stopped
                            error = err
                            stop_all(signal.SIGTERM)
                    continue
                if isinstance(exc, KeyboardInterrupt):
                    if interrupted is None:
                        interrupted = interrupt_signal(exc)
                elif error is None:
                    error = exc
                # the first failure or interrupt stops the others (with their checkpoints)
                stop_all(interrupted if interrupted is not None and error is None
                         else signal.SIGTERM)
    finally:
        restore()
        pool.shutdown(wait=True, cancel_futures=True)
    if caught:
        raise JobsInterrupted(f"interrupted by {signal.Signals(caught[0]).name}", caught[0])
    if error is not None:
        raise error
    if interrupted is not None:
        raise JobsInterrupted("a job was interrupted", interrupted)
    return results


def _install_handlers(handler: Callable[[int, Any], None]) -> Callable[[], None]:
    """``handler`` for SIGINT and SIGTERM until the returned function is called (only in the
    main thread: elsewhere Python cannot set handlers, and nothing is changed)."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = {s: signal.signal(s, handler) for s in _SIGNALS}

    def restore() -> None:
        for s, h in previous.items():
            signal.signal(s, h)

    return restore
