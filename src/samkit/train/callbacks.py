"""Callbacks: objects the trainer calls at fixed points of the loop.

Subclass :class:`Callback` and override what you need; pass instances as
``Trainer(config, callbacks=[...])``. A callback sees the trainer (``trainer.model``,
``trainer.optimizer``, ``trainer.loss_fn``, ``trainer.train_data``, ``trainer.batch``,
``trainer.step``, ``trainer.epoch``, ``trainer.config``) and may

* add numbers to an epoch's record by writing into ``metrics`` in :meth:`on_epoch_end`
  (they go to ``metrics.jsonl``, TensorBoard and the progress line),
* log a step-level record with ``trainer.log({"step": trainer.step, "my_metric": x})``,
* stop training cleanly with ``trainer.request_stop()`` (a resumable checkpoint is saved).

A callback with ``state_dict()`` / ``load_state_dict()`` has its state saved in the checkpoint
and restored on resume. The edge-of-stability tracker is such a callback.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor

    from samkit.train.trainer import Trainer


class Callback:
    """No-op hooks, called in this order: train start, (epoch start, (step end)*, epoch end)*,
    train end."""

    def on_train_start(self, trainer: Trainer) -> None:
        """After the model, optimizer and data are built (and the checkpoint loaded)."""

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        """Before the first step of ``epoch`` (0-based)."""

    def on_step_end(self, trainer: Trainer, step: int, loss: Tensor) -> None:
        """After optimizer step ``step`` (1-based count of steps taken so far).

        ``loss`` is the batch loss at ``w`` as a 0-d tensor on the device: call ``.item()``
        only when you need it (it synchronizes with the device).
        """

    def on_epoch_end(self, trainer: Trainer, epoch: int, metrics: dict[str, Any]) -> None:
        """After the evaluation of ``epoch``; ``metrics`` is the record about to be written."""

    def on_train_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        """Once, when the budget is spent (not on interruption); ``metrics``: the last record."""
