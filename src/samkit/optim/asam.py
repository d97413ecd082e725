r"""ASAM: adaptive sharpness-aware minimization (Kwon et al., ICML 2021)."""

from __future__ import annotations

from torch.optim import Optimizer

from samkit.optim.ascents import ASAM_ASCENT, P_NORMS
from samkit.optim.base import SharpnessAwareOptimizer

__all__ = ["ASAM", "P_NORMS"]


class ASAM(SharpnessAwareOptimizer):
    r"""Adaptive SAM: the ascent is taken in the coordinates of a normalization operator T_w.

    With :math:`T_w = \mathrm{diag}(|w| + \eta)` (element-wise) and :math:`g = \nabla L(w)`, ε is
    the first-order maximizer of :math:`L(w + \epsilon)` over the ball
    :math:`\|T_w^{-1}\epsilon\|_p \le \rho`:

    .. math::
        p = 2:\quad \epsilon = \rho \, \frac{T_w^2 \, g}{\|T_w \, g\|_2}, \qquad
        p = \infty:\quad \epsilon = \rho \, T_w \, \mathrm{sign}(g),

    then :math:`w \leftarrow \mathrm{base\_step}(w, \nabla L(w + \epsilon))`. Because
    :math:`T_{Aw} = A\,T_w` for a scaling :math:`A` that leaves the loss unchanged (up to η),
    the step does not depend on how a ReLU network's weights are scaled.

    * ``normalization="filterwise"`` uses, for every output filter :math:`w_i` (a row of a weight
      matrix, an output channel of a conv), :math:`\|w_i\|_2 + \eta` instead of :math:`|w| + \eta`.
    * Groups with ``normalize=False`` use :math:`T = I` (plain SAM directions); build the groups
      with :func:`samkit.param_groups` to get the paper's setting, where biases are not normalized
      (the official code applies :math:`T_w` to weights only). Groups without the key are
      normalized.
    * The norm :math:`\|T_w g\|_2` spans every param group; ``rho`` and ``eta`` may differ per
      group and may be changed between steps.

    Note:
        ``eta`` is the offset η of :math:`T_w` (0.01 in the paper), not the learning rate. The
        paper's ρ for ASAM is about ten times SAM's (0.5 on CIFAR-10 with η = 0.01) because the
        ball is measured relative to the weights.

    Args:
        base_optimizer: the optimizer that takes the descent step.
        rho: the radius ρ (>= 0).
        eta: the offset η of the normalization operator (>= 0).
        p: the norm of the ball, 2 or ``math.inf`` (``float("inf")``).
        normalization: ``"elementwise"`` (the paper) or ``"filterwise"``.
        normalize: the default of the per-group key ``normalize`` (groups that carry their own,
            e.g. from :func:`samkit.param_groups`, keep it; False: plain SAM directions).

        max_grad_norm, skip_non_finite: see :class:`~samkit.optim.base.SharpnessAwareOptimizer`
            (clip the base step's direction; skip non-finite steps without a scaler).

    References:
        J. Kwon, J. Kim, H. Park, I. K. Choi. ASAM: Adaptive Sharpness-Aware Minimization for
        Scale-Invariant Learning of Deep Neural Networks. ICML 2021.
    """

    ascent = ASAM_ASCENT  # the direction and its declarations (samkit.optim.ascents)

    def __init__(
        self,
        base_optimizer: Optimizer,
        rho: float = ASAM_ASCENT.rho,
        eta: float = ASAM_ASCENT.group_defaults["eta"],
        p: float = ASAM_ASCENT.options["p"],
        normalization: str = ASAM_ASCENT.options["normalization"],
        *,
        normalize: bool = ASAM_ASCENT.group_defaults["normalize"],
        max_grad_norm: float | None = None,
        skip_non_finite: bool = False,
    ) -> None:
        # the record's checks; groups: rho, eta, normalize; options: p, normalization
        groups, self.ascent_options = self.ascent.resolve(
            rho=rho, eta=eta, normalize=normalize, p=p, normalization=normalization
        )
        super().__init__(
            base_optimizer,
            groups,
            max_grad_norm=max_grad_norm,
            skip_non_finite=skip_non_finite,
        )

    @property
    def p(self) -> float:
        """The norm of the ball, 2 or ``math.inf``."""
        return self.ascent_options["p"]

    @property
    def normalization(self) -> str:
        """``"elementwise"`` or ``"filterwise"``."""
        return self.ascent_options["normalization"]

    def __setstate__(self, state) -> None:
        # an ASAM pickled before the ascent records kept p and normalization as attributes
        if "ascent_options" not in state and "p" in state:
            state = dict(state)
            state["ascent_options"] = {
                "p": state.pop("p"),
                "normalization": state.pop("normalization", "elementwise"),
            }
        super().__setstate__(state)

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", p={self.p}, normalization={self.normalization!r})"
