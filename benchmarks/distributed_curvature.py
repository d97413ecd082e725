"""Top Hessian eigenvalue in one process and in gloo processes: samkit against hessian-eigenthings
1.0.0a5, side by side in one run.

Setting: Fashion-MNIST, the first ``--n`` training images (samkit's loader, standardized), an
MLP 784-500-500-10 with tanh (``--hidden``), cross-entropy, after one epoch of SGD (batches of
200, lr 0.1); the Hessian of the mean loss over the ``--n`` images in float32, eval mode.

1. One process, ``--threads`` threads: samkit ``top_eigenvalues`` at tol 1e-3 and 1e-6 (it stops
   on its residual test) and hessian-eigenthings ``lanczos`` at ``max_iter`` 10, 20, 40 (its
   ``max_iter`` is the Krylov dimension, it does not stop early; its ``converged`` flag is its
   residual test ``|beta s| < tol |theta|`` at each tol): products, seconds, the relative error
   of lambda_max against a tight reference (samkit Lanczos on a float64 copy, tol 1e-10).
2. ``--world`` gloo processes on this machine, each holding its shard of the images (contiguous,
   as ``tensor_split``), ``--threads`` threads each: samkit's ``HessianOperator(...,
   process_group=None)`` (the default group) and hessian-eigenthings' ``DDPHessianOperator``,
   the same settings: products, all-reduces per product, bytes all-reduced per product (per
   rank: what one rank hands to ``torch.distributed.all_reduce``), seconds (the slowest rank),
   the relative difference from the same method and setting in one process, and the error
   against the reference. All-reduces are counted by wrapping ``torch.distributed.all_reduce``
   (which samkit and ``torch.distributed.nn.all_reduce``, hessian-eigenthings' call, both go
   through).

    PYTHONPATH=src .venv/bin/python benchmarks/distributed_curvature.py --threads 1
    PYTHONPATH=src .venv/bin/python benchmarks/distributed_curvature.py --quick   # ~1 minute

hessian-eigenthings is optional (``pip install --no-deps --pre hessian-eigenthings==1.0.0a5``);
without it its rows say that it does not import.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch
from torch import nn

from samkit.curvature import HessianOperator, top_eigenvalues

TOLS = (1e-3, 1e-6)
HE_STEPS = (10, 20, 40)


def load(n: int, data_dir: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` Fashion-MNIST training images, flattened (samkit's loader)."""
    from samkit.data import load_dataset

    train, _ = load_dataset("fashion-mnist", data_dir=data_dir, subset=n, stratified=False)
    return train.x.reshape(len(train.y), -1), train.y


def mlp(hidden: list[int]) -> nn.Module:
    layers: list[nn.Module] = []
    sizes = [784, *hidden]
    for a, b in zip(sizes[:-1], sizes[1:], strict=True):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(sizes[-1], 10))


def trained_model(x: torch.Tensor, y: torch.Tensor, hidden: list[int]) -> nn.Module:
    """One epoch of SGD (batches of 200, lr 0.1) from seed 0, in eval mode."""
    torch.manual_seed(0)
    model = mlp(hidden)
    ce = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for start in range(0, len(y), 200):
        opt.zero_grad()
        ce(model(x[start: start + 200]), y[start: start + 200]).backward()
        opt.step()
    return model.eval()


# --------------------------------------------------------------------------- the methods


def samkit_top(model, x, y, tol, process_group=None):
    """samkit Lanczos on a fresh operator (its graph build in the time)."""
    H = HessianOperator(model, nn.CrossEntropyLoss(), (x, y), process_group=process_group)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        r = top_eigenvalues(H, tol=tol, seed=0)
    return float(r.values[0]), r.matvecs, bool(r.converged), None


def eigenthings_top(model, x, y, steps, distributed=False):
    """hessian-eigenthings Lanczos with ``max_iter=steps``; its own ``converged`` at each tol
    (from its residuals)."""
    import hessian_eigenthings as he

    cls = he.DDPHessianOperator if distributed else he.HessianOperator
    op = cls(model, [(x, y)], he.supervised_loss(nn.CrossEntropyLoss()))
    count = [0]
    inner = op.matvec

    def counted(v):
        count[0] += 1
        return inner(v)

    op.matvec = counted
    r = he.lanczos(op, k=1, max_iter=steps, tol=min(TOLS), which="LA", seed=0)
    lam = float(r.eigenvalues[0])
    flags = {tol: bool(float(r.residuals[0]) < tol * abs(lam)) for tol in TOLS}
    return lam, count[0], flags[min(TOLS)], flags


def methods(he_available: bool):
    """(library, setting, key, call(model, x, y, distributed))"""
    out = [("samkit", f"tol={tol:g}", ("samkit", tol),
            lambda m, x, y, d, tol=tol: samkit_top(m, x, y, tol, None if d else "local"))
           for tol in TOLS]
    if he_available:
        out += [("hessian-eigenthings", f"max_iter={s}", ("he", s),
                 lambda m, x, y, d, s=s: eigenthings_top(m, x, y, s, d)) for s in HE_STEPS]
    return out


# --------------------------------------------------------------------------- the workers


class Counter:
    """Counts the calls of ``torch.distributed.all_reduce`` and the bytes handed to it."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self.dist, self.original = dist, dist.all_reduce
        self.calls = self.bytes = 0

    def __enter__(self):
        def counting(tensor, *args, **kwargs):
            self.calls += 1
            self.bytes += tensor.numel() * tensor.element_size()
            return self.original(tensor, *args, **kwargs)

        self.dist.all_reduce = counting
        return self

    def __exit__(self, *exc):
        self.dist.all_reduce = self.original
        return False


def worker(rank: int, world: int, port: int, folder: str, threads: int, he_available: bool
           ) -> None:
    import torch.distributed as dist

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch.distributed.nn
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=600))
    results: dict = {}
    try:
        state = torch.load(os.path.join(folder, "setting.pt"), weights_only=False)
        x, y = state["x"].tensor_split(world)[rank], state["y"].tensor_split(world)[rank]
        model = mlp(state["hidden"])
        model.load_state_dict(state["model"])
        model.eval()
        # untimed: the first collectives and products of a process (connections, allocation)
        H = HessianOperator(model, nn.CrossEntropyLoss(), (x, y))
        H @ torch.ones(H.shape[0])
        for _, _, key, call in methods(he_available):
            dist.barrier()
            with Counter() as counter:
                start = time.perf_counter()
                lam, products, converged, flags = call(model, x, y, True)
                seconds = time.perf_counter() - start
            results[key] = dict(lam=lam, products=products, converged=converged, flags=flags,
                                seconds=seconds, reduces=counter.calls, bytes=counter.bytes)
    except BaseException:
        results = {"error": traceback.format_exc()}
    finally:
        torch.save(results, os.path.join(folder, f"rank{rank}.pt"))
        dist.destroy_process_group()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- the run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n", type=int, default=2000, help="training images (default 2000)")
    ap.add_argument("--hidden", type=int, nargs="+", default=[500, 500],
                    help="hidden widths (default 500 500)")
    ap.add_argument("--world", type=int, default=2, help="gloo processes (default 2)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    ap.add_argument("--data-dir", default=None, help="folder with the Fashion-MNIST IDX files")
    ap.add_argument("--quick", action="store_true",
                    help="a quick run: 400 images, hidden 100 100 (unless given)")
    ap.add_argument("--out", default=None, help="also write the markdown report here")
    args = ap.parse_args()
    if args.quick:
        if "--n" not in sys.argv:
            args.n = 400
        if "--hidden" not in sys.argv:
            args.hidden = [100, 100]
    if args.world < 2:
        ap.error(f"Invalid --world: {args.world} (allowed: an integer >= 2)")
    torch.set_num_threads(args.threads)
    try:
        import hessian_eigenthings as he

        he_version = he.__version__
    except ImportError as err:
        he_version = None
        print(f"hessian-eigenthings: does not import ({err})", flush=True)

    # 1. data, a briefly trained model, the reference
    x, y = load(args.n, args.data_dir)
    model = trained_model(x, y, args.hidden)
    d = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        loss = float(nn.functional.cross_entropy(model(x), y))
    print(f"# {args.n} images, MLP 784-{'-'.join(map(str, args.hidden))}-10 ({d} parameters), "
          f"loss {loss:.4f} after one epoch", flush=True)
    H64 = HessianOperator(copy.deepcopy(model).double(), nn.CrossEntropyLoss(), (x.double(), y))
    start = time.perf_counter()
    ref = top_eigenvalues(H64, tol=1e-10, seed=1)
    lam_ref = float(ref.values[0])
    print(f"reference lambda_max = {lam_ref:.10g} ({ref.matvecs} products, "
          f"{time.perf_counter() - start:.1f} s, error bound {float(ref.error_bounds[0]):.1e})",
          flush=True)
    del H64

    # 2. one process
    one = {}
    for lib, setting, key, call in methods(he_version is not None):
        start = time.perf_counter()
        lam, products, converged, flags = call(model, x, y, False)
        seconds = time.perf_counter() - start
        one[key] = dict(lam=lam, products=products, converged=converged, flags=flags,
                        seconds=seconds)
        print(f"1 process  {lib} [{setting}]: {lam:.8g} rel.err "
              f"{abs(lam - lam_ref) / abs(lam_ref):.1e}, {products} products, {seconds:.2f} s",
              flush=True)

    # 3. world gloo processes, each with its shard
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as folder:
        torch.save({"x": x, "y": y, "hidden": args.hidden, "model": model.state_dict()},
                   os.path.join(folder, "setting.pt"))
        mp.spawn(worker, args=(args.world, free_port(), folder, args.threads,
                               he_version is not None), nprocs=args.world, join=True)
        ranks = [torch.load(os.path.join(folder, f"rank{r}.pt"), weights_only=False)
                 for r in range(args.world)]
    for r, res in enumerate(ranks):
        if "error" in res:
            sys.exit(f"rank {r} failed:\n{res['error']}")
    many = {}
    for lib, setting, key, _ in methods(he_version is not None):
        per = [res[key] for res in ranks]
        lams = {p["lam"] for p in per}
        many[key] = dict(per[0], seconds=max(p["seconds"] for p in per),
                         same=len(lams) == 1)
        m = many[key]
        print(f"{args.world} processes {lib} [{setting}]: {m['lam']:.8g}, {m['products']} "
              f"products, {m['reduces']} all-reduces, {m['bytes'] / 1e6:.1f} MB, "
              f"{m['seconds']:.2f} s, the same on every rank: {m['same']}", flush=True)

    # 4. the report
    def name(lib):
        return "samkit" if lib == "samkit" else f"hessian-eigenthings {he_version}"

    def flag(row):
        return "yes" if row["converged"] else "no"

    lines = [
        f"Top Hessian eigenvalue, Fashion-MNIST (the first {args.n} training images), MLP "
        f"784-{'-'.join(map(str, args.hidden))}-10 tanh ({d} parameters), cross-entropy, after "
        f"one epoch of SGD (loss {loss:.4f}), float32, eval mode. Reference: samkit Lanczos on a "
        f"float64 copy, tol=1e-10: lambda_max = {lam_ref:.10g} ({ref.matvecs} products).",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
        f"{args.threads} thread(s) per process. Wall times include building each operator.",
        "",
        "One process (converged: samkit's residual test at its tol; hessian-eigenthings' "
        "residual test at tol 1e-3 / 1e-6):",
        "",
        "| library | setting | products | time (s) | lambda_max | rel. error | converged |",
        "|---|---|---|---|---|---|---|",
    ]
    for lib, setting, key, _ in methods(he_version is not None):
        r = one[key]
        conv = flag(r) if lib == "samkit" else " / ".join(
            "yes" if r["flags"][t] else "no" for t in TOLS)
        lines.append(f"| {name(lib)} | {setting} | {r['products']} | {r['seconds']:.2f} | "
                     f"{r['lam']:.8g} | {abs(r['lam'] - lam_ref) / abs(lam_ref):.1e} | {conv} |")
    lines += [
        "",
        f"{args.world} gloo processes on this machine, {args.n // args.world} images each "
        "(all-reduces and bytes: per rank, per product; time: the slowest rank; vs 1 process: "
        "the relative difference from the same method and setting in one process):",
        "",
        "| library | setting | products | all-reduces / product | bytes / product | time (s) "
        "| vs 1 process | rel. error | same on every rank |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for lib, setting, key, _ in methods(he_version is not None):
        m, o = many[key], one[key]
        p = max(m["products"], 1)
        lines.append(
            f"| {name(lib)} | {setting} | {m['products']} | {m['reduces'] / p:.2f} | "
            f"{m['bytes'] / p / 1e6:.2f} MB | {m['seconds']:.2f} | "
            f"{abs(m['lam'] - o['lam']) / abs(o['lam']):.1e} | "
            f"{abs(m['lam'] - lam_ref) / abs(lam_ref):.1e} | {'yes' if m['same'] else 'no'} |")
    if he_version is None:
        lines += ["", "hessian-eigenthings: does not import (its rows are left out)."]
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
