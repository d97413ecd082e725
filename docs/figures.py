"""Make the site's figures from real runs: ``make figures`` (or ``python docs/figures.py``).

Each figure is what samkit itself draws, from a run small enough for a CPU in a few minutes:

* ``compare-curves.png``, ``compare-time.png``: ``samkit compare`` with its defaults (the main
  job: SGD, SAM, ASAM and SAF on 10,000 Fashion-MNIST images with 40 % label noise, MLP 2x256,
  20 epochs) on seed 0 only and without the equal-time SGD row (scikit-learn's digits when
  Fashion-MNIST is not installed): its learning curves and its test accuracy against training
  time and passes;
* ``eos.png``, ``eos-sam.png``: ``samkit eos`` (full-batch GD and SAM, 1,000 Fashion-MNIST
  images, 800 steps, λ₁ every 20 steps), the overview and SAM's run;
* ``density.png``: the spectral density (stochastic Lanczos quadrature) of the Hessian of an
  MLP trained briefly on scikit-learn's digits.

The runs go to a temporary folder; only the PNGs are kept, in docs/assets/figures/. The numbers
in these small runs differ from the full experiments of the Results page.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "assets" / "figures"


def run_cli(argv: list[str]) -> None:
    from samkit.cli import main

    print("samkit", " ".join(argv), flush=True)
    code = main(argv)
    if code != 0:
        raise SystemExit(f"samkit {' '.join(argv)} exited {code}")


def dataset() -> str:
    try:
        from samkit.data import load_dataset

        load_dataset("fashion-mnist")
        return "fashion-mnist"
    except Exception as error:  # noqa: BLE001 - any failure: fall back, and say so
        print(f"Fashion-MNIST not available ({error}); using digits", file=sys.stderr)
        return "digits"


def compare_figures(work: Path, data: str) -> None:
    run_cli(["compare", "--dataset", data, "--seeds", "0", "--equal-budget", "none",
             "--out-dir", str(work), "--name", "compare", "--quiet"])
    shutil.copy(work / "compare" / "curves.png", OUT / "compare-curves.png")
    shutil.copy(work / "compare" / "time_to_accuracy.png", OUT / "compare-time.png")


def eos_figures(work: Path, data: str) -> None:
    run_cli(["eos", "--dataset", data, "--subset", "1000", "--steps", "800", "--every", "20",
             "--budget", "none", "--out-dir", str(work), "--name", "eos", "--quiet"])
    shutil.copy(work / "eos" / "overview.png", OUT / "eos.png")
    sam = sorted((work / "eos").glob("sam-*/eos.png"))
    shutil.copy(sam[0], OUT / "eos-sam.png")


def density_figure() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch
    from sklearn.datasets import load_digits

    from samkit.curvature import HessianOperator, plot_spectral_density, spectral_density

    torch.manual_seed(0)
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 10))
    loss_fn = torch.nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(200):
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    H = HessianOperator(model.eval(), loss_fn, (x, y))
    density = spectral_density(H, num_probes=4, num_steps=80)
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    plot_spectral_density(density, ax=ax)
    ax.set_title(f"Hessian spectral density: MLP on digits, {H.shape[0]:,} parameters")
    ax.set_xlabel("eigenvalue")
    fig.tight_layout()
    fig.savefig(OUT / "density.png", dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=["compare", "eos", "density"], nargs="*",
                        help="make only these figures (default: all)")
    args = parser.parse_args(argv)
    only = set(args.only or ["compare", "eos", "density"])
    OUT.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        data = dataset() if only & {"compare", "eos"} else None
        if "density" in only:
            density_figure()
        if "compare" in only:
            compare_figures(Path(tmp), data)
        if "eos" in only:
            eos_figures(Path(tmp), data)
    print(f"figures in {OUT.relative_to(HERE.parent)} ({time.monotonic() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
