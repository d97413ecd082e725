r"""bSAM: SAM as an optimal relaxation of Bayes (Möllenhoff & Khan, ICLR 2023).

Two pieces on samkit's protocol: :class:`BSAMBase`, bSAM's Adam-like base optimizer with a
per-weight precision :math:`s`, and :class:`BSAM`, the two-pass wrapper whose first pass is taken
at a sample of the posterior :math:`\mathcal N(w, 1/(N s))` and whose ascent is
:math:`\epsilon = \rho\, g / s`. After training, :meth:`BSAM.sampled_weights` and
:meth:`BSAM.predictive` average predictions over that posterior (Bayesian model averaging).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from samkit.optim import kernels
from samkit.optim._validation import check_non_negative, check_positive, check_seed
from samkit.optim.ascents import Ascent
from samkit.optim.base import Bucket, SharpnessAwareOptimizer

Params = Any  # an iterable of tensors or of param-group dicts


class BSAMBase(Optimizer):
    r"""bSAM's base step: a momentum of the (perturbed) gradient over a learned precision.

    For each weight, with :math:`g_\epsilon` the gradient it steps with (``p.grad``; bSAM's
    gradient at :math:`w + \epsilon`) and :math:`g` the gradient that feeds the precision
    (bSAM's gradient at the noisy sample; ``p.grad`` when the base is used alone):

    .. math::
        m \leftarrow \beta_1 m + (1 - \beta_1)(g_\epsilon + \delta w), \qquad
        w \leftarrow w - \gamma\, m / s, \qquad
        s \leftarrow \beta_2 s + (1 - \beta_2)\big(\sqrt{s}\,|g| + \delta + \lambda\big)

    with the learning rate :math:`\gamma`, the L2 regularizer (prior precision over N)
    :math:`\delta` = ``weight_decay``, the damping :math:`\lambda` = ``damping`` and
    :math:`s` started at ``init_precision``. As in the official code (``optim.py``,
    ``build_bsam_optimizer``), the weight step divides by the precision *before* its update,
    and the precision's increment is :math:`\sqrt{s}|g| + \delta + \lambda` (not squared).

    Notes:
        * β₁ is called ``momentum`` so that a config's ``momentum`` reaches it (the official
          code's ``--beta1``, "momentum for gradient"; 0.9 in every bSAM run of its README).
        * pytorch_optimizer's ``BSAM`` (4.1.0) differs: its momentum averages
          ``grad * weight_decay`` (not ``grad + weight_decay * w``), its precision increment is
          squared and fed the perturbed gradient, its noise has standard deviation
          :math:`1/(N s)` (not :math:`1/\sqrt{N s}`), and its weights are never moved back from
          the perturbed point (read from its source; samkit follows the official code).

    Args:
        params: the parameters or param groups.
        lr: the learning rate γ (the paper's α; 0.5 for its CIFAR runs).
        momentum: β₁ (0 <= β₁ < 1).
        beta2: β₂ of the precision (0 <= β₂ < 1).
        weight_decay: δ, the prior precision divided by N (>= 0).
        damping: λ (>= 0; 0.1 in the paper).
        init_precision: the initial precision :math:`s_0` (> 0; 1 in the paper).

    References:
        T. Möllenhoff, M. E. Khan. SAM as an Optimal Relaxation of Bayes. ICLR 2023
        (arXiv:2210.01620); official code github.com/team-approx-bayes/bayesian-sam.
    """

    def __init__(
        self,
        params: Params,
        lr: float = 0.5,
        momentum: float = 0.9,
        beta2: float = 0.999,
        weight_decay: float = 0.0,
        damping: float = 0.1,
        init_precision: float = 1.0,
    ) -> None:
        check_positive("lr", lr)
        for name, value in (("momentum", momentum), ("beta2", beta2)):
            check_non_negative(name, value)
            if value >= 1:
                raise ValueError(f"Invalid {name}: {value!r} (allowed: 0 <= {name} < 1)")
        check_non_negative("weight_decay", weight_decay)
        check_non_negative("damping", damping)
        check_positive("init_precision", init_precision)
        defaults = dict(lr=lr, momentum=momentum, beta2=beta2, weight_decay=weight_decay,
                        damping=damping, init_precision=init_precision)  # fmt: skip
        super().__init__(params, defaults)
        # the gradient that feeds the precision, per parameter, set by BSAM before each step
        self._curvature_grads: dict[Tensor, Tensor] = {}

    def precision(self, p: Tensor) -> Tensor:
        """The precision :math:`s` of parameter ``p`` (allocated at ``init_precision``)."""
        state = self.state[p]
        if "precision" not in state:
            init = next(g["init_precision"] for g in self.param_groups
                        if any(q is p for q in g["params"]))  # fmt: skip
            state["precision"] = torch.full_like(p, float(init),
                                                 memory_format=torch.preserve_format)
            state["momentum"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state["precision"]

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        curvature = self._curvature_grads
        self._curvature_grads = {}
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            beta1, beta2 = float(group["momentum"]), float(group["beta2"])
            delta, lam = float(group["weight_decay"]), float(group["damping"])
            precisions = [self.precision(p) for p in params]
            moms = [self.state[p]["momentum"] for p in params]
            grads = [p.grad for p in params]
            gs = [curvature.get(p, p.grad) for p in params]
            for ps, ds, cs, ss, ms in kernels.group_by_device_and_dtype(
                params, grads, gs, precisions, moms
            ):
                # m <- beta1 m + (1 - beta1)(g_eps + delta w)
                torch._foreach_mul_(ms, beta1)
                torch._foreach_add_(ms, ds, alpha=1.0 - beta1)
                if delta:
                    torch._foreach_add_(ms, ps, alpha=(1.0 - beta1) * delta)
                # w <- w - lr m / s (the precision before its update)
                torch._foreach_addcdiv_(ps, ms, ss, value=-float(group["lr"]))
                # s <- beta2 s + (1 - beta2)(sqrt(s) |g| + delta + lambda)
                inc = torch._foreach_sqrt(ss)
                torch._foreach_mul_(inc, torch._foreach_abs(cs))
                torch._foreach_add_(inc, delta + lam)
                torch._foreach_mul_(ss, beta2)
                torch._foreach_add_(ss, inc, alpha=1.0 - beta2)
        return loss

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_curvature_grads", {})

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_curvature_grads"] = {}  # this step's references only
        return state


def bsam_direction(optimizer, buckets, options) -> None:
    r"""bSAM: :math:`\epsilon = \rho\, g / s`, :math:`s` the base optimizer's precision."""
    base = optimizer.base_optimizer
    for b in buckets:
        check_non_negative("rho", b.group["rho"])
        torch._foreach_div_(b.grads, [base.precision(p) for p in b.params])
        torch._foreach_mul_(b.grads, float(b.group["rho"]))


def _bsam_effective(optimizer, groups_params, grads) -> list[Tensor]:
    r""":math:`M = \mathrm{diag}(1/s)`, :math:`c = 1` (the precision held fixed)."""
    base = optimizer.base_optimizer
    return [
        float(group["rho"]) / base.precision(p).detach().to(g.dtype)
        for group, ps, gs in zip(optimizer.param_groups, groups_params, grads, strict=True)
        for p, g in zip(ps, gs, strict=True)
    ]


BSAM_ASCENT = Ascent(
    "bsam", bsam_direction, "bSAM, Möllenhoff & Khan 2023: eps = rho g / s at a noisy sample",
    rho=0.01, needs_unscaled_grads=True,
    edge_note="no closed-form edge for bSAM (its base divides by a learned precision)",
    effective=_bsam_effective,
)  # fmt: skip


class BSAM(SharpnessAwareOptimizer):
    r"""bSAM: SAM's step at a sample of a Gaussian posterior, with an Adam-like precision.

    bSAM keeps a posterior :math:`\mathcal N(w, \sigma^2)`, :math:`\sigma^2 = 1/(N s)`, with
    the precision :math:`s` learned by its base optimizer (:class:`BSAMBase`). One step:

    .. math::
        \theta = w + \sigma \odot \xi,\ \xi \sim \mathcal N(0, I), \qquad
        g = \nabla L(\theta), \qquad
        \epsilon = \rho\, g / s, \qquad
        g_\epsilon = \nabla L(w + \epsilon),

    then :class:`BSAMBase`'s step with :math:`g_\epsilon` (momentum) and :math:`g` (precision).
    The first pass runs at the noisy sample θ: ``step(closure)`` moves the weights there before
    it and back to :math:`w` (bit for bit) after it. ε is not normalized (the precision plays the
    part of SAM's :math:`1/\|g\|`).

    After training, :meth:`predictive` averages a function of the model (e.g. its softmax
    output) over weights sampled from the posterior; :meth:`sampled_weights` puts one sample in
    place; :meth:`posterior_std` gives σ.

    The explicit form needs the noise before the first pass::

        opt.before_first_pass()                      # w -> theta (add_noise())
        loss_fn(model(x), y).backward()
        opt.first_step()                             # back to w, then w -> w + eps
        loss_fn(model(x), y).backward()
        opt.second_step()

    Notes:
        * The defaults are the paper's CIFAR setting (README of the official code): ρ = 0.01,
          β₁ = 0.9, β₂ = 0.999, damping 0.1, :math:`s_0` = 1, lr 0.5 (give ``lr``); the weight
          decay δ there is the prior precision over N (10 / (4 · 50,000)).
        * ``num_data`` is the paper's N, the number of training examples (the official runs
          multiply it by 4 for data augmentation). Built here or by ``create_optimizer``, set it
          to your data's size: the default 50,000 is CIFAR-10's training set. Built by the
          runner (``samkit train``, ``samkit compare``, :class:`samkit.train.Trainer`), N is the
          size of the training set the run trains on, unless the config gives it
          (``optimizer_kwargs.num_data``, kept as given); a resumed run keeps its checkpoint's.
        * The noise is drawn from a generator seeded with ``seed`` (one per device; saved by
          ``state_dict``), in the order of the param groups.
        * The first (noisy) pass is the step's own pass: it updates BatchNorm statistics; the
          pass at :math:`w + \epsilon` does not (:attr:`is_perturbed`).
        * A step schedule cannot be attached (the precision needs every step's noisy gradient).
        * The official runs split each batch into 8 parts (``--batchsplit 8``: m-sharpness),
          each with its own noise sample and ε, and average the parts' :math:`\sqrt{s}|g|` and
          :math:`g_\epsilon`; here the batch is perturbed as a whole (the float64 test checks
          the official update with one part).

    Args:
        base_optimizer: a :class:`BSAMBase` over the model's parameters (``create_optimizer``
            builds it: ``create_optimizer("bsam", model, lr=0.5, num_data=50_000)``).
        rho: ρ (>= 0).
        num_data: N (an integer >= 1; the Trainer gives the training set's size).
        seed: the seed of the noise generator.

        max_grad_norm, skip_non_finite: see :class:`~samkit.optim.base.SharpnessAwareOptimizer`
            (the clip applies to :math:`g_\epsilon`, the gradient of the momentum).

    References:
        T. Möllenhoff, M. E. Khan. SAM as an Optimal Relaxation of Bayes. ICLR 2023
        (arXiv:2210.01620); official code github.com/team-approx-bayes/bayesian-sam.
    """

    ascent = BSAM_ASCENT
    _keeps_first_grads = True  # g at the noisy sample, for the precision

    def __init__(
        self,
        base_optimizer: Optimizer,
        rho: float = BSAM_ASCENT.rho,
        num_data: int = 50_000,
        seed: int = 0,
        *,
        max_grad_norm: float | None = None,
        skip_non_finite: bool = False,
    ) -> None:
        if not isinstance(base_optimizer, BSAMBase):
            raise ValueError(
                f"Invalid base_optimizer: {type(base_optimizer).__name__} (allowed: a "
                "samkit.optim.BSAMBase, bSAM's own base with the precision s; e.g. "
                "create_optimizer('bsam', model, lr=0.5, num_data=50_000))"
            )
        if isinstance(num_data, bool) or not isinstance(num_data, int) or num_data < 1:
            raise ValueError(f"Invalid num_data: {num_data!r} (allowed: an integer >= 1, the "
                             "number of training examples N)")  # fmt: skip
        groups, _ = self.ascent.resolve(rho=rho)
        groups["num_data"] = num_data
        self.seed = check_seed("seed", seed)
        self._generators: dict[str, torch.Generator] = {}
        self._noise: list[tuple[list[Tensor], list[Tensor]]] | None = None
        super().__init__(
            base_optimizer, groups, max_grad_norm=max_grad_norm, skip_non_finite=skip_non_finite
        )

    @property
    def accepts_schedule(self) -> bool:
        return False

    @property
    def weights_perturbed(self) -> bool:
        return self._noise is not None or self._perturbed is not None

    # ------------------------------------------------------------------ the posterior

    def _generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[key]

    def posterior_std(self) -> list[Tensor]:
        r""":math:`\sigma = (N s)^{-1/2}` of every parameter, in the order of the param groups."""
        return [
            torch.rsqrt(self.base_optimizer.precision(p) * float(group["num_data"]))
            for group in self.param_groups
            for p in group["params"]
        ]

    @torch.no_grad()
    def _move_to_sample_(self, generator: torch.Generator | None) -> list[tuple[list, list]]:
        """w -> w + σ ξ for every parameter (w saved in the backups); the (params, backups)."""
        self._fill_defaults()
        moved = []
        for group in self.param_groups:
            params = list(group["params"])
            if not params:
                continue
            backups = [self._state_tensor(p, "w_backup", empty=True) for p in params]
            precisions = [self.base_optimizer.precision(p) for p in params]
            n = float(group["num_data"])
            for ps, bs, ss in kernels.group_by_device_and_dtype(params, backups, precisions):
                gen = generator if generator is not None else self._generator(ps[0].device)
                noise = [
                    torch.randn(p.shape, generator=gen, dtype=p.dtype,
                                device=gen.device).to(p.device)
                    for p in ps
                ]  # fmt: skip
                std = torch._foreach_mul(ss, n)
                torch._foreach_rsqrt_(std)  # (N s)^-1/2
                torch._foreach_mul_(noise, std)
                kernels.perturb_(ps, noise, bs)
                moved.append((ps, bs))
        return moved

    @torch.no_grad()
    def add_noise(self) -> None:
        r"""Move the weights to a posterior sample :math:`\theta = w + \sigma \odot \xi` for the
        first pass (``step(closure)`` does it; the explicit form calls it before the first
        forward pass). :meth:`first_step` (or :meth:`restore`) puts :math:`w` back."""
        if self.weights_perturbed:
            raise RuntimeError("add_noise() needs the weights at w (the last step is not over)")
        self._noise = self._move_to_sample_(None)

    def before_first_pass(self) -> None:
        """bSAM's first pass is at a posterior sample: :meth:`add_noise`."""
        self.add_noise()

    def step_rewrites(self) -> str | None:
        return ("moves to a posterior sample for its first pass (before_first_pass()) and "
                "updates its precision")

    def _drop_noise(self) -> None:
        for ps, bs in self._noise or ():
            kernels.restore_(ps, bs)
        self._noise = None

    @contextmanager
    def sampled_weights(self, generator: torch.Generator | None = None) -> Iterator[None]:
        r"""Within the block the parameters hold one sample
        :math:`w + \sigma \odot \xi` of the posterior (ξ from ``generator``, default: a new one
        seeded from torch's global generator); :math:`w` is put back, bit for bit, after it."""
        if self.weights_perturbed:
            raise RuntimeError("sampled_weights() needs the weights at w (a step is under way)")
        if generator is None:
            seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
            generator = torch.Generator().manual_seed(seed)
        moved = self._move_to_sample_(generator)
        try:
            yield
        finally:
            with torch.no_grad():
                for ps, bs in moved:
                    kernels.restore_(ps, bs)

    @torch.no_grad()
    def predictive(
        self, fn: Callable[[], Tensor], samples: int = 32, seed: int = 0
    ) -> Tensor:
        r"""The Bayesian model average :math:`\frac1S \sum_{k=1}^S f(\theta_k)`,
        :math:`\theta_k \sim \mathcal N(w, \sigma^2)`.

        Args:
            fn: evaluates the model at its current weights and returns a tensor, e.g.
                ``lambda: model(x).softmax(-1)`` (put BatchNorm/dropout in eval mode first).
            samples: S, the number of posterior samples (the paper's tests use 32).
            seed: the seed of the samples' generator (the training noise is not touched).
        """
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise ValueError(f"Invalid samples: {samples!r} (allowed: an integer >= 1)")
        generator = torch.Generator().manual_seed(check_seed("seed", seed))
        total = None
        for _ in range(samples):
            with self.sampled_weights(generator):
                out = fn().detach()
            total = out.clone() if total is None else total.add_(out)
        return total / samples

    # ------------------------------------------------------------------ the protocol

    def first_step(self, zero_grad: bool = True, scaler: torch.amp.GradScaler | None = None
                   ) -> bool:  # fmt: skip
        if self._noise is None:
            raise RuntimeError(
                "BSAM.first_step() needs the first pass at a posterior sample: call "
                "opt.before_first_pass() (add_noise()) before the first forward pass "
                "(step(closure) does it)"
            )
        with torch.no_grad():
            self._drop_noise()
        return super().first_step(zero_grad=zero_grad, scaler=scaler)

    def step(self, closure=None, scaler: torch.amp.GradScaler | None = None):
        if closure is None:
            return super().step(closure, scaler)  # raises, naming the closure
        try:
            return super().step(closure, scaler)  # calls before_first_pass()
        finally:
            if self._noise is not None:  # the noisy pass raised: back to w
                with torch.no_grad():
                    self._drop_noise()

    def restore(self) -> None:
        if self._noise is not None:
            with torch.no_grad():
                self._drop_noise()
            return
        super().restore()

    def _before_base_step_(self, buckets: list[Bucket]) -> None:
        # the precision is fed the gradient at the noisy sample (kept in first_grads)
        self.base_optimizer._curvature_grads = {
            p: g for b in buckets for p, g in zip(b.params, b.first_grads, strict=True)
        }

    # ------------------------------------------------------------------ state

    def _global_state_dict(self) -> dict[str, Any]:
        gens = {k: g.get_state() for k, g in self._generators.items()}
        return {**super()._global_state_dict(), "generators": gens, "seed": self.seed}

    def _load_global_state_dict(self, state: dict[str, Any]) -> None:
        super()._load_global_state_dict(state)
        self.seed = int(state.get("seed", self.seed))
        self._generators = {}
        for key, value in state.get("generators", {}).items():
            self._generator(torch.device(key)).set_state(value)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_generators"] = {k: g.get_state() for k, g in self._generators.items()}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        gens = state.pop("_generators", {})
        super().__setstate__(state)
        self.__dict__.setdefault("_noise", None)
        self.__dict__.setdefault("seed", 0)
        self._generators = {}
        for key, value in gens.items():
            self._generator(torch.device(key)).set_state(value)

