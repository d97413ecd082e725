"""Time per training step: SGD, samkit's one-pass methods, the official MSAM and davda54's SAM.

One interleaved run: in every round each method takes ``--steps`` steps on its own copy of the
same model and batch, the methods in a shuffled order, so drifts in machine load hit all of them
alike; the table gives the median time per step and the ratio to SGD. Each method is written as
its users write it:

* SGD: ``zero_grad``, ``backward``, ``step()``; also with ``foreach=True`` (torch's multi-tensor
  kernels, which samkit's optimizers use for the SGD step they take themselves);
* official MSAM (MarlonBecker/MSAM ``optimizer/msam.py``, ρ = 1): the same as SGD (it keeps the
  model at the perturbed point between steps);
* samkit MSAM (ρ = 1), SAF (its trajectory term on in every step, over the
  positions of a shuffled 10,000-example training set, epoch after epoch; first
  ``--saf-epochs`` untimed epochs, so that its memory holds a record of every example, as in
  most of a run: before that it also reads the record flags) and SAM (ρ = 0.05):
  ``opt.step(closure)``;
* davda54 SAM (``sam.py``, ρ = 0.05): ``first_step(zero_grad=True)``, ``second_step(...)``.

The peers' files are not part of samkit: give their paths (methods whose file is not given are
left out)::

    python benchmarks/step_cost.py --official-msam /path/to/MSAM/optimizer/msam.py \\
        --davda54-sam /path/to/sam/sam.py

All methods: SGD with lr 0.05, momentum 0.9, weight decay 5e-4, float32, CPU. Models: MLP
784-256-256-10 at 1 thread and MLP 784-1000-1000-1000-10 at 2 threads, batch 128.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import samkit

F = nn.functional
SGD_KW = dict(lr=0.05, momentum=0.9, weight_decay=5e-4)
NUM_EXAMPLES = 10_000  # SAF's memory rows (the main job's training set)


def load_class(path: str, name: str) -> type:
    """Class ``name`` of the Python file at ``path`` (imported from there, under its own name)."""
    file = Path(path)
    if not file.is_file():
        raise SystemExit(f"no such file: {path}")
    spec = importlib.util.spec_from_file_location(f"peer_{file.stem}_{name}", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, name)


class Batches:
    """Example positions as a loader gives them to SAF: each epoch a new permutation of the
    ``n`` examples in batches (the last partial one dropped), the epoch counting from 2 (SAF's
    term on from the first step, as in an epoch after ``start_epoch``)."""

    def __init__(self, n: int, batch: int) -> None:
        self.n, self.batch, self.epoch, self.order, self.start = n, batch, 1, None, n

    def next(self) -> tuple[torch.Tensor, int]:
        if self.start + self.batch > self.n:
            self.epoch += 1
            self.order, self.start = torch.randperm(self.n), 0
        rows = self.order[self.start:self.start + self.batch]
        self.start += self.batch
        return rows, self.epoch


def mlp(widths: list[int]) -> nn.Module:
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:], strict=True):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def methods(model: nn.Module, official_msam: type | None, davda54_sam: type | None,
            loader: Batches) -> dict[str, Callable]:
    """name -> step(x, y), each on its own copy of ``model``."""
    out: dict[str, Callable] = {}

    m = copy.deepcopy(model)
    sgd = torch.optim.SGD(m.parameters(), **SGD_KW)

    def sgd_step(x, y, m=m, opt=sgd):
        opt.zero_grad()
        F.cross_entropy(m(x), y).backward()
        opt.step()

    out["SGD"] = sgd_step

    m = copy.deepcopy(model)
    sgd_foreach = torch.optim.SGD(m.parameters(), foreach=True, **SGD_KW)

    def sgd_foreach_step(x, y, m=m, opt=sgd_foreach):
        opt.zero_grad()
        F.cross_entropy(m(x), y).backward()
        opt.step()

    out["SGD foreach"] = sgd_foreach_step

    if official_msam is not None:
        m = copy.deepcopy(model)
        official = official_msam(m.parameters(), rho=1.0, **SGD_KW)

        def official_step(x, y, m=m, opt=official):
            opt.zero_grad()
            F.cross_entropy(m(x), y).backward()
            opt.step()

        out["official MSAM"] = official_step

    def closure_step(m, opt, term=None):
        def step(x, y):
            def closure():
                opt.zero_grad()
                out = m(x)
                loss = F.cross_entropy(out, y)
                (loss if term is None else loss + term(out)).backward()
                return loss

            opt.step(closure)

        return step

    m = copy.deepcopy(model)
    out["samkit MSAM"] = closure_step(m, samkit.MSAM(torch.optim.SGD(m.parameters(), **SGD_KW),
                                                     rho=1.0))
    m = copy.deepcopy(model)
    saf = samkit.SAF(torch.optim.SGD(m.parameters(), **SGD_KW), lam=6.0, start_epoch=-1,
                     num_examples=NUM_EXAMPLES)
    out["samkit SAF"] = closure_step(
        m, saf, lambda output, opt=saf: opt.trajectory_loss(output, *loader.next()))
    m = copy.deepcopy(model)
    out["samkit SAM"] = closure_step(m, samkit.SAM(torch.optim.SGD(m.parameters(), **SGD_KW),
                                                   rho=0.05))

    if davda54_sam is not None:
        m = copy.deepcopy(model)
        sam = davda54_sam(m.parameters(), torch.optim.SGD, rho=0.05, **SGD_KW)

        def davda54_step(x, y, m=m, opt=sam):
            F.cross_entropy(m(x), y).backward()
            opt.first_step(zero_grad=True)
            F.cross_entropy(m(x), y).backward()
            opt.second_step(zero_grad=True)

        out["davda54 SAM"] = davda54_step
    return out


def bench(widths: list[int], threads: int, args, official_msam, davda54_sam) -> dict[str, float]:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = mlp(widths)
    x = torch.randn(args.batch, widths[0])
    y = torch.randint(0, widths[-1], (args.batch,))
    loader = Batches(NUM_EXAMPLES, args.batch)
    steps = methods(model, official_msam, davda54_sam, loader)
    for _ in range(args.saf_epochs * (NUM_EXAMPLES // args.batch)):
        steps["samkit SAF"](x, y)
    times: dict[str, list[float]] = {k: [] for k in steps}
    order = list(steps)
    rng = random.Random(0)
    clock = CLOCKS[args.clock]
    for r in range(args.warmup + args.rounds):
        rng.shuffle(order)
        for name in order:
            step = steps[name]
            t0 = clock()
            for _ in range(args.steps):
                step(x, y)
            if r >= args.warmup:
                times[name].append((clock() - t0) / args.steps)
    return {k: statistics.median(v) for k, v in times.items()}


# wall: what a user waits (use it on an idle machine); cpu: this process's CPU time, which a
# loaded machine inflates far less (time spent descheduled is not counted)
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}

SETTINGS = [([784, 256, 256, 10], 1, "MLP 784-256-256-10, batch 128, 1 thread"),
            ([784, 1000, 1000, 1000, 10], 2, "MLP 784-1000³-10, batch 128, 2 threads")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--official-msam", metavar="PATH",
                    help="MarlonBecker/MSAM's optimizer/msam.py (not part of samkit)")
    ap.add_argument("--davda54-sam", metavar="PATH", help="davda54/sam's sam.py")
    ap.add_argument("--rounds", type=int, default=60, help="timed rounds (60)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed rounds first (5)")
    ap.add_argument("--saf-epochs", type=int, default=8,
                    help="SAF's untimed epochs first, so that its memory is complete (8; 0: "
                         "time its first epochs)")
    ap.add_argument("--steps", type=int, default=5, help="steps per method per round (5)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--models", choices=("both", "small", "large"), default="both",
                    help="the MLP 784-256-256-10 (small), the 784-1000³-10 (large) or both")
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                    help="wall time (default; on an idle machine) or process CPU time (on a "
                         "loaded one)")
    args = ap.parse_args()
    official = load_class(args.official_msam, "MSAM") if args.official_msam else None
    davda54 = load_class(args.davda54_sam, "SAM") if args.davda54_sam else None
    chosen = {"both": SETTINGS, "small": SETTINGS[:1], "large": SETTINGS[1:]}[args.models]
    rows = [(label, bench(widths, threads, args, official, davda54))
            for widths, threads, label in chosen]
    names = list(rows[0][1])
    print(f"torch {torch.__version__}; median {args.clock} time per step over {args.rounds} "
          f"interleaved rounds of {args.steps} steps; ratios to SGD\n")
    print("| model, threads | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for label, med in rows:
        cells = [f"{1e3 * med['SGD']:.2f} ms"]
        cells += [f"{med[k] / med['SGD']:.2f}×" for k in names[1:]]
        print(f"| {label} | " + " | ".join(cells) + " |")
    if official is not None:
        print("\nsamkit MSAM / official MSAM: " + ", ".join(
            f"{med['samkit MSAM'] / med['official MSAM']:.3f} ({label.split(',')[0]})"
            for label, med in rows))


if __name__ == "__main__":
    main()
