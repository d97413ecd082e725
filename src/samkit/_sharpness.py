r"""Sharpness and adaptive sharpness of a loss at the model's current weights: the module of
:func:`samkit.sharpness` and :class:`samkit.SharpnessResult` (import them from ``samkit``; the
module is private so that ``samkit.sharpness`` names the function alone).

.. math::
    S_\rho(w) = \max_{\|T_w^{-1}\epsilon\|_p \le \rho} L(w + \epsilon) - L(w)

with :math:`T_w = I` (plain sharpness, Keskar et al. 2017; Foret et al. 2021) or ASAM's
normalization operator (adaptive sharpness, Kwon et al. 2021): element-wise
:math:`T_w = \mathrm{diag}(|w| + \eta)`, or filter-wise :math:`\|w_i\|_2 + \eta` per output
filter. Writing :math:`\epsilon = T_w\delta`, the maximization is over the plain ball
:math:`\|\delta\|_p \le \rho` of :math:`f(\delta) = L(w + T_w\delta)`, whose gradient is
:math:`T_w \nabla L(w + T_w\delta)`.

Adaptive sharpness is invariant to any scaling :math:`A` that leaves the loss unchanged
(:math:`L(Aw) = L(w)`, e.g. multiplying a ReLU layer by :math:`\alpha` and the next one by
:math:`1/\alpha`): with :math:`\eta = 0`, :math:`T_{Aw} = A\,T_w`, so :math:`f` is the same
function of :math:`\delta` at :math:`w` and at :math:`Aw`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from samkit.curvature._data import Batches, LossFn, resolve_params
from samkit.curvature._dist import (
    DataParallel,
    FullWeights,
    Sharding,
    has_dtensors,
    local_count,
    resolve_group,
    unwrap,
)
from samkit.curvature.operator import loss_and_gradient
from samkit.optim import kernels
from samkit.optim._validation import check_choice, check_int, check_non_negative

P_NORMS = (2, math.inf)
DEFAULT_STARTS = 8  # the SAM / ASAM start and 7 random ones (see tests/test_sharpness.py)


@dataclass(frozen=True)
class SharpnessResult:
    r"""The outcome of :func:`sharpness` (with ``m``: means over the micro-batches, weighted by
    their size).

    Attributes:
        value: :math:`\max L(w + \epsilon) - L(w)` found (>= 0: ε = 0 is in the ball).
        base_loss: :math:`L(w)`.
        perturbed_loss: :math:`L(w + \epsilon)` at the best ε found.
        steps: the projected-gradient steps taken after the first (SAM/ASAM) ascent step, per
            maximization.
        evaluations: the loss-and-gradient passes over the data, in all.
        starts: the ascents run per maximization (the SAM / ASAM start and random ones).
        start_values: the best :math:`L(w + \epsilon) - L(w)` reached from each start (means
            over the micro-batches with ``m``).
        spread: ``max(start_values) - min(start_values)``: how much the starts disagree (0
            when they all reach the same maximum; a large spread says the landscape has
            several local maxima and more starts may find a higher one).
    """

    value: float
    base_loss: float
    perturbed_loss: float
    steps: int
    evaluations: int
    starts: int = 1
    start_values: tuple[float, ...] = ()
    spread: float = 0.0


class _Objective:
    """:math:`L` and :math:`\\nabla L` at the current weights over a group of batches: the
    operator base's :func:`~samkit.curvature.operator.loss_and_gradient` (size-weighted, frozen
    parameters in ``params`` differentiated too), counted, and a non-finite loss refused.
    ``reduce``: the mean over the ranks' data (one all-reduce per evaluation), or ``None``."""

    def __init__(self, model, loss_fn, params, batches, seed, reduce=None):
        self.model, self.loss_fn, self.params = model, loss_fn, params
        self.batches, self.seed, self.reduce = batches, seed, reduce
        self.evaluations = 0

    def __call__(self) -> tuple[float, list[Tensor]]:
        value, grads = loss_and_gradient(
            self.model, self.loss_fn, self.params, self.batches, self.seed, reduce=self.reduce
        )
        self.evaluations += 1
        if not math.isfinite(value):
            raise ValueError(f"Invalid loss: {value} at the weights being evaluated (not finite)")
        return value, grads


def _direction(grad: list[Tensor], scale, p: float, generator, params) -> list[Tensor]:
    r"""The steepest-ascent direction in δ of unit p-norm step: :math:`T\nabla L/\|T\nabla L\|_2`
    (p = 2) or :math:`\mathrm{sign}(T\nabla L)` (p = ∞); random at a stationary point."""
    direction = list(grad) if scale is None else torch._foreach_mul(grad, scale)
    if p == 2:
        norm = kernels.global_sq_norm([direction]).sqrt()
        if float(norm) == 0.0:
            direction = [torch.randn(w.shape, generator=generator).to(w) for w in params]
            norm = kernels.global_sq_norm([direction]).sqrt()
        return torch._foreach_div(direction, norm)
    direction = torch._foreach_sign(direction)
    if all(not bool(d.any()) for d in direction):
        direction = [
            torch.randint(0, 2, w.shape, generator=generator).to(w).mul_(2).sub_(1) for w in params
        ]
    return direction


def _project_(delta: list[Tensor], rho: float, p: float) -> list[Tensor]:
    if p == 2:
        norm = kernels.global_sq_norm([delta]).sqrt()
        torch._foreach_mul_(delta, (rho / norm.clamp_min(rho)).to(delta[0].dtype))
    else:
        torch._foreach_clamp_min_(delta, -rho)
        torch._foreach_clamp_max_(delta, rho)
    return delta


def _random_start(params, rho: float, p: float, generator) -> list[Tensor]:
    """A random point of the ball's boundary: on the sphere of radius ρ (p = 2), a random
    vertex of the box (p = ∞, where the maxima of a smooth loss mostly lie)."""
    if p == 2:
        delta = [torch.randn(w.shape, generator=generator).to(w) for w in params]
        norm = kernels.global_sq_norm([delta]).sqrt()
        return torch._foreach_mul(delta, (rho / norm).to(delta[0].dtype))
    return [
        torch.randint(0, 2, w.shape, generator=generator).to(w).mul_(2).sub_(1).mul_(rho)
        for w in params
    ]


def _maximize(
    objective: _Objective,
    params: list[Tensor],
    backup: list[Tensor],
    scale: list[Tensor] | None,
    rho: float,
    p: float,
    steps: int,
    generator: torch.Generator,
    starts: int = 1,
    budget: int | None = None,
    best: list[Tensor] | None = None,
) -> tuple[float, float, list[float]]:
    """Projected ascent in δ from ``starts`` points; returns (L(w), best L(w + T δ), the best
    L(w + T δ) of each start). ``best``, when given, receives the best δ found (zeros when none
    raised the loss)."""

    def at(delta: list[Tensor]) -> tuple[float, list[Tensor]]:
        with torch.no_grad():
            torch._foreach_copy_(params, backup)
            if scale is None:
                torch._foreach_add_(params, delta)
            else:
                torch._foreach_addcmul_(params, scale, delta)
        return objective()

    with torch.no_grad():
        torch._foreach_copy_(params, backup)  # start at w (a previous group may have moved it)
    base, base_grad = objective()
    if best is not None:
        best[:] = [torch.zeros_like(w) for w in params]
    if rho == 0:
        return base, base, [base]
    limit = math.inf if budget is None else budget
    per_start: list[float] = []
    best_all = base
    for s in range(starts):
        if objective.evaluations >= limit:
            break
        if s == 0:  # δ = 0: the first step is exactly the SAM / ASAM perturbation
            x = [torch.zeros_like(w) for w in params]
            fx, gx = base, base_grad
            eta = 2.0 * rho
        else:
            x = _random_start(params, rho, p, generator)
            fx, gx = at(x)
            eta = rho
        best_x, best_f, best_g = x, fx, gx
        x_prev = x
        checkpoint = max(2, (steps + 1) // 4)
        since, successes, best_at_check = 0, 0, best_f
        for it in range(steps + 1):
            if objective.evaluations >= limit:
                break
            z = _project_(torch._foreach_add(x, _direction(gx, scale, p, generator, params),
                                             alpha=eta), rho, p)
            if it > 0:  # Auto-PGD's momentum: x + 0.75 (z - x) + 0.25 (x - x_prev)
                step = torch._foreach_sub(z, x)
                torch._foreach_mul_(step, 0.75)
                torch._foreach_add_(step, torch._foreach_sub(x, x_prev), alpha=0.25)
                z = _project_(torch._foreach_add(x, step), rho, p)
            fz, gz = at(z)
            since += 1
            if fz > fx:
                successes += 1
            x_prev, x, fx, gx = x, z, fz, gz
            if fz > best_f:
                best_x, best_f, best_g = z, fz, gz
            if since >= checkpoint:  # too few successful steps, or no progress: halve, restart
                if successes < 0.75 * since or best_f <= best_at_check:
                    eta /= 2.0
                    x = x_prev = best_x
                    fx, gx = best_f, best_g
                since, successes, best_at_check = 0, 0, best_f
        per_start.append(best_f)
        if best is not None and best_f > best_all:
            best[:] = best_x
        best_all = max(best_all, best_f)
    return base, best_all, per_start


def _micro_batches(batches: Batches, m: int) -> Iterator[list[tuple[Any, Any, int]]]:
    for x, y, n in batches:
        if not (isinstance(x, Tensor) and isinstance(y, Tensor)):
            raise ValueError(
                f"Invalid data for m={m}: x is a {type(x).__name__} and y a {type(y).__name__} "
                "(allowed: tensors, which can be split into micro-batches)"
            )
        for start in range(0, n, m):
            stop = min(start + m, n)
            yield [(x[start:stop], y[start:stop], stop - start)]


def sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    rho: float,
    p: float = 2,
    adaptive: bool = False,
    eta: float = 0.01,
    normalization: str = "elementwise",
    steps: int = 10,
    m: int | None = None,
    params: Iterable[Tensor] | None = None,
    seed: int = 0,
    starts: int | None = None,
    budget: int | None = None,
    *,
    process_group: Any = None,
) -> SharpnessResult:
    r"""Sharpness :math:`\max_{\|T_w^{-1}\epsilon\|_p \le \rho} L(w+\epsilon) - L(w)`.

    The maximum is sought by projected ascent on :math:`\delta = T_w^{-1}\epsilon` from
    several starts (random starts and step-size restarts in the spirit of Auto-PGD, Croce &
    Hein 2020, which the adaptive-sharpness study of Andriushchenko et al. 2023 uses):

    1. start 0 is :math:`\delta = 0`; its first step gives exactly the SAM / ASAM ascent,
       :math:`\epsilon = \rho\,T_w^2 g/\|T_w g\|_2` for :math:`p = 2`,
       :math:`\epsilon = \rho\,T_w\,\mathrm{sign}(g)` for :math:`p = \infty`; the other
       ``starts - 1`` start at random points of the boundary (the sphere of radius ρ, or a
       random vertex of the box);
    2. each start takes ``steps + 1`` steps :math:`z = P(x + \eta\,u)` with :math:`u` the
       normalized :math:`T_w\nabla L` (:math:`p = 2`) or its sign (:math:`p = \infty`), and
       the momentum :math:`x \leftarrow P(x + 0.75(z - x) + 0.25(x - x_{prev}))`; :math:`P`
       projects onto the ball (rescaling, or clipping to :math:`[-\rho, \rho]`). The step
       :math:`\eta` starts at :math:`2\rho` (start 0) or :math:`\rho`, and at checkpoints
       (every quarter of the steps) it halves and the ascent restarts from the start's best
       point when fewer than 75 % of the steps raised the loss or the best did not improve.

    The best loss over all starts is reported (a lower bound of the true maximum), with the
    best of each start (``start_values``) and their ``spread``. On a 9-parameter tanh net the
    default (8 starts, 10 steps) reaches >= 95 % of a 256-start, 60-step brute force for plain
    and adaptive sharpness, p = 2 and ∞, ρ from 0.05 to 2 (``tests/test_sharpness.py``); a
    single start reached 36-86 % at moderate and large ρ. At a stationary point
    (:math:`g = 0`) start 0 moves in a random direction.

    The weights are restored bit for bit at the end (also on error); ``.grad`` is not touched.
    The model is used in the caller's mode: BatchNorm running statistics are never updated, and
    in training mode dropout masks are fixed per batch (the same at every evaluation), so the
    loss is one deterministic function of the weights. ``model.eval()`` is the usual choice.

    Args:
        model: the network.
        loss_fn: ``loss_fn(model(x), y)``, the mean loss over the batch.
        data: one ``(x, y)`` batch or a re-iterable collection of them; the loss is the mean
            over all examples (batches weighted by size, gradients accumulated batch by batch).
        rho: the radius ρ (>= 0).
        p: the norm of the ball, 2 or ``math.inf``.
        adaptive: use ASAM's :math:`T_w` (adaptive sharpness) instead of :math:`T = I`. It
            applies to every perturbed parameter, biases included (needed for the invariance).
        eta: the offset η of :math:`T_w` (>= 0; 0 makes the invariance exact).
        normalization: ``"elementwise"`` or ``"filterwise"`` :math:`T_w`.
        steps: projected-gradient steps after the first ascent step (>= 0; 0 is the one-step
            SAM / ASAM estimate).
        m: m-sharpness (Foret et al.): split every batch into micro-batches of ``m`` examples
            (the last may be smaller), maximize each separately and average the results
            weighted by size. ``None``: one maximization over all of ``data``.
        params: the parameters to perturb (default: those with ``requires_grad``).
        seed: seeds the dropout masks and the random starts.
        starts: the number of ascents (default: 8, or 1 when ``steps == 0``, which keeps the
            one-step SAM / ASAM estimate). Cost: about ``starts * (steps + 2)`` evaluations.
        budget: the most loss-and-gradient evaluations per maximization (``None``: no cap);
            the starts run in order until it is spent.
        process_group: whose data the loss is over (torch.distributed's convention).
            ``None`` (default): the default group when ``torch.distributed`` is initialized
            with more than one rank, else this process's data; a ``ProcessGroup``: that
            group; ``"local"``: this process's data only. Under a group ``data`` is this
            rank's shard and the sharpness is that of the union of the shards (weighted by
            their sizes): every loss-and-gradient of the ascent is all-reduced once, the random
            starts are drawn alike on every rank, so every rank takes the same steps and
            returns the same result. With ``m``, each rank maximizes over its own
            micro-batches and the size-weighted means are all-reduced once at the end (the
            random starts of each rank's micro-batches come from ``seed``, so with
            ``starts > 1`` they are not the draws one process over all the micro-batches
            would make). A ``DistributedDataParallel`` model is measured through its
            ``.module``; an FSDP2 model on its full weights (all-gathered once).

    Returns:
        A :class:`SharpnessResult` with ``value``, ``base_loss``, ``perturbed_loss``,
        ``steps``, ``evaluations``, ``starts``, ``start_values`` and ``spread``.

    References:
        P. Foret, A. Kleiner, H. Mobahi, B. Neyshabur. Sharpness-Aware Minimization for
        Efficiently Improving Generalization. ICLR 2021. J. Kwon, J. Kim, H. Park, I. K. Choi.
        ASAM: Adaptive Sharpness-Aware Minimization for Scale-Invariant Learning of Deep Neural
        Networks. ICML 2021. F. Croce, M. Hein. Reliable evaluation of adversarial robustness
        with an ensemble of diverse parameter-free attacks (Auto-PGD). ICML 2020.
        M. Andriushchenko, F. Croce, M. Müller, M. Hein, N. Flammarion.
        A Modern Look at the Relationship between Sharpness and Generalization. ICML 2023.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"Invalid model: {type(model).__name__} (allowed: a torch.nn.Module)")
    model = unwrap(model)
    asked, process_group = process_group, resolve_group(process_group)
    check_non_negative("rho", rho)
    check_choice("p", p, P_NORMS)
    check_non_negative("eta", eta)
    check_choice("normalization", normalization, kernels.NORMALIZATIONS)
    if not isinstance(adaptive, bool):
        raise ValueError(f"Invalid adaptive: {adaptive!r} (allowed: True or False)")
    steps = check_int("steps", steps, 0)
    m = check_int("m", m, 1, none=True)
    if starts is None:
        starts = 1 if steps == 0 else DEFAULT_STARTS
    starts = check_int("starts", starts, 1, none=True)
    budget = check_int("budget", budget, 2, none=True)
    rho, eta = float(rho), float(eta)
    names, ps = resolve_params(model, params)
    swap = contextlib.nullcontext()
    if has_dtensors(ps):  # FSDP2: the ascent on the full weights, the model seen unsharded
        if isinstance(asked, str):
            raise ValueError(
                "Invalid process_group: 'local' for an FSDP2 model (allowed: None or the group "
                "of its mesh; its weights are sharded over the ranks)"
            )
        sharding = Sharding(ps)
        full = FullWeights(model, names, ps, sharding)
        swap, ps = full.swapped(refresh=False), full.leaves
        process_group = sharding.group if process_group is None else process_group
    device = ps[0].device
    batches = Batches(data, device)
    generator = torch.Generator().manual_seed(int(seed))
    parallel = None
    if process_group is not None:
        parallel = DataParallel(process_group, local_count(batches), device)
    # one maximization over the union: every evaluation all-reduced; m-sharpness: local
    # maximizations, their sums all-reduced at the end
    reduce = parallel.mean if parallel is not None and m is None else None

    backup = [w.detach().clone() for w in ps]
    scale = kernels.normalizer(backup, eta, normalization) if adaptive else None
    groups: Iterable[Any] = [batches] if m is None else _micro_batches(batches, m)
    weighted = [0.0, 0.0]  # sums of n * L(w), n * L(w + ε)
    per_start = [0.0] * starts  # sums of n * (best L(w + ε) - L(w)) per start
    total = 0
    evaluations = 0
    with swap:
        try:
            for group in groups:
                n = sum(b[2] for b in group) if isinstance(group, list) else 1
                objective = _Objective(model, loss_fn, ps, group, int(seed), reduce)
                base, best, bests = _maximize(
                    objective, ps, backup, scale, rho, p, steps, generator, starts, budget
                )
                evaluations += objective.evaluations
                if m is None:
                    n = 1
                weighted[0] += n * base
                weighted[1] += n * best
                bests = bests + [bests[-1]] * (starts - len(bests))  # a budget cut the starts
                for i, b in enumerate(bests[:starts]):
                    per_start[i] += n * (b - base)
                total += n
        finally:
            with torch.no_grad():
                torch._foreach_copy_(ps, backup)
    if parallel is not None and m is not None:  # the micro-batches of every rank
        sums = torch.tensor([*weighted, *per_start, total, evaluations], dtype=torch.float64)
        sums = parallel.sum([sums])[0].tolist()
        weighted, per_start = sums[:2], sums[2 : 2 + starts]
        total, evaluations = sums[-2], int(sums[-1])
    base_loss, perturbed_loss = weighted[0] / total, weighted[1] / total
    values = tuple(max(v / total, 0.0) for v in per_start) if rho > 0 else (0.0,)
    return SharpnessResult(
        value=max(perturbed_loss - base_loss, 0.0),
        base_loss=base_loss,
        perturbed_loss=perturbed_loss,
        steps=steps if rho > 0 else 0,
        evaluations=evaluations,
        starts=starts if rho > 0 else 1,
        start_values=values,
        spread=max(values) - min(values),
    )



# --------------------------------------------------------------------------------------------
# m-sharpness with the error increase, and average-case sharpness
# --------------------------------------------------------------------------------------------

DISTRIBUTIONS = ("gaussian", "uniform")


def _local_measurement(model: nn.Module, params, data, process_group: Any, name: str):
    """The model (a DDP module unwrapped), its measured parameters, this rank's batches and the
    :class:`DataParallel` of ``process_group`` (None for one process) of a measurement whose
    per-rank sums are all-reduced once at its end. FSDP2 models are refused (their ascent needs
    the full weights: :func:`sharpness` has it)."""
    model = unwrap(model)
    group = resolve_group(process_group)
    _, ps = resolve_params(model, params)
    if has_dtensors(ps):
        raise ValueError(f"Invalid model: an FSDP2 model for {name} (allowed: a model that is "
                         "not sharded, alone or under DDP; samkit.sharpness(m=...) measures "
                         "FSDP2 models)")
    batches = Batches(data, ps[0].device)
    parallel = None if group is None else DataParallel(group, local_count(batches),
                                                       ps[0].device)
    return model, ps, batches, parallel


def _loss_and_error(model, loss_fn, batches, seed: int, error: bool) -> tuple[float, float]:
    """The size-weighted mean loss and (with ``error``) classification error over ``batches``
    at the current weights, without gradients (the same batch seeds as the ascent)."""
    from samkit.curvature._data import batch_mean

    def fn(x, y):
        out = model(x)
        loss = loss_fn(out, y).detach().to(torch.float64)
        if not error:
            return [loss]
        if not (isinstance(y, Tensor) and not y.is_floating_point()
                and out.dim() == y.dim() + 1 and out.shape[:-1] == y.shape):
            raise ValueError(
                f"Invalid data for error=True: outputs of shape {tuple(out.shape)} and targets "
                f"{getattr(y, 'dtype', type(y).__name__)} of shape "
                f"{tuple(getattr(y, 'shape', ()))} (allowed: class scores N×C or N×T×C and "
                "integer labels N or N×T)"
            )
        wrong = (out.argmax(-1) != y).to(torch.float64).mean()
        return [loss, wrong]

    with torch.no_grad():
        values = batch_mean(model, batches, seed, next(iter(model.parameters())).device, fn)
    loss = float(values[0])
    if not math.isfinite(loss):
        raise ValueError(f"Invalid loss: {loss} at the weights being evaluated (not finite)")
    return loss, (float(values[1]) if error else math.nan)


def _set_weights(params, backup, scale, delta) -> None:
    """``w = w_0 + T δ`` (``T = I`` when ``scale`` is None)."""
    with torch.no_grad():
        torch._foreach_copy_(params, backup)
        if scale is None:
            torch._foreach_add_(params, delta)
        else:
            torch._foreach_addcmul_(params, scale, delta)


@dataclass(frozen=True)
class MSharpnessResult:
    r"""The outcome of :func:`m_sharpness`: means over the micro-batches of ``m`` examples,
    weighted by their size.

    Attributes:
        value: the loss increase :math:`\frac{1}{N}\sum_B n_B \max_\delta [L_B(w + T\delta) -
            L_B(w)]`.
        error_increase: the classification error at each micro-batch's maximizer minus the
            error at :math:`w`, averaged the same way (NaN unless ``error=True``). The
            maximizer is that of the loss, not of the error.
        base_loss, perturbed_loss: the size-weighted means of :math:`L_B(w)` and of the best
            :math:`L_B(w + T\delta_B)`.
        base_error, perturbed_error: the same for the error (NaN unless ``error=True``).
        m: the micro-batch size.
        batches: the number of micro-batches.
        batch_values: each micro-batch's loss increase.
        evaluations: the loss-and-gradient passes, in all.
    """

    value: float
    error_increase: float
    base_loss: float
    perturbed_loss: float
    base_error: float
    perturbed_error: float
    m: int
    batches: int
    batch_values: tuple[float, ...]
    evaluations: int


def m_sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    rho: float,
    m: int,
    p: float = 2,
    adaptive: bool = False,
    eta: float = 0.01,
    normalization: str = "elementwise",
    steps: int = 10,
    starts: int | None = None,
    params: Iterable[Tensor] | None = None,
    seed: int = 0,
    error: bool = False,
    *,
    process_group: Any = None,
) -> MSharpnessResult:
    r"""m-sharpness: the worst-case (adaptive) sharpness of each micro-batch of ``m`` examples,
    averaged over the micro-batches, with the error increase beside the loss increase.

    .. math::
        S^{(m)}_\rho(w) = \frac{1}{N}\sum_{B} n_B
            \max_{\|\delta\|_p \le \rho} \big[L_B(w + T_w\delta) - L_B(w)\big]

    over the micro-batches :math:`B` of ``m`` consecutive examples of every batch of ``data``
    (the last may be smaller), each maximized separately by the projected ascent of
    :func:`sharpness` (same starts, steps, step-size rule and random stream: ``value`` equals
    ``sharpness(..., m=m).value``). With ``error=True`` the classification error is evaluated at
    :math:`w` and at each micro-batch's maximizer :math:`w + T_w\delta_B` (of the loss), and
    ``error_increase`` is the mean of the differences: the second quantity Andriushchenko et al.
    (2023) report.

    Their setting (``tml-epfl/sharpness-vs-generalization``, ``eval_sharpness.py``): ``m = 128``
    on a fixed set of 1,024 training examples, ``adaptive=True`` with :math:`T_w = |w|`
    (``eta = 0``) on every parameter, 20 Auto-PGD iterations (``steps=19``: the first step and
    19 more), one start (``starts=1``).

    Args:
        model, loss_fn, data, rho, p, adaptive, eta, normalization, steps, starts, params,
        seed: as in :func:`sharpness`.
        m: the micro-batch size (>= 1).
        error: also the error increase (``model(x)`` must give class scores and ``y`` integer
            labels).
        process_group: as in :func:`sharpness`: under a group the micro-batches of every rank
            count (each rank maximizes its own, the sums are all-reduced once at the end), so
            every rank returns the same numbers; ``batch_values`` are this rank's. FSDP2 models:
            use ``sharpness(m=...)``.

    References:
        P. Foret, A. Kleiner, H. Mobahi, B. Neyshabur. Sharpness-Aware Minimization for
        Efficiently Improving Generalization. ICLR 2021 (m-sharpness).
        M. Andriushchenko, F. Croce, M. Müller, M. Hein, N. Flammarion. A Modern Look at the
        Relationship between Sharpness and Generalization. ICML 2023.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"Invalid model: {type(model).__name__} (allowed: a torch.nn.Module)")
    check_non_negative("rho", rho)
    check_choice("p", p, P_NORMS)
    check_non_negative("eta", eta)
    check_choice("normalization", normalization, kernels.NORMALIZATIONS)
    if not isinstance(adaptive, bool) or not isinstance(error, bool):
        raise ValueError(f"Invalid adaptive / error: {adaptive!r} / {error!r} (allowed: True or "
                         "False)")
    m = check_int("m", m, 1)
    steps = check_int("steps", steps, 0)
    if starts is None:
        starts = 1 if steps == 0 else DEFAULT_STARTS
    starts = check_int("starts", starts, 1)
    rho, eta = float(rho), float(eta)
    model, ps, batches, parallel = _local_measurement(model, params, data, process_group,
                                                      "m_sharpness")
    generator = torch.Generator().manual_seed(int(seed))
    backup = [w.detach().clone() for w in ps]
    scale = kernels.normalizer(backup, eta, normalization) if adaptive else None
    sums = [0.0, 0.0, 0.0, 0.0]  # n * L(w), n * L(w + Tδ), n * err(w), n * err(w + Tδ)
    values: list[float] = []
    total = evaluations = 0
    try:
        for group in _micro_batches(batches, m):
            n = group[0][2]
            objective = _Objective(model, loss_fn, ps, group, int(seed))
            best: list[Tensor] = []
            base, top, _ = _maximize(objective, ps, backup, scale, rho, p, steps, generator,
                                     starts, None, best)
            evaluations += objective.evaluations
            e0 = e1 = math.nan
            if error:
                _set_weights(ps, backup, None, [torch.zeros_like(w) for w in ps])
                e0 = _loss_and_error(model, loss_fn, group, int(seed), True)[1]
                _set_weights(ps, backup, scale, best)
                e1 = _loss_and_error(model, loss_fn, group, int(seed), True)[1]
            for i, v in enumerate((base, top, e0, e1)):
                sums[i] += n * v
            values.append(max(top - base, 0.0))
            total += n
    finally:
        with torch.no_grad():
            torch._foreach_copy_(ps, backup)
    count = len(values)
    if parallel is not None:  # the micro-batches of every rank
        reduced = parallel.sum([torch.tensor([*sums, total, evaluations, count],
                                             dtype=torch.float64)])[0].tolist()
        sums, (total, evaluations, count) = reduced[:4], reduced[4:]
        evaluations, count = int(evaluations), int(count)
    base_loss, perturbed_loss, base_error, perturbed_error = (v / total for v in sums)
    return MSharpnessResult(
        value=max(perturbed_loss - base_loss, 0.0),
        error_increase=perturbed_error - base_error,
        base_loss=base_loss,
        perturbed_loss=perturbed_loss,
        base_error=base_error,
        perturbed_error=perturbed_error,
        m=m,
        batches=count,
        batch_values=tuple(values),
        evaluations=evaluations,
    )


@dataclass(frozen=True)
class AverageSharpnessResult:
    r"""The outcome of :func:`average_sharpness`.

    Attributes:
        value: the mean loss increase :math:`\frac1S\sum_s L(w + \epsilon_s) - L(w)`.
        stderr: its standard error over the samples, :math:`\mathrm{sd}_s / \sqrt{S}`.
        error_increase: the mean error increase (NaN unless ``error=True``).
        base_loss, perturbed_loss: :math:`L(w)` and the mean :math:`L(w + \epsilon_s)`.
        base_error, perturbed_error: the same for the error (NaN unless ``error=True``).
        samples: :math:`S`.
    """

    value: float
    stderr: float
    error_increase: float
    base_loss: float
    perturbed_loss: float
    base_error: float
    perturbed_error: float
    samples: int


def average_sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    sigma: float,
    samples: int = 20,
    distribution: str = "gaussian",
    adaptive: bool = False,
    eta: float = 0.01,
    normalization: str = "elementwise",
    params: Iterable[Tensor] | None = None,
    seed: int = 0,
    error: bool = False,
    *,
    process_group: Any = None,
) -> AverageSharpnessResult:
    r"""Average-case (adaptive) sharpness: the expected loss increase under random perturbations
    of the weights, estimated from ``samples`` seeded draws.

    .. math::
        S^{\mathrm{avg}}_\sigma(w) = \mathbb{E}_{\epsilon}\,L(w + \epsilon) - L(w),
        \qquad \epsilon = \sigma\,T_w z,

    with :math:`z \sim \mathcal{N}(0, I)` (``"gaussian"``) or :math:`z_i \sim U[-1, 1]`
    (``"uniform"``), :math:`T_w = I` (plain) or ASAM's :math:`T_w` (``adaptive``: element-wise
    :math:`|w| + \eta`, or filter-wise), on every perturbed parameter, biases included. σ is the
    standard deviation (Gaussian) or the half-width (uniform) *per entry*, not a norm of the
    whole perturbation. On a quadratic with Hessian :math:`H` the expectation is exact to second
    order:

    .. math::
        S^{\mathrm{avg}}_\sigma = \tfrac{\sigma^2}{2}\,\mathrm{tr}(T_w H T_w)\ \text{(Gaussian)},
        \qquad \tfrac{\sigma^2}{6}\,\mathrm{tr}(T_w H T_w)\ \text{(uniform)}.

    Every draw is evaluated on all of ``data`` (size-weighted mean over its batches); averaging
    per batch first, as Andriushchenko et al. do, has the same expectation. With ``error=True``
    the classification error is averaged the same way.

    Their setting (``tml-epfl/sharpness-vs-generalization``, ``sharpness.eval_average_sharpness``
    with ``random_init_lw``): ``adaptive=True`` with :math:`T_w = |w|` (``eta=0``),
    ``samples=20``, Gaussian (their ``avg_l2``) or uniform (``avg_linf``), 1,024 training
    examples.

    Args:
        model, loss_fn, data, params, seed: as in :func:`sharpness` (``seed`` also seeds the
            draws: the same seed gives the same perturbations).
        sigma: σ (>= 0).
        samples: :math:`S` (>= 2, for the standard error).
        distribution: ``"gaussian"`` or ``"uniform"``.
        adaptive, eta, normalization: :math:`T_w` as in :func:`sharpness`.
        error: also the error increase.
        process_group: as in :func:`sharpness`: under a group every draw's loss is the mean over
            the union of the ranks' data (each rank evaluates its own, one all-reduce at the
            end; the draws are the same on every rank), the same numbers on every rank. FSDP2
            models are refused.

    The weights are restored bit for bit at the end (also on error).

    References:
        N. S. Keskar, D. Mudigere, J. Nocedal, M. Smelyanskiy, P. T. P. Tang. On Large-Batch
        Training for Deep Learning: Generalization Gap and Sharp Minima. ICLR 2017.
        Y. Jiang, B. Neyshabur, H. Mobahi, D. Krishnan, S. Bengio. Fantastic Generalization
        Measures and Where to Find Them. ICLR 2020. M. Andriushchenko, F. Croce, M. Müller,
        M. Hein, N. Flammarion. A Modern Look at the Relationship between Sharpness and
        Generalization. ICML 2023.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"Invalid model: {type(model).__name__} (allowed: a torch.nn.Module)")
    check_non_negative("sigma", sigma)
    samples = check_int("samples", samples, 2)
    check_choice("distribution", distribution, DISTRIBUTIONS)
    check_non_negative("eta", eta)
    check_choice("normalization", normalization, kernels.NORMALIZATIONS)
    if not isinstance(adaptive, bool) or not isinstance(error, bool):
        raise ValueError(f"Invalid adaptive / error: {adaptive!r} / {error!r} (allowed: True or "
                         "False)")
    model, ps, batches, parallel = _local_measurement(model, params, data, process_group,
                                                      "average_sharpness")
    generator = torch.Generator().manual_seed(int(seed))
    backup = [w.detach().clone() for w in ps]
    scale = kernels.normalizer(backup, eta, normalization) if adaptive else None
    losses, errors = [], []
    try:
        base_loss, base_error = _loss_and_error(model, loss_fn, batches, int(seed), error)
        for _ in range(samples):
            if distribution == "gaussian":
                z = [torch.randn(w.shape, generator=generator, dtype=torch.float64)
                     for w in ps]
            else:
                z = [torch.rand(w.shape, generator=generator, dtype=torch.float64).mul_(2).sub_(1)
                     for w in ps]
            delta = [t.mul_(float(sigma)).to(w) for t, w in zip(z, ps, strict=True)]
            _set_weights(ps, backup, scale, delta)
            loss, err = _loss_and_error(model, loss_fn, batches, int(seed), error)
            losses.append(loss)
            errors.append(err)
    finally:
        with torch.no_grad():
            torch._foreach_copy_(ps, backup)
    if parallel is not None:  # each rank's means weighted by its examples, summed
        local = torch.tensor([base_loss, base_error, *losses, *errors], dtype=torch.float64)
        union = parallel.mean([local])[0].tolist()
        base_loss, base_error = union[0], union[1]
        losses, errors = union[2 : 2 + samples], union[2 + samples :]
    increase = [v - base_loss for v in losses]
    mean = math.fsum(increase) / samples
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in increase) / (samples - 1))
    perturbed_error = math.fsum(errors) / samples if error else math.nan
    return AverageSharpnessResult(
        value=mean,
        stderr=sd / math.sqrt(samples),
        error_increase=perturbed_error - base_error,
        base_loss=base_loss,
        perturbed_loss=math.fsum(losses) / samples,
        base_error=base_error,
        perturbed_error=perturbed_error,
        samples=samples,
    )


__all__ = [
    "AverageSharpnessResult",
    "MSharpnessResult",
    "SharpnessResult",
    "average_sharpness",
    "m_sharpness",
    "sharpness",
]
