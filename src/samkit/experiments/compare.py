"""``samkit compare``: the same data, model and budget trained with several optimizers and seeds.

Writes ``runs/<name>/<optimizer>-s<seed>/`` (each a full training run: config, metrics,
checkpoint), then ``runs/<name>/report.md`` with the table and ``curves.png``, and
``summary.json`` with the numbers. Optimizers are registry names, optionally with their own
settings: ``sam:rho=0.1``, ``asam:rho=1.0,eta=0.01``, ``saf:lam=0.3`` (a key the optimizer
takes that is not a config key goes to ``optimizer_kwargs``).

Fair comparisons (:mod:`samkit.experiments.budget`): every run counts its forward-backward
passes and step seconds; ``sam:rho=0.02,0.05,0.1`` is a grid chosen on a validation split carved
from the training set (only the chosen value's test accuracy is reported); ``equal_budget``
trains a baseline again for the time or the passes of the most expensive method, as its own
row; the report draws test accuracy against seconds and against passes.
"""

from __future__ import annotations

import argparse
import math
import re
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from samkit import config as C
from samkit.config import TrainConfig, apply_overrides, check_value, from_dict, to_dict
from samkit.experiments import base as experiment
from samkit.experiments import budget as B
from samkit.experiments.budget import CompareOptions
from samkit.experiments.compare_report import format_table, write_report
from samkit.experiments.compare_report import (  # the report's names, here too
    format_time_to_accuracy as format_time_to_accuracy,
)
from samkit.train.logs import read_metrics
from samkit.train.trainer import Trainer, check_loss_term_switches_on

# The default: an MLP (2×256, ReLU) on a stratified 10,000-example subset of Fashion-MNIST,
# 20 epochs of SGD with momentum and a cosine schedule, three seeds. On 2 CPU cores the whole
# comparison (sgd, sam, asam × 3 seeds) takes a few minutes; one thread per run is the fastest
# setting for a model this small (and stays fast when the machine is busy).
DEFAULT = TrainConfig(
    dataset="fashion-mnist",
    subset=10_000,
    label_noise=0.4,
    model="mlp",
    model_kwargs={"depth": 2, "width": 256},
    lr=0.05,
    momentum=0.9,
    weight_decay=5e-4,
    epochs=20,
    batch_size=128,
    lr_schedule="cosine",
    threads=1,
    checkpoint=True,
)
# SAF's lam = 6 was chosen by `samkit compare --optimizers saf:lam=1,3,6 --seeds 0` on this
# setting's validation split (10 % held out), and again with lam=1,3,6,10 on seed 3 (not one of
# the default seeds); the paper's default 0.3 is much weaker here.
DEFAULT_OPTIMIZERS = ("sgd", "sam", "asam", "saf:lam=6")
# The command's default: SGD trained again for the time of the most expensive method.
DEFAULT_OPTIONS = CompareOptions(equal_budget="sgd", budget="time")
DEFAULT_SEEDS = (0, 1, 2)
# Used when the Fashion-MNIST files are missing: scikit-learn's digits ship with scikit-learn.
FALLBACK = {"dataset": "digits", "subset": None, "epochs": 30, "batch_size": 64}


@dataclass
class RunSummary:
    label: str
    seed: int
    run_dir: Path
    records: list[dict[str, Any]]

    def epochs(self) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("event") == "epoch"]

    @property
    def diverged(self) -> dict[str, Any] | None:
        """The ``diverged`` record when the run diverged (its numbers are then left out)."""
        return next((r for r in self.records if r.get("event") == "diverged"), None)

    @property
    def final_acc(self) -> float:
        if self.diverged:
            return math.nan
        tested = [r for r in self.epochs() if "test_acc" in r]
        return tested[-1]["test_acc"] if tested else math.nan

    @property
    def best_acc(self) -> float:
        if self.diverged:
            return math.nan
        return max((r["test_acc"] for r in self.epochs() if "test_acc" in r), default=math.nan)

    @property
    def train_loss(self) -> float:
        epochs = self.epochs()
        if self.diverged or not epochs or epochs[-1]["train_loss"] is None:
            return math.nan
        return epochs[-1]["train_loss"]

    @property
    def train_time(self) -> float:
        """Training seconds of the run, over every call that trained it (resumes included)."""
        epochs = self.epochs()
        return float(epochs[-1].get("train_time") or 0.0) if epochs else 0.0

    @property
    def time_per_epoch(self) -> float:
        times = [r["epoch_time"] for r in self.epochs()]
        return statistics.fmean(times) if times else math.nan

    def last(self, key: str) -> float:
        """The last epoch record's ``key`` (NaN when absent)."""
        found = [r[key] for r in self.epochs() if r.get(key) is not None]
        return float(found[-1]) if found else math.nan


@dataclass
class CompareResult:
    name: str
    run_dir: Path
    config: TrainConfig
    labels: list[str]
    seeds: list[int]
    runs: list[RunSummary] = field(default_factory=list)
    wall_time: float = 0.0
    notes: list[str] = field(default_factory=list)
    options: CompareOptions = field(default_factory=CompareOptions)
    # grid search: spec -> {candidate: mean final validation accuracy}
    selection: dict[str, dict[str, float]] = field(default_factory=dict)
    equal_budget_label: str | None = None
    # --tune-seed: every tuning run (samkit.experiments.tuned); with more than one seed the
    # paired difference of every pair of methods (with its interval and verdict)
    tuning: list[dict[str, Any]] = field(default_factory=list)
    differences: list[dict[str, Any]] = field(default_factory=list)

    def by_label(self, label: str) -> list[RunSummary]:
        return [r for r in self.runs if r.label == label]

    def rows(self) -> list[dict[str, Any]]:
        """One row per optimizer: mean and std over seeds."""
        reference = self.labels[0]
        for label in self.labels:
            if label.split(":", 1)[0] == "sgd":
                reference = label
                break
        ref_time = _mean([r.time_per_epoch for r in self.by_label(reference)])
        rows = []
        for label in self.labels:
            runs = self.by_label(label)
            t = _mean([r.time_per_epoch for r in runs])
            rows.append({
                "optimizer": label,
                "seeds": len(runs),
                "diverged": sum(1 for r in runs if r.diverged),
                "final_acc": _mean_std([r.final_acc for r in runs]),
                "best_acc": _mean_std([r.best_acc for r in runs]),
                "train_loss": _mean_std([r.train_loss for r in runs]),
                "time_per_epoch": t,
                "time_ratio": t / ref_time if ref_time and ref_time > 0 else math.nan,
                "reference": reference,
                "passes": _mean([r.last("passes") for r in runs]),
                "train_seconds": _mean([r.last("step_seconds") for r in runs]),
            })
        return rows


def _mean(values: list[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return statistics.fmean(values) if values else math.nan


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and standard deviation (NaN for one value: a spread needs two)."""
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan


def parse_optimizer_spec(spec: str) -> tuple[str, list[str]]:
    """``"sam:rho=0.1,eta=0.01"`` → ("sam", ["rho=0.1", "eta=0.01"])."""
    name, _, rest = spec.partition(":")
    name = name.strip()
    if not name:
        raise ValueError(f"Invalid optimizer spec {spec!r} (allowed: name or name:key=value,...)")
    overrides = [part.strip() for part in rest.split(",") if part.strip()]
    return name, overrides


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label.replace(":", "_").replace("=", "")).strip("_")


def run_configs(
    base: TrainConfig, optimizers: list[str], seeds: list[int], run_dir: Path
) -> list[tuple[str, int, TrainConfig]]:
    """The config of every (optimizer, seed) run, checked before anything trains."""
    from samkit.optim import list_optimizers

    out = []
    for spec in optimizers:
        name, overrides = parse_optimizer_spec(spec)
        if name.lower() not in list_optimizers():
            import difflib

            allowed = ", ".join(list_optimizers())
            close = difflib.get_close_matches(name.lower(), list_optimizers(), n=3)
            hint = f"; did you mean {' or '.join(close)}?" if close else ""
            raise ValueError(f"Invalid optimizer: {name!r} in --optimizers (allowed: {allowed})"
                             + hint)
        overrides = _optimizer_keys(name, overrides)
        for seed in seeds:
            check_value("seed", seed, "--seeds")
            values = to_dict(base)
            values.update(optimizer=name, seed=seed, name=f"{_slug(spec)}-s{seed}",
                          out_dir=str(run_dir))
            values = apply_overrides(values, overrides, source=f"--optimizers {spec}")
            cfg = from_dict(values, f"--optimizers {spec}")
            if cfg.steps is None:  # a steps budget's epochs need the data: the Trainer checks
                check_loss_term_switches_on(cfg, cfg.epochs)
            out.append((spec, seed, cfg))
    return out


def _optimizer_keys(name: str, overrides: list[str]) -> list[str]:
    """``lam=0.3`` -> ``optimizer_kwargs.lam=0.3`` for a key the optimizer declares (any
    namespace of its registry entry, for the ``ascent=`` the spec names; plus ``ascent`` and the
    common keys) that is not a TrainConfig key (``rho``, ``eta``, ``gamma``, ``seed`` stay config
    keys; ``schedule`` is the learning-rate schedule's older name)."""
    from samkit.optim.presets import COMMON_KEYS
    from samkit.optim.registry import optimizer_info

    entry = optimizer_info(name)
    spec = dict(item.partition("=")[::2] for item in overrides)
    ascent = spec.get("ascent", "").strip() or None
    try:
        own = entry.keys(ascent=ascent)
    except ValueError:  # a bad ascent: create_optimizer names it
        own = entry.keys()
    if entry.sharpness_aware:
        own |= {*COMMON_KEYS} | ({"ascent"} if entry.ascent_choice else set())
    keys = set(C.fields_of(TrainConfig))
    out = []
    for item in overrides:
        key, eq, value = item.partition("=")
        if eq and key.strip() not in keys and key.strip() in own:
            item = f"optimizer_kwargs.{key.strip()}={value}"
        out.append(item)
    return out


@dataclass(frozen=True)
class _Task:
    """One training run of a comparison, as a job (picklable)."""

    cfg: TrainConfig
    label: str
    seed: int
    resume: bool
    overwrite: bool
    verbose: int
    counter: str = ""  # "[i/total] " for the progress line
    what: str = ""  # e.g. ": 3347 steps"


def _train_tasks(tasks: list[_Task], data, val, jobs: int,
                 diverged_error: type = ()) -> list[RunSummary]:
    """Train ``tasks`` (``jobs`` at once, each in its own process when ``jobs > 1``), in
    order; each run counts its passes and seconds and, with ``val``, its validation
    accuracy."""
    return experiment.map_jobs(_train_task, tasks, jobs, shared=(data, val, diverged_error))


def _train_task(task: _Task) -> RunSummary:
    data, val, diverged_error = experiment.worker_shared()
    if task.verbose:
        print(f"{task.counter}{task.label} seed {task.seed}{task.what} -> {task.cfg.run_dir}",
              flush=True)
    callbacks = [B.PassMeter()] + ([B.ValidationAccuracy(val)] if val is not None else [])
    return _train(task.cfg, data, task.label, task.seed, task.resume, task.overwrite,
                  task.verbose, callbacks, diverged_error)


def _train(cfg: TrainConfig, data, label: str, seed: int, resume: bool, overwrite: bool,
           verbose: int, callbacks: list, diverged_error: type = ()) -> RunSummary:
    already_done = resume and experiment.finished_state(cfg, len(data[0].y)) is not None
    if not already_done:
        resumable = resume and (cfg.run_dir / "checkpoint.pt").exists()
        trainer = Trainer(  # --resume: a run killed before its first checkpoint starts again
            cfg, callbacks=callbacks, resume=resumable, overwrite=overwrite or resume,
            data=data, verbose=verbose, prefix=f"  {label} s{seed}: ",
        )
        try:
            trainer.fit()
        except diverged_error as err:  # reported as diverged, the others go on
            if verbose:
                print(f"  {label} s{seed}: diverged: {err}", flush=True)
    return RunSummary(label, seed, cfg.run_dir, read_metrics(cfg.run_dir / "metrics.jsonl"))


# What a comparison writes in its folder, besides its runs (each a folder of its own).
COMPARE_FILES = ("config.yaml", "report.md", "summary.json", "curves.png", "time_to_accuracy.png")


def run_compare(
    base: TrainConfig = DEFAULT,
    optimizers: list[str] | tuple[str, ...] = DEFAULT_OPTIMIZERS,
    seeds: list[int] | tuple[int, ...] = DEFAULT_SEEDS,
    name: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
    verbose: int = 1,
    command: str | None = None,
    notes: list[str] | None = None,
    options: CompareOptions | None = None,
) -> CompareResult:
    """Train every (optimizer, seed) pair on ``base``'s data, model and budget; write the report.

    The data are loaded once and shared (``base.data_seed`` fixes the subset and the noise);
    each run's ``seed`` sets its initialization, data order and augmentation, so the optimizers
    see the same initial weights and batches for the same seed. ``options`` (a
    :class:`~samkit.experiments.budget.CompareOptions`): the validation split of a grid and the
    equal-budget row.
    """
    if not optimizers:
        raise ValueError("Invalid optimizers: the list is empty (e.g. sgd sam asam)")
    if not seeds:
        raise ValueError("Invalid seeds: the list is empty (e.g. 0 1 2)")
    options = options or CompareOptions()
    if options.tune_seed is not None:
        from samkit.experiments.tuned import check_tune_seed

        check_tune_seed(options.tune_seed, seeds)  # before anything is loaded or trained
    name = name or default_name(base, optimizers, seeds, options)
    run_dir = experiment.run_dir_of(base.out_dir, name)
    candidates = {spec: B.expand_spec(spec) for spec in optimizers}
    grid = any(len(c) > 1 for c in candidates.values())
    labels = list(dict.fromkeys(c for spec in optimizers for c in candidates[spec]))
    baseline = options.equal_budget
    if baseline is not None and baseline not in labels:
        labels.append(baseline)  # trained at the base budget too: its cost per step is measured
    runs = run_configs(base, labels, list(seeds), run_dir)
    result = CompareResult(name, run_dir, base, [], list(seeds), notes=list(notes or []),
                           options=options)
    from samkit.config import save_config
    from samkit.train.trainer import TrainingDiverged, resolve_device

    with experiment.RunDir(run_dir, "compare", COMPARE_FILES, overwrite=overwrite, keep=resume,
                           advice="pass --resume to continue it, --overwrite to replace it, "
                           "or choose another --name") as run:
        data = experiment.load_data(base, resolve_device(base.device))
        run.start()  # --overwrite: the old comparison goes once the data have loaded
        save_config(base, run_dir / "config.yaml")
        if options.tune_seed is not None:
            from samkit.experiments.tuned import train_tuned

            return train_tuned(result, run, base, list(optimizers), list(seeds), data, resume,
                               overwrite, verbose, command, TrainingDiverged)
        return _train_all(result, runs, data, resume, overwrite, verbose, command,
                          TrainingDiverged, candidates, optimizers, seeds, base, run_dir, grid)


def _train_all(result, runs, data, resume, overwrite, verbose, command, diverged_error,
               candidates, optimizers, seeds, base, run_dir, grid):
    options = result.options
    baseline = options.equal_budget
    val = None
    if grid:  # candidates are chosen on a validation split carved from the training set
        train_part, val = B.carve_validation(data[0], options.val_fraction, base.data_seed)
        data = (train_part, data[1])
        result.notes.append(
            f"grid search: {len(val.y)} training examples ({options.val_fraction:g}) held out "
            f"(stratified, data seed {base.data_seed}) to choose each grid's value; every "
            f"method trains on the other {len(train_part.y)}")
    start = time.perf_counter()
    trained: dict[str, list[RunSummary]] = {}
    total = len(runs) + (len(seeds) if baseline is not None else 0)
    tasks = [_Task(cfg, label, seed, resume, overwrite, verbose, f"[{i + 1}/{total}] ")
             for i, (label, seed, cfg) in enumerate(runs)]
    for summary in _train_tasks(tasks, data, val, options.jobs, diverged_error):
        trained.setdefault(summary.label, []).append(summary)

    # one row per method: a grid's chosen candidate (best mean validation accuracy)
    for spec in [*optimizers, *([baseline] if baseline not in optimizers else [])]:
        if spec is None:
            continue
        options_of = candidates.get(spec, [spec])
        chosen = options_of[0]
        if len(options_of) > 1:
            groups = {c: [r.records for r in trained[c]] for c in options_of}
            chosen = B.select_candidate(groups)
            result.selection[spec] = {c: B.mean_final(g, "val_acc") for c, g in groups.items()}
        if chosen not in result.labels:
            result.labels.append(chosen)
            result.runs.extend(trained[chosen])

    if baseline is not None:
        add_equal_budget_row(result, base, baseline, data, seeds, run_dir, resume, overwrite,
                             verbose, val, total, diverged_error)
    result.wall_time = time.perf_counter() - start
    if len(seeds) > 1:  # every difference the table shows, with its interval and verdict
        from samkit.experiments.tuned import paired_rows

        result.differences = paired_rows(result)
    write_report(result, command=command)
    return result


def add_equal_budget_row(result: CompareResult, base: TrainConfig, baseline: str, data, seeds,
                         run_dir: Path, resume: bool, overwrite: bool, verbose: int, val,
                         total: int, diverged_error: type = (), jobs: int | None = None) -> None:
    """Train ``baseline`` for the budget (time or passes) of the most expensive method
    (``jobs`` runs at once; default: the comparison's option)."""
    budget = result.options.budget
    costs = {label: B.cost([r.records for r in result.by_label(label)], budget)
             for label in result.labels}
    expensive = max(costs, key=lambda k: (costs[k] if not math.isnan(costs[k]) else -1))
    if expensive == baseline:
        result.notes.append(f"equal budget: {baseline} is the most expensive method; no row")
        return
    base_steps = C.total_steps(base, len(data[0].y))
    steps = B.equal_budget_steps(base_steps, costs[baseline], costs[expensive])
    label = f"{baseline} (equal {budget}: {expensive})"
    name, overrides = parse_optimizer_spec(baseline)
    overrides = _optimizer_keys(name, overrides)
    tasks = []
    for j, seed in enumerate(seeds):
        values = to_dict(base)
        values.update(optimizer=name, seed=seed, out_dir=str(run_dir), steps=steps,
                      name=f"{_slug(baseline)}-equal-{budget}-s{seed}")
        values = apply_overrides(values, overrides)
        cfg = from_dict(values, f"--equal-budget {baseline}")
        saved = cfg.run_dir / "checkpoint.pt"
        if resume and saved.exists():  # keep the budget it was started with (the checkpoint's)
            from samkit.train.checkpoint import load_checkpoint

            cfg = cfg.replace(steps=load_checkpoint(saved)["config"].get("steps", cfg.steps))
        tasks.append(_Task(cfg, label, seed, resume, overwrite, verbose,
                           f"[{total - len(seeds) + j + 1}/{total}] ", f": {cfg.steps} steps"))
    result.runs.extend(_train_tasks(tasks, data, val, jobs or result.options.jobs,
                                    diverged_error))
    result.labels.append(label)
    result.equal_budget_label = label
    unit = "training seconds (measured, steps only)" if budget == "time" else "passes"
    result.notes.append(
        f"equal budget: {baseline} trained for {steps} steps instead of {base_steps}, the "
        f"{unit} of {expensive} ({costs[expensive]:.4g} vs {costs[baseline]:.4g} per run); "
        "its LR schedule spans the longer budget")


def default_name(cfg: TrainConfig, optimizers: Sequence[str] = DEFAULT_OPTIMIZERS,
                 seeds: Sequence[int] = DEFAULT_SEEDS,
                 options: CompareOptions = DEFAULT_OPTIONS) -> str:
    """``compare-<data>-<model>[-noise<%>]``, and a digest of the other settings that differ
    from the command's defaults for that data set (:func:`~samkit.config.settings_digest`), so
    two comparisons of other settings never share a folder."""
    name = f"compare-{cfg.dataset}-{cfg.model}"
    if cfg.label_noise:
        name += f"-noise{round(100 * cfg.label_noise)}"
    if cfg.dataset == DEFAULT.dataset:
        defaults = DEFAULT
    elif cfg.dataset == FALLBACK["dataset"]:
        defaults = DEFAULT.replace(**FALLBACK)
    else:
        defaults = DEFAULT.replace(dataset=cfg.dataset, subset=None)

    def settings(config, optimizers, seeds, options):
        return {**C.to_dict(config), "optimizers": list(optimizers), "seeds": list(seeds),
                "options": {**C.to_dict(options), "jobs": None}}

    return name + C.settings_digest(
        settings(cfg, optimizers, seeds, options),
        settings(defaults, DEFAULT_OPTIMIZERS, DEFAULT_SEEDS, DEFAULT_OPTIONS),
        ("dataset", "model", "label_noise", "name", *C.RESUMABLE_CHANGES))


def with_fallback(config: TrainConfig) -> tuple[TrainConfig, list[str]]:
    """``config``, or its digits fallback when its Fashion-MNIST files cannot be found."""
    return experiment.with_fallback(config, FALLBACK)


# ---------------------------------------------------------------------------- the command


def add_parser(sub) -> argparse.ArgumentParser:
    """Add ``samkit compare`` to the CLI's subparsers."""
    from samkit.experiments.train import COMMON_KEYS

    p = experiment.subcommand(
        sub, "compare", cmd_compare, help="compare optimizers on the same data, model and budget",
        description="Train every optimizer with every seed on the same data, model and budget;\n"
        "print a table and write runs/<name>/report.md, curves.png and summary.json.\n"
        f"Without --config: an MLP on {DEFAULT.subset:,} Fashion-MNIST examples with "
        f"{100 * DEFAULT.label_noise:g} % of the\nlabels flipped, {DEFAULT.epochs} epochs, seeds "
        f"{' '.join(map(str, DEFAULT_SEEDS))}, optimizers {' '.join(DEFAULT_OPTIMIZERS)}, and\n"
        f"{DEFAULT_OPTIONS.equal_budget} trained again for the {DEFAULT_OPTIONS.budget} of the "
        "costliest method (scikit-learn's\ndigits, with a message, when the Fashion-MNIST files "
        "are missing).",
        epilog="examples:\n"
        "  samkit compare --jobs 2\n"
        "  samkit compare --label-noise 0\n"
        "  samkit compare --optimizers sgd sam:rho=0.1 asam:rho=1.0 --seeds 0 1 --epochs 5\n"
        "  samkit compare --optimizers sgd sam:rho=0.02,0.05,0.1 saf --val-fraction 0.1\n"
        "  samkit compare --optimizers sam:rho=0.02,0.05,0.1 asam:rho=0.5,1,2 --tune-seed 100 \\\n"
        "      --seeds 0 1 2 3 4 --equal-budget none   # tuned on seed 100, paired intervals\n"
        "  samkit compare --equal-budget sgd --equal-by passes\n"
        "  samkit compare --config configs/fashion-mnist-mlp.yaml --set model=cnn\n",
    )
    experiment.add_config_flags(p, "the shared settings; default: built in")
    p.add_argument("--optimizers", nargs="+", default=None, metavar="OPT",
                   help="registry names, optionally name:key=value,... (default: "
                   f"{' '.join(DEFAULT_OPTIMIZERS)})")
    p.add_argument("--seeds", nargs="+", type=int, default=None, metavar="SEED",
                   help=f"seeds (default: {' '.join(map(str, DEFAULT_SEEDS))})")
    p.add_argument("--name", default=None, help="runs/<name>/ (default: compare-<data>-<model>"
                   "[-noise<%%>], and a digest of the settings that differ from the default)")
    C.add_flags(p, TrainConfig, COMMON_KEYS)
    C.add_flags(p, CompareOptions, OPTION_KEYS, prefix="cmp_",
                helps={"equal_budget": "an optimizer trained again for the budget of the most "
                       "expensive method, as its own row (default: sgd; none: no such row)"})
    experiment.add_run_flags(p)
    return p


OPTION_KEYS = ("equal_budget", "budget", "val_fraction", "jobs", "tune_seed")


def inputs_from_args(args: argparse.Namespace
                     ) -> tuple[TrainConfig, list[str], list[int], CompareOptions, list[str]]:
    """What the command line compares: ``(config, optimizers, seeds, options, notes)`` (the
    notes say when the data fall back to scikit-learn's digits)."""
    values = C.flag_values(args)
    if args.config:
        config = C.load_config(args.config, args.overrides, **values)
        notes = []
    else:
        config = DEFAULT
        if "dataset" not in values:
            config, notes = with_fallback(config)
        else:
            notes = []
            if values["dataset"] != DEFAULT.dataset and "subset" not in values:
                values["subset"] = None  # the default's 10,000 is a Fashion-MNIST choice
        config = C.load(TrainConfig, None, args.overrides, base=config, **values)
    optimizers = args.optimizers or list(DEFAULT_OPTIMIZERS)
    seeds = args.seeds if args.seeds is not None else list(DEFAULT_SEEDS)
    options = C.from_dict({**C.to_dict(DEFAULT_OPTIONS), **C.flag_values(args, "cmp_")},
                          "compare options", cls=CompareOptions)
    return config, optimizers, seeds, options, notes


def cmd_compare(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Run ``samkit compare``; print the table: 0 done, 2 bad input, 3 a run diverged, 4 a
    write failed, 130 / 143 interrupted by SIGINT / SIGTERM (checkpoints saved)."""
    from samkit._extras import require_command, require_dataset

    require_command("compare", progress=not args.quiet)  # before anything is read or trained
    config, optimizers, seeds, options, notes = inputs_from_args(args)
    require_dataset(config.dataset, what=f"samkit compare on {config.dataset}")
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    try:
        result = run_compare(
            config, optimizers, seeds, name=args.name, resume=args.resume,
            overwrite=args.overwrite, verbose=0 if args.quiet else 1,
            command=experiment.command_line(argv), notes=notes, options=options,
        )
    except KeyboardInterrupt as err:  # the running runs saved their checkpoints
        print("\ninterrupted: finished runs are kept; rerun with --resume to continue",
              file=sys.stderr)
        return 128 + experiment.interrupt_signal(err)
    print()
    print(format_table(result))
    trained = sum(r.train_time for r in result.runs)
    print(f"\n{len(result.runs)} runs, {trained:.0f} s of training in all "
          f"({result.wall_time:.0f} s this call); report: {result.run_dir / 'report.md'}")
    for note in notes:
        print(f"note: {note}")
    diverged = [f"{r.label} seed {r.seed}" for r in result.runs if r.diverged]
    if diverged:
        print(f"samkit: error: {len(diverged)} of {len(result.runs)} runs diverged: "
              f"{', '.join(diverged)} (exit status 3)", file=sys.stderr)
        return 3
    return 0
