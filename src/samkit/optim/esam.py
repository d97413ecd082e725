r"""ESAM: efficient SAM by stochastic weight perturbation and sharpness-sensitive data selection
(Du et al., ICLR 2022)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from samkit.optim import kernels
from samkit.optim._validation import check_choice, check_non_negative, check_seed
from samkit.optim.base import Bucket
from samkit.optim.selecting import (  # noqa: F401  (re-exported: their old home)
    ExampleLosses,
    ExampleLossesClosure,
    ExampleSelectingOptimizer,
)

SWP_NORMS = ("all", "perturbed")
SDS_COUNTS = ("ceil", "official")


class ESAM(ExampleSelectingOptimizer):
    r"""ESAM: SAM with stochastic weight perturbation (SWP) and sharpness-sensitive data
    selection (SDS).

    **SWP.** Each parameter tensor :math:`i` is perturbed with probability β, independently at
    every step (a seeded generator draws :math:`m_i \sim \mathrm{Bernoulli}(\beta)`), scaled by
    :math:`1/\beta` so that the expected perturbation is SAM's:

    .. math::
        \epsilon_i = \frac{m_i}{\beta} \, \rho \, \frac{g_i}{\|g\|_2}, \qquad g = \nabla L_B(w).

    **SDS.** With per-example losses :math:`\ell_j`, the second pass only uses the fraction γ of
    the batch whose loss rises most under the perturbation:

    .. math::
        B^+ = \operatorname{top}_{\lceil \gamma |B| \rceil}\; \ell_j(w + \epsilon) - \ell_j(w),
        \qquad w \leftarrow \mathrm{base\_step}\big(w, \nabla L_{B^+}(w + \epsilon)\big).

    A step then costs a forward-backward pass on B, a forward pass without gradient on B at
    :math:`w + \epsilon` and a forward-backward pass on :math:`B^+`.

    Closures. ``step(closure)`` with an ordinary closure (zero_grad, forward, backward, return
    the loss) does SWP only, with a full second pass, like every other optimizer here. For SDS
    pass an object with a ``losses(indices, perturbed)`` method that returns per-example losses
    without calling backward (:class:`ExampleLosses` builds one from a model, a per-example loss
    function and a batch); the optimizer then runs the three passes, backpropagates the means
    (scaled by ``scaler`` when given) and returns the mean loss at ``w``. ``gamma=1`` skips the
    selection pass.

    Notes:
        * The official code saves backward compute by turning off ``requires_grad`` of
          unperturbed tensors; here every tensor keeps its gradient (changing ``requires_grad``
          inside an optimizer breaks DDP, compiled models and user code), so SWP changes the
          perturbation, not the cost.
        * Two documented departures from the official code (Efficient_SAM's ``utils/Esam.py``),
          each with an option for the official behaviour:

          - ``swp_norm="all"`` (default) normalizes by the norm of *all* gradients, so ε is
            SAM's ε in expectation and :math:`\|\epsilon\| = (\rho/\beta)\,
            \|g_{kept}\|/\|g\|` varies from step to step. ``swp_norm="perturbed"`` normalizes
            by the norm of the perturbed tensors' gradients, as the official code does (its
            unperturbed tensors have no gradient), so :math:`\|\epsilon\| = \rho/\beta`
            whenever a tensor is perturbed.
          - ``sds_count="ceil"`` (default) keeps :math:`\lceil \gamma n \rceil` examples.
            ``sds_count="official"`` keeps those strictly above the :math:`\lfloor\gamma
            n\rfloor`-th largest rise, one fewer without ties (and the whole batch for
            γ >= 0.99), as the official code does.
          - The official code also leaves the unperturbed tensors out of that step's descent
            (they have no gradient); here every tensor descends.
        * The generator's state is saved by ``state_dict``; ``seed`` fixes the sequence.
        * β, γ and the seed are optimizer-wide (``self.beta``, ``self.gamma``).

    Args:
        base_optimizer: the optimizer that takes the descent step.
        rho: the radius ρ (>= 0).
        beta: the probability β that a parameter tensor is perturbed (0 < β <= 1).
        gamma: the fraction γ of the batch kept for the second pass (0 < γ <= 1).
        seed: the seed of the SWP generator.
        swp_norm: ``"all"`` or ``"perturbed"`` (the official normalization), see the notes.
        sds_count: ``"ceil"`` or ``"official"`` (the official count of kept examples).

        max_grad_norm, skip_non_finite: see :class:`~samkit.optim.base.SharpnessAwareOptimizer`
            (clip the base step's direction; skip non-finite steps without a scaler).

    References:
        J. Du, H. Yan, J. Feng, J. T. Zhou, L. Zhen, R. S. M. Goh, V. Y. F. Tan. Efficient
        Sharpness-aware Minimization for Improved Training of Neural Networks. ICLR 2022.
    """

    def __init__(
        self,
        base_optimizer: Optimizer,
        rho: float = 0.05,
        beta: float = 0.6,
        gamma: float = 0.5,
        seed: int = 0,
        swp_norm: str = "all",
        sds_count: str = "ceil",
        *,
        max_grad_norm: float | None = None,
        skip_non_finite: bool = False,
    ) -> None:
        check_non_negative("rho", rho)
        for name, value in (("beta", beta), ("gamma", gamma)):
            check_non_negative(name, value)
            if not 0 < value <= 1:
                raise ValueError(f"Invalid {name}: {value!r} (allowed: 0 < {name} <= 1)")
        check_choice("swp_norm", swp_norm, SWP_NORMS)
        check_choice("sds_count", sds_count, SDS_COUNTS)
        self.beta, self.gamma, self.seed = float(beta), float(gamma), check_seed("seed", seed)
        self.swp_norm, self.sds_count = swp_norm, sds_count
        self.generator = torch.Generator().manual_seed(self.seed)
        super().__init__(
            base_optimizer,
            dict(rho=rho),
            max_grad_norm=max_grad_norm,
            skip_non_finite=skip_non_finite,
        )

    def _ascent_(self, buckets: list[Bucket]) -> None:
        # one draw per parameter of the optimizer (with a gradient or not), in group order
        index = {p: i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        keep = (torch.rand(len(index), generator=self.generator) < self.beta).tolist()
        if self.swp_norm == "perturbed":  # the official code: ||g|| over the perturbed tensors
            for b in buckets:
                torch._foreach_mul_(b.grads, [float(keep[index[p]]) for p in b.params])
        norm = kernels.global_sq_norm(b.grads for b in buckets).sqrt()
        for b in buckets:
            check_non_negative("rho", b.group["rho"])
            scale = kernels.safe_ratio(b.group["rho"], norm.to(b.grads[0].device))
            torch._foreach_mul_(b.grads, kernels.scale_for(scale, b.grads[0]))
            masks = [(1.0 / self.beta) if keep[index[p]] else 0.0 for p in b.params]
            torch._foreach_mul_(b.grads, masks)

    def kept_examples(self, batch_size: int) -> int:
        """How many examples SDS keeps of ``batch_size``: ⌈γ n⌉ (``sds_count="ceil"``), or as
        the official code, ``int(γ n) - 1`` (the examples strictly above the ``int(γ n)``-th
        largest rise) and the whole batch for γ >= 0.99 (``"official"``); at least one."""
        if self.sds_count == "official":
            if self.gamma >= 0.99:
                return batch_size
            return max(1, int(batch_size * self.gamma) - 1)
        return max(1, math.ceil(self.gamma * batch_size - 1e-9))

    def selects_examples(self, batch_size: int) -> bool:
        """Does SDS drop examples from a batch of ``batch_size``?"""
        return self.kept_examples(batch_size) < batch_size

    def select_examples(self, before: Tensor, after: Tensor) -> Tensor:
        """SDS: the indices of the :meth:`kept_examples` examples whose loss rises most from
        ``before`` (at ``w``) to ``after`` (at ``w + ε``), both 1-d per-example losses."""
        keep = self.kept_examples(before.numel())
        return torch.topk(after.detach() - before.detach(), keep, sorted=False).indices

    def _global_state_dict(self) -> dict[str, Any]:
        return {**super()._global_state_dict(), "esam_generator": self.generator.get_state()}

    def _load_global_state_dict(self, state: dict[str, Any]) -> None:
        super()._load_global_state_dict(state)
        if "esam_generator" in state:
            self.generator.set_state(state["esam_generator"])

    def __repr__(self) -> str:
        return (
            super().__repr__()[:-1] + f", beta={self.beta}, gamma={self.gamma}, seed={self.seed}, "
            f"swp_norm={self.swp_norm!r}, sds_count={self.sds_count!r})"
        )
