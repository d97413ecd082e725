"""The `samkit` command: train, compare, list, errors and exit codes (digits, tiny budgets)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from samkit.cli import main
from samkit.train import load_config, read_metrics

QUICK = ["--dataset", "digits", "--threads", "1", "--batch-size", "128"]


def test_train_writes_a_run(tmp_path, capsys):
    rc = main(["train", *QUICK, "--epochs", "2", "--optimizer", "asam", "--rho", "0.5",
               "--out-dir", str(tmp_path), "--name", "run", "--set", "model_kwargs.width=32",
               "eta=0.02"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "epoch 2/2" in out and "done:" in out and "test acc" in out
    cfg = load_config(tmp_path / "run" / "config.yaml")
    assert (cfg.optimizer, cfg.rho, cfg.eta, cfg.model_kwargs) == ("asam", 0.5, 0.02,
                                                                  {"width": 32})
    assert [r["epoch"] for r in read_metrics(tmp_path / "run") if r["event"] == "epoch"] == [1, 2]


def test_train_from_a_config_and_resume(tmp_path, capsys):
    config = Path(__file__).parents[1] / "configs" / "digits-mlp-quick.yaml"
    args = ["train", "--config", str(config), "--out-dir", str(tmp_path), "--name", "r",
            "--set", "epochs=1"]
    assert main(args) == 0
    assert main(args) == 2  # the run exists: refuse to overwrite it silently
    assert "already holds a run" in capsys.readouterr().err
    assert main([*args[:-1], "epochs=2", "--resume", "--quiet"]) == 0
    assert [r["epoch"] for r in read_metrics(tmp_path / "r") if r["event"] == "epoch"] == [1, 2]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "lr=abc"], "Invalid value for 'lr'"),
        (["--set", "optimiser=sam"], "Unknown key 'optimiser'.*did you mean optimizer"),
        (["--optimizer", "nope"], "Invalid optimizer: 'nope'"),
        (["--config", "missing.yaml"], "Config file not found"),
        (["--model", "resnet7"], "resnet"),
        (["--tensorboard"], "tensorboard"),
    ],
)
def test_train_errors_are_clear(tmp_path, capsys, args, message):
    if args == ["--tensorboard"]:
        import importlib.util

        if importlib.util.find_spec("tensorboard") is not None:
            pytest.skip("tensorboard is installed")
    rc = main(["train", *QUICK, "--epochs", "1", "--out-dir", str(tmp_path), *args])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("samkit: error:")
    import re

    assert re.search(message, err), err


@pytest.fixture
def pass_clock(monkeypatch):
    """The step clock of `samkit compare` (samkit.experiments.budget.step_clock) made a count
    of module forward calls: a step's "seconds" are its forward passes times the modules each
    calls, whatever the machine's load, so SAM's steps cost exactly twice SGD's."""
    import torch

    from samkit.experiments import budget

    calls = [0]

    def count(module, args):
        calls[0] += 1

    handle = torch.nn.modules.module.register_module_forward_pre_hook(count)
    monkeypatch.setattr(budget, "step_clock", lambda: float(calls[0]))
    yield
    handle.remove()


def test_compare_writes_report_and_table(tmp_path, capsys, pass_clock):
    rc = main(["compare", *QUICK, "--epochs", "2", "--optimizers", "sgd", "sam:rho=0.1",
               "--seeds", "0", "1", "--out-dir", str(tmp_path), "--name", "cmp", "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "| optimizer | test acc final (%) |" in out and "| sam:rho=0.1 |" in out
    run = tmp_path / "cmp"
    report = (run / "report.md").read_text()
    assert "![learning curves](curves.png)" in report and "samkit compare" in report
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((run / "summary.json").read_text())
    # the default equal-budget row: SGD trained again for SAM's training time (on the fake
    # clock exactly twice SGD's, so twice the steps)
    assert [r["optimizer"] for r in summary["rows"]] == [
        "sgd", "sam:rho=0.1", "sgd (equal time: sam:rho=0.1)"]
    assert summary["rows"][2]["passes"] == 2 * summary["rows"][0]["passes"]
    import re

    steps = re.search(r"equal budget: sgd trained for (\d+) steps instead of (\d+)", report)
    assert steps and int(steps[1]) == 2 * int(steps[2]), report
    assert summary["rows"][0]["time_ratio"] == pytest.approx(1.0)
    assert load_config(run / "sam_rho0.1-s1" / "config.yaml").rho == 0.1
    # --resume skips finished runs and writes the same table
    assert main(["compare", *QUICK, "--epochs", "2", "--optimizers", "sgd", "sam:rho=0.1",
                 "--seeds", "0", "1", "--out-dir", str(tmp_path), "--name", "cmp", "--quiet",
                 "--resume"]) == 0
    again = json.loads((run / "summary.json").read_text())
    assert again["rows"][1]["final_acc"] == summary["rows"][1]["final_acc"]


def test_compare_falls_back_to_digits_without_fashion_mnist(tmp_path, capsys, monkeypatch):
    from samkit.data import DataNotFoundError

    def missing(name, data_dir=None):
        raise DataNotFoundError(f"{name} not found in /nowhere")

    monkeypatch.setattr("samkit.data.resolve_data_dir", missing)
    rc = main(["compare", "--epochs", "1", "--optimizers", "sgd", "--seeds", "0",
               "--out-dir", str(tmp_path), "--quiet"])
    captured = capsys.readouterr()
    assert rc == 0
    assert "falling back to scikit-learn's digits" in captured.err
    assert "dataset-fashion-mnist" in captured.err
    (run,) = tmp_path.glob("compare-digits-mlp-noise40-*")  # settings of its own: a digest
    report = (run / "report.md").read_text()
    assert "falling back" in report and "**digits**" in report


def test_compare_rejects_bad_optimizers(tmp_path, capsys):
    assert main(["compare", *QUICK, "--optimizers", "sgd", "samm", "--out-dir",
                 str(tmp_path)]) == 2
    assert "Invalid optimizer: 'samm'" in capsys.readouterr().err
    assert not (tmp_path / "compare-digits-mlp").exists()  # checked before training


def test_list(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for word in ("sam", "asam", "wrn28-10", "fashion-mnist", "label_smoothing"):
        assert word in out


@pytest.mark.slow  # spawns a process
def test_console_script_help():
    exe = Path(sys.executable).with_name("samkit")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "samkit.cli"]
    out = subprocess.run([*cmd, "compare", "--help"], capture_output=True, text=True,
                         env={**os.environ, "COLUMNS": "100"}, check=True).stdout
    assert "  samkit compare --label-noise 0\n" in out  # the clean-label example
    assert "--equal-budget" in out
