r"""Measures of a trained classifier: evaluation, sharpness at several radii, λ₁, the Hessian
trace, and function-preserving rescalings (the scale-invariance check of adaptive sharpness).

A *measure* is one number per model:

- **worst-case** plain sharpness :math:`\max_{\|\epsilon\|_p \le \rho} L(w + \epsilon) - L(w)`
  and adaptive sharpness (the same over :math:`\|T_w^{-1}\epsilon\|_p \le \rho`,
  :math:`T_w = \mathrm{diag}(|w| + \eta)`) by :func:`samkit.sharpness`, or, with ``m``, its
  m-sharpness form (:func:`m_sharpness`: the maximum per micro-batch of ``m`` examples,
  averaged over the micro-batches);
- **average-case** plain and adaptive sharpness :math:`\mathbb{E}\,L(w + \sigma T_w z) - L(w)`,
  :math:`z` Gaussian or uniform (:func:`average_sharpness`, ``avg_samples`` seeded draws);
- optionally, beside each sharpness (the loss increase), the **error increase** (the
  classification error at the perturbed weights minus that at :math:`w`), and **logit
  normalization** (:class:`LogitNormalization`: the measures of the model whose logits are
  centred and scaled to unit norm, as Andriushchenko et al. 2023 offer);
- the top Hessian eigenvalue by Lanczos and the Hessian trace by Hutchinson
  (:mod:`samkit.curvature`).

The settings (radii, steps, m, eta, seed, ...) come from any object with the attributes of
``samkit.experiments.correlate.CorrelateConfig``; the library imports no runner. Two published
settings are named in :data:`PRESETS` (Kwon et al. 2021 and Andriushchenko et al. 2023).

References:
    J. Kwon, J. Kim, H. Park, I. K. Choi. ASAM: Adaptive Sharpness-Aware Minimization for
    Scale-Invariant Learning of Deep Neural Networks. ICML 2021.
    M. Andriushchenko, F. Croce, M. Müller, M. Hein, N. Flammarion. A Modern Look at the
    Relationship between Sharpness and Generalization. ICML 2023
    (code: github.com/tml-epfl/sharpness-vs-generalization).
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

from samkit._sharpness import (
    AverageSharpnessResult,
    MSharpnessResult,
    average_sharpness,
    m_sharpness,
)


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
    starts: int | None
    avg_sigmas: tuple
    avg_sigmas_uniform: tuple
    adaptive_avg_sigmas: tuple
    adaptive_avg_sigmas_uniform: tuple
    avg_samples: int
    normalize_logits: bool
    error_increase: bool


# The measure settings of two studies, for ``samkit correlate --measures NAME``: the values of
# the study keys each sets (the rest keep their values). The radii for our MLP on Fashion-MNIST
# are ours, not the papers' (theirs are for ResNets and ViTs on CIFAR-10): chosen from the values
# of two trained models of the default grid, so that the loss increases span about 0.001 to 3
# (neither lost in rounding nor saturated), before any τ was computed. What follows the papers
# is the form of the measures.
PRESETS: dict[str, dict[str, Any]] = {
    # Kwon et al. 2021 (ASAM), Section 3 / Figure 1: worst-case sharpness and adaptive sharpness
    # (T_w = |w| + η, element-wise) at p = 2 and p = ∞ over the whole measured set (no m), the
    # loss increase. samkit's maximizer: 8 starts, 10 ascent steps after the SAM/ASAM step.
    "kwon2021": {
        "measure_examples": 1000, "m": None, "steps": 10, "starts": None, "eta": 0.0,
        "rhos_l2": (0.05, 0.1, 0.2), "rhos_linf": (0.0005, 0.001, 0.002),
        "adaptive_rhos_l2": (0.5, 1.0, 2.0), "adaptive_rhos_linf": (0.005, 0.01, 0.02),
        "avg_sigmas": (), "avg_sigmas_uniform": (), "adaptive_avg_sigmas": (),
        "adaptive_avg_sigmas_uniform": (), "avg_samples": 20, "normalize_logits": False,
        "error_increase": False,
    },
    # Andriushchenko et al. 2023, tml-epfl/sharpness-vs-generalization (eval_sharpness.py,
    # sharpness.py, sh/eval_sharpness_final.sh): 1,024 fixed training examples in batches of
    # 128, worst-case sharpness per batch (m = 128) by Auto-PGD with 20 iterations and one start
    # (no random init), averaged over the batches; average-case sharpness with 20 samples,
    # Gaussian (their avg_l2) and uniform (avg_linf); adaptive scaling T_w = |w| (η = 0) on
    # every parameter; the loss and the error increase. Logit normalization is their option
    # (--normalize_logits), off here as in their default.
    "andriushchenko2023": {
        "measure_examples": 1024, "m": 128, "steps": 19, "starts": 1, "eta": 0.0,
        "rhos_l2": (0.05, 0.1, 0.2), "rhos_linf": (0.00025, 0.0005, 0.001),
        "adaptive_rhos_l2": (1.0, 2.0, 4.0), "adaptive_rhos_linf": (0.01, 0.02, 0.04),
        "avg_sigmas": (0.01, 0.02, 0.04), "avg_sigmas_uniform": (0.02, 0.04, 0.08),
        "adaptive_avg_sigmas": (0.2, 0.4, 0.8), "adaptive_avg_sigmas_uniform": (0.4, 0.8, 1.6),
        "avg_samples": 20, "normalize_logits": False, "error_increase": True,
    },
}
PRESET_SOURCES = {
    "kwon2021": "Kwon et al. 2021, ASAM (ICML), Section 3",
    "andriushchenko2023": "Andriushchenko et al. 2023, A Modern Look at the Relationship "
                          "between Sharpness and Generalization (ICML); "
                          "tml-epfl/sharpness-vs-generalization",
}


class LogitNormalization(nn.Module):
    r"""``model`` with its logits centred and scaled to unit norm (Andriushchenko et al. 2023's
    ``LogitNormalizationWrapper``): :math:`	ilde z = (z - ar z) / \max(\|z - ar z\|_2,
    10^{-10})` over the class dimension. The prediction (argmax) is unchanged; the loss no
    longer falls by scaling the logits up, so the sharpness of the cross-entropy is not driven
    by the logits' scale."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        z = self.model(x)
        z = z - z.mean(dim=-1, keepdim=True)
        return z / torch.linalg.vector_norm(z, dim=-1, keepdim=True).clamp_min(1e-10)


def _fmt_num(value: float) -> str:
    return f"{value:g}"


KINDS = ("worst", "average_gaussian", "average_uniform")
KIND_LABELS = {"worst": "worst-case", "average_gaussian": "average-case Gaussian",
               "average_uniform": "average-case uniform"}


@dataclass(frozen=True)
class Measure:
    """One measure: ``key`` (also the cache key's start), a readable ``label``, its ``family``
    (sharpness, adaptive, lambda_max, trace), for sharpness its ``kind`` (worst, or
    average_gaussian / average_uniform), ``p`` (worst case) and ``rho`` (the radius, or σ for
    the average case), and ``quantity``: ``loss`` (the loss increase) or ``error`` (the error
    increase beside it)."""

    key: str
    label: str
    family: str
    p: float | None = None
    rho: float | None = None
    kind: str = "worst"
    quantity: str = "loss"

    @property
    def group(self) -> str:
        """What adaptive and plain sharpness are compared within: kind, p and quantity, e.g.
        ``worst p=2 loss``."""
        p = "" if self.p is None else (" p=2" if self.p == 2 else " p=∞")
        return f"{KIND_LABELS.get(self.kind, self.kind)}{p}" + (
            " (error increase)" if self.quantity == "error" else "")


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
    for family, kind, sigmas in (
        ("sharpness", "average_gaussian", getattr(config, "avg_sigmas", ())),
        ("sharpness", "average_uniform", getattr(config, "avg_sigmas_uniform", ())),
        ("adaptive", "average_gaussian", getattr(config, "adaptive_avg_sigmas", ())),
        ("adaptive", "average_uniform", getattr(config, "adaptive_avg_sigmas_uniform", ())),
    ):
        dist = "gauss" if kind == "average_gaussian" else "unif"
        for sigma in sigmas:
            out.append(Measure(
                f"{'adaptive_' if family == 'adaptive' else ''}avg_{dist}_sigma{_fmt_num(sigma)}",
                f"{'adaptive ' if family == 'adaptive' else ''}average sharpness "
                f"{'Gaussian' if dist == 'gauss' else 'uniform'} σ={_fmt_num(sigma)}",
                family, None, float(sigma), kind,
            ))
    if getattr(config, "error_increase", False):
        out += [Measure(f"{m.key}_err", f"{m.label} (error increase)", m.family, m.p, m.rho,
                        m.kind, "error") for m in list(out)]
    if config.lambda_max:
        out.append(Measure("lambda_max", "λ₁ (top Hessian eigenvalue)", "lambda_max"))
    if config.trace:
        out.append(Measure("trace", "Hessian trace", "trace"))
    return out


def cache_key(measure: Measure, config: MeasureSettings) -> str:
    """Everything the value depends on besides the weights: a changed setting is a new key.
    (The keys of the original settings are unchanged, so older caches stay valid.)"""
    n = config.measure_examples
    if measure.family in ("sharpness", "adaptive"):
        base = measure.key[:-4] if measure.quantity == "error" else measure.key
        if measure.kind == "worst":
            key = f"{base}|steps={config.steps}|m={config.m}|n={n}|seed={config.seed}"
            starts = getattr(config, "starts", None)
            key += "" if starts is None else f"|starts={starts}"
        else:
            key = f"{base}|samples={config.avg_samples}|n={n}|seed={config.seed}"
        key += f"|eta={_fmt_num(config.eta)}" if measure.family == "adaptive" else ""
        key += "|logitnorm" if getattr(config, "normalize_logits", False) else ""
        # with the error increase the value is the pair [loss increase, error increase]
        return key + ("|with_error" if getattr(config, "error_increase", False) else "")
    if measure.family == "lambda_max":
        return f"lambda_max|tol=0.001|n={n}|seed={config.seed}"
    return f"trace|samples={config.trace_samples}|n={n}|seed={config.seed}"


def measure_one(model: nn.Module, loss_fn: Callable, data, measure: Measure,
                config: MeasureSettings) -> float | list[float]:
    """The value of ``measure`` for ``model`` (in eval mode) on ``data``: a float, or for a
    sharpness measure under ``config.error_increase`` the pair ``[loss increase, error
    increase]``. With ``config.normalize_logits`` the sharpness measures are those of
    :class:`LogitNormalization` (model) (λ₁ and the trace are not)."""
    if measure.family in ("sharpness", "adaptive"):
        from samkit._sharpness import sharpness

        error = bool(getattr(config, "error_increase", False))
        net = LogitNormalization(model) if getattr(config, "normalize_logits", False) else model
        adaptive = measure.family == "adaptive"
        if measure.kind != "worst":
            r: Any = average_sharpness(
                net, loss_fn, data, sigma=measure.rho, samples=config.avg_samples,
                distribution=measure.kind.split("_")[1], adaptive=adaptive, eta=config.eta,
                seed=config.seed, error=error)
        elif error or config.m is not None:
            r = m_sharpness(
                net, loss_fn, data, rho=measure.rho, m=config.m or _batch_len(data), p=measure.p,
                adaptive=adaptive, eta=config.eta, steps=config.steps,
                starts=getattr(config, "starts", None), seed=config.seed, error=error)
        else:
            r = sharpness(
                net, loss_fn, data, rho=measure.rho, p=measure.p, adaptive=adaptive,
                eta=config.eta, steps=config.steps, starts=getattr(config, "starts", None),
                seed=config.seed)
        return [r.value, r.error_increase] if error else r.value
    from samkit.curvature import HessianOperator, hessian_trace, top_eigenvalues

    H = HessianOperator(model, loss_fn, data)
    if measure.family == "lambda_max":
        return float(top_eigenvalues(H, k=1, tol=1e-3, seed=config.seed).values[0])
    return hessian_trace(H, samples=config.trace_samples, seed=config.seed).mean


def _batch_len(data) -> int:
    """The examples in one ``(x, y)`` batch (m-sharpness over all of it: one micro-batch)."""
    return max(1, len(data[1]))


class Cache(Protocol):
    def get(self, key: str, compute: Callable[[], Any]) -> Any: ...


def measure_model(
    model: nn.Module, data, config: MeasureSettings, cache: Cache | None = None,
    prefix: str = "",
) -> dict[str, float]:
    """Every measure of ``config`` for ``model`` on ``data`` (one ``(x, y)`` batch) with the
    cross-entropy (an error increase under ``<key>_err``), in eval mode (dropout off); cached in
    ``cache`` under ``prefix + cache_key``. The model's mode is restored."""
    import samkit.measures as this  # look measure_one up at call time (tests count the calls)

    training = model.training
    model.eval()
    out = {}
    try:
        for measure in measures(config):
            if measure.quantity == "error":  # filled with its loss increase below
                continue
            key = prefix + cache_key(measure, config)
            compute = lambda m=measure: this.measure_one(  # noqa: E731
                model, F.cross_entropy, data, m, config)
            value = cache.get(key, compute) if cache else compute()
            if isinstance(value, list):
                out[measure.key], out[f"{measure.key}_err"] = float(value[0]), float(value[1])
            else:
                out[measure.key] = float(value)
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


__all__ = [
    "KINDS", "PRESETS", "PRESET_SOURCES", "AverageSharpnessResult", "Cache",
    "LogitNormalization", "MSharpnessResult", "Measure", "MeasureSettings", "average_sharpness",
    "cache_key", "evaluate", "m_sharpness", "measure_model", "measure_one", "measures",
    "rescale_relu",
]
