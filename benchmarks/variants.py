"""The SAM family against SGD and SAM on the `samkit compare` default: time per epoch, accuracy.

Runs ``samkit compare`` (the built-in default: an MLP 2x256 on a stratified 10,000-example subset
of Fashion-MNIST, 20 epochs, SGD momentum 0.9 with a cosine schedule, one thread per run; the
digits fallback when Fashion-MNIST is missing) with every variant of issue 8 at its default
settings, three seeds, and prints the table with the command, the machine and which variants
reach SAM's accuracy in less time (``--results FILE`` also writes it; the latest figures are kept
in BENCHMARKS.md).

    .venv/bin/python benchmarks/variants.py                       # the full benchmark
    .venv/bin/python benchmarks/variants.py --seeds 0 --epochs 2  # a smoke run

Wall time is measured on whatever else the machine is doing: the runs are interleaved by seed
(every optimizer for seed 0, then seed 1, ...) so that a burst of load hits all of them alike.
ESAM runs through the trainer's ordinary closure, i.e. with stochastic weight perturbation only
(its data selection needs per-example losses, see ``samkit.optim.ESAM``).
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

from samkit.experiments.compare import (
    DEFAULT,
    CompareResult,
    format_table,
    run_compare,
    with_fallback,
)

OPTIMIZERS = ["sgd", "sam", "gsam", "looksam", "esam", "aesam", "rst", "friendlysam", "fishersam"]


def verdict(result: CompareResult) -> list[str]:
    """Which variants reach SAM's final accuracy (within one SAM std) in less time than SAM.

    "Less time" means below 0.9x SAM's time per epoch: on a shared machine smaller differences
    are noise (a two-pass variant cannot really be faster than SAM)."""
    rows = {row["optimizer"]: row for row in result.rows()}
    if "sam" not in rows:
        return []
    sam_acc, sam_std = rows["sam"]["final_acc"]
    sam_time = rows["sam"]["time_per_epoch"]
    lines = []
    for name, row in rows.items():
        if name in ("sgd", "sam"):
            continue
        acc, _ = row["final_acc"]
        faster = row["time_per_epoch"] < 0.9 * sam_time
        as_good = acc >= sam_acc - max(sam_std, 1e-12)
        if faster and as_good:
            what = "reaches SAM's accuracy in less time"
        elif faster:
            what = "is faster than SAM but less accurate"
        elif as_good:
            what = "matches SAM's accuracy but is not faster"
        else:
            what = "neither faster nor as accurate as SAM"
        lines.append(
            f"- **{name}** {what}: {100 * acc:.2f}% vs SAM {100 * sam_acc:.2f} ± "
            f"{100 * sam_std:.2f}%, {row['time_per_epoch']:.2f} vs {sam_time:.2f} s/epoch "
            f"({row['time_per_epoch'] / sam_time:.2f}x SAM's time)"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optimizers", nargs="+", default=OPTIMIZERS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=None, help="default: the compare default")
    parser.add_argument("--out-dir", default=None, help="runs folder (default: a temporary one)")
    parser.add_argument("--results", default=None, help="also write the Markdown section here")
    args = parser.parse_args(argv)

    config, notes = with_fallback(DEFAULT)
    if args.epochs is not None:
        config = config.replace(epochs=args.epochs)
    out_dir = args.out_dir or tempfile.mkdtemp(prefix="samkit-variants-")
    config = config.replace(out_dir=out_dir)
    start = time.perf_counter()
    # one compare per seed, interleaving the optimizers in time; then the merged table
    merged: CompareResult | None = None
    for seed in args.seeds:
        part = run_compare(
            config, args.optimizers, [seed], name=f"variants-s{seed}", overwrite=True,
            verbose=1, notes=notes,
        )  # fmt: skip
        if merged is None:
            merged = part
        else:
            merged.runs.extend(part.runs)
    merged.seeds = list(args.seeds)
    wall = time.perf_counter() - start

    table = format_table(merged)
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("n/a",)
    command = "python benchmarks/variants.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    lines = [
        "# The SAM family vs SGD and SAM (`samkit compare` default)",
        "",
        f"Command: `{command.strip()}` ({wall / 60:.1f} min in all).",
        "",
        f"Setting: {config.dataset}, subset {config.subset}, {config.model} "
        f"{config.model_kwargs}, {config.epochs} epochs, batch {config.batch_size}, lr "
        f"{config.lr} ({config.schedule}), momentum {config.momentum}, weight decay "
        f"{config.weight_decay}, seeds {' '.join(map(str, args.seeds))}, one thread per run. Every "
        "variant at its default settings (samkit.list_optimizers / the class docstrings).",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores "
        f"shared with other work (load average at the end: "
        f"{', '.join(f'{v:.1f}' for v in load) if load[0] != 'n/a' else 'n/a'}), torch "
        f"{torch.__version__}. Times are wall-clock seconds per training epoch (evaluation "
        "excluded), mean over seeds; the shared machine makes them noisy by about 10%.",
        "",
        *[f"Note: {n}" for n in notes],
        "",
        table,
        "",
        "Forward-backward passes per step: SGD 1; SAM, GSAM, FriendlySAM, Fisher SAM 2; ESAM 2 "
        "(SWP only here); LookSAM 1 + 1/k (k = 5); AE-SAM 1 + the fraction of steps its rule "
        "picks; RST 1 + p (p = 0.5).",
        "",
        "Against SAM (final test accuracy within one SAM standard deviation counts as SAM's; "
        "faster means below 0.9x SAM's time per epoch, smaller gaps are within the noise of the "
        "shared machine):",
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
