r"""Statistics for claims about models and seeds: rank correlation, confidence intervals, verdicts.

**Kendall's** :math:`\tau` (the :math:`\tau_b` variant, which corrects for ties) between two
sequences :math:`x, y` of length :math:`n`:

.. math::
    \tau_b = \frac{n_c - n_d}{\sqrt{(n_0 - n_1)(n_0 - n_2)}}

with :math:`n_c` / :math:`n_d` the concordant / discordant pairs, :math:`n_0 = n(n-1)/2` and
:math:`n_1`, :math:`n_2` the pairs tied in :math:`x` and in :math:`y`. :math:`\tau = 1`: the
measure orders the models exactly as the gap does; :math:`-1`: exactly reversed.

The *granulated* coefficient of Jiang et al. (2020) averages :math:`\tau` over the groups of
models that differ in one hyperparameter only, then over the hyperparameters: a measure cannot
score well merely by tracking the one hyperparameter that moves the gap most.

**Confidence intervals.** Two kinds, for two situations:

- *Over models* (a :math:`\tau` over 30 to 200 trained models): the bootstrap
  (:func:`bootstrap_interval`, :func:`kendall_interval`, :func:`kendall_difference_interval`).
  The models are resampled with replacement; a difference of two :math:`\tau` is *paired*: both
  are computed on the same resample, so what the two measures share cancels. BCa (bias-corrected
  and accelerated, Efron 1987) by default, the percentile interval on request.
- *Over seeds* (an accuracy difference over 3 to 10 seeds): the paired :math:`t` interval
  (:func:`paired_difference`) on the per-seed differences :math:`d_i = a_i - b_i`,

  .. math::
      \bar d \pm t_{n-1,\,1-\alpha/2}\, s_d / \sqrt{n}.

  With so few seeds the bootstrap is not honest: a resample of 5 values takes at most 126
  distinct values, and its percentile interval is too narrow (its coverage is far below the
  nominal level for :math:`n \le 10`), while the :math:`t` interval is exact when the
  differences are normal and widens, as it should, when :math:`n` is small
  (:math:`t_{4,0.975} = 2.78` against the normal 1.96).

**Verdicts.** :func:`verdict` turns an interval of a difference into "better", "worse" or "not
distinguishable at 95 %": better only when the whole interval lies on the better side of zero,
worse only when it lies on the other, never more than the interval allows.

References:
    M. G. Kendall. A New Measure of Rank Correlation. Biometrika, 1938.
    Y. Jiang, B. Neyshabur, H. Mobahi, D. Krishnan, S. Bengio. Fantastic Generalization
    Measures and Where to Find Them. ICLR 2020.
    B. Efron. Better Bootstrap Confidence Intervals. JASA, 1987.
    B. Efron, R. Tibshirani. An Introduction to the Bootstrap. Chapman & Hall, 1993 (ch. 13-14).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class KendallResult:
    """Attributes:
    tau: Kendall's :math:`\\tau_b` in [-1, 1] (NaN when undefined: fewer than 2 finite pairs,
        or one sequence constant).
    pvalue: two-sided p-value of :math:`\\tau = 0` (exact without ties for small ``n``,
        otherwise the normal approximation; scipy's ``kendalltau``).
    n: the number of pairs used (those with both values finite).
    """

    tau: float
    pvalue: float
    n: int


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> KendallResult:
    """Kendall's :math:`\\tau_b` of ``x`` and ``y`` and its p-value, over the positions where
    both are finite (NaN and inf values are left out, not ranked)."""
    from scipy.stats import kendalltau

    a = np.asarray(x, dtype=float)
    b = np.asarray(y, dtype=float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(
            f"Invalid input: x and y must be 1-d sequences of the same length (got shapes "
            f"{a.shape} and {b.shape})"
        )
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    n = int(a.size)
    if n < 2 or np.all(a == a[0]) or np.all(b == b[0]):
        return KendallResult(math.nan, math.nan, n)
    result = kendalltau(a, b)
    return KendallResult(float(result.statistic), float(result.pvalue), n)


def granulated_kendall(
    x: Sequence[float], y: Sequence[float], groups: Sequence[Mapping[str, Hashable]]
) -> tuple[float, dict[str, float]]:
    """Jiang et al.'s granulated :math:`\\Psi`: for each hyperparameter ``h``, the mean of
    :math:`\\tau` over the sets of models equal in every other hyperparameter (sets with at
    least two models and a defined :math:`\\tau`); then the mean over the hyperparameters.

    Args:
        x, y: the measure and the gap, one value per model.
        groups: each model's hyperparameters, e.g. ``{"batch_size": 32, "lr": 0.1}``.

    Returns:
        ``(psi, per_hyperparameter)``; NaN where nothing could be computed.
    """
    if not (len(x) == len(y) == len(groups)):
        raise ValueError(
            f"Invalid input: x, y and groups must have the same length (got {len(x)}, {len(y)}, "
            f"{len(groups)})"
        )
    keys = sorted({k for g in groups for k in g})
    per: dict[str, float] = {}
    for key in keys:
        cells: dict[tuple, list[int]] = {}
        for i, g in enumerate(groups):
            rest = tuple(sorted((k, v) for k, v in g.items() if k != key))
            cells.setdefault(rest, []).append(i)
        taus = []
        for members in cells.values():
            if len(members) < 2:
                continue
            t = kendall_tau([x[i] for i in members], [y[i] for i in members]).tau
            if not math.isnan(t):
                taus.append(t)
        per[key] = statistics.fmean(taus) if taus else math.nan
    defined = [v for v in per.values() if not math.isnan(v)]
    return (statistics.fmean(defined) if defined else math.nan), per




# --------------------------------------------------------------------------------------------
# Confidence intervals and verdicts
# --------------------------------------------------------------------------------------------

BETTER = "better"
WORSE = "worse"


def not_distinguishable(confidence: float = 0.95) -> str:
    """The verdict's third value, with its level: ``"not distinguishable at 95 %"``."""
    return f"not distinguishable at {_percent(confidence)} %"


def _percent(confidence: float) -> str:
    return f"{100 * confidence:g}"


@dataclass(frozen=True)
class Interval:
    r"""A point estimate and its two-sided confidence interval.

    Attributes:
        estimate: the statistic on the data as observed.
        low, high: the interval's bounds (NaN when it could not be computed).
        confidence: its nominal level, e.g. 0.95.
        n: the number of units the interval is over (models or seeds).
        method: ``"bca bootstrap"``, ``"percentile bootstrap"`` or ``"paired t"``.
        resamples: bootstrap resamples whose statistic was finite (0 for ``"paired t"``).
        dropped: bootstrap resamples left out because their statistic was not finite (for
            :math:`\tau`: a resample in which one sequence is constant).
    """

    estimate: float
    low: float
    high: float
    confidence: float
    n: int
    method: str
    resamples: int = 0
    dropped: int = 0

    def contains(self, value: float) -> bool:
        """``low <= value <= high`` (False when a bound is NaN)."""
        return bool(self.low <= value <= self.high)

    def format(self, digits: int = 3, signed: bool = True, unit: str = "models") -> str:
        """``+0.560 [+0.410, +0.690] (95 % CI, bca bootstrap, n = 40 models)``."""
        f = f"{{:{'+' if signed else ''}.{digits}f}}"
        return (
            f"{f.format(self.estimate)} [{f.format(self.low)}, {f.format(self.high)}] "
            f"({_percent(self.confidence)} % CI, {self.method}, n = {self.n} {unit})"
        )

    def to_dict(self) -> dict:
        return {
            "estimate": self.estimate, "low": self.low, "high": self.high,
            "confidence": self.confidence, "n": self.n, "method": self.method,
            "resamples": self.resamples, "dropped": self.dropped,
        }


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"Invalid confidence: {confidence} (allowed: 0 < confidence < 1)")


def bootstrap_interval(
    statistic: Callable[..., float],
    *samples: Sequence[float],
    n_resamples: int = 2000,
    confidence: float = 0.95,
    method: str = "bca",
    seed: int = 0,
    vectorized: bool = False,
) -> Interval:
    r"""Bootstrap confidence interval of ``statistic(*samples)``, the units resampled jointly.

    The ``samples`` are equal-length sequences, one value per unit (model); every resample draws
    :math:`n` unit indices with replacement and applies them to *all* samples, so a statistic of
    several samples (a difference of two :math:`\tau`) is paired.

    - ``method="percentile"``: the :math:`\alpha/2` and :math:`1-\alpha/2` quantiles of the
      resampled statistics :math:`\hat\theta^*_b`.
    - ``method="bca"``: the quantiles at
      :math:`\Phi\big(z_0 + (z_0 + z_q) / (1 - a (z_0 + z_q))\big)`, with the bias correction
      :math:`z_0 = \Phi^{-1}(\#\{\hat\theta^*_b < \hat\theta\} / B)` (ties counted half) and the
      acceleration :math:`a = \sum_i (\bar\theta_{(\cdot)} - \theta_{(i)})^3 /
      (6 [\sum_i (\bar\theta_{(\cdot)} - \theta_{(i)})^2]^{3/2})` from the jackknife
      :math:`\theta_{(i)}` (unit :math:`i` left out). Where these are undefined (every resample
      on one side of :math:`\hat\theta`, or a constant jackknife) the percentile interval is
      returned and ``method`` says so.

    Resamples whose statistic is not finite are left out and counted in ``dropped``.

    Args:
        statistic: maps the samples (1-d arrays) to a float; with ``vectorized=True`` it maps
            2-d arrays (one resample per row) to a 1-d array.
        samples: one or more sequences of the same length :math:`n \ge 2`.
        n_resamples: :math:`B`.
        confidence: the interval's level.
        method: ``"bca"`` or ``"percentile"``.
        seed: seeds the resampling (the same seed gives the same resamples for every call with
            the same :math:`n`: two intervals from one seed are on the same resamples).
        vectorized: see ``statistic``.

    References:
        B. Efron. Better Bootstrap Confidence Intervals. JASA, 1987.
    """
    from scipy.stats import norm

    _check_confidence(confidence)
    if method not in ("bca", "percentile"):
        raise ValueError(f"Invalid method: {method!r} (allowed: 'bca', 'percentile')")
    if n_resamples < 100:
        raise ValueError(f"Invalid n_resamples: {n_resamples} (allowed: >= 100)")
    if not samples:
        raise ValueError("Invalid samples: none given (allowed: one or more sequences)")
    arrays = [np.asarray(s, dtype=float) for s in samples]
    n = arrays[0].shape[0] if arrays[0].ndim == 1 else -1
    if any(a.ndim != 1 or a.shape[0] != n for a in arrays):
        raise ValueError(
            f"Invalid samples: must be 1-d sequences of the same length (got shapes "
            f"{[a.shape for a in arrays]})"
        )
    if n < 2:
        raise ValueError(f"Invalid samples: {n} units (allowed: at least 2)")

    def apply(index: np.ndarray) -> np.ndarray:  # index: (rows, k)
        if vectorized:
            return np.asarray(statistic(*(a[index] for a in arrays)), dtype=float)
        return np.array([statistic(*(a[row] for a in arrays)) for row in index], dtype=float)

    estimate = float(apply(np.arange(n)[None, :])[0])
    rng = np.random.default_rng(seed)
    boot = np.concatenate([
        apply(rng.integers(0, n, size=(min(500, n_resamples - start), n)))
        for start in range(0, n_resamples, 500)
    ])
    finite = boot[np.isfinite(boot)]
    dropped = int(boot.size - finite.size)
    alpha = 1.0 - confidence
    levels = np.array([alpha / 2, 1 - alpha / 2])
    used = "percentile bootstrap"
    if finite.size == 0 or not math.isfinite(estimate):
        return Interval(estimate, math.nan, math.nan, confidence, n, used, 0, dropped)
    if method == "bca":
        p0 = (np.sum(finite < estimate) + 0.5 * np.sum(finite == estimate)) / finite.size
        leave_out = np.array([np.delete(np.arange(n), i) for i in range(n)])
        jack = apply(leave_out)
        jack = jack[np.isfinite(jack)]
        d = jack.mean() - jack if jack.size >= 2 else np.zeros(1)
        denom = 6.0 * float(np.sum(d**2)) ** 1.5
        if 0.0 < p0 < 1.0 and denom > 0.0:
            z0 = norm.ppf(p0)
            a = float(np.sum(d**3)) / denom
            zq = norm.ppf(levels)
            adjusted = norm.cdf(z0 + (z0 + zq) / (1.0 - a * (z0 + zq)))
            if np.all(np.isfinite(adjusted)):
                levels = adjusted
                used = "bca bootstrap"
        if used != "bca bootstrap":
            used = "percentile bootstrap (bca undefined)"
    low, high = np.quantile(finite, levels)
    return Interval(estimate, float(low), float(high), confidence, n, used, int(finite.size),
                    dropped)


def _tau_b_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Kendall's :math:`\\tau_b` of each row of ``x`` with the same row of ``y`` (2-d arrays);
    NaN where a row is constant. Exact with ties (a resample's repeated units are tied pairs)."""
    out = np.empty(x.shape[0])
    for start in range(0, x.shape[0], 64):
        xs, ys = x[start:start + 64], y[start:start + 64]
        sx = np.sign(xs[:, :, None] - xs[:, None, :])
        sy = np.sign(ys[:, :, None] - ys[:, None, :])
        num = np.einsum("bij,bij->b", sx, sy)
        den = np.sqrt(np.abs(sx).sum(axis=(1, 2)) * np.abs(sy).sum(axis=(1, 2)))
        with np.errstate(invalid="ignore", divide="ignore"):
            out[start:start + 64] = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)
    return out


def _finite_pairs(*arrays: Sequence[float]) -> list[np.ndarray]:
    a = [np.asarray(x, dtype=float) for x in arrays]
    if any(x.ndim != 1 or x.shape != a[0].shape for x in a):
        raise ValueError(
            f"Invalid input: sequences must be 1-d and of the same length (got shapes "
            f"{[x.shape for x in a]})"
        )
    keep = np.logical_and.reduce([np.isfinite(x) for x in a])
    return [x[keep] for x in a]


def kendall_interval(
    x: Sequence[float], y: Sequence[float], n_resamples: int = 2000,
    confidence: float = 0.95, method: str = "bca", seed: int = 0,
) -> Interval:
    """Kendall's :math:`\\tau_b` of ``x`` and ``y`` with its bootstrap interval over the units
    (models), over the positions where both are finite. NaN bounds with fewer than 3 units.
    See :func:`bootstrap_interval`."""
    a, b = _finite_pairs(x, y)
    if a.size < 3:
        return Interval(kendall_tau(a, b).tau, math.nan, math.nan, confidence, int(a.size),
                        "too few units", 0, 0)
    return bootstrap_interval(_tau_b_rows, a, b, n_resamples=n_resamples,
                              confidence=confidence, method=method, seed=seed, vectorized=True)


def kendall_difference_interval(
    x_a: Sequence[float], x_b: Sequence[float], y: Sequence[float], n_resamples: int = 2000,
    confidence: float = 0.95, method: str = "bca", seed: int = 0,
) -> Interval:
    """:math:`\\tau(x_a, y) - \\tau(x_b, y)` with its *paired* bootstrap interval: both
    :math:`\\tau` on the same resample of the units (models where all three are finite).
    Example: ``x_a`` adaptive sharpness, ``x_b`` plain sharpness, ``y`` the gap."""
    a, b, g = _finite_pairs(x_a, x_b, y)
    if a.size < 3:
        est = kendall_tau(a, g).tau - kendall_tau(b, g).tau
        return Interval(est, math.nan, math.nan, confidence, int(a.size), "too few units", 0, 0)
    return bootstrap_interval(
        lambda u, v, w: _tau_b_rows(u, w) - _tau_b_rows(v, w), a, b, g,
        n_resamples=n_resamples, confidence=confidence, method=method, seed=seed, vectorized=True,
    )


def kendall_group_difference_interval(
    xs_a: Sequence[Sequence[float]], xs_b: Sequence[Sequence[float]], y: Sequence[float],
    reduce: str = "max", n_resamples: int = 2000, confidence: float = 0.95,
    method: str = "bca", seed: int = 0,
) -> Interval:
    """:math:`R_i \tau(x_{a,i}, y) - R_j \tau(x_{b,j}, y)` with its paired bootstrap interval,
    :math:`R` the maximum (``reduce="max"``) or the mean (``"mean"``) over the measures of a
    family (e.g. adaptive sharpness at three radii against plain sharpness at three radii).

    The reduction is redone inside every resample, so the interval of "the best radius of one
    family against the best of the other" accounts for choosing the best on the same models it
    is scored on. Units (models) where any measure or ``y`` is not finite are left out."""
    if reduce not in ("max", "mean"):
        raise ValueError(f"Invalid reduce: {reduce!r} (allowed: 'max', 'mean')")
    if not xs_a or not xs_b:
        raise ValueError("Invalid input: each family needs at least one measure")
    k = len(xs_a)
    arrays = _finite_pairs(*xs_a, *xs_b, y)
    g = arrays[-1]
    fn = np.max if reduce == "max" else np.mean

    def stat(*rows):
        w = rows[-1]
        ta = np.stack([_tau_b_rows(r, w) for r in rows[:k]])
        tb = np.stack([_tau_b_rows(r, w) for r in rows[k:-1]])
        with np.errstate(invalid="ignore"):
            return fn(ta, axis=0) - fn(tb, axis=0)

    if g.size < 3:
        est = float(stat(*(a[None, :] for a in arrays))[0]) if g.size >= 2 else math.nan
        return Interval(est, math.nan, math.nan, confidence, int(g.size), "too few units", 0, 0)
    return bootstrap_interval(stat, *arrays, n_resamples=n_resamples, confidence=confidence,
                              method=method, seed=seed, vectorized=True)


def paired_difference(
    a: Sequence[float], b: Sequence[float], confidence: float = 0.95
) -> Interval:
    r"""Mean of the paired differences :math:`d_i = a_i - b_i` (e.g. ASAM's and SAM's test
    accuracy on seed :math:`i`) with its paired :math:`t` interval

    .. math::
        \bar d \pm t_{n-1,\,1-\alpha/2}\; s_d / \sqrt{n}, \qquad
        s_d^2 = \tfrac{1}{n-1} \textstyle\sum_i (d_i - \bar d)^2.

    The honest interval for few seeds (see the module's docstring: a bootstrap of 3 to 10 values
    is too narrow). It assumes the differences are roughly normal; the pairing removes what a
    seed shares between the two runs (data order, initialization).

    Raises:
        ValueError: unequal lengths, fewer than 2 pairs, or a non-finite value.

    References:
        Student (W. S. Gosset). The Probable Error of a Mean. Biometrika, 1908.
    """
    from scipy.stats import t as student_t

    _check_confidence(confidence)
    x = np.asarray(a, dtype=float)
    z = np.asarray(b, dtype=float)
    if x.ndim != 1 or x.shape != z.shape:
        raise ValueError(
            f"Invalid input: a and b must be 1-d sequences of the same length (got shapes "
            f"{x.shape} and {z.shape})"
        )
    if x.size < 2:
        raise ValueError(f"Invalid input: {x.size} pairs (allowed: at least 2)")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(z))):
        raise ValueError(f"Invalid input: non-finite values in a={x.tolist()} or b={z.tolist()}")
    d = x - z
    n = int(d.size)
    mean = float(d.mean())
    half = float(student_t.ppf(0.5 + confidence / 2, n - 1) * d.std(ddof=1) / math.sqrt(n))
    return Interval(mean, mean - half, mean + half, confidence, n, "paired t")


def verdict(interval: Interval, higher_is_better: bool = True, null: float = 0.0) -> str:
    """``"better"``, ``"worse"`` or ``"not distinguishable at 95 %"`` for an interval of a
    difference (first minus second): *better* only if the whole interval lies on the better side
    of ``null`` (strictly), *worse* only if it lies wholly on the other; otherwise, and whenever
    a bound is NaN, not distinguishable at the interval's level.

    Args:
        interval: e.g. :func:`paired_difference` (accuracy A - B) or
            :func:`kendall_difference_interval` (τ adaptive - τ plain).
        higher_is_better: False for a difference of errors or losses.
        null: the value of no difference.
    """
    low, high = interval.low, interval.high
    if math.isnan(low) or math.isnan(high):
        return not_distinguishable(interval.confidence)
    if low > null:
        return BETTER if higher_is_better else WORSE
    if high < null:
        return WORSE if higher_is_better else BETTER
    return not_distinguishable(interval.confidence)


def verdict_sentence(
    first: str, second: str, quantity: str, interval: Interval,
    higher_is_better: bool = True, unit: str = "models", digits: int = 3,
) -> str:
    """One sentence from :func:`verdict`, with the figures it stands on, e.g.
    ``"ASAM is better than SAM in test accuracy at 95 %: difference +0.210 [+0.050, +0.370]
    (95 % CI, paired t, n = 5 seeds)."``"""
    v = verdict(interval, higher_is_better)
    figures = f"difference {interval.format(digits=digits, unit=unit)}"
    if v in (BETTER, WORSE):
        return (f"{first} is {v} than {second} in {quantity} at "
                f"{_percent(interval.confidence)} %: {figures}.")
    return f"{first} and {second} are {v} in {quantity}: {figures}."


__all__ = [
    "BETTER", "WORSE", "Interval", "KendallResult", "bootstrap_interval", "granulated_kendall",
    "kendall_difference_interval", "kendall_group_difference_interval", "kendall_interval",
    "kendall_tau", "not_distinguishable", "paired_difference", "verdict", "verdict_sentence",
]
