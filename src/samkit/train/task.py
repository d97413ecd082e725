"""What a :class:`~samkit.train.Trainer` trains for: a task is the loss, the per-step metric
and the evaluation.

* :class:`Classification` (the default; ``samkit train`` and ``samkit compare``): mean
  cross-entropy with label smoothing, accuracy of the argmax, evaluation by
  :func:`samkit.measures.evaluate` (cross-entropy without smoothing, accuracy).
* :class:`SquareLoss`: the square loss against one-hot targets of Cohen et al. (``mse``:
  ½ Σ over the classes, mean over the examples) or of Long & Bartlett (``mse-mean``: the mean
  over classes and examples); accuracy of the argmax; evaluation: the same loss and accuracy.
* :class:`LanguageModel`: next-token cross-entropy over ``N×T×V`` logits (every token counts),
  token accuracy; evaluation as classification's.

>>> Trainer(config, task=SquareLoss("mse"))
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def classification_loss(logits: Tensor, y: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Mean cross-entropy; token logits ``N×T×V`` with targets ``N×T`` are flattened."""
    return F.cross_entropy(logits.flatten(0, -2), y.flatten(), label_smoothing=label_smoothing)


def example_losses(logits: Tensor, y: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Per-example cross-entropy, shape ``N`` (a sequence's is the mean over its tokens); their
    mean is :func:`classification_loss`."""
    per_target = F.cross_entropy(
        logits.flatten(0, -2), y.flatten(), reduction="none", label_smoothing=label_smoothing
    )
    return per_target.view(len(y), -1).mean(1)


SQUARE_LOSSES = ("mse", "mse-mean")


def square_loss(out: Tensor, y: Tensor, kind: str = "mse") -> Tensor:
    """``mse``: ½ Σ_classes (f − onehot(y))², mean over examples (and tokens); ``mse-mean``:
    (f − onehot(y))² averaged over classes and examples (``optax.squared_error`` then
    ``jnp.mean``, Long & Bartlett's). Integer labels ``N`` (or ``N×T``), outputs ``N×C``
    (or ``N×T×C``)."""
    target = F.one_hot(y, out.shape[-1]).to(out.dtype)
    if kind == "mse-mean":
        return (out - target).pow(2).mean()
    return 0.5 * (out - target).pow(2).sum(-1).mean()


def make_loss(kind: str) -> Callable[[Tensor, Tensor], Tensor]:
    """The loss ``(output, y) -> mean`` of ``kind``: ``mse``, ``mse-mean`` (:func:`square_loss`)
    or ``ce`` (mean cross-entropy)."""
    if kind == "ce":
        def ce(out: Tensor, y: Tensor) -> Tensor:
            return F.cross_entropy(out.flatten(0, -2), y.flatten())
        return ce
    if kind not in SQUARE_LOSSES:
        raise ValueError(f"Invalid loss: {kind!r} (allowed: ce, {', '.join(SQUARE_LOSSES)})")

    def loss(out: Tensor, y: Tensor) -> Tensor:
        return square_loss(out, y, kind)
    loss.__name__ = kind.replace("-", "_")
    return loss


def correct(out: Tensor, y: Tensor) -> Tensor:
    """How many argmax predictions are right (a 0-d tensor on the device: no sync)."""
    return (out.argmax(-1) == y).sum()


class Task:
    """The loss (``loss(output, y)``, the mean over a batch), the per-example losses an
    example-selecting optimizer asks for (``example_losses``, or None), the number of right
    predictions of a batch (``correct``: the epoch's ``train_acc``) and the evaluation of a
    split (``evaluate`` -> ``(loss, accuracy)``, the epoch's ``test_loss``, ``test_acc``)."""

    name = "task"
    example_losses: Callable[[Tensor, Tensor], Tensor] | None = None

    def loss(self, out: Tensor, y: Tensor) -> Tensor:
        raise NotImplementedError

    def correct(self, out: Tensor, y: Tensor) -> Tensor:
        return correct(out, y)

    def evaluate(self, model: nn.Module, split: Any, batch_size: int, device: torch.device,
                 autocast: Callable[[], Any] | None = None) -> tuple[float, float]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Classification(Task):
    """Cross-entropy (with ``label_smoothing``) and accuracy: today's ``samkit train``."""

    name = "classification"

    def __init__(self, label_smoothing: float = 0.0) -> None:
        self.label_smoothing = label_smoothing

    def loss(self, out: Tensor, y: Tensor) -> Tensor:
        return classification_loss(out, y, self.label_smoothing)

    def example_losses(self, out: Tensor, y: Tensor) -> Tensor:  # type: ignore[override]
        return example_losses(out, y, self.label_smoothing)

    def evaluate(self, model, split, batch_size, device, autocast=None):
        """Mean cross-entropy (no label smoothing) and accuracy
        (:func:`samkit.measures.evaluate`)."""
        from samkit.measures import evaluate

        return evaluate(model, split, batch_size, device, autocast)

    def __repr__(self) -> str:
        return f"Classification(label_smoothing={self.label_smoothing})"


class LanguageModel(Classification):
    """Next-token cross-entropy over every token of ``N×T×V`` logits; token accuracy."""

    name = "language model"

    def __init__(self) -> None:
        super().__init__(0.0)

    def loss(self, out: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(out.flatten(0, -2), y.flatten())

    def __repr__(self) -> str:
        return "LanguageModel()"


class SquareLoss(Task):
    """The square loss against one-hot targets (:func:`square_loss`, ``kind`` ``mse`` or
    ``mse-mean``) and the accuracy of the argmax."""

    name = "square loss"

    def __init__(self, kind: str = "mse") -> None:
        if kind not in SQUARE_LOSSES:
            raise ValueError(f"Invalid loss: {kind!r} (allowed: {', '.join(SQUARE_LOSSES)})")
        self.kind = kind

    def loss(self, out: Tensor, y: Tensor) -> Tensor:
        return square_loss(out, y, self.kind)

    def example_losses(self, out: Tensor, y: Tensor) -> Tensor:  # type: ignore[override]
        """Per example, shape ``N``; their mean is :meth:`loss`."""
        target = F.one_hot(y, out.shape[-1]).to(out.dtype)
        per = (out - target).pow(2)
        per = per.mean(-1) if self.kind == "mse-mean" else 0.5 * per.sum(-1)
        return per.reshape(len(y), -1).mean(1)

    def evaluate(self, model, split, batch_size, device, autocast=None):
        """The mean square loss and the accuracy on ``split``, summed in float64."""
        from contextlib import nullcontext

        was_training = model.training
        model.eval()
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        right = torch.zeros((), dtype=torch.int64, device=device)
        x_all, y_all = split.x.to(device), split.y.to(device)
        try:
            with torch.no_grad():
                for start in range(0, len(y_all), batch_size):
                    x, y = x_all[start: start + batch_size], y_all[start: start + batch_size]
                    with (autocast or nullcontext)():
                        out = model(x)
                    out = out.float()
                    loss_sum += self.loss(out, y).double() * len(y)
                    right += correct(out, y)
        finally:
            model.train(was_training)
        n, tokens = max(len(y_all), 1), max(y_all.numel(), 1)
        return float(loss_sum) / n, float(right) / tokens

    def __repr__(self) -> str:
        return f"SquareLoss({self.kind!r})"


def task_for(loss: str, label_smoothing: float = 0.0, text: bool = False) -> Task:
    """The task of a loss name: ``ce`` (classification, or the language model when ``text``),
    ``mse`` or ``mse-mean`` (the square loss)."""
    if loss in SQUARE_LOSSES:
        return SquareLoss(loss)
    if loss != "ce":
        raise ValueError(f"Invalid loss: {loss!r} (allowed: ce, {', '.join(SQUARE_LOSSES)})")
    return LanguageModel() if text else Classification(label_smoothing)
