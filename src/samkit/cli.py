"""The ``samkit`` command: train one run, or compare optimizers on the same budget.

Examples (real commands; the numbers in the README were measured with them)::

    # the main job (= samkit demo): SGD, SAM, ASAM and SAF on Fashion-MNIST with 40 % of the
    # training labels flipped (MLP, 10k stratified subset, 20 epochs, 3 seeds), then SGD for
    # the time of the costliest; two runs at a time; writes
    # runs/compare-fashion-mnist-mlp-noise40/report.md, curves.png and summary.json
    samkit compare -j 2

    # the same on clean labels
    samkit compare --label-noise 0

    # other optimizers, their own settings, fewer seeds, a quick budget (a run name of its
    # own: the default name ends with a digest of the settings that differ)
    samkit compare --optimizers sgd sam:rho=0.1 asam:rho=1.0 --seeds 0 1 --epochs 5

    # one run from a config, with overrides (YAML values, type-checked)
    samkit train --config configs/fashion-mnist-mlp.yaml --set optimizer=asam --set rho=0.5
    samkit train --dataset digits --model mlp --optimizer sam --epochs 10 --name digits-sam

    # continue an interrupted run (Ctrl-C leaves a checkpoint), or extend its budget
    samkit train --config configs/fashion-mnist-mlp.yaml --resume --set epochs=30

    # data parallel over 2 processes (gloo on CPU, NCCL on GPU); each replica its own eps
    torchrun --nproc-per-node 2 -m samkit train --dataset digits --optimizer sam \
        --perturbation local --name digits-sam-ddp

    # the ASAM paper's CIFAR-10 setting (needs the data and a GPU)
    samkit train --config configs/asam-paper/cifar10-wrn28-10-asam.yaml --data-dir ~/data

    # the edge of stability (Long & Bartlett): full-batch GD and SAM on 2,000 Fashion-MNIST
    # images; lambda_1 against 2/eta and the SAM-edge, figures and a table
    samkit eos
    samkit eos --lr 0.05 0.1 --rho 0.02 0.05 --steps 600

    # adaptive sharpness vs the generalization gap (Kwon et al.): 36 models, Kendall tau
    samkit correlate -j 2
    samkit correlate --quick

    samkit download cifar10 --data-dir ~/data   # official URLs, checksums verified
    samkit list        # optimizers, models, data sets and config keys

Order of precedence: the config file, then the flags (--dataset, --lr, ...), then --set.
Flags mean one thing everywhere: --lr (several values where an experiment runs several),
--jobs / -j, --name (one folder inside --out-dir), --overwrite (replaces only what samkit
wrote), --resume, --quiet / -q.
Exit status: 0 done (finite numbers), 2 bad input, 3 a run diverged (the last good checkpoint is
kept), 4 a file could not be written, e.g. a full disk (the last checkpoint is kept), 130 / 143
stopped by Ctrl-C / SIGTERM (a resumable checkpoint was saved).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from samkit.experiments import base

# Every subcommand lives in its module and registers itself there (add_parser(sub)): the
# experiments, then the small tools of this module.
COMMANDS = (
    "samkit.experiments.train",
    "samkit.experiments.compare",
    "samkit.cli:add_demo",
    "samkit.cli:add_download",
    "samkit.cli:add_list",
    "samkit.experiments.eos",
    "samkit.experiments.correlate",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="samkit",
        description="Sharpness-aware training (SAM, ASAM, ...) and sharpness measurement.",
        epilog="examples:" + __doc__.split("Examples", 1)[1].split("::", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=version_line())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for entry in COMMANDS:
        module, _, function = entry.partition(":")
        getattr(importlib.import_module(module), function or "add_parser")(sub)
    return parser


def version_line() -> str:
    """``samkit X (torch Y, Python Z)``."""
    import platform

    import samkit

    try:
        import torch

        extra = f"torch {torch.__version__}, "
    except ImportError:  # pragma: no cover - torch is a dependency
        extra = ""
    return f"samkit {getattr(samkit, '__version__', 'unknown')} ({extra}Python " \
        f"{platform.python_version()})"


# ----------------------------------------------------------------------------- small tools


def add_demo(sub) -> None:
    p = base.subcommand(sub, "demo", cmd_demo,
                        help="the default comparison (same as `samkit compare`)")
    p.add_argument("--jobs", "-j", type=int, default=None, help="runs trained at once")
    base.add_run_flags(p)  # what the comparison's messages advise: --resume, --overwrite


def cmd_demo(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """``samkit demo [flags]`` is ``samkit compare [the same flags]``."""
    flags = [f"--{key}" for key in ("resume", "overwrite", "quiet") if getattr(args, key)]
    if args.jobs is not None:
        flags += ["--jobs", str(args.jobs)]
    compare_argv = ["compare", *flags]
    compare_args = build_parser().parse_args(compare_argv)
    return compare_args.handler(compare_args, compare_argv)


def add_download(sub) -> None:
    p = base.subcommand(
        sub, "download", cmd_download,
        help="download a data set from its official URLs (checksums verified)",
        description="Download a data set into --data-dir (default: $SAMKIT_DATA, else "
        "~/.cache/samkit/<name>); files are verified and written atomically.",
        epilog="example:\n  samkit download cifar10 --data-dir ~/data\n",
    )
    p.add_argument("dataset", help="fashion-mnist, mnist, cifar10 or cifar100")
    p.add_argument("--data-dir", default=None, help="where to put the files")


def cmd_download(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from samkit.data import download_dataset

    print(f"{args.dataset}: {download_dataset(args.dataset, args.data_dir)}")
    return 0


def add_list(sub) -> None:
    p = base.subcommand(sub, "list", cmd_list,
                        help="optimizers, models, data sets and config keys")
    p.add_argument("--keys", action="store_true", help="only the config keys")


def cmd_list(args: argparse.Namespace, argv: Sequence[str] = ()) -> int:
    from samkit.config import FIELDS, field_help

    if not args.keys:
        from samkit.data import DATASETS
        from samkit.models import list_models
        from samkit.optim.registry import describe_optimizers

        print("optimizers:")
        for name, text in describe_optimizers().items():
            print(f"  {name:10s} {text}")
        print("models:\n  " + ", ".join(list_models()))
        print("data sets:\n  " + ", ".join(sorted(DATASETS)))
        print("config keys (samkit train --set KEY=VALUE):")
    helps = field_help()
    for key in FIELDS:
        print(f"  {key:17s} {helps.get(key, '')}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = base.parse_command(parser, argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.handler(args, argv)
    except base.INPUT_ERRORS as err:
        return base.error(err)


if __name__ == "__main__":
    sys.exit(main())
