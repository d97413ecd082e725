"""Every λ₁ that EdgeTracker records during a SAM run, checked against a cold-start reference.

Setting (issue 11): Fashion-MNIST, the first 1000 training images, an MLP 784-100-100-10 with
tanh, cross-entropy, full batch, SAM (rho 0.1) over SGD (lr 0.05), ``--steps`` steps with a
tracker row every ``--every`` steps (k=1, tol 1e-3, warm start + one fresh direction). At each
row the reference is ``scipy.sparse.linalg.eigsh`` (ARPACK, k=3, tol 1e-10) over a float64
copy of the model at the same weights: a cold start that shares nothing with the tracker.

    PYTHONPATH=src .venv/bin/python benchmarks/tracked_check.py            # a table on stdout
    PYTHONPATH=src .venv/bin/python benchmarks/tracked_check.py --out /tmp/tracked.md
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from curvature import load  # noqa: E402  (benchmarks/curvature.py)

import samkit  # noqa: E402
from samkit.curvature import HessianOperator  # noqa: E402
from samkit.train.edge import EdgeTracker  # noqa: E402


def reference(model: nn.Module, loss_fn, x, y) -> float:
    from scipy.sparse.linalg import eigsh

    m64 = copy.deepcopy(model).double()
    H = HessianOperator(m64, loss_fn, (x.double(), y))
    vals = eigsh(H.to_scipy(), k=3, which="LA", tol=1e-10, return_eigenvectors=False)
    return float(np.max(vals))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--rho", type=float, default=0.1)
    ap.add_argument("--tol", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    x, y = load(args.n, args.data_dir)
    model = nn.Sequential(nn.Linear(784, 100), nn.Tanh(), nn.Linear(100, 100), nn.Tanh(),
                          nn.Linear(100, 10)).eval()
    loss_fn = nn.CrossEntropyLoss()
    opt = samkit.SAM(torch.optim.SGD(model.parameters(), lr=args.lr), rho=args.rho)
    tracker = EdgeTracker((x, y), loss_fn, every=args.every, tol=args.tol, seed=args.seed)

    def closure():
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss

    rows = []
    start = time.perf_counter()
    for t in range(args.steps + 1):
        row = tracker.maybe_record(t, model, opt)
        if row is not None and "lambda1" in row:
            ref = reference(model, loss_fn, x, y)
            err = abs(row["lambda1"] - ref) / abs(ref)
            rows.append((t, row["lambda1"], ref, err, row["converged"], row["matvecs"]))
        if t < args.steps:
            opt.step(closure)
    seconds = time.perf_counter() - start
    errs = [r[3] for r in rows]
    bad = [r for r in rows if r[4] and r[3] > args.tol]
    lines = [
        f"{len(rows)} rows, max relative error {max(errs):.2e} (median {np.median(errs):.2e}), "
        f"{sum(r[4] for r in rows)} say converged, {len(bad)} converged with an error above "
        f"tol {args.tol:g}; tracker {tracker.matvecs} products "
        f"({tracker.matvecs / len(rows):.1f} per row); {seconds:.0f} s in all",
        "",
        "| step | tracked λ₁ | reference λ₁ | rel. error | converged | products |",
        "|---:|---:|---:|---:|:---:|---:|",
    ]
    lines += [f"| {t} | {lam:.6f} | {ref:.6f} | {err:.1e} | {conv} | {mv} |"
              for t, lam, ref, err, conv, mv in rows]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
