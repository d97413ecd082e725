r"""MSAM: momentum-SAM, sharpness-aware minimization at SGD's cost (Becker et al. 2024)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from samkit.optim._validation import check_non_negative
from samkit.optim.onepass import OnePassOptimizer
from samkit.optim.wrapper import Bucket

# where the base optimizers keep the direction they step along (SGD: -lr v; Adam: m)
_BUFFER_KEYS = ("momentum_buffer", "exp_avg")


class MSAM(OnePassOptimizer):
    r"""Momentum-SAM: perturb along the negative momentum, one forward-backward pass per step.

    With the base optimizer's momentum buffer :math:`v_t` (SGD's ``momentum_buffer``, whose step
    is :math:`-\gamma v` at the learning rate :math:`\gamma` = ``lr``; Adam's first moment
    ``exp_avg``), each step is

    .. math::
        \tilde w_t = w_t - \rho \frac{v_t}{\|v_t\|_2}, \qquad
        g_t = \nabla L(\tilde w_t), \qquad
        w_{t+1} = \mathrm{base\_step}(w_t, g_t)

    (for SGD: :math:`v_{t+1} = \mu v_t + g_t`, :math:`w_{t+1} = w_t - \gamma v_{t+1}`). The
    momentum points down the loss, so :math:`-v_t` is an ascent direction found for free: the
    step costs **one** forward-backward pass, at :math:`\tilde w_t`. A zero (or absent) buffer
    gives :math:`\epsilon = 0`, so the first step is a base step; ``rho=0`` is the base
    optimizer bit for bit.

    **Between steps the model holds** :math:`\tilde w_{t+1}`, as in the official code: a step
    moves back by :math:`+\rho v_t/\|v_t\|`, takes the base step and moves on by
    :math:`-\rho v_{t+1}/\|v_{t+1}\|` (two parameter-sized updates and a norm, no copy of the
    weights; over a plain ``torch.optim.SGD`` the SGD update and the move on are one update,
    :math:`w + (c - \gamma) v_{t+1}`, with torch's arithmetic for :math:`v`). Evaluate, measure
    and save inside ``with opt.at_weights():``, which moves to :math:`w` and back bit for bit;
    ``opt.restore()`` moves to :math:`w` for good (end of training). samkit's trainer,
    callbacks, edge tracker and integrations do it for you; see :mod:`samkit.optim.onepass` for
    checkpoints and resuming.

    Differences from the official code (MarlonBecker/MSAM, ``optimizer/msam.py``, whose
    ``move_back_from_momentumAscent()`` plays the part of ``restore()``):

    * the trajectory of :math:`w` is the same; the returned loss is the loss at
      :math:`\tilde w_t` (the one pass there is), as the official code logs it;
    * torch's SGD adds weight decay at :math:`w_t`, the official code at :math:`\tilde w_t`;
    * the norm :math:`\|v_t\|` spans every param group (the official code allows one group) and
      ``rho`` may differ per group; zero buffers give ε = 0 exactly (official: ``1e-12``);
    * evaluating inside ``at_weights()`` returns to :math:`\tilde w` bit for bit (official: by
      adding and subtracting, which may round);
    * over a base without a buffer (SGD with ``momentum=0``) :math:`v_t` is the last step's
      gradient (the official code's buffer with μ = 0), kept by MSAM (``state["msam_last_grad"]``).

    Defaults: ``rho=0.3`` as the official constructor; its README trains CIFAR-100 and ImageNet
    with ``rho=3`` (a step :math:`\rho v/\|v\|` much larger than SAM's ρ), SGD momentum 0.9.

    Notes:
        * Under AMP the gradient is unscaled, clipped to ``max_grad_norm`` and stepped through
          ``scaler.step`` as for every samkit optimizer; a non-finite pass skips the step and
          leaves :math:`w` and the buffers untouched.
        * BatchNorm: the one pass is the pass of the step, so its running statistics are
          updated (``is_perturbed`` is False while it runs; closures must not leave them alone).
        * Not for per-micro-batch or per-replica perturbation (``step_rewrites`` says so).

    Args:
        base_optimizer: the optimizer that takes the descent step (SGD with momentum, Adam,
            AdamW, ...).
        rho: the radius ρ of the step along the momentum (>= 0).

        max_grad_norm, skip_non_finite: see :class:`~samkit.optim.wrapper.WrappingOptimizer`.

    References:
        M. Becker, F. Altrock, B. Risse. Momentum-SAM: Sharpness Aware Minimization without
        Computational Overhead. arXiv:2401.12033, 2024.
    """

    direction_sign = -1.0  # against the momentum
    _step_note = "perturbs along the momentum before its one pass (MSAM)"

    def __init__(
        self,
        base_optimizer: Optimizer,
        rho: float = 0.3,
        *,
        max_grad_norm: float | None = None,
        skip_non_finite: bool = False,
    ) -> None:
        check_non_negative("rho", rho)
        super().__init__(
            base_optimizer, dict(rho=rho), max_grad_norm=max_grad_norm,
            skip_non_finite=skip_non_finite,
        )  # fmt: skip

    def _direction(self, p: Tensor) -> Tensor | None:
        state = self.base_optimizer.state.get(p, {})
        for key in _BUFFER_KEYS:
            if isinstance(state.get(key), Tensor):
                return state[key]
        return self.state[p].get("msam_last_grad")

    def _before_base_step_needed(self) -> bool:
        """Is there a parameter with a gradient and no buffer of the base (SGD without
        momentum, or its first step)? Only then is the gradient kept as :math:`v`."""
        return any(not group.get("momentum") and "betas" not in group  # else: a buffer
                   and any(p.grad is not None and self._keeps_last_grad(group, p)
                           for p in group["params"])
                   for group in self.param_groups)

    def _keeps_last_grad(self, group: dict[str, Any], p: Tensor) -> bool:
        """No buffer of the base for ``p``, and none coming: its group has no momentum (SGD's
        ``momentum`` 0) and no ``betas`` (Adam's first moment appears in its first step)."""
        state = self.base_optimizer.state.get(p, {})
        if any(isinstance(state.get(k), Tensor) for k in _BUFFER_KEYS):
            return False
        return not group.get("momentum") and "betas" not in group

    def _before_base_step_(self, buckets: list[Bucket]) -> None:
        """For a base without a momentum buffer: keep the gradient as :math:`v` (a non-finite
        one leaves the old :math:`v`; no host sync)."""
        for b in buckets:
            for p, g in zip(b.params, b.grads, strict=True):
                if not self._keeps_last_grad(b.group, p):
                    continue
                mine = self.state[p]
                if "msam_last_grad" not in mine:
                    mine["msam_last_grad"] = torch.zeros_like(p)
                finite = torch.isfinite(g).all()
                mine["msam_last_grad"].copy_(torch.where(finite, g, mine["msam_last_grad"]))

    def _global_state_dict(self) -> dict[str, Any]:
        return {**super()._global_state_dict(), "msam_passes": self.passes}

    def _load_global_state_dict(self, state: dict[str, Any]) -> None:
        super()._load_global_state_dict(state)
        self.passes = int(state.get("msam_passes", 0))

