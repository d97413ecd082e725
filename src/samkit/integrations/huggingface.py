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

from samkit._extras import require
from samkit.optim.asam import ASAM
from samkit.optim.base import SharpnessAwareOptimizer
from samkit.optim.batchnorm import disable_running_stats
from samkit.optim.kind import form_of
from samkit.optim.sam import SAM

# the extra named before transformers' own ModuleNotFoundError
require("huggingface", "transformers", what="samkit.integrations.huggingface")
from transformers import Trainer, TrainerCallback  # noqa: E402 - after the check

__all__ = ["EdgeTrackerCallback", "SAMTrainer"]

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
        for callback in self.callback_handler.callbacks:  # the edge of the SAM step, logged
            if isinstance(callback, EdgeTrackerCallback):
                callback.attach(self)

    def create_optimizer(self, model=None):
        base = super().create_optimizer(model) if model is not None else super().create_optimizer()
        if self.sam_optimizer is None or self.sam_optimizer.base_optimizer is not base:
            if isinstance(self.sam, str):
                wrapped = OPTIMIZERS[self.sam.lower()](base, **self.sam_kwargs)
            else:
                wrapped = self.sam(base)
            if not form_of(wrapped).perturbs:
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


# --------------------------------------------------------------------------- the edge tracker


class _LossOf(torch.nn.Module):
    """``model(**batch).loss`` as a module of one argument (the tracker's ``model(x)``)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.model(**batch).loss


def _own_loss(out: torch.Tensor, y: Any) -> torch.Tensor:
    return out


def _as_batch(probe: Any) -> dict[str, torch.Tensor]:
    if isinstance(probe, (list, tuple)) and probe and all(isinstance(e, dict) for e in probe):
        probe = {k: torch.stack([torch.as_tensor(e[k]) for e in probe]) for k in probe[0]}
    if not isinstance(probe, dict) or not probe or not all(
            isinstance(v, torch.Tensor) for v in probe.values()):
        raise ValueError(
            f"Invalid probe: {type(probe).__name__} (allowed: a batch dict of tensors the model "
            "takes, e.g. {'input_ids': ..., 'labels': ...}, or a list of such examples)")
    return probe


def _unwrap(optimizer: Any) -> Any:
    """The torch optimizer inside accelerate's ``AcceleratedOptimizer``."""
    while not form_of(optimizer).wraps and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


class EdgeTrackerCallback(TrainerCallback):
    r"""A ``transformers`` callback that tracks λ₁ of the Hessian of the model's own loss
    (``model(**batch).loss``) on a fixed probe batch against the optimizer's edge of stability
    (:class:`samkit.train.edge.EdgeTracker`), and logs ``λ₁``, the edge and their ratio.

    Every ``every`` optimizer steps (``state.global_step``), before the step, and at the end of
    training (the tracker's rule: an explicit ``every`` measures at every one of those steps;
    a ``budget`` caps the share of the run's time; neither: every 10 steps within 25 %): λ₁ on
    ``probe``, the edge of the optimizer (:func:`~samkit.train.edge.edge_for`; under
    :class:`SAMTrainer` the SAM one, with the probe's ‖g‖, since a callback does not see the
    step's batch) and :math:`\lambda_1/\text{edge}`, logged as ``{prefix}lambda1``,
    ``{prefix}edge``, ``{prefix}ratio``, ``{prefix}grad_norm`` at every measurement (NaN where
    there is no value: no closed-form edge applies, e.g. SAM over AdamW, said once in a
    warning, or Adam has no preconditioner yet), and ``{prefix}lambda_eff``,
    ``{prefix}base_edge``, ``{prefix}eff_ratio`` (the effective Hessian against the base
    optimizer's edge) where measured.

    Logging: a callback cannot call the Trainer's logger by itself. Under :class:`SAMTrainer`
    it is attached automatically; with a plain ``Trainer`` call ``callback.attach(trainer)``.
    An attached callback logs through ``trainer.log`` (``state.log_history`` and every
    reporting integration: TensorBoard, W&B, ...); an unattached one appends its rows to
    ``state.log_history`` and adds them to the ``logs`` of the next ``on_log`` for the
    callbacks after it.

    Hessian-vector products differentiate the loss twice: build attention models with
    ``attn_implementation="eager"`` (PyTorch's fused scaled-dot-product kernels have no double
    backward).

    Args:
        probe: the batch to measure on: a dict of tensors the model takes (with ``labels``),
            or a list of such examples (stacked).
        every: measure at step 0 and every ``every`` optimizer steps (default: every 10 steps
            within a 25 % budget).
        prefix: the prefix of the logged names.
        **tracker_kwargs: what :class:`~samkit.train.edge.EdgeTracker` takes besides
            ``probe``, ``loss_fn`` and ``every`` (``path``, ``tol``, ``k``, ``rho``, ``seed``,
            ``max_iter``, ``verbose``, ``budget``: at most this share of the run's time; see
            :class:`~samkit.train.edge.EdgeTracker` for the rule).

    Example::

        from samkit.integrations.huggingface import EdgeTrackerCallback, SAMTrainer

        edge = EdgeTrackerCallback(probe=train_dataset[:64], every=20)
        trainer = SAMTrainer(model=model, args=args, train_dataset=train_dataset, sam="sam",
                             sam_kwargs={"rho": 0.05}, callbacks=[edge])
        trainer.train()      # edge/lambda1, edge/edge, edge/ratio in the logs
        print(edge.tracker.cost_summary())
    """

    def __init__(self, probe: Any, every: int | None = None, *, prefix: str = "edge/",
                 **tracker_kwargs: Any) -> None:
        from samkit.train.edge import EdgeTracker

        batch = _as_batch(probe)
        y = batch.get("labels", next(iter(batch.values())))
        self.tracker = EdgeTracker([(batch, y)], _own_loss, every, **tracker_kwargs)
        self.prefix = prefix
        self.trainer: Any = None
        self._module: _LossOf | None = None
        self._pending: dict[str, float] = {}
        self._warned = False

    def attach(self, trainer: Any) -> EdgeTrackerCallback:
        """Log through ``trainer.log``; adds the callback to ``trainer`` if it is not there."""
        self.trainer = trainer
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        return self

    def _optimizer(self, optimizer: Any) -> Any:
        sam = getattr(self.trainer, "sam_optimizer", None)
        return sam if sam is not None else _unwrap(optimizer)

    def _measure(self, state: Any, model: Any, optimizer: Any) -> None:
        step = int(state.global_step)
        if model is None or optimizer is None or not self.tracker.should_measure(step):
            return
        if self._module is None or self._module.model is not model:
            self._module = _LossOf(model)
        from samkit.train.edge import logged_metrics, no_edge_reason

        tracked = self._optimizer(optimizer)
        row = self.tracker.record(step, self._module, tracked)
        if row.get("edge") is None and not row.get("diverged") and not self._warned:
            import warnings

            self._warned = True
            warnings.warn(
                f"EdgeTrackerCallback: {no_edge_reason(tracked) or 'no edge applies'}; "
                f"{self.prefix}edge and {self.prefix}ratio are logged as NaN "
                f"({self.prefix}eff_ratio, the effective Hessian against the base optimizer's "
                "edge, where it is measured)", stacklevel=3)
        metrics = logged_metrics(row, self.prefix)
        if self.trainer is not None:
            self.trainer.log(dict(metrics))
        else:
            state.log_history.append({**metrics, "step": step})
            self._pending.update(metrics)

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self._measure(state, model, optimizer)

    def on_train_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        self._measure(state, model, optimizer)  # the final weights
        if self.tracker.note is not None:
            print(f"note: {self.tracker.note}", flush=True)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._pending and logs is not None:
            logs.update(self._pending)
            self._pending = {}
