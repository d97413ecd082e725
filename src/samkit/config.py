"""The one typed config system: frozen dataclasses, YAML files, ``--set key=value`` and CLI flags.

A config is a frozen dataclass whose fields are declared with :func:`setting`, which keeps the
field's help text in its metadata (``samkit list``, ``--help`` and the comments of a saved
``config.yaml`` all read it from there). The same functions serve every config class:

* :func:`from_dict` builds a config from a mapping and checks every key and every value's type
  (a field whose type is itself a config class takes a mapping, merged over its default);
* :func:`apply_overrides` applies ``--set key=value`` strings; dotted keys reach into mappings
  and nested configs (``model_kwargs.width=64``, ``train.lr=0.05``,
  ``train.model_kwargs.width=64``);
* :func:`load` reads a YAML file (the only place samkit reads YAML), then keyword values, then
  overrides; :func:`add_flags` generates argparse flags from the fields.

Numbers are read the way people write them: ``1e-3``, ``5E-4``, ``.5`` and ``1_000`` are numbers
in a YAML file and in ``--set``, although YAML 1.1 (PyYAML) reads ``1e-3`` as a string.

Errors are one line, a :class:`ValueError` naming the key, the value and what is allowed.

Every training run saves its resolved :class:`TrainConfig` as ``runs/<name>/config.yaml``; loading
that file gives the same run back (``samkit train --config runs/<name>/config.yaml``).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import hashlib
import json
import math
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from samkit.distributed import PERTURBATIONS  # how DDP replicas share eps: local, synced
from samkit.optim._validation import (  # the one home of the checks
    check_choice,
    check_in_range,
    check_int,
    check_seed,
    short_repr,
)

# ------------------------------------------------------------------------- declaring fields

_MISSING = dataclasses.MISSING


def setting(default: Any = _MISSING, help: str = "", *, factory: Any = _MISSING,  # noqa: A002
            flag: str | tuple[str, ...] | None = None) -> Any:
    """A config field with its help text (and optionally its CLI flag) in the metadata."""
    metadata = {"help": help}
    if flag is not None:
        metadata["flag"] = flag
    if factory is not _MISSING:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def is_config(obj: Any) -> bool:
    """True for a config class or instance (a dataclass)."""
    return dataclasses.is_dataclass(obj)


def fields_of(cls: Any) -> dict[str, dataclasses.Field]:
    """The fields of a config class (or instance), by name."""
    return {f.name: f for f in dataclasses.fields(cls)}


def hints_of(cls: Any) -> dict[str, Any]:
    """Each field's resolved type hint, by name (a fresh dict: the caller may change it)."""
    return dict(_hints(cls if isinstance(cls, type) else type(cls)))


@functools.lru_cache(maxsize=256)
def _hints(cls: type) -> dict[str, Any]:
    # resolving the string annotations (``from __future__ import annotations``) compiles each
    # one; the config helpers ask for the same classes' hints tens of thousands of times
    return typing.get_type_hints(cls)


def help_of(cls: Any) -> dict[str, str]:
    """Each field's help text (from its metadata)."""
    return {name: f.metadata.get("help", "") for name, f in fields_of(cls).items()
            if f.metadata.get("help")}


def _options(hint: Any) -> tuple:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return typing.get_args(hint)
    return (hint,)


# ------------------------------------------------------------------------- the one YAML reader


def _yaml():
    import yaml

    return yaml


# Numbers as people write them; YAML 1.1 needs a dot and a signed exponent ("1.0e-3").
_FLOAT = re.compile(
    r"^[-+]?(?:[0-9][0-9_]*\.?[0-9_]*|\.[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)?$"
)
_INT = re.compile(r"^[-+]?[0-9][0-9_]*$")


# A config is a few kilobytes; a bigger file or --set value is a mistake (or an attack), and
# PyYAML holds the whole document in memory several times over while it parses.
MAX_YAML_BYTES = 1 << 20
# Flow collections (``[...]``, ``{...}``) nested deeper than this are refused as soon as the
# scanner meets the first one too many. A config nests two or three levels; without the cap a
# few thousand ``[`` took PyYAML's scanner about a second (it looks up to 1,024 characters ahead
# for a simple key, over every open level) before Python's recursion limit stopped it.
MAX_YAML_DEPTH = 100


class _TooDeep(Exception):
    pass


def _loader():
    yaml = _yaml()
    loader = getattr(_loader, "cls", None)
    if loader is None:
        class Loader(yaml.SafeLoader):
            """SafeLoader that also reads ``1e-3``, ``5E-4`` and ``.5`` as floats, and refuses
            aliases (``*name``): a few hundred bytes of nested aliases ("billion laughs") stand
            for gigabytes once anything walks the value (a message, a copy, a saved config)."""

            def compose_node(self, parent, index):  # noqa: D102
                if self.check_event(yaml.AliasEvent):
                    event = self.peek_event()
                    raise yaml.composer.ComposerError(
                        None, None, f"found the alias *{event.anchor}: YAML aliases are not "
                        "allowed in samkit configs (write the value out)", event.start_mark)
                return super().compose_node(parent, index)

            def fetch_flow_collection_start(self, TokenClass):  # noqa: D102, N803
                if self.flow_level >= MAX_YAML_DEPTH:
                    raise _TooDeep(f"{self.flow_level + 1} nested flow collections")
                super().fetch_flow_collection_start(TokenClass)

        Loader.add_implicit_resolver(
            "tag:yaml.org,2002:float",
            re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$"),
            list("-+0123456789."),
        )
        _loader.cls = loader = Loader
    return loader


def yaml_loads(text: str, source: str = "config") -> Any:
    """Parse YAML text (numbers as people write them); a ValueError when it is not YAML, is
    larger than :data:`MAX_YAML_BYTES`, nests too deeply (flow collections: more than
    :data:`MAX_YAML_DEPTH` levels) or uses aliases."""
    yaml = _yaml()
    if len(text) > MAX_YAML_BYTES:
        raise ValueError(f"Invalid {source}: {len(text)} characters (allowed: at most "
                         f"{MAX_YAML_BYTES} for a config)")
    try:
        return yaml.load(text, Loader=_loader())  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        raise ValueError(f"Invalid {source}: not valid YAML ({err})") from err
    except _TooDeep as err:
        raise ValueError(f"Invalid {source}: the YAML nests too deeply ({err}, allowed: at "
                         f"most {MAX_YAML_DEPTH})") from err
    except RecursionError as err:
        raise ValueError(f"Invalid {source}: the YAML nests too deeply") from err


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping in the YAML file ``path`` (empty for an empty file)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Config file not found: {path}")
    size = path.stat().st_size
    if size > MAX_YAML_BYTES:
        raise ValueError(f"Invalid config {path}: {size} bytes (allowed: at most "
                         f"{MAX_YAML_BYTES} bytes; a config is a few kilobytes)")
    loaded = yaml_loads(path.read_text(), f"config {path}")
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ValueError(f"Invalid config {path}: expected a mapping of keys to values")
    return loaded


def yaml_line(key: str, value: Any) -> str:
    """``key: value`` in YAML flow style (one line)."""
    text = _yaml().safe_dump({key: value}, default_flow_style=True, width=1000).strip()
    return text[1:-1] if text.startswith("{") else text  # {key: value} -> key: value


# ------------------------------------------------------------------------- checking values


def canonical(cls: Any, key: str) -> str:
    """``key``, or the current name of a key ``cls`` has renamed (:data:`ALIASES`)."""
    cls = cls if isinstance(cls, type) else type(cls)
    return ALIASES.get(cls, {}).get(key, key)


def upgrade_keys(values: dict[str, Any], cls: Any = None, source: str = "config"
                 ) -> dict[str, Any]:
    """``values`` with renamed keys under their current names (``schedule`` → ``lr_schedule``);
    an error when both names are given."""
    cls = cls or TrainConfig
    out: dict[str, Any] = {}
    for key, value in values.items():
        new = canonical(cls, key)
        if new != key and new in values:
            raise ValueError(f"Invalid {source}: both {key!r} and {new!r} are given ({key!r} is "
                             f"the older name of {new!r}; keep one)")
        out[new] = value
    return out


def _unknown_key(key: str, cls: Any, source: str, prefix: str = "") -> ValueError:
    names = list(fields_of(cls))
    close = difflib.get_close_matches(str(key), names, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    nested = [n for n in names if is_config(hints_of(cls)[n])]
    extra = "".join(f", and {n}.<key> for the keys of {n}" for n in nested)
    shown = ", ".join(n for n in names if n not in nested)
    where = f" of {prefix.rstrip('.')}" if prefix else ""
    return ValueError(f"Unknown key {short_repr(str(key))}{where} in {source}{hint} (allowed: "
                      f"{shown}{extra})")


def _number(value: Any) -> float | None:
    """``value`` as a float when it is a number or a string written as one, else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and _FLOAT.match(value.strip()) and any(
        c.isdigit() for c in value
    ):
        return float(value.strip().replace("_", ""))
    return None


def _convert(value: Any, typ: Any) -> tuple[bool, Any]:
    origin = typing.get_origin(typ) or typ
    if typ is type(None):
        return value is None, None
    if typ is bool:
        return isinstance(value, bool), value
    if typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return True, value
        if isinstance(value, str) and _INT.match(value.strip()):
            return True, int(value.strip().replace("_", ""))
        return False, None
    if typ is float:
        number = _number(value)
        return number is not None, number
    if typ is str:
        return isinstance(value, str), value
    if origin is dict:
        return isinstance(value, dict), dict(value) if isinstance(value, dict) else None
    if origin is tuple:
        args = typing.get_args(typ)
        item = args[0] if args else float
        if _number(value) is not None and not isinstance(value, str):
            value = [value]  # one number is a list of one: `--set rescale=10`
        if isinstance(value, (list, tuple)):
            out = []
            for v in value:
                if item is int:
                    ok, c = _convert(v, int)
                else:
                    c = _number(v)
                    ok = c is not None
                    if ok and isinstance(v, int) and not isinstance(v, bool):
                        c = v  # keep integers as written (batch sizes)
                if not ok:
                    return False, None
                out.append(c)
            return True, tuple(out)
        return False, None
    return False, None


def _type_name(typ: Any) -> str:
    origin = typing.get_origin(typ) or typ
    if origin is tuple:
        item = (typing.get_args(typ) or (float,))[0]
        return "list of integers" if item is int else "list of numbers"
    return {
        type(None): "null",
        bool: "bool (true/false)",
        int: "int",
        float: "float",
        str: "str",
        dict: "mapping",
        list: "list",
    }.get(origin, getattr(typ, "__name__", str(typ)))


def check_value(key: str, value: Any, source: str = "config", cls: Any = None) -> Any:
    """``value`` converted to ``key``'s declared type in ``cls``, or a ValueError naming both.

    A field of a config type takes an instance of it or a mapping (merged over its default)."""
    cls = cls or TrainConfig
    fields = fields_of(cls)
    key = canonical(cls, key)
    if key not in fields:
        raise _unknown_key(key, cls, source)
    hint = hints_of(cls)[key]
    if is_config(hint):
        if isinstance(value, hint):
            return value
        if isinstance(value, dict):
            base = _default_of(fields[key])
            return from_dict({**to_dict(base), **value}, f"{source}: {key}", hint)
        raise ValueError(f"Invalid {key} in {source}: expected a mapping of {hint.__name__} keys")
    options = _options(hint)
    for option in options:
        ok, converted = _convert(value, option)
        if ok:
            return converted
    allowed = " or ".join(_type_name(o) for o in options)
    raise ValueError(
        f"Invalid value for {key!r} in {source}: {short_repr(value)} is a "
        f"{_type_name(type(value))} "
        f"(allowed: {allowed})"
    )


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not _MISSING:
        return f.default
    if f.default_factory is not _MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    raise ValueError(f"{f.name} has no default")


# ------------------------------------------------------------------------- dicts, YAML, --set


def to_dict(config: Any) -> dict[str, Any]:
    """Plain YAML/JSON values (tuples become lists, nested configs mappings)."""
    out = {}
    for name in fields_of(config):
        value = getattr(config, name)
        if is_config(value):
            value = to_dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        elif isinstance(value, dict):
            value = dict(value)
        out[name] = value
    return out


def from_dict(values: dict[str, Any], source: str = "config", cls: Any = None,
              base: Any = None) -> Any:
    """A config of ``cls`` (or of ``base``'s class, over ``base``) from a mapping, checking
    every key and every value's type."""
    cls = cls or (type(base) if base is not None else TrainConfig)
    if not isinstance(values, dict):
        raise ValueError(f"Invalid {source}: expected a mapping of keys to values, got "
                         f"{short_repr(values)}")
    hints = hints_of(cls)
    checked = {}
    for key, value in upgrade_keys(values, cls, source).items():
        if base is not None and key in hints and is_config(hints[key]) and isinstance(
            value, dict
        ):
            inner = getattr(base, key)
            checked[key] = from_dict({**to_dict(inner), **value}, f"{source}: {key}",
                                     hints[key])
        else:
            checked[key] = check_value(key, value, source, cls)
    if base is not None:
        return dataclasses.replace(base, **checked)
    return cls(**checked)


def parse_override(text: str) -> tuple[str, Any]:
    """``"key=value"`` → (key, value); the value is read as YAML (``0.1``, ``1e-3``, ``true``,
    ``null``, ``[1, 2]``, ``{width: 512}``)."""
    if "=" not in text:
        raise ValueError(f"Invalid override {short_repr(text)} (allowed form: key=value, e.g. "
                         "lr=0.05)")
    key, raw = text.split("=", 1)
    key = key.strip()
    value = yaml_loads(raw, f"override {short_repr(text)}: the value") if raw.strip() else ""
    return key, value


def _set_path(values: dict[str, Any], path: list[str], value: Any, raw: str, cls: Any,
              text: str, prefix: str = "", source: str | None = None) -> None:
    key = canonical(cls, path[0])
    fields = fields_of(cls)
    source = source or f"--set {text if len(text) <= 200 else text[:197] + '...'}"
    if key not in fields:
        raise _unknown_key(key, cls, source, prefix)
    hint = hints_of(cls)[key]
    if len(path) > 1:
        if is_config(hint):
            inner = values.get(key)
            inner = to_dict(inner) if is_config(inner) else dict(
                inner if inner is not None else to_dict(_default_of(fields[key])))
            _set_path(inner, path[1:], value, raw, hint, text, f"{prefix}{key}.", source)
            values[key] = inner
            return
        if dict in [typing.get_origin(o) or o for o in _options(hint)]:
            mapping = dict(values.get(key) or {})
            node = mapping
            for part in path[1:-1]:
                node[part] = dict(node.get(part) or {})
                node = node[part]
            node[path[-1]] = value
            values[key] = mapping
            return
        mappings = [n for n, h in hints_of(cls).items()
                    if dict in [typing.get_origin(o) or o for o in _options(h)] or is_config(h)]
        raise ValueError(
            f"Invalid override {short_repr(text)}: {prefix + key!r} is not a mapping, so "
            f"{'.'.join([prefix.rstrip('.')] * bool(prefix) + path)!r} has no meaning "
            f"(mappings: {', '.join(prefix + m for m in mappings)})"
        )
    if str in _options(hint) and value is not None and not isinstance(value, str):
        value = raw.strip()  # a string field takes the text as written: `name=123`, `base=no`
    values[key] = check_value(key, value, source, cls)


def apply_overrides(values: dict[str, Any], overrides: list[str] | tuple[str, ...],
                    cls: Any = None, source: str | None = None) -> dict[str, Any]:
    """``values`` (a mapping of ``cls``'s keys) updated by ``--set key=value`` strings (later
    ones win); ``a.b=v`` sets entry ``b`` of the mapping or nested config ``a``. ``source``
    names where the strings came from in an error (default: ``--set key=value``)."""
    cls = cls or TrainConfig
    values = dict(values)
    for text in overrides:
        key, value = parse_override(text)
        _set_path(values, key.split("."), value, text.split("=", 1)[1], cls, text,
                  source=source)
    return values


def load(cls: Any, path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
         base: Any = None, **values: Any) -> Any:
    """A ``cls`` config: ``base`` (or the defaults), then the YAML file ``path``, then
    ``values``, then the overrides."""
    base = base if base is not None else cls()
    data = to_dict(base)
    source = "config"
    if path is not None:
        source = str(path)
        loaded = read_yaml(path)
        if cls is TrainConfig and _is_resolved(path):
            loaded = {**legacy_values(upgrade_keys(loaded, cls, source)), **loaded}
        for key, value in loaded.items():
            _merge(data, key, check_value(key, value, source, cls) if not is_config(
                hints_of(cls).get(key)) else value, cls, source)
    for key, value in values.items():
        _merge(data, key, check_value(key, value, "arguments", cls) if not is_config(
            hints_of(cls).get(key)) else value, cls, "arguments")
    data = apply_overrides(data, list(overrides or ()), cls)
    return from_dict(data, source, cls)


def _is_resolved(path: str | Path) -> bool:
    """True for a ``config.yaml`` a run saved (its first line is the resolved-config header)."""
    with open(path) as handle:
        return RESOLVED_HEADER in handle.readline()


def _merge(data: dict[str, Any], key: str, value: Any, cls: Any, source: str) -> None:
    hints = hints_of(cls)
    key = canonical(cls, key)
    if key not in hints:
        raise _unknown_key(key, cls, source)
    if is_config(hints[key]):
        if is_config(value):
            data[key] = to_dict(value)
            return
        if not isinstance(value, dict):
            raise ValueError(f"Invalid {key} in {source}: expected a mapping of "
                             f"{hints[key].__name__} keys")
        inner = dict(data.get(key) or {})
        for k, v in value.items():
            inner[k] = check_value(k, v, f"{source}: {key}", hints[key])
        data[key] = inner
        return
    data[key] = value


def save_yaml(config: Any, path: str | Path, header: str, values: dict[str, Any] | None = None
              ) -> None:
    """Write ``config`` (or ``values``) as YAML with each field's help as its comment,
    atomically."""
    from samkit.train.checkpoint import atomic_write_text

    values = to_dict(config) if values is None else values
    comments = help_of(config)
    lines = [f"# {header}"]
    for key, value in values.items():
        text = yaml_line(key, value)
        lines.append(f"{text}  # {comments[key]}" if key in comments else text)
    atomic_write_text(path, "\n".join(lines) + "\n")


# ------------------------------------------------------------------------- CLI flags


def flag_names(f: dataclasses.Field) -> tuple[str, ...]:
    """The field's CLI flags: its metadata's ``flag`` (one or several), else ``--<name>``."""
    flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
    return (flag,) if isinstance(flag, str) else tuple(flag)


def add_flags(parser: argparse.ArgumentParser, cls: Any, names: list[str] | tuple[str, ...],
              helps: dict[str, str] | None = None, prefix: str = "cfg_") -> None:
    """One flag per field in ``names`` (``data_dir`` → ``--data-dir``), typed from the field,
    its help from the metadata; the value lands in ``args.<prefix><name>`` (None when not
    given).

    A bool field is a switch (``--amp``); a tuple field takes several values."""
    fields = fields_of(cls)
    hints = hints_of(cls)
    for name in names:
        f = fields[name]
        text = (helps or {}).get(name) or f.metadata.get("help", "")
        all_options = _options(hints[name])
        options = [o for o in all_options if o is not type(None)]
        optional = len(options) < len(all_options) and _none_flag_means_none(options)
        typ = options[0] if options else str
        kwargs: dict[str, Any] = {"dest": f"{prefix}{name}", "default": None, "help": text}
        if typ is bool:
            kwargs["action"] = "store_true"
        elif (typing.get_origin(typ) or typ) is tuple:
            item = (typing.get_args(typ) or (float,))[0]
            kwargs.update(type=_cli_type(item), nargs="*", metavar=name.upper().rstrip("S"))
        else:
            kwargs.update(type=_cli_type(typ, optional), metavar=name.upper())
        parser.add_argument(*flag_names(f), **kwargs)


def _none_flag_means_none(options: list[Any]) -> bool:
    """A ``none`` flag value means None only for non-text fields (a path may be "none")."""
    return bool(options) and options[0] is not str


class _NoneGiven:
    """The value of an optional field's flag given as ``none`` (None itself means "not
    given")."""

    def __repr__(self) -> str:
        return "none"


_NONE_GIVEN = _NoneGiven()


def _cli_type(typ: Any, optional: bool = False):
    if optional:  # --budget none: the field's None, told apart from a flag not given
        inner = _cli_type(typ)

        def maybe(text: str) -> Any:
            return _NONE_GIVEN if text.strip().lower() == "none" else inner(text)
        maybe.__name__ = getattr(inner, "__name__", "value")
        return maybe
    if typ is float:
        def number(text: str) -> float:
            value = _number(text)
            if value is None:
                value = float(text)  # nan, inf; anything else: argparse's own message
            return value
        number.__name__ = "float"
        return number
    return typ


def flag_values(args: argparse.Namespace, prefix: str = "cfg_") -> dict[str, Any]:
    """The config values given as flags (those :func:`add_flags` generated with ``prefix``);
    a switch that was not given is left out."""
    return {k[len(prefix):]: tuple(v) if isinstance(v, list) else None if v is _NONE_GIVEN else v
            for k, v in vars(args).items()
            if k.startswith(prefix) and v is not None and v is not False}


# ------------------------------------------------------------------------- the training config

LR_SCHEDULES = ("constant", "cosine", "step")


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on. Defaults: a small MLP on Fashion-MNIST with SGD."""

    # ---- data
    dataset: str = setting(
        "fashion-mnist", "a samkit.data name: fashion-mnist, mnist, cifar10, digits, ...")
    data_dir: str | None = setting(
        None, "folder with the data files (None: $SAMKIT_DATA, then the standard places)")
    subset: int | None = setting(
        None, "train on this many examples (None: the whole training set)")
    stratified: bool = setting(
        True, "the subset has (nearly) the same number of examples per class")
    label_noise: float = setting(
        0.0, "fraction of training labels flipped to another class, in [0, 1)")
    data_seed: int = setting(
        0, "seed of the subset and the label noise (fixed while `seed` varies)")
    augment: bool = setting(
        False, "random crop (padding 4) + horizontal flip, on the device, seeded")
    # ---- model
    model: str = setting(
        "mlp", "a samkit.models name: mlp, cnn, resnet20, wrn28-10, vgg16, transformer")
    model_kwargs: dict = setting(
        factory=dict, help="passed to create_model (e.g. width: 512)")
    # ---- optimizer (built by samkit.create_optimizer from the registry)
    optimizer: str = setting(
        "sgd", "a registry name: samkit.list_optimizers() (sgd, adam, sam, asam, ...)")
    base: str | None = setting(
        None, "base of a sharpness-aware optimizer: sgd, adam, adamw (None: its own)")
    lr: float = setting(0.1, "peak learning rate (the schedule multiplies it)")
    momentum: float = setting(0.9, "heavy-ball momentum; used only when the base optimizer is SGD")
    weight_decay: float = setting(5e-4, "L2 weight decay (decoupled for adamw)")
    decay_bias_and_norm: bool = setting(
        False, "weight decay on biases and norm parameters too (false: only on weights; a run "
        "or checkpoint saved before this key existed is read as true, its behaviour then)")
    rho: float | None = setting(
        None, "SAM/ASAM radius (None: the optimizer's default, SAM 0.05, ASAM 0.5)")
    eta: float | None = setting(
        None, "ASAM's normalization offset eta (None: its default 0.01); not the LR")
    optimizer_kwargs: dict = setting(
        factory=dict, help="any other argument of the optimizer (nesterov, betas, p)")
    # ---- budget and learning-rate schedule
    epochs: int = setting(10, "passes over the training set")
    steps: int | None = setting(
        None, "stop after this many optimizer steps instead (overrides epochs)")
    batch_size: int = setting(
        128, "examples per optimizer step; 0 = the whole (sub)set (full-batch GD)")
    grad_accum: int = setting(
        1, "split each batch into this many micro-batches (exact accumulation)")
    perturbation: str = setting(
        "synced", "DDP: synced (eps of the global batch) or local (per replica)")
    drop_last: bool = setting(False, "skip the last, smaller batch of each epoch")
    lr_schedule: str = setting(
        "cosine", "learning-rate schedule after warm-up: constant, cosine or step")
    warmup_epochs: float = setting(
        0.0, "linear warm-up from 0 to lr over this many epochs (fractions ok)")
    milestones: tuple = setting(
        (0.5, 0.75), "`step` schedule: fractions of training where lr *= gamma")
    gamma: float = setting(0.1, "`step` schedule: the factor at each milestone")
    label_smoothing: float = setting(
        0.0, "cross-entropy label smoothing (the ASAM paper uses 0.1)")
    # ---- run
    seed: int = setting(
        0, "seed of the initialization, data order, augmentation and dropout")
    device: str = setting("auto", "cpu, cuda, cuda:1, mps; auto: cuda when available, else cpu")
    threads: int | None = setting(
        None, "CPU threads for torch (None: its default; 1 suits small models)")
    amp: bool = setting(False, "mixed precision: float16 + GradScaler on CUDA, bfloat16 on CPU")
    eval_every: int = setting(
        1, "evaluate on the test set every this many epochs (and at the end)")
    eval_batch_size: int = setting(1000, "batch size of the evaluation (no effect on the results)")
    name: str | None = setting(
        None, "run name: runs/<name>/ (None: <dataset>-<model>-<optimizer>-s<seed>)")
    out_dir: str = setting("runs", "parent directory of the run directories")
    checkpoint: bool = setting(True, "save runs/<name>/checkpoint.pt (atomically) at epoch ends")
    checkpoint_every: int = setting(
        1, "epochs between checkpoints (the last epoch and stops always save)")
    tensorboard: bool = setting(
        False, "also write TensorBoard events (needs `pip install tensorboard`)")
    log_every: int = setting(50, "steps between progress lines when stdout is not a terminal")
    edge_every: int | None = setting(
        None, "measure λ₁ against the edge of stability every this many steps (and at step 0), "
        "whatever it costs: rows in edge.jsonl and metrics.jsonl (None: off)")

    def __post_init__(self) -> None:
        # Frozen, so normalize through object.__setattr__: YAML gives lists, we keep tuples.
        object.__setattr__(self, "milestones", tuple(float(m) for m in self.milestones))
        object.__setattr__(self, "model_kwargs", dict(self.model_kwargs))
        object.__setattr__(self, "optimizer_kwargs", dict(self.optimizer_kwargs))
        check_int("epochs", self.epochs)
        if self.steps is not None:
            check_int("steps", self.steps)
        check_int("checkpoint_every", self.checkpoint_every)
        if self.subset is not None:
            check_int("subset", self.subset)
        if self.batch_size < 0:
            raise ValueError(f"Invalid batch_size: {self.batch_size} (allowed: >= 1, or 0 = full)")
        if self.threads is not None:
            check_int("threads", self.threads)
        for key in ("grad_accum", "eval_every", "eval_batch_size", "log_every"):
            check_int(key, getattr(self, key))
        check_in_range("label_noise", self.label_noise, 0.0, 1.0)
        check_in_range("label_smoothing", self.label_smoothing, 0.0, 1.0)
        for key in ("seed", "data_seed"):
            check_seed(key, getattr(self, key))
        if not (math.isfinite(self.lr) and 0 < self.lr <= FLOAT32_MAX):
            raise ValueError(f"Invalid lr: {self.lr} (allowed: a finite number > 0, at most "
                             f"{FLOAT32_MAX:.4g}, float32's largest: the weights are float32)")
        for key in ("momentum", "weight_decay", "warmup_epochs", "gamma"):
            value = getattr(self, key)
            if not (math.isfinite(value) and 0 <= value <= FLOAT32_MAX):
                raise ValueError(f"Invalid {key}: {value} (allowed: a finite number >= 0, at "
                                 f"most {FLOAT32_MAX:.4g})")
        if not self.momentum < 1:
            raise ValueError(f"Invalid momentum: {self.momentum} (allowed: 0 <= momentum < 1)")
        if self.steps is None and self.warmup_epochs > self.epochs:
            raise ValueError(
                f"Invalid warmup_epochs: {self.warmup_epochs} is more than epochs={self.epochs} "
                "(allowed: 0 <= warmup_epochs <= epochs)"
            )
        for key in ("rho", "eta"):
            value = getattr(self, key)
            if value is not None and not (math.isfinite(value) and 0 <= value <= FLOAT32_MAX):
                raise ValueError(f"Invalid {key}: {value} (allowed: a finite number >= 0, at "
                                 f"most {FLOAT32_MAX:.4g}, or null)")
        check_choice("perturbation", self.perturbation, PERTURBATIONS, show=str)
        check_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES, show=str)
        if any(not 0 < m < 1 for m in self.milestones):
            raise ValueError(
                f"Invalid milestones: {list(self.milestones)} (allowed: fractions of training "
                "strictly between 0 and 1, e.g. [0.5, 0.75])"
            )
        check_name(self.name)

    # ---------------------------------------------------------------- derived values

    @property
    def run_name(self) -> str:
        """``name``, or ``<dataset>-<model>-<optimizer>-s<seed>`` and a digest of the other
        settings that differ from the defaults (:func:`settings_digest`; the keys a resume may
        change do not count, so ``--resume --set epochs=30`` finds the run)."""
        if self.name:
            return self.name
        stem = f"{self.dataset}-{self.model}-{self.optimizer}-s{self.seed}"
        return stem + settings_digest(to_dict(self), to_dict(TrainConfig()), (
            "dataset", "model", "optimizer", "seed", "name", *RESUMABLE_CHANGES))

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.run_name

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with ``changes`` applied (checked like the YAML keys)."""
        return from_dict({**to_dict(self), **changes}, cls=TrainConfig)


# Keys that may differ between a checkpoint's config and the config that resumes it.
RESUMABLE_CHANGES = (
    "epochs", "steps", "log_every", "eval_batch_size", "tensorboard", "checkpoint",
    "checkpoint_every", "data_dir", "device", "threads", "out_dir",
)


def settings_digest(values: dict[str, Any], defaults: dict[str, Any],
                    ignore: tuple[str, ...] = ()) -> str:
    """``""`` when ``values`` equal ``defaults`` (but the keys in ``ignore``); else ``-`` and 6
    hex digits of a hash of the keys that differ. A default run name ends with it, so runs of
    other settings never share a folder, and the same command finds its own run again."""
    changed = {k: v for k, v in values.items() if k not in ignore and defaults.get(k) != v}
    if not changed:
        return ""
    text = json.dumps(changed, sort_keys=True, default=repr)
    return "-" + hashlib.sha256(text.encode()).hexdigest()[:6]


# What a config that lacks a key meant when it was written (the behaviour of the samkit that
# wrote it): resolved configs (config.yaml of a run) and checkpoints of older versions are read
# with these values, new configs get the field's default.
LEGACY_VALUES: dict[str, Any] = {"decay_bias_and_norm": True}
RESOLVED_HEADER = "samkit resolved config"


def legacy_values(saved: dict[str, Any]) -> dict[str, Any]:
    """The keys a saved (resolved) config lacks, with the values they had when it was written."""
    return {k: v for k, v in LEGACY_VALUES.items() if k not in saved}


# Older names of keys, still read from YAML files, --set, checkpoints and keyword arguments:
# `schedule` became `lr_schedule` (a "schedule" of an optimizer is its step schedule: AE-SAM, RST).
ALIASES: dict[type, dict[str, str]] = {TrainConfig: {"schedule": "lr_schedule"}}


def _accept_aliases(cls: type) -> None:
    """Let ``cls(...)`` take the older keyword names of its fields too."""
    init = cls.__init__

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # noqa: N807
        init(self, *args, **upgrade_keys(kwargs, cls, "arguments"))

    __init__.__doc__ = init.__doc__
    __init__.__wrapped__ = init  # type: ignore[attr-defined]
    cls.__init__ = __init__  # type: ignore[method-assign]


_accept_aliases(TrainConfig)


def steps_per_epoch(n: int, batch_size: int, drop_last: bool = False) -> tuple[int, int]:
    """``(batch, steps per epoch)`` for ``n`` examples: batch 0 is the whole set, a batch
    larger than the set is the set; the last, smaller batch counts unless ``drop_last``."""
    batch = n if batch_size == 0 else min(batch_size, n)
    return batch, (n // batch if drop_last else -(-n // batch))


def total_steps(config: TrainConfig, n: int) -> int:
    """The optimizer steps of a run of ``config`` on ``n`` training examples."""
    return config.steps or config.epochs * steps_per_epoch(n, config.batch_size,
                                                           config.drop_last)[1]


# ------------------------------------------------------------------------- shared checks

# The largest float32: a learning rate (or decay, radius) above it overflows when the float32
# weights are updated (`param.add_(grad, alpha=-lr)`: "cannot be converted ... without overflow").
FLOAT32_MAX = 3.4028234663852886e38


def cpu_count() -> int:
    """The CPUs this process may run on (its affinity where the OS tells it, else all)."""
    import os

    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # macOS, Windows
        return os.cpu_count() or 1


def check_threads(threads: int | None, key: str = "threads") -> int | None:
    """``threads`` for ``torch.set_num_threads``: None, or an integer from 1 to the CPU count.

    Checked where the threads are set, not in the config: a config saved on a bigger machine
    still loads. More threads than CPUs never helps, and a huge number exhausts the process
    limit (torch then crashes with a segmentation fault)."""
    if threads is None:
        return None
    check_int(key, threads)
    if threads > cpu_count():
        raise ValueError(f"Invalid {key}: {threads} (allowed: 1 to {cpu_count()}, the CPUs of "
                         "this machine; or null for torch's default)")
    return threads


def check_name(name: str | None) -> None:
    """A run's name is one folder inside the out-dir, never a path out of it: no ``/`` or ``\\``,
    no control characters, not starting with ``.`` (so not ``.`` or ``..``), at most 128
    characters (None: the experiment's default name)."""
    if name is None:
        return
    if not isinstance(name, str) or not name or len(name) > 128 or name.startswith(".") \
            or any(c in "/\\" or not c.isprintable() for c in name):
        shown = repr(name) if len(repr(name)) <= 80 else repr(name)[:77] + "..."
        raise ValueError(
            f"Invalid name: {shown} (allowed: 1 to 128 printable characters without '/' or "
            "'\\', not starting with '.': a name is one folder inside --out-dir)")


# ------------------------------------------------------------------------- TrainConfig helpers

FIELDS = fields_of(TrainConfig)


def field_help(cls: Any = TrainConfig) -> dict[str, str]:
    """Each field's help text, for ``samkit list --keys`` and the saved config's comments."""
    return help_of(cls)


def resolved_dict(config: TrainConfig) -> dict[str, Any]:
    """:func:`to_dict` with the run name filled in (what ``config.yaml`` holds)."""
    return {**to_dict(config), "name": config.run_name}


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, **values: Any
) -> TrainConfig:
    """The config in the YAML file ``path`` (or the defaults), then ``values``, then overrides."""
    return load(TrainConfig, path, overrides or [], **values)


def save_config(config: TrainConfig, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically, each key with its help as a comment."""
    save_yaml(config, path, f"{RESOLVED_HEADER}: samkit train --config <this file>",
              resolved_dict(config))
