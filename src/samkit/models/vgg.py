"""VGG with BatchNorm (Simonyan & Zisserman, ICLR 2015), in the CIFAR form used by the SAM and
ASAM papers' code bases: the convolutional stack, then one linear layer on 512 features."""

from __future__ import annotations

from torch import Tensor, nn

from samkit.models.common import check_dropout, check_image_shape

VGG_CONFIGS: dict[int, tuple[int | str, ...]] = {
    11: (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    13: (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    16: (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
    19: (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
         512, 512, 512, 512, "M"),
}  # fmt: skip


class VGG(nn.Module):
    """``[conv3×3 → BN → ReLU]`` stacks separated by 2×2 max pooling, global average pooling
    (the identity on 32×32 inputs, where the map is 1×1), dropout and a linear layer.

    A pooling step is skipped when the map is already 1 pixel wide, so 28×28 inputs work.
    VGG-16 has 14.7M parameters on CIFAR-10.

    Args:
        depth: 11, 13, 16 or 19.
        dropout: dropout before the linear layer.
    """

    def __init__(
        self, input_shape: tuple[int, ...], num_classes: int, *, depth: int = 16,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        c, h, w = check_image_shape(f"vgg{depth}", input_shape)
        if depth not in VGG_CONFIGS:
            raise ValueError(f"Invalid VGG depth: {depth!r}; choose one of {sorted(VGG_CONFIGS)}")
        dropout = check_dropout(dropout)
        layers: list[nn.Module] = []
        in_ch = c
        for v in VGG_CONFIGS[depth]:
            if v == "M":
                if h >= 2 and w >= 2:
                    layers.append(nn.MaxPool2d(2))
                    h, w = h // 2, w // 2
            else:
                layers += [nn.Conv2d(in_ch, int(v), 3, padding=1, bias=False),
                           nn.BatchNorm2d(int(v)), nn.ReLU()]
                in_ch = int(v)
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Linear(in_ch, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        out = self.pool(self.features(x)).flatten(1)
        return self.classifier(self.dropout(out))
