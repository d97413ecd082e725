"""samkit.stats: Kendall τ on rankings whose value is known by hand, and the granulated Ψ."""

import math

import numpy as np
import pytest

from samkit.stats import granulated_kendall, kendall_tau


def test_identical_and_reversed_rankings():
    assert kendall_tau([1, 2, 3, 4, 5], [10, 20, 30, 40, 50]).tau == pytest.approx(1.0)
    assert kendall_tau([1, 2, 3, 4, 5], [5, 4, 3, 2, 1]).tau == pytest.approx(-1.0)
    # only the order matters: any increasing transform gives the same τ
    x = np.array([0.3, 0.1, 0.7, 0.2, 0.9])
    y = np.array([3.0, 1.0, 2.0, 5.0, 4.0])
    assert kendall_tau(np.exp(x), y**3).tau == pytest.approx(kendall_tau(x, y).tau)


def test_known_values_counted_by_hand():
    # one swapped pair among 6: (5 concordant - 1 discordant) / 6
    r = kendall_tau([1, 2, 3, 4], [1, 3, 2, 4])
    assert r.tau == pytest.approx(4 / 6)
    assert r.n == 4
    # [1,2,3,4] vs [2,4,1,3]: concordant (1,2),(1,4),(3,4); discordant (1,3),(2,3),(2,4) -> 0
    assert kendall_tau([1, 2, 3, 4], [2, 4, 1, 3]).tau == pytest.approx(0.0)
    # exact two-sided p-value without ties: P(τ = ±1) for n = 4 is 2 / 4! = 1/12
    assert kendall_tau([1, 2, 3, 4], [1, 2, 3, 4]).pvalue == pytest.approx(1 / 12)


def test_ties_use_tau_b():
    # x = [1,1,2,3], y = [1,2,3,4]: n0 = 6, n1 = 1 tie in x, nc = 5, nd = 0
    r = kendall_tau([1, 1, 2, 3], [1, 2, 3, 4])
    assert r.tau == pytest.approx(5 / math.sqrt((6 - 1) * (6 - 0)))


def test_non_finite_values_are_left_out_and_degenerate_cases_are_nan():
    r = kendall_tau([1, 2, math.nan, 3, math.inf], [1, 2, 3, 4, 5])
    assert (r.tau, r.n) == (pytest.approx(1.0), 3)
    assert math.isnan(kendall_tau([1, 1, 1], [1, 2, 3]).tau)  # constant measure
    assert math.isnan(kendall_tau([1], [2]).tau)
    with pytest.raises(ValueError, match="same length"):
        kendall_tau([1, 2], [1, 2, 3])


def test_granulated_kendall():
    # two hyperparameters a, b on a 2x2 grid; the measure follows the gap within every group
    # that varies a, and is reversed within every group that varies b
    groups = [{"a": 0, "b": 0}, {"a": 1, "b": 0}, {"a": 0, "b": 1}, {"a": 1, "b": 1}]
    gap = [1.0, 2.0, 3.0, 4.0]
    measure = [2.0, 3.0, 1.0, 2.5]
    psi, per = granulated_kendall(measure, gap, groups)
    assert per == {"a": pytest.approx(1.0), "b": pytest.approx(-1.0)}
    assert psi == pytest.approx(0.0)
    with pytest.raises(ValueError, match="same length"):
        granulated_kendall([1.0], gap, groups)
