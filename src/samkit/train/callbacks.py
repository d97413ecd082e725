"""Callbacks: objects the trainer calls at fixed points of the loop, with a :class:`TrainState`.

Subclass :class:`Callback` and override what you need; pass instances as
``Trainer(config, callbacks=[...])``. A callback sees the run through a :class:`TrainState`
(``state.model``, ``state.optimizer``, ``state.step``, ``state.batch``, ...), not the trainer,
and may

* add numbers to an epoch's record by writing into ``metrics`` in :meth:`Callback.on_epoch_end`
  (they go to ``metrics.jsonl``, TensorBoard and the progress line),
* log a step-level record with ``state.log({"step": state.step, "my_metric": x})``,
* evaluate the model with ``state.evaluate()`` (the test split) or ``state.evaluate(split)``
  (the run's task: loss and accuracy),
* stop training cleanly with ``state.request_stop()`` (a resumable checkpoint is saved).

A callback with ``state_dict()`` / ``load_state_dict()`` has its state saved in the checkpoint
and restored on resume. The edge-of-stability tracker is such a callback.

A callback with ``on_first_pass(state, step, loss)`` is called inside each step, once the first
pass's mean loss is computed and its gradient is in ``.grad`` (before the optimizer uses it; it
may raise to abandon the step): ``samkit eos`` logs the loss and ‖g‖ of every step with it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pathlib import Path

    from torch import Tensor, nn
    from torch.optim import Optimizer

    from samkit.train.trainer import Trainer

_FIELDS = (
    "model", "optimizer", "loss_fn", "step", "epoch", "batch", "train_data", "test_data",
    "config", "run_dir", "resumed", "full_batch", "log", "request_stop", "evaluate", "print",
)


class TrainState:
    """What a callback sees of a training run: a live, read-only view (the values are those
    of the moment the hook is called).

    Attributes:
        model: the network (the plain module, also under DDP).
        optimizer: the optimizer in use.
        loss_fn: ``loss_fn(model(x), y)``, the training loss (mean over a batch).
        step: optimizer steps taken so far.
        epoch: the current epoch (0-based).
        batch: the current step's ``(x, y)`` (this rank's part under DDP), or None before the
            first step.
        train_data, test_data: the splits (objects with ``x``, ``y``, ``num_classes``).
        config: the run's :class:`~samkit.train.TrainConfig`.
        run_dir: the run directory.
        resumed: whether the run continues from a checkpoint.
        full_batch: whether every step trains on the whole training split (under DDP each
            rank's ``batch`` is then its slice of it).

    Methods: ``log(record)``, ``request_stop()``, ``evaluate(split=None)`` (loss and accuracy,
    the test split by default), ``print(line)`` (a progress line, on rank 0 only).
    """

    __slots__ = ("_trainer",)

    def __init__(self, trainer: Trainer) -> None:
        self._trainer = trainer

    @property
    def model(self) -> nn.Module:
        return self._trainer.model

    @property
    def optimizer(self) -> Optimizer:
        return self._trainer.optimizer

    @property
    def loss_fn(self) -> Any:
        return self._trainer.loss_fn

    @property
    def step(self) -> int:
        return self._trainer.step

    @property
    def epoch(self) -> int:
        return self._trainer.epoch

    @property
    def batch(self) -> tuple[Tensor, Tensor] | None:
        return self._trainer.batch

    @property
    def train_data(self) -> Any:
        return self._trainer.train_data

    @property
    def test_data(self) -> Any:
        return self._trainer.test_data

    @property
    def config(self) -> Any:
        return self._trainer.config

    @property
    def run_dir(self) -> Path:
        return self._trainer.run_dir

    @property
    def resumed(self) -> bool:
        return self._trainer.resume

    @property
    def full_batch(self) -> bool:
        return self._trainer.loader.full_batch(len(self._trainer.train_data.y))

    def log(self, record: dict[str, Any]) -> None:
        """Append ``record`` to metrics.jsonl (and TensorBoard)."""
        self._trainer.log(record)

    def request_stop(self) -> None:
        """Stop after the current step, with a resumable checkpoint."""
        self._trainer.request_stop()

    def evaluate(self, split: Any = None) -> tuple[float, float]:
        """The task's loss and accuracy of the model on ``split`` (default: the test split;
        classification: mean cross-entropy without label smoothing)."""
        return self._trainer.evaluate(self._trainer.test_data if split is None else split)

    def print(self, line: str) -> None:
        """Print a line with the trainer's progress output (rank 0, verbose runs)."""
        self._trainer.progress.line(line)

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(
            f"TrainState has no attribute {name!r}; a callback sees: {', '.join(_FIELDS)}"
        )

    def __repr__(self) -> str:
        return f"TrainState(step={self.step}, epoch={self.epoch})"


class Callback:
    """No-op hooks, called in this order: train start, (epoch start, (step start, step end)*,
    epoch end)*, train end. Each gets the run's :class:`TrainState` first."""

    def on_train_start(self, state: TrainState) -> None:
        """After the model, optimizer and data are built (and the checkpoint loaded)."""

    def on_epoch_start(self, state: TrainState, epoch: int) -> None:
        """Before the first step of ``epoch`` (0-based)."""

    def on_step_start(self, state: TrainState, step: int) -> None:
        """Before optimizer step ``step`` (0-based: ``step`` steps taken so far), at its weights
        ``w_step``; ``state.batch`` is the batch the step is about to use (augmented)."""

    def on_step_end(self, state: TrainState, step: int, loss: Tensor) -> None:
        """After optimizer step ``step`` (1-based count of steps taken so far).

        ``loss`` is the batch loss at ``w`` as a 0-d tensor on the device: call ``.item()``
        only when you need it (it synchronizes with the device).
        """

    def on_epoch_end(self, state: TrainState, epoch: int, metrics: dict[str, Any]) -> None:
        """After the evaluation of ``epoch``; ``metrics`` is the record about to be written."""

    def on_train_end(self, state: TrainState, metrics: dict[str, Any]) -> None:
        """Once, when the budget is spent (not on interruption); ``metrics``: the last record."""


def edge_tracker(every: Any) -> Callback:
    """The :class:`~samkit.train.edge.EdgeTracker` of ``config.edge_every``: every ``every``
    steps, no budget (the rule of an explicit ``every``); its rows go to ``edge.jsonl`` and, as
    ``{"event": "edge", ...}`` records, to ``metrics.jsonl``."""
    from samkit.train.edge import EdgeTracker

    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"Invalid edge_every: {every!r} (allowed: None or an integer >= 1)")
    return EdgeTracker(every=every)
