"""Wall time per training step of issue 23's variants: SGD, SAM, WSAM, GCSAM, bSAM, SAM every 2nd
step (``interval=2``), and pytorch_optimizer's WSAM when it is installed.

Every method trains its own copy of the same model on the same batch with ``opt.step(closure)``;
the methods run interleaved, one step each per round in a shuffled order, so drifts in machine
load hit them alike. Reports the median milliseconds per step (for ``interval=2``, the mean over
pairs of steps: one SAM step and one SGD step) and the ratios to SGD and SAM, and the cost of
bSAM's Gaussian draw for the model's weights alone.

    .venv/bin/python benchmarks/variant_overhead.py                   # MLP 784-256-256-10
    .venv/bin/python benchmarks/variant_overhead.py --rounds 200 --threads 1
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import time

import torch
from torch import nn

import samkit

F = nn.functional


def methods_for(model: nn.Module) -> dict[str, tuple[nn.Module, torch.optim.Optimizer]]:
    kw = dict(lr=0.01, momentum=0.9)
    out: dict[str, tuple[nn.Module, torch.optim.Optimizer]] = {}
    for label, name, extra in [
        ("SGD", "sgd", {}), ("SAM", "sam", {}), ("WSAM", "wsam", {}), ("GCSAM", "gcsam", {}),
        ("bSAM", "bsam", dict(num_data=10_000)),
        ("SAM interval=2", "periodicsam", dict(interval=2)),
    ]:  # fmt: skip
        m = copy.deepcopy(model)
        out[label] = (m, samkit.create_optimizer(name, list(m.parameters()), **kw, **extra))
    try:
        import pytorch_optimizer as po

        m = copy.deepcopy(model)
        out["pytorch_optimizer WSAM"] = (m, po.WSAM(m, m.parameters(), torch.optim.SGD, **kw))
    except ImportError:
        print("pytorch_optimizer is not installed: its WSAM row is left out")
    return out


def step_fn(model: nn.Module, opt: torch.optim.Optimizer, x, y):
    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    if isinstance(opt, torch.optim.SGD):
        return lambda: (closure(), opt.step())
    return lambda: opt.step(closure)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rounds", type=int, default=100, help="pairs of steps per method")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                          nn.Linear(256, 10))  # fmt: skip
    x, y = torch.randn(128, 784), torch.randint(0, 10, (128,))
    methods = {k: step_fn(m, o, x, y) for k, (m, o) in methods_for(model).items()}
    times: dict[str, list[float]] = {k: [] for k in methods}
    order, rng = list(methods), random.Random(0)
    for r in range(args.warmup + args.rounds):
        rng.shuffle(order)
        for k in order:
            t0 = time.perf_counter()
            methods[k]()
            methods[k]()  # two steps: one period of interval=2
            if r >= args.warmup:
                times[k].append((time.perf_counter() - t0) / 2)
    med = {k: statistics.median(v) for k, v in times.items()}
    gen = torch.Generator().manual_seed(0)
    draws = []
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        for p in model.parameters():
            torch.randn(p.shape, generator=gen)
        draws.append(time.perf_counter() - t0)
    n = sum(p.numel() for p in model.parameters())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; MLP 784-256-256-10 "
          f"({n / 1e6:.2f}M parameters), batch 128, CPU, median of {args.rounds} interleaved "
          "pairs of steps")  # fmt: skip
    print("| method | ms / step | vs SGD | vs SAM |\n|---|---|---|---|")
    for k in methods:
        print(f"| {k} | {1e3 * med[k]:.2f} | {med[k] / med['SGD']:.2f} | "
              f"{med[k] / med['SAM']:.2f} |")  # fmt: skip
    print(f"\nbSAM's Gaussian draw alone (torch.randn for the {n:,} weights): "
          f"{1e3 * statistics.median(draws):.2f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
