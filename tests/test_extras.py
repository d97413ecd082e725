"""Optional dependencies: a missing one is named with its extra (``pip install
'samkit[experiments]'``) before any work starts, by every subcommand and library entry point.

Each optional module is blocked with ``sys.modules[name] = None`` (``import name`` then fails
as if the package were not installed)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

from samkit.cli import main

sys.path.insert(0, str(Path(__file__).parent / "data"))  # tests/data/dataformats.py

OPTIONAL = ("yaml", "matplotlib", "sklearn", "scipy", "tqdm", "transformers", "lightning",
            "pytorch_lightning", "tensorboard")


def block(monkeypatch, *names: str) -> None:
    for name in names:
        monkeypatch.setitem(sys.modules, name, None)


def small(command: str, out: Path) -> list[str]:
    """Each subcommand on a budget that would train for seconds only, writing under ``out``."""
    return {
        "train": ["train", "--dataset", "digits", "--epochs", "1", "--name", "x",
                  "--out-dir", str(out), "--quiet"],
        "compare": ["compare", "--dataset", "digits", "--epochs", "1", "--seeds", "0",
                    "--optimizers", "sgd", "--equal-budget", "none", "--out-dir", str(out),
                    "--quiet"],
        "eos": ["eos", "--dataset", "digits", "--subset", "100", "--steps", "3",
                "--out-dir", str(out), "--quiet"],
        "correlate": ["correlate", "--quick", "--dataset", "digits", "--epochs", "1",
                      "--out-dir", str(out), "--quiet"],
    }[command]


CASES = [  # (blocked module, subcommand, the package named)
    ("yaml", "train", "pyyaml"),
    ("yaml", "compare", "pyyaml"),
    ("yaml", "eos", "pyyaml"),
    ("yaml", "correlate", "pyyaml"),
    ("matplotlib", "compare", "matplotlib"),
    ("matplotlib", "eos", "matplotlib"),
    ("matplotlib", "correlate", "matplotlib"),
    ("scipy", "correlate", "scipy"),
    ("sklearn", "train", "scikit-learn"),
    ("sklearn", "compare", "scikit-learn"),
    ("sklearn", "eos", "scikit-learn"),
]


@pytest.mark.parametrize(("module", "command", "package"), CASES)
def test_subcommand_names_the_extra_before_it_trains(module, command, package, tmp_path,
                                                     monkeypatch, capsys):
    block(monkeypatch, module)
    out = tmp_path / "runs"
    assert main(small(command, out)) == 2
    err = capsys.readouterr().err
    assert f"samkit {command}" in err and package in err, err
    assert "pip install 'samkit[experiments]'" in err, err
    assert len(err.strip().splitlines()) == 1, err  # one line
    assert not out.exists(), "nothing is written before the check"


def test_train_tensorboard_names_its_extra(tmp_path, monkeypatch, capsys):
    block(monkeypatch, "tensorboard")
    out = tmp_path / "runs"
    assert main(small("train", out) + ["--tensorboard"]) == 2
    assert "pip install 'samkit[tensorboard]'" in capsys.readouterr().err
    assert not out.exists()


def test_list_and_download_need_no_extra(tmp_path, monkeypatch, capsys):
    from dataformats import make_idx_dataset

    block(monkeypatch, *OPTIONAL)
    assert main(["list"]) == 0
    assert "optimizers:" in capsys.readouterr().out
    make_idx_dataset(tmp_path / "mnist")  # already there: nothing to fetch
    assert main(["download", "mnist", "--data-dir", str(tmp_path / "mnist")]) == 0
    assert "mnist" in capsys.readouterr().out


def test_load_run_names_the_extra(tmp_path, monkeypatch):
    import samkit

    block(monkeypatch, "yaml")
    with pytest.raises(ImportError, match=r"samkit\.load_run.*pyyaml.*samkit\[experiments\]"):
        samkit.load_run(tmp_path)


def test_to_scipy_names_the_extra(monkeypatch):
    import torch

    from samkit.curvature import HessianOperator

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    H = HessianOperator(model, torch.nn.functional.mse_loss, (torch.randn(8, 3), torch.randn(8, 1)))
    block(monkeypatch, "scipy")
    with pytest.raises(ImportError, match=r"to_scipy.*scipy.*pip install 'samkit\[curvature\]'"):
        H.to_scipy()


@pytest.mark.parametrize(("module", "blocked", "extra"), [
    ("samkit.integrations.huggingface", ("transformers",), "huggingface"),
    ("samkit.integrations.lightning", ("lightning", "pytorch_lightning"), "lightning"),
])
def test_integrations_name_their_extra(module, blocked, extra, monkeypatch):
    monkeypatch.delitem(sys.modules, module, raising=False)  # imported afresh, restored after
    block(monkeypatch, *blocked)
    with pytest.raises(ImportError, match=rf"{module}.*pip install 'samkit\[{extra}\]'"):
        importlib.import_module(module)


def test_digits_loader_names_the_extra(monkeypatch):
    from samkit.data import datasets, load_dataset

    datasets._load_raw_cached.cache_clear()  # digits loaded earlier in this process need no import
    block(monkeypatch, "sklearn")
    with pytest.raises(ImportError, match=r"digits.*scikit-learn.*samkit\[experiments\]"):
        load_dataset("digits")


def test_require_message_and_bad_extra(monkeypatch):
    from samkit._extras import MissingExtra, require, require_command, require_dataset

    block(monkeypatch, "yaml", "matplotlib")
    with pytest.raises(MissingExtra) as info:
        require("experiments", "yaml", "matplotlib", "numpy", what="a report")
    err = info.value
    assert isinstance(err, ImportError) and err.extra == "experiments"
    assert err.modules == ("yaml", "matplotlib")
    assert str(err) == ("a report needs pyyaml, matplotlib, which are not installed: pip install "
                        "'samkit[experiments]' (or pip install pyyaml matplotlib)")
    require("experiments", "numpy", what="nothing missing")  # no error
    require_dataset("fashion-mnist")  # needs no extra
    require_command("list")
    with pytest.raises(ValueError, match="Invalid extra: 'plots'"):
        require("plots", what="x")
