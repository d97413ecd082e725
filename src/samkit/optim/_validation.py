"""Argument checks shared by the optimizers: a ValueError that names the value and the range."""

from __future__ import annotations

import math
import numbers


def check_non_negative(name: str, value) -> None:
    """``value`` must be a finite number >= 0 (a radius, a normalization offset)."""
    try:
        ok = float(value) >= 0.0 and math.isfinite(float(value))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"Invalid {name}: {value!r} (allowed: a finite number >= 0)")


def check_choice(name: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"Invalid {name}: {value!r} (allowed: {', '.join(map(repr, allowed))})")


def check_positive(name: str, value) -> None:
    """``value`` must be a finite number > 0 (a clipping norm)."""
    ok = (
        isinstance(value, numbers.Real)
        and not isinstance(value, bool)
        and math.isfinite(float(value))
        and float(value) > 0.0
    )
    if not ok:
        raise ValueError(f"Invalid {name}: {value!r} (allowed: a finite number > 0, or None)")
