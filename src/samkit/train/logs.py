"""Where a run's numbers go: ``metrics.jsonl``, TensorBoard (optional), and the terminal."""

from __future__ import annotations

import json
import math
import sys
import warnings
from pathlib import Path
from typing import Any, TextIO

from samkit.train.checkpoint import WriteFailed, atomic_write_text, reason
from samkit.train.rundir import strict_dumps


class TornLineWarning(UserWarning):
    """The last line of a ``metrics.jsonl`` was cut short (a full disk, a killed write) and is
    left out."""


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file (one JSON object per line).

    A last line that is not a whole JSON object (a write cut short by a full disk or a kill) is
    left out with a :class:`TornLineWarning` naming the file; a bad line before the last one is
    a ``ValueError`` naming the file and the line.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    with open(path) as handle:
        lines = [(n, line) for n, line in enumerate(handle, 1) if line.strip()]
    records = []
    for i, (number, line) in enumerate(lines):
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError(f"a {type(record).__name__}, not a record")
        except ValueError as err:
            if i == len(lines) - 1:
                warnings.warn(f"{path}: its last line (line {number}) is not a whole record, "
                              f"a write cut short? ({reason(err)}); left it out",
                              TornLineWarning, stacklevel=2)
                break
            raise ValueError(f"{path}: line {number} is not a JSON record ({reason(err)})"
                             ) from err
        records.append(record)
    return records


class MetricsWriter:
    """Appends one JSON record per line, flushed at once (a crash loses nothing written)."""

    def __init__(self, run_dir: Path, tensorboard: bool = False, resume_step: int | None = None):
        self.path = run_dir / "metrics.jsonl"
        if resume_step is None:
            atomic_write_text(self.path, "")
        else:
            # Drop what a killed run wrote after its last checkpoint, so no step appears twice.
            kept = []
            if self.path.exists():
                kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
            atomic_write_text(self.path, "".join(strict_dumps(r) + "\n" for r in kept))
        self._file = open(self.path, "a")  # noqa: SIM115 - closed in close()
        self._failed = False  # a write failed (close() then drops what it cannot flush)
        self._tb = None
        if tensorboard:
            self._tb = make_summary_writer(run_dir)

    def write(self, record: dict[str, Any]) -> None:
        try:
            self._file.write(strict_dumps(record) + "\n")
            self._file.flush()
        except OSError as err:
            self._failed = True
            raise WriteFailed(f"could not write {self.path}: {reason(err)}") from err
        if self._tb is not None and record.get("event", "epoch") == "epoch":
            step = record.get("step", 0)
            for key, value in record.items():
                tag = tensorboard_tag(key)
                if tag is not None and isinstance(value, (int, float)) and not isinstance(
                    value, bool
                ):
                    self._tb.add_scalar(tag, value, step)
            self._tb.flush()

    @property
    def tensorboard(self) -> bool:
        return self._tb is not None

    def write_step(self, step: int, loss: float, lr: float, grad_norm: float | None) -> None:
        """TensorBoard's per-step curves: ``step/loss``, ``step/lr``, ``step/grad_norm``."""
        if self._tb is None:
            return
        self._tb.add_scalar("step/loss", loss, step)
        self._tb.add_scalar("step/lr", lr, step)
        if grad_norm is not None:
            self._tb.add_scalar("step/grad_norm", grad_norm, step)

    def write_hparams(self, hparams: dict[str, Any], metrics: dict[str, Any]) -> None:
        """The run's settings and final numbers in TensorBoard's HPARAMS tab."""
        if self._tb is None:
            return
        plain = {k: v if isinstance(v, (int, float, str, bool)) else str(v)
                 for k, v in hparams.items()}
        final = {f"final/{k}": v for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        self._tb.add_hparams(plain, final, run_name=".")

    def close(self) -> None:
        try:
            self._file.close()
        except OSError as err:
            if not self._failed:  # after a failed write its error is the one reported
                raise WriteFailed(f"could not write {self.path}: {reason(err)}") from err
        if self._tb is not None:
            self._tb.close()
            self._tb = None


# TensorBoard tags of the epoch record's keys (None: not drawn; ``epoch`` is the x axis).
_TAGS = {
    "train_loss": "train/loss", "train_acc": "train/accuracy", "test_loss": "test/loss",
    "test_acc": "test/accuracy", "lr": "train/lr", "epoch_time": "time/epoch_seconds",
    "images_per_s": "time/images_per_second", "train_time": "time/train_seconds",
    "epoch": None, "epochs": None, "step": None, "event": None,
}


def tensorboard_tag(key: str) -> str | None:
    """The TensorBoard tag of an epoch record's ``key`` (a callback's own key: ``epoch/<key>``)."""
    return _TAGS.get(key, f"epoch/{key}")


def check_tensorboard() -> None:
    """Raise a clear ImportError when the tensorboard package is missing."""
    import importlib.util

    if importlib.util.find_spec("tensorboard") is None:
        raise ImportError(
            "tensorboard=true needs the tensorboard package, which is not installed: "
            "pip install 'samkit[tensorboard]' (or pip install tensorboard), or drop --tensorboard"
        )


def make_summary_writer(run_dir: Path):
    """TensorBoard's SummaryWriter, imported only when asked for."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise ImportError(
            "tensorboard=true needs the tensorboard package, which is not installed: "
            "pip install 'samkit[tensorboard]' (or pip install tensorboard), or drop "
            f"--tensorboard ({err})"
        ) from err
    return SummaryWriter(log_dir=str(run_dir / "tensorboard"))


def loss_text(value: float | None) -> str:
    """A loss for people: ``0.3125``; a huge one as ``6.15e+22``, not 23 digits; ``nan``."""
    if value is None:
        return "null"
    if not math.isfinite(value) or abs(value) >= 1e5:
        return f"{value:.4g}"
    return f"{value:.4f}"


def format_record(record: dict[str, Any]) -> str:
    """One human line for an epoch record."""
    parts = [f"epoch {record['epoch']}/{record['epochs']}", f"step {record['step']}"]
    parts.append(f"lr {record['lr']:.4g}")
    parts.append(f"train loss {loss_text(record['train_loss'])} acc "
                 f"{100 * record['train_acc']:.2f}%")
    if "test_acc" in record:
        parts.append(f"test loss {loss_text(record['test_loss'])} acc "
                     f"{100 * record['test_acc']:.2f}%")
    seconds = record["epoch_time"]
    parts.append(f"{seconds:.2f} s" if seconds < 10 else f"{seconds:.0f} s")
    parts.append(f"{record['images_per_s']:.0f} img/s")
    extra = [
        f"{k} {v:.4g}"
        for k, v in record.items()
        if k not in _STANDARD and isinstance(v, float) and math.isfinite(v)
    ]
    return "  ".join(parts + extra)


_STANDARD = {
    "event", "epoch", "epochs", "step", "lr", "train_loss", "train_acc", "test_loss", "test_acc",
    "epoch_time", "images_per_s", "train_time", "best_test_acc",
}


class Progress:
    """A tqdm bar on a terminal, plain periodic lines otherwise (logs, CI, pipes)."""

    def __init__(self, verbose: int, prefix: str = "", stream: TextIO | None = None) -> None:
        self.verbose = verbose
        self.prefix = prefix
        self.stream = stream or sys.stdout
        self.use_bar = verbose >= 1 and _isatty(sys.stderr)
        self._bar = None

    def start_epoch(self, epoch: int, epochs: int, total: int, initial: int = 0) -> None:
        if self.use_bar:
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=total, initial=initial, desc=f"{self.prefix}epoch {epoch + 1}/{epochs}",
                leave=False, dynamic_ncols=True, file=sys.stderr,
            )

    def step(self, step: int, loss: float | None, lr: float) -> None:
        """Called every step; ``loss`` is only given (synchronized) on logging steps."""
        if self._bar is not None:
            self._bar.update(1)
            if loss is not None:
                self._bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.3g}", refresh=False)
        elif loss is not None and self.verbose >= 2:
            self.line(f"step {step}  loss {loss:.4f}  lr {lr:.4g}")

    def end_epoch(self, record: dict[str, Any]) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self.verbose >= 1:
            self.line(format_record(record))

    def line(self, text: str) -> None:
        if self.verbose >= 1:
            if self._bar is not None:
                self._bar.write(self.prefix + text, file=self.stream)
            else:
                print(self.prefix + text, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
