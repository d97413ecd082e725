r"""Any ascent over any base optimizer: :class:`SharpnessAware`, and the preset of an ascent name.

The named presets (SAM, ASAM, USAM, FisherSAM, FriendlySAM in their own modules; GSAM and
LookSAM with their descents; AE-SAM and RST with their schedules) are thin combinations of an
ascent (:mod:`samkit.optim.ascents`), a descent (:mod:`samkit.optim.descents`) and a step
schedule (:mod:`samkit.optim.schedules`) on the one protocol of :mod:`samkit.optim.base`.
"""

from __future__ import annotations

from typing import Any

from torch.optim import Optimizer

from samkit.optim.ascents import Ascent, get_ascent
from samkit.optim.base import SharpnessAwareOptimizer


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


def preset_class(name: str) -> type[SharpnessAwareOptimizer] | None:
    """The named preset class of a built-in ascent (``"sam"`` -> :class:`~samkit.SAM`), or None."""
    from samkit.optim.asam import ASAM
    from samkit.optim.fishersam import FisherSAM
    from samkit.optim.friendlysam import FriendlySAM
    from samkit.optim.sam import SAM
    from samkit.optim.usam import USAM

    classes = {"sam": SAM, "asam": ASAM, "usam": USAM, "fishersam": FisherSAM,
               "friendlysam": FriendlySAM}  # fmt: skip
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
