"""H @ V for a (d, k) block: one batched backward pass (is_grads_batched) against k products,
and block Lanczos with each.

Setting: the tracker's model of benchmarks/tracked_check.py (Fashion-MNIST, the first 1000
images, MLP 784-100-100-10 tanh, cross-entropy, float32, eval mode, untrained weights), the
cached gradient graph (one batch). Medians of ``--reps`` runs.

    PYTHONPATH=src .venv/bin/python benchmarks/matmat.py --threads 1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from curvature import load, median_time  # noqa: E402

from samkit.curvature import HessianOperator, top_eigenvalues  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data-dir", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x, y = load(args.n, args.data_dir)
    model = nn.Sequential(nn.Linear(784, 100), nn.Tanh(), nn.Linear(100, 100), nn.Tanh(),
                          nn.Linear(100, 10)).eval()
    H = HessianOperator(model, nn.CrossEntropyLoss(), (x, y))
    print(f"d = {H.dim}, {args.n} images, threads {args.threads}")
    for k in (2, 4, 8):
        V = torch.randn(H.dim, k)
        H.batched = True
        batched = median_time(lambda V=V: H @ V, args.reps)
        H.batched = False
        looped = median_time(lambda V=V: H @ V, args.reps)
        print(f"k = {k}: batched {batched * 1e3:.1f} ms, column by column {looped * 1e3:.1f} ms "
              f"({looped / batched:.2f}x)")
    for k, block in ((1, 2), (3, None), (3, 4)):
        for flag in (True, False):
            H.batched = flag
            out = {}

            def run(k=k, block=block, out=out):
                out["r"] = top_eigenvalues(H, k=k, tol=1e-6, block_size=block)

            t = median_time(run, max(1, args.reps // 2))
            r = out["r"]
            print(f"top_eigenvalues k={k} block_size={block} batched={flag}: {t:.3f} s, "
                  f"{r.matvecs} products, converged {r.converged}")


if __name__ == "__main__":
    main()
