r"""Loss-term optimizers: one pass per step at :math:`w`, with a term the optimizer adds to the
loss (SAF's and MESA's trajectory loss).

.. math::
    w \leftarrow \mathrm{base\_step}\big(w, \nabla_w [L_B(w) + T(w; B)]\big)

The step engine (:mod:`samkit.step`) calls :meth:`LossTermOptimizer.loss_term` for every
micro-batch and backpropagates ``loss + term``; what the term needs from the caller (example
indices, the epoch, ...) the optimizer declares in :attr:`~LossTermOptimizer.batch_needs`. In
your own loop add the term in the closure. The tail of the step (AMP, the clip to
``max_grad_norm``, the non-finite skip, the base step, :meth:`_after_step_`) is the one base's
(:class:`~samkit.optim.wrapper.WrappingOptimizer`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from samkit.optim.kind import StepForm
from samkit.optim.wrapper import Closure, WrappingOptimizer, _not_compiled


class LossTermOptimizer(WrappingOptimizer):
    """Base of loss-term optimizers. Subclasses give :meth:`loss_term` (and call
    :meth:`_counted` with each term they compute).

    ``step(closure)`` runs the closure once, then the base step (``step(closure, scaler=...)``
    takes a GradScaler as every samkit optimizer does). Without a closure the gradients are
    taken as they are: ``scaler.step(opt)`` in an AMP loop, whose ``unscale_`` is honoured.

    A step whose closure computed no term since the last step raises ``RuntimeError``: without
    it the optimizer would silently be its base optimizer.
    """

    step_form = StepForm.LOSS_TERM
    _state_namespace = "trajectory"

    def __init__(self, base_optimizer, defaults: dict[str, Any], max_grad_norm=None,
                 skip_non_finite: bool = False) -> None:
        super().__init__(base_optimizer, defaults, max_grad_norm, skip_non_finite)
        self.last_term: Tensor | None = None  # the last term (detached), for logs
        self._terms = 0  # term calls since the last step

    def loss_term(self, output: Tensor, batch: Any) -> Tensor | None:
        """The term for one micro-batch (a 0-d tensor, or None when it is off), from its
        outputs and a :class:`samkit.step.BatchInfo`."""
        raise NotImplementedError

    def edge_note(self) -> str:
        return (f"no closed-form edge for {type(self).__name__}: its step adds a loss term "
                "(the edge of the data loss alone does not apply)")

    def _counted(self, term: Tensor | None) -> Tensor | None:
        self._terms += 1
        if term is not None:
            self.last_term = term.detach()
        return term

    def _term_missing(self) -> str:
        return (
            f"{type(self).__name__}.step(): the closure did not compute the loss term, so this "
            "step would be a plain base-optimizer step. Add the term to the loss in the "
            "closure, or train through samkit.step.StepEngine / the Trainer, which call "
            "opt.loss_term for you"
        )

    @_not_compiled
    @torch.no_grad()
    def step(self, closure: Closure | None = None,
             scaler: torch.amp.GradScaler | None = None) -> Any:
        """Run ``closure`` (once; it must zero the gradients, add the term, call ``backward``
        and return the loss), then the base step. Returns the closure's loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._terms == 0:
            raise RuntimeError(self._term_missing())
        self._terms = 0
        self._finish_step_(scaler)
        return loss

    def _pack_own_state(self, params: dict[int, Any], extra: dict[str, Any]) -> dict[str, Any]:
        return extra  # optimizer-level state only, flat (the format SAF/MESA always saved)

    def _unpack_own_state(self, own: dict[str, Any]) -> tuple[dict[int, Any], dict[str, Any]]:
        return {}, own

    def _global_state_dict(self) -> dict[str, Any]:
        return {"skipped_steps": self.skipped_steps}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_terms", 0)
        self.__dict__.setdefault("last_term", None)
