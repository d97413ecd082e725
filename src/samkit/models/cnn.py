"""The small CNN of the edge-of-stability experiments (Cohen et al., ICLR 2021)."""

from __future__ import annotations

from torch import Tensor, nn

from samkit.models.common import (
    MAX_WIDTH,
    check_dropout,
    check_image_shape,
    check_positive_int,
    make_activation,
)


class SmallCNN(nn.Module):
    """``conv3×3(width) → act → maxpool2 → conv3×3(width) → act → maxpool2 → flatten → linear``.

    Cohen et al. (2021), "Gradient Descent on Neural Networks Typically Occurs at the Edge of
    Stability", the ``cnn-relu`` / ``cnn-tanh`` networks: 32 channels, padding 1, biases,
    PyTorch's default initialization. On 32×32 inputs the linear layer sees 32·8·8 = 2048
    features. A pooling step is skipped when the map is already 1 pixel wide, so tiny inputs
    (8×8 digits) work too.

    Args:
        width: channels of both convolutions (32 in the paper).
        activation: ``relu`` or ``tanh`` in the paper; any of :data:`ACTIVATIONS`.
        dropout: dropout before the linear layer.
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        *,
        width: int = 32,
        activation: str = "relu",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        c, h, w = check_image_shape("cnn", input_shape)
        check_positive_int("width", width, maximum=MAX_WIDTH)
        dropout = check_dropout(dropout)
        layers: list[nn.Module] = []
        in_ch = c
        for _ in range(2):
            layers += [nn.Conv2d(in_ch, width, 3, padding=1), make_activation(activation)]
            if h >= 2 and w >= 2:
                layers.append(nn.MaxPool2d(2))
                h, w = h // 2, w // 2
            in_ch = width
        layers.append(nn.Flatten())
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(width * h * w, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
