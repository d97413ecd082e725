"""What SAF and MESA cost per step and in memory, against SGD and SAM, through the step engine.

The `samkit compare` default's model (MLP 784-256-256-10) and batch (128), CPU, one thread:
every method trains its own copy on random batches drawn from a 10,000-example set (SAF needs
example indices), interleaved one step each per round in a shuffled order so that load drifts
hit all alike; the median seconds per step, their ratio to SGD's, and the memory each method
keeps besides the model and the base optimizer (SAF: the logit memory; MESA: the EMA copy;
SAM: the weight backup).

    .venv/bin/python benchmarks/trajectory_cost.py --rounds 300
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
from samkit.models import create_model
from samkit.step import StepEngine

F = nn.functional


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--examples", type=int, default=10_000)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    n, batch = args.examples, 128
    x_all = torch.randn(n, 1, 28, 28)
    y_all = torch.randint(0, 10, (n,))
    model = create_model("mlp", (1, 28, 28), 10, depth=2, width=256)
    methods = {
        "sgd": dict(),
        "saf": dict(start_epoch=-1),
        "mesa": dict(start_epoch=-1, ema_decay=0.987),
        "sam": dict(rho=0.05),
    }
    engines = {}
    for name, kw in methods.items():
        m = copy.deepcopy(model)
        opt = samkit.create_optimizer(name, m, lr=0.05, momentum=0.9, weight_decay=5e-4, **kw)
        engines[name] = StepEngine(opt, m, F.cross_entropy)
    times = {name: [] for name in methods}
    gen = torch.Generator().manual_seed(1)
    for r in range(args.warmup + args.rounds):
        idx = torch.randperm(n, generator=gen)[:batch]
        x, y = x_all[idx], y_all[idx]
        order = list(methods)
        random.Random(r).shuffle(order)
        for name in order:
            t0 = time.perf_counter()
            engines[name].step(x, y, indices=idx, epoch=r // 78, num_examples=n)
            if r >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    sgd = statistics.median(times["sgd"])
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"MLP 784-256-256-10 ({params / 1e6:.2f} MB of float32 weights), batch {batch}, "
          f"{n} examples, {args.rounds} rounds, 1 thread")
    print("| method | ms/step (median) | vs SGD | extra memory |")
    print("|---|---|---|---|")
    for name in methods:
        med = statistics.median(times[name])
        opt = engines[name].optimizer
        if name in ("saf", "mesa"):
            extra = opt.memory_bytes()
        elif name == "sam":
            extra = params  # w_backup
        else:
            extra = 0
        print(f"| {name} | {1e3 * med:.2f} | {med / sgd:.2f}x | {extra / 1e6:.2f} MB |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
