"""The study's config: :class:`CorrelateConfig` (a :mod:`samkit.config` dataclass with a nested
``train`` :class:`~samkit.config.TrainConfig`), its defaults, YAML and ``--set``."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from samkit import config as C
from samkit.config import TrainConfig, setting
from samkit.experiments import base

GAPS = ("error", "loss")
SIGMA_KEYS = ("avg_sigmas", "avg_sigmas_uniform", "adaptive_avg_sigmas",
              "adaptive_avg_sigmas_uniform")
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
    lr_schedule="constant",
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
    train: TrainConfig = setting(
        DEFAULT_TRAIN, "what every model shares (training keys; the grid sets four of them)")
    # ---- the grid: one model per combination (the ASAM paper varies these four)
    batch_sizes: tuple = setting(
        (32, 128, 512), "mini-batch sizes", flag=("--batch-size", "--batch-sizes"))
    lrs: tuple = setting(
        (0.01, 0.02, 0.05), "initial (here: constant) learning rates",
        flag=("--lr", "--lrs"))
    weight_decays: tuple = setting(
        (0.0, 5e-4), "L2 weight decay", flag=("--weight-decay", "--weight-decays"))
    dropouts: tuple = setting(
        (0.0, 0.2), "dropout rate (model_kwargs.dropout)", flag=("--dropout", "--dropouts"))
    # ---- the stopping rule, the same for every model
    stop_loss: float | None = setting(
        0.01, "stop at this full training loss (eval mode); null: budget")
    include_unconverged: bool = setting(
        False, "correlate models that missed stop_loss too")
    gap: str = setting(
        "error", "the gap ranked against: error (test - train error) or loss")
    # ---- the measures, all on the same `measure_examples` training examples
    measure_examples: int = setting(
        1000, "training examples the measures use (a fixed seeded subset)")
    rhos_l2: tuple = setting(
        (0.05, 0.1, 0.2), "plain sharpness, p = 2: radii")
    rhos_linf: tuple = setting(
        (0.0005, 0.001, 0.002), "plain sharpness, p = inf: radii")
    adaptive_rhos_l2: tuple = setting(
        (0.5, 1.0, 2.0), "adaptive sharpness, p = 2: radii")
    adaptive_rhos_linf: tuple = setting(
        (0.005, 0.01, 0.02), "adaptive sharpness, p = inf: radii")
    eta: float = setting(
        0.0, "adaptive sharpness T_w = |w| + eta (0: exactly scale-invariant)")
    steps: int = setting(
        10, "projected-gradient ascent steps after the first (SAM/ASAM) step")
    m: int | None = setting(
        None, "m-sharpness: maximize over micro-batches of m examples (null: all)")
    starts: int | None = setting(
        None, "ascents per worst-case maximization (null: samkit's 8; 1: one, from the SAM "
        "step)")
    avg_sigmas: tuple = setting(
        (), "average-case sharpness, Gaussian perturbations: sigma per entry")
    avg_sigmas_uniform: tuple = setting(
        (), "average-case sharpness, uniform perturbations in [-sigma, sigma]")
    adaptive_avg_sigmas: tuple = setting(
        (), "adaptive average-case sharpness, Gaussian: sigma |w| per entry")
    adaptive_avg_sigmas_uniform: tuple = setting(
        (), "adaptive average-case sharpness, uniform in [-sigma |w|, sigma |w|]")
    avg_samples: int = setting(
        20, "random perturbations per average-case measure (seeded)")
    normalize_logits: bool = setting(
        False, "measure sharpness of the model with centred, unit-norm logits")
    error_increase: bool = setting(
        False, "also rank the error increase beside each sharpness's loss increase")
    preset: str = setting(
        "kwon2021", "the published measure setting the keys above started from (--measures)")
    lambda_max: bool = setting(
        True, "also the top Hessian eigenvalue (Lanczos, tol 1e-3)")
    trace: bool = setting(
        True, "also the Hessian trace (Hutchinson)")
    trace_samples: int = setting(
        20, "Rademacher vectors of the trace estimate")
    rescale: tuple = setting(
        (), "add a copy of every model with layer 1 x alpha, layer 2 / alpha")
    seed: int = setting(
        0, "seeds the measure subset, the sharpness starts and the trace vectors")
    resamples: int = setting(
        2000, "bootstrap resamples of the models for every confidence interval")

    def __post_init__(self) -> None:
        if not isinstance(self.train, TrainConfig):
            raise ValueError(f"Invalid train: {self.train!r} (allowed: a TrainConfig mapping)")
        for key in ("batch_sizes", "lrs", "weight_decays", "dropouts", "rhos_l2", "rhos_linf",
                    "adaptive_rhos_l2", "adaptive_rhos_linf", "rescale", *SIGMA_KEYS):
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
        for key in ("rhos_l2", "rhos_linf", "adaptive_rhos_l2", "adaptive_rhos_linf", "rescale",
                    *SIGMA_KEYS):
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
        if self.starts is not None and (isinstance(self.starts, bool) or self.starts < 1):
            raise ValueError(f"Invalid starts: {self.starts} (allowed: an integer >= 1, or null)")
        if isinstance(self.resamples, bool) or self.resamples < 100:
            raise ValueError(f"Invalid resamples: {self.resamples} (allowed: an integer >= 100)")
        if isinstance(self.avg_samples, bool) or self.avg_samples < 2:
            raise ValueError(f"Invalid avg_samples: {self.avg_samples} (allowed: an integer >= 2)")
        from samkit.measures import PRESETS

        if self.preset not in PRESETS:
            raise ValueError(f"Invalid preset: {self.preset!r} (allowed: {', '.join(PRESETS)})")

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


def field_help() -> dict[str, str]:
    """Each study key's help (for the CLI's help)."""
    return C.help_of(CorrelateConfig)


def config_from_dict(values: dict[str, Any], base: CorrelateConfig = DEFAULT,
                     source: str = "config") -> CorrelateConfig:
    """``base`` updated by a mapping of study keys; ``train`` is a mapping of TrainConfig keys
    applied over ``base.train``."""
    return C.from_dict(values, source, CorrelateConfig, base=base)


def apply_study_overrides(config: CorrelateConfig, overrides: Sequence[str]) -> CorrelateConfig:
    """``--set key=value`` for study keys, ``--set train.key=value`` for training keys
    (``train.model_kwargs.width=64`` works too); values are YAML."""
    if not overrides:
        return config
    values = C.apply_overrides(C.to_dict(config), list(overrides), CorrelateConfig)
    return C.from_dict(values, "--set", CorrelateConfig)


def load_correlate_config(
    path: str | Path | None = None,
    overrides: Sequence[str] = (),
    quick: bool = False,
) -> CorrelateConfig:
    """The defaults (or ``--quick``'s), then the YAML file ``path``, then the overrides."""
    return C.load(CorrelateConfig, path, list(overrides), base=QUICK if quick else DEFAULT)


def apply_preset(config: CorrelateConfig, name: str) -> CorrelateConfig:
    """``config`` with the measure settings of a published study (:data:`samkit.measures.PRESETS`:
    ``kwon2021``, ``andriushchenko2023``) and ``preset`` set to its name."""
    from samkit.measures import PRESETS

    if name not in PRESETS:
        raise ValueError(f"Invalid measures: {name!r} (allowed: {', '.join(PRESETS)})")
    return config.replace(**PRESETS[name], preset=name)


def preset_changes(config: CorrelateConfig) -> dict[str, Any]:
    """The measure settings in which ``config`` differs from its ``preset``."""
    from samkit.measures import PRESETS

    return {k: getattr(config, k) for k, v in PRESETS[config.preset].items()
            if getattr(config, k) != (tuple(v) if isinstance(v, list) else v)}


def config_to_dict(config: CorrelateConfig) -> dict[str, Any]:
    """Plain YAML/JSON values; ``config_from_dict`` of it gives ``config`` back."""
    return C.to_dict(config)


def with_fallback(config: CorrelateConfig) -> tuple[CorrelateConfig, list[str]]:
    """``config``, or a digits version when the Fashion-MNIST files cannot be found."""
    train, notes = base.with_fallback(config.train, {"dataset": "digits", "subset": None})
    return (config.replace(train=train) if notes else config), notes
