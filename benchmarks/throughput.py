"""Training throughput (images per second) of SGD, SAM and ASAM on the `samkit compare` default.

Each optimizer trains the default (an MLP 2x256 on 10,000 Fashion-MNIST examples, batch 128)
with the real trainer for a few epochs; the throughput is the median over the epochs after the
first (warm-up) of examples / training time (evaluation excluded). A sharpness-aware step costs
two forward-backward passes, so the ideal ratio to SGD is about 2.

    python benchmarks/throughput.py                       # CPU, one thread (the default's)
    python benchmarks/throughput.py --threads 2
    python benchmarks/throughput.py --device cuda --threads 0   # on a GPU (threads 0: torch's)

Prints the table (Markdown, with the command and the machine); --out FILE also writes it there.
The latest figures are kept in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from samkit.experiments.compare import DEFAULT, with_fallback
from samkit.train import Trainer, read_metrics
from samkit.train.trainer import resolve_device


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def measure(optimizers, device, threads, epochs, subset, batch_size):
    base, notes = with_fallback(DEFAULT)
    changes = dict(epochs=epochs, device=device, threads=threads or None, checkpoint=False,
                   batch_size=batch_size, eval_every=epochs)
    if base.dataset == DEFAULT.dataset:
        changes["subset"] = subset
    base = base.replace(**changes)
    from samkit.data import load_dataset

    data = load_dataset(base.dataset, subset=base.subset, device=resolve_device(device))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in optimizers:
            cfg = base.replace(optimizer=name, out_dir=tmp, name=name)
            start = time.perf_counter()
            Trainer(cfg, data=data, verbose=0).fit()
            wall = time.perf_counter() - start
            epochs_ = [r for r in read_metrics(cfg.run_dir) if r["event"] == "epoch"]
            rates = [r["images_per_s"] for r in epochs_[1:]] or [epochs_[0]["images_per_s"]]
            rows.append({"optimizer": name, "images_per_s": statistics.median(rates),
                         "min": min(rates), "max": max(rates), "wall": wall})
            print(f"{name:8s} {rows[-1]['images_per_s']:9.0f} images/s "
                  f"(epochs 2-{epochs}: {min(rates):.0f}-{max(rates):.0f})", flush=True)
    return base, rows, notes


def table(rows) -> str:
    ref = next((r for r in rows if r["optimizer"] == "sgd"), rows[0])
    lines = ["| optimizer | images/s (median) | range over epochs | time vs "
             f"{ref['optimizer']} |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['optimizer']} | {r['images_per_s']:.0f} | {r['min']:.0f}-"
                     f"{r['max']:.0f} | {ref['images_per_s'] / r['images_per_s']:.2f}x |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--optimizers", nargs="+", default=["sgd", "sam", "asam"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="0: torch's default")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--subset", type=int, default=DEFAULT.subset)
    parser.add_argument("--batch-size", type=int, default=DEFAULT.batch_size)
    parser.add_argument("--out", default=None, help="also write the Markdown section here")
    parser.add_argument("--note", default="", help="a line added under the table")
    args = parser.parse_args(argv)
    base, rows, notes = measure(args.optimizers, args.device, args.threads, args.epochs,
                                args.subset, args.batch_size)
    device = resolve_device(args.device)
    where = (torch.cuda.get_device_name(device) if device.type == "cuda" else
             f"{cpu_name()}, {args.threads or torch.get_num_threads()} thread(s)")
    args_text = list(argv if argv is not None else sys.argv[1:])
    if "--note" in args_text:  # the note is shown below the table, not in the command
        i = args_text.index("--note")
        del args_text[i : i + 2]
    command = "python benchmarks/throughput.py " + " ".join(shlex.quote(a) for a in args_text)
    text = "\n".join([
        "# Training throughput: SGD vs SAM vs ASAM",
        "",
        f"Command: `{command.strip()}`",
        "",
        f"Setting: the `samkit compare` default: {base.dataset}, {base.subset or 'all'} training "
        f"examples, {base.model} {base.model_kwargs}, batch {base.batch_size}; the samkit "
        f"trainer, {args.epochs} epochs, median over epochs 2-{args.epochs} of training "
        "examples per second (evaluation excluded).",
        f"Machine: {where}; torch {torch.__version__}, Python {platform.python_version()}.",
        "",
        table(rows),
        "",
        *(f"Note: {n}" for n in notes + ([args.note] if args.note else [])),
    ])
    print("\n" + text.rstrip())
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text.rstrip() + "\n")
        print(f"\nwritten: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
