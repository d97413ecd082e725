r"""One-pass optimizers: one forward-backward pass per step, at weights moved by an ε that comes
from the optimizer's state (MSAM: its momentum), not from this step's gradient.

A step of a :class:`OnePassOptimizer` is

.. math::
    \epsilon = \rho\, s\, \frac{d}{\|d\|_2}, \qquad
    g = \nabla L(w + \epsilon), \qquad
    w \leftarrow \mathrm{base\_step}(w, g)

with the direction :math:`d` of :meth:`OnePassOptimizer._direction` (per parameter; None: not
perturbed), the sign :math:`s` = :attr:`OnePassOptimizer.direction_sign` and the norm over every
param group (a zero :math:`d` gives ε = 0). ``step(closure)`` moves to :math:`w + \epsilon`, runs
the closure once and restores :math:`w` bit for bit before the base step (unscaled once under AMP,
clipped to ``max_grad_norm``, non-finite steps skipped: the one base's tail), so between steps the
model holds :math:`w`. The explicit form is ``perturb()``, the pass, ``descend()``.

The one pass is the step's own pass: ``is_perturbed`` stays False during it (BatchNorm running
statistics are updated there; :attr:`weights_perturbed` says the weights are moved).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from samkit.optim import kernels
from samkit.optim._validation import check_non_negative
from samkit.optim.kind import StepForm
from samkit.optim.wrapper import Bucket, WrappingOptimizer, _not_compiled


class OnePassOptimizer(WrappingOptimizer):
    """Base of one-pass optimizers (see the module docstring). Subclasses give
    :meth:`_direction` and, if they keep state for it, :meth:`_before_base_step_`; ``rho`` must
    be one of their per-group defaults."""

    step_form = StepForm.ONE_PASS
    #: the sign s of ε = ρ s d / ‖d‖ (MSAM: -1, against the momentum)
    direction_sign = 1.0
    #: what ``step_rewrites()`` says (the ε is not from this step's gradient)
    _step_note = "perturbs before its one pass (the perturbation is not from its gradient)"

    def __init__(self, base_optimizer, defaults: dict[str, Any], max_grad_norm=None,
                 skip_non_finite: bool = False) -> None:
        super().__init__(base_optimizer, defaults, max_grad_norm, skip_non_finite)
        self.passes = 0  # forward-backward passes run by step()

    def _direction(self, p: Tensor) -> Tensor | None:
        """The direction :math:`d` for parameter ``p`` (not modified), or None."""
        raise NotImplementedError

    @_not_compiled
    @torch.no_grad()
    def perturb(self) -> None:
        r"""Move to :math:`w + \epsilon` (the weights are saved for :meth:`restore`)."""
        if self._perturbed is not None:
            raise RuntimeError("perturb() was called twice without descend() in between")
        self._fill_defaults()
        buckets = []
        for group in self.param_groups:
            check_non_negative("rho", group["rho"])
            ps, ds, backups = [], [], []
            for p in group["params"]:
                d = self._direction(p) if p.requires_grad else None
                if d is None:
                    continue
                ps.append(p)
                ds.append(d)
                backups.append(self._state_tensor(p, "w_backup", empty=True))
            for lists in kernels.group_by_device_and_dtype(ps, ds, backups) if ps else []:
                buckets.append(Bucket(group, *lists))
        norm = kernels.global_sq_norm(b.grads for b in buckets)
        for b in buckets:
            coef = self.direction_sign * kernels.safe_ratio(
                b.group["rho"], norm.sqrt().to(b.grads[0].device))
            eps = torch._foreach_mul(b.grads, kernels.scale_for(coef, b.grads[0]))
            kernels.perturb_(b.params, eps, b.backups)
        self._perturbed = buckets

    @_not_compiled
    @torch.no_grad()
    def descend(self, scaler: torch.amp.GradScaler | None = None) -> None:
        """Restore ``w`` and take the base step with the gradient of the pass at
        :math:`w + \\epsilon` (unscaled, clipped, through ``scaler.step`` when a scaler is
        given)."""
        self.restore()
        self._first_pass_finite = None
        self._finish_step_(scaler)

    def _restore_error(self) -> str:
        return "descend()/restore() needs a perturb() before it"

    def first_step(self, zero_grad: bool = True, scaler=None) -> bool:
        raise RuntimeError(
            f"{type(self).__name__} takes one pass per step: call opt.step(closure), or "
            "opt.perturb(), the forward and backward pass, then opt.descend()"
        )

    def second_step(self, zero_grad: bool = False, scaler=None) -> None:
        self.first_step()

    @_not_compiled
    def step(self, closure=None, scaler: torch.amp.GradScaler | None = None):
        """One step: ``closure`` (zero_grad, forward, backward, return the loss) runs once, at
        :math:`w + \\epsilon`; returns its loss."""
        if closure is None:
            raise ValueError(
                f"{type(self).__name__}.step() needs a closure that zeroes the gradients, runs "
                "forward and backward and returns the loss (it is called once); or call "
                "perturb(), the pass, then descend()"
            )
        self.perturb()
        try:
            with torch.enable_grad():
                loss = self._checked_loss(closure())
        except BaseException:
            self.restore()
            raise
        self.passes += 1
        self.descend(scaler)
        return loss

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("passes", 0)
