r"""Fisher SAM: the ascent inside a Fisher-information ellipsoid (Kim et al., ICML 2022)."""

from __future__ import annotations

from torch.optim import Optimizer

from samkit.optim.ascents import FISHER_ASCENT
from samkit.optim.base import SharpnessAwareOptimizer


class FisherSAM(SharpnessAwareOptimizer):
    r"""Fisher SAM: SAM's ball replaced by the ellipsoid of a diagonal empirical Fisher matrix.

    With :math:`g = \nabla L(w)` and the diagonal empirical Fisher :math:`F = I + \eta\,
    \mathrm{diag}(g \odot g)`, ε maximizes the linearized loss over
    :math:`\epsilon^\top F \epsilon \le \rho^2`:

    .. math::
        \epsilon = \rho \, \frac{F^{-1} g}{\sqrt{g^\top F^{-1} g}}, \qquad
        w \leftarrow \mathrm{base\_step}\big(w, \nabla L(w + \epsilon)\big).

    Coordinates with a large squared gradient (much information) are perturbed less. ``eta = 0``
    gives SAM exactly.

    Notes:
        * :math:`g^\top F^{-1} g` spans every param group; ``rho`` and ``eta`` are per-group keys.
        * F depends on the scale of g, so under AMP the gradients are unscaled first (one host
          sync per step), as for USAM.
        * ``eta`` is the Fisher scale η of the paper, not the learning rate.
        * A zero gradient gives ε = 0.

    Args:
        base_optimizer: the optimizer that takes the descent step.
        rho: the radius ρ of the ellipsoid (>= 0).
        eta: the scale η of the empirical Fisher (>= 0).

        max_grad_norm, skip_non_finite: see :class:`~samkit.optim.base.SharpnessAwareOptimizer`
            (clip the base step's direction; skip non-finite steps without a scaler).

    References:
        M. Kim, D. Li, S. X. Hu, T. M. Hospedales. Fisher SAM: Information Geometry and
        Sharpness Aware Minimisation. ICML 2022.
    """

    ascent = FISHER_ASCENT  # the direction and its declarations; needs unscaled gradients

    def __init__(
        self,
        base_optimizer: Optimizer,
        rho: float = FISHER_ASCENT.rho,
        eta: float = FISHER_ASCENT.group_defaults["eta"],
        *,
        max_grad_norm: float | None = None,
        skip_non_finite: bool = False,
    ) -> None:
        groups, _ = self.ascent.resolve(rho=rho, eta=eta)  # the record's checks
        super().__init__(
            base_optimizer,
            groups,
            max_grad_norm=max_grad_norm,
            skip_non_finite=skip_non_finite,
        )
