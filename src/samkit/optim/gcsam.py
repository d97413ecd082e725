r"""GCSAM: SAM with a centralized ascent gradient (Hassan et al., 2025)."""

from __future__ import annotations

from torch.optim import Optimizer

from samkit.optim.ascents import GCSAM_ASCENT
from samkit.optim.base import SharpnessAwareOptimizer


class GCSAM(SharpnessAwareOptimizer):
    r"""GCSAM: perturb along the centralized gradient.

    Gradient centralization :math:`\Phi` (Yong et al. 2020) removes from the gradient of every
    weight with more than one dimension its mean over each output unit (row of a linear
    weight, output channel of a convolution); biases are left alone. GCSAM takes SAM's step with
    the centralized gradient in the ascent:

    .. math::
        \Phi(g)_i = g_i - \mathrm{mean}(g_i), \qquad
        \epsilon = \rho \frac{\Phi(g)}{\|\Phi(g)\|_2}, \qquad
        w \leftarrow \mathrm{base\_step}\big(w, \nabla L(w + \epsilon)\big)

    with :math:`g = \nabla L(w)` and the norm over every param group.

    Notes:
        * The descent uses the perturbed gradient as it is (the paper's Algorithm 1 centralizes
          the ascent only; centralizing the descent too is gradient centralization of the base
          optimizer, a separate choice).
        * pytorch_optimizer's ``SAM(use_gc=True)`` divides the centralized gradient by the norm
          of the *raw* gradient, so its :math:`\|\epsilon\| < \rho`; here
          :math:`\|\epsilon\| = \rho`, as the paper's :math:`\epsilon_{GC}` (tested against both).
        * ρ = 0.05 (SAM's default) is the default; a zero centralized gradient gives ε = 0.

    Args:
        base_optimizer: the optimizer that takes the descent step.
        rho: the radius ρ (>= 0).

        max_grad_norm, skip_non_finite: see :class:`~samkit.optim.base.SharpnessAwareOptimizer`
            (clip the base step's direction; skip non-finite steps without a scaler).

    References:
        M. Hassan, A. Vakanski, B. Zhang, M. Xian. GCSAM: Gradient Centralized Sharpness Aware
        Minimization. arXiv:2501.11584, 2025 (IEEE Access 13, 2025);
        H. Yong, J. Huang, X. Hua, L. Zhang. Gradient Centralization: A New Optimization
        Technique for Deep Neural Networks. ECCV 2020.
    """

    ascent = GCSAM_ASCENT

    def __init__(
        self,
        base_optimizer: Optimizer,
        rho: float = GCSAM_ASCENT.rho,
        *,
        max_grad_norm: float | None = None,
        skip_non_finite: bool = False,
    ) -> None:
        groups, _ = self.ascent.resolve(rho=rho)  # the record's checks
        super().__init__(
            base_optimizer, groups, max_grad_norm=max_grad_norm, skip_non_finite=skip_non_finite
        )
