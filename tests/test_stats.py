"""samkit.stats: Kendall τ on rankings whose value is known by hand, the granulated Ψ, and the
confidence intervals and verdicts on constructed data with a known answer."""

import math

import numpy as np
import pytest

from samkit.stats import (
    BETTER,
    WORSE,
    Interval,
    bootstrap_interval,
    granulated_kendall,
    kendall_difference_interval,
    kendall_group_difference_interval,
    kendall_interval,
    kendall_tau,
    not_distinguishable,
    paired_difference,
    verdict,
    verdict_sentence,
)


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


# --- confidence intervals and verdicts ------------------------------------------------------



def test_paired_t_interval_by_hand():
    # d = [1, 2, 3]: mean 2, s_d = 1, t_{2, 0.975} = 4.302652729749464 (tables)
    r = paired_difference([11.0, 12.0, 13.0], [10.0, 10.0, 10.0])
    half = 4.302652729749464 / math.sqrt(3)
    assert (r.estimate, r.low, r.high) == (pytest.approx(2.0), pytest.approx(2 - half),
                                          pytest.approx(2 + half))
    assert (r.n, r.method) == (3, "paired t")
    # the pairing matters: a shared per-seed offset cancels, the unpaired spread would not
    rng = np.random.default_rng(0)
    offset = rng.normal(0, 5.0, size=5)
    r = paired_difference(80 + offset + 0.3, 80 + offset)
    assert r.low == pytest.approx(0.3) and r.high == pytest.approx(0.3)
    with pytest.raises(ValueError, match="at least 2"):
        paired_difference([1.0], [2.0])
    with pytest.raises(ValueError, match="non-finite"):
        paired_difference([1.0, math.nan], [2.0, 3.0])
    with pytest.raises(ValueError, match="confidence"):
        paired_difference([1.0, 2.0], [2.0, 3.0], confidence=95)


def test_paired_t_coverage_is_nominal_with_five_seeds():
    # 2000 simulated 5-seed experiments with a true difference of 0.2: the 95 % t interval
    # covers it in ~95 % of them (binomial sd 0.5 %)
    rng = np.random.default_rng(1)
    hits = 0
    for _ in range(2000):
        a = rng.normal(0.2, 0.3, size=5)
        hits += paired_difference(a, np.zeros(5)).contains(0.2)
    assert 0.93 < hits / 2000 < 0.97


@pytest.mark.parametrize("method", ["percentile", "bca"])
def test_bootstrap_mean_matches_the_normal_interval(method):
    rng = np.random.default_rng(2)
    x = rng.normal(3.0, 2.0, size=400)
    r = bootstrap_interval(np.mean, x, method=method, n_resamples=4000)
    half = 1.96 * x.std(ddof=1) / math.sqrt(x.size)
    assert r.estimate == pytest.approx(x.mean())
    assert r.low == pytest.approx(x.mean() - half, abs=0.05 * half + 0.02)
    assert r.high == pytest.approx(x.mean() + half, abs=0.05 * half + 0.02)
    assert r.method == f"{method} bootstrap" and r.n == 400 and r.resamples == 4000
    # vectorized and per-resample statistics give the same interval from the same seed
    v = bootstrap_interval(lambda a: a.mean(axis=1), x, method=method, n_resamples=4000,
                           vectorized=True)
    assert (v.low, v.high) == (pytest.approx(r.low), pytest.approx(r.high))


def test_bca_corrects_a_skewed_statistic_like_scipy():
    # BCa on the variance of a skewed sample agrees with scipy's implementation
    from scipy.stats import bootstrap

    rng = np.random.default_rng(3)
    x = rng.exponential(size=60)
    ours = bootstrap_interval(lambda a: a.var(ddof=1), x, n_resamples=20000, method="bca")
    ref = bootstrap((x,), lambda a, axis: a.var(ddof=1, axis=axis), n_resamples=20000,
                    method="BCa", random_state=0).confidence_interval
    assert ours.low == pytest.approx(ref.low, rel=0.05)
    assert ours.high == pytest.approx(ref.high, rel=0.05)
    pct = bootstrap_interval(lambda a: a.var(ddof=1), x, n_resamples=20000, method="percentile")
    assert ours.high > pct.high  # the right skew moves BCa's bounds up


def test_kendall_interval_rows_match_scipy_with_ties():
    rng = np.random.default_rng(4)
    x = rng.normal(size=25)
    y = x + rng.normal(size=25)
    from samkit.stats import _tau_b_rows

    idx = rng.integers(0, 25, size=(7, 25))  # resamples: repeated units are ties
    rows = _tau_b_rows(x[idx], y[idx])
    for i in range(7):
        assert rows[i] == pytest.approx(kendall_tau(x[idx[i]], y[idx[i]]).tau)
    r = kendall_interval(x, y)
    assert r.estimate == pytest.approx(kendall_tau(x, y).tau)
    assert r.low < r.estimate < r.high and r.n == 25


def test_kendall_difference_is_paired():
    # two measures that share most of their noise: the paired interval of the difference is
    # much narrower than either τ's interval
    rng = np.random.default_rng(5)
    gap = rng.normal(size=60)
    shared = gap + rng.normal(size=60)
    a = shared + 0.05 * rng.normal(size=60)
    b = shared + 0.05 * rng.normal(size=60)
    d = kendall_difference_interval(a, b, gap)
    ia, ib = kendall_interval(a, gap), kendall_interval(b, gap)
    assert d.estimate == pytest.approx(ia.estimate - ib.estimate)
    assert d.high - d.low < 0.5 * (ia.high - ia.low)
    assert verdict(d) == not_distinguishable()
    # non-finite positions are left out of all three
    a2 = np.append(a, math.nan)
    d2 = kendall_difference_interval(a2, np.append(b, 1.0), np.append(gap, 0.0))
    assert d2.n == 60 and d2.estimate == pytest.approx(d.estimate)


def test_verdicts_on_constructed_data_with_known_answers():
    rng = np.random.default_rng(6)
    # accuracy over 5 seeds: A clearly better, clearly worse, and indistinguishable from B
    base = 83.0 + rng.normal(0, 0.5, size=5)
    better = paired_difference(base + 1.0 + rng.normal(0, 0.05, size=5), base)
    worse = paired_difference(base - 1.0 + rng.normal(0, 0.05, size=5), base)
    # differences of both signs, mean 0.01 and spread 0.25: zero lies well inside the interval
    same = paired_difference(base + np.array([-0.3, 0.2, 0.1, -0.2, 0.25]), base)
    assert verdict(better) == BETTER == "better"
    assert verdict(worse) == WORSE == "worse"
    assert verdict(same) == "not distinguishable at 95 %"
    # lower is better (errors): the verdict flips
    assert verdict(better, higher_is_better=False) == WORSE
    # τ over models: a measure that orders the gap against one that is noise, and two copies
    gap = rng.normal(size=80)
    good = gap + 0.3 * rng.normal(size=80)
    noise = rng.normal(size=80)
    assert verdict(kendall_difference_interval(good, noise, gap)) == BETTER
    assert verdict(kendall_difference_interval(noise, good, gap)) == WORSE
    twin = good + 1e-3 * rng.normal(size=80)
    assert verdict(kendall_difference_interval(good, twin, gap)) == not_distinguishable()
    # a bound at zero or NaN is never a verdict
    assert verdict(Interval(0.1, 0.0, 0.2, 0.95, 5, "paired t")) == not_distinguishable()
    assert verdict(Interval(0.1, math.nan, 0.2, 0.9, 5, "x")) == "not distinguishable at 90 %"


def test_verdict_sentence_carries_the_figures():
    r = paired_difference([84.0, 84.2, 84.1], [83.0, 83.1, 83.2])
    s = verdict_sentence("ASAM", "SAM", "test accuracy", r, unit="seeds", digits=2)
    assert s.startswith("ASAM is better than SAM in test accuracy at 95 %: difference +1.00 [")
    assert "paired t, n = 3 seeds" in s
    s = verdict_sentence("A", "B", "τ", Interval(0.0, -0.1, 0.1, 0.95, 40, "bca bootstrap"))
    assert s.startswith("A and B are not distinguishable at 95 % in τ")


def test_bootstrap_input_errors_and_degenerate_cases():
    with pytest.raises(ValueError, match="method"):
        bootstrap_interval(np.mean, [1.0, 2.0], method="basic")
    with pytest.raises(ValueError, match="same length"):
        bootstrap_interval(lambda a, b: 0.0, [1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="at least 2"):
        bootstrap_interval(np.mean, [1.0])
    # constant data: every resample equals the estimate, BCa is undefined -> percentile
    r = bootstrap_interval(np.mean, [2.0] * 10)
    assert (r.low, r.high) == (2.0, 2.0) and r.method == "percentile bootstrap (bca undefined)"
    # τ with 3 units: many resamples are constant; they are counted, not ranked
    r = kendall_interval([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
    assert r.dropped > 0 and r.resamples + r.dropped == 2000
    assert math.isnan(kendall_interval([1.0, 2.0], [1.0, 2.0]).low)


def test_group_difference_selects_inside_every_resample():
    rng = np.random.default_rng(7)
    gap = rng.normal(size=50)
    good = [gap + s * rng.normal(size=50) for s in (0.3, 0.5, 1.0)]
    noise = [rng.normal(size=50) for _ in range(3)]
    best = kendall_group_difference_interval(good, noise, gap, reduce="max")
    mean = kendall_group_difference_interval(good, noise, gap, reduce="mean")
    taus_g = [kendall_tau(x, gap).tau for x in good]
    taus_n = [kendall_tau(x, gap).tau for x in noise]
    assert best.estimate == pytest.approx(max(taus_g) - max(taus_n))
    assert mean.estimate == pytest.approx(np.mean(taus_g) - np.mean(taus_n))
    assert verdict(best) == BETTER and verdict(mean) == BETTER
    # one measure per family: the plain paired difference
    one = kendall_group_difference_interval([good[0]], [noise[0]], gap)
    ref = kendall_difference_interval(good[0], noise[0], gap)
    assert (one.estimate, one.low, one.high) == pytest.approx((ref.estimate, ref.low, ref.high))
    # the same family against itself: the best-of-three difference is 0 in every resample
    same = kendall_group_difference_interval(good, good, gap)
    assert (same.low, same.high) == (0.0, 0.0) and verdict(same) == not_distinguishable()
    with pytest.raises(ValueError, match="reduce"):
        kendall_group_difference_interval(good, noise, gap, reduce="min")
