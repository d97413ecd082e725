"""Top Hessian eigenvalue on real data: samkit Lanczos, samkit power iteration, PyHessian and
scipy ``eigsh`` over samkit's operator; plus the cost of one Hessian-vector product.

Setting (issue 3): Fashion-MNIST, the first 2000 training images, an MLP 784-500-500-10 with
tanh, cross-entropy, after one epoch of SGD (10 steps of 200 images, lr 0.1); the Hessian of
the mean loss over the 2000 images in float32, the model in eval mode. The reference is
Lanczos in float64 (a float64 copy of the model) with tol=1e-10.

    .venv/bin/python benchmarks/curvature.py                      # the table, on stdout
    .venv/bin/python benchmarks/curvature.py --out /tmp/curvature.md   # also write it there

PyHessian (PyPI ``pyhessian`` 0.1, GPL-3.0) is optional: ``pip install --no-deps pyhessian``
(its only needs are torch and numpy); the row is skipped when it is missing.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from samkit.curvature import HessianOperator, top_eigenvalues
from samkit.data.idx import read_idx

DEFAULT_DIRS = [
    os.environ.get("SAMKIT_DATA", ""),
    "/usr/share/datasets/fashion-mnist",
    str(Path.home() / ".cache/samkit/fashion-mnist"),
]


def load(n: int, data_dir: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    for d in [data_dir] if data_dir else DEFAULT_DIRS:
        if not d:
            continue
        images = Path(d) / "train-images-idx3-ubyte.gz"
        labels = Path(d) / "train-labels-idx1-ubyte.gz"
        if images.exists() and labels.exists():
            x = torch.from_numpy(read_idx(images)[:n].astype(np.float32) / 255.0)
            y = torch.from_numpy(read_idx(labels)[:n].astype(np.int64))
            x = (x.reshape(n, -1) - 0.2860) / 0.3530  # Fashion-MNIST mean / std
            return x, y
    sys.exit("Fashion-MNIST not found: pass --data-dir (the folder of the IDX .gz files)")


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(784, 500), nn.Tanh(), nn.Linear(500, 500), nn.Tanh(), nn.Linear(500, 10)
    )


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def median_time(fn, reps: int) -> float:
    fn()  # warm up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n", type=int, default=2000, help="training images (default 2000)")
    ap.add_argument("--data-dir", default=None, help="folder with the Fashion-MNIST IDX files")
    ap.add_argument("--tol", type=float, default=1e-4, help="samkit / eigsh tolerance")
    ap.add_argument("--reps", type=int, default=7, help="repetitions for the HVP timing")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--out", default=None, help="also write the markdown report here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    # 1. data and a briefly trained model
    x, y = load(args.n, args.data_dir)
    torch.manual_seed(0)
    model = mlp()
    ce = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for start in range(0, args.n, 200):
        opt.zero_grad()
        ce(model(x[start : start + 200]), y[start : start + 200]).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        loss = float(ce(model(x), y))
    d = sum(p.numel() for p in model.parameters())
    print(f"# {args.n} images, {d} parameters, loss {loss:.4f} after one epoch", flush=True)

    # 2. the reference: float64 Lanczos, eigenvalue error bound 1e-10 relative
    model64 = copy.deepcopy(model).double()
    H64 = HessianOperator(model64, ce, (x.double(), y))
    ref, t_ref = timed(lambda: top_eigenvalues(H64, tol=1e-10, seed=1))
    lam = float(ref.values[0])
    print(f"reference lambda_max = {lam:.10g} ({ref.matvecs} products, {t_ref:.1f} s)", flush=True)
    del model64

    rows = []

    def record(name, value, seconds, matvecs, note=""):
        rel = abs(value - lam) / abs(lam)
        rows.append((name, value, rel, seconds, matvecs, note))
        print(
            f"{name}: {value:.8g} rel.err {rel:.2e} in {seconds:.2f} s, {matvecs} products",
            flush=True,
        )

    # 3. samkit Lanczos and power iteration (a fresh operator each: graph build included)
    def samkit(method):
        H = HessianOperator(model, ce, (x, y))
        r = top_eigenvalues(H, tol=args.tol, method=method, seed=0)
        return r

    r, t = timed(lambda: samkit("lanczos"))
    record("samkit Lanczos", float(r.values[0]), t, r.matvecs, f"tol={args.tol:g}")
    r, t = timed(lambda: samkit("power"))
    record(
        "samkit power iteration",
        float(r.values[0]),
        t,
        r.matvecs,
        f"tol={args.tol:g}" + ("" if r.converged else ", not converged"),
    )

    # 4. PyHessian at its defaults (power iteration, maxIter=100, tol=1e-3 on the value change)
    try:
        import importlib

        ph = importlib.import_module("pyhessian.hessian")  # the module, not the class
    except ImportError:
        ph = None
        rows.append(("PyHessian", float("nan"), float("nan"), float("nan"), 0, "not installed"))
        print("PyHessian: not installed (pip install --no-deps pyhessian)", flush=True)
    if ph is not None:
        count = [0]
        original = ph.hessian_vector_product

        def counting(*a, **k):
            count[0] += 1
            return original(*a, **k)

        ph.hessian_vector_product = counting
        m2 = copy.deepcopy(model)
        torch.manual_seed(0)

        def pyhessian_top():
            return ph.hessian(m2, ce, data=(x, y), cuda=False).eigenvalues()[0][0]

        value, t = timed(pyhessian_top)
        ph.hessian_vector_product = original
        record("PyHessian 0.1 (defaults)", float(value), t, count[0], "maxIter=100, tol=1e-3")

    # 5. scipy eigsh (ARPACK) over samkit's operator: one host round trip per product
    from scipy.sparse.linalg import eigsh

    def scipy_top():
        H = HessianOperator(model, ce, (x, y))
        v0 = np.random.default_rng(0).standard_normal(H.dim)
        vals = eigsh(
            H.to_scipy(dtype=np.float64),
            k=1,
            which="LA",
            tol=args.tol,
            v0=v0,
            return_eigenvectors=False,
        )
        return float(vals[0]), H.matvecs

    (value, mv), t = timed(scipy_top)
    record("scipy eigsh over HessianOperator", value, t, mv, f"tol={args.tol:g}")

    # 6. one product against one gradient (medians)
    params = list(model.parameters())
    v = torch.randn(d)
    grad_t = median_time(lambda: torch.autograd.grad(ce(model(x), y), params), args.reps)
    hvp = {}
    for label, kw in (
        ("autograd, cached graph (default)", dict(backend="autograd", cache=True)),
        ("autograd, recomputed", dict(backend="autograd", cache=False)),
        ("func (forward-over-reverse)", dict(backend="func")),
    ):
        H = HessianOperator(model, ce, (x, y), **kw)
        hvp[label] = median_time(lambda H=H: H @ v, args.reps)
        print(
            f"HVP {label}: {hvp[label] * 1e3:.1f} ms = {hvp[label] / grad_t:.2f} x gradient",
            flush=True,
        )

    # 7. the report
    lines = [
        f"Top Hessian eigenvalue, Fashion-MNIST ({args.n} training images), MLP 784-500-500-10 "
        f"tanh ({d} parameters), cross-entropy, after one epoch of SGD (loss {loss:.4f}), "
        f"float32, eval mode. Reference: samkit Lanczos on a float64 copy, tol=1e-10 "
        f"(error bound {float(ref.error_bounds[0]):.1e}, residual {float(ref.residuals[0]):.1e}), "
        f"lambda_max = {lam:.10g} ({ref.matvecs} products).",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch "
        f"{torch.__version__}, {torch.get_num_threads()} thread(s). Wall times include building "
        "each operator (samkit, eigsh) or PyHessian's constructor (its create_graph backward).",
        "",
        "| method | lambda_max | rel. error | wall time (s) | HVPs | settings |",
        "|---|---|---|---|---|---|",
    ]
    for name, value, rel, seconds, matvecs, note in rows:
        lines.append(f"| {name} | {value:.8g} | {rel:.1e} | {seconds:.2f} | {matvecs} | {note} |")
    lines += [
        "",
        f"One gradient (forward + backward, {args.n} images): {grad_t * 1e3:.1f} ms (median of "
        f"{args.reps}).",
        "",
        "| Hessian-vector product | time (ms) | x gradient |",
        "|---|---|---|",
    ]
    for label, t in hvp.items():
        lines.append(f"| {label} | {t * 1e3:.1f} | {t / grad_t:.2f} |")
    report = "\n".join(lines) + "\n"
    print()
    print(report)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=out.parent, delete=False, suffix=".tmp") as f:
            f.write(report)
        os.replace(f.name, out)


if __name__ == "__main__":
    main()
