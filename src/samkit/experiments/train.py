"""``samkit train``: one run of a :class:`~samkit.config.TrainConfig` (config + run + report).

Writes ``runs/<name>/{config.yaml,metrics.jsonl,checkpoint.pt}``; Ctrl-C leaves a resumable
checkpoint (exit status 130).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from samkit import config as C
from samkit.config import TrainConfig
from samkit.experiments import base

# The config keys that are also flags (--dataset, --data-dir, ...), the rest through --set.
COMMON_KEYS = (
    "dataset", "data_dir", "subset", "label_noise", "model", "epochs", "steps", "batch_size",
    "lr", "lr_schedule", "weight_decay", "label_smoothing", "device", "threads", "out_dir",
)
TRAIN_KEYS = ("optimizer", "rho", "eta", "seed", "name", "perturbation", "amp", "tensorboard")


def add_parser(sub) -> argparse.ArgumentParser:
    """Add ``samkit train`` to the CLI's subparsers."""
    p = base.subcommand(
        sub, "train", cmd_train, help="train one run",
        description="Train one run: runs/<name>/{config.yaml,metrics.jsonl,checkpoint.pt}.",
        epilog="examples:\n"
        "  samkit train --config configs/fashion-mnist-mlp.yaml --set optimizer=asam rho=0.5\n"
        "  samkit train --dataset digits --optimizer sam --epochs 10 --name digits-sam\n"
        "  samkit train --config configs/fashion-mnist-mlp.yaml --resume\n"
        "  samkit train --config configs/asam-paper/cifar10-resnet56-sam.yaml --device cuda\n",
    )
    base.add_config_flags(p, "keys: samkit list --keys")
    C.add_flags(p, TrainConfig, COMMON_KEYS + TRAIN_KEYS)
    base.add_run_flags(p)
    return p


def cmd_train(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Run ``samkit train``: 0 done, 2 bad input, 130 interrupted (checkpoint saved)."""
    from samkit.train import Trainer

    config = C.load_config(args.config, args.overrides, **C.flag_values(args))
    trainer = Trainer(
        config, resume=args.resume, overwrite=args.overwrite, verbose=0 if args.quiet else 2
    )
    start = time.perf_counter()
    try:
        record = trainer.fit()
    except KeyboardInterrupt:
        interrupted(trainer.checkpoint_path, argv)
        return 130
    wall = time.perf_counter() - start
    if trainer.rank != 0:  # DDP: rank 0 reports
        return 0
    if trainer.stopped:
        print(f"stopped at step {trainer.step}; checkpoint: {trainer.checkpoint_path}")
        return 0
    acc = record.get("test_acc")
    summary = f"done: {config.run_dir}  {record.get('step', 0)} steps, {wall:.1f} s"
    if acc is not None:
        summary += f", test acc {100 * acc:.2f}%"
    print(summary)
    return 0


def interrupted(checkpoint: Path, argv: Sequence[str]) -> None:
    """After Ctrl-C: where the checkpoint is and the command that resumes it."""
    if not checkpoint.exists():
        print("\ninterrupted before the first checkpoint: nothing to resume", file=sys.stderr)
        return
    again = list(argv)
    if "--resume" not in again:
        again.append("--resume")
    again = [a for a in again if a != "--overwrite"]
    print(
        f"\ninterrupted; checkpoint: {checkpoint}\nresume with: {base.command_line(again)}",
        file=sys.stderr,
    )
