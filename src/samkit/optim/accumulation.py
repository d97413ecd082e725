r"""Gradient accumulation for sharpness-aware optimizers, in its two meanings.

* **Exact** (:func:`accumulation_closure`): the closure sweeps every micro-batch at ``w``, then
  again at ``w + ε``; ε comes from the gradient of the whole batch, so the step equals the
  full-batch step (up to floating point). Memory: the optimizer's one backup buffer.
* **Per micro-batch** (:func:`m_sharpness_step`): every micro-batch :math:`B_i` gets its own
  :math:`\epsilon_i` from its own gradient and the descent uses
  :math:`\sum_i \tfrac{|B_i|}{|B|} \nabla L_{B_i}(w + \epsilon_i)` (the *m-sharpness* of Foret et
  al., with m the micro-batch size; often generalizes better). Memory: one extra parameter-sized
  accumulator.

Each micro-batch's loss is weighted by its share of the examples, so uneven micro-batches give
the mean loss over the batch. Both build their closures with :mod:`samkit.step`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from samkit.optim.base import SharpnessAwareOptimizer
from samkit.optim.wrapper import WrappingOptimizer

LossFn = Callable[[Tensor, Tensor], Tensor]


def accumulation_closure(
    optimizer: WrappingOptimizer,
    model: nn.Module,
    loss_fn: LossFn,
    micro_batches: Sequence[tuple[Tensor, Tensor]],
    scaler: torch.amp.GradScaler | None = None,
) -> Callable[[], Tensor]:
    """A closure for ``optimizer.step`` that accumulates the gradient over ``micro_batches``.

    Each call zeroes the gradients and backpropagates every micro-batch's loss, weighted by its
    share of the examples; it returns the mean loss (detached). The second call (at ``w + ε``)
    runs under :func:`disable_running_stats`, so BatchNorm statistics are updated once per step.
    The optimizer's own :meth:`~samkit.optim.wrapper.WrappingOptimizer.accumulation_closure`.
    """
    return optimizer.accumulation_closure(model, loss_fn, micro_batches, scaler=scaler)


def m_sharpness_step(
    optimizer: SharpnessAwareOptimizer,
    model: nn.Module,
    loss_fn: LossFn,
    micro_batches: Sequence[tuple[Tensor, Tensor]],
    scaler: torch.amp.GradScaler | None = None,
) -> Tensor:
    r"""One step with a separate perturbation per micro-batch; returns the mean loss at ``w``.

    .. math::
        \epsilon_k = \mathrm{ascent}(w, \nabla L_{B_k}(w); \rho), \qquad
        d = \sum_k \tfrac{|B_k|}{|B|} \nabla L_{B_k}(w + \epsilon_k), \qquad
        w \leftarrow \mathrm{base\_step}\big(w, \mathrm{clip}(d)\big)

    The optimizer's own :meth:`~samkit.optim.base.SharpnessAwareOptimizer.m_sharpness_step`
    (the two-pass base's): one clip of the averaged direction, one base step (through
    ``scaler.step(base)``, skipped when any pass of any micro-batch was non-finite); the
    gradients are cleared afterwards. Optimizers that rewrite their steps are refused.

    Args:
        scaler: the ``torch.amp.GradScaler`` that scales each backward, if any (the closure
            scales the losses with it); call ``scaler.update()`` after this step.
    """
    method = getattr(optimizer, "m_sharpness_step", None)
    if method is None:
        raise ValueError(
            f"Invalid optimizer: {type(optimizer).__name__} takes no per-micro-batch "
            "perturbation; m_sharpness_step takes optimizers that always run two passes and "
            "descend with the perturbed gradient (SAM, ASAM, USAM, FisherSAM, FriendlySAM, ...)"
        )
    return method(model, loss_fn, micro_batches, scaler=scaler)
