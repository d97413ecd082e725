"""Top Hessian eigenvalue on real data: samkit Lanczos, samkit power iteration, PyHessian and
scipy ``eigsh`` over samkit's operator; plus the cost of one Hessian-vector product.

Setting (issue 3): Fashion-MNIST, the first 2000 training images, an MLP 784-500-500-10 with
tanh, cross-entropy, after one epoch of SGD (10 steps of 200 images, lr 0.1); the Hessian of
the mean loss over the 2000 images in float32, the model in eval mode. The reference is
Lanczos in float64 (a float64 copy of the model) with tol=1e-10.

    .venv/bin/python benchmarks/curvature.py                      # the table, on stdout
    .venv/bin/python benchmarks/curvature.py --out /tmp/curvature.md   # also write it there

PyHessian (PyPI ``pyhessian`` 0.1), curvlinops (``curvlinops-for-pytorch``) and
hessian-eigenthings are optional (``pip install --no-deps ...``; curvlinops also imports einops,
einconv, linear_operator and jaxtyping); a row says so when one does not import. Each method is
run at several settings, and the report gives the cheapest setting reaching a relative error of
1e-3 and of 1e-6.
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
    ap.add_argument("--tol", type=float, default=1e-4, help="power iteration's tolerance")
    ap.add_argument("--tols", type=float, nargs="+", default=[1e-2, 1e-3, 1e-4, 1e-5],
                    help="the tolerances swept for samkit Lanczos and eigsh")
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

    def record(name, setting, value, seconds, matvecs, note=""):
        rel = abs(value - lam) / abs(lam)
        rows.append((name, setting, value, rel, seconds, matvecs, note))
        print(
            f"{name} [{setting}]: {value:.8g} rel.err {rel:.2e} in {seconds:.2f} s, "
            f"{matvecs} products {note}",
            flush=True,
        )

    # 3. samkit Lanczos (a fresh operator each: graph build included) and power iteration
    import warnings

    def samkit(method, tol):
        H = HessianOperator(model, ce, (x, y))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return top_eigenvalues(H, tol=tol, method=method, seed=0)

    for tol in args.tols:
        r, t = timed(lambda tol=tol: samkit("lanczos", tol))
        record("samkit Lanczos", f"tol={tol:g}", float(r.values[0]), t, r.matvecs,
               "" if r.converged else "not converged")
    r, t = timed(lambda: samkit("power", args.tol))
    record("samkit power iteration", f"tol={args.tol:g}", float(r.values[0]), t, r.matvecs,
           "" if r.converged else "not converged")

    # 4. PyHessian (power iteration; tol on the relative change of the estimate)
    try:
        import importlib

        ph = importlib.import_module("pyhessian.hessian")  # the module, not the class
    except ImportError as err:
        ph = None
        rows.append(("PyHessian", "-", float("nan"), float("nan"), float("nan"), 0,
                     f"does not import: {err}"))
        print(f"PyHessian: does not import ({err})", flush=True)
    if ph is not None:
        count = [0]
        original = ph.hessian_vector_product

        def counting(*a, **k):
            count[0] += 1
            return original(*a, **k)

        ph.hessian_vector_product = counting
        for tol, max_iter in ((1e-3, 100), (1e-4, 100), (1e-5, 1000), (1e-6, 1000)):
            m2 = copy.deepcopy(model)
            torch.manual_seed(0)
            count[0] = 0

            def pyhessian_top(m2=m2, tol=tol, max_iter=max_iter):
                return ph.hessian(m2, ce, data=(x, y), cuda=False).eigenvalues(
                    maxIter=max_iter, tol=tol
                )[0][0]

            value, t = timed(pyhessian_top)
            record("PyHessian 0.1", f"maxIter={max_iter}, tol={tol:g}", float(value), t,
                   count[0])
        ph.hessian_vector_product = original

    # 5. scipy eigsh (ARPACK): over samkit's operator, and over curvlinops' operator
    from scipy.sparse.linalg import eigsh

    def eigsh_top(make, tol):
        A, counter = make()
        v0 = np.random.default_rng(0).standard_normal(A.shape[0])
        vals = eigsh(A, k=1, which="LA", tol=tol, v0=v0, return_eigenvectors=False)
        return float(vals[0]), counter()

    def samkit_scipy():
        H = HessianOperator(model, ce, (x, y))
        return H.to_scipy(dtype=np.float64), lambda: H.matvecs

    for tol in args.tols:
        (value, mv), t = timed(lambda tol=tol: eigsh_top(samkit_scipy, tol))
        record("scipy eigsh over samkit HessianOperator", f"tol={tol:g}", value, t, mv)

    try:
        from curvlinops import HessianLinearOperator
        from scipy.sparse.linalg import LinearOperator as ScipyOp
    except ImportError as err:
        HessianLinearOperator = None
        rows.append(("curvlinops + eigsh", "-", float("nan"), float("nan"), float("nan"), 0,
                     f"does not import: {err}"))
        print(f"curvlinops: does not import ({err})", flush=True)
    if HessianLinearOperator is not None:

        def curvlinops_scipy():
            count = [0]
            op = HessianLinearOperator(model, ce, list(model.parameters()), [(x, y)])
            inner = op.to_scipy(dtype=np.float64)

            def mv(v):
                count[0] += 1
                return inner.matvec(v.astype(np.float32)).astype(np.float64)

            return ScipyOp(inner.shape, matvec=mv, rmatvec=mv, dtype=np.float64), lambda: count[0]

        for tol in args.tols:
            (value, mv), t = timed(lambda tol=tol: eigsh_top(curvlinops_scipy, tol))
            record("curvlinops 3.0 + scipy eigsh", f"tol={tol:g}", value, t, mv,
                   "products after its determinism check")

    # hessian-eigenthings (Lanczos; its max_iter is the Krylov dimension)
    try:
        import hessian_eigenthings as he
    except ImportError as err:
        he = None
        rows.append(("hessian-eigenthings", "-", float("nan"), float("nan"), float("nan"), 0,
                     f"does not import: {err}"))
        print(f"hessian-eigenthings: does not import ({err})", flush=True)
    if he is not None:
        for steps in (10, 20, 40):

            def he_top(steps=steps):
                op = he.HessianOperator(model, [(x, y)], he.supervised_loss(ce))
                count = [0]
                inner = op.matvec

                def counted(v, inner=inner, count=count):
                    count[0] += 1
                    return inner(v)

                op.matvec = counted
                r = he.lanczos(op, k=1, max_iter=steps, tol=1e-12, which="LA", seed=0)
                return float(r.eigenvalues[0]), count[0]

            (value, mv), t = timed(he_top)
            record("hessian-eigenthings 1.0.0a5 Lanczos", f"max_iter={steps}", value, t, mv)

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
        "| method | settings | lambda_max | rel. error | wall time (s) | HVPs | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, setting, value, rel, seconds, matvecs, note in rows:
        lines.append(
            f"| {name} | {setting} | {value:.8g} | {rel:.1e} | {seconds:.2f} | {matvecs} | "
            f"{note} |"
        )
    lines += ["", "Cheapest setting of each method reaching a relative error (time, products):",
              "", "| method | <= 1e-3 | <= 1e-6 |", "|---|---|---|"]
    for name in dict.fromkeys(r[0] for r in rows):
        cells = []
        for target in (1e-3, 1e-6):
            ok = [r for r in rows if r[0] == name and r[3] <= target]
            best = min(ok, key=lambda r: r[4]) if ok else None
            cells.append(f"{best[4]:.2f} s, {best[5]} HVPs ({best[1]})" if best else "not reached")
        lines.append(f"| {name} | {cells[0]} | {cells[1]} |")
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
