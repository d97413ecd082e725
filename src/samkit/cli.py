"""The ``samkit`` command: train one run, or compare optimizers on the same budget.

Examples (real commands; the numbers in the README were measured with them)::

    # the main job: SGD vs SAM vs ASAM on Fashion-MNIST (MLP, 10k stratified subset,
    # 20 epochs, 3 seeds; about 70 s on 2 idle CPU cores); writes
    # runs/compare-fashion-mnist-mlp/report.md, curves.png and summary.json
    samkit compare

    # the noisy-label variant of the ASAM paper (40% of the training labels flipped);
    # measured: SGD 79.7%, SAM 83.2%, ASAM 82.8% final test accuracy
    samkit compare --label-noise 0.4

    # other optimizers, their own settings, fewer seeds, a quick budget
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
    samkit correlate --jobs 2
    samkit correlate --quick

    samkit download cifar10 --data-dir ~/data   # official URLs, checksums verified
    samkit list        # optimizers, models, data sets and config keys

Order of precedence: the config file, then the flags (--dataset, --lr, ...), then --set.
Exit status: 0 done, 2 bad input, 130 interrupted (a resumable checkpoint was saved).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Sequence

# Flags for the common fields: (flag, config key, type, help).
COMMON_FLAGS = [
    ("--dataset", "dataset", str, "data set (samkit list)"),
    ("--data-dir", "data_dir", str, "folder with the data files (default: $SAMKIT_DATA, ...)"),
    ("--subset", "subset", int, "train on N examples (stratified)"),
    ("--label-noise", "label_noise", float, "fraction of training labels flipped, e.g. 0.4"),
    ("--model", "model", str, "model (samkit list)"),
    ("--epochs", "epochs", int, "epochs"),
    ("--steps", "steps", int, "optimizer steps (instead of epochs)"),
    ("--batch-size", "batch_size", int, "batch size (0: full batch)"),
    ("--lr", "lr", float, "peak learning rate"),
    ("--schedule", "schedule", str, "constant, cosine or step"),
    ("--weight-decay", "weight_decay", float, "weight decay"),
    ("--label-smoothing", "label_smoothing", float, "label smoothing"),
    ("--device", "device", str, "auto, cpu, cuda, cuda:N, mps"),
    ("--threads", "threads", int, "CPU threads for torch"),
    ("--out-dir", "out_dir", str, "parent folder of the runs (default: runs)"),
]
TRAIN_ONLY_FLAGS = [
    ("--optimizer", "optimizer", str, "optimizer (samkit list)"),
    ("--rho", "rho", float, "SAM/ASAM radius"),
    ("--eta", "eta", float, "ASAM's eta (not the learning rate)"),
    ("--seed", "seed", int, "seed"),
    ("--name", "name", str, "run name: runs/<name>/"),
    ("--perturbation", "perturbation", str, "DDP under torchrun: synced (default) or local"),
]


def _add_common(parser: argparse.ArgumentParser, flags) -> None:
    for flag, key, typ, text in flags:
        parser.add_argument(flag, dest=f"cfg_{key}", type=typ, default=None, help=text,
                            metavar=key.upper())


def _flag_values(args: argparse.Namespace) -> dict:
    return {
        k[4:]: v for k, v in vars(args).items() if k.startswith("cfg_") and v is not None
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="samkit",
        description="Sharpness-aware training (SAM, ASAM, ...) and sharpness measurement.",
        epilog="examples:" + __doc__.split("Examples", 1)[1].split("::", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    train = sub.add_parser(
        "train", help="train one run", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train one run: runs/<name>/{config.yaml,metrics.jsonl,checkpoint.pt}.",
        epilog="examples:\n"
        "  samkit train --config configs/fashion-mnist-mlp.yaml --set optimizer=asam rho=0.5\n"
        "  samkit train --dataset digits --optimizer sam --epochs 10 --name digits-sam\n"
        "  samkit train --config configs/fashion-mnist-mlp.yaml --resume\n"
        "  samkit train --config configs/asam-paper/cifar10-resnet56-sam.yaml --device cuda\n",
    )
    train.add_argument("--config", help="YAML config (keys: samkit list --keys)")
    train.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[],
                       metavar="KEY=VALUE", help="override config keys, e.g. --set lr=0.05 "
                       "model_kwargs.width=512 (values are YAML, checked against the key's type)")
    _add_common(train, COMMON_FLAGS + TRAIN_ONLY_FLAGS)
    _add_run_flags(train)
    train.add_argument("--amp", action="store_true", default=None, help="mixed precision")
    train.add_argument("--tensorboard", action="store_true", default=None,
                       help="also write TensorBoard events (needs tensorboard)")

    compare = sub.add_parser(
        "compare", help="compare optimizers on the same data, model and budget",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train every optimizer with every seed on the same data, model and budget;\n"
        "print a table and write runs/<name>/report.md, curves.png and summary.json.\n"
        "Without --config: an MLP on 10,000 Fashion-MNIST examples, 20 epochs, seeds 0 1 2\n"
        "(scikit-learn's digits, with a message, when the Fashion-MNIST files are missing).",
        epilog="examples:\n"
        "  samkit compare\n"
        "  samkit compare --label-noise 0.4\n"
        "  samkit compare --optimizers sgd sam:rho=0.1 asam:rho=1.0 --seeds 0 1 --epochs 5\n"
        "  samkit compare --config configs/fashion-mnist-mlp.yaml --set model=cnn\n",
    )
    compare.add_argument("--config", help="YAML config of the shared settings (default: built in)")
    compare.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[],
                         metavar="KEY=VALUE", help="override shared config keys")
    compare.add_argument("--optimizers", nargs="+", default=None, metavar="OPT",
                         help="registry names, optionally name:key=value,... "
                         "(default: sgd sam asam)")
    compare.add_argument("--seeds", nargs="+", type=int, default=None, metavar="SEED",
                         help="seeds (default: 0 1 2)")
    compare.add_argument("--name", default=None, help="runs/<name>/ (default: compare-<data>-...)")
    _add_common(compare, COMMON_FLAGS)
    _add_run_flags(compare)

    demo = sub.add_parser("demo", help="the default comparison (same as `samkit compare`)")
    demo.add_argument("--quiet", "-q", action="store_true", help="only the final table")

    fetch = sub.add_parser(
        "download", help="download a data set from its official URLs (checksums verified)",
        description="Download a data set into --data-dir (default: $SAMKIT_DATA, else "
        "~/.cache/samkit/<name>); files are verified and written atomically.",
        epilog="example:\n  samkit download cifar10 --data-dir ~/data\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    fetch.add_argument("dataset", help="fashion-mnist, mnist, cifar10 or cifar100")
    fetch.add_argument("--data-dir", default=None, help="where to put the files")

    listing = sub.add_parser("list", help="optimizers, models, data sets and config keys")
    listing.add_argument("--keys", action="store_true", help="only the config keys")
    from samkit.experiments.eos import add_parser as add_eos_parser

    add_eos_parser(sub)  # samkit eos: its flags live in experiments/eos.py
    from samkit.experiments.correlate import add_parser as add_correlate_parser

    add_correlate_parser(sub)  # samkit correlate: its flags live in experiments/correlate.py
    return parser


def _add_run_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--resume", action="store_true",
                        help="continue from runs/<name>/checkpoint.pt")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing run of the same name")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress output")


def _command_line(argv: Sequence[str]) -> str:
    return "samkit " + " ".join(shlex.quote(a) for a in argv)


def cmd_train(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from samkit.train import Trainer, load_config

    values = _flag_values(args)
    if args.amp:
        values["amp"] = True
    if args.tensorboard:
        values["tensorboard"] = True
    config = load_config(args.config, args.overrides, **values)
    trainer = Trainer(
        config, resume=args.resume, overwrite=args.overwrite, verbose=0 if args.quiet else 2
    )
    start = time.perf_counter()
    try:
        record = trainer.fit()
    except KeyboardInterrupt:
        _interrupted(trainer.checkpoint_path, argv)
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


def _interrupted(checkpoint, argv: Sequence[str]) -> None:
    if not checkpoint.exists():
        print("\ninterrupted before the first checkpoint: nothing to resume", file=sys.stderr)
        return
    again = list(argv)
    if "--resume" not in again:
        again.append("--resume")
    again = [a for a in again if a != "--overwrite"]
    print(
        f"\ninterrupted; checkpoint: {checkpoint}\nresume with: {_command_line(again)}",
        file=sys.stderr,
    )


def cmd_compare(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from samkit.experiments.compare import (
        DEFAULT,
        DEFAULT_OPTIMIZERS,
        DEFAULT_SEEDS,
        format_table,
        run_compare,
        with_fallback,
    )
    from samkit.train import load_config, to_dict

    values = _flag_values(args)
    if args.config:
        config = load_config(args.config, args.overrides, **values)
        notes = []
    else:
        config = load_config(None, [], **to_dict(DEFAULT))
        if "dataset" not in values:
            config, notes = with_fallback(config)
        else:
            notes = []
            if values["dataset"] != DEFAULT.dataset and "subset" not in values:
                values["subset"] = None  # the default's 10,000 is a Fashion-MNIST choice
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
        config = load_config(None, args.overrides, **{**to_dict(config), **values})
    optimizers = args.optimizers or list(DEFAULT_OPTIMIZERS)
    seeds = args.seeds if args.seeds is not None else list(DEFAULT_SEEDS)
    try:
        result = run_compare(
            config, optimizers, seeds, name=args.name, resume=args.resume,
            overwrite=args.overwrite, verbose=0 if args.quiet else 1,
            command=_command_line(argv), notes=notes,
        )
    except KeyboardInterrupt:
        print("\ninterrupted: finished runs are kept; rerun with --resume to continue",
              file=sys.stderr)
        return 130
    print()
    print(format_table(result))
    print(f"\n{len(result.runs)} runs in {result.wall_time:.0f} s; report: "
          f"{result.run_dir / 'report.md'}")
    for note in notes:
        print(f"note: {note}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from samkit.train.config import FIELDS, field_help

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
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if args.command == "train":
            return cmd_train(args, argv)
        if args.command == "compare":
            return cmd_compare(args, argv)
        if args.command == "eos":
            return args.handler(args, argv)
        if args.command == "correlate":
            return args.handler(args, argv)
        if args.command == "download":
            from samkit.data import download_dataset

            print(f"{args.dataset}: {download_dataset(args.dataset, args.data_dir)}")
            return 0
        if args.command == "demo":
            compare_args = parser.parse_args(["compare"] + (["--quiet"] if args.quiet else []))
            return cmd_compare(compare_args, ["compare"])
        return cmd_list(args)
    except (ValueError, OSError, ImportError) as err:
        print(f"samkit: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
