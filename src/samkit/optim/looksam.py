r"""LookSAM: SAM's full ascent every k steps only (Liu et al., CVPR 2022)."""

from __future__ import annotations

from typing import Any

import torch
from torch.optim import Optimizer

from samkit.optim import descents
from samkit.optim._validation import check_non_negative
from samkit.optim.ascents import SAM_ASCENT, Ascent, get_ascent
from samkit.optim.base import Bucket, SharpnessAwareOptimizer


class LookSAM(SharpnessAwareOptimizer):
    r"""LookSAM: a full SAM step every ``k`` steps; one-pass steps in between that reuse the part
    of the SAM gradient orthogonal to the plain gradient.

    Every ``k``-th step (steps 0, k, 2k, ... and whenever a parameter has no stored direction
    yet), with :math:`g = \nabla L(w)`:

    .. math::
        g_s = \nabla L\Big(w + \rho \frac{g}{\|g\|_2}\Big), \qquad
        g_v = g_s - \frac{\langle g, g_s \rangle}{\|g\|_2^2} \, g, \qquad
        w \leftarrow \mathrm{base\_step}(w, g_s)

    (:math:`g_v = g_s - \|g_s\| \cos\theta \, g / \|g\|`, the paper's form). The other steps run
    **one** forward-backward pass and descend with

    .. math::
        g_s = g + \alpha \frac{\|g\|_2}{\|g_v\|_2} \, g_v

    using the :math:`g_v` of the last full step. ``step(closure)`` calls the closure twice on
    full steps and once in between; in the explicit form, ``first_step()`` returns False on the
    in-between steps (the base step is then already taken)::

        loss_fn(model(x), y).backward()
        if opt.first_step():
            loss_fn(model(x), y).backward()
            opt.second_step()

    Notes:
        * Norms and inner products span every param group (the paper's LookSAM, not its
          layer-wise LookLayerSAM). ``rho`` and ``looksam_alpha`` are per-group keys.
        * :math:`g_v` is kept per parameter (saved by ``state_dict``, with the step counter);
          under AMP it is updated only from a finite full step, and is invariant to the loss
          scale because it enters through :math:`\|g\| / \|g_v\|`.
        * A zero :math:`g` or :math:`g_v` adds nothing (no division by zero).
        * Memory: :math:`g_v` and a copy of :math:`g` besides SAM's weight backup.

    Args:
        base_optimizer: the optimizer that takes the descent step.
        rho: the radius ρ of the full steps' ascent (>= 0).
        k: a full SAM step every ``k`` steps (>= 1; 1 is SAM).
        alpha: the weight α of :math:`g_v` in the in-between steps (>= 0).
        ascent: the ascent of the full steps (default ``"sam"``, the paper's
            :math:`\rho g / \|g\|`; e.g. ``"asam"``: :math:`g_s = \nabla L(w + \rho T^2 g /
            \|T g\|)`). :math:`g_v` and the in-between steps are the same over any ascent.
        ascent_options: the ascent's own hyperparameters (e.g. ``{"eta": 0.01}`` for ASAM).

        max_grad_norm, skip_non_finite: see :class:`~samkit.optim.base.SharpnessAwareOptimizer`
            (clip the base step's direction; skip non-finite steps without a scaler).

    References:
        Y. Liu, S. Mai, X. Chen, C.-J. Hsieh, Y. You. Towards Efficient and Scalable
        Sharpness-Aware Minimization. CVPR 2022.
    """

    _keeps_first_grads = True

    def __init__(
        self,
        base_optimizer: Optimizer,
        rho: float = 0.05,
        k: int = 5,
        alpha: float = 0.7,
        *,
        ascent: str | Ascent = "sam",
        ascent_options: dict[str, Any] | None = None,
        max_grad_norm: float | None = None,
        skip_non_finite: bool = False,
    ) -> None:
        check_non_negative("rho", rho)
        check_non_negative("alpha", alpha)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"Invalid k: {k!r} (allowed: an integer >= 1)")
        self.k = k
        self.steps = 0  # steps begun so far (full and in-between)
        self.ascent = get_ascent(ascent)
        options = dict(ascent_options or {})
        if "rho" in options:
            raise ValueError(
                f"Invalid ascent_options: rho={options['rho']!r} (give LookSAM's rho instead)"
            )
        extra, self.ascent_options = self.ascent.resolve(rho=rho, **options)
        super().__init__(
            base_optimizer,
            {**extra, "looksam_alpha": alpha},
            max_grad_norm=max_grad_norm,
            skip_non_finite=skip_non_finite,
        )

    def _gv(self, params) -> list[torch.Tensor]:
        return [self.state[p]["looksam_gv"] for p in params]

    def _two_pass_(self, buckets: list[Bucket], scaler) -> bool:
        missing = any("looksam_gv" not in self.state[p] for b in buckets for p in b.params)
        full = missing or self.steps % self.k == 0
        self.steps += 1
        return full

    def _descent_(self, buckets: list[Bucket]) -> None:
        descents.looksam_descent(self, buckets)

    def _one_pass_descent_(self, buckets: list[Bucket]) -> None:
        descents.looksam_one_pass_descent(self, buckets)

    def _global_state_dict(self) -> dict[str, Any]:
        return {**super()._global_state_dict(), "looksam_steps": self.steps}

    def _load_global_state_dict(self, state: dict[str, Any]) -> None:
        super()._load_global_state_dict(state)
        self.steps = int(state.get("looksam_steps", 0))

    def __repr__(self) -> str:
        extra = "" if self.ascent is SAM_ASCENT else f", ascent={self.ascent.name!r}"
        return super().__repr__()[:-1] + f", k={self.k}{extra})"
