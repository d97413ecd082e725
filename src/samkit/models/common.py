"""Pieces shared by the models: activations and argument checks."""

from __future__ import annotations

import math
from collections.abc import Callable

from torch import nn

from samkit.optim._validation import check_int

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


# Size limits, so that a typo (depth=100000) is an error rather than a process killed for memory.
# The deepest networks of the papers samkit reproduces have about 100 layers (ResNet-110; the
# deepest CIFAR ResNet, He et al. 2016, has 1202), and their widest layers a few thousand units;
# the limits leave ample room above them while bounding the modules a build creates.
MAX_DEPTH = 1000  # hidden layers of an MLP, blocks of a transformer, layers of a WRN
MAX_RESNET_DEPTH = 1202  # He et al.'s ResNet-1202
MAX_WIDTH = 1 << 16  # units or channels of one layer, a transformer's n_embd and n_head
# Parameters of one model: 2**31 float32 weights are 8 GiB, three to four times that in training
# (gradients, optimizer state); the zoo's largest model, wrn28-10, has 36.5 million.
MAX_PARAMETERS = 1 << 31


def check_positive_int(name: str, value: object, minimum: int = 1,
                       maximum: int | None = None) -> int:
    """An integer >= ``minimum`` (:func:`samkit.optim._validation.check_int`) and at most
    ``maximum``, samkit's limit on model sizes."""
    value = check_int(name, value, minimum)
    if maximum is not None and value > maximum:
        raise ValueError(f"Invalid {name}: {value} (an integer from {minimum} to {maximum}: "
                         "samkit's limit on model sizes)")
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
