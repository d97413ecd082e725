"""Build any optimizer samkit knows by name: ``create_optimizer("asam", model, lr=0.1, rho=0.5)``.

One registry holds the four kinds of the SAM family:

* **presets** (:func:`list_optimizers`): plain optimizers (``sgd``, ``adam``, ``adamw``), built
  directly, and sharpness-aware ones: a base optimizer (``base="sgd"`` unless the entry says
  otherwise) wrapped by their class; keyword arguments are split between the two by the
  wrapper's signature. A new variant registers itself with :func:`register_optimizer`.
* **ascents** (:func:`list_ascents`, :mod:`samkit.optim.ascents`): how ε is found.
  :func:`register_ascent` adds one (one function, one line) and makes it a preset of its own.
* **descents** (:func:`list_descents`, :mod:`samkit.optim.descents`): GSAM's gap term, LookSAM's
  reuse; carried by the ``gsam`` and ``looksam`` presets.
* **step schedules** (:func:`list_schedules`, :mod:`samkit.optim.schedules`): ``ae``, ``random``.

They combine by name::

    create_optimizer("gsam", model, lr=0.1, ascent="asam", eta=0.01)   # GSAM's descent, ASAM's eps
    create_optimizer("looksam", model, lr=0.1, ascent="asam", k=5)
    create_optimizer("sam", model, lr=0.1, schedule="ae", c=0.5)       # AE-SAM
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from samkit.optim import ascents as _ascents
from samkit.optim import descents as _descents
from samkit.optim._validation import check_keyword_types, check_non_negative, check_optimizer
from samkit.optim.asam import ASAM
from samkit.optim.ascents import Ascent
from samkit.optim.groups import param_groups
from samkit.optim.sam import SAM
from samkit.optim.usam import USAM

BASE_OPTIMIZERS: dict[str, type[Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
}


@dataclass(frozen=True)
class OptimizerEntry:
    """One registry entry: ``wrapper`` is None for a plain optimizer."""

    name: str
    description: str
    base: str  # the default base optimizer (a key of BASE_OPTIMIZERS)
    wrapper: type | None = None  # a SharpnessAwareOptimizer subclass, or a factory(base, **kw)
    keys: frozenset[str] | None = None  # the wrapper's keyword arguments, when not its signature

    def wrapper_keys(self) -> set[str]:
        """The keyword arguments the wrapper takes (its signature's, or ``keys``); for an entry
        that takes ``ascent=``, the keys of its default ascent too (``rho``, ``eta``, ...)."""
        if self.wrapper is None:
            return set()
        if self.keys is not None:
            return set(self.keys)
        sig = inspect.signature(self.wrapper)
        return {k for k in sig.parameters if k != "base_optimizer"}

    def takes_ascent(self) -> bool:
        return "ascent_options" in self.wrapper_keys()


_REGISTRY: dict[str, OptimizerEntry] = {}


def register_optimizer(
    name: str, wrapper: type | Callable | None, description: str, base: str = "sgd"
) -> None:
    """Add ``name`` to the registry (replacing an entry of the same name)."""
    if base not in BASE_OPTIMIZERS:
        raise ValueError(f"Invalid base: {base!r} (allowed: {sorted(BASE_OPTIMIZERS)})")
    _REGISTRY[name.lower()] = OptimizerEntry(name.lower(), description, base, wrapper)


class _AscentPreset:
    """The preset of an ascent that has no class of its own: ``SharpnessAware(base, name, ...)``."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, base_optimizer, *args, **kwargs):
        """``preset(base, rho=...)``, or davda54's ``preset(params, torch.optim.SGD, rho=...,
        lr=...)`` (the ascent's keys go to the ascent, the others build the base)."""
        from samkit.optim.presets import SharpnessAware

        if not isinstance(base_optimizer, Optimizer):
            base_class = kwargs.pop("base_optimizer_class", None)
            if base_class is None and args:
                base_class, args = args[0], args[1:]
            if not (isinstance(base_class, type) and issubclass(base_class, Optimizer)):
                raise ValueError(
                    f"Invalid base_optimizer: {type(base_optimizer).__name__} (allowed: an "
                    "optimizer instance, or params followed by a torch.optim.Optimizer class)"
                )
            own = _ascents.get_ascent(self.name).keys() | {"max_grad_norm", "skip_non_finite"}
            mine = {k: kwargs.pop(k) for k in list(kwargs) if k in own}
            base_optimizer, kwargs = base_class(base_optimizer, **kwargs), mine
        if args:
            raise ValueError(f"Invalid arguments {args!r}: pass the ascent's options by name")
        return SharpnessAware(base_optimizer, self.name, **kwargs)


def register_ascent(ascent: Ascent, preset: bool = True) -> Ascent:
    """Add ``ascent`` to the table of ascents (replacing one of the same name), so that it is
    the ``ascent=`` of GSAM, LookSAM, AE-SAM and RST; with ``preset`` (and no optimizer of that
    name yet) it is also a registry optimizer of its own, built as
    :class:`~samkit.optim.presets.SharpnessAware`. Returns ``ascent``.

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
        keys = frozenset({*ascent.keys(), "max_grad_norm", "skip_non_finite"})
        _REGISTRY[name] = OptimizerEntry(
            name, ascent.description or f"ascent {name}", "sgd", _AscentPreset(name), keys
        )
    return ascent


def unregister(name: str) -> None:
    """Remove ``name`` from the presets and the ascents (tests that register a toy ascent)."""
    _REGISTRY.pop(str(name).lower(), None)
    _ascents.ASCENTS.pop(str(name).lower(), None)


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


def optimizer_info(name: str) -> OptimizerEntry:
    """The registry entry of ``name`` (case-insensitive): its default base and wrapper keys."""
    entry = _REGISTRY.get(str(name).lower())
    if entry is None:
        raise ValueError(f"Invalid optimizer: {name!r} (allowed: {', '.join(list_optimizers())})")
    return entry


def base_optimizer_class(name: str) -> type[Optimizer]:
    """The ``torch.optim`` class of a base optimizer name (``sgd``, ``adam``, ``adamw``)."""
    cls = BASE_OPTIMIZERS.get(str(name).lower())
    if cls is None:
        raise ValueError(f"Invalid base: {name!r} (allowed: {', '.join(sorted(BASE_OPTIMIZERS))})")
    return cls


def list_optimizers() -> list[str]:
    """The names ``create_optimizer`` accepts, sorted."""
    return sorted(_REGISTRY)


def describe_optimizers() -> dict[str, str]:
    return {name: _REGISTRY[name].description for name in list_optimizers()}


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


def create_optimizer(
    name: str,
    params: nn.Module | Iterable[Any],
    base: str | None = None,
    decay_bias_and_norm: bool = False,
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
            ascent name (:func:`list_ascents`); its hyperparameters (``eta``, ``p``, ...) may be
            given as keyword arguments (those the entry does not take itself) or as
            ``ascent_options``.
        schedule: a step schedule (:func:`list_schedules`, e.g. ``"ae"``, or a schedule
            object) attached to the sharpness-aware optimizer (:func:`with_schedule`); its
            arguments (``c``, ``delta``, ...) as keyword arguments the wrapper does not take, or
            as ``schedule_options``. This is the *step* schedule (which steps are two-pass),
            never a learning-rate schedule.
        **kwargs: hyperparameters of the base optimizer (``lr`` is required, ``momentum``,
            ...) and of the wrapper (``rho``, ``eta``, ``max_grad_norm``, ...).
    """
    entry = optimizer_info(name)
    schedule = kwargs.pop("schedule", None)
    schedule_options = dict(kwargs.pop("schedule_options", None) or {})
    base_cls = base_optimizer_class(base or entry.base)
    if "lr" not in kwargs:
        raise ValueError(
            f"Invalid arguments for {entry.name}: lr is required (allowed: a learning rate > 0, "
            "e.g. create_optimizer(name, model, lr=0.1)); samkit does not pick one for you"
        )
    own = {k: kwargs.pop(k) for k in list(kwargs) if k in entry.wrapper_keys()}
    if "ascent" in own or "ascent_options" in own:
        ascent = _ascents.get_ascent(own.get("ascent", "sam"))
        options = dict(own.pop("ascent_options", None) or {})
        options.update({k: kwargs.pop(k) for k in list(kwargs) if k in ascent.keys()})
        if options:
            own["ascent_options"] = options
    if schedule is not None:
        if entry.wrapper is None:
            raise ValueError(
                f"Invalid schedule for {entry.name}: {schedule!r} (a step schedule needs a "
                "sharpness-aware optimizer, e.g. create_optimizer('sam', ..., schedule='ae'))"
            )
        if isinstance(schedule, str):
            from samkit.optim.schedules import SCHEDULES

            cls = SCHEDULES.get(schedule.lower())
            if cls is None:
                raise ValueError(
                    f"Invalid schedule: {schedule!r} (allowed: {', '.join(list_schedules())})"
                )
            names = set(inspect.signature(cls).parameters)
            schedule_options.update({k: kwargs.pop(k) for k in list(kwargs) if k in names})
    if isinstance(params, nn.Module):
        weight_decay = kwargs.pop("weight_decay", 0.0)
        if weight_decay and not decay_bias_and_norm:
            params = decay_groups(params, weight_decay, normalize_key=entry.wrapper is not None)
            kwargs["weight_decay"] = weight_decay
        elif entry.wrapper is None:
            params = [p for p in params.parameters() if p.requires_grad]
            kwargs["weight_decay"] = weight_decay
        else:
            params = param_groups(params, weight_decay=weight_decay)
    # torch.optim accepts lr=nan and nesterov="maybe": refuse them here, by name
    check_keyword_types(entry.name, base_cls, kwargs)
    try:
        base_opt = base_cls(params, **kwargs)
    except TypeError as err:
        allowed = sorted(set(inspect.signature(base_cls).parameters) - {"params"})
        allowed += sorted(entry.wrapper_keys())
        raise ValueError(f"Invalid argument for {entry.name}: {err} (allowed: {allowed})") from err
    check_optimizer(base_opt, entry.name)
    if entry.wrapper is None:
        return base_opt
    opt = entry.wrapper(base_opt, **own)
    if schedule is not None:
        from samkit.optim.schedules import make_schedule, with_schedule

        if isinstance(schedule, str):
            schedule = make_schedule(schedule, **schedule_options)
        elif schedule_options:
            raise ValueError("Invalid schedule_options: only with a schedule name such as 'ae'")
        with_schedule(opt, schedule)
    return opt


register_optimizer("sgd", None, "SGD (momentum, Nesterov, weight decay)", base="sgd")
register_optimizer("adam", None, "Adam", base="adam")
register_optimizer("adamw", None, "AdamW (decoupled weight decay)", base="adamw")
register_optimizer("sam", SAM, "SAM, Foret et al. 2021: eps = rho g / ||g||")
register_optimizer("asam", ASAM, "ASAM, Kwon et al. 2021: eps = rho T^2 g / ||T g||")
register_optimizer("usam", USAM, "unnormalized SAM: eps = rho g")


def _register_variants() -> None:
    """The SAM family; imported here, late, because schedules.py imports the presets."""
    from samkit.optim.esam import ESAM
    from samkit.optim.fishersam import FisherSAM
    from samkit.optim.friendlysam import FriendlySAM
    from samkit.optim.gsam import GSAM
    from samkit.optim.looksam import LookSAM
    from samkit.optim.msam import MSAM
    from samkit.optim.schedules import ae_sam, rst_sam

    register_optimizer("gsam", GSAM, "GSAM, Zhuang et al. 2022: g_p - alpha g_perp, rho_t ~ lr_t")
    register_optimizer("looksam", LookSAM, "LookSAM, Liu et al. 2022: full SAM step every k")
    register_optimizer("esam", ESAM, "ESAM, Du et al. 2022: random weight perturbation + SDS")
    register_optimizer("aesam", ae_sam, "AE-SAM, Jiang et al. 2023: SAM when ||g||^2 is large")
    register_optimizer("rst", rst_sam, "RST, Zhao et al. 2022: SAM with probability p, else SGD")
    register_optimizer("friendlysam", FriendlySAM, "F-SAM, Li et al. 2024: eps along g - mean(g)")
    register_optimizer("msam", MSAM, "MSAM, Becker et al. 2024: eps along -momentum, one pass")
    register_optimizer("fishersam", FisherSAM, "Fisher SAM, Kim et al. 2022: eps = rho F^-1 g/..")


_register_variants()
