"""samkit.measures: the measures of a trained classifier, rescaling, evaluation."""

import math

import pytest
import torch
import torch.nn.functional as F

from samkit.experiments.correlate import QUICK
from samkit.measures import evaluate, measure_model, measures, rescale_relu
from samkit.models import create_model


def test_rescaled_relu_model_same_function_same_adaptive_sharpness():
    torch.manual_seed(0)
    model = create_model("mlp", (20,), 5, depth=2, width=16)
    x, y = torch.randn(64, 20), torch.randint(0, 5, (64,))
    cfg = QUICK.replace(rhos_l2=(0.05,), rhos_linf=(0.002,), adaptive_rhos_l2=(0.5,),
                          adaptive_rhos_linf=(0.02,), steps=3, trace_samples=4)
    copy = rescale_relu(model, 10.0)
    torch.testing.assert_close(copy(x), model(x), rtol=1e-5, atol=1e-5)
    a = measure_model(model, (x, y), cfg)
    b = measure_model(copy, (x, y), cfg)
    for key in ("adaptive_l2_rho0.5", "adaptive_linf_rho0.02"):
        assert a[key] > 1e-4
        assert b[key] == pytest.approx(a[key], rel=1e-4)
    for key in ("sharpness_l2_rho0.05", "sharpness_linf_rho0.002", "lambda_max", "trace"):
        assert not math.isclose(b[key], a[key], rel_tol=0.05), key
    with pytest.raises(ValueError, match="Invalid alpha"):
        rescale_relu(model, 0.0)
    with pytest.raises(ValueError, match="Invalid layer"):
        rescale_relu(model, 2.0, layer=2)


def test_measures_follow_the_settings():
    cfg = QUICK.replace(rhos_l2=(0.1, 0.2), rhos_linf=(), lambda_max=False, trace=False)
    assert [m.key for m in measures(cfg)] == [
        "sharpness_l2_rho0.1", "sharpness_l2_rho0.2", "adaptive_l2_rho1", "adaptive_linf_rho0.01"]


class _Split:
    def __init__(self, x, y):
        self.x, self.y = x, y


def test_evaluate_matches_a_float64_reference():
    torch.manual_seed(0)
    model = create_model("mlp", (12,), 4, depth=1, width=8, dropout=0.5)
    model.train()
    x, y = torch.randn(250, 12), torch.randint(0, 4, (250,))
    loss, acc = evaluate(model, _Split(x, y), batch_size=64)
    assert model.training  # its mode is restored
    model.eval()
    with torch.no_grad():
        logits = model(x).double()
    assert loss == pytest.approx(float(F.cross_entropy(logits, y)), rel=1e-6)
    assert acc == pytest.approx(float((logits.argmax(-1) == y).double().mean()))
    with pytest.raises(ValueError, match="Invalid batch_size: 0"):
        evaluate(model, _Split(x, y), batch_size=0)


def test_evaluate_counts_every_token_of_a_sequence():
    class PerToken(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.one_hot(x, 3).float() * 5.0

    x = torch.tensor([[0, 1, 2], [2, 2, 2]])
    y = torch.tensor([[0, 1, 1], [2, 2, 2]])
    loss, acc = evaluate(PerToken(), _Split(x, y), device="cpu")
    assert acc == pytest.approx(5 / 6)
    assert math.isfinite(loss)


# --- presets, average-case and m-sharpness measures, error increase, logit normalization ----

from samkit.experiments.correlate import DEFAULT, apply_preset, preset_changes  # noqa: E402
from samkit.measures import PRESETS, LogitNormalization, cache_key  # noqa: E402


def test_presets_set_the_measures_and_the_default_is_kwon2021():
    assert DEFAULT.preset == "kwon2021" and preset_changes(DEFAULT) == {}
    cfg = apply_preset(DEFAULT, "andriushchenko2023")
    assert (cfg.m, cfg.measure_examples, cfg.steps, cfg.starts, cfg.eta) == (128, 1024, 19, 1,
                                                                             0.0)
    keys = [m.key for m in measures(cfg)]
    assert "adaptive_avg_gauss_sigma0.4" in keys and "avg_unif_sigma0.04" in keys
    assert "adaptive_linf_rho0.02_err" in keys and "adaptive_avg_gauss_sigma0.4_err" in keys
    # 12 worst-case + 12 average-case, each with its error increase, then λ₁ and the trace
    assert len(keys) == 2 * 24 + 2
    ms = [m for m in measures(cfg)]
    assert len({cache_key(m, cfg) for m in ms if m.quantity == "loss"}) == 26
    assert preset_changes(cfg.replace(m=64)) == {"m": 64}
    with pytest.raises(ValueError, match="Invalid measures"):
        apply_preset(DEFAULT, "foret2021")
    with pytest.raises(ValueError, match="Invalid preset"):
        DEFAULT.replace(preset="x")
    assert set(PRESETS) == {"kwon2021", "andriushchenko2023"}


def test_andriushchenko_measures_error_increase_and_invariance():
    torch.manual_seed(0)
    model = create_model("mlp", (20,), 5, depth=2, width=16)
    x = torch.randn(64, 20)
    with torch.no_grad():
        y = model(x).argmax(1)
    cfg = apply_preset(QUICK, "andriushchenko2023").replace(
        m=32, steps=2, rhos_l2=(0.1,), rhos_linf=(), adaptive_rhos_l2=(1.0,),
        adaptive_rhos_linf=(), avg_sigmas=(0.05,), avg_sigmas_uniform=(),
        adaptive_avg_sigmas=(0.5,), adaptive_avg_sigmas_uniform=(0.5,), lambda_max=False,
        trace=False)
    a = measure_model(model, (x, y), cfg)
    assert set(a) == {m.key for m in measures(cfg)}
    for key in ("sharpness_l2_rho0.1", "adaptive_l2_rho1", "avg_gauss_sigma0.05",
                "adaptive_avg_gauss_sigma0.5"):
        assert a[key] > 0 and a[f"{key}_err"] >= 0  # error 0 at w: it can only rise
    # adaptive average-case sharpness (η = 0, the same seeded draws) is scale-invariant
    b = measure_model(rescale_relu(model, 10.0), (x, y), cfg)
    for key in ("adaptive_avg_gauss_sigma0.5", "adaptive_avg_unif_sigma0.5", "adaptive_l2_rho1"):
        assert b[key] == pytest.approx(a[key], rel=1e-3), key
    assert not math.isclose(b["avg_gauss_sigma0.05"], a["avg_gauss_sigma0.05"], rel_tol=0.05)
    # logit normalization: the same predictions, other (bounded-logit) sharpness values
    wrapped = LogitNormalization(model)
    assert torch.equal(wrapped(x).argmax(1), model(x).argmax(1))
    torch.testing.assert_close(wrapped(x).norm(dim=1), torch.ones(64))
    c = measure_model(model, (x, y), cfg.replace(normalize_logits=True))
    assert c["adaptive_l2_rho1"] != pytest.approx(a["adaptive_l2_rho1"], rel=0.05)
    assert cache_key(measures(cfg)[0], cfg.replace(normalize_logits=True)).endswith(
        "|logitnorm|with_error")
