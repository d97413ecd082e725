r"""Rank correlation of a measure with the generalization gap.

Kendall's :math:`\tau` (the :math:`\tau_b` variant, which corrects for ties) between two
sequences :math:`x, y` of length :math:`n`:

.. math::
    \tau_b = \frac{n_c - n_d}{\sqrt{(n_0 - n_1)(n_0 - n_2)}}

with :math:`n_c` / :math:`n_d` the concordant / discordant pairs, :math:`n_0 = n(n-1)/2` and
:math:`n_1`, :math:`n_2` the pairs tied in :math:`x` and in :math:`y`. :math:`\tau = 1`: the
measure orders the models exactly as the gap does; :math:`-1`: exactly reversed.

The *granulated* coefficient of Jiang et al. (2020) averages :math:`\tau` over the groups of
models that differ in one hyperparameter only, then over the hyperparameters: a measure cannot
score well merely by tracking the one hyperparameter that moves the gap most.

References:
    M. G. Kendall. A New Measure of Rank Correlation. Biometrika, 1938.
    Y. Jiang, B. Neyshabur, H. Mobahi, D. Krishnan, S. Bengio. Fantastic Generalization
    Measures and Where to Find Them. ICLR 2020.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Hashable, Mapping, Sequence
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


__all__ = ["KendallResult", "granulated_kendall", "kendall_tau"]
