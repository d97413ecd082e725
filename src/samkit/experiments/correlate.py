r"""``samkit correlate``: does adaptive sharpness track the generalization gap better than plain
sharpness?

The ASAM paper's first claim (Kwon et al., 2021, Section 3): because adaptive sharpness is
invariant to weight rescalings that leave the network's function unchanged, it correlates with
the generalization gap better than plain sharpness. This experiment tests the claim on a grid of
models, following Keskar et al. (2017), Jiang et al. (2020) and Kwon et al. (2021):

1. train one model per point of a grid over mini-batch size, initial learning rate, weight decay
   and dropout rate, every one to the same stopping rule: the full training loss (evaluation
   mode) at or below ``stop_loss``, checked after every epoch, within ``train.epochs`` epochs
   (models that miss it are reported and left out of the correlations); or, with
   ``stop_loss: null``, a fixed budget of ``train.epochs``;
2. measure each model: train and test loss and error, the gap (test error - train error, or the
   loss gap), sharpness and adaptive sharpness (:func:`samkit.sharpness.sharpness`) at
   :math:`p = 2` and :math:`p = \infty` for a few radii ρ, and optionally the top Hessian
   eigenvalue λ₁ and the Hessian trace, all on a fixed set of training examples;
3. rank-correlate every measure with the gap: Kendall's :math:`\tau_b` with its p-value, and the
   granulated :math:`\Psi` of Jiang et al. (:mod:`samkit.stats`).

Adaptive sharpness uses element-wise :math:`T_w = \mathrm{diag}(|w| + \eta)` with ``eta = 0`` by
default, which makes it exactly invariant to such rescalings (``rescale`` adds a
function-preserving rescaled copy of every model to show it: the first hidden layer times α,
the next one divided by α).

Everything is cached under ``runs/<name>/models/<model>/`` (the trainer's checkpoint, the
model's ``spec.json`` and ``measures.json``, each written atomically): running the same command
again continues an interrupted study where it stopped, trains only what is missing and measures
only what is not in the cache. ``--jobs N`` trains and measures N models at once in separate
processes (one torch thread each). The study writes ``runs/<name>/report.md`` (the table sorted
by τ, the comparison of adaptive with plain sharpness, the models), ``scatter.png`` (one panel
per measure: the measure against the gap), ``results.csv`` and ``summary.json``.

References:
    J. Kwon, J. Kim, H. Park, I. K. Choi. ASAM: Adaptive Sharpness-Aware Minimization for
    Scale-Invariant Learning of Deep Neural Networks. ICML 2021.
    N. S. Keskar, D. Mudigere, J. Nocedal, M. Smelyanskiy, P. T. P. Tang. On Large-Batch
    Training for Deep Learning: Generalization Gap and Sharp Minima. ICLR 2017.
    Y. Jiang, B. Neyshabur, H. Mobahi, D. Krishnan, S. Bengio. Fantastic Generalization
    Measures and Where to Find Them. ICLR 2020.
    M. Andriushchenko, F. Croce, M. Müller, M. Hein, N. Flammarion. A Modern Look at the
    Relationship between Sharpness and Generalization. ICML 2023.
"""

from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import io
import itertools
import json
import math
import shutil
import sys
import time
import types
import typing
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from samkit.train.checkpoint import atomic_write, atomic_write_text
from samkit.train.config import TrainConfig, apply_overrides, from_dict, resolved_dict, to_dict

GAPS = ("error", "loss")
HYPERPARAMETERS = ("batch_size", "lr", "weight_decay", "dropout")

# What every model of the default study shares (the grid sets batch_size, lr, weight_decay and
# model_kwargs.dropout): an MLP with two ReLU layers of 128 units on a stratified 2,000-example
# subset of Fashion-MNIST, SGD with heavy-ball momentum 0.9 at a constant learning rate, one
# torch thread per model; at most 200 epochs to reach the stopping loss.
DEFAULT_TRAIN = TrainConfig(
    dataset="fashion-mnist",
    subset=2000,
    model="mlp",
    model_kwargs={"depth": 2, "width": 128, "activation": "relu"},
    optimizer="sgd",
    lr=0.03,
    momentum=0.9,
    weight_decay=0.0,
    epochs=200,
    batch_size=128,
    schedule="constant",
    threads=1,
    eval_every=1000,
    log_every=1_000_000,
    checkpoint=True,
    checkpoint_every=10,  # an interrupted model resumes from at most 10 epochs back
)
# --quick: a tiny study for tests and demos (8 small models, a few seconds each).
QUICK_TRAIN = DEFAULT_TRAIN.replace(
    subset=500, model_kwargs={"depth": 2, "width": 32, "activation": "relu"}, epochs=60
)


@dataclass(frozen=True)
class CorrelateConfig:
    """A sharpness-vs-gap study: what is trained, the grid, the stopping rule, the measures."""

    # ---- what every model shares (a TrainConfig; the grid below sets four of its keys)
    train: TrainConfig = DEFAULT_TRAIN
    # ---- the grid: one model per combination (the ASAM paper varies these four)
    batch_sizes: tuple = (32, 128, 512)  # mini-batch sizes
    lrs: tuple = (0.01, 0.02, 0.05)  # initial (here: constant) learning rates
    weight_decays: tuple = (0.0, 5e-4)  # L2 weight decay
    dropouts: tuple = (0.0, 0.2)  # dropout rate (model_kwargs.dropout)
    # ---- the stopping rule, the same for every model
    stop_loss: float | None = 0.01  # stop at this full training loss (eval mode); null: budget
    include_unconverged: bool = False  # correlate models that missed stop_loss too
    gap: str = "error"  # the gap ranked against: error (test - train error) or loss
    # ---- the measures, all on the same `measure_examples` training examples
    measure_examples: int = 1000  # training examples the measures use (a fixed seeded subset)
    rhos_l2: tuple = (0.05, 0.1, 0.2)  # plain sharpness, p = 2: radii
    rhos_linf: tuple = (0.0005, 0.001, 0.002)  # plain sharpness, p = inf: radii
    adaptive_rhos_l2: tuple = (0.5, 1.0, 2.0)  # adaptive sharpness, p = 2: radii
    adaptive_rhos_linf: tuple = (0.005, 0.01, 0.02)  # adaptive sharpness, p = inf: radii
    eta: float = 0.0  # adaptive sharpness T_w = |w| + eta (0: exactly scale-invariant)
    steps: int = 10  # projected-gradient ascent steps after the first (SAM/ASAM) step
    m: int | None = None  # m-sharpness: maximize over micro-batches of m examples (null: all)
    lambda_max: bool = True  # also the top Hessian eigenvalue (Lanczos, tol 1e-3)
    trace: bool = True  # also the Hessian trace (Hutchinson)
    trace_samples: int = 20  # Rademacher vectors of the trace estimate
    rescale: tuple = ()  # add a copy of every model with layer 1 x alpha, layer 2 / alpha
    seed: int = 0  # seeds the measure subset, the sharpness starts and the trace vectors

    def __post_init__(self) -> None:
        if not isinstance(self.train, TrainConfig):
            raise ValueError(f"Invalid train: {self.train!r} (allowed: a TrainConfig mapping)")
        for key in ("batch_sizes", "lrs", "weight_decays", "dropouts", "rhos_l2", "rhos_linf",
                    "adaptive_rhos_l2", "adaptive_rhos_linf", "rescale"):
            value = getattr(self, key)
            if not isinstance(value, (list, tuple)) or any(
                isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                for v in value
            ):
                raise ValueError(f"Invalid {key}: {value!r} (allowed: a list of numbers)")
            object.__setattr__(self, key, tuple(value))
        for key in ("batch_sizes", "lrs", "weight_decays", "dropouts"):
            if not getattr(self, key):
                raise ValueError(f"Invalid {key}: the list is empty (give at least one value)")
        if any(not isinstance(b, int) or b < 0 for b in self.batch_sizes):
            raise ValueError(
                f"Invalid batch_sizes: {list(self.batch_sizes)} (allowed: integers >= 1, or 0 = "
                "full batch)"
            )
        if any(v <= 0 for v in self.lrs):
            raise ValueError(f"Invalid lrs: {list(self.lrs)} (allowed: numbers > 0)")
        if any(v < 0 for v in self.weight_decays):
            raise ValueError(f"Invalid weight_decays: {list(self.weight_decays)} (allowed: >= 0)")
        if any(not 0 <= v < 1 for v in self.dropouts):
            raise ValueError(f"Invalid dropouts: {list(self.dropouts)} (allowed: 0 <= p < 1)")
        for key in ("rhos_l2", "rhos_linf", "adaptive_rhos_l2", "adaptive_rhos_linf", "rescale"):
            if any(v <= 0 for v in getattr(self, key)):
                raise ValueError(f"Invalid {key}: {list(getattr(self, key))} (allowed: > 0)")
        for key in ("batch_sizes", "lrs", "weight_decays", "dropouts"):
            values = getattr(self, key)
            if len(set(values)) != len(values):
                raise ValueError(f"Invalid {key}: {list(values)} has repeated values")
        if self.stop_loss is not None and not (math.isfinite(self.stop_loss)
                                               and self.stop_loss > 0):
            raise ValueError(f"Invalid stop_loss: {self.stop_loss} (allowed: > 0, or null)")
        if self.gap not in GAPS:
            raise ValueError(f"Invalid gap: {self.gap!r} (allowed: {', '.join(GAPS)})")
        for key in ("measure_examples", "trace_samples"):
            if getattr(self, key) < (2 if key == "trace_samples" else 1):
                raise ValueError(f"Invalid {key}: {getattr(self, key)} (allowed: an integer >= "
                                 f"{2 if key == 'trace_samples' else 1})")
        if self.steps < 0:
            raise ValueError(f"Invalid steps: {self.steps} (allowed: an integer >= 0)")
        if self.m is not None and self.m < 1:
            raise ValueError(f"Invalid m: {self.m} (allowed: an integer >= 1, or null)")
        if not (math.isfinite(self.eta) and self.eta >= 0):
            raise ValueError(f"Invalid eta: {self.eta} (allowed: a finite number >= 0)")

    def replace(self, **changes: Any) -> CorrelateConfig:
        return dataclasses.replace(self, **changes)


QUICK = CorrelateConfig(
    train=QUICK_TRAIN,
    batch_sizes=(32, 128),
    lrs=(0.01, 0.03),
    weight_decays=(0.0,),
    dropouts=(0.0, 0.2),
    stop_loss=0.05,
    measure_examples=256,
    rhos_l2=(0.1,),
    rhos_linf=(0.001,),
    adaptive_rhos_l2=(1.0,),
    adaptive_rhos_linf=(0.01,),
    steps=3,
    trace_samples=5,
)
DEFAULT = CorrelateConfig()

# ------------------------------------------------------------------ config: YAML and --set

_FIELDS = {f.name: f for f in dataclasses.fields(CorrelateConfig)}
_HINTS = typing.get_type_hints(CorrelateConfig)


def field_help() -> dict[str, str]:
    """Each study key's comment from the source (for the CLI's help)."""
    import inspect

    out = {}
    for line in inspect.getsource(CorrelateConfig).splitlines():
        name = line.strip().split(":", 1)[0]
        if name in _FIELDS and "#" in line:
            out[name] = line.split("#", 1)[1].strip()
    return out


def _check_study_value(key: str, value: Any, source: str) -> Any:
    if key not in _FIELDS or key == "train":
        import difflib

        close = difflib.get_close_matches(str(key), list(_FIELDS), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        allowed = ", ".join(k for k in _FIELDS if k != "train")
        raise ValueError(
            f"Unknown key {key!r} in {source}{hint} (allowed: {allowed}, and train.<key> for "
            "the training keys)"
        )
    hint = _HINTS[key]
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    for option in options:
        if option is type(None) and value is None:
            return None
        if option is bool and isinstance(value, bool):
            return value
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if option is str and isinstance(value, str):
            return value
        if option is tuple:
            values = value if isinstance(value, (list, tuple)) else [value]
            if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                return tuple(values)
    names = {type(None): "null", bool: "true/false", int: "int", float: "float", str: "str",
             tuple: "a list of numbers"}
    allowed = " or ".join(names.get(o, str(o)) for o in options)
    raise ValueError(f"Invalid value for {key!r} in {source}: {value!r} (allowed: {allowed})")


def config_from_dict(values: dict[str, Any], base: CorrelateConfig = DEFAULT,
                     source: str = "config") -> CorrelateConfig:
    """``base`` updated by a mapping of study keys; ``train`` is a mapping of TrainConfig keys
    applied over ``base.train``."""
    if not isinstance(values, dict):
        raise ValueError(f"Invalid {source}: expected a mapping of keys to values")
    changes: dict[str, Any] = {}
    for key, value in values.items():
        if key == "train":
            if not isinstance(value, dict):
                raise ValueError(f"Invalid train in {source}: expected a mapping of TrainConfig "
                                 "keys (dataset, subset, model, model_kwargs, epochs, ...)")
            changes["train"] = from_dict({**to_dict(base.train), **value}, f"{source}: train")
        else:
            changes[key] = _check_study_value(key, value, source)
    return base.replace(**changes)


def apply_study_overrides(config: CorrelateConfig, overrides: Sequence[str]) -> CorrelateConfig:
    """``--set key=value`` for study keys, ``--set train.key=value`` for training keys
    (``train.model_kwargs.width=64`` works too); values are YAML."""
    from samkit.train.config import parse_override

    for text in overrides:
        key, value = parse_override(text)
        if key.startswith("train."):
            values = apply_overrides(to_dict(config.train), [text.split(".", 1)[1]])
            config = config.replace(train=from_dict(values, f"--set {text}"))
        else:
            config = config.replace(**{key: _check_study_value(key, value, f"--set {text}")})
    return config


def load_correlate_config(
    path: str | Path | None = None,
    overrides: Sequence[str] = (),
    quick: bool = False,
) -> CorrelateConfig:
    """The defaults (or ``--quick``'s), then the YAML file ``path``, then the overrides."""
    import yaml

    config = QUICK if quick else DEFAULT
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"Invalid config {path}: not valid YAML ({err})") from err
        config = config_from_dict(loaded, config, str(path))
    return apply_study_overrides(config, overrides)


def config_to_dict(config: CorrelateConfig) -> dict[str, Any]:
    """Plain YAML/JSON values; ``config_from_dict`` of it gives ``config`` back."""
    out: dict[str, Any] = {}
    for name in _FIELDS:
        value = getattr(config, name)
        if name == "train":
            value = to_dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[name] = value
    return out


# ------------------------------------------------------------------ the grid


def _fmt_num(value: float) -> str:
    return f"{value:g}"


def model_key(hp: dict[str, Any]) -> str:
    """The folder name of one grid point, e.g. ``bs32-lr0.1-wd0.0005-do0``."""
    return (f"bs{hp['batch_size']}-lr{_fmt_num(hp['lr'])}-wd{_fmt_num(hp['weight_decay'])}"
            f"-do{_fmt_num(hp['dropout'])}")


@dataclass(frozen=True)
class ModelSpec:
    """One model of the study: its hyperparameters and its full training config."""

    key: str
    hparams: dict
    train: TrainConfig

    @property
    def run_dir(self) -> Path:
        return self.train.run_dir


def grid(config: CorrelateConfig, run_dir: Path) -> list[ModelSpec]:
    """Every grid point's :class:`ModelSpec`, checked before anything trains."""
    specs = []
    for bs, lr, wd, do in itertools.product(
        config.batch_sizes, config.lrs, config.weight_decays, config.dropouts
    ):
        hp = {"batch_size": int(bs), "lr": float(lr), "weight_decay": float(wd),
              "dropout": float(do)}
        key = model_key(hp)
        values = to_dict(config.train)
        values.update(batch_size=hp["batch_size"], lr=hp["lr"], weight_decay=hp["weight_decay"],
                      model_kwargs={**values["model_kwargs"], "dropout": hp["dropout"]},
                      name=key, out_dir=str(run_dir / "models"))
        specs.append(ModelSpec(key, hp, from_dict(values, f"grid point {key}")))
    return specs


# ------------------------------------------------------------------ the measures


@dataclass(frozen=True)
class Measure:
    """One column of the study: ``key`` (also the cache key's start), a readable ``label``,
    its ``family`` (sharpness, adaptive, lambda_max, trace) and for sharpness ``p`` and ``rho``."""

    key: str
    label: str
    family: str
    p: float | None = None
    rho: float | None = None


def measures(config: CorrelateConfig) -> list[Measure]:
    """The measures the study computes, in table order before sorting."""
    out = []
    for family, p, rhos in (
        ("sharpness", 2, config.rhos_l2),
        ("sharpness", math.inf, config.rhos_linf),
        ("adaptive", 2, config.adaptive_rhos_l2),
        ("adaptive", math.inf, config.adaptive_rhos_linf),
    ):
        pname = "l2" if p == 2 else "linf"
        psym = "2" if p == 2 else "∞"
        for rho in rhos:
            out.append(Measure(
                f"{family}_{pname}_rho{_fmt_num(rho)}",
                f"{'adaptive sharpness' if family == 'adaptive' else 'sharpness'} "
                f"p={psym} ρ={_fmt_num(rho)}",
                family, p, float(rho),
            ))
    if config.lambda_max:
        out.append(Measure("lambda_max", "λ₁ (top Hessian eigenvalue)", "lambda_max"))
    if config.trace:
        out.append(Measure("trace", "Hessian trace", "trace"))
    return out


def cache_key(measure: Measure, config: CorrelateConfig) -> str:
    """Everything the value depends on besides the weights: a changed setting is a new key."""
    n = config.measure_examples
    if measure.family in ("sharpness", "adaptive"):
        key = f"{measure.key}|steps={config.steps}|m={config.m}|n={n}|seed={config.seed}"
        return key + (f"|eta={_fmt_num(config.eta)}" if measure.family == "adaptive" else "")
    if measure.family == "lambda_max":
        return f"lambda_max|tol=0.001|n={n}|seed={config.seed}"
    return f"trace|samples={config.trace_samples}|n={n}|seed={config.seed}"


def measure_one(model, loss_fn, data, measure: Measure, config: CorrelateConfig) -> float:
    """The value of ``measure`` for ``model`` (in eval mode) on ``data``."""
    if measure.family in ("sharpness", "adaptive"):
        from samkit.sharpness import sharpness

        return sharpness(
            model, loss_fn, data, rho=measure.rho, p=measure.p,
            adaptive=measure.family == "adaptive", eta=config.eta, steps=config.steps,
            m=config.m, seed=config.seed,
        ).value
    from samkit.curvature import HessianOperator, hessian_trace, top_eigenvalues

    H = HessianOperator(model, loss_fn, data)
    if measure.family == "lambda_max":
        return float(top_eigenvalues(H, k=1, tol=1e-3, seed=config.seed).values[0])
    return hessian_trace(H, samples=config.trace_samples, seed=config.seed).mean


class MeasureCache:
    """``measures.json`` of one model: ``{cache key: {"value": v, "time": s}}``, rewritten
    atomically after every new entry (so a kill loses at most the measure in progress)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.entries: dict[str, dict[str, Any]] = {}
        if self.path.is_file():
            self.entries = json.loads(self.path.read_text())
        self.computed = 0  # entries computed (not read) by this object

    def get(self, key: str, compute: Callable[[], Any]) -> Any:
        if key not in self.entries:
            t0 = time.perf_counter()
            value = compute()
            self.entries[key] = {"value": value, "time": time.perf_counter() - t0}
            atomic_write_text(self.path, json.dumps(self.entries, indent=1, sort_keys=True))
            self.computed += 1
        return self.entries[key]["value"]


def measure_model(
    model, data, config: CorrelateConfig, cache: MeasureCache | None = None, prefix: str = ""
) -> dict[str, float]:
    """Every measure of ``config`` for ``model`` on ``data`` (one ``(x, y)`` batch), in eval
    mode (dropout off); cached in ``cache`` under ``prefix + cache_key``. The model's mode is
    restored."""
    import torch.nn.functional as F

    training = model.training
    model.eval()
    out = {}
    try:
        for measure in measures(config):
            key = prefix + cache_key(measure, config)
            compute = lambda m=measure: measure_one(model, F.cross_entropy, data, m, config)  # noqa: E731
            out[measure.key] = float(cache.get(key, compute) if cache else compute())
    finally:
        model.train(training)
    return out


def rescale_relu(model, alpha: float, layer: int = 0):
    """A copy of ``model`` computing the same function with different weights: the ``layer``-th
    linear (or conv) layer's weight and bias times ``alpha``, the next one's weight divided by
    ``alpha``. Exact when the activation between them is positively homogeneous (ReLU) and
    nothing normalizes in between (the MLP and CNN of samkit.models)."""
    import torch
    from torch import nn

    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"Invalid alpha: {alpha!r} (allowed: a finite number > 0)")
    out = copy.deepcopy(model)
    layers = [m for m in out.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))]
    if len(layers) < layer + 2:
        raise ValueError(
            f"Invalid layer: {layer} (the model has {len(layers)} linear/conv layers; rescaling "
            "needs the layer and the one after it)"
        )
    first, second = layers[layer], layers[layer + 1]
    with torch.no_grad():
        first.weight.mul_(alpha)
        if first.bias is not None:
            first.bias.mul_(alpha)
        second.weight.div_(alpha)
    return out


@dataclass
class Evaluation:
    train_loss: float
    train_err: float
    test_loss: float
    test_err: float


def evaluate(model, split, batch_size: int = 1000) -> tuple[float, float]:
    """Mean cross-entropy and error of ``model`` (eval mode) on ``split``."""
    import torch
    import torch.nn.functional as F

    training = model.training
    model.eval()
    loss_sum, wrong = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(split.y), batch_size):
            x, y = split.x[start:start + batch_size], split.y[start:start + batch_size]
            logits = model(x)
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            wrong += int((logits.argmax(-1) != y).sum())
    model.train(training)
    n = max(len(split.y), 1)
    return loss_sum / n, wrong / n


# ------------------------------------------------------------------ one model: train, measure

_DATA_CACHE: dict[tuple, Any] = {}


def load_data(train: TrainConfig):
    """The study's (train, test) splits, loaded once per process."""
    from samkit.data import load_dataset

    key = (train.dataset, train.data_dir, train.subset, train.stratified, train.label_noise,
           train.data_seed)
    if key not in _DATA_CACHE:
        _DATA_CACHE.clear()
        _DATA_CACHE[key] = load_dataset(
            train.dataset, data_dir=train.data_dir, subset=train.subset,
            stratified=train.stratified, label_noise=train.label_noise, seed=train.data_seed,
            standardize=True, device="cpu",
        )
    return _DATA_CACHE[key]


def measure_batch(train_split, config: CorrelateConfig):
    """The fixed ``(x, y)`` the measures use: ``measure_examples`` training examples drawn with
    ``config.seed`` (all of them when there are fewer)."""
    import torch

    n = len(train_split.y)
    if config.measure_examples >= n:
        return train_split.x, train_split.y
    generator = torch.Generator().manual_seed(config.seed)
    index = torch.randperm(n, generator=generator)[: config.measure_examples].sort().values
    return train_split.x[index], train_split.y[index]


def _stop_callback(stop_loss: float | None):
    from samkit.train.callbacks import Callback

    class StopRule(Callback):
        """After every epoch: the full training loss in eval mode; stop at ``stop_loss``, or
        at a non-finite loss (diverged)."""

        def on_epoch_end(self, trainer, epoch, metrics):
            if not math.isfinite(metrics["train_loss"]):
                metrics["stop"] = "diverged"
                trainer.request_stop()
                return
            if stop_loss is None:
                return
            loss, acc = trainer.evaluate(trainer.train_data)
            metrics["eval_train_loss"], metrics["eval_train_acc"] = loss, acc
            if not math.isfinite(loss):
                metrics["stop"] = "diverged"
                trainer.request_stop()
            elif loss <= stop_loss:
                metrics["stop"] = "threshold"
                trainer.request_stop()

    return StopRule()


def _spec_record(spec: ModelSpec, config: CorrelateConfig) -> dict[str, Any]:
    return {"hparams": spec.hparams, "train": resolved_dict(spec.train),
            "stop_loss": config.stop_loss}


def _spec_changes(saved: dict[str, Any], record: dict[str, Any]) -> list[str]:
    """The settings in which a cached model's ``spec.json`` differs from ``record``. A training
    key the cache does not know (added to TrainConfig since) counts only if it is not at its
    default; a key the cache has and TrainConfig no longer has is ignored."""
    record = json.loads(json.dumps(record))
    defaults = json.loads(json.dumps(to_dict(TrainConfig())))
    old = saved.get("train", {})
    changed = sorted(
        k for k, v in record["train"].items()
        if (old[k] != v if k in old else defaults.get(k) != v)
    )
    changed += [k for k in ("hparams", "stop_loss") if saved.get(k) != record[k]]
    return changed


def _finished_state(spec: ModelSpec, n_train: int) -> dict[str, Any] | None:
    """The checkpoint's state if the model has finished training (stop rule met, diverged or
    budget spent), else None."""
    from samkit.train.checkpoint import load_checkpoint

    path = spec.run_dir / "checkpoint.pt"
    if not path.is_file():
        return None
    state = load_checkpoint(path)
    record = state.get("last_record")
    if state.get("batch") != 0 or not record:
        return None
    cfg = spec.train
    bs = n_train if cfg.batch_size == 0 else min(cfg.batch_size, n_train)
    steps_per_epoch = n_train // bs if cfg.drop_last else -(-n_train // bs)
    total = cfg.steps or cfg.epochs * steps_per_epoch
    if record.get("stop") in ("threshold", "diverged") or record["step"] >= total:
        return state
    return None


def train_model(
    spec: ModelSpec, config: CorrelateConfig, data, callbacks: Iterable[Any] = (),
    verbose: int = 0,
) -> tuple[Any, dict[str, Any], bool]:
    """Train ``spec`` to the stopping rule, or continue it, or load it when finished.

    Returns ``(model, last epoch record, trained now)``; the model is on the CPU.
    """
    from samkit.models import create_model
    from samkit.train.trainer import Trainer

    spec_path = spec.run_dir / "spec.json"
    record = _spec_record(spec, config)
    if spec_path.is_file():
        changed = _spec_changes(json.loads(spec_path.read_text()), record)
        if changed:
            raise ValueError(
                f"The cached model {spec.run_dir} was trained with other settings (changed: "
                f"{', '.join(changed) or 'spec'}); rerun with --overwrite, or choose another "
                "--name"
            )
    state = _finished_state(spec, len(data[0].y))
    trained = False
    if state is None:
        spec.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(spec_path, json.dumps(record, indent=1, sort_keys=True))
        resume = (spec.run_dir / "checkpoint.pt").is_file()
        trainer = Trainer(
            spec.train, callbacks=[_stop_callback(config.stop_loss), *callbacks], resume=resume,
            overwrite=not resume, data=data, verbose=verbose,
        )
        trainer.fit()
        if trainer.stopped and (trainer.last_record or {}).get("stop") is None:
            raise KeyboardInterrupt(f"training of {spec.key} stopped before its end")
        trained = True
        state = _finished_state(spec, len(data[0].y))
        if state is None:  # pragma: no cover - the trainer always checkpoints its end
            raise RuntimeError(f"{spec.key}: training ended without a final checkpoint")
    import torch

    torch.manual_seed(spec.train.seed)
    train_split = data[0]
    model = create_model(spec.train.model, tuple(train_split.x.shape[1:]),
                         train_split.num_classes, **spec.train.model_kwargs)
    model.load_state_dict(state["model"])
    return model, state["last_record"], trained


def status_of(record: dict[str, Any], config: CorrelateConfig) -> str:
    """``converged`` (stop rule met; every model under a fixed budget), ``unconverged``
    (the budget ran out first) or ``diverged``."""
    stop = record.get("stop")
    if stop == "diverged":
        return "diverged"
    if stop == "threshold" or config.stop_loss is None:
        return "converged"
    return "unconverged"


def process_model(
    spec: ModelSpec, config: CorrelateConfig, callbacks: Iterable[Any] = (), verbose: int = 0
) -> list[dict[str, Any]]:
    """Train (or load) one model, evaluate and measure it (and its rescaled copies); returns its
    rows. Everything is cached in the model's folder."""
    data = load_data(config.train)
    t0 = time.perf_counter()
    model, record, trained = train_model(spec, config, data, callbacks, verbose)
    train_time = time.perf_counter() - t0
    status = status_of(record, config)
    cache = MeasureCache(spec.run_dir / "measures.json")
    batch = measure_batch(data[0], config)
    rows = []
    base_eval = None
    for alpha in (1.0, *config.rescale):
        prefix = "" if alpha == 1.0 else f"x{_fmt_num(alpha)}/"
        net = model if alpha == 1.0 else rescale_relu(model, alpha)

        def _eval(net=net):
            tl, te = evaluate(net, data[0])
            vl, ve = evaluate(net, data[1])
            return {"train_loss": tl, "train_err": te, "test_loss": vl, "test_err": ve}

        ev = cache.get(prefix + "eval", _eval)
        if base_eval is None:
            base_eval = ev
        elif status != "diverged" and not math.isclose(
            ev["train_loss"], base_eval["train_loss"], rel_tol=1e-3, abs_tol=1e-6
        ):
            raise ValueError(
                f"Rescaling {spec.key} by alpha={alpha:g} changed its training loss "
                f"({base_eval['train_loss']:.6g} -> {ev['train_loss']:.6g}): the model is not "
                "positively homogeneous between its first two layers (use a ReLU MLP or CNN)"
            )
        values: dict[str, float] = {}
        if status != "diverged":
            values = measure_model(net, batch, config, cache, prefix)
        row = {
            "model": spec.key if alpha == 1.0 else f"{spec.key}-x{_fmt_num(alpha)}",
            **spec.hparams,
            "alpha": float(alpha),
            "status": status,
            "epochs": record.get("epoch"),
            "steps": record.get("step"),
            "train_time": record.get("train_time"),
            **ev,
            "gap_error": ev["test_err"] - ev["train_err"],
            "gap_loss": ev["test_loss"] - ev["train_loss"],
            **values,
        }
        rows.append(row)
    rows[0]["_trained"] = trained
    rows[0]["_computed"] = cache.computed
    rows[0]["_wall"] = time.perf_counter() - t0
    rows[0]["_train_wall"] = train_time
    return rows


def _worker(spec: ModelSpec, config: CorrelateConfig, threads: int | None):
    """The job of one process of ``--jobs N``."""
    import torch

    torch.set_num_threads(threads or 1)
    return process_model(spec, config)


# ------------------------------------------------------------------ the study


@dataclass
class Correlation:
    measure: Measure
    tau: float
    pvalue: float
    n: int
    psi: float
    psi_per: dict
    tau_other: float  # τ against the other gap (loss gap when ranking the error gap, and back)
    pvalue_other: float


@dataclass
class CorrelateResult:
    name: str
    run_dir: Path
    config: CorrelateConfig
    rows: list[dict[str, Any]] = field(default_factory=list)
    correlations: list[Correlation] = field(default_factory=list)
    hparam_taus: dict[str, Any] = field(default_factory=dict)
    wall_time: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def included(self) -> list[dict[str, Any]]:
        """The rows the correlations use."""
        allowed = {"converged"} | ({"unconverged"} if self.config.include_unconverged else set())
        return [r for r in self.rows if r["status"] in allowed]


def default_name(config: CorrelateConfig, quick: bool = False) -> str:
    return f"correlate{'-quick' if quick else ''}-{config.train.dataset}-{config.train.model}"


def correlate(result: CorrelateResult) -> None:
    """Fill ``result.correlations`` (sorted by τ, largest first) and ``hparam_taus``."""
    from samkit.stats import granulated_kendall, kendall_tau

    cfg = result.config
    rows = result.included
    gap_key = f"gap_{cfg.gap}"
    other_key = "gap_loss" if cfg.gap == "error" else "gap_error"
    gap = [r[gap_key] for r in rows]
    other = [r[other_key] for r in rows]
    groups = [{k: r[k] for k in (*HYPERPARAMETERS, *(("alpha",) if cfg.rescale else ()))}
              for r in rows]
    out = []
    for measure in measures(cfg):
        x = [r.get(measure.key, math.nan) for r in rows]
        k = kendall_tau(x, gap)
        k2 = kendall_tau(x, other)
        psi, per = granulated_kendall(x, gap, groups)
        out.append(Correlation(measure, k.tau, k.pvalue, k.n, psi, per, k2.tau, k2.pvalue))
    out.sort(key=lambda c: (-c.tau if not math.isnan(c.tau) else math.inf))
    result.correlations = out
    result.hparam_taus = {}
    for key in HYPERPARAMETERS:
        k = kendall_tau([r[key] for r in rows], gap)
        result.hparam_taus[key] = {"tau": k.tau, "pvalue": k.pvalue, "n": k.n}


def comparison(result: CorrelateResult) -> list[dict[str, Any]]:
    """Adaptive against plain sharpness at each p: the best and the mean τ over the radii."""
    out = []
    for p in (2, math.inf):
        entry: dict[str, Any] = {"p": "2" if p == 2 else "inf"}
        for family in ("sharpness", "adaptive"):
            taus = [c.tau for c in result.correlations
                    if c.measure.family == family and c.measure.p == p and not math.isnan(c.tau)]
            psis = [c.psi for c in result.correlations
                    if c.measure.family == family and c.measure.p == p and not math.isnan(c.psi)]
            entry[family] = {
                "best_tau": max(taus) if taus else math.nan,
                "mean_tau": sum(taus) / len(taus) if taus else math.nan,
                "mean_psi": sum(psis) / len(psis) if psis else math.nan,
                "count": len(taus),
            }
        out.append(entry)
    return out


def run_correlate(
    config: CorrelateConfig = DEFAULT,
    name: str | None = None,
    jobs: int = 1,
    overwrite: bool = False,
    verbose: int = 1,
    command: str | None = None,
    notes: Sequence[str] = (),
    quick: bool = False,
) -> CorrelateResult:
    """Train and measure every model of the grid (continuing from the cache), then correlate and
    write the report. ``jobs > 1`` runs that many models at once in separate processes."""
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"Invalid jobs: {jobs!r} (allowed: an integer >= 1)")
    name = name or default_name(config, quick)
    if not name or "/" in name or name in (".", ".."):
        raise ValueError(f"Invalid name: {name!r} (allowed: a non-empty name without '/')")
    run_dir = Path(config.train.out_dir) / name
    if overwrite and run_dir.exists():
        shutil.rmtree(run_dir)
    specs = grid(config, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.json", json.dumps(config_to_dict(config), indent=2) + "\n")
    result = CorrelateResult(name, run_dir, config, notes=list(notes))
    done = sum(1 for s in specs if (s.run_dir / "measures.json").is_file())
    if verbose:
        print(f"samkit correlate: {len(specs)} models, {len(measures(config))} measures each, "
              f"{jobs} job(s) -> {run_dir}" + (f" ({done} started before: continuing)"
                                                if done else ""), flush=True)
    start = time.perf_counter()
    by_key: dict[str, list[dict[str, Any]]] = {}

    def report_progress(i: int, rows: list[dict[str, Any]]) -> None:
        if not verbose:
            return
        r = rows[0]
        what = "trained" if r["_trained"] else "cached"
        gap = r["gap_error"]
        print(f"[{i}/{len(specs)}] {r['model']}: {r['status']} after {r['epochs']} epochs "
              f"({what}), train err {100 * r['train_err']:.2f}%, test err "
              f"{100 * r['test_err']:.2f}%, gap {100 * gap:.2f}%, {r['_computed']} new "
              f"measures, {r['_wall']:.1f} s", flush=True)

    if jobs == 1:
        import torch

        threads = config.train.threads
        for i, spec in enumerate(specs, start=1):
            previous = torch.get_num_threads()
            if threads:
                torch.set_num_threads(threads)
            try:
                rows = process_model(spec, config)
            finally:
                torch.set_num_threads(previous)
            by_key[spec.key] = rows
            report_progress(i, rows)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
            futures = {pool.submit(_worker, spec, config, config.train.threads): spec
                       for spec in specs}
            try:
                for i, future in enumerate(as_completed(futures), start=1):
                    rows = future.result()
                    by_key[futures[future].key] = rows
                    report_progress(i, rows)
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise
    result.wall_time = time.perf_counter() - start
    for spec in specs:
        for row in by_key[spec.key]:
            result.rows.append({k: v for k, v in row.items() if not k.startswith("_")})
    statuses = [r["status"] for r in result.rows if r["alpha"] == 1.0]
    missed = statuses.count("unconverged")
    diverged = statuses.count("diverged")
    if missed and config.stop_loss is not None:
        result.notes.append(
            f"{missed} of {len(statuses)} models did not reach the training loss "
            f"{config.stop_loss:g} within {config.train.epochs} epochs"
            + (" (included anyway: include_unconverged)" if config.include_unconverged
               else "; they are left out of the correlations")
        )
    if diverged:
        result.notes.append(f"{diverged} models diverged (non-finite loss); left out")
    correlate(result)
    write_report(result, command=command)
    return result


# ------------------------------------------------------------------ the report


def _f(value: Any, spec: str = ".3f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return format(value, spec)


def _p(value: float) -> str:
    if math.isnan(value):
        return "n/a"
    return f"{value:.1e}" if value < 1e-3 else f"{value:.3f}"


def format_table(result: CorrelateResult) -> str:
    """The τ table, sorted by τ (largest first), as Markdown (readable as text)."""
    gap = "test - train error" if result.config.gap == "error" else "test - train loss"
    other = "loss gap" if result.config.gap == "error" else "error gap"
    lines = [
        f"| measure | τ vs gap ({gap}) | p-value | Ψ (granulated) | τ vs {other} | models |",
        "|---|---|---|---|---|---|",
    ]
    for c in result.correlations:
        lines.append(
            f"| {c.measure.label} | {_f(c.tau, '+.3f')} | {_p(c.pvalue)} | {_f(c.psi, '+.3f')} "
            f"| {_f(c.tau_other, '+.3f')} | {c.n} |"
        )
    return "\n".join(lines)


def format_comparison(result: CorrelateResult) -> str:
    lines = [
        "| p | plain: best τ | plain: mean τ | adaptive: best τ | adaptive: mean τ "
        "| plain: mean Ψ | adaptive: mean Ψ |",
        "|---|---|---|---|---|---|---|",
    ]
    for e in comparison(result):
        s, a = e["sharpness"], e["adaptive"]
        lines.append(
            f"| {e['p']} | {_f(s['best_tau'], '+.3f')} | {_f(s['mean_tau'], '+.3f')} "
            f"| {_f(a['best_tau'], '+.3f')} | {_f(a['mean_tau'], '+.3f')} "
            f"| {_f(s['mean_psi'], '+.3f')} | {_f(a['mean_psi'], '+.3f')} |"
        )
    return "\n".join(lines)


def verdict(result: CorrelateResult) -> str:
    """One sentence per p: is adaptive sharpness's τ higher than plain sharpness's?"""
    parts = []
    for e in comparison(result):
        s, a = e["sharpness"], e["adaptive"]
        if math.isnan(s["best_tau"]) or math.isnan(a["best_tau"]):
            parts.append(f"p={e['p']}: not enough data to compare.")
            continue
        best = "higher" if a["best_tau"] > s["best_tau"] else "not higher"
        mean = "higher" if a["mean_tau"] > s["mean_tau"] else "not higher"
        parts.append(
            f"p={e['p']}: adaptive sharpness's best τ over ρ is {best} than plain sharpness's "
            f"({a['best_tau']:+.3f} vs {s['best_tau']:+.3f}); its mean τ over ρ is {mean} "
            f"({a['mean_tau']:+.3f} vs {s['mean_tau']:+.3f})."
        )
    return " ".join(parts)


def format_models(result: CorrelateResult) -> str:
    lines = [
        "| model | batch | lr | wd | dropout | α | status | epochs | train err (%) "
        "| test err (%) | gap (%) | train loss | test loss |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result.rows:
        lines.append(
            f"| {r['model']} | {r['batch_size']} | {r['lr']:g} | {r['weight_decay']:g} "
            f"| {r['dropout']:g} | {r['alpha']:g} | {r['status']} | {r['epochs']} "
            f"| {_f(100 * r['train_err'], '.2f')} | {_f(100 * r['test_err'], '.2f')} "
            f"| {_f(100 * r['gap_error'], '.2f')} | {_f(r['train_loss'], '.4f')} "
            f"| {_f(r['test_loss'], '.4f')} |"
        )
    return "\n".join(lines)


def plot_scatter(result: CorrelateResult, path: Path) -> Path:
    """One panel per measure: the measure (x, log scale when positive) against the gap (y),
    coloured by batch size, marker by learning rate; τ in the title."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = result.included
    cors = {c.measure.key: c for c in result.correlations}
    ms = measures(result.config)
    cols = 4
    nrows = max(1, -(-len(ms) // cols))
    fig = Figure(figsize=(3.6 * cols, 3.0 * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, cols, squeeze=False).ravel()
    gap_key = f"gap_{result.config.gap}"
    scale = 100.0 if result.config.gap == "error" else 1.0
    batch_sizes = sorted({r["batch_size"] for r in rows})
    lrs = sorted({r["lr"] for r in rows})
    markers = "osD^v<>ph*"
    colors = [f"C{i}" for i in range(10)]
    for ax, m in zip(axes, ms, strict=False):
        xs_all = [r.get(m.key, math.nan) for r in rows]
        positive = all(x > 0 for x in xs_all if math.isfinite(x)) and any(
            math.isfinite(x) for x in xs_all)
        for bi, bs in enumerate(batch_sizes):
            for li, lr in enumerate(lrs):
                pts = [(r.get(m.key, math.nan), scale * r[gap_key]) for r in rows
                       if r["batch_size"] == bs and r["lr"] == lr]
                pts = [(x, y) for x, y in pts if math.isfinite(x) and math.isfinite(y)]
                if not pts:
                    continue
                label = f"bs {bs}, lr {lr:g}" if ax is axes[0] else None
                ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=18,
                           color=colors[bi % 10], marker=markers[li % len(markers)],
                           alpha=0.8, label=label)
        if positive:
            from matplotlib.ticker import NullFormatter

            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())  # no overlapping minor labels
        c = cors.get(m.key)
        title = m.label if c is None else f"{m.label}\nτ = {_f(c.tau, '+.2f')}"
        ax.set_title(title, fontsize="small")
        ax.tick_params(labelsize="x-small")
        ax.grid(alpha=0.3)
        ax.set_ylabel("gap (%)" if scale == 100.0 else "loss gap", fontsize="small")
    for ax in axes[len(ms):]:
        ax.set_visible(False)
    if len(batch_sizes) * len(lrs) <= 16 and rows:
        axes[0].legend(fontsize="xx-small")
    path = Path(path)
    atomic_write(path, lambda handle: fig.savefig(handle, format="png", dpi=100))
    return path


def write_csv(result: CorrelateResult, path: Path) -> Path:
    keys: list[str] = []
    for r in result.rows:
        keys += [k for k in r if k not in keys]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=keys)
    writer.writeheader()
    for r in result.rows:
        writer.writerow(r)
    return atomic_write_text(path, buffer.getvalue())


def write_report(result: CorrelateResult, command: str | None = None) -> Path:
    """``report.md``, ``scatter.png``, ``results.csv`` and ``summary.json``."""
    cfg = result.config
    t = cfg.train
    plot_scatter(result, result.run_dir / "scatter.png")
    write_csv(result, result.run_dir / "results.csv")
    originals = [r for r in result.rows if r["alpha"] == 1.0]
    counts = {s: sum(r["status"] == s for r in originals)
              for s in ("converged", "unconverged", "diverged")}
    stop = (f"training loss (eval mode, full training set) <= {cfg.stop_loss:g}, checked after "
            f"every epoch, at most {t.epochs} epochs" if cfg.stop_loss is not None
            else f"a fixed budget of {t.epochs} epochs")
    lines = [
        f"# samkit correlate: {result.name}",
        "",
        f"Command: `{command}`" if command else
        "Run from Python (samkit.experiments.correlate.run_correlate).",
        "",
        f"Data: **{t.dataset}**, {t.subset or 'all'} training examples"
        + (f" (stratified, data seed {t.data_seed})" if t.subset else "")
        + (f", {100 * t.label_noise:g}% label noise" if t.label_noise else "")
        + "; test on the full test split. "
        f"Model: **{t.model}** {t.model_kwargs}, seed {t.seed}. Optimizer: {t.optimizer}, "
        f"momentum {t.momentum:g}, {t.schedule} learning rate.",
        f"Grid: batch size {list(cfg.batch_sizes)} × learning rate {list(cfg.lrs)} × weight "
        f"decay {list(cfg.weight_decays)} × dropout {list(cfg.dropouts)} = "
        f"{len(originals)} models"
        + (f", plus a rescaled copy of each for α in {list(cfg.rescale)}" if cfg.rescale else "")
        + f". Stopping rule: {stop}.",
        f"Models: {counts['converged']} converged, {counts['unconverged']} missed the stopping "
        f"loss, {counts['diverged']} diverged; correlations over {len(result.included)} rows.",
        f"Measures on {cfg.measure_examples} fixed training examples (seed {cfg.seed}), model in "
        f"eval mode, cross-entropy: sharpness max L(w+ε) − L(w) over ‖ε‖_p ≤ ρ, adaptive "
        f"sharpness over ‖T_w⁻¹ε‖_p ≤ ρ with T_w = |w| + {cfg.eta:g} element-wise (biases "
        f"included); {cfg.steps} projected-gradient steps after the SAM/ASAM step"
        + (f", m = {cfg.m}" if cfg.m else "")
        + "; λ₁ by Lanczos (tol 1e-3); trace by Hutchinson "
        f"({cfg.trace_samples} vectors).",
        "",
        "## Kendall τ between each measure and the generalization gap (sorted by τ)",
        "",
        format_table(result),
        "",
        "τ: Kendall's τ_b over all models (p-value of τ = 0, two-sided). Ψ: the granulated "
        "coefficient of Jiang et al. (2020), the mean over the four hyperparameters of the mean "
        "τ over groups of models that differ in that hyperparameter only.",
        "",
        "## Adaptive against plain sharpness",
        "",
        format_comparison(result),
        "",
        verdict(result),
        "",
        "## The hyperparameters themselves (τ against the gap, for reference)",
        "",
        "| hyperparameter | τ | p-value |",
        "|---|---|---|",
    ]
    for key, v in result.hparam_taus.items():
        lines.append(f"| {key} | {_f(v['tau'], '+.3f')} | {_p(v['pvalue'])} |")
    lines += [
        "",
        "![measure against gap](scatter.png)",
        "",
        "## Models",
        "",
        format_models(result),
        "",
        f"Wall time of this invocation: {result.wall_time:.0f} s (models taken from the cache "
        "cost nothing). All numbers per model: results.csv; summary.json.",
    ]
    if result.notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in result.notes]
    path = atomic_write_text(result.run_dir / "report.md", "\n".join(lines) + "\n")
    summary = {
        "name": result.name,
        "config": config_to_dict(cfg),
        "wall_time": result.wall_time,
        "correlations": [
            {"measure": c.measure.key, "label": c.measure.label, "family": c.measure.family,
             "p": None if c.measure.p is None else ("inf" if c.measure.p == math.inf else 2),
             "rho": c.measure.rho, "tau": c.tau, "pvalue": c.pvalue, "n": c.n, "psi": c.psi,
             "psi_per_hyperparameter": c.psi_per, "tau_other_gap": c.tau_other,
             "pvalue_other_gap": c.pvalue_other}
            for c in result.correlations
        ],
        "comparison": comparison(result),
        "verdict": verdict(result),
        "hyperparameters": result.hparam_taus,
        "rows": result.rows,
        "notes": result.notes,
    }
    atomic_write_text(result.run_dir / "summary.json",
                      json.dumps(_finite(summary), indent=2, allow_nan=False) + "\n")
    return path


def _finite(value: Any) -> Any:
    """``value`` with NaN and inf replaced by None (strict JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


# ------------------------------------------------------------------ the command


def with_fallback(config: CorrelateConfig) -> tuple[CorrelateConfig, list[str]]:
    """``config``, or a digits version when the Fashion-MNIST files cannot be found."""
    from samkit.data import DataNotFoundError, resolve_data_dir

    if config.train.dataset != "fashion-mnist":
        return config, []
    try:
        resolve_data_dir("fashion-mnist", config.train.data_dir)
    except DataNotFoundError as err:
        first = str(err).splitlines()[0]
        note = (f"Fashion-MNIST not found ({first}); falling back to scikit-learn's digits "
                "(1,438 training images). Install it (Debian: apt-get install "
                "dataset-fashion-mnist) or point --data-dir / SAMKIT_DATA at the IDX files.")
        return config.replace(train=config.train.replace(dataset="digits", subset=None)), [note]
    return config, []


def add_parser(sub) -> argparse.ArgumentParser:
    """Add ``samkit correlate`` to the CLI's subparsers; the handler is :func:`cmd_correlate`."""
    d = DEFAULT
    helps = field_help()
    keys = "\n".join(f"  {k:20s} {helps.get(k, '')}" for k in _FIELDS if k != "train")
    p = sub.add_parser(
        "correlate", help="rank-correlate sharpness and adaptive sharpness with the gap",
        formatter_class=argparse.RawDescriptionHelpFormatter,
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
        "  samkit correlate --batch-sizes 32 256 --lrs 0.01 0.1 --rescale 10\n"
        "  samkit correlate --config configs/correlate.yaml --set train.subset=5000 steps=20\n"
        "\nstudy keys (--set KEY=VALUE; training keys as train.KEY=VALUE):\n" + keys + "\n",
    )
    p.add_argument("--config", help="YAML config (study keys, and train: {training keys})")
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[],
                   metavar="KEY=VALUE", help="override keys, e.g. --set steps=20 "
                   "train.subset=5000 (values are YAML)")
    p.add_argument("--quick", action="store_true",
                   help="a tiny study (8 small models, one ρ each) for tests and demos")
    p.add_argument("--jobs", "-j", type=int, default=1, help="models trained at once (processes)")
    for flag, key, typ, meta in (("--batch-sizes", "batch_sizes", int, "B"),
                                 ("--lrs", "lrs", float, "LR"),
                                 ("--weight-decays", "weight_decays", float, "WD"),
                                 ("--dropouts", "dropouts", float, "P")):
        default = " ".join(f"{v:g}" for v in getattr(d, key))
        p.add_argument(flag, type=typ, nargs="+", default=None, metavar=meta,
                       help=f"{helps[key]} (default: {default})")
    p.add_argument("--stop-loss", type=float, default=None,
                   help=f"stop at this training loss (default {d.stop_loss:g})")
    p.add_argument("--budget", action="store_true",
                   help="no loss threshold: every model trains for --epochs epochs")
    p.add_argument("--epochs", type=int, default=None, help="the most epochs (the budget)")
    p.add_argument("--rescale", type=float, nargs="+", default=None, metavar="ALPHA",
                   help="add a function-preserving rescaled copy of every model")
    p.add_argument("--dataset", default=None, help="data set (default fashion-mnist)")
    p.add_argument("--data-dir", default=None, help="folder with the data files")
    p.add_argument("--subset", type=int, default=None, help="training examples (stratified)")
    p.add_argument("--out-dir", default=None, help="parent folder (default: runs)")
    p.add_argument("--name", default=None, help="runs/<name>/ (default: correlate-<data>-<model>)")
    p.add_argument("--overwrite", action="store_true",
                   help="delete the study's cache and start again")
    p.add_argument("--quiet", "-q", action="store_true", help="only the final table")
    p.set_defaults(handler=cmd_correlate)
    return p


def config_from_args(args: argparse.Namespace) -> tuple[CorrelateConfig, list[str]]:
    config = load_correlate_config(args.config, [], quick=args.quick)
    notes: list[str] = []
    train_changes: dict[str, Any] = {}
    if args.dataset is not None:
        train_changes["dataset"] = args.dataset
        if args.dataset != config.train.dataset and args.subset is None:
            train_changes["subset"] = None  # the default subset is a Fashion-MNIST choice
    for flag, key in (("data_dir", "data_dir"), ("subset", "subset"), ("out_dir", "out_dir"),
                      ("epochs", "epochs")):
        if getattr(args, flag) is not None:
            train_changes[key] = getattr(args, flag)
    if train_changes:
        config = config.replace(train=config.train.replace(**train_changes))
    if args.dataset is None and args.config is None:
        config, notes = with_fallback(config)
    changes: dict[str, Any] = {}
    for flag in ("batch_sizes", "lrs", "weight_decays", "dropouts", "rescale"):
        if getattr(args, flag) is not None:
            changes[flag] = tuple(getattr(args, flag))
    if args.stop_loss is not None:
        changes["stop_loss"] = args.stop_loss
    if args.budget:
        changes["stop_loss"] = None
    if changes:
        config = config.replace(**changes)
    return apply_study_overrides(config, args.overrides), notes


def cmd_correlate(args: argparse.Namespace, argv: Sequence[str] = ()) -> int:
    """Run ``samkit correlate``; print the τ table; exit status 0 (2 bad input, 130 Ctrl-C)."""
    import shlex

    config, notes = config_from_args(args)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    command = "samkit " + " ".join(shlex.quote(a) for a in argv) if argv else None
    try:
        result = run_correlate(
            config, name=args.name, jobs=args.jobs, overwrite=args.overwrite,
            verbose=0 if args.quiet else 1, command=command, notes=notes, quick=args.quick,
        )
    except KeyboardInterrupt:
        print("\ninterrupted: finished models and measures are cached; run the same command "
              "again to continue", file=sys.stderr)
        return 130
    print()
    print(format_table(result))
    print()
    print(verdict(result))
    print(f"\n{len(result.rows)} models, {len(result.included)} correlated, "
          f"{result.wall_time:.0f} s; report: {result.run_dir / 'report.md'}")
    for note in result.notes:
        print(f"note: {note}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m samkit.experiments.correlate``: the same as ``samkit correlate``."""
    parser = argparse.ArgumentParser(prog="samkit")
    add_parser(parser.add_subparsers(dest="command"))
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(["correlate", *argv])
    try:
        return cmd_correlate(args, ["correlate", *argv])
    except (ValueError, FileNotFoundError, FileExistsError, ImportError) as err:
        print(f"samkit: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
