"""Build any optimizer samkit knows by name: ``create_optimizer("asam", model, lr=0.1, rho=0.5)``.

The one registry. Every entry is an :class:`OptimizerInfo`, a frozen record (as timm's
``OptimInfo``) that *declares* its default base optimizer, what it builds, and the keyword
arguments it takes with their defaults, each in one of four namespaces:

* ``base``: the base optimizer's (``lr``, ``momentum``, ``betas``, ...; :data:`BASES`);
* ``ascent``: how ε is found: the keys of the entry's :class:`~samkit.optim.ascents.Ascent`
  record with the record's defaults (``rho``, ``eta``, ``p``, ...), plus the entry's own ascent
  keys (GSAM's ρ schedule ``rho_max``, ..., ESAM's weight perturbation ``beta``, ...);
* ``descent``: the entry's descent rule (GSAM's ``alpha``, LookSAM's ``k``, SAF's ``lam``, ...);
* ``schedule``: the step schedule's (AE-SAM's ``c``, RST's ``p``; :data:`SCHEDULE_INFO`).

:func:`create_optimizer` sends each keyword argument to the one namespace that declares it. A key
that two namespaces declare (``p`` of RST over ASAM: the schedule's probability or ASAM's norm)
or none raises ``ValueError`` naming the namespaces and their keys; ``base_options=``,
``ascent_options=``, ``descent_options=`` and ``schedule_options=`` name the namespace
explicitly. ``max_grad_norm`` and ``skip_non_finite`` are arguments of every sharpness-aware
entry. Nothing is routed by reading a signature.

The kinds combine by name::

    create_optimizer("gsam", model, lr=0.1, ascent="asam", eta=0.01)   # GSAM's descent, ASAM's eps
    create_optimizer("looksam", model, lr=0.1, ascent="asam", k=5)
    create_optimizer("aesam", model, lr=0.1, c=0.5)            # AE-SAM: SAM + schedule "ae"
    create_optimizer("rst", model, lr=0.1, ascent="asam",      # p: the schedule's or ASAM's?
                     schedule_options={"p": 0.5}, ascent_options={"p": 2})

``aesam`` and ``rst`` are the ``sam`` entry with a fixed step schedule:
``create_optimizer("aesam", ...)`` and ``create_optimizer("sam", ..., schedule="ae")`` are built
by the same code. :func:`wrap_optimizer` does the same over a base optimizer you built
(``samkit.ae_sam`` and ``samkit.rst_sam`` call it). ``samkit list`` prints the declarations
(:func:`describe_optimizers`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from samkit.optim import ascents as _ascents
from samkit.optim import descents as _descents
from samkit.optim._validation import check_keyword_types, check_non_negative, check_optimizer
from samkit.optim.asam import ASAM
from samkit.optim.ascents import Ascent
from samkit.optim.bsam import BSAM, BSAMBase
from samkit.optim.groups import param_groups
from samkit.optim.presets import COMMON_KEYS, AscentPreset, ascent_optimizer
from samkit.optim.sam import SAM
from samkit.optim.usam import USAM

NAMESPACES = ("base", "ascent", "descent", "schedule")


class _Required:
    def __repr__(self) -> str:
        return "required"


REQUIRED: Any = _Required()  # a key without a default (``lr``: samkit does not pick one)


def _frozen(mapping: Mapping[str, Any] | None = None) -> Mapping[str, Any]:
    return MappingProxyType(dict(mapping or {}))


# ------------------------------------------------------------------------ declarations


@dataclass(frozen=True)
class BaseInfo:
    """A base optimizer: its class and the keys ``create_optimizer`` passes to it, with torch's
    defaults (``lr`` is required)."""

    name: str
    cls: type[Optimizer]
    defaults: Mapping[str, Any]


_TORCH_FLAGS = {"maximize": False, "foreach": None, "differentiable": False, "fused": None}
_ADAM = {"lr": REQUIRED, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0,
         "amsgrad": False, "capturable": False, **_TORCH_FLAGS}  # fmt: skip
BASES: dict[str, BaseInfo] = {
    "sgd": BaseInfo("sgd", torch.optim.SGD, _frozen({
        "lr": REQUIRED, "momentum": 0, "dampening": 0, "weight_decay": 0, "nesterov": False,
        **_TORCH_FLAGS})),
    # decoupled_weight_decay: torch >= 2.6 (an older torch refuses it by name)
    "adam": BaseInfo("adam", torch.optim.Adam, _frozen({**_ADAM, "decoupled_weight_decay": False})),
    "adamw": BaseInfo("adamw", torch.optim.AdamW, _frozen({**_ADAM, "weight_decay": 0.01})),
    # bSAM's own base (samkit.optim.bsam): momentum is its beta1
    "bsam": BaseInfo("bsam", BSAMBase, _frozen({
        "lr": REQUIRED, "momentum": 0.9, "beta2": 0.999, "weight_decay": 0.0, "damping": 0.1,
        "init_precision": 1.0})),
}  # fmt: skip
BASE_OPTIMIZERS: dict[str, type[Optimizer]] = {n: b.cls for n, b in BASES.items()}


@dataclass(frozen=True)
class ScheduleInfo:
    """A step schedule by name: its keys with their defaults (the class's own defaults; a test
    checks that the two agree)."""

    name: str
    description: str
    defaults: Mapping[str, Any]


SCHEDULE_INFO: dict[str, ScheduleInfo] = {
    "ae": ScheduleInfo("ae", "AE-SAM: SAM when ||g||^2 >= mean + c std", _frozen(
        {"c": 0.0, "delta": 0.9, "c_final": None, "total_steps": None})),
    "random": ScheduleInfo("random", "RST: SAM with probability p", _frozen(
        {"p": 0.5, "p_final": None, "total_steps": None, "seed": 0})),
}  # fmt: skip
SCHEDULE_INFO["periodic"] = ScheduleInfo(
    "periodic", "Composer's interval: SAM every k-th step, base steps between",
    _frozen({"interval": 2}))
SCHEDULE_INFO["rst"] = SCHEDULE_INFO["random"]  # the alias schedules.SCHEDULES has


@dataclass(frozen=True)
class OptimizerInfo:
    """One registry entry: what it builds and what it takes, declared.

    Attributes:
        name: the registry name (lower case).
        description: one line for ``samkit list``.
        base: the default base optimizer (a key of :data:`BASES`).
        wrapper: the class or factory, ``wrapper(base_optimizer, **options)`` (davda54's
            ``wrapper(params, torch.optim.SGD, ...)`` too); None for a plain torch optimizer.
        ascent: the name of the :class:`~samkit.optim.ascents.Ascent` record whose keys (with
            its defaults) are in the ``ascent`` namespace; None for none.
        ascent_choice: ``ascent=`` may name any registered ascent (GSAM, LookSAM, AE-SAM, RST);
            the record's keys then go to the wrapper as ``ascent_options``.
        ascent_keys: the entry's own ascent keys and defaults (passed to the wrapper by name;
            they replace a record key of the same name).
        excluded: record keys the entry does not take, with the reason (GSAM sets ``rho``).
        descent: the descent rule's keys and defaults.
        schedule: a fixed step schedule (``"ae"`` for AE-SAM, ``"random"`` for RST), or None.
        schedulable: ``schedule=`` may add a step schedule (False: the entry decides its steps
            itself, or is not sharpness-aware).
        own_base: the entry steps only with its declared base (bSAM's :class:`BSAMBase`);
            ``base=`` naming another is refused.
    """

    name: str
    description: str
    base: str = "sgd"
    wrapper: Callable[..., Any] | None = None
    ascent: str | None = None
    ascent_choice: bool = False
    ascent_keys: Mapping[str, Any] = field(default_factory=_frozen)
    excluded: Mapping[str, str] = field(default_factory=_frozen)
    descent: Mapping[str, Any] = field(default_factory=_frozen)
    schedule: str | None = None
    schedulable: bool = False
    own_base: bool = False

    @property
    def sharpness_aware(self) -> bool:
        return self.wrapper is not None

    def namespaces(
        self, base: str | None = None, ascent: str | Ascent | None = None, schedule: Any = None
    ) -> dict[str, dict[str, Any]]:
        """Every key this entry takes, with its default, by namespace (``base``, ``ascent``,
        ``descent``, ``schedule``), for the given base, ``ascent=`` and ``schedule=`` (the
        entry's own when None). Raises ``ValueError`` for an ascent or schedule it cannot take."""
        out: dict[str, dict[str, Any]] = {n: {} for n in NAMESPACES}
        if self.own_base and base is not None and base.lower() != self.base:
            raise ValueError(f"Invalid base for {self.name}: {base!r} (allowed: {self.base!r}, "
                             f"{self.name}'s own base)")  # fmt: skip
        out["base"] = dict(base_info(base or self.base).defaults)
        record = self.ascent_record(ascent)
        if record is not None:
            declared = {"rho": record.rho, **record.group_defaults, **record.options}
            out["ascent"] = {k: v for k, v in declared.items() if k not in self.excluded}
        out["ascent"].update(self.ascent_keys)
        out["descent"] = dict(self.descent)
        schedule = self.schedule_name(schedule)
        if isinstance(schedule, str):
            out["schedule"] = dict(schedule_info(schedule).defaults)
        return out

    def ascent_record(self, ascent: str | Ascent | None = None) -> Ascent | None:
        """The :class:`Ascent` of ``ascent=`` (this entry's own when None)."""
        if ascent is None:
            return _ascents.get_ascent(self.ascent) if self.ascent else None
        record = _ascents.get_ascent(ascent)
        if not self.ascent_choice and (self.ascent is None or record.name != self.ascent):
            takes = ", ".join(n for n, e in sorted(_REGISTRY.items()) if e.ascent_choice)
            raise ValueError(
                f"Invalid ascent for {self.name}: {record.name!r} ({self.name}'s ascent is "
                f"{self.ascent or 'its own'}; the entries that take ascent=: {takes})"
            )
        return record

    def schedule_name(self, schedule: Any = None) -> Any:
        """The step schedule: ``schedule=`` (a name, checked, or an object), else the fixed one."""
        if schedule is None:
            return self.schedule
        if self.schedule is not None or not self.schedulable:
            why = (f"its schedule is {self.schedule!r}" if self.schedule else
                   "it schedules its own steps; a schedule would be ignored" if self.wrapper else
                   "a step schedule needs a sharpness-aware optimizer, e.g. "
                   "create_optimizer('sam', ..., schedule='ae')")  # fmt: skip
            raise ValueError(f"Invalid schedule for {self.name}: {schedule!r} ({why})")
        if isinstance(schedule, str):
            schedule_info(schedule)
        return schedule

    def keys(self, **choice: Any) -> set[str]:
        """All keys this entry takes (every namespace), for ``namespaces(**choice)``."""
        return {k for keys in self.namespaces(**choice).values() for k in keys}


OptimizerEntry = OptimizerInfo  # the name before the declared registry (CHANGELOG.md, Unreleased)

_REGISTRY: dict[str, OptimizerInfo] = {}


def register_optimizer(
    name: str,
    wrapper: Callable[..., Any] | None,
    description: str,
    base: str = "sgd",
    **declarations: Any,
) -> OptimizerInfo:
    """Add ``name`` to the registry (replacing an entry of the same name) and return its entry.

    ``declarations``: the other fields of :class:`OptimizerInfo` (``ascent``, ``ascent_keys``,
    ``descent``, ``schedulable``, ...): an entry takes only the keys it declares. Registering
    the same ``wrapper`` under its name again without declarations keeps the declared entry.
    """
    base_info(base)
    name = name.lower()
    old = _REGISTRY.get(name)
    if old is not None and old.wrapper is wrapper and not declarations and old.base == base:
        return old
    for key in ("ascent_keys", "excluded", "descent"):
        if key in declarations:
            declarations[key] = _frozen(declarations[key])
    entry = OptimizerInfo(name, description, base, wrapper, **declarations)
    _REGISTRY[name] = entry
    return entry


def register_ascent(ascent: Ascent, preset: bool = True) -> Ascent:
    """Add ``ascent`` to the table of ascents (replacing one of the same name), so that it is
    the ``ascent=`` of GSAM, LookSAM, AE-SAM and RST; with ``preset`` (and no optimizer of that
    name yet) it is also a registry optimizer of its own, built as
    :class:`~samkit.optim.presets.SharpnessAware`, whose ``ascent`` namespace is the record's
    keys and defaults. Returns ``ascent``.

    Example (a toy ascent: ε along the sign of the gradient)::

        def sign_direction(opt, buckets, options):
            for b in buckets:
                torch._foreach_sign_(b.grads)
                torch._foreach_mul_(b.grads, float(b.group["rho"]))

        register_ascent(Ascent("signsam", sign_direction, "eps = rho sign(g)", rho=0.01,
                               edge_note="no closed form", effective_note="sign(g) is not M g"))
    """
    _ascents.add_ascent(ascent)
    name = ascent.name.lower()
    if preset and name not in _REGISTRY:
        register_optimizer(name, AscentPreset(name), ascent.description or f"ascent {name}",
                           ascent=name, schedulable=True)  # fmt: skip
    return ascent


def unregister(name: str) -> None:
    """Remove ``name`` from the presets and the ascents (tests that register a toy ascent)."""
    _REGISTRY.pop(str(name).lower(), None)
    _ascents.ASCENTS.pop(str(name).lower(), None)


# ------------------------------------------------------------------------ look-ups


def list_ascents() -> list[str]:
    """The ascent names (``ascent=`` of GSAM, LookSAM, AE-SAM, RST), sorted."""
    return sorted(_ascents.ASCENTS)


def list_descents() -> dict[str, str]:
    """The descent rules and the preset that carries each."""
    return {n: d.preset for n, d in sorted(_descents.DESCENTS.items())}


def list_schedules() -> list[str]:
    """The step-schedule names ``create_optimizer(..., schedule=...)`` accepts."""
    from samkit.optim.schedules import SCHEDULES

    return sorted(SCHEDULES)


def optimizer_info(name: str) -> OptimizerInfo:
    """The registry entry of ``name`` (case-insensitive)."""
    entry = _REGISTRY.get(str(name).lower())
    if entry is None:
        raise ValueError(f"Invalid optimizer: {name!r} (allowed: {', '.join(list_optimizers())})")
    return entry


def base_info(name: str) -> BaseInfo:
    """The declaration of a base optimizer name (``sgd``, ``adam``, ``adamw``)."""
    info = BASES.get(str(name).lower())
    if info is None:
        raise ValueError(f"Invalid base: {name!r} (allowed: {', '.join(sorted(BASES))})")
    return info


def base_optimizer_class(name: str) -> type[Optimizer]:
    """The ``torch.optim`` class of a base optimizer name (``sgd``, ``adam``, ``adamw``)."""
    return base_info(name).cls


def schedule_info(name: str) -> ScheduleInfo:
    """The declaration of a step-schedule name (``ae``, ``random``, ``rst``)."""
    info = SCHEDULE_INFO.get(str(name).lower())
    if info is None:
        raise ValueError(f"Invalid schedule: {name!r} (allowed: {', '.join(list_schedules())})")
    return info


def list_optimizers() -> list[str]:
    """The names ``create_optimizer`` accepts, sorted."""
    return sorted(_REGISTRY)


def optimizer_options(
    name: str, base: str | None = None, ascent: str | None = None, schedule: Any = None
) -> dict[str, dict[str, Any]]:
    """The keys ``create_optimizer(name, ...)`` takes with their defaults, by namespace."""
    return optimizer_info(name).namespaces(base=base, ascent=ascent, schedule=schedule)


def _keys_text(keys: Mapping[str, Any]) -> str:
    return ", ".join(f"{k} (required)" if v is REQUIRED else f"{k}={v!r}" for k, v in keys.items())


def describe_optimizer(name: str) -> str:
    """``name``'s description and its namespaces with their defaults, one line each."""
    entry = optimizer_info(name)
    ns = entry.namespaces()
    if not entry.sharpness_aware:
        return f"{entry.description}\nbase {entry.base}: {_keys_text(ns['base'])}"
    ascent = f"ascent {entry.ascent}" if entry.ascent else "ascent"
    if entry.ascent_choice:
        ascent = f"ascent= {entry.ascent} (any of list_ascents())"
    parts = [f"base {entry.base} (its own)" if entry.own_base else
             f"base {entry.base} (base=: {', '.join(sorted(BASES))})"]
    if ns["ascent"]:
        parts.append(f"{ascent}: {_keys_text(ns['ascent'])}")
    parts += [f"{k} excluded: {why}" for k, why in entry.excluded.items()]
    if ns["descent"]:
        parts.append(f"descent: {_keys_text(ns['descent'])}")
    if entry.schedule:
        parts.append(f"schedule {entry.schedule}: {_keys_text(ns['schedule'])}")
    elif entry.schedulable:
        parts.append(f"schedule= optional ({', '.join(sorted(SCHEDULE_INFO))})")
    return "\n".join([entry.description, *parts])


def describe_optimizers() -> dict[str, str]:
    """Each registry name with its description and, on the lines below, its namespaces and
    defaults (``samkit list`` prints them), from the entries' declarations."""
    indent = "\n" + " " * 13  # under the description in `samkit list`'s "  name       text"
    return {n: describe_optimizer(n).replace("\n", indent) for n in list_optimizers()}


# ------------------------------------------------------------------------ building


def decay_groups(
    model: nn.Module, weight_decay: float, normalize_key: bool = True
) -> list[dict[str, Any]]:
    """``model``'s trainable parameters in groups where biases and norm parameters (every
    parameter named ``bias`` and every parameter with fewer than 2 dimensions: BatchNorm and
    LayerNorm weights, scalar gains) get no weight decay, as timm and pytorch_optimizer do.

    With ``normalize_key``, biases also get ``normalize=False`` and the rest ``normalize=True``
    (the ASAM paper's setting, as :func:`samkit.param_groups`). Empty groups are left out.
    """
    check_non_negative("weight_decay", weight_decay)
    decay, no_decay, biases = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.rsplit(".", 1)[-1].endswith("bias"):
            biases.append(p)
        elif p.dim() < 2:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = []
    for ps, wd, normalize in (
        (decay, weight_decay, True),
        (no_decay, 0.0, True),
        (biases, 0.0, False),
    ):
        if ps:
            group: dict[str, Any] = {"params": ps, "weight_decay": wd}
            if normalize_key:
                group["normalize"] = normalize
            groups.append(group)
    if not groups:
        raise ValueError(f"Invalid model: {type(model).__name__} has no trainable parameters")
    return groups


def _allowed(entry: OptimizerInfo, ns: dict[str, dict[str, Any]], base: str) -> str:
    what = {"base": f"base ({base})", "ascent": "ascent", "descent": "descent",
            "schedule": "schedule"}  # fmt: skip
    parts = [f"{what[n]}: {', '.join(ns[n])}" for n in NAMESPACES if ns[n]]
    if entry.sharpness_aware:
        parts.append(f"common: {', '.join(COMMON_KEYS)}")
    return "; ".join(parts)


def route_options(
    name: str,
    kwargs: Mapping[str, Any],
    *,
    base: str | None = None,
    ascent: str | Ascent | None = None,
    schedule: Any = None,
    base_options: Mapping[str, Any] | None = None,
    ascent_options: Mapping[str, Any] | None = None,
    descent_options: Mapping[str, Any] | None = None,
    schedule_options: Mapping[str, Any] | None = None,
) -> dict[str, dict[str, Any]]:
    """``kwargs`` and the explicit namespaces, each key in the namespace that declares it.

    Raises:
        ValueError: a key no namespace declares, a key two namespaces declare (name it with
            ``<namespace>_options=``), or a key given twice; each names the allowed keys.
    """
    entry = optimizer_info(name)
    base = (base or entry.base).lower()
    ns = entry.namespaces(base=base, ascent=ascent, schedule=schedule)
    explicit = {"base": base_options, "ascent": ascent_options, "descent": descent_options,
                "schedule": schedule_options}  # fmt: skip
    routed: dict[str, dict[str, Any]] = {n: {} for n in NAMESPACES}

    def excluded_note(key: str) -> str:
        why = entry.excluded.get(key)
        return f"; {name} does not take {key}: {why}" if why else ""

    for space, given in explicit.items():
        for key, value in dict(given or {}).items():
            if key not in ns[space]:
                raise ValueError(
                    f"Invalid {space}_options key {key!r} for {entry.name}{excluded_note(key)} "
                    f"(allowed: {_allowed(entry, ns, base)})"
                )
            routed[space][key] = value
    for key, value in kwargs.items():
        homes = [n for n in NAMESPACES if key in ns[n]]
        if not homes:
            import difflib

            close = difflib.get_close_matches(key, sorted(entry.keys(base=base, ascent=ascent,
                                                                      schedule=schedule)), n=2)
            hint = f"; did you mean {' or '.join(close)}?" if close else ""
            raise ValueError(
                f"Invalid argument {key!r} for {entry.name}: no namespace takes it"
                f"{excluded_note(key)} (allowed: {_allowed(entry, ns, base)}){hint}"
            )
        if len(homes) > 1:
            options = " or ".join(f"{n}_options={{{key!r}: ...}}" for n in homes)
            raise ValueError(
                f"Ambiguous argument {key!r} for {entry.name}: the namespaces "
                f"{' and '.join(homes)} both take it; name one: {options} "
                f"(allowed: {_allowed(entry, ns, base)})"
            )
        if key in routed[homes[0]]:
            raise ValueError(
                f"Invalid argument {key!r} for {entry.name}: given twice (as a keyword and in "
                f"{homes[0]}_options)"
            )
        routed[homes[0]][key] = value
    return routed


def _make_schedule(schedule: Any, options: Mapping[str, Any]) -> Any:
    from samkit.optim.schedules import make_schedule

    if isinstance(schedule, str):
        return make_schedule(schedule, **options)
    if options:
        raise ValueError("Invalid schedule_options: only with a schedule name such as 'ae'")
    return schedule


def _wrap(
    entry: OptimizerInfo,
    base_opt: Optimizer,
    ascent: str | Ascent | None,
    schedule: Any,
    routed: dict[str, dict[str, Any]],
    common: dict[str, Any],
) -> Any:
    """``entry``'s optimizer over ``base_opt`` with the routed options."""
    record = entry.ascent_record(ascent)
    asc = ascent if isinstance(ascent, Ascent) else record.name if record else None
    ascent_ns = dict(routed["ascent"])
    if entry.schedule is not None:  # AE-SAM, RST: the ascent's optimizer with the schedule
        opt = ascent_optimizer(asc, base_opt, **ascent_ns, **common)
    elif entry.ascent_choice:  # GSAM, LookSAM: own keys by name, the record's as ascent_options
        own = {k: ascent_ns.pop(k) for k in list(ascent_ns) if k in entry.ascent_keys}
        if ascent_ns:
            own["ascent_options"] = ascent_ns
        opt = entry.wrapper(base_opt, **own, **routed["descent"], ascent=asc, **common)
    else:  # a preset, or an optimizer with its own ascent (ESAM, MSAM) or loss term (SAF)
        opt = entry.wrapper(base_opt, **ascent_ns, **routed["descent"], **common)
    schedule = entry.schedule_name(schedule)
    if schedule is not None:
        from samkit.optim.schedules import with_schedule

        with_schedule(opt, _make_schedule(schedule, routed["schedule"]))
    return opt


def _common(entry: OptimizerInfo, max_grad_norm: Any, skip_non_finite: Any) -> dict[str, Any]:
    common = {k: v for k, v in (("max_grad_norm", max_grad_norm),
                                ("skip_non_finite", skip_non_finite)) if v is not None}  # fmt: skip
    if common and not entry.sharpness_aware:
        raise ValueError(
            f"Invalid argument {next(iter(common))!r} for {entry.name}: a plain torch optimizer "
            "takes no max_grad_norm or skip_non_finite (a sharpness-aware optimizer's options)"
        )
    return common


def wrap_optimizer(
    name: str,
    base_optimizer: Optimizer,
    *,
    ascent: str | Ascent | None = None,
    schedule: Any = None,
    max_grad_norm: float | None = None,
    skip_non_finite: bool | None = None,
    ascent_options: Mapping[str, Any] | None = None,
    descent_options: Mapping[str, Any] | None = None,
    schedule_options: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> Any:
    """The sharpness-aware entry ``name`` over ``base_optimizer`` (already built): the same
    routing as :func:`create_optimizer` without the ``base`` namespace.
    ``wrap_optimizer("aesam", torch.optim.SGD(params, lr=0.1), c=0.5)`` is ``samkit.ae_sam``."""
    entry = optimizer_info(name)
    if not entry.sharpness_aware:
        raise ValueError(f"Invalid optimizer: {name!r} is not sharpness-aware (nothing to wrap)")
    common = _common(entry, max_grad_norm, skip_non_finite)
    routed = route_options(
        name, kwargs, ascent=ascent, schedule=schedule, ascent_options=ascent_options,
        descent_options=descent_options, schedule_options=schedule_options,
    )  # fmt: skip
    if routed["base"]:
        raise ValueError(
            f"Invalid argument(s) {sorted(routed['base'])} for {entry.name}: base optimizer "
            "options, but the base optimizer is already built"
        )
    return _wrap(entry, base_optimizer, ascent, schedule, routed, common)


def create_optimizer(
    name: str,
    params: nn.Module | Iterable[Any],
    base: str | None = None,
    decay_bias_and_norm: bool = False,
    *,
    ascent: str | Ascent | None = None,
    schedule: Any = None,
    max_grad_norm: float | None = None,
    skip_non_finite: bool | None = None,
    base_options: Mapping[str, Any] | None = None,
    ascent_options: Mapping[str, Any] | None = None,
    descent_options: Mapping[str, Any] | None = None,
    schedule_options: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> Optimizer:
    """Build the optimizer ``name`` over ``params``.

    Args:
        name: a registry name (see :func:`list_optimizers`), case-insensitive.
        params: a model, or parameters / groups. A model is split into groups: with a
            ``weight_decay`` > 0, biases and norm parameters (every parameter named ``bias`` or
            with fewer than 2 dimensions) get no weight decay (:func:`decay_groups`, as timm
            and pytorch_optimizer do); sharpness-aware optimizers get ``normalize=False`` on the
            biases (:func:`samkit.param_groups`, the ASAM paper's setting).
        base: the base optimizer of a sharpness-aware entry: ``sgd``, ``adam`` or ``adamw``.
        decay_bias_and_norm: decay biases and norm parameters too (the behaviour of the
            samkit that wrote checkpoints without this key).
        ascent: for the entries that take one (``gsam``, ``looksam``, ``aesam``, ``rst``): the
            ascent name (:func:`list_ascents`); its keys (``eta``, ``p``, ...) join the
            ``ascent`` namespace.
        schedule: a step schedule (:func:`list_schedules`, e.g. ``"ae"``, or a schedule
            object) attached to the sharpness-aware optimizer (:func:`with_schedule`); its keys
            (``c``, ``delta``, ...) form the ``schedule`` namespace. This is the *step*
            schedule (which steps are two-pass), never a learning-rate schedule.
        max_grad_norm, skip_non_finite: of every sharpness-aware optimizer
            (:class:`~samkit.optim.base.SharpnessAwareOptimizer`).
        base_options, ascent_options, descent_options, schedule_options: keys given to one
            namespace explicitly (for a key two namespaces take, e.g. ``p`` of RST over ASAM).
        **kwargs: keys of any namespace that is the only one to declare them: ``lr`` (required),
            ``momentum``, ``rho``, ``eta``, ``k``, ``c``, ... (:func:`optimizer_options`).

    Raises:
        ValueError: an unknown or ambiguous key (naming the namespaces and their keys), a bad
            value, no ``lr``.
    """
    entry = optimizer_info(name)
    base_name = (base or entry.base).lower()
    base_cls = base_optimizer_class(base_name)
    common = _common(entry, max_grad_norm, skip_non_finite)
    routed = route_options(
        name, kwargs, base=base_name, ascent=ascent, schedule=schedule,
        base_options=base_options, ascent_options=ascent_options,
        descent_options=descent_options, schedule_options=schedule_options,
    )  # fmt: skip
    base_kwargs = routed["base"]
    if "lr" not in base_kwargs:
        raise ValueError(
            f"Invalid arguments for {entry.name}: lr is required (allowed: a learning rate > 0, "
            "e.g. create_optimizer(name, model, lr=0.1)); samkit does not pick one for you"
        )
    if isinstance(params, nn.Module):
        weight_decay = base_kwargs.pop("weight_decay", 0.0)
        if weight_decay and not decay_bias_and_norm:
            params = decay_groups(params, weight_decay, normalize_key=entry.sharpness_aware)
            base_kwargs["weight_decay"] = weight_decay
        elif not entry.sharpness_aware:
            params = [p for p in params.parameters() if p.requires_grad]
            base_kwargs["weight_decay"] = weight_decay
        else:
            params = param_groups(params, weight_decay=weight_decay)
    # torch.optim accepts lr=nan and nesterov="maybe": refuse them here, by name
    check_keyword_types(entry.name, base_cls, base_kwargs)
    try:
        base_opt = base_cls(params, **base_kwargs)
    except TypeError as err:  # a declared key this torch does not have (decoupled_weight_decay)
        raise ValueError(f"Invalid argument for {entry.name}: {err}") from err
    check_optimizer(base_opt, entry.name)
    if not entry.sharpness_aware:
        return base_opt
    return _wrap(entry, base_opt, ascent, schedule, routed, common)


# ------------------------------------------------------------------------ the entries

register_optimizer("sgd", None, "SGD (momentum, Nesterov, weight decay)", base="sgd")
register_optimizer("adam", None, "Adam", base="adam")
register_optimizer("adamw", None, "AdamW (decoupled weight decay)", base="adamw")
for _cls, _name in ((SAM, "sam"), (ASAM, "asam"), (USAM, "usam")):
    register_optimizer(_name, _cls, _ascents.get_ascent(_name).description, ascent=_name,
                       schedulable=True)  # fmt: skip


def _register_variants() -> None:
    """The SAM family; imported here, late: schedules.py and trajectory.py import the registry."""
    from samkit.optim.esam import ESAM
    from samkit.optim.fishersam import FisherSAM
    from samkit.optim.friendlysam import FriendlySAM
    from samkit.optim.gcsam import GCSAM
    from samkit.optim.gsam import GSAM
    from samkit.optim.looksam import LookSAM
    from samkit.optim.msam import MSAM
    from samkit.optim.schedules import ae_sam, periodic_sam, rst_sam
    from samkit.optim.trajectory import MESA, SAF
    from samkit.optim.wsam import WSAM

    for cls, name in ((FisherSAM, "fishersam"), (FriendlySAM, "friendlysam"), (GCSAM, "gcsam")):
        register_optimizer(name, cls, _ascents.get_ascent(name).description, ascent=name,
                           schedulable=True)  # fmt: skip
    register_optimizer(
        "gsam", GSAM, "GSAM, Zhuang et al. 2022: g_p - alpha g_perp, rho_t ~ lr_t",
        ascent="sam", ascent_choice=True, schedulable=True,
        ascent_keys={"rho_max": 0.05, "rho_min": 0.0, "lr_max": None, "lr_min": 0.0},
        excluded={"rho": "GSAM's radius is rho_t, between rho_min and rho_max: set those"},
        descent={"alpha": 0.1},
    )  # fmt: skip
    register_optimizer(
        "wsam", WSAM, "WSAM, Yue et al. 2023: sharpness weighted by gamma/(1-gamma)",
        ascent="sam", ascent_choice=True, schedulable=True, ascent_keys={"rho": 0.05},
        descent={"gamma": 0.9, "decouple": True},
    )  # fmt: skip
    register_optimizer(
        "bsam", BSAM, "bSAM, Moellenhoff & Khan 2023: Bayes posterior, eps = rho g/s", base="bsam",
        ascent_keys={"rho": 0.01, "num_data": 50_000, "seed": 0}, own_base=True,
    )  # fmt: skip
    register_optimizer(
        "looksam", LookSAM, "LookSAM, Liu et al. 2022: full SAM step every k",
        ascent="sam", ascent_choice=True, ascent_keys={"rho": 0.05},
        descent={"k": 5, "alpha": 0.7},
    )  # fmt: skip
    register_optimizer(
        "esam", ESAM, "ESAM, Du et al. 2022: random weight perturbation + SDS",
        ascent_keys={"rho": 0.05, "beta": 0.6, "seed": 0, "swp_norm": "all"},
        descent={"gamma": 0.5, "sds_count": "ceil"}, schedulable=True,
    )  # fmt: skip
    register_optimizer("aesam", ae_sam, "AE-SAM, Jiang et al. 2023: SAM when ||g||^2 is large",
                       ascent="sam", ascent_choice=True, schedule="ae")  # fmt: skip
    register_optimizer("rst", rst_sam, "RST, Zhao et al. 2022: SAM with probability p, else SGD",
                       ascent="sam", ascent_choice=True, schedule="random")  # fmt: skip
    register_optimizer(
        "periodicsam", periodic_sam, "SAM every k-th step, base steps between (Composer)",
        ascent="sam", ascent_choice=True, schedule="periodic",
    )  # fmt: skip
    register_optimizer("msam", MSAM, "MSAM, Becker et al. 2024: eps along -momentum, one pass",
                       ascent_keys={"rho": 0.3})  # fmt: skip
    register_optimizer(
        "saf", SAF, "SAF, Du et al. 2022: + KL to the logits of E epochs ago",
        descent={"lam": 0.3, "temperature": 5.0, "lag": 2, "start_epoch": 5,
                 "num_examples": None, "memory_device": None},
    )  # fmt: skip
    register_optimizer(
        "mesa", MESA, "MESA, Du et al. 2022: + KL to an EMA model's outputs",
        descent={"lam": 0.8, "temperature": 5.0, "ema_decay": 0.9998, "start_epoch": 5},
    )  # fmt: skip


_register_variants()
