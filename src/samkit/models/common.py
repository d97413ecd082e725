"""Pieces shared by the models: activations and argument checks."""

from __future__ import annotations

import math
from collections.abc import Callable

from torch import nn

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
    "elu": nn.ELU,
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "softplus": nn.Softplus,
    "leaky_relu": nn.LeakyReLU,
    "sigmoid": nn.Sigmoid,
    "identity": nn.Identity,
    "linear": nn.Identity,
}


def make_activation(name: str) -> nn.Module:
    """An activation module by name (``relu``, ``tanh``, ``gelu``, ...)."""
    if not isinstance(name, str) or name.lower() not in ACTIVATIONS:
        raise ValueError(
            f"Invalid activation: {name!r}; choose one of: {', '.join(sorted(ACTIVATIONS))}"
        )
    return ACTIVATIONS[name.lower()]()


def check_positive_int(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"Invalid {name}: {value!r} (an integer >= {minimum})")
    return value


def check_dropout(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"Invalid dropout: {value!r} (a probability in [0, 1))")
    return float(value)


def check_image_shape(model: str, input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    if len(input_shape) != 3:
        raise ValueError(
            f"Model {model!r} needs image inputs, input_shape (C, H, W); got {input_shape}. "
            "Use 'mlp' for vectors and 'transformer' for text."
        )
    return input_shape  # type: ignore[return-value]


def flat_size(input_shape: tuple[int, ...]) -> int:
    return int(math.prod(input_shape))
