"""A fully connected network (the MLPs of the sharpness and edge-of-stability papers)."""

from __future__ import annotations

from torch import Tensor, nn

from samkit.models.common import (
    MAX_DEPTH,
    MAX_WIDTH,
    check_dropout,
    check_positive_int,
    flat_size,
    make_activation,
)


class MLP(nn.Module):
    """Flatten, then ``depth`` hidden layers ``Linear → activation → Dropout``, then a linear
    read-out to ``num_classes`` logits. ``depth=0`` is a linear (softmax regression) model.

    Args:
        input_shape: shape of one example (any shape: it is flattened).
        num_classes: number of outputs.
        depth: number of hidden layers.
        width: units per hidden layer.
        activation: ``relu``, ``tanh``, ``gelu``, ``elu``, ``silu``, ``softplus``, ...
        dropout: dropout probability after each hidden activation.
        bias: whether the linear layers have biases.
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        *,
        depth: int = 2,
        width: int = 256,
        activation: str = "relu",
        dropout: float = 0.0,
        bias: bool = True,
    ) -> None:
        super().__init__()
        check_positive_int("depth", depth, minimum=0, maximum=MAX_DEPTH)
        check_positive_int("width", width, maximum=MAX_WIDTH)
        dropout = check_dropout(dropout)
        make_activation(activation)  # validate before building
        layers: list[nn.Module] = [nn.Flatten()]
        fan_in = flat_size(input_shape)
        for _ in range(depth):
            layers += [nn.Linear(fan_in, width, bias=bias), make_activation(activation)]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            fan_in = width
        layers.append(nn.Linear(fan_in, num_classes, bias=bias))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
