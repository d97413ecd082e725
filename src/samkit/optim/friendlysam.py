r"""FriendlySAM: the ascent along the gradient minus its running mean (Li et al., CVPR 2024)."""

from __future__ import annotations

from torch.optim import Optimizer

from samkit.optim.ascents import FRIENDLY_ASCENT
from samkit.optim.base import SharpnessAwareOptimizer


class FriendlySAM(SharpnessAwareOptimizer):
    r"""FriendlySAM (F-SAM): perturb along the batch-specific part of the gradient.

    The full-gradient component of :math:`g = \nabla L_B(w)` is estimated by an exponential
    moving average :math:`m` of past **raw** minibatch gradients and removed from the ascent:

    .. math::
        d_t = g_t - \sigma\, m_{t-1}, \qquad
        \epsilon = \rho \frac{d_t}{\|d_t\|_2}, \qquad
        m_t = \lambda\, m_{t-1} + (1 - \lambda)\, g_t, \qquad
        w \leftarrow \mathrm{base\_step}\big(w, \nabla L_B(w + \epsilon)\big)

    with :math:`m` started at the first gradient (the first step is a SAM step), as in the
    official code. The mean is fed :math:`g_t` itself, never :math:`d_t` or the perturbed
    gradient.

    Note:
        With σ = 1 this is the same ε as updating the mean first and perturbing along
        :math:`g_t - m_t = \lambda (g_t - m_{t-1})`: only the direction matters after the
        normalization. Under AMP the mean is kept in unscaled units (the gradients are unscaled
        first, one host sync per step) and is not updated on a step whose first pass
        overflowed. ``sigma``/``lmbda`` are stored per group as ``fsam_sigma``/``fsam_lambda``;
        the mean is per-parameter state (saved by ``state_dict``). A zero :math:`d` gives ε = 0.

    Args:
        base_optimizer: the optimizer that takes the descent step.
        rho: the radius ρ (>= 0).
        sigma: how much of the mean is removed, σ (>= 0; 0 is SAM).
        lmbda: the decay λ of the moving average (0 <= λ < 1).

        max_grad_norm, skip_non_finite: see :class:`~samkit.optim.base.SharpnessAwareOptimizer`
            (clip the base step's direction; skip non-finite steps without a scaler).

    References:
        T. Li, P. Zhou, Z. He, X. Cheng, X. Huang. Friendly Sharpness-Aware Minimization.
        CVPR 2024.
    """

    ascent = FRIENDLY_ASCENT  # the direction and its declarations; needs unscaled gradients

    def __init__(
        self,
        base_optimizer: Optimizer,
        rho: float = FRIENDLY_ASCENT.rho,
        sigma: float = FRIENDLY_ASCENT.group_defaults["sigma"],
        lmbda: float = FRIENDLY_ASCENT.group_defaults["lmbda"],
        *,
        max_grad_norm: float | None = None,
        skip_non_finite: bool = False,
    ) -> None:
        groups, _ = self.ascent.resolve(rho=rho, sigma=sigma, lmbda=lmbda)  # the record's checks
        if lmbda >= 1:  # not in the record (its check sees options only): see CHANGELOG
            raise ValueError(f"Invalid lmbda: {lmbda!r} (allowed: 0 <= lmbda < 1)")
        super().__init__(
            base_optimizer,
            groups,
            max_grad_norm=max_grad_norm,
            skip_non_finite=skip_non_finite,
        )
