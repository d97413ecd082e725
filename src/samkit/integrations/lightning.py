"""Lightning: samkit optimizers under automatic optimization.

Return a samkit optimizer from ``configure_optimizers``; Lightning's automatic optimization calls
``optimizer.step(closure)``, and the closure (training step, zero_grad, backward) runs twice, at
``w`` and at ``w + ε``. Nothing else is needed. Two helpers make the second pass clean:

* :func:`running_stats` keeps BatchNorm's running statistics out of the pass at ``w + ε``;
* :func:`is_perturbed` tells the passes apart, e.g. to log the loss at ``w`` only.

Example::

    import lightning as L
    import samkit
    from samkit.integrations.lightning import is_perturbed, running_stats

    class Classifier(L.LightningModule):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def training_step(self, batch, batch_idx):
            x, y = batch
            with running_stats(self):
                loss = F.cross_entropy(self.net(x), y)
            if not is_perturbed(self):
                self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            base = torch.optim.SGD(samkit.param_groups(self, weight_decay=5e-4), lr=0.1)
            opt = samkit.ASAM(base, rho=0.5, eta=0.01)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=100)
            return {"optimizer": opt, "lr_scheduler": sched}

With ``strategy="ddp"`` every pass is all-reduced: the ``synced`` mode of
:mod:`samkit.distributed`. Gradient clipping (``gradient_clip_val``) and
``accumulate_grad_batches`` act on each pass as Lightning defines them; with
``accumulate_grad_batches=k`` the optimizer steps every k batches and its closure runs the last
batch only, so prefer a larger batch (or :func:`samkit.accumulation_closure` with manual
optimization) for exact accumulation.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

from torch import nn

from samkit.optim.base import SharpnessAwareOptimizer
from samkit.optim.batchnorm import disable_running_stats

__all__ = ["is_perturbed", "running_stats", "sharpness_aware_optimizers"]


def sharpness_aware_optimizers(module: Any) -> list[SharpnessAwareOptimizer]:
    """The samkit optimizers of a LightningModule (unwrapped from ``LightningOptimizer``)."""
    trainer = getattr(module, "_trainer", None)
    if trainer is None:
        return []
    found = []
    for opt in getattr(trainer, "optimizers", []) or []:
        opt = getattr(opt, "optimizer", opt)  # LightningOptimizer -> the torch optimizer
        if isinstance(opt, SharpnessAwareOptimizer):
            found.append(opt)
    return found


def is_perturbed(module: Any) -> bool:
    """True inside the second closure call of a step (the weights are at ``w + ε``)."""
    return any(opt.is_perturbed for opt in sharpness_aware_optimizers(module))


def running_stats(module: nn.Module):
    """A context for the forward pass: BatchNorm running statistics are left alone during
    the pass at ``w + ε`` (:func:`samkit.disable_running_stats`), updated as usual at ``w``."""
    return disable_running_stats(module) if is_perturbed(module) else nullcontext()
