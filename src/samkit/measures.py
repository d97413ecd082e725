r"""Measures of a trained classifier: evaluation, sharpness at several radii, λ₁, the Hessian
trace, and function-preserving rescalings (the scale-invariance check of adaptive sharpness).

A *measure* is one number per model: plain sharpness :math:`\max_{\|\epsilon\|_p \le \rho}
L(w + \epsilon) - L(w)` and adaptive sharpness (the same over :math:`\|T_w^{-1}\epsilon\|_p \le
\rho`, :math:`T_w = \mathrm{diag}(|w| + \eta)`) by :func:`samkit.sharpness`, the top Hessian
eigenvalue by Lanczos and the Hessian trace by Hutchinson (:mod:`samkit.curvature`).

The settings (radii, steps, m, eta, seed, ...) come from any object with the attributes of
``samkit.experiments.correlate.CorrelateConfig``; the library imports no runner.

References:
    J. Kwon, J. Kim, H. Park, I. K. Choi. ASAM: Adaptive Sharpness-Aware Minimization for
    Scale-Invariant Learning of Deep Neural Networks. ICML 2021.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn


class MeasureSettings(Protocol):
    rhos_l2: tuple
    rhos_linf: tuple
    adaptive_rhos_l2: tuple
    adaptive_rhos_linf: tuple
    eta: float
    steps: int
    m: int | None
    lambda_max: bool
    trace: bool
    trace_samples: int
    measure_examples: int
    seed: int


def _fmt_num(value: float) -> str:
    return f"{value:g}"


@dataclass(frozen=True)
class Measure:
    """One measure: ``key`` (also the cache key's start), a readable ``label``, its ``family``
    (sharpness, adaptive, lambda_max, trace) and for sharpness ``p`` and ``rho``."""

    key: str
    label: str
    family: str
    p: float | None = None
    rho: float | None = None


def measures(config: MeasureSettings) -> list[Measure]:
    """The measures ``config`` asks for, in table order before sorting."""
    out = []
    for family, p, rhos in (
        ("sharpness", 2, config.rhos_l2),
        ("sharpness", math.inf, config.rhos_linf),
        ("adaptive", 2, config.adaptive_rhos_l2),
        ("adaptive", math.inf, config.adaptive_rhos_linf),
    ):
        pname = "l2" if p == 2 else "linf"
        psym = "2" if p == 2 else "∞"
        for rho in rhos:
            out.append(Measure(
                f"{family}_{pname}_rho{_fmt_num(rho)}",
                f"{'adaptive sharpness' if family == 'adaptive' else 'sharpness'} "
                f"p={psym} ρ={_fmt_num(rho)}",
                family, p, float(rho),
            ))
    if config.lambda_max:
        out.append(Measure("lambda_max", "λ₁ (top Hessian eigenvalue)", "lambda_max"))
    if config.trace:
        out.append(Measure("trace", "Hessian trace", "trace"))
    return out


def cache_key(measure: Measure, config: MeasureSettings) -> str:
    """Everything the value depends on besides the weights: a changed setting is a new key."""
    n = config.measure_examples
    if measure.family in ("sharpness", "adaptive"):
        key = f"{measure.key}|steps={config.steps}|m={config.m}|n={n}|seed={config.seed}"
        return key + (f"|eta={_fmt_num(config.eta)}" if measure.family == "adaptive" else "")
    if measure.family == "lambda_max":
        return f"lambda_max|tol=0.001|n={n}|seed={config.seed}"
    return f"trace|samples={config.trace_samples}|n={n}|seed={config.seed}"


def measure_one(model: nn.Module, loss_fn: Callable, data, measure: Measure,
                config: MeasureSettings) -> float:
    """The value of ``measure`` for ``model`` (in eval mode) on ``data``."""
    if measure.family in ("sharpness", "adaptive"):
        from samkit._sharpness import sharpness

        return sharpness(
            model, loss_fn, data, rho=measure.rho, p=measure.p,
            adaptive=measure.family == "adaptive", eta=config.eta, steps=config.steps,
            m=config.m, seed=config.seed,
        ).value
    from samkit.curvature import HessianOperator, hessian_trace, top_eigenvalues

    H = HessianOperator(model, loss_fn, data)
    if measure.family == "lambda_max":
        return float(top_eigenvalues(H, k=1, tol=1e-3, seed=config.seed).values[0])
    return hessian_trace(H, samples=config.trace_samples, seed=config.seed).mean


class Cache(Protocol):
    def get(self, key: str, compute: Callable[[], Any]) -> Any: ...


def measure_model(
    model: nn.Module, data, config: MeasureSettings, cache: Cache | None = None,
    prefix: str = "",
) -> dict[str, float]:
    """Every measure of ``config`` for ``model`` on ``data`` (one ``(x, y)`` batch), with the
    cross-entropy, in eval mode (dropout off); cached in ``cache`` under ``prefix +
    cache_key``. The model's mode is restored."""
    import samkit.measures as this  # look measure_one up at call time (tests count the calls)

    training = model.training
    model.eval()
    out = {}
    try:
        for measure in measures(config):
            key = prefix + cache_key(measure, config)
            compute = lambda m=measure: this.measure_one(  # noqa: E731
                model, F.cross_entropy, data, m, config)
            out[measure.key] = float(cache.get(key, compute) if cache else compute())
    finally:
        model.train(training)
    return out


def rescale_relu(model: nn.Module, alpha: float, layer: int = 0) -> nn.Module:
    r"""A copy of ``model`` computing the same function with different weights: the ``layer``-th
    linear (or conv) layer's weight and bias times ``alpha``, the next one's weight divided by
    ``alpha``. Exact when the activation between them is positively homogeneous (ReLU) and
    nothing normalizes in between (the MLP and CNN of samkit.models).

    .. math:: W_1 \to \alpha W_1,\quad b_1 \to \alpha b_1,\quad W_2 \to W_2/\alpha
    """
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"Invalid alpha: {alpha!r} (allowed: a finite number > 0)")
    out = copy.deepcopy(model)
    layers = [m for m in out.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))]
    if len(layers) < layer + 2:
        raise ValueError(
            f"Invalid layer: {layer} (the model has {len(layers)} linear/conv layers; rescaling "
            "needs the layer and the one after it)"
        )
    first, second = layers[layer], layers[layer + 1]
    with torch.no_grad():
        first.weight.mul_(alpha)
        if first.bias is not None:
            first.bias.mul_(alpha)
        second.weight.div_(alpha)
    return out


@torch.no_grad()
def evaluate(model: nn.Module, split, batch_size: int = 1000, device: Any = None,
             autocast: Callable[[], Any] | None = None) -> tuple[float, float]:
    """Mean cross-entropy (no label smoothing) and accuracy of ``model`` (eval mode) on
    ``split`` (``.x``, ``.y``; sequence outputs ``N×T×C`` count every token), summed in float64.
    The model's mode is restored."""
    from contextlib import nullcontext

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"Invalid batch_size: {batch_size!r} (allowed: an integer >= 1)")
    device = device if device is not None else next(
        (p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    count = 0
    x_all, y_all = split.x.to(device), split.y.to(device)
    try:
        for start in range(0, len(y_all), batch_size):
            x, y = x_all[start : start + batch_size], y_all[start : start + batch_size]
            with (autocast or nullcontext)():
                logits = model(x)
            logits = logits.float().flatten(0, -2)
            loss_sum += F.cross_entropy(logits, y.flatten(), reduction="sum").double()
            correct += (logits.argmax(-1) == y.flatten()).sum()
            count += y.numel()
    finally:
        model.train(was_training)
    return float(loss_sum) / max(count, 1), float(correct) / max(count, 1)
