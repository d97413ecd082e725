r"""Any ascent over any base optimizer: :class:`SharpnessAware`, and the preset of an ascent name.

The named presets (SAM, ASAM, USAM, FisherSAM, FriendlySAM in their own modules; GSAM and
LookSAM with their descents; AE-SAM and RST with their schedules) are thin combinations of an
ascent (:mod:`samkit.optim.ascents`), a descent (:mod:`samkit.optim.descents`) and a step
schedule (:mod:`samkit.optim.schedules`) on the one protocol of :mod:`samkit.optim.base`.
"""

from __future__ import annotations

from typing import Any

from torch.optim import Optimizer

from samkit.optim import davda54
from samkit.optim.ascents import Ascent, get_ascent
from samkit.optim.base import SharpnessAwareOptimizer

# keyword arguments every sharpness-aware optimizer takes besides its ascent's and descent's
COMMON_KEYS = ("max_grad_norm", "skip_non_finite")


class SharpnessAware(SharpnessAwareOptimizer):
    r"""A sharpness-aware optimizer from an ascent record over any base optimizer.

    .. math::
        \epsilon = \mathrm{ascent}(w, g; \rho), \qquad
        w \leftarrow \mathrm{base\_step}\big(w, \nabla L(w + \epsilon)\big)

    Args:
        base_optimizer: the optimizer that takes the descent step.
        ascent: an ascent name (``"sam"``, ``"asam"``, ...; see
            :func:`samkit.optim.registry.list_ascents`) or an :class:`~samkit.optim.ascents.Ascent`.
        **options: the ascent's hyperparameters (``rho``, its group keys and options; the
            ascent's defaults otherwise).

        max_grad_norm, skip_non_finite: see :class:`~samkit.optim.base.SharpnessAwareOptimizer`.
    """

    def __init__(
        self,
        base_optimizer: Optimizer,
        ascent: str | Ascent = "sam",
        *,
        max_grad_norm: float | None = None,
        skip_non_finite: bool = False,
        **options: Any,
    ) -> None:
        record = get_ascent(ascent)
        groups, self.ascent_options = record.resolve(**options)
        self.ascent = record
        super().__init__(
            base_optimizer, groups, max_grad_norm=max_grad_norm, skip_non_finite=skip_non_finite
        )

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", ascent={self.ascent.name!r})"


def _own_keys(tail: tuple, kwargs: dict[str, Any]) -> set[str]:
    """The keys of ``SharpnessAware(params, torch.optim.SGD, [ascent], ...)`` that are not the
    base optimizer's: ``ascent``, the chosen ascent's keys and :data:`COMMON_KEYS`."""
    ascent = kwargs.get("ascent", tail[0] if tail else "sam")
    return {"ascent", *COMMON_KEYS, *get_ascent(ascent).keys()}


# davda54's form through the one adapter (samkit.optim.davda54), with the keys of the ascent
# named in the call (the signature's **options would not name them)
_init = SharpnessAware.__dict__["__init__"]
_init = getattr(_init, "__wrapped__", _init)  # without the optimizer base's signature adapter
SharpnessAware.__init__ = davda54.accepts_base_class(_init, _own_keys)
del _init


class AscentPreset:
    """The registry's optimizer of an ascent that has no class of its own (a registered toy):
    ``AscentPreset("signsam")(base, rho=...)`` is ``SharpnessAware(base, "signsam", rho=...)``,
    davda54's form included."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, *args: Any, **kwargs: Any) -> SharpnessAware:
        return SharpnessAware(*args, ascent=self.name, **kwargs)

    def __repr__(self) -> str:
        return f"AscentPreset({self.name!r})"


def preset_class(name: str) -> type[SharpnessAwareOptimizer] | None:
    """The named preset class of a built-in ascent (``"sam"`` -> :class:`~samkit.SAM`), or None."""
    from samkit.optim.asam import ASAM
    from samkit.optim.fishersam import FisherSAM
    from samkit.optim.friendlysam import FriendlySAM
    from samkit.optim.gcsam import GCSAM
    from samkit.optim.sam import SAM
    from samkit.optim.usam import USAM

    classes = {"sam": SAM, "asam": ASAM, "usam": USAM, "fishersam": FisherSAM,
               "friendlysam": FriendlySAM, "gcsam": GCSAM}  # fmt: skip
    cls = classes.get(str(name).lower())
    # a class whose ascent was replaced by a registry entry of the same name is not used
    return cls if cls is not None and cls.ascent is get_ascent(name) else None


def ascent_optimizer(
    ascent: str | Ascent, base_optimizer: Optimizer, **kwargs: Any
) -> SharpnessAwareOptimizer:
    """The optimizer of ``ascent`` alone over ``base_optimizer``: its preset class where it has
    one (same type, defaults and checkpoints as ``samkit.SAM(...)`` & co.), else
    :class:`SharpnessAware`. ``kwargs``: the preset's arguments (``rho``, ``max_grad_norm``,
    ...)."""
    cls = preset_class(ascent) if isinstance(ascent, str) else None
    if cls is not None:
        return cls(base_optimizer, **kwargs)
    return SharpnessAware(base_optimizer, ascent, **kwargs)
