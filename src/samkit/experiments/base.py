"""What every experiment (train, compare, eos, correlate) shares: a config, a run, a report.

* subcommands: :func:`subcommand` adds one to the ``samkit`` command and records its handler
  (``args.handler(args, argv)``), so ``samkit.cli`` only lists the modules; :func:`run_main`
  is the ``python -m samkit.experiments.<name>`` entry point with the CLI's error style;
* the run directory: :func:`run_dir_of`, :func:`prepare_run_dir` (the lock, ``--overwrite``
  once the data have loaded), :func:`save_experiment_config` (``config.yaml``), the run-dir rules
  of :mod:`samkit.train.rundir` (lock, strict JSON, versions);
* caching and resume: :func:`finished_state` tells a finished training run from one to resume;
* data: :func:`load_data` (one process-wide cache), :func:`with_fallback` (scikit-learn's
  digits when the Fashion-MNIST files are missing, with the note that says so);
* the report: :func:`save_figure`, :func:`write_json` (strict JSON: NaN and inf become null),
  :func:`write_markdown`, :func:`command_line`.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from samkit.config import TrainConfig, check_name, total_steps
from samkit.train.checkpoint import atomic_write, atomic_write_text
from samkit.train.rundir import RunLock, finite, strict_dumps, versions  # noqa: F401 - shared

# ------------------------------------------------------------------------- subcommands

Handler = Callable[[argparse.Namespace, Sequence[str]], int]
# The errors a bad input raises; the CLI turns them into one line and exit status 2.
INPUT_ERRORS = (ValueError, OSError, ImportError)


def subcommand(sub, name: str, handler: Handler, **kwargs: Any) -> argparse.ArgumentParser:
    """Add ``samkit <name>`` to the subparsers ``sub``; ``handler(args, argv)`` runs it."""
    kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
    parser = sub.add_parser(name, **kwargs)
    parser.set_defaults(handler=handler)
    return parser


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
    args = parser.parse_args([name, *argv])
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
    """``<out_dir>/<name>``, the name checked."""
    check_name(name)
    return Path(out_dir) / name


def prepare_run_dir(run_dir: Path, overwrite: bool = False, exists_ok: bool = False,
                    replace_now: bool = True) -> RunLock:
    """Create ``run_dir`` and take its lock (:class:`~samkit.train.rundir.RunLock`; release it
    when the experiment ends, or use it as a context manager).

    A directory that already holds a run (any file) is refused unless ``overwrite`` (its files
    are deleted: at once with ``replace_now``, else when the experiment calls
    ``lock.replace_old()``, once its data and model have loaded) or ``exists_ok`` (the
    experiment continues it, e.g. from a cache)."""
    lock = RunLock(run_dir, overwrite=overwrite)
    if lock.old and not (overwrite or exists_ok):
        lock.release()
        raise FileExistsError(f"{run_dir} already holds a run: pass --overwrite to replace it, "
                              "or choose another --name")
    if overwrite and replace_now:
        lock.replace_old()
    return lock


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

_DATA_CACHE: dict[tuple, Any] = {}


def load_data(cfg: TrainConfig, device: Any = "cpu", cache: bool = False):
    """The (train, test) splits of ``cfg`` (standardized; subset and label noise seeded by
    ``data_seed``); with ``cache``, loaded once per process (the last one is kept)."""
    from samkit.data import load_dataset

    key = (cfg.dataset, cfg.data_dir, cfg.subset, cfg.stratified, cfg.label_noise,
           cfg.data_seed, str(device))
    if cache and key in _DATA_CACHE:
        return _DATA_CACHE[key]
    data = load_dataset(
        cfg.dataset, data_dir=cfg.data_dir, subset=cfg.subset, stratified=cfg.stratified,
        label_noise=cfg.label_noise, seed=cfg.data_seed, standardize=True, device=device,
    )
    if cache:
        _DATA_CACHE.clear()
        _DATA_CACHE[key] = data
    return data


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

_WORKER_SHARED: Any = None  # what a job process was given once (e.g. the data)


def _init_worker(shared: Any) -> None:
    global _WORKER_SHARED
    _WORKER_SHARED = shared


def worker_shared() -> Any:
    """In a job of :func:`map_jobs`: the ``shared`` value it was started with."""
    return _WORKER_SHARED


def map_jobs(fn: Callable[[Any], Any], tasks: Sequence[Any], jobs: int = 1,
             shared: Any = None, on_done: Callable[[int, Any], None] | None = None) -> list[Any]:
    """``[fn(task) for task in tasks]``, with ``jobs`` tasks at once in separate processes.

    ``fn`` must be a module-level function; ``shared`` (e.g. the data set) is sent once to each
    process and read there with :func:`worker_shared`. ``jobs == 1`` runs here, in order.
    ``on_done(i, result)`` is called here as each task ends (in the order they end, e.g. for
    progress lines). The results come back in the order of ``tasks``; the first error stops
    the pool (the tasks not started are cancelled) and is raised here. Processes are spawned,
    not forked, so a job never inherits threads or a CUDA context.
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
    from concurrent.futures import ProcessPoolExecutor, as_completed

    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(jobs, len(tasks)), mp_context=context,
                             initializer=_init_worker, initargs=(shared,)) as pool:
        futures = {pool.submit(fn, task): i for i, task in enumerate(tasks)}
        try:
            for future in as_completed(futures):
                i = futures[future]
                results[i] = future.result()
                if on_done is not None:
                    on_done(i, results[i])
            return results
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
