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
the mean loss over the batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext

import torch
from torch import Tensor, nn

from samkit.optim.base import SharpnessAwareOptimizer
from samkit.optim.batchnorm import disable_running_stats

LossFn = Callable[[Tensor, Tensor], Tensor]


def _sizes(micro_batches: Sequence[tuple[Tensor, Tensor]]) -> list[int]:
    if isinstance(micro_batches, (str, bytes)) or not isinstance(micro_batches, Sequence):
        raise ValueError("Invalid micro_batches: pass a list of (x, y) pairs (it is read twice)")
    sizes = [len(y) for _, y in micro_batches]
    if not sizes or sum(sizes) == 0:
        raise ValueError(f"Invalid micro_batches: no examples in {len(sizes)} micro-batch(es)")
    return sizes


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
    sizes = _sizes(micro_batches)
    total = sum(sizes)

    def closure() -> Tensor:
        optimizer.zero_grad()
        perturbed = optimizer.is_perturbed
        mean = None
        with disable_running_stats(model) if perturbed else nullcontext():
            for (x, y), n in zip(micro_batches, sizes, strict=True):
                loss = loss_fn(model(x), y) * (n / total)
                (scaler.scale(loss) if scaler is not None else loss).backward()
                mean = loss.detach() if mean is None else mean + loss.detach()
        return mean

    return closure


def m_sharpness_step(
    optimizer: SharpnessAwareOptimizer,
    model: nn.Module,
    loss_fn: LossFn,
    micro_batches: Sequence[tuple[Tensor, Tensor]],
) -> Tensor:
    """One step with a separate perturbation per micro-batch; returns the mean loss at ``w``.

    For each micro-batch: gradient at ``w``, ``first_step``, gradient at ``w + ε_i`` (BatchNorm
    running statistics untouched), ``restore``; the weighted second-pass gradients are summed
    and the base optimizer steps once with their sum.
    """
    why = optimizer.step_rewrites()
    if why is not None:
        raise ValueError(
            f"Invalid optimizer: {type(optimizer).__name__} {why}"
            "; m_sharpness_step takes optimizers that always run two passes and descend with the "
            "perturbed gradient (SAM, ASAM, USAM, FisherSAM, FriendlySAM, ...)"
        )
    sizes = _sizes(micro_batches)
    total = sum(sizes)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    accumulated: dict[nn.Parameter, Tensor] = {}
    mean = None
    for (x, y), n in zip(micro_batches, sizes, strict=True):
        weight = n / total
        optimizer.zero_grad()
        with torch.enable_grad():
            loss = loss_fn(model(x), y)
            loss.backward()
        mean = loss.detach() * weight if mean is None else mean + loss.detach() * weight
        optimizer.first_step(zero_grad=True)
        with torch.enable_grad(), disable_running_stats(model):
            loss_fn(model(x), y).backward()
        optimizer.restore()
        with torch.no_grad():
            for p in params:
                if p.grad is None:
                    continue
                if p in accumulated:
                    accumulated[p].add_(p.grad, alpha=weight)
                else:
                    accumulated[p] = p.grad.mul(weight)
    for p in params:
        p.grad = accumulated.get(p)
    optimizer.base_optimizer.step()
    optimizer._opt_called = True
    optimizer.zero_grad()
    return mean
