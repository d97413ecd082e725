"""``samkit eos``: config checks, the loss, the table's numbers, and smoke runs writing the JSONL
rows and the figures (images full batch; the character Transformer with minibatch SAM)."""

import json
import math

import pytest
import torch
from realdata import require_fashion_mnist

from samkit.experiments import eos
from samkit.experiments.eos import EOSConfig, RunResult, RunSpec, make_loss, run_specs, summarize
from samkit.stability import sam_edge


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"loss": "l1"}, "Invalid loss"),
        ({"lrs": ()}, "Invalid lrs"),
        ({"lrs": (0.1, -1.0)}, "Invalid lrs"),
        ({"rhos": (0.0,)}, "Invalid rhos"),
        ({"gd": False, "rhos": ()}, "Nothing to run"),
        ({"steps": 0}, "Invalid steps"),
        ({"every": 0}, "Invalid every"),
        ({"momentum": 1.0}, "Invalid momentum"),
        ({"ascent": "esam"}, "Invalid ascent"),  # asam, gsam, fishersam are allowed now
        ({"subset": 0}, "Invalid subset"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EOSConfig(**kwargs)


def test_square_loss_is_cohens():
    """½ Σ over classes of (f − onehot)², mean over examples (and over tokens)."""
    out = torch.randn(5, 3, dtype=torch.float64)
    y = torch.tensor([0, 2, 1, 1, 0])
    target = torch.nn.functional.one_hot(y, 3).double()
    expect = 0.5 * ((out - target) ** 2).sum() / 5
    assert make_loss("mse")(out, y).item() == pytest.approx(expect.item(), rel=1e-12)
    tokens = torch.randn(2, 4, 3)
    labels = torch.randint(0, 3, (2, 4))
    flat = make_loss("mse")(tokens.reshape(8, 3), labels.reshape(8))
    assert make_loss("mse")(tokens, labels).item() == pytest.approx(flat.item(), rel=1e-6)
    assert make_loss("ce")(tokens, labels).item() == pytest.approx(
        torch.nn.functional.cross_entropy(tokens.reshape(8, 3), labels.reshape(8)).item()
    )


def test_every_lr_runs_gd_and_every_rho():
    specs = run_specs(EOSConfig(lrs=(0.1, 0.05), rhos=(0.02, 0.1)))
    assert [s.label for s in specs] == [
        "gd-lr0.1", "sam-lr0.1-rho0.02", "sam-lr0.1-rho0.1",
        "gd-lr0.05", "sam-lr0.05-rho0.02", "sam-lr0.05-rho0.1",
    ]
    assert [s.optimizer for s in run_specs(EOSConfig(gd=False, ascent="usam"))] == ["usam"]


def test_summary_second_half_median_and_first_step_at_edge():
    spec = RunSpec("sam-lr0.1-rho0.05", "sam", 0.1, 0.05)
    rows = []
    for step, (lam, g) in enumerate([(5, 1.0), (9, 0.8), (12, 0.5), (10, 0.4), (9, 0.3)]):
        edge = sam_edge(0.1, 0.05, g)
        rows.append({"step": 10 * step, "lambda1": lam, "grad_norm": g, "edge": edge,
                     "ratio": lam / edge})
    run = RunResult(spec, rows, [{"step": 0, "loss": 1.0, "grad_norm": 1.0}], False, 1.0, 0.5, 7)
    s = summarize(run, steps=40)
    late = [r["ratio"] for r in rows if r["step"] >= 20]
    assert s["median_ratio"] == pytest.approx(sorted(late)[1])
    assert s["first_at_edge"] == next(r["step"] for r in rows if r["lambda1"] >= r["edge"])
    assert s["edge_early"] == pytest.approx(rows[1]["edge"])  # steps in (0, 10]
    assert s["gd_edge"] == pytest.approx(20.0) and s["lambda1_init"] == 5
    assert s["at_edge"] == (0.9 <= s["median_ratio"] <= 1.1)
    # the diagnostics on the same trace (band [0.9, 1.1]): ratios 0.40, 0.78, 1.20, 1.08, 1.08
    assert s["first_crossing_step"] == 20 and s["last_step_at_edge"] == 40
    assert s["max_ratio"] == pytest.approx(max(r["ratio"] for r in rows))
    assert s["fraction_at_edge_after_crossing"] == pytest.approx(2 / 3) and not s["left_edge"]


def _check_run_dir(run_dir, labels, steps, every):
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [r["label"] for r in summary["runs"]] == labels
    for label in labels:
        rows = [json.loads(line) for line in (run_dir / label / "edge.jsonl").open()]
        assert [r["step"] for r in rows] == list(range(0, steps + 1, every))
        assert all(math.isfinite(r["lambda1"]) and r["edge"] > 0 for r in rows)
        train = [json.loads(line) for line in (run_dir / label / "train.jsonl").open()]
        assert len(train) == steps
        assert (run_dir / label / "eos.png").stat().st_size > 1000
    assert (run_dir / "overview.png").stat().st_size > 1000
    assert "median λ₁/edge" in (run_dir / "report.md").read_text()
    assert json.loads((run_dir / "config.json").read_text())["steps"] == steps
    return summary


def test_cli_smoke_full_batch(tmp_path, capsys):
    argv = ["--dataset", "synthetic", "--subset", "96", "--width", "16", "--steps", "6",
            "--every", "3", "--budget", "none",
            "--lr", "0.05", "--rho", "0.05", "--out-dir", str(tmp_path),
            "--name", "smoke", "--threads", "1"]
    from samkit.cli import main

    assert main(["eos", *argv]) == 0
    out = capsys.readouterr().out
    assert "step     3/6" in out and "median λ₁/edge" in out and "edge tracker" in out
    summary = _check_run_dir(tmp_path / "smoke", ["gd-lr0.05", "sam-lr0.05-rho0.05"], 6, 3)
    sam = summary["runs"][1]
    assert sam["optimizer"] == "sam" and sam["median_edge"] < 2 / 0.05
    report = (tmp_path / "smoke" / "report.md").read_text()
    assert "λ₁ measurements per run, every 3 steps (no budget): gd-lr0.05 3 (" in report


def test_budgeted_run_says_how_often_it_measured(tmp_path):
    """With the default budget the report says that the measured steps depend on timing, and
    every run still has its step-0 row."""
    argv = ["--dataset", "synthetic", "--subset", "96", "--width", "16", "--steps", "6",
            "--every", "1", "--lr", "0.05", "--rho", "0.05", "--out-dir", str(tmp_path),
            "--name", "budget", "--threads", "1", "--quiet"]
    assert eos.main(argv) == 0
    report = (tmp_path / "budget" / "report.md").read_text()
    assert "within 25 % of each run's time (which steps depends on timing" in report
    for label in ("gd-lr0.05", "sam-lr0.05-rho0.05"):
        rows = [json.loads(line) for line in (tmp_path / "budget" / label / "edge.jsonl").open()]
        assert rows[0]["step"] == 0 and all(math.isfinite(r["lambda1"]) for r in rows)


def test_cli_smoke_transformer_minibatch_sam(tmp_path, capsys):
    text = tmp_path / "input.txt"
    text.write_text("to be or not to be, that is the question. " * 40)
    argv = ["--text", str(text), "--seq-len", "8", "--batch-size", "8", "--probe-size", "16",
            "--width", "16", "--depth", "1", "--steps", "2", "--every", "1", "--budget", "none",
            "--lr", "0.1",
            "--rho", "0.05", "--no-gd", "--out-dir", str(tmp_path), "--name", "text", "--quiet",
            "--threads", "1"]
    assert eos.main(argv) == 0
    summary = _check_run_dir(tmp_path / "text", ["sam-lr0.1-rho0.05"], 2, 1)
    rows = [json.loads(line) for line in (tmp_path / "text/sam-lr0.1-rho0.05/edge.jsonl").open()]
    # minibatch: the SAM-edge uses the step's batch gradient norm
    assert all(r["edge"] == pytest.approx(sam_edge(0.1, 0.05, r["batch_grad_norm"]))
               for r in rows)
    assert summary["config"]["batch_size"] == 8
    config = json.loads((tmp_path / "text/config.json").read_text())
    assert config["model_kwargs"]["n_embd"] == 16 and config["model_kwargs"]["n_layer"] == 1


def test_missing_text_file_is_a_clear_error(tmp_path, capsys):
    assert eos.main(["--text", str(tmp_path / "nope.txt"), "--out-dir", str(tmp_path)]) == 2
    assert "nope.txt" in capsys.readouterr().err


@pytest.mark.slow
def test_default_reproduces_the_edges_on_fashion_mnist(tmp_path):
    """The real-data check: GD settles at 2/η, SAM at the SAM-edge, far below 2/η,
    and the SAM-edge falls with ‖g‖ (the default, about a minute on 2 cores)."""
    require_fashion_mnist()
    result = eos.run_eos(EOSConfig(out_dir=str(tmp_path)), verbose=0)
    gd, sam = (r.summary for r in result.runs)
    assert 0.9 <= gd["median_ratio"] <= 1.2
    assert 0.8 <= sam["median_ratio"] <= 1.3
    assert sam["median_lambda1"] < 0.75 * sam["gd_edge"]
    assert sam["median_edge"] < sam["edge_early"] and sam["grad_norm_late"] < sam[
        "grad_norm_early"]
