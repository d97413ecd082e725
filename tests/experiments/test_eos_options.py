"""samkit eos's options: the long-bartlett preset (loss, init, preprocessing), --data-seed, --k,
measuring on the current minibatch, full-batch Adam."""

import argparse
import json

import pytest
import torch

from samkit.experiments import eos
from samkit.experiments.eos import EOSConfig, glorot_normal_, make_loss
from samkit.stability import adam_edge, sam_edge


def _args(argv):
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    eos.add_parser(sub)
    return parser.parse_args(["eos", *argv])


def test_mean_squared_error_is_long_bartletts():
    torch.manual_seed(0)
    out, y = torch.randn(7, 10, dtype=torch.float64), torch.randint(0, 10, (7,))
    target = torch.nn.functional.one_hot(y, 10).double()
    # optax.squared_error(logits, onehot) then jnp.mean: over classes and examples
    expected = ((out - target) ** 2).sum() / (7 * 10)
    assert make_loss("mse-mean")(out, y).item() == pytest.approx(expected.item(), rel=1e-12)
    # 1/5 of Cohen's ½ Σ_classes with 10 classes
    assert make_loss("mse-mean")(out, y).item() == pytest.approx(
        make_loss("mse")(out, y).item() / 5, rel=1e-12)


def test_glorot_normal_init():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(600, 400), torch.nn.ReLU(),
                                torch.nn.Linear(400, 10))
    glorot_normal_(model)
    w = model[0].weight
    # 240,000 draws: the sample std is within 1 % of sqrt(2/(fan_in + fan_out))
    assert w.std().item() == pytest.approx((2 / 1000) ** 0.5, rel=0.01)
    assert abs(w.mean().item()) < 3 * (2 / 1000) ** 0.5 / 240_000 ** 0.5 * 3
    assert model[2].weight.std().item() == pytest.approx((2 / 410) ** 0.5, rel=0.05)
    assert all((m.bias == 0).all() for m in (model[0], model[2]))


def test_centring_only_preprocessing_and_data_seed():
    device = torch.device("cpu")
    centred = eos.load_data(EOSConfig(dataset="synthetic", subset=200, preprocess="center"),
                            device)
    standard = eos.load_data(EOSConfig(dataset="synthetic", subset=200), device)
    assert centred.x.mean(0).abs().max().item() < 1e-5
    # centring only: the spread is the raw one, not 1 per feature
    assert not torch.allclose(centred.x.std(0), torch.ones(centred.x.shape[1]), atol=0.05)
    assert torch.allclose(standard.x.std(0), torch.ones(standard.x.shape[1]), atol=0.05)
    other = eos.load_data(EOSConfig(dataset="synthetic", subset=200, data_seed=1), device)
    assert not torch.equal(other.x, standard.x)
    assert eos.config_from_args(_args(["--data-seed", "3"])).data_seed == 3


def test_preset_under_the_flags():
    c = eos.config_from_args(_args(["--preset", "long-bartlett"]))
    assert (c.loss, c.init, c.preprocess, c.preset) == ("mse-mean", "glorot-normal", "center",
                                                        "long-bartlett")
    assert c.model_kwargs == {"depth": 3, "width": 100, "activation": "relu"}
    assert c.rhos == (0.1,) and c.batch_size == 0 and c.dataset == "fashion-mnist"
    c = eos.config_from_args(_args(["--preset", "long-bartlett", "--width", "20", "--lr",
                                    "0.3", "--k", "3"]))
    assert c.model_kwargs["width"] == 20 and c.model_kwargs["depth"] == 3
    assert c.lrs == (0.3,) and c.k == 3 and c.loss == "mse-mean"
    with pytest.raises(SystemExit):
        _args(["--preset", "nope"])
    for key, value in (("init", "he"), ("preprocess", "whiten"), ("measure_on", "all"),
                       ("optimizer", "lbfgs"), ("k", 0), ("preset", "x")):
        with pytest.raises(ValueError, match=f"Invalid {key}"):
            EOSConfig(**{key: value})


def test_top_k_and_preset_smoke(tmp_path):
    argv = ["--preset", "long-bartlett", "--dataset", "synthetic", "--subset", "64",
            "--width", "12", "--steps", "4", "--every", "2", "--budget", "none",
            "--k", "2", "--no-gd", "--out-dir",  # the SAM run only: the one checked
            str(tmp_path), "--name", "lb", "--threads", "1", "--quiet"]
    assert eos.main(argv) == 0
    rows = [json.loads(line) for line in (tmp_path / "lb/sam-lr0.8-rho0.1/edge.jsonl").open()]
    assert [r["step"] for r in rows] == [0, 2, 4]
    assert all(len(r["eigenvalues"]) == 2 and r["eigenvalues"][0] == r["lambda1"]
               >= r["eigenvalues"][1] for r in rows)
    config = json.loads((tmp_path / "lb/config.json").read_text())
    assert config["preset"] == "long-bartlett" and config["loss"] == "mse-mean"


def test_transformer_measured_on_the_current_minibatch(tmp_path):
    text = tmp_path / "input.txt"
    text.write_text("to be or not to be, that is the question. " * 40)
    argv = ["--text", str(text), "--seq-len", "8", "--batch-size", "8", "--width", "16",
            "--depth", "1", "--steps", "3", "--every", "1", "--budget", "none",
            "--lr", "0.1", "--rho", "0.05",
            "--no-gd", "--measure-on", "batch", "--out-dir", str(tmp_path), "--name", "mb",
            "--quiet", "--threads", "1"]
    assert eos.main(argv) == 0
    run = tmp_path / "mb/sam-lr0.1-rho0.05"
    rows = [json.loads(line) for line in (run / "edge.jsonl").open()]
    train = [json.loads(line) for line in (run / "train.jsonl").open()]
    for r, t in zip(rows, train, strict=False):
        # the loss and ‖g‖ at w_t on the step's own minibatch: the ones the step saw
        assert r["loss"] == pytest.approx(t["loss"], rel=1e-5)
        assert r["grad_norm"] == pytest.approx(t["grad_norm"], rel=1e-4)
        assert r["edge"] == pytest.approx(sam_edge(0.1, 0.05, r["grad_norm"]))
        assert "batch_grad_norm" not in r
    assert len({r["loss"] for r in rows}) == len(rows)  # a different batch every step


def test_adam_runs_against_the_preconditioned_edge(tmp_path):
    argv = ["--dataset", "synthetic", "--subset", "64", "--width", "12", "--steps", "4",
            "--every", "2", "--budget", "none",
            "--optimizer", "adam", "--lr", "0.01", "--beta1", "0.8",
            "--out-dir", str(tmp_path), "--name", "adam", "--threads", "1", "--quiet"]
    assert eos.main(argv) == 0
    summary = json.loads((tmp_path / "adam/summary.json").read_text())
    assert [r["label"] for r in summary["runs"]] == ["adam-lr0.01"]
    rows = [json.loads(line) for line in (tmp_path / "adam/adam-lr0.01/edge.jsonl").open()]
    assert rows[0]["lambda1_precond"] is None  # no preconditioner before Adam's first step
    for r in rows[1:]:
        assert r["edge"] == pytest.approx(adam_edge(0.01, 0.8))
        assert r["ratio"] == pytest.approx(r["lambda1_precond"] / r["edge"])
    assert (tmp_path / "adam/adam-lr0.01/eos.png").exists()


def test_asam_is_judged_by_the_effective_hessian(tmp_path):
    argv = ["--dataset", "synthetic", "--subset", "64", "--width", "8", "--steps", "4",
            "--every", "2", "--budget", "none",
            "--ascent", "asam", "--rho", "0.5", "--no-gd", "--out-dir",
            str(tmp_path), "--name", "asam", "--threads", "1", "--quiet"]
    assert eos.main(argv) == 0
    summary = json.loads((tmp_path / "asam/summary.json").read_text())["runs"][0]
    rows = [json.loads(line) for line in (tmp_path / "asam/asam-lr0.1-rho0.5/edge.jsonl").open()]
    assert all(r["edge"] is None and r["base_edge"] == pytest.approx(20.0) for r in rows)
    assert all(r["eff_ratio"] == pytest.approx(r["lambda_eff"] / 20.0) for r in rows)
    # no closed form: the verdict on λ₁/edge says so; the effective Hessian's is there
    assert "no measurement" in summary["verdict"] and summary["eff_verdict"]
    late = [r["eff_ratio"] for r in rows if r["step"] >= 2]  # the second half: steps 2, 4
    assert summary["median_eff_ratio"] == pytest.approx(sum(late) / len(late))
