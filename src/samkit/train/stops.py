"""How a training run ends early: a requested stop, a signal (Ctrl-C, SIGTERM), a divergence.

The exceptions the :class:`~samkit.train.Trainer` raises or catches, the signal handlers it
installs while it trains, and the words of a divergence (what went wrong, the likely cause,
what is kept).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from typing import Any


class TrainingStopped(Exception):  # noqa: N818 - not an error: a requested stop
    """Raised inside the loop to end it early; the trainer catches it."""


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT (Ctrl-C) or SIGTERM stopped the run after a step, with a resumable checkpoint;
    ``signum`` is the signal (the CLI exits ``128 + signum``). Picklable, so a job process of
    :func:`samkit.experiments.base.map_jobs` hands it to its parent whole."""

    def __init__(self, message: str = "training interrupted", signum: int = signal.SIGINT):
        super().__init__(message)
        self.signum = int(signum)

    def __reduce__(self):
        return type(self), (str(self), self.signum)


class TrainingDiverged(RuntimeError):
    """The training loss (or the weights) became NaN or infinite: the run stopped at once.

    ``record`` is the ``diverged`` record written to metrics.jsonl (step, epoch, loss, lr,
    message); the checkpoint on disk is the last good one (or none)."""

    def __init__(self, message: str, record: dict[str, Any]) -> None:
        super().__init__(message)
        self.record = record


def install_signals(on_signal: Callable[[int], None], is_second: Callable[[], bool]
                    ) -> Callable[[], None]:
    """SIGINT and SIGTERM call ``on_signal(signum)``; once ``is_second()`` (a signal came
    already) the next one restores the old handlers and raises ``KeyboardInterrupt`` (abort
    now). Returns the function that restores the old handlers. Off the main thread: nothing."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    signals = [signal.SIGINT] + ([signal.SIGTERM] if hasattr(signal, "SIGTERM") else [])
    previous = {s: signal.getsignal(s) for s in signals}

    def restore() -> None:
        for s, h in previous.items():
            signal.signal(s, h)

    def handler(signum, frame):
        if is_second():  # the second signal: abort now
            restore()
            raise KeyboardInterrupt
        on_signal(signum)

    for s in signals:
        signal.signal(s, handler)
    return restore


def signal_name(signum: int) -> str:
    return "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name


def divergence_record(step: int, epoch: int, loss: float | None, lr: float, cfg_lr: float,
                      rho: float | None, kept: str) -> dict[str, Any]:
    """The ``diverged`` record: where, what, the likely cause (``lr``, and ``rho`` when the
    optimizer takes one) and what is kept (``kept``: a sentence)."""
    what = f"the training loss is {loss}" if loss is not None else (
        "the loss or the weights are not finite")
    causes = [f"lr={cfg_lr:g} too large"]
    if rho is not None:
        causes.append(f"rho={rho:g} too large")
    message = (f"training diverged at step {step} (epoch {epoch + 1}): {what}. Likely "
               f"cause: {' or '.join(causes)}; try a smaller --lr"
               + (" or --rho" if len(causes) > 1 else "") + f". {kept}")
    return {"event": "diverged", "step": step, "epoch": epoch + 1, "loss": loss, "lr": lr,
            "message": message}


class DivergenceWatch:
    """The first step at which the training loss (or the weights) was not finite, kept on the
    device: :meth:`see` records a step's loss without a host sync, :meth:`first` reads it."""

    def __init__(self) -> None:
        self._bad: Any = None  # a 0-d long tensor: the first bad step, or -1

    def see(self, loss: Any, step: int, params: Any = None) -> None:
        """Record ``step`` if ``loss`` (or, with ``params``, a weight) is not finite."""
        import torch

        step_t = torch.tensor(step, device=loss.device)
        if self._bad is None or self._bad.device != loss.device:
            self._bad = torch.full((), -1, dtype=torch.long, device=loss.device)
        bad = ~torch.isfinite(loss.detach())
        if params is not None:
            finite = torch.stack([torch.isfinite(p).all() for p in params])
            self._bad = torch.where(bad & (self._bad < 0), step_t, self._bad)
            bad = ~finite.all()
        self._bad = torch.where(bad & (self._bad < 0), step_t, self._bad)

    def first(self) -> int | None:
        """The first bad step seen (a host sync), or None."""
        first = -1 if self._bad is None else int(self._bad)
        return first if first >= 0 else None

    def check(self, trainer: Any, loss: Any, now: bool, epoch: int, weights: bool = False
              ) -> dict[str, Any] | None:
        """``trainer``'s ``diverged`` record once its loss (or, with ``weights``, its weights)
        is not finite, else None. The first bad step is recorded on the device every step (no
        host sync); it is read at ``now`` (every step on CPU, on logging steps and epoch ends on
        a GPU). Under DDP only the mean loss of a logging step and the (shared) weights count,
        so that every rank stops at the same step."""
        if trainer.world_size > 1 and not now:
            return None
        if trainer.world_size > 1 and weights:
            loss = loss.new_zeros(())  # this rank's epoch loss is not the others'
        self.see(loss, trainer.step, trainer.model.parameters() if weights and now else None)
        first = self.first() if now else None
        if first is None:
            return None
        defaults = getattr(trainer.optimizer, "defaults", {})
        rho = defaults.get("rho", trainer.config.rho) if "rho" in defaults else None
        path = trainer.checkpoint_path
        kept = (f"The last good checkpoint is kept: {path}" if path.exists()
                else "No checkpoint was saved before it")
        return divergence_record(first, epoch, None if weights else float(loss),
                                 trainer.optimizer.param_groups[0]["lr"], trainer.config.lr, rho,
                                 kept)
