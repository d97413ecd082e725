r"""``samkit eos``: gradient descent and SAM at the edge of stability, on real data.

Reproduces the central claims of Cohen et al. (2021) and Long & Bartlett (2023):

* full-batch gradient descent with step size η drives the top Hessian eigenvalue λ₁ up to
  :math:`2/\eta` and holds it there;
* full-batch SAM with radius ρ holds λ₁ at the *SAM-edge*
  :math:`4/(\eta(1 + \sqrt{1 + 8\rho/(\eta\|g\|)}))`, far below :math:`2/\eta`, and since the
  edge depends on the gradient norm it falls as :math:`\|g\|` falls during training.

The default: 2,000 Fashion-MNIST training images (stratified, standardized), an MLP with two
tanh layers of 128 units, the square loss of Cohen et al. (½ Σ over the 10 classes of
:math:`(f_c(x) - \text{onehot}_c(y))^2`, mean over the examples), full-batch GD with η = 0.1
and full-batch SAM with η = 0.1, ρ = 0.05, 1,500 steps each from the same initialization; λ₁
of the whole training subset by Lanczos warm started from the last eigenvector
(:class:`samkit.train.edge.EdgeTracker`), at most every 10 steps and as often as the tracker's
budget allows (``budget``: at most 25 % of each run's time; ``--budget none`` measures every
10 steps whatever it costs). It takes about a minute and a half on 2 CPU cores.

Options: cross-entropy, the CNN, MNIST and CIFAR-10 subsets (when their files are present),
several η and several ρ in one call (every η runs GD and SAM with every ρ), USAM, heavy-ball
momentum, and a character-level Transformer on any text file trained with minibatch SGD and SAM
(λ₁ on a fixed probe set of windows, the SAM-edge with the gradient norm of each minibatch).

Also: ``--preset long-bartlett`` (Long & Bartlett's loss normalisation, Glorot-normal init,
centring-only preprocessing and ReLU MLP), ``--k`` top eigenvalues, ``--data-seed``,
``--measure-on batch`` (minibatch runs: λ₁ on the step's own minibatch, as their language model),
``--optimizer adam`` (the preconditioned sharpness against (2 + 2β₁)/(η(1 − β₁))) and
``--ascent asam|gsam|fishersam`` (judged by λ_max of the effective Hessian where the tracker
records it).

Every summary diagnoses each run against the band [0.9, 1.1] of λ₁/edge (``max_ratio``,
``first_crossing_step``, ``fraction_at_edge_after_crossing``, ``last_step_at_edge``, ``excess``
and a verdict in words; :func:`samkit.experiments.eos_report.diagnose`), and the report says
when λ₁ sits above the SAM-edge by a margin growing with ρ.

Writes ``runs/<name>/``: ``config.json`` (the resolved config), one folder per run with
``edge.jsonl`` (the tracker's rows), ``train.jsonl`` (loss and ‖g‖ of every step) and
``eos.png`` (λ₁ against steps with the 2/η line and the SAM-edge curve, the training loss, ‖g‖,
the alignments), then ``overview.png``, ``summary.json`` and ``report.md`` with the table: the
median of λ₁/edge over the second half of training and the first step at which λ₁ reaches the
edge, for every run.

References:
    J. Cohen, S. Kaur, Y. Li, J. Z. Kolter, A. Talwalkar. Gradient Descent on Neural Networks
    Typically Occurs at the Edge of Stability. ICLR 2021.
    P. M. Long, P. L. Bartlett. Sharpness-Aware Minimization and the Edge of Stability.
    arXiv:2309.12488, 2023.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from samkit import config as C
from samkit.config import TrainConfig, setting
from samkit.experiments import base as experiment
from samkit.experiments.base import shared_setting as shared
from samkit.experiments.eos_report import (  # noqa: F401 - the report's names, here too
    EDGE_BAND,
    GD_BAND,
    SAM_BAND,
    diagnose,
    excess_with_rho,
    format_table,
    plot_overview,
    plot_run,
    summarize,
    verdicts,
    write_report,
)
from samkit.experiments.eos_run import RunResult, RunSpec, train_run
from samkit.train.build import glorot_normal_ as glorot_normal_
from samkit.train.task import make_loss as make_loss

LOSSES = ("mse", "mse-mean", "ce")
# sam and usam have closed-form edges; the others are judged by λ_max(H_eff) against the base
# optimizer's edge, where the tracker records it (samkit.curvature.effective_hessian)
ASCENTS = ("sam", "usam", "asam", "gsam", "fishersam")
OPTIMIZERS = ("sgd", "adam")
INITS = ("default", "glorot-normal")
PREPROCESS = ("standardize", "center")
MEASURE_ON = ("probe", "batch")

# Presets: named settings under the command line's own flags (a flag given wins).
# long-bartlett: google-deepmind/sam_edge's image_classification.py (checked in its source):
# loss optax.squared_error averaged over classes and examples (``mse-mean``), Glorot-normal
# weights and zero biases (flax's Dense with kernel_init=glorot_normal), pixels scaled to
# [0, 1] and centred by the per-pixel training mean (no division by a standard deviation), an
# MLP with ReLU (their mlp_depth=4 counts 4 linear layers: 3 hidden), width 100 and ρ = 0.1
# as in their run.sh, full batch. Their data set is MNIST (60,000); here Fashion-MNIST subset
# to what 2 CPU cores train in minutes, and their η = 0.01 replaced by one at which this
# smaller run reaches 2/η within its steps (η = 0.8: at 0.5 and 0.25 GD was at 0.70 and
# 0.31 of 2/η after 600 steps, sharpening slowly).
PRESETS: dict[str, dict[str, Any]] = {
    "long-bartlett": {
        "dataset": "fashion-mnist", "subset": 1000, "loss": "mse-mean",
        "init": "glorot-normal", "preprocess": "center",
        "model": "mlp", "model_kwargs": {"depth": 3, "width": 100, "activation": "relu"},
        "lrs": (0.8,), "rhos": (0.1,), "steps": 600, "every": 20, "batch_size": 0,
    },
}


# The keys of EOSConfig that are TrainConfig's (its data, model and run sections): one meaning,
# one help text, one validation (experiments.base.shared_setting).
SHARED_KEYS = ("dataset", "data_dir", "subset", "data_seed", "model", "model_kwargs", "momentum",
               "batch_size", "seed", "device", "threads", "out_dir")


@dataclass(frozen=True)
class EOSConfig:
    """Everything an ``samkit eos`` call depends on (saved as ``config.json``); η is the step
    size (``lrs``), ρ the SAM radius (``rhos``)."""

    # ---- data (the keys of TrainConfig's data section mean what they mean there)
    dataset: str = shared("dataset", "fashion-mnist")
    data_dir: str | None = shared("data_dir", None)
    subset: int | None = shared("subset", 2000, "stratified")
    data_seed: int = shared("data_seed", 0)
    preprocess: str = setting(
        "standardize", "standardize (mean and std per feature) or center (pixels in [0, 1] "
        "minus the per-pixel training mean: Long & Bartlett's)")
    text: str | None = setting(
        None, "a UTF-8 text file: the character-level Transformer instead")
    seq_len: int = setting(
        64, "Transformer: characters per window")
    # ---- model
    model: str = shared("model", "mlp", "here mlp or cnn; transformer (forced by `text`)")
    model_kwargs: dict = shared("model_kwargs", factory=dict,
                                note="over the experiment's defaults (MLP 2x128 tanh, ...)")
    init: str = setting(
        "default", "default (torch's) or glorot-normal (weights N(0, 2/(fan_in + fan_out)), "
        "zero biases: Long & Bartlett's)")
    # ---- loss
    loss: str = setting(
        "mse", "mse: ½ Σ_classes (f - onehot)², mean over examples; mse-mean: (f - onehot)² "
        "averaged over classes and examples (optax.squared_error, Long & Bartlett's: 1/5 of "
        "mse with 10 classes); ce: cross-entropy")
    # ---- optimization: every lr runs GD (if gd) and the SAM variant with every rho
    lrs: tuple[float, ...] = setting(
        (0.1,), "step sizes η", flag=("--lr", "--lrs"))
    rhos: tuple[float, ...] = setting(
        (0.05,), "SAM radii ρ (empty: GD only)", flag=("--rho", "--rhos"))
    gd: bool = setting(
        True, "include the gradient-descent run of every η")
    ascent: str = setting(
        "sam", "sam (ε = ρ g/‖g‖), usam (ε = ρ g), or asam, gsam, fishersam (their edge: "
        "λ_max of the effective Hessian against the base optimizer's edge)")
    momentum: float = shared("momentum", 0.0, "0: plain GD, the papers'")
    optimizer: str = setting(
        "sgd", "sgd (GD and SAM runs) or adam (full-batch Adam runs: the preconditioned "
        "sharpness λ₁(P⁻¹H) against (2 + 2β₁)/(η(1 − β₁)); rhos are not used)")
    beta1: float = setting(
        0.9, "Adam's β₁ (β₂ = 0.999, ε = 1e-8)")
    steps: int = setting(
        1500, "optimizer steps per run")
    batch_size: int = shared("batch_size", 0, "the Transformer's default: 32 (minibatch)")
    seed: int = shared("seed", 0, "the same initialization for every run")
    # ---- the tracker
    every: int = setting(
        10, "measure λ₁ every this many steps (and at step 0), within the budget")
    budget: float | None = setting(
        0.25, "the tracker's largest share of a run's time: a due measurement that would "
        "exceed it is skipped (none: every `every` steps, whatever it costs)")
    tol: float = setting(
        1e-3, "Lanczos relative tolerance")
    k: int = setting(
        1, "top eigenvalues per measurement (λ₁ ... λ_k)")
    measure_on: str = setting(
        "probe", "minibatch runs: probe (λ₁ on fixed examples) or batch (on the step's own "
        "minibatch, as Long & Bartlett measure their language model)")
    probe_size: int = setting(
        512, "minibatch runs: λ₁ on this many fixed training examples")
    # ---- where and how
    device: str = shared("device", "cpu")
    threads: int | None = shared("threads", None)
    out_dir: str = shared("out_dir", "runs")
    name: str | None = setting(
        None, "runs/<name>/ (None: eos-<dataset>-<model>-<loss>)")
    preset: str | None = setting(
        None, "the preset the values came from (long-bartlett), for the record")

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"Invalid loss: {self.loss!r} (allowed: {', '.join(LOSSES)})")
        for key, allowed in (("optimizer", OPTIMIZERS), ("init", INITS),
                             ("preprocess", PREPROCESS), ("measure_on", MEASURE_ON)):
            if getattr(self, key) not in allowed:
                raise ValueError(f"Invalid {key}: {getattr(self, key)!r} (allowed: "
                                 f"{', '.join(allowed)})")
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"Invalid preset: {self.preset!r} (allowed: {', '.join(PRESETS)})")
        C.check_name(self.name)
        if not 0.0 <= self.beta1 < 1.0:
            raise ValueError(f"Invalid beta1: {self.beta1!r} (allowed: in [0, 1))")
        if self.ascent not in ASCENTS:
            raise ValueError(f"Invalid ascent: {self.ascent!r} (allowed: {', '.join(ASCENTS)})")
        if not self.lrs or any(not (isinstance(v, (int, float)) and v > 0) for v in self.lrs):
            raise ValueError(f"Invalid lrs: {self.lrs!r} (allowed: one or more numbers > 0)")
        if any(not (isinstance(v, (int, float)) and v > 0) for v in self.rhos):
            raise ValueError(f"Invalid rhos: {self.rhos!r} (allowed: numbers > 0)")
        if not self.gd and not self.rhos:
            raise ValueError("Nothing to run: gd=False and no rhos (allowed: gd or some rho)")
        for key, low in (("steps", 1), ("every", 1), ("batch_size", 0), ("probe_size", 1),
                         ("seq_len", 1), ("k", 1)):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"Invalid {key}: {value!r} (allowed: an integer >= {low})")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"Invalid momentum: {self.momentum!r} (allowed: in [0, 1))")
        if self.budget is not None and (isinstance(self.budget, bool) or not isinstance(
                self.budget, (int, float)) or not 0 < self.budget <= 1):
            raise ValueError(f"Invalid budget: {self.budget!r} (allowed: none or a number in "
                             "(0, 1])")
        if not (isinstance(self.tol, (int, float)) and 0 < self.tol < 1):
            raise ValueError(f"Invalid tol: {self.tol!r} (allowed: in (0, 1))")
        if self.subset is not None and (isinstance(self.subset, bool) or self.subset < 1):
            raise ValueError(f"Invalid subset: {self.subset!r} (allowed: None or an integer >= 1)")
        # the keys shared with TrainConfig are checked where they are declared
        TrainConfig(**{key: getattr(self, key) for key in SHARED_KEYS})

    @property
    def is_text(self) -> bool:
        return self.text is not None

    @property
    def run_name(self) -> str:
        if self.name:
            return self.name
        data = "text" if self.is_text else self.dataset
        stem = f"eos-{data}-{self.model_name}-{self.loss}"
        # other settings than the defaults: a digest of them, so runs never share a folder
        return stem + C.settings_digest(C.to_dict(self), C.to_dict(EOSConfig()), (
            "dataset", "model", "loss", "name", "out_dir", "device", "threads"))

    @property
    def model_name(self) -> str:
        return "transformer" if self.is_text else self.model

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.run_name


def default_model_kwargs(config: EOSConfig) -> dict[str, Any]:
    """The model's settings: the defaults of the experiment, then ``config.model_kwargs``."""
    base: dict[str, Any] = {}
    if config.model_name == "mlp":
        base = {"depth": 2, "width": 128, "activation": "tanh"}
    elif config.model_name == "cnn":
        base = {"width": 32, "activation": "tanh"}
    elif config.model_name == "transformer":
        base = {"n_layer": 2, "n_head": 2, "n_embd": 64, "dropout": 0.0}
    return {**base, **config.model_kwargs}


def run_specs(config: EOSConfig) -> list[RunSpec]:
    if config.optimizer == "adam":
        return [RunSpec(f"adam-lr{lr:g}", "adam", float(lr), None, config.beta1)
                for lr in config.lrs]
    specs = []
    for lr in config.lrs:
        if config.gd:
            name = "gd" if config.momentum == 0 else f"gd-m{config.momentum:g}"
            specs.append(RunSpec(f"{name}-lr{lr:g}", "sgd", float(lr), None, config.momentum))
        for rho in config.rhos:
            specs.append(RunSpec(f"{config.ascent}-lr{lr:g}-rho{rho:g}", config.ascent,
                                 float(lr), float(rho), config.momentum))
    return specs


@dataclass
class EOSResult:
    config: EOSConfig
    runs: list[RunResult]
    run_dir: Path
    wall_time: float
    notes: list[str] = field(default_factory=list)
    description: str = ""  # data set, size, model, loss: the figures' titles


def describe(config: EOSConfig, n: int) -> str:
    """The setting in one line: data set and size, model, loss, batch (the figures' titles)."""
    kw = default_model_kwargs(config)
    if config.model_name == "mlp":
        model = f"MLP {kw['depth']}×{kw['width']} {kw['activation']}"
    elif config.model_name == "cnn":
        model = f"CNN width {kw['width']} {kw.get('activation', '')}".strip()
    else:
        model = f"Transformer {kw.get('n_layer')}×{kw.get('n_embd')}"
    data = "text" if config.is_text else config.dataset
    loss = {"mse": "square loss ½Σ", "ce": "cross-entropy"}.get(config.loss, config.loss)
    batch = "full batch" if config.batch_size == 0 else f"batch {config.batch_size}"
    return f"{data} ({n:,} examples), {model}, {loss}, {batch}"


def run_title(description: str, spec: RunSpec) -> str:
    rho = "" if spec.rho is None else f", ρ = {spec.rho:g}"
    return f"{spec.label} — {description}, η = {spec.lr:g}{rho}"


# --------------------------------------------------------------------------- data and model


def load_data(config: EOSConfig, device: torch.device):
    """The training split of the experiment (:func:`samkit.train.data.load_data`)."""
    from samkit.train.data import load_data as load

    return load(config.dataset, data_dir=config.data_dir, subset=config.subset,
                data_seed=config.data_seed, preprocess=config.preprocess, text=config.text,
                seq_len=config.seq_len, device=device)[0]


def build_model(config: EOSConfig, train, device: torch.device):
    from samkit.models import create_model

    torch.manual_seed(config.seed)
    shape = (config.seq_len,) if config.is_text else tuple(train.x.shape[1:])
    model = create_model(config.model_name, shape, train.num_classes,
                         **default_model_kwargs(config))
    if config.init == "glorot-normal":
        glorot_normal_(model)
    return model.to(device)


# --------------------------------------------------------------------------- the experiment


def run_eos(config: EOSConfig, verbose: int = 1, command: str | None = None,
            overwrite: bool = False) -> EOSResult:
    """Run every (η, optimizer, ρ) of ``config``; write the runs, figures, table and summary.

    A directory that holds a run is refused unless ``overwrite``; the old run is replaced once
    the data have loaded."""
    from samkit.train.trainer import resolve_device

    if C.check_threads(config.threads) is not None:  # at most the CPUs: a clear error
        torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    specs = run_specs(config)
    outputs = ("config.json", "config.yaml", "report.md", "summary.json", "overview.png",
               *(spec.label for spec in specs))
    with experiment.RunDir(config.run_dir, "eos", outputs, overwrite=overwrite) as run:
        return _run_eos(config, verbose, command, device, run)


def _run_eos(config: EOSConfig, verbose: int, command: str | None, device, run) -> EOSResult:
    run_dir = run.path
    notes = []
    if config.is_text and config.loss != "ce":
        notes.append("the Transformer is trained with cross-entropy (mse is for images)")
    start = time.perf_counter()
    train = load_data(config, device)
    build_model(config, train, device)  # a model that cannot be built fails the start
    run.start()  # --overwrite: the old run goes once the data and the model have loaded
    resolved = C.to_dict(config)
    resolved["model_kwargs"] = default_model_kwargs(config)
    experiment.write_json(run_dir / "config.json", resolved)
    experiment.save_experiment_config(config, run_dir / "config.yaml", resolved)
    specs = run_specs(config)
    description = describe(config, len(train.y))
    if verbose:
        what = "full batch" if config.batch_size == 0 else f"batch {config.batch_size}"
        data = config.text if config.is_text else f"{config.dataset} ({len(train.y)} examples)"
        print(f"samkit eos: {data}, {config.model_name} {default_model_kwargs(config)}, "
              f"loss {config.loss}, {what}, {config.steps} steps, λ₁ every {config.every} "
              "steps" + (f" within {100 * config.budget:g} % of each run's time"
                         if config.budget is not None else "")
              + f"; runs: {', '.join(s.label for s in specs)}", flush=True)
        for note in notes:
            print(f"note: {note}", flush=True)
    runs = []
    for i, spec in enumerate(specs):
        prefix = f"[{i + 1}/{len(specs)} {spec.label}] "
        run = train_run(config, spec, train, run_dir / spec.label, device, verbose, prefix)
        plot_run(run, run_dir / spec.label / "eos.png", title=run_title(description, spec))
        runs.append(run)
    result = EOSResult(config, runs, run_dir, time.perf_counter() - start, notes, description)
    plot_overview(result, run_dir / "overview.png")
    write_report(result, command)
    return result


# --------------------------------------------------------------------------- the command


# The config keys that are flags of their own (the rest through --set); --lr and --rho take
# several values (lrs, rhos).
FLAG_KEYS = ("dataset", "data_dir", "subset", "data_seed", "preprocess", "text", "seq_len",
             "model", "init", "loss", "lrs", "rhos", "ascent", "momentum", "optimizer", "beta1",
             "steps",
             "batch_size", "every", "budget", "tol", "k", "measure_on", "probe_size", "seed",
             "device",
             "threads", "out_dir", "name")


def add_parser(sub) -> argparse.ArgumentParser:
    """Add ``samkit eos`` to the CLI's subparsers; the handler is :func:`cmd_eos`."""
    p = experiment.subcommand(
        sub, "eos", cmd_eos,
        help="GD and SAM at the edge of stability (λ₁ vs 2/η and the SAM-edge)",
        description="Full-batch GD and SAM from one initialization, tracking the top Hessian "
        "eigenvalue: GD settles at 2/η (Cohen et al. 2021), SAM at the SAM-edge, which falls "
        "with ‖g‖ (Long & Bartlett 2023). Writes runs/<name>/{report.md,summary.json,"
        "overview.png,<run>/eos.png,<run>/edge.jsonl}. Default: 2,000 Fashion-MNIST images, "
        "MLP 2x128 tanh, square loss, η=0.1, ρ=0.05, 1,500 steps, λ₁ within a 25 % time budget "
        "(about a minute and a half on 2 cores).",
        epilog="examples:\n"
        "  samkit eos\n"
        "  samkit eos --lr 0.1 0.05 --rho 0.02 0.05 0.1 --steps 500\n"
        "  samkit eos --loss ce --model cnn --dataset cifar10 --subset 1000 --lr 0.05\n"
        "  samkit eos --text input.txt --batch-size 32 --lr 0.5 --rho 0.05 --steps 400\n"
        "  samkit eos --set lrs=[1e-1] tol=5e-4\n"
        "  samkit eos --preset long-bartlett --k 2\n"
        "  samkit eos --optimizer adam --lr 0.002\n"
        "  samkit eos --text input.txt --measure-on batch --rho 0.05 --no-gd\n",
    )
    experiment.add_config_flags(p, "EOSConfig keys")
    helps = {"lrs": "step sizes η (each runs GD and SAM)", "rhos": "SAM radii ρ (none: GD only)",
             "batch_size": "0: full batch (default for images); the Transformer default: 32"}
    C.add_flags(p, EOSConfig, FLAG_KEYS, helps)
    p.add_argument("--width", type=int, default=None,
                   help="hidden units (MLP, default 128) / channels (CNN, 32) / n_embd (64)")
    p.add_argument("--depth", type=int, default=None,
                   help="hidden layers (MLP, default 2) / n_layer (Transformer, 2)")
    p.add_argument("--activation", default=None, help="tanh (default), relu, ...")
    p.add_argument("--no-gd", action="store_true", help="skip the GD runs")
    p.add_argument("--usam", action="store_true", help="unnormalized SAM (ε = ρ g) instead")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="named settings under the flags given (long-bartlett: Long & Bartlett's "
                   "loss, init, preprocessing and MLP on Fashion-MNIST)")
    p.add_argument("--quiet", "-q", action="store_true", help="only the final table")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing run of the same name")
    return p


def config_from_args(args: argparse.Namespace) -> EOSConfig:
    """The config of the command line: --config, then the flags, then --set."""
    values = C.flag_values(args)
    text = values.get("text")
    names = {"width": "width", "depth": "depth", "activation": "activation"}
    if text:  # the Transformer's width and depth
        names = {"width": "n_embd", "depth": "n_layer"}
    model_kwargs = {key: getattr(args, flag) for flag, key in names.items()
                    if getattr(args, flag) is not None}
    if model_kwargs:
        values["model_kwargs"] = model_kwargs
    if text and "batch_size" not in values:
        values["batch_size"] = 32
    if args.no_gd:
        values["gd"] = False
    if args.usam:
        values["ascent"] = "usam"
    if args.preset:
        preset = dict(PRESETS[args.preset])
        if "model_kwargs" in values:  # --width etc. over the preset's model
            values["model_kwargs"] = {**preset.pop("model_kwargs", {}), **values["model_kwargs"]}
        values = {**preset, **values, "preset": args.preset}
    return C.load(EOSConfig, args.config, args.overrides, **values)


def cmd_eos(args: argparse.Namespace, argv: Sequence[str] = ()) -> int:
    """Run ``samkit eos``; print the table; exit status 0 (2 for bad input, via the CLI)."""
    from samkit._extras import require_command, require_dataset

    require_command("eos", progress=not args.quiet)  # before anything is read or trained
    config = config_from_args(args)
    if not config.is_text:
        require_dataset(config.dataset, what=f"samkit eos on {config.dataset}")
    command = experiment.command_line(argv) if argv else None
    result = run_eos(config, verbose=0 if args.quiet else 1, command=command,
                     overwrite=getattr(args, "overwrite", False))
    print()
    print(format_table(result))
    print()
    print("\n".join(verdicts(result)))
    print(f"\n{len(result.runs)} runs in {result.wall_time:.0f} s; report: "
          f"{result.run_dir / 'report.md'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m samkit.experiments.eos``: the same as ``samkit eos``."""
    return experiment.run_main(add_parser, "eos", argv)


if __name__ == "__main__":
    raise SystemExit(main())
