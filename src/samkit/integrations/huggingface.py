"""Hugging Face: :class:`SAMTrainer`, a ``transformers.Trainer`` that trains with SAM, ASAM or any
samkit optimizer whose descent uses the perturbed gradient.

Example::

    from samkit.integrations.huggingface import SAMTrainer

    trainer = SAMTrainer(
        model=model, args=TrainingArguments(output_dir="out", learning_rate=5e-5),
        train_dataset=train, sam="asam", sam_kwargs={"rho": 0.5, "eta": 0.01},
    )
    trainer.train()

How it works: the Trainer builds its usual optimizer (AdamW by default, ``args.optim``) and LR
scheduler; :class:`SAMTrainer` wraps that optimizer in the samkit one, which shares its param
groups. Each ``training_step`` runs the forward-backward pass at ``w`` (what the Trainer logs),
moves to ``w + ε`` (``first_step``), runs the pass again (BatchNorm running statistics
untouched), and moves back to ``w`` (``restore``); the Trainer then clips the gradient (at
``w + ε``) and steps its optimizer as usual.

With ``gradient_accumulation_steps = k`` every micro-batch gets its own ε (the m-sharpness of
Foret et al., m = the micro-batch) and the perturbed gradients are summed: the accumulated
gradient is put aside during the two passes, so no copy is made. Under multi-GPU (DDP via
accelerate) both passes are all-reduced: the ``synced`` mode of :mod:`samkit.distributed`.
Optimizers that rewrite the descent with the first-pass gradient (LookSAM, GSAM, scheduled
variants) are refused.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from transformers import Trainer

from samkit.optim.asam import ASAM
from samkit.optim.base import SharpnessAwareOptimizer
from samkit.optim.batchnorm import disable_running_stats
from samkit.optim.sam import SAM

__all__ = ["SAMTrainer"]

OPTIMIZERS: dict[str, type[SharpnessAwareOptimizer]] = {"sam": SAM, "asam": ASAM}


class SAMTrainer(Trainer):
    """``transformers.Trainer`` with a sharpness-aware step.

    Args:
        sam: ``"sam"``, ``"asam"``, or a callable ``base_optimizer -> SharpnessAwareOptimizer``
            (e.g. ``lambda base: samkit.FriendlySAM(base, rho=0.05)``).
        sam_kwargs: keyword arguments for ``"sam"``/``"asam"`` (``rho``, ``eta``, ``p``, ...).
        *args, **kwargs: what ``transformers.Trainer`` takes.
    """

    def __init__(
        self,
        *args: Any,
        sam: str | Callable[[torch.optim.Optimizer], SharpnessAwareOptimizer] = "sam",
        sam_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if isinstance(sam, str) and sam.lower() not in OPTIMIZERS:
            raise ValueError(
                f"Invalid sam: {sam!r} (allowed: {', '.join(OPTIMIZERS)}, or a callable that "
                "wraps the base optimizer)"
            )
        if not isinstance(sam, str) and not callable(sam):
            raise ValueError(f"Invalid sam: {sam!r} (allowed: a name or a callable)")
        if not isinstance(sam, str) and sam_kwargs:
            raise ValueError("Invalid sam_kwargs: they go with a name; a callable takes its own")
        self.sam = sam
        self.sam_kwargs = dict(sam_kwargs or {})
        self.sam_optimizer: SharpnessAwareOptimizer | None = None
        super().__init__(*args, **kwargs)

    def create_optimizer(self, model=None):
        base = super().create_optimizer(model) if model is not None else super().create_optimizer()
        if self.sam_optimizer is None or self.sam_optimizer.base_optimizer is not base:
            if isinstance(self.sam, str):
                wrapped = OPTIMIZERS[self.sam.lower()](base, **self.sam_kwargs)
            else:
                wrapped = self.sam(base)
            if not isinstance(wrapped, SharpnessAwareOptimizer):
                raise ValueError(
                    f"Invalid sam: the callable returned {type(wrapped).__name__} (allowed: a "
                    "samkit SharpnessAwareOptimizer wrapping the optimizer it was given)"
                )
            from samkit.distributed import check_local_optimizer

            try:
                check_local_optimizer(wrapped)
            except ValueError as err:
                raise ValueError(
                    f"Invalid sam: {type(wrapped).__name__} rewrites the descent step, which "
                    "SAMTrainer leaves to the Trainer's optimizer (use SAM, ASAM, USAM, "
                    "FisherSAM, FriendlySAM, ...)"
                ) from err
            self.sam_optimizer = wrapped
        return base

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.sam_optimizer is None:
            self.create_optimizer()
        opt = self.sam_optimizer
        params = [p for group in opt.param_groups for p in group["params"]]
        # gradients accumulated by earlier micro-batches: put aside (no copy), added back below
        accumulated = [p.grad for p in params]
        for p in params:
            p.grad = None
        loss = super().training_step(model, inputs, num_items_in_batch)  # at w (logged)
        if opt.first_step(zero_grad=True):  # w -> w + eps
            with disable_running_stats(model):
                super().training_step(model, inputs, num_items_in_batch)
            opt.restore()  # back to w; the Trainer steps with the gradient at w + eps
        with torch.no_grad():
            for p, acc in zip(params, accumulated, strict=True):
                if acc is not None:
                    if p.grad is None:
                        p.grad = acc
                    else:
                        p.grad.add_(acc)
        return loss
