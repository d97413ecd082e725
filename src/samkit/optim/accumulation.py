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

    Each micro-batch takes the first half of the optimizer's protocol (gradient at ``w``,
    ``first_step``, gradient at ``w + ε_k`` with BatchNorm running statistics untouched, back to
    ``w`` bit for bit); its weighted second-pass gradient is added to one accumulator. Then the
    optimizer's own descent path runs once on the average: unscaled once (``scaler``), clipped
    once to ``max_grad_norm`` (the step's direction, not each micro-batch's), one base step
    (``scaler.step(base)`` with a scaler; skipped when any pass of any micro-batch was
    non-finite, as :meth:`~SharpnessAwareOptimizer.second_step` does). The gradients are
    cleared afterwards.

    Args:
        scaler: the ``torch.amp.GradScaler`` that scales each backward, if any (the closure
            scales the losses with it); call ``scaler.update()`` after this step.
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
    use_scaler = scaler is not None and scaler.is_enabled()
    sums: dict[Tensor, Tensor] = {}
    first_finite: list[Tensor] = []
    mean = None
    optimizer.zero_grad()
    for (x, y), n in zip(micro_batches, sizes, strict=True):
        weight = n / total
        closure = step_closure(optimizer, model, loss_fn, [(x, y)],
                               scaler=scaler if use_scaler else None)
        with torch.enable_grad():
            loss = closure()  # zeroes the gradients: the gradient of this micro-batch at w
        loss = torch.as_tensor(loss).detach()
        mean = loss * weight if mean is None else mean + loss * weight
        if not optimizer.first_step(zero_grad=True, scaler=scaler if use_scaler else None):
            # only skip_non_finite says False here (step_rewrites is None): the step is skipped
            optimizer.zero_grad()
            return mean
        if optimizer._first_pass_finite is not None:  # under a scaler: kept for the base step
            first_finite.append(optimizer._first_pass_finite)
            optimizer._first_pass_finite = None
        with torch.enable_grad():
            closure()  # at w + eps_k, BatchNorm statistics untouched
        optimizer.restore()
        with torch.no_grad():
            for group in optimizer.param_groups:
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    if p in sums:
                        sums[p].add_(p.grad, alpha=weight)
                    else:
                        sums[p] = p.grad.mul(weight)
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = sums.get(p)
    if first_finite:
        optimizer._first_pass_finite = torch.stack(
            [f.to(first_finite[0].device) for f in first_finite]).all()
    optimizer._descend_(scaler if use_scaler else None)
    optimizer.zero_grad()
    return mean
