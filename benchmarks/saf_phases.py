"""Where SAF's extra time per step goes: each phase of a training step timed inside the step.

`benchmarks/step_cost.py` gives SAF's whole step against SGD's; this script splits the step
into its phases, each timed with ``time.perf_counter`` around it while the step runs as users
write it (``opt.step(closure)``, the term added to the loss in the closure):

* *entry, zero_grad*: from the call of ``step`` (SGD: the start of the step) to the forward;
* *forward*: the model and the cross-entropy;
* *term*: ``opt.trajectory_loss(...)`` and its addition to the loss (reading the record of
  ``lag`` epochs ago, the KL term's value and closed-form gradient, recording the logits);
* *backward*; *step*: the base step and what samkit does around it.

Three methods, interleaved in a shuffled order every round on their own copies of the same
model and batch: SGD, SAF with its term on, SAF with the term off (``start_epoch`` never
reached: the record keeping alone). SAF first trains ``--warmup-epochs`` epochs over the shuffled
positions of a 10,000-example set, so that its memory holds every example (the steady state of
a run; the first epochs also read the record flags).

    .venv/bin/python benchmarks/saf_phases.py --rounds 300

Each phase's median over the rounds; the phases' medians need not add up to the step's.
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import time
from collections.abc import Callable

import torch
from step_cost import NUM_EXAMPLES, SGD_KW, Batches, mlp
from torch import nn

import samkit

F = nn.functional
PHASES = ("entry, zero_grad", "forward", "term", "backward", "step", "whole step")


def sgd_step(model: nn.Module, x, y, times: list) -> Callable[[], None]:
    opt = torch.optim.SGD(model.parameters(), **SGD_KW)

    def step() -> None:
        t0 = time.perf_counter()
        opt.zero_grad()
        t1 = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        t2 = time.perf_counter()
        loss.backward()
        t3 = time.perf_counter()
        opt.step()
        t4 = time.perf_counter()
        times.append((t1 - t0, t2 - t1, 0.0, t3 - t2, t4 - t3, t4 - t0))

    return step


def saf_step(model: nn.Module, x, y, times: list, start_epoch: int, warmup_epochs: int
             ) -> Callable[[], None]:
    opt = samkit.SAF(torch.optim.SGD(model.parameters(), **SGD_KW), lam=6.0,
                     start_epoch=start_epoch, num_examples=NUM_EXAMPLES)
    loader = Batches(NUM_EXAMPLES, len(y))
    marks: dict[str, float] = {}

    def closure():
        marks["closure"] = time.perf_counter()
        opt.zero_grad()
        marks["zeroed"] = time.perf_counter()
        out = model(x)
        loss = F.cross_entropy(out, y)
        marks["forward"] = time.perf_counter()
        total = loss + opt.trajectory_loss(out, *loader.next())
        marks["term"] = time.perf_counter()
        total.backward()
        marks["backward"] = time.perf_counter()
        return loss

    def step() -> None:
        t0 = time.perf_counter()
        opt.step(closure)
        t1 = time.perf_counter()
        m = marks
        times.append((m["zeroed"] - t0, m["forward"] - m["zeroed"], m["term"] - m["forward"],
                      m["backward"] - m["term"], t1 - m["backward"], t1 - t0))

    for _ in range(warmup_epochs * (NUM_EXAMPLES // len(y))):
        step()
    times.clear()
    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=300, help="timed rounds (300)")
    ap.add_argument("--steps", type=int, default=3, help="steps per method per round (3)")
    ap.add_argument("--warmup-epochs", type=int, default=8,
                    help="SAF's epochs before timing, so that its memory is complete (8)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = mlp([784, 256, 256, 10])
    x, y = torch.randn(128, 784), torch.randint(0, 10, (128,))
    times: dict[str, list] = {"SGD": [], "SAF": [], "SAF, term off": []}
    steps = {"SGD": sgd_step(copy.deepcopy(model), x, y, times["SGD"]),
             "SAF": saf_step(copy.deepcopy(model), x, y, times["SAF"], -1, args.warmup_epochs),
             "SAF, term off": saf_step(copy.deepcopy(model), x, y, times["SAF, term off"],
                                       10**9, args.warmup_epochs)}
    order = list(steps)
    rng = random.Random(0)
    for _ in range(args.rounds):
        rng.shuffle(order)
        for name in order:
            for _ in range(args.steps):
                steps[name]()
    print(f"torch {torch.__version__}; MLP 784-256-256-10, batch 128, 1 thread; median µs per "
          f"phase over {args.rounds} interleaved rounds of {args.steps} steps\n")
    print("| phase | " + " | ".join(times) + " | SAF − SGD |")
    print("|---" * (len(times) + 2) + "|")
    for i, phase in enumerate(PHASES):
        med = {k: 1e6 * statistics.median(t[i] for t in v) for k, v in times.items()}
        print(f"| {phase} | " + " | ".join(f"{v:.0f}" for v in med.values())
              + f" | {med['SAF'] - med['SGD']:+.0f} |")


if __name__ == "__main__":
    main()
