"""``samkit train``: one run of a :class:`~samkit.config.TrainConfig` (config + run + report).

Writes ``runs/<name>/{config.yaml,metrics.jsonl,checkpoint.pt,run.json}``. Exit status: 0 the
run finished with finite numbers, 2 bad input, 3 the run diverged (the last good checkpoint is
kept), 4 a file could not be written (a full disk: the last checkpoint is kept), 130 / 143
Ctrl-C / SIGTERM (a resumable checkpoint was saved).
"""

from __future__ import annotations

import argparse
import signal
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
TRAIN_KEYS = ("optimizer", "rho", "eta", "seed", "name", "perturbation", "amp", "tensorboard",
              "edge_every")


def add_parser(sub) -> argparse.ArgumentParser:
    """Add ``samkit train`` to the CLI's subparsers."""
    p = base.subcommand(
        sub, "train", cmd_train, help="train one run",
        description="Train one run: runs/<name>/{config.yaml,metrics.jsonl,checkpoint.pt}.",
        epilog="examples:\n"
        "  samkit train --config configs/fashion-mnist-mlp.yaml --set optimizer=asam rho=0.5\n"
        "  samkit train --dataset digits --optimizer sam --epochs 10 --name digits-sam\n"
        "  samkit train --config configs/fashion-mnist-mlp.yaml --resume\n"
        "  samkit train --config configs/asam-paper/cifar10-resnet56-sam.yaml --device cuda\n"
        "  samkit train --dataset digits --optimizer sam --edge-every 10   # λ₁ vs the edge\n",
    )
    base.add_config_flags(p, "keys: samkit list --keys")
    C.add_flags(p, TrainConfig, COMMON_KEYS + TRAIN_KEYS)
    base.add_run_flags(p)
    return p


def cmd_train(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Run ``samkit train``: 0 done, 2 bad input, 3 diverged, 4 a write failed, 130/143
    interrupted by SIGINT / SIGTERM (checkpoint saved)."""
    from samkit._extras import require, require_command, require_dataset
    from samkit.train import Trainer
    from samkit.train.trainer import TrainingDiverged

    require_command("train", progress=not args.quiet)  # before any config is read
    config = C.load_config(args.config, args.overrides, **C.flag_values(args))
    require_dataset(config.dataset, what=f"samkit train --dataset {config.dataset}")
    if config.tensorboard:
        require("tensorboard", "tensorboard", what="samkit train --tensorboard")
    trainer = Trainer(
        config, resume=args.resume, overwrite=args.overwrite, verbose=0 if args.quiet else 2
    )
    start = time.perf_counter()
    try:
        record = trainer.fit()
    except KeyboardInterrupt:
        interrupted(trainer.checkpoint_path, argv)
        return 128 + (trainer.signal or signal.SIGINT)
    except TrainingDiverged as err:
        print(f"samkit: error: {err}", file=sys.stderr)
        return 3
    wall = time.perf_counter() - start
    if trainer.rank != 0:  # DDP: rank 0 reports
        return 0
    if trainer.stopped:
        print(f"stopped at step {trainer.step}; checkpoint: {trainer.checkpoint_path}")
        return 0
    print(final_table(trainer, record, wall))
    return 0


def final_table(trainer, record: dict, wall: float) -> str:
    """The table ``samkit train`` ends with: accuracy, loss, time and where the run is."""
    from samkit.train.logs import read_metrics

    epochs = [r for r in read_metrics(trainer.run_dir) if r.get("event") == "epoch"]
    accs = [r["test_acc"] for r in epochs if r.get("test_acc") is not None]

    def pct(value):
        return "-" if value is None else f"{100 * value:.2f}%"

    def num(value):
        return "-" if value is None else f"{value:.4f}"

    rows = [
        ("final test acc", pct(record.get("test_acc"))),
        ("best test acc", pct(max(accs) if accs else None)),
        ("final test loss", num(record.get("test_loss"))),
        ("final train loss", num(record.get("train_loss"))),
        ("steps", str(record.get("step", trainer.step))),
        ("train time", f"{record.get('train_time', trainer.train_time):.1f} s"),
        ("wall time", f"{wall:.1f} s"),
    ]
    width = max(len(k) for k, _ in rows)
    return f"done: {trainer.run_dir}\n" + "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


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
