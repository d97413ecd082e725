"""SAM's generalization at SGD's cost? Every cheaper variant side by side with SGD, equal-time SGD,
SAM and ASAM, on the `samkit compare` default (where SAM beats SGD by many standard deviations).

Runs ``samkit.experiments.compare.run_compare`` on the built-in default (an MLP 2x256 on a
stratified 10,000-example subset of Fashion-MNIST with 40 % of the labels flipped, 20 epochs, SGD
momentum 0.9 with a cosine schedule, one thread per run; the digits fallback when Fashion-MNIST
is missing) once per seed, so that the methods are interleaved in time and a burst of load hits
them alike; then SGD is trained again, per seed, for the (measured) training time of the most
expensive method. Prints the table: final test accuracy, training seconds and forward-backward
passes, and whether the goal is met: a method within one SAM standard deviation of SAM's accuracy
at no more than 1.15x SGD's training time (``--results FILE`` also writes the section).

    .venv/bin/python benchmarks/variants.py                       # the full benchmark
    .venv/bin/python benchmarks/variants.py --seeds 0 --epochs 2  # a smoke run

Registry names that are not registered (``msam`` before the composable optimizer family lands)
are left out with a note. The one-pass methods' settings are in ``OPTIMIZERS``; see the
BENCHMARKS.md section for how they were chosen.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

from samkit.experiments import base as experiment
from samkit.experiments.compare import (
    DEFAULT,
    CompareResult,
    add_equal_budget_row,
    format_table,
    parse_optimizer_spec,
    run_compare,
    with_fallback,
)
from samkit.experiments.tuned import paired_row
from samkit.optim import list_optimizers

OPTIMIZERS = [
    "sgd", "sam", "asam", "aesam", "rst", "looksam", "msam:rho=1",
    "saf:lam=6", "mesa:lam=6,ema_decay=0.987",
    # issue 23: WSAM, GCSAM at their defaults; SAM every 2nd step (Composer's interval);
    # bSAM at the paper's lr 0.5 (its averaged momentum: SGD's 0.05 / (1 - 0.9)), N = the subset
    "wsam", "gcsam", "periodicsam:interval=2", "bsam:lr=0.5,num_data=10000",
]
GOAL_TIME = 1.15  # x SGD's training time


def verdict(result: CompareResult) -> list[str]:
    """Each method against SAM's accuracy (within one SAM std; the paired difference to SAM with
    its 95 % interval over the seeds) and 1.15x SGD's training time."""
    rows = {row["optimizer"]: row for row in result.rows()}
    if "sam" not in rows or "sgd" not in rows:
        return []
    sam_acc, sam_std = rows["sam"]["final_acc"]
    sgd_time = rows["sgd"]["train_seconds"]
    lines, met = [], []
    for name, row in rows.items():
        if name in ("sgd", "sam"):
            continue
        acc, _ = row["final_acc"]
        ratio = row["train_seconds"] / sgd_time
        as_good = acc >= sam_acc - sam_std
        cheap = ratio <= GOAL_TIME
        if as_good and cheap and name != result.equal_budget_label:
            met.append(name)
        paired = paired_row(result, "sam", name)
        iv = paired["interval"]
        versus = (f"{100 * iv['estimate']:+.2f} [{100 * iv['low']:+.2f}, {100 * iv['high']:+.2f}] "
                  f"pp vs SAM, {len(paired['seeds'])} seeds, 95 % paired t: {paired['verdict']}"
                  if iv is not None else f"vs SAM: {paired['verdict']}")
        lines.append(
            f"- **{name}**: {100 * acc:.2f} % ({versus}; SAM's "
            f"{100 * sam_acc:.2f} ± {100 * sam_std:.2f}), {ratio:.2f}x SGD's training time, "
            f"{row['passes'] / rows['sgd']['passes']:.2f}x its passes: "
            + ("(the baseline row)" if name == result.equal_budget_label else
               "**meets the goal**" if as_good and cheap else
               "as accurate as SAM but not cheap enough" if as_good else
               "cheap enough but less accurate than SAM" if cheap else "neither")
        )
    head = (f"Goal (within one SAM std of SAM's accuracy at <= {GOAL_TIME}x SGD's training time): "
            + (f"met by {', '.join(met)}." if met else "**not met** by any method."))
    return [head, "", *lines]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optimizers", nargs="+", default=OPTIMIZERS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=None, help="default: the compare default")
    parser.add_argument("--out-dir", default=None, help="runs folder (default: a temporary one)")
    parser.add_argument("--results", default=None, help="also write the Markdown section here")
    parser.add_argument("--resume", action="store_true",
                        help="keep the finished runs in --out-dir and continue the others")
    args = parser.parse_args(argv)

    known = set(list_optimizers())
    optimizers = [o for o in args.optimizers if parse_optimizer_spec(o)[0] in known]
    notes = [f"{o} is not registered here; left out" for o in args.optimizers
             if o not in optimizers]
    config, fallback = with_fallback(DEFAULT)
    notes += fallback
    if args.epochs is not None:
        config = config.replace(epochs=args.epochs)
    out_dir = args.out_dir or tempfile.mkdtemp(prefix="samkit-variants-")
    config = config.replace(out_dir=out_dir)
    start = time.perf_counter()
    # one compare per seed, interleaving the optimizers in time; then the merged table
    merged: CompareResult | None = None
    for seed in args.seeds:
        part = run_compare(config, optimizers, [seed], name=f"variants-s{seed}",
                           overwrite=not args.resume, resume=args.resume, verbose=1)
        if merged is None:
            merged = part
        else:
            merged.runs.extend(part.runs)
    merged.seeds = list(args.seeds)
    merged.notes = list(notes)
    from samkit.train.trainer import resolve_device

    data = experiment.load_data(config, resolve_device(config.device))
    add_equal_budget_row(merged, config, "sgd", data, list(args.seeds), Path(out_dir) / "equal",
                         args.resume, not args.resume, 1, None, len(args.seeds))
    wall = time.perf_counter() - start

    table = format_table(merged)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    command = "python benchmarks/variants.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    lines = [
        "# SAM's generalization at SGD's cost? (`samkit compare` default, 40 % label noise)",
        "",
        f"Command: `{command.strip()}` ({wall / 60:.1f} min in all).",
        "",
        f"Setting: {config.dataset}, subset {config.subset}, {100 * config.label_noise:g} % "
        f"label noise, {config.model} {config.model_kwargs}, {config.epochs} epochs, batch "
        f"{config.batch_size}, lr {config.lr} ({config.lr_schedule}), momentum "
        f"{config.momentum}, weight decay {config.weight_decay}, seeds "
        f"{' '.join(map(str, args.seeds))}, one thread per run.",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores "
        "shared with other work (load average at the end: "
        + (", ".join(f"{v:.1f}" for v in load) if load else "n/a")
        + f"), torch {torch.__version__}. *train s*: seconds in the optimizer steps per run "
        "(evaluation excluded), mean over seeds, measured under that load.",
        "",
        *[f"Note: {n}" for n in merged.notes],
        "",
        table,
        "",
        *verdict(merged),
        "",
    ]
    print("\n".join(lines))
    if args.results:
        path = Path(args.results)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text("\n".join(lines))
        tmp.replace(path)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
