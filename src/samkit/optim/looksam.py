r"""LookSAM: SAM's full ascent every k steps only (Liu et al., CVPR 2022)."""

from __future__ import annotations

from typing import Any

import torch
from torch.optim import Optimizer

from samkit.optim import _ops, kernels
from samkit.optim._validation import check_non_negative
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
        max_grad_norm: float | None = None,
        skip_non_finite: bool = False,
    ) -> None:
        check_non_negative("rho", rho)
        check_non_negative("alpha", alpha)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"Invalid k: {k!r} (allowed: an integer >= 1)")
        self.k = k
        self.steps = 0  # steps begun so far (full and in-between)
        super().__init__(
            base_optimizer,
            dict(rho=rho, looksam_alpha=alpha),
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

    def _ascent_(self, buckets: list[Bucket]) -> None:
        norm = _ops.sq_norm_of(buckets).sqrt()
        for b in buckets:
            check_non_negative("rho", b.group["rho"])
            scale = kernels.safe_ratio(b.group["rho"], norm.to(b.grads[0].device))
            torch._foreach_mul_(b.grads, kernels.scale_for(scale, b.grads[0]))

    def _descent_(self, buckets: list[Bucket]) -> None:
        # g_v = g_s - (<g, g_s> / ||g||^2) g, built in the (free) backup; g_s is left as is.
        inner = _ops.global_dot((b.first_grads, b.grads) for b in buckets)
        coef = inner / _ops.sq_norm_of(buckets, "first_grads").clamp_min(
            torch.finfo(inner.dtype).tiny
        )
        for b in buckets:
            torch._foreach_copy_(b.backups, b.grads)
            torch._foreach_add_(
                b.backups, torch._foreach_mul(b.first_grads, _ops.on(-coef, b.grads[0]))
            )
        # keep the old g_v where this step was not finite (AMP overflow): no host sync
        finite = torch.isfinite(_ops.sq_norm_of(buckets, "backups"))
        if self._first_pass_finite is not None:
            finite = finite & self._first_pass_finite.to(finite.device)
        for b in buckets:
            for p in b.params:
                if "looksam_gv" not in self.state[p]:
                    self.state[p]["looksam_gv"] = torch.zeros_like(
                        p, memory_format=torch.preserve_format
                    )
            gv = self._gv(b.params)
            for t in b.backups:
                t.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
            torch._foreach_sub_(b.backups, gv)
            torch._foreach_mul_(b.backups, _ops.on(finite, b.backups[0]))
            torch._foreach_add_(gv, b.backups)

    def _one_pass_descent_(self, buckets: list[Bucket]) -> None:
        # g <- g + alpha ||g|| / ||g_v|| g_v
        g_norm = _ops.sq_norm_of(buckets).sqrt()
        gv_norm = kernels.global_sq_norm(self._gv(b.params) for b in buckets).sqrt()
        ratio = kernels.safe_ratio(g_norm, gv_norm.to(g_norm.device))
        for b in buckets:
            scale = _ops.on(ratio * float(b.group["looksam_alpha"]), b.grads[0])
            torch._foreach_add_(b.grads, torch._foreach_mul(self._gv(b.params), scale))

    def _global_state_dict(self) -> dict[str, Any]:
        return {**super()._global_state_dict(), "looksam_steps": self.steps}

    def _load_global_state_dict(self, state: dict[str, Any]) -> None:
        super()._load_global_state_dict(state)
        self.steps = int(state.get("looksam_steps", 0))

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", k={self.k})"
