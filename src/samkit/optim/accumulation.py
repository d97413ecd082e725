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
from typing import Any

import torch
from torch import Tensor, nn

from samkit.optim.base import SharpnessAwareOptimizer

LossFn = Callable[[Tensor, Tensor], Tensor]


def accumulation_closure(
    optimizer: SharpnessAwareOptimizer,
    model: nn.Module,
    loss_fn: LossFn,
    micro_batches: Sequence[tuple[Tensor, Tensor]],
    scaler: torch.amp.GradScaler | None = None,
) -> Callable[[], Tensor]:
    """A closure for ``optimizer.step`` that accumulates the gradient over ``micro_batches``.

    Each call zeroes the gradients and backpropagates every micro-batch's loss, weighted by its
    share of the examples; it returns the mean loss (detached). The second call (at ``w + ε``)
    runs under :func:`disable_running_stats`, so BatchNorm statistics are updated once per step.
    """
    from samkit.step import step_closure

    return step_closure(optimizer, model, loss_fn, micro_batches, scaler=scaler)


class _Accumulate:
    """Stands in for the base optimizer during the per-micro-batch steps of
    :func:`m_sharpness_step`: its ``step()`` adds ``weight · grad`` to the accumulator instead
    of moving the weights."""

    def __init__(self, base: torch.optim.Optimizer) -> None:
        self.param_groups, self.defaults, self.state = base.param_groups, base.defaults, base.state
        self.weight = 1.0
        self.sums: dict[Tensor, Tensor] = {}

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p in self.sums:
                    self.sums[p].add_(p.grad, alpha=self.weight)
                else:
                    self.sums[p] = p.grad.mul(self.weight)


def m_sharpness_step(
    optimizer: SharpnessAwareOptimizer,
    model: nn.Module,
    loss_fn: LossFn,
    micro_batches: Sequence[tuple[Tensor, Tensor]],
) -> Tensor:
    """One step with a separate perturbation per micro-batch; returns the mean loss at ``w``.

    Each micro-batch takes its own ``optimizer.step(closure)`` (gradient at ``w``, ε_i, gradient
    at ``w + ε_i`` with BatchNorm running statistics untouched, back to ``w``) with a base
    optimizer that only accumulates the weighted second-pass gradient; then the base optimizer
    steps once with the sum.
    """
    from samkit.step import check_micro_batches, step_closure

    why = optimizer.step_rewrites()
    if why is not None:
        raise ValueError(
            f"Invalid optimizer: {type(optimizer).__name__} {why}"
            "; m_sharpness_step takes optimizers that always run two passes and descend with the "
            "perturbed gradient (SAM, ASAM, USAM, FisherSAM, FriendlySAM, ...)"
        )
    sizes = check_micro_batches(micro_batches)
    total = sum(sizes)
    base = optimizer.base_optimizer
    accumulate = _Accumulate(base)
    mean = None
    optimizer.base_optimizer = accumulate
    try:
        for (x, y), n in zip(micro_batches, sizes, strict=True):
            accumulate.weight = n / total
            loss = optimizer.step(step_closure(optimizer, model, loss_fn, [(x, y)]))
            mean = loss.detach() * accumulate.weight if mean is None else (
                mean + loss.detach() * accumulate.weight)
    finally:
        optimizer.base_optimizer = base
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = accumulate.sums.get(p)
    base.step()
    optimizer._opt_called = True
    optimizer.zero_grad()
    return mean
