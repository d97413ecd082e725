r"""USAM: unnormalized SAM (Andriushchenko & Flammarion, ICML 2022)."""

from __future__ import annotations

from torch.optim import Optimizer

from samkit.optim.ascents import USAM_ASCENT
from samkit.optim.base import SharpnessAwareOptimizer


class USAM(SharpnessAwareOptimizer):
    r"""Unnormalized SAM: the ascent step is the gradient itself, scaled by ρ.

    .. math::
        \epsilon = \rho \, g, \qquad
        w \leftarrow \mathrm{base\_step}\big(w, \nabla L(w + \epsilon)\big)

    With plain gradient descent at learning rate :math:`\gamma` (``lr``) on a quadratic this is
    stable while the top Hessian eigenvalue stays below
    :math:`(\sqrt{1 + 8\rho/\gamma} - 1)/(2\rho)`
    (:func:`samkit.stability.usam_edge`). Unlike SAM, ε depends on the loss scale, so under AMP
    the gradients are unscaled first (one host sync per step).

    Args:
        base_optimizer: the optimizer that takes the descent step.
        rho: the step size ρ of the ascent (>= 0).

        max_grad_norm, skip_non_finite: see :class:`~samkit.optim.base.SharpnessAwareOptimizer`
            (clip the base step's direction; skip non-finite steps without a scaler).

    References:
        M. Andriushchenko, N. Flammarion. Towards Understanding Sharpness-Aware Minimization.
        ICML 2022. D. Long, P. Bartlett. Sharpness-Aware Minimization and the Edge of Stability.
        arXiv:2309.12488, 2023.
    """

    ascent = USAM_ASCENT  # the direction and its declarations; needs unscaled gradients

    def __init__(
        self,
        base_optimizer: Optimizer,
        rho: float = USAM_ASCENT.rho,
        *,
        max_grad_norm: float | None = None,
        skip_non_finite: bool = False,
    ) -> None:
        groups, _ = self.ascent.resolve(rho=rho)  # the record's checks
        super().__init__(
            base_optimizer,
            groups,
            max_grad_norm=max_grad_norm,
            skip_non_finite=skip_non_finite,
        )
