r"""WSAM: sharpness as a weighted regularization term (Yue et al., KDD 2023)."""

from __future__ import annotations

from typing import Any

import torch
from torch.optim import Optimizer

from samkit.optim import descents, kernels
from samkit.optim._validation import check_non_negative, check_positive
from samkit.optim.ascents import SAM_ASCENT, Ascent, get_ascent
from samkit.optim.base import Bucket, SharpnessAwareOptimizer


class WSAM(SharpnessAwareOptimizer):
    r"""WSAM: minimize :math:`L(w) + \frac{\gamma}{1 - \gamma}\,\big(L(w + \epsilon) - L(w)\big)`.

    SAM's loss :math:`L(w + \epsilon)` is the loss plus the sharpness with weight 1; WSAM weights
    the sharpness by :math:`\alpha = \gamma / (1 - \gamma)` (γ = 1/2 is SAM, γ = 0 the base
    optimizer). With :math:`g = \nabla L(w)`, :math:`\epsilon = \rho\, g / \|g\|_2` (or any
    ascent) and :math:`g_p = \nabla L(w + \epsilon)`:

    .. math::
        \text{coupled:}\quad w \leftarrow \mathrm{base\_step}\big(w,\; g + \alpha (g_p - g)\big)

    .. math::
        \text{decoupled (default):}\quad w' = \mathrm{base\_step}(w, g), \qquad
        w \leftarrow w' - \gamma_t\, \alpha\, (g_p - g)

    with :math:`\gamma_t` the group's learning rate at this step. The decoupled form (the
    paper's Algorithm 1, "weight decouple") keeps the sharpness term out of the base
    optimizer's momentum and adaptive statistics, so each step applies only the current
    sharpness.

    Notes:
        * ``max_grad_norm`` clips the whole direction :math:`g + \alpha (g_p - g)` (decoupled:
          both of its parts by the same factor), so an lr-1 SGD step is bounded by it. The
          official code (atorch ``WeightedSAM``) instead clips :math:`g` and :math:`g_p`
          separately to ``max_norm`` (default 1.0 there; here no clip by default).
        * γ and ``decouple`` are per-group keys (``wsam_alpha`` holds α, ``wsam_decouple`` the
          flag). Memory: one parameter-sized copy of :math:`g` besides SAM's weight backup.
        * Under a GradScaler the decoupled term is applied only when the base step was taken
          (one host sync per step to know it).

    Args:
        base_optimizer: the optimizer that takes the descent step.
        rho: the radius ρ of the ascent (>= 0).
        gamma: the weight γ of the sharpness, 0 <= γ < 1 (default 0.9: the paper finds
            γ in [0.8, 0.95] stable; the official code's default is 0.88).
        decouple: apply the sharpness term after the base step (default True, the paper's
            recommended form) or mix it into the gradient the base optimizer sees.
        ascent: the ascent that finds ε (default ``"sam"``; e.g. ``"asam"``, the official
            code's ``adaptive=True`` reading).
        ascent_options: the ascent's own hyperparameters (e.g. ``{"eta": 0.01}`` for ASAM).

        max_grad_norm, skip_non_finite: see :class:`~samkit.optim.base.SharpnessAwareOptimizer`.

    References:
        Y. Yue, J. Jiang, Z. Ye, N. Gao, Y. Liu, K. Zhang. Sharpness-Aware Minimization
        Revisited: Weighted Sharpness as a Regularization Term. KDD 2023 (arXiv:2305.15817).
    """

    _keeps_first_grads = True

    def __init__(
        self,
        base_optimizer: Optimizer,
        rho: float = 0.05,
        gamma: float = 0.9,
        decouple: bool = True,
        *,
        ascent: str | Ascent = "sam",
        ascent_options: dict[str, Any] | None = None,
        max_grad_norm: float | None = None,
        skip_non_finite: bool = False,
    ) -> None:
        check_non_negative("gamma", gamma)
        if gamma >= 1:
            raise ValueError(f"Invalid gamma: {gamma!r} (allowed: 0 <= gamma < 1)")
        if not isinstance(decouple, bool):
            raise ValueError(f"Invalid decouple: {decouple!r} (allowed: True, False)")
        self.ascent = get_ascent(ascent)
        options = dict(ascent_options or {})
        if "rho" in options:
            raise ValueError(f"Invalid ascent_options: rho={options['rho']!r} (give rho= itself)")
        groups, self.ascent_options = self.ascent.resolve(rho=rho, **options)
        groups.update(wsam_alpha=gamma / (1.0 - gamma), wsam_decouple=decouple)
        super().__init__(
            base_optimizer, groups, max_grad_norm=max_grad_norm, skip_non_finite=skip_non_finite
        )
        self._pending: list[Bucket] | None = None  # the buckets _descent_ rewrote
        self._sharpness: list[Bucket] | None = None  # the term to apply after this base step

    def _descent_(self, buckets: list[Bucket]) -> None:
        descents.weighted_descent(self, buckets)
        self._pending = buckets

    def _clip_(self, buckets: list[Bucket]) -> None:
        r"""``max_grad_norm`` bounds WSAM's whole direction
        :math:`d = g + lpha (g_p - g)`: coupled, :math:`d` is the base direction (the usual
        clip); decoupled, both parts (:math:`g` for the base, :math:`g - g_p` for after it) are
        scaled by the same :math:`\min(1, c / (\|d\|_2 + 10^{-6}))`."""
        decoupled = buckets is self._pending and any(b.group["wsam_decouple"] for b in buckets)
        if not decoupled or all(b.group.get("max_grad_norm") is None for b in buckets):
            return super()._clip_(buckets)
        whole = [
            torch._foreach_add(b.grads, b.first_grads, alpha=-float(b.group["wsam_alpha"]))
            if b.group["wsam_decouple"] else b.grads
            for b in buckets
        ]  # fmt: skip
        norm = kernels.global_sq_norm(whole).sqrt()
        for b in buckets:
            limit = b.group.get("max_grad_norm")
            if limit is None:
                continue
            check_positive("max_grad_norm", limit)
            coef = (float(limit) / (norm + 1e-6)).clamp(max=1.0).to(b.grads[0].device)
            torch._foreach_mul_(b.grads, coef)
            if b.group["wsam_decouple"]:
                torch._foreach_mul_(b.first_grads, coef)

    def _before_base_step_(self, buckets: list[Bucket]) -> None:
        # a sharpness term only after a two-pass step's own descent (a one-pass step of a
        # schedule builds new buckets; a skipped step never gets here)
        self._sharpness = buckets if buckets is self._pending else None
        self._pending = None

    def _after_step_(self) -> None:
        if self._sharpness is not None:
            descents.weighted_after_step(self, self._sharpness)
        self._sharpness = None

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_pending"] = state["_sharpness"] = None  # this step's buckets only
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_sharpness", None)
        self.__dict__.setdefault("_pending", None)

    def __repr__(self) -> str:
        extra = "" if self.ascent is SAM_ASCENT else f", ascent={self.ascent.name!r}"
        return super().__repr__()[:-1] + extra + ")"
