"""The eos diagnostics on synthetic λ₁/edge traces: reached, stayed, left, above, never."""

import pytest

from samkit.experiments.eos_report import EDGE_BAND, diagnose, excess_with_rho


def _rows(ratios, losses=None, every=10):
    losses = losses or [1.0 / (i + 1) for i in range(len(ratios))]
    return [{"step": every * i, "ratio": r, "loss": loss}
            for i, (r, loss) in enumerate(zip(ratios, losses, strict=True))]


def test_reached_and_left_like_gd_with_cross_entropy():
    # sharpens, crosses at step 40, overshoots to 1.075, then decays away from the edge
    ratios = [0.3, 0.5, 0.7, 0.85, 0.95, 1.075, 1.02, 0.97, 0.8, 0.65, 0.5]
    d = diagnose(_rows(ratios))
    assert d["first_crossing_step"] == 40
    assert d["max_ratio"] == pytest.approx(1.075) and d["max_ratio_step"] == 50
    # from step 40 on: 0.95, 1.02, 0.97 in [0.9, 1.1]; 1.075 too -> 4 of 7
    assert d["fraction_at_edge_after_crossing"] == pytest.approx(4 / 7)
    assert d["last_step_at_edge"] == 70
    assert d["left_edge"] and not d["excess"]
    assert "reached the edge at step 40" in d["verdict"]
    assert "left it after step 70 as the loss fell" in d["verdict"]
    assert "57 %" in d["verdict"]


def test_stays_at_the_edge():
    d = diagnose(_rows([0.5, 0.92, 1.05, 0.98, 1.01, 0.95, 1.08]))
    assert d["first_crossing_step"] == 10
    assert d["fraction_at_edge_after_crossing"] == 1.0
    assert d["last_step_at_edge"] == 60 and not d["left_edge"] and not d["excess"]
    assert "at it 100 %" in d["verdict"] and "left" not in d["verdict"]


def test_systematic_excess_is_not_at_the_edge():
    # λ₁ 28 % above the edge: the old [0.8, 1.3] band called this "at the edge"
    d = diagnose(_rows([1.5, 1.3, 1.25, 1.28, 1.3, 1.27]))
    assert d["first_crossing_step"] == 0 and d["excess"]
    assert d["median_ratio_after_crossing"] == pytest.approx(1.29)
    assert d["fraction_at_edge_after_crossing"] == 0.0 and d["last_step_at_edge"] is None
    assert d["fraction_above_after_crossing"] == 1.0
    assert d["verdict"].startswith("started above the edge")
    assert "systematic excess" in d["verdict"]


def test_never_reached_and_no_ratio():
    d = diagnose(_rows([0.2, 0.4, 0.6, 0.7, 0.85]))
    assert d["first_crossing_step"] is None and d["fraction_at_edge_after_crossing"] is None
    assert d["last_step_at_edge"] is None and d["max_ratio"] == pytest.approx(0.85)
    assert d["verdict"].startswith("never reached the edge")
    empty = diagnose([{"step": 0, "ratio": None}, {"step": 1, "ratio": float("nan")}])
    assert empty["max_ratio"] is None and "no measurement" in empty["verdict"]


def test_band_is_stated_and_used():
    assert EDGE_BAND == (0.9, 1.1)
    rows = _rows([0.5, 0.85, 0.86, 0.84, 0.83])
    assert diagnose(rows)["first_crossing_step"] is None
    assert diagnose(rows, band=(0.8, 1.2))["first_crossing_step"] == 10
    assert diagnose(rows)["band"] == [0.9, 1.1]


def _summary(rho, ratio, lr=0.1):
    return {"lr": lr, "rho": rho, "optimizer": "sam" if rho else "sgd",
            "median_ratio_after_crossing": ratio}


def test_excess_growing_with_rho_is_reported():
    notes = excess_with_rho([_summary(None, 1.0), _summary(0.03, 1.04), _summary(0.3, 1.28),
                             _summary(0.1, 1.09)])
    assert len(notes) == 1
    assert "grows with ρ" in notes[0] and "1.04 at ρ = 0.03, 1.09 at ρ = 0.1, 1.28 at ρ = 0.3" \
        in notes[0]
    # not growing, or not above 1: nothing to report
    assert excess_with_rho([_summary(0.03, 1.2), _summary(0.1, 1.1)]) == []
    assert excess_with_rho([_summary(0.03, 0.97), _summary(0.1, 1.09)]) == []
    assert excess_with_rho([_summary(0.1, 1.3)]) == []
    diverged = {**_summary(0.3, 5.4), "diverged": True}  # not a measurement of the edge
    assert excess_with_rho([_summary(0.03, 1.1), _summary(0.1, 1.2), diverged])[0].endswith(
        "1.10 at ρ = 0.03, 1.20 at ρ = 0.1): a systematic excess over the closed-form edge")


def test_summary_reads_the_effective_hessian_rows():
    from samkit.experiments.eos import RunResult, RunSpec
    from samkit.experiments.eos_report import summarize

    spec = RunSpec("asam-lr0.1-rho0.5", "asam", 0.1, 0.5)
    eff = [0.5, 0.95, 1.02, 0.99, 0.7]
    rows = [{"step": 10 * i, "lambda1": 3.0, "grad_norm": 1.0, "edge": None, "ratio": None,
             "lambda_eff": 20.0 * e, "base_edge": 20.0, "eff_ratio": e, "loss": 1.0 / (i + 1)}
            for i, e in enumerate(eff)]
    run = RunResult(spec, rows, [{"step": 0, "loss": 1.0, "grad_norm": 1.0}], False, 1.0, 0.5, 7)
    s = summarize(run, steps=40)
    assert s["max_ratio"] is None and "no measurement" in s["verdict"]  # no closed form
    assert s["median_eff_ratio"] == pytest.approx(0.99) and s["base_edge"] == 20.0
    assert s["eff_first_crossing_step"] == 10 and s["eff_last_step_at_edge"] == 30
    assert s["eff_left_edge"] and s["eff_fraction_at_edge_after_crossing"] == pytest.approx(0.75)


def test_two_over_eta_is_left_out_where_it_squeezes_the_axis():
    from samkit.experiments.eos_report import squeezes

    assert squeezes(40.0, [9.7, 8.0, None, float("nan")])  # SAM at η = 0.05: λ₁ ≈ 10
    assert not squeezes(20.0, [15.0, 21.0])  # GD at its edge
    assert not squeezes(20.0, [])


def test_too_few_measurements_get_no_verdict():
    """`samkit eos --text ... --steps 100` measured once and called it "a systematic excess":
    under MIN_MEASUREMENTS finite ratios there is no verdict, no "in band", no excess note."""
    from samkit.experiments.eos import RunResult, RunSpec
    from samkit.experiments.eos_report import MIN_MEASUREMENTS, summarize

    assert MIN_MEASUREMENTS == 5
    d = diagnose(_rows([1.3]))
    assert d["verdict"].startswith("too few measurements (1) for a verdict")
    assert d["too_few"] and not d["excess"] and d["first_crossing_step"] is None
    assert d["max_ratio"] == pytest.approx(1.3)  # the number measured is still reported
    four = diagnose(_rows([1.3, 1.28, 1.31, 1.29]))
    assert "too few measurements (4)" in four["verdict"] and not four["excess"]
    assert not diagnose(_rows([1.3, 1.28, 1.31, 1.29, 1.3]))["too_few"]
    spec = RunSpec("sam-lr0.5-rho0.05", "sam", 0.5, 0.05)
    rows = [{"step": 0, "lambda1": 13.0, "grad_norm": 1.0, "edge": 10.0, "ratio": 1.3}]
    s = summarize(RunResult(spec, rows, [{"step": 0, "loss": 1.0, "grad_norm": 1.0}], False,
                            1.0, 0.5, 7), steps=100)
    assert s["at_edge"] is None and "systematic excess" not in s["verdict"]
    assert excess_with_rho([{**s, "rho": 0.02}, {**s, "rho": 0.1}]) == []
