"""Wall time per training step: SGD, samkit SAM/ASAM, pytorch-optimizer's SAM, a naive loop SAM.

Every method trains its own copy of the same model on the same batch; the methods are run
interleaved, one step each per round in a shuffled order, so drifts in machine load hit all of
them alike. Reports the median seconds per step and the ratios the foundation issue targets.

    .venv/bin/python benchmarks/step_overhead.py               # MLP and small CNN on CPU
    .venv/bin/python benchmarks/step_overhead.py --rounds 200 --device cuda --resnet
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


class LoopSAM(torch.optim.Optimizer):
    """The usual hand-written SAM: a per-parameter Python loop and a clone of w every step."""

    def __init__(self, params, base_cls, rho=0.05, **kw):
        super().__init__(params, dict(rho=rho, **kw))
        self.base = base_cls(self.param_groups, **kw)

    @torch.no_grad()
    def first_step(self):
        norm = torch.norm(
            torch.stack(
                [
                    p.grad.norm()
                    for g in self.param_groups
                    for p in g["params"]
                    if p.grad is not None
                ]
            )
        )
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                self.state[p]["old_p"] = p.clone()
                p.add_(p.grad * (g["rho"] / (norm + 1e-12)))
        self.zero_grad()

    @torch.no_grad()
    def second_step(self):
        for g in self.param_groups:
            for p in g["params"]:
                if "old_p" in self.state[p]:
                    p.copy_(self.state[p]["old_p"])
        self.base.step()


def models(with_resnet: bool):
    yield (
        "MLP 784-512-512-10",
        nn.Sequential(
            nn.Flatten(),
            nn.Linear(784, 512),
            nn.ReLU(),
            nn.Linear(512, 512),
            nn.ReLU(),
            nn.Linear(512, 10),
        ),
        (128, 1, 28, 28),
    )
    yield (
        "CNN 2x(conv32-pool)-fc",
        nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * 7 * 7, 10),
        ),
        (128, 1, 28, 28),
    )
    if with_resnet:
        from samkit.models import create_model

        yield "ResNet-20", create_model("resnet20", (3, 32, 32), 10), (128, 3, 32, 32)


def build_methods(model: nn.Module):
    """name -> (model copy, step function)."""
    sgd_kw = dict(lr=0.01, momentum=0.9)
    methods = {}

    def plain(m, opt):
        def step(x, y):
            opt.zero_grad()
            F.cross_entropy(m(x), y).backward()
            opt.step()

        return step

    def two_pass(m, opt):
        def step(x, y):
            opt.zero_grad()
            F.cross_entropy(m(x), y).backward()
            opt.first_step()
            F.cross_entropy(m(x), y).backward()
            opt.second_step()

        return step

    m = copy.deepcopy(model)
    methods["SGD"] = (m, plain(m, torch.optim.SGD(m.parameters(), **sgd_kw)))
    m = copy.deepcopy(model)
    methods["samkit SAM"] = (m, two_pass(m, samkit.SAM(torch.optim.SGD(m.parameters(), **sgd_kw))))
    m = copy.deepcopy(model)
    base = torch.optim.SGD(samkit.param_groups(m), **sgd_kw)
    methods["samkit ASAM"] = (m, two_pass(m, samkit.ASAM(base, rho=0.5)))
    try:
        from pytorch_optimizer import SAM as PoSAM

        m = copy.deepcopy(model)
        methods["pytorch-optimizer SAM"] = (
            m,
            two_pass(m, PoSAM(m.parameters(), torch.optim.SGD, rho=0.05, **sgd_kw)),
        )
    except ImportError:
        print("pytorch-optimizer is not installed: pip install pytorch-optimizer (skipped)")
    m = copy.deepcopy(model)
    methods["loop SAM"] = (m, two_pass(m, LoopSAM(m.parameters(), torch.optim.SGD, **sgd_kw)))
    return methods


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench(name, model, shape, device, rounds, warmup):
    torch.manual_seed(0)
    model = model.to(device)
    x = torch.randn(*shape, device=device)
    y = torch.randint(0, 10, (shape[0],), device=device)
    methods = build_methods(model)
    times = {k: [] for k in methods}
    order = list(methods)
    rng = random.Random(0)
    for r in range(warmup + rounds):
        rng.shuffle(order)
        for k in order:
            _, step = methods[k]
            sync(device)
            t0 = time.perf_counter()
            step(x, y)
            sync(device)
            if r >= warmup:
                times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"\n{name} ({n_params / 1e6:.2f}M parameters), batch {shape[0]}, {device.type}, "
        f"median of {rounds} interleaved steps"
    )
    print("| method | ms / step | vs SGD | vs samkit SAM |\n|---|---|---|---|")
    for k in methods:
        print(
            f"| {k} | {1e3 * med[k]:.2f} | {med[k] / med['SGD']:.2f} | "
            f"{med[k] / med['samkit SAM']:.3f} |"
        )
    return med


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--resnet", action="store_true", help="add ResNet-20 (needs samkit.models)")
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name, model, shape in models(args.resnet):
        bench(name, model, shape, device, args.rounds, args.warmup)


if __name__ == "__main__":
    main()
