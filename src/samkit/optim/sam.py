r"""SAM: sharpness-aware minimization (Foret et al., ICLR 2021)."""

from __future__ import annotations

from torch.optim import Optimizer

from samkit.optim.ascents import SAM_ASCENT
from samkit.optim.base import SharpnessAwareOptimizer


class SAM(SharpnessAwareOptimizer):
    r"""Sharpness-aware minimization around any base optimizer.

    .. math::
        \epsilon = \rho \, \frac{g}{\|g\|_2}, \qquad g = \nabla L(w), \qquad
        w \leftarrow \mathrm{base\_step}\big(w, \nabla L(w + \epsilon)\big)

    :math:`\|g\|_2` is the norm of the whole gradient, over every param group. ε is the
    first-order solution of :math:`\max_{\|\epsilon\|_2 \le \rho} L(w + \epsilon)`. Each group may
    carry its own ``rho`` (ε of that group's parameters uses it), and ``group["rho"]`` may be
    changed between steps by a schedule. A zero gradient gives ε = 0.

    Args:
        base_optimizer: the optimizer that takes the descent step, e.g.
            ``torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)``.
        rho: the radius ρ of the neighbourhood (>= 0; ``rho=0`` is exactly the base optimizer).
        max_grad_norm, skip_non_finite: see :class:`~samkit.optim.base.SharpnessAwareOptimizer`
            (clip the base step's direction; skip non-finite steps without a scaler).

    Example::

        opt = samkit.SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.05)
        def closure():
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            return loss
        loss = opt.step(closure)

    References:
        P. Foret, A. Kleiner, H. Mobahi, B. Neyshabur. Sharpness-Aware Minimization for
        Efficiently Improving Generalization. ICLR 2021.
    """

    ascent = SAM_ASCENT  # the direction and its declarations (samkit.optim.ascents)

    def __init__(
        self,
        base_optimizer: Optimizer,
        rho: float = SAM_ASCENT.rho,
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
