"""``samkit correlate``: its flags (generated from the config where they map to one key),
the config from the arguments, the command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from samkit import config as C
from samkit.config import TrainConfig
from samkit.experiments import base
from samkit.experiments.correlate.config import (
    DEFAULT,
    CorrelateConfig,
    apply_preset,
    apply_study_overrides,
    field_help,
    load_correlate_config,
    with_fallback,
)
from samkit.experiments.correlate.report import format_table
from samkit.experiments.correlate.stats import verdicts
from samkit.experiments.correlate.study import run_correlate


def add_parser(sub) -> argparse.ArgumentParser:
    """Add ``samkit correlate`` to the CLI's subparsers; the handler is :func:`cmd_correlate`."""
    d = DEFAULT
    helps = field_help()
    keys = "\n".join(f"  {k:20s} {helps.get(k, '')}" for k in helps if k != "train")
    p = base.subcommand(
        sub, "correlate", cmd_correlate,
        help="rank-correlate sharpness and adaptive sharpness with the gap",
        description="Train a grid of models (batch size × learning rate × weight decay × "
        "dropout) to the same training loss, measure sharpness and adaptive sharpness (p = 2 "
        "and ∞, a few ρ), λ₁ and the Hessian trace, and rank-correlate each with the "
        "generalization gap (Kendall τ). Writes runs/<name>/{report.md,scatter.png,"
        "results.csv,summary.json}. Running it again continues an interrupted study from its "
        "cache. Default: 36 MLPs (2x128 ReLU) on 2,000 Fashion-MNIST images, trained to "
        f"cross-entropy {d.stop_loss:g} (at most {d.train.epochs} epochs); under 30 minutes on "
        "2 CPU cores with --jobs 2.",
        epilog="examples:\n"
        "  samkit correlate --jobs 2\n"
        "  samkit correlate --quick\n"
        "  samkit correlate --measures andriushchenko2023 --jobs 2\n"
        "  samkit correlate --batch-size 32 256 --lr 0.01 0.1 --rescale 10\n"
        "  samkit correlate --config configs/correlate.yaml --set train.subset=5000 steps=20\n"
        "\nstudy keys (--set KEY=VALUE; training keys as train.KEY=VALUE):\n" + keys + "\n",
    )
    base.add_config_flags(p, "study keys, and train: {training keys}")
    p.add_argument("--quick", action="store_true",
                   help="a tiny study (8 small models, one ρ each) for tests and demos")
    p.add_argument("--jobs", "-j", type=int, default=1, help="models trained at once (processes)")
    from samkit.measures import PRESET_SOURCES

    p.add_argument(
        "--measures", choices=tuple(PRESET_SOURCES), default=None,
        help="the measure setting of a published study, applied before --set: "
        + "; ".join(f"{k}: {v}" for k, v in PRESET_SOURCES.items()) + " (default: kwon2021)")
    study_flags = ("batch_sizes", "lrs", "weight_decays", "dropouts", "stop_loss", "rescale")
    texts = {k: f"{helps[k]} (default: {_show(getattr(d, k))})" for k in study_flags}
    C.add_flags(p, CorrelateConfig, study_flags, texts)
    p.add_argument("--fixed-epochs", action="store_true",
                   help="no loss threshold: every model trains for --epochs epochs")
    texts = {"epochs": "the most epochs (the budget)",
             "dataset": f"data set (default {d.train.dataset})",
             "subset": "training examples (stratified)"}
    C.add_flags(p, TrainConfig, TRAIN_FLAGS, texts, prefix="train_")
    p.add_argument("--name", default=None, help="runs/<name>/ (default: correlate-<data>-<model>)")
    p.add_argument("--overwrite", action="store_true",
                   help="delete the study's cache and start again")
    p.add_argument("--quiet", "-q", action="store_true", help="only the final table")
    return p


TRAIN_FLAGS = ("dataset", "data_dir", "subset", "out_dir", "epochs")


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return " ".join(f"{v:g}" for v in value) or "none"
    return "null" if value is None else f"{value:g}"


def config_from_args(args: argparse.Namespace) -> tuple[CorrelateConfig, list[str]]:
    """The study of the command line: the defaults (or --quick's), --config, the flags (the
    dataset fallback when no dataset is named), then --set."""
    config = load_correlate_config(args.config, [], quick=args.quick)
    notes: list[str] = []
    train_changes = C.flag_values(args, "train_")
    dataset = train_changes.get("dataset")
    if dataset is not None and dataset != config.train.dataset and "subset" not in train_changes:
        train_changes["subset"] = None  # the default subset is a Fashion-MNIST choice
    if train_changes:
        config = config.replace(train=config.train.replace(**train_changes))
    if dataset is None and args.config is None:
        config, notes = with_fallback(config)
    if getattr(args, "measures", None):
        config = apply_preset(config, args.measures)
    changes = C.flag_values(args)
    if args.fixed_epochs:
        changes["stop_loss"] = None
    if changes:
        config = C.from_dict(changes, "arguments", base=config)
    return apply_study_overrides(config, args.overrides), notes


def cmd_correlate(args: argparse.Namespace, argv: Sequence[str] = ()) -> int:
    """Run ``samkit correlate``; print the τ table; exit status 0 (2 bad input, 130 / 143
    SIGINT / SIGTERM)."""
    from samkit._extras import require_command, require_dataset

    require_command("correlate", progress=not args.quiet)  # before anything is read or trained
    config, notes = config_from_args(args)
    require_dataset(config.train.dataset, what=f"samkit correlate on {config.train.dataset}")
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    command = base.command_line(argv) if argv else None
    try:
        result = run_correlate(
            config, name=args.name, jobs=args.jobs, overwrite=args.overwrite,
            verbose=0 if args.quiet else 1, command=command, notes=notes, quick=args.quick,
        )
    except KeyboardInterrupt as err:
        print("\ninterrupted: finished models and measures are cached; run the same command "
              "again to continue", file=sys.stderr)
        return 128 + base.interrupt_signal(err)
    print()
    print(format_table(result))
    print()
    for line in verdicts(result):
        print(f"- {line}")
    print(f"\n{len(result.rows)} models, {len(result.included)} correlated, "
          f"{result.wall_time:.0f} s; report: {result.run_dir / 'report.md'}")
    for note in result.notes:
        print(f"note: {note}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m samkit.experiments.correlate``: the same as ``samkit correlate``."""
    return base.run_main(add_parser, "correlate", argv)
