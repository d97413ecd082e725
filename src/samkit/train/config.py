"""The one training config: a frozen dataclass, loaded from YAML and ``--set key=value``.

Every run saves its resolved config as ``runs/<name>/config.yaml``; loading that file gives the
same run back (``samkit train --config runs/<name>/config.yaml``).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCHEDULES = ("constant", "cosine", "step")
PERTURBATIONS = ("local", "synced")  # samkit.distributed.PERTURBATIONS


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on. Defaults: a small MLP on Fashion-MNIST with SGD."""

    # ---- data
    dataset: str = "fashion-mnist"  # a samkit.data name: fashion-mnist, mnist, cifar10, digits, ...
    data_dir: str | None = None  # None: $SAMKIT_DATA, then the standard places (see samkit.data)
    subset: int | None = None  # train on this many examples (None: the whole training set)
    stratified: bool = True  # the subset has (nearly) the same number of examples per class
    label_noise: float = 0.0  # fraction of training labels flipped to another class, in [0, 1)
    data_seed: int = 0  # seed of the subset and the label noise (fixed while `seed` varies)
    augment: bool = False  # random crop (padding 4) + horizontal flip, on the device, seeded
    # ---- model
    model: str = "mlp"  # a samkit.models name: mlp, cnn, resnet20, wrn28-10, vgg16, transformer
    model_kwargs: dict = field(default_factory=dict)  # passed to create_model (e.g. width: 512)
    # ---- optimizer (built by samkit.create_optimizer from the registry)
    optimizer: str = "sgd"  # a registry name: samkit.list_optimizers() (sgd, adam, sam, asam, ...)
    base: str | None = None  # base of a sharpness-aware optimizer: sgd, adam, adamw (None: its own)
    lr: float = 0.1  # peak learning rate (the schedule multiplies it)
    momentum: float = 0.9  # heavy-ball momentum; used only when the base optimizer is SGD
    weight_decay: float = 5e-4  # L2 weight decay (decoupled for adamw)
    rho: float | None = None  # SAM/ASAM radius (None: the optimizer's default, SAM 0.05, ASAM 0.5)
    eta: float | None = None  # ASAM's normalization offset eta (None: its default 0.01); not the LR
    optimizer_kwargs: dict = field(default_factory=dict)  # any other argument (nesterov, betas, p)
    # ---- budget and schedule
    epochs: int = 10  # passes over the training set
    steps: int | None = None  # stop after this many optimizer steps instead (overrides epochs)
    batch_size: int = 128  # examples per optimizer step; 0 = the whole (sub)set (full-batch GD)
    grad_accum: int = 1  # split each batch into this many micro-batches (exact accumulation)
    perturbation: str = "synced"  # DDP: synced (eps of the global batch) or local (per replica)
    drop_last: bool = False  # skip the last, smaller batch of each epoch
    schedule: str = "cosine"  # learning-rate schedule after warm-up: constant, cosine or step
    warmup_epochs: float = 0.0  # linear warm-up from 0 to lr over this many epochs (fractions ok)
    milestones: tuple = (0.5, 0.75)  # `step` schedule: fractions of training where lr *= gamma
    gamma: float = 0.1  # `step` schedule: the factor at each milestone
    label_smoothing: float = 0.0  # cross-entropy label smoothing (the ASAM paper uses 0.1)
    # ---- run
    seed: int = 0  # seed of the initialization, data order, augmentation and dropout
    device: str = "auto"  # cpu, cuda, cuda:1, mps; auto: cuda when available, else cpu
    threads: int | None = None  # CPU threads for torch (None: its default; 1 suits small models)
    amp: bool = False  # mixed precision: float16 + GradScaler on CUDA, bfloat16 on CPU
    eval_every: int = 1  # evaluate on the test set every this many epochs (and at the end)
    eval_batch_size: int = 1000  # batch size of the evaluation (no effect on the results)
    name: str | None = None  # run name: runs/<name>/ (None: <dataset>-<model>-<optimizer>-s<seed>)
    out_dir: str = "runs"  # parent directory of the run directories
    checkpoint: bool = True  # save runs/<name>/checkpoint.pt (atomically) at epoch ends
    checkpoint_every: int = 1  # epochs between checkpoints (the last epoch and stops always save)
    tensorboard: bool = False  # also write TensorBoard events (needs `pip install tensorboard`)
    log_every: int = 50  # steps between progress lines when stdout is not a terminal

    def __post_init__(self) -> None:
        # Frozen, so normalize through object.__setattr__: YAML gives lists, we keep tuples.
        object.__setattr__(self, "milestones", tuple(float(m) for m in self.milestones))
        object.__setattr__(self, "model_kwargs", dict(self.model_kwargs))
        object.__setattr__(self, "optimizer_kwargs", dict(self.optimizer_kwargs))
        _positive_int("epochs", self.epochs)
        if self.steps is not None:
            _positive_int("steps", self.steps)
        _positive_int("checkpoint_every", self.checkpoint_every)
        if self.subset is not None:
            _positive_int("subset", self.subset)
        if self.batch_size < 0:
            raise ValueError(f"Invalid batch_size: {self.batch_size} (allowed: >= 1, or 0 = full)")
        if self.threads is not None:
            _positive_int("threads", self.threads)
        for key in ("grad_accum", "eval_every", "eval_batch_size", "log_every"):
            _positive_int(key, getattr(self, key))
        _in_range("label_noise", self.label_noise, 0.0, 1.0)
        _in_range("label_smoothing", self.label_smoothing, 0.0, 1.0)
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"Invalid lr: {self.lr} (allowed: a finite number > 0)")
        for key in ("momentum", "weight_decay", "warmup_epochs", "gamma"):
            value = getattr(self, key)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"Invalid {key}: {value} (allowed: a finite number >= 0)")
        for key in ("rho", "eta"):
            value = getattr(self, key)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise ValueError(f"Invalid {key}: {value} (allowed: a finite number >= 0, or null)")
        if self.perturbation not in PERTURBATIONS:
            allowed = ", ".join(PERTURBATIONS)
            raise ValueError(f"Invalid perturbation: {self.perturbation!r} (allowed: {allowed})")
        if self.schedule not in SCHEDULES:
            allowed = ", ".join(SCHEDULES)
            raise ValueError(f"Invalid schedule: {self.schedule!r} (allowed: {allowed})")
        if any(not 0 < m < 1 for m in self.milestones):
            raise ValueError(
                f"Invalid milestones: {list(self.milestones)} (allowed: fractions of training "
                "strictly between 0 and 1, e.g. [0.5, 0.75])"
            )
        if self.name is not None and (not self.name or "/" in self.name or self.name in ".."):
            raise ValueError(f"Invalid name: {self.name!r} (allowed: a non-empty name without '/')")

    # ---------------------------------------------------------------- derived values

    @property
    def run_name(self) -> str:
        return self.name or f"{self.dataset}-{self.model}-{self.optimizer}-s{self.seed}"

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.run_name

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with ``changes`` applied (checked like the YAML keys)."""
        return from_dict({**to_dict(self), **changes})


def _positive_int(key: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"Invalid {key}: {value} (allowed: an integer >= 1)")


def _in_range(key: str, value: float, low: float, high: float) -> None:
    if not low <= value < high:
        raise ValueError(f"Invalid {key}: {value} (allowed: {low} <= {key} < {high})")


# -------------------------------------------------------------------- dict / YAML round trip

FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_HINTS = typing.get_type_hints(TrainConfig)


def field_help() -> dict[str, str]:
    """Each field's comment from the source, for ``samkit train --help-config``."""
    import inspect

    lines = inspect.getsource(TrainConfig).splitlines()
    out = {}
    for line in lines:
        stripped = line.strip()
        name = stripped.split(":", 1)[0]
        if name in FIELDS and "#" in stripped:
            out[name] = stripped.split("#", 1)[1].strip()
    return out


def to_dict(config: TrainConfig) -> dict[str, Any]:
    """Plain YAML-safe values (tuples become lists)."""
    out = {}
    for name in FIELDS:
        value = getattr(config, name)
        out[name] = list(value) if isinstance(value, tuple) else value
    return out


def resolved_dict(config: TrainConfig) -> dict[str, Any]:
    """:func:`to_dict` with the run name filled in (what ``config.yaml`` holds)."""
    return {**to_dict(config), "name": config.run_name}


def from_dict(values: dict[str, Any], source: str = "config") -> TrainConfig:
    """Build a config from a mapping, checking every key and every value's type."""
    if not isinstance(values, dict):
        raise ValueError(f"Invalid {source}: expected a mapping of keys to values, got {values!r}")
    checked = {}
    for key, value in values.items():
        checked[key] = check_value(key, value, source)
    return TrainConfig(**checked)


def _unknown_key(key: str, source: str) -> ValueError:
    close = difflib.get_close_matches(str(key), FIELDS, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return ValueError(
        f"Unknown key {key!r} in {source}{hint} (allowed: {', '.join(FIELDS)})"
    )


def check_value(key: str, value: Any, source: str = "config") -> Any:
    """``value`` converted to ``key``'s declared type, or a ValueError naming both."""
    if key not in FIELDS:
        raise _unknown_key(key, source)
    hint = _HINTS[key]
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    for option in options:
        ok, converted = _convert(value, option)
        if ok:
            return converted
    allowed = " or ".join(_type_name(o) for o in options)
    raise ValueError(
        f"Invalid value for {key!r} in {source}: {value!r} is a {_type_name(type(value))} "
        f"(allowed: {allowed})"
    )


def _convert(value: Any, typ: Any) -> tuple[bool, Any]:
    if typ is type(None):
        return value is None, None
    if typ is bool:
        return isinstance(value, bool), value
    if typ is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        return False, None
    if typ is str:
        return isinstance(value, str), value
    if typ is dict:
        return isinstance(value, dict), value
    if typ is tuple:
        if isinstance(value, (list, tuple)) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
        ):
            return True, tuple(value)
        return False, None
    return False, None


def _type_name(typ: Any) -> str:
    return {
        type(None): "null",
        bool: "bool (true/false)",
        int: "int",
        float: "float",
        str: "str",
        dict: "mapping",
        tuple: "list of numbers",
        list: "list",
    }.get(typ, getattr(typ, "__name__", str(typ)))


def parse_override(text: str) -> tuple[str, Any]:
    """``"key=value"`` → (key, value); the value is read as YAML (``0.1``, ``true``, ``null``,
    ``[1, 2]``, ``{width: 512}``). ``model_kwargs.width=512`` sets one entry of a mapping."""
    import yaml

    if "=" not in text:
        raise ValueError(f"Invalid override {text!r} (allowed form: key=value, e.g. lr=0.05)")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ValueError(f"Invalid override {text!r}: the value is not valid YAML ({err})") from err
    return key, value


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``values`` updated by ``--set key=value`` strings (later ones win)."""
    values = dict(values)
    for text in overrides:
        key, value = parse_override(text)
        source = f"--set {text}"
        if "." in key:
            outer, inner = key.split(".", 1)
            if outer not in FIELDS:
                raise _unknown_key(outer, source)
            if _HINTS[outer] is not dict:
                raise ValueError(
                    f"Invalid override {text!r}: {outer!r} is not a mapping, so {key!r} has no "
                    "meaning (mappings: model_kwargs, optimizer_kwargs)"
                )
            inner_map = dict(values.get(outer) or {})
            inner_map[inner] = value
            values[outer] = inner_map
            continue
        options = _options(_HINTS[key]) if key in FIELDS else ()
        if str in options and value is not None and not isinstance(value, str):
            # A string field takes the text as written: `--set name=123`, `--set base=no`.
            value = text.split("=", 1)[1].strip()
        values[key] = check_value(key, value, source)
    return values


def _options(hint: Any) -> tuple:
    return typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, **values: Any
) -> TrainConfig:
    """The config in the YAML file ``path`` (or the defaults), then ``values``, then overrides."""
    import yaml

    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ValueError(f"Invalid config {path}: not valid YAML ({err})") from err
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ValueError(f"Invalid config {path}: expected a mapping of keys to values")
        data = {k: check_value(k, v, str(path)) for k, v in loaded.items()}
    data.update({k: check_value(k, v, "arguments") for k, v in values.items()})
    data = apply_overrides(data, overrides or [])
    return from_dict(data, str(path) if path is not None else "config")


def save_config(config: TrainConfig, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically."""
    import yaml

    from samkit.train.checkpoint import atomic_write_text

    values = resolved_dict(config)
    comments = field_help()
    lines = ["# samkit resolved config: samkit train --config <this file>"]
    for key, value in values.items():
        text = yaml.safe_dump({key: value}, default_flow_style=True, width=1000).strip()
        text = text[1:-1] if text.startswith("{") else text  # {key: value} -> key: value
        lines.append(f"{text}  # {comments[key]}" if key in comments else text)
    atomic_write_text(path, "\n".join(lines) + "\n")
