r"""GSAM: surrogate-gap guided sharpness-aware minimization (Zhuang et al., ICLR 2022)."""

from __future__ import annotations

from typing import Any

from torch.optim import Optimizer

from samkit.optim import descents
from samkit.optim._validation import check_non_negative
from samkit.optim.ascents import SAM_ASCENT, Ascent, get_ascent
from samkit.optim.base import Bucket, SharpnessAwareOptimizer


def gsam_rho(lr: float, rho_max: float, rho_min: float, lr_max: float, lr_min: float) -> float:
    r""":math:`\rho_t = \rho_{min} + (\rho_{max} - \rho_{min})
    \frac{\gamma_t - \gamma_{min}}{\gamma_{max} - \gamma_{min}}`, the fraction clipped to [0, 1];
    :math:`\rho_{max}` when :math:`\gamma_{max} = \gamma_{min}`."""
    if lr_max == lr_min:
        return float(rho_max)
    frac = (float(lr) - lr_min) / (lr_max - lr_min)
    return float(rho_min + (rho_max - rho_min) * min(1.0, max(0.0, frac)))


class GSAM(SharpnessAwareOptimizer):
    r"""GSAM: SAM's perturbed gradient plus an ascent on the surrogate gap, with ρ tied to the LR.

    With :math:`g = \nabla L(w)` and the learning rate :math:`\gamma_t` the base optimizer has at
    this step (an LR scheduler may change it),

    .. math::
        \rho_t = \rho_{min} + (\rho_{max} - \rho_{min})
            \frac{\gamma_t - \gamma_{min}}{\gamma_{max} - \gamma_{min}}, \qquad
        \epsilon = \rho_t \frac{g}{\|g\|_2}, \qquad g_p = \nabla L(w + \epsilon),

    .. math::
        g_\perp = g - \frac{\langle g, g_p \rangle}{\|g_p\|_2^2} g_p, \qquad
        w \leftarrow \mathrm{base\_step}(w, \; g_p - \alpha \, g_\perp).

    :math:`g_p` descends the perturbed loss :math:`L_p = L(w + \epsilon)`. The term
    :math:`-\alpha g_\perp` moves :math:`w` up :math:`L` along :math:`g_\perp`, the part of
    :math:`g` orthogonal to :math:`g_p`: since :math:`\nabla h \approx g_p - g` for the surrogate
    gap :math:`h = L_p - L`, this lowers :math:`h` while leaving :math:`L_p` unchanged to first
    order. The step thus minimizes :math:`L_p` and the gap together.

    Notes:
        * The fraction of the LR range is clipped to [0, 1] (the paper's linear map, without
          extrapolation during warm-up or past ``lr_max``). ``lr_max`` defaults to each group's
          ``initial_lr`` (set by an LR scheduler built before GSAM, e.g. a warm-up that starts
          low), else its learning rate when the optimizer is built (a scheduler built after
          GSAM starts from that lr); ``lr_min`` to 0. The current
          :math:`\rho_t` is written to ``group["rho"]`` at every step, for logging.
        * Norms and the inner product span every param group; ρ and α may differ per group
          (``rho_max``, ``rho_min``, ``lr_max``, ``lr_min``, ``gsam_alpha``; α's group key is
          prefixed because RMSprop has an ``alpha``).
        * A zero :math:`g_p` gives the SAM step (no division by zero).
        * Memory: one parameter-sized copy of :math:`g` besides SAM's weight backup.

    Args:
        base_optimizer: the optimizer that takes the descent step.
        rho_max: ρ at ``lr_max`` (>= 0).
        rho_min: ρ at ``lr_min`` (0 <= rho_min <= rho_max).
        alpha: the weight α of the surrogate-gap term (>= 0; 0 is SAM with the ρ schedule).
        lr_max: the learning rate at which ρ = rho_max (default: each group's ``initial_lr``,
            else its current lr).
        lr_min: the learning rate at which ρ = rho_min.
        ascent: the ascent that finds ε at radius :math:`\rho_t` (default ``"sam"``, the
            paper's :math:`\rho_t g/\|g\|`; e.g. ``"asam"`` for
            :math:`\epsilon = \rho_t T^2 g / \|T g\|`). GSAM's descent is the same over any
            ascent.
        ascent_options: the ascent's own hyperparameters (e.g. ``{"eta": 0.01}`` for ASAM).

        max_grad_norm, skip_non_finite: see :class:`~samkit.optim.base.SharpnessAwareOptimizer`
            (clip the base step's direction; skip non-finite steps without a scaler).

    References:
        J. Zhuang, B. Gong, L. Yuan, Y. Cui, H. Adam, N. Dvornek, S. Tatikonda, J. Duncan, T. Liu.
        Surrogate Gap Guided Sharpness-Aware Minimization (GSAM). ICLR 2022.
    """

    _keeps_first_grads = True

    def __init__(
        self,
        base_optimizer: Optimizer,
        rho_max: float = 0.05,
        rho_min: float = 0.0,
        alpha: float = 0.1,
        lr_max: float | None = None,
        lr_min: float = 0.0,
        *,
        ascent: str | Ascent = "sam",
        ascent_options: dict[str, Any] | None = None,
        max_grad_norm: float | None = None,
        skip_non_finite: bool = False,
    ) -> None:
        check_non_negative("rho_max", rho_max)
        check_non_negative("rho_min", rho_min)
        check_non_negative("alpha", alpha)
        check_non_negative("lr_min", lr_min)
        if rho_min > rho_max:
            raise ValueError(
                f"Invalid rho_min: {rho_min!r} (allowed: 0 <= rho_min <= rho_max = {rho_max!r})"
            )
        if lr_max is not None:
            check_non_negative("lr_max", lr_max)
            if lr_max < lr_min:
                raise ValueError(
                    f"Invalid lr_max: {lr_max!r} (allowed: lr_max >= lr_min = {lr_min!r})"
                )
        defaults = dict(
            rho=rho_max, rho_max=rho_max, rho_min=rho_min, gsam_alpha=alpha,
            lr_max=lr_max, lr_min=lr_min,
        )  # fmt: skip
        self.ascent = get_ascent(ascent)
        options = dict(ascent_options or {})
        if "rho" in options:
            raise ValueError(
                f"Invalid ascent_options: rho={options['rho']!r} (GSAM's radius is rho_t, "
                "between rho_min and rho_max: set those)"
            )
        extra, self.ascent_options = self.ascent.resolve(**options)
        extra.pop("rho")
        defaults.update(extra)
        super().__init__(
            base_optimizer,
            defaults,
            max_grad_norm=max_grad_norm,
            skip_non_finite=skip_non_finite,
        )
        for group in self.param_groups:
            if group["lr_max"] is None:  # an LR scheduler built first has stored the peak lr
                group["lr_max"] = float(group.get("initial_lr", group["lr"]))

    def _ascent_(self, buckets: list[Bucket]) -> None:
        for b in buckets:
            grp = b.group
            if grp["lr_max"] is None:  # a group added after wrapping
                grp["lr_max"] = float(grp.get("initial_lr", grp["lr"]))
            lr_max = float(grp["lr_max"])
            grp["rho"] = gsam_rho(grp["lr"], grp["rho_max"], grp["rho_min"], lr_max, grp["lr_min"])
        self.ascent.direction(self, buckets, self.ascent_options)

    def _descent_(self, buckets: list[Bucket]) -> None:
        descents.gap_descent(self, buckets)

    def __repr__(self) -> str:
        extra = "" if self.ascent is SAM_ASCENT else f", ascent={self.ascent.name!r}"
        return super().__repr__()[:-1] + extra + ")"
