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

An optimizer that holds ``w + ε`` between steps (MSAM: one pass per step, see
:mod:`samkit.optim.onepass`) needs :class:`AtWeightsCallback` in the trainer's callbacks, so that
validation, testing, prediction and checkpoints see the weights ``w``::

    trainer = L.Trainer(callbacks=[AtWeightsCallback()], ...)

With ``strategy="ddp"`` every pass is all-reduced: the ``synced`` mode of
:mod:`samkit.distributed`. Gradient clipping (``gradient_clip_val``) and
``accumulate_grad_batches`` act on each pass as Lightning defines them; with
``accumulate_grad_batches=k`` the optimizer steps every k batches and its closure runs the last
batch only, so prefer a larger batch (or :func:`samkit.accumulation_closure` with manual
optimization) for exact accumulation.
"""

from __future__ import annotations

from contextlib import ExitStack, nullcontext
from typing import Any

from torch import nn

from samkit.optim.batchnorm import disable_running_stats
from samkit.optim.kind import form_of

__all__ = ["AtWeightsCallback", "EdgeTrackerCallback", "is_perturbed", "running_stats",
           "sharpness_aware_optimizers"]


def sharpness_aware_optimizers(module: Any) -> list[Any]:
    """The samkit optimizers of a LightningModule (unwrapped from ``LightningOptimizer``)."""
    trainer = getattr(module, "_trainer", None)
    if trainer is None:
        return []
    found = []
    for opt in getattr(trainer, "optimizers", []) or []:
        opt = getattr(opt, "optimizer", opt)  # LightningOptimizer -> the torch optimizer
        if form_of(opt).wraps:  # declared by the optimizer: a samkit optimizer
            found.append(opt)
    return found


def is_perturbed(module: Any) -> bool:
    """True inside the second closure call of a step (the weights are at ``w + ε``)."""
    return any(opt.is_perturbed for opt in sharpness_aware_optimizers(module))


def running_stats(module: nn.Module):
    """A context for the forward pass: BatchNorm running statistics are left alone during
    the pass at ``w + ε`` (:func:`samkit.disable_running_stats`), updated as usual at ``w``."""
    return disable_running_stats(module) if is_perturbed(module) else nullcontext()


# --------------------------------------------------------------------------- the edge tracker


def _unwrap(opt: Any) -> Any:
    """A ``LightningOptimizer``'s torch optimizer (a torch optimizer as it is)."""
    from torch.optim import Optimizer

    return opt if isinstance(opt, Optimizer) else getattr(opt, "optimizer", opt)


def _lightning_callback_base() -> type:
    """Lightning's ``Callback`` (``lightning``, else the standalone ``pytorch_lightning``);
    :class:`~samkit._extras.MissingExtra` naming ``samkit[lightning]`` when neither is there."""
    from samkit._extras import missing, require

    if missing("lightning") and not missing("pytorch_lightning"):  # pragma: no cover
        from pytorch_lightning.callbacks import Callback

        return Callback
    require("lightning", "lightning", what="samkit.integrations.lightning")
    from lightning.pytorch.callbacks import Callback

    return Callback


class EdgeTrackerCallback(_lightning_callback_base()):  # type: ignore[misc]
    r"""A Lightning callback that tracks λ₁ of the Hessian against the optimizer's edge of
    stability (:class:`samkit.train.edge.EdgeTracker`) and logs ``λ₁``, the edge and their
    ratio to the trainer's loggers.

    Every ``every`` optimizer steps (``trainer.global_step``), before the step, at the current
    weights (the tracker's rule: an explicit ``every`` measures at every one of those steps; a
    ``budget`` caps the share of the run's time; neither: every 10 steps within 25 %): λ₁ on
    ``probe`` (or on the step's own batch when ``probe`` is ``None``, as Long & Bartlett
    measure their language model), the edge that applies to the optimizer
    (:func:`~samkit.train.edge.edge_for`: 2/η, the SAM-edge with the step's ‖g‖, Adam's, ...)
    and :math:`\lambda_1/\text{edge}`. Logged under ``{prefix}lambda1``, ``{prefix}edge``,
    ``{prefix}ratio`` and ``{prefix}grad_norm`` at every measurement (NaN where there is no
    value: no closed-form edge applies to the optimizer, said once in a warning, or Adam has
    no preconditioner yet), and ``{prefix}lambda_eff``, ``{prefix}base_edge``,
    ``{prefix}eff_ratio`` (the effective Hessian against the base optimizer's edge) where
    measured.
    The rows stay in :attr:`tracker` (``.rows``, ``.cost_summary()``) and, with ``path``, in
    a JSON-lines file. The tracker's state (warm-start vector, cost) is saved in checkpoints.

    Under ``strategy="ddp"`` (one process per device, ``torch.distributed`` initialized by
    Lightning) each rank passes its shard of the probe set (or measures on its part of the
    step's batch): every row is that of the union of the shards, the same on every rank
    (the tracker's ``process_group``, see :class:`~samkit.train.edge.EdgeTracker`); the
    loggers get it once, from global rank 0, and only rank 0 writes ``path``.

    Args:
        probe: ``(x, y)`` (or a list of batches) to measure on; ``None``: the step's batch.
        loss_fn: ``loss_fn(model(x), y)``, the mean loss over a batch.
        every: measure at step 0 and every ``every`` optimizer steps (default: every 10 steps
            within a 25 % budget).
        model: a function of the LightningModule returning the network to measure (default:
            the module itself, whose ``forward`` is then used); e.g. ``lambda m: m.net``.
        batch_to_xy: turns a training batch into ``(x, y)`` (default: the batch is ``(x, y)``).
        prefix: the prefix of the logged names.
        **tracker_kwargs: what :class:`~samkit.train.edge.EdgeTracker` takes besides
            ``probe``, ``loss_fn`` and ``every`` (``path``, ``tol``, ``k``, ``rho``, ``seed``,
            ``max_iter``, ``preconditioned``, ``verbose``, ``budget``: at most this share of
            the run's time; see :class:`~samkit.train.edge.EdgeTracker` for the rule).

    Example::

        from samkit.integrations.lightning import EdgeTrackerCallback

        edge = EdgeTrackerCallback(probe=(x_probe, y_probe), loss_fn=F.mse_loss, every=10,
                                   model=lambda m: m.net)
        L.Trainer(callbacks=[edge], logger=CSVLogger("logs")).fit(module, loader)
        print(edge.tracker.cost_summary())
    """

    def __init__(
        self,
        probe: Any = None,
        loss_fn: Any = None,
        every: int | None = None,
        *,
        model: Any = None,
        batch_to_xy: Any = None,
        prefix: str = "edge/",
        **tracker_kwargs: Any,
    ) -> None:
        from samkit.train.edge import EdgeTracker

        if loss_fn is None or not callable(loss_fn):
            raise ValueError(f"Invalid loss_fn: {loss_fn!r} (allowed: a callable (output, y) "
                             "returning the mean loss)")
        for name, fn in (("model", model), ("batch_to_xy", batch_to_xy)):
            if fn is not None and not callable(fn):
                raise ValueError(f"Invalid {name}: {fn!r} (allowed: None or a callable)")
        super().__init__()
        self.tracker = EdgeTracker(probe, loss_fn, every, **tracker_kwargs)
        self.on_batch = probe is None
        self.model_fn = model
        self.batch_to_xy = batch_to_xy
        self.prefix = prefix
        self._warned = False

    # the measurement
    def _measure(self, trainer: Any, pl_module: Any, batch: Any) -> dict[str, Any] | None:
        step = int(trainer.global_step)
        if not self.tracker.should_measure(step):
            return None
        optimizers = list(getattr(trainer, "optimizers", []) or [])
        if not optimizers:
            return None
        optimizer = _unwrap(optimizers[0])
        net = pl_module if self.model_fn is None else self.model_fn(pl_module)
        xy = None
        if batch is not None:
            xy = self.batch_to_xy(batch) if self.batch_to_xy is not None else tuple(batch)
        if self.on_batch:
            if xy is None:
                return None
            row = self.tracker.record(step, net, optimizer, probe=xy)
        else:
            row = self.tracker.record(step, net, optimizer, batch=xy)
        if row.get("edge") is None and not row.get("diverged") and not self._warned:
            self._warned = True
            _warn_no_edge(optimizer, self.prefix)
        self._log(trainer, row)
        return row

    def _log(self, trainer: Any, row: dict[str, Any]) -> None:
        from samkit.train.edge import logged_metrics

        metrics = logged_metrics(row, self.prefix)
        if getattr(trainer, "is_global_zero", True):  # under DDP the same row on every rank:
            for logger in getattr(trainer, "loggers", []) or []:  # logged once
                logger.log_metrics(metrics, step=int(row["step"]))
        callback_metrics = getattr(trainer, "callback_metrics", None)
        if isinstance(callback_metrics, dict):
            import torch

            callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})

    # Lightning's hooks
    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any,
                             batch_idx: int) -> None:
        self._measure(trainer, pl_module, batch)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if not self.on_batch:  # the final weights (no batch to measure on otherwise)
            self._measure(trainer, pl_module, None)

    def state_dict(self) -> dict[str, Any]:
        return self.tracker.state_dict()

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        if self.tracker.note is not None and getattr(trainer, "is_global_zero", True):
            print(f"note: {self.tracker.note}", flush=True)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.tracker.load_state_dict(state_dict)


class AtWeightsCallback(_lightning_callback_base()):  # type: ignore[misc]
    r"""Validation, testing, prediction and checkpoints at the weights :math:`w`, for samkit
    optimizers that hold :math:`w + \epsilon` between steps (MSAM).

    Validation, test and predict loops run inside the optimizers' ``at_weights()`` (moved to
    :math:`w`, and back bit for bit afterwards); a checkpoint's ``state_dict`` is the model's at
    :math:`w` (the optimizer's state keeps the held point, so a resumed fit continues exactly);
    at the end of training the model is left at :math:`w`. With any other optimizer it does
    nothing.
    """

    def __init__(self) -> None:
        super().__init__()
        self._stack: ExitStack | None = None

    @staticmethod
    def _optimizers(trainer: Any) -> list[Any]:
        return [_unwrap(opt) for opt in getattr(trainer, "optimizers", []) or []]

    def _enter(self, trainer: Any) -> None:
        from samkit.optim.onepass import at_weights

        if self._stack is None:
            stack = ExitStack()
            for opt in self._optimizers(trainer):
                stack.enter_context(at_weights(opt))
            self._stack = stack

    def _leave(self, *_: Any) -> None:
        if self._stack is not None:
            stack, self._stack = self._stack, None
            stack.close()

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        self._enter(trainer)

    def on_test_start(self, trainer: Any, pl_module: Any) -> None:
        self._enter(trainer)

    def on_predict_start(self, trainer: Any, pl_module: Any) -> None:
        self._enter(trainer)

    on_validation_end = on_test_end = on_predict_end = _leave

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        from samkit.optim.onepass import at_weights

        if not any(getattr(o, "weights_perturbed", False) for o in self._optimizers(trainer)):
            return
        with ExitStack() as stack:
            for opt in self._optimizers(trainer):
                stack.enter_context(at_weights(opt))
            checkpoint["state_dict"] = {k: v.detach().clone()
                                        for k, v in pl_module.state_dict().items()}

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._leave()
        for opt in self._optimizers(trainer):
            if getattr(opt, "weights_perturbed", False):
                opt.restore()


def _warn_no_edge(optimizer: Any, prefix: str) -> None:
    import warnings

    from samkit.train.edge import no_edge_reason

    warnings.warn(
        f"EdgeTrackerCallback: {no_edge_reason(optimizer) or 'no edge applies'}; "
        f"{prefix}edge and {prefix}ratio are logged as NaN ({prefix}eff_ratio, the effective "
        "Hessian against the base optimizer's edge, where it is measured)", stacklevel=3)
