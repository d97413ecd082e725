r"""Example-selecting optimizers: two-pass steps whose second pass uses only some examples of
the batch, chosen from per-example losses at :math:`w` and at :math:`w + \epsilon` (ESAM's
sharpness-sensitive data selection).

A step of an :class:`ExampleSelectingOptimizer` with a closure that has a
``losses(indices, perturbed)`` method (:class:`ExampleLossesClosure`; the step engine builds one
when :meth:`~ExampleSelectingOptimizer.selects_examples` says so, :class:`ExampleLosses` in your
own loop):

1. per-example losses :math:`\ell_j(w)` and the gradient of their mean at :math:`w`;
2. :meth:`~samkit.optim.base.SharpnessAwareOptimizer.first_step` (:math:`w \to w + \epsilon`);
3. when :meth:`~ExampleSelectingOptimizer.selects_examples`: per-example losses at
   :math:`w + \epsilon` (no gradient) and :meth:`~ExampleSelectingOptimizer.select_examples`;
4. the gradient of the selected examples' mean loss at :math:`w + \epsilon`, then
   :meth:`~samkit.optim.base.SharpnessAwareOptimizer.second_step`.

With an ordinary closure the step is the two-pass step of every sharpness-aware optimizer.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from typing import Protocol

import torch
from torch import Tensor, nn

from samkit.optim.base import SharpnessAwareOptimizer
from samkit.optim.batchnorm import disable_running_stats
from samkit.optim.kind import StepForm


class ExampleLossesClosure(Protocol):
    """What :meth:`ESAM.step` needs for data selection: per-example losses, no backward."""

    def losses(self, indices: Tensor | None, perturbed: bool) -> Tensor:
        """The 1-d tensor of the batch's per-example losses (of ``batch[indices]`` when given),
        with autograd as the caller's mode says. ``perturbed`` is True at ``w + ε``: BatchNorm
        running statistics should then be left alone."""
        ...


class ExampleLosses:
    """A per-example-loss closure for :meth:`ESAM.step` over one batch ``(x, y)``.

    ``loss_fn(model(x), y)`` must return one loss per example, e.g.
    ``functools.partial(F.cross_entropy, reduction="none")``. Perturbed passes run under
    :func:`samkit.disable_running_stats`, so BatchNorm statistics are updated once per step::

        losses = ExampleLosses(model, partial(F.cross_entropy, reduction="none"), x, y)
        loss = opt.step(losses)
    """

    def __init__(
        self, model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor], x: Tensor, y: Tensor
    ) -> None:
        self.model, self.loss_fn, self.x, self.y = model, loss_fn, x, y

    def losses(self, indices: Tensor | None, perturbed: bool) -> Tensor:
        x, y = (self.x, self.y) if indices is None else (self.x[indices], self.y[indices])
        with disable_running_stats(self.model) if perturbed else nullcontext():
            return self.loss_fn(self.model(x), y)


class ExampleSelectingOptimizer(SharpnessAwareOptimizer):
    """Base of example-selecting optimizers (see the module docstring): subclasses give
    :meth:`selects_examples` and :meth:`select_examples` (and their ascent)."""

    step_form = StepForm.EXAMPLE_SELECTING

    def selects_examples(self, batch_size: int) -> bool:
        """Does the selection drop examples from a batch of ``batch_size``? (The step engine
        asks for per-example losses only then.)"""
        raise NotImplementedError

    def select_examples(self, before: Tensor, after: Tensor) -> Tensor:
        """The indices of the examples the second pass uses, from the 1-d per-example losses
        ``before`` (at ``w``) and ``after`` (at ``w + ε``)."""
        raise NotImplementedError

    def step(self, closure=None, scaler: torch.amp.GradScaler | None = None):
        """A step; with selection when ``closure`` has a ``losses(indices, perturbed)`` method."""
        if closure is None or not hasattr(closure, "losses"):
            return super().step(closure, scaler)
        use_scaler = scaler is not None and scaler.is_enabled()

        def backward(loss: Tensor) -> None:
            (scaler.scale(loss) if use_scaler else loss).backward()

        # 1. per-example losses and the gradient at w
        self.zero_grad()
        with torch.enable_grad():
            before = closure.losses(None, False)
            if before.dim() != 1 or before.numel() == 0:
                raise ValueError(
                    f"Invalid closure: losses() returned shape {tuple(before.shape)} (allowed: "
                    "one loss per example, e.g. a loss function with reduction='none')"
                )
            loss = before.mean()
            backward(loss)
        # 2. w -> w + eps; a schedule may make this a one-pass step
        if not self.first_step(zero_grad=True, scaler=scaler):
            return loss.detach()
        # 3. select the examples (one forward pass at w + eps, no gradient)
        indices = None
        if self.selects_examples(before.numel()):
            with torch.no_grad():
                indices = self.select_examples(before, closure.losses(None, True))
        # 4. the gradient at w + eps on the selected examples, then back to w and step
        with torch.enable_grad():
            backward(closure.losses(indices, True).mean())
        self.second_step(zero_grad=False, scaler=scaler)  # kept, as step(closure) keeps them
        return loss.detach()

