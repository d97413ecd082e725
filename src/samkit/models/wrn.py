"""Wide residual networks (Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from samkit.models.common import (
    MAX_DEPTH,
    MAX_WIDTH,
    check_dropout,
    check_image_shape,
    check_positive_int,
)


class WideBlock(nn.Module):
    """Pre-activation block ``BN → ReLU → conv3×3 → BN → ReLU → Dropout → conv3×3`` with an
    identity shortcut, or a 1×1 convolution of the activated input when the shape changes (the
    reference implementation's layout)."""

    def __init__(self, in_planes: int, planes: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.equal = in_planes == planes and stride == 1
        self.shortcut = (
            None if self.equal else nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)
        )

    def forward(self, x: Tensor) -> Tensor:
        act = F.relu(self.bn1(x))
        out = self.conv1(act)
        out = self.conv2(self.dropout(F.relu(self.bn2(out))))
        return out + (x if self.shortcut is None else self.shortcut(act))


class WideResNet(nn.Module):
    """WRN-d-k: a 3×3 conv with 16 channels, three groups of ``(d-4)/6`` wide blocks with
    16k, 32k and 64k channels (stride 2 at groups 2 and 3), BN-ReLU, global average pooling and
    a linear layer. WRN-28-10 has 36.5M parameters, WRN-16-8 11.0M, WRN-28-2 1.5M (10 classes).

    Args:
        depth: d, with (d-4) divisible by 6 (16, 22, 28, 40, ...).
        widen_factor: k.
        dropout: dropout between the two convolutions of a block (0.3 in some of the paper's
            runs; 0 in the SAM/ASAM papers).
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        *,
        depth: int = 28,
        widen_factor: int = 10,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        c, _, _ = check_image_shape(f"wrn{depth}-{widen_factor}", input_shape)
        if isinstance(depth, bool) or not isinstance(depth, int) or not (
            10 <= depth <= MAX_DEPTH
        ) or (depth - 4) % 6:
            raise ValueError(f"Invalid WRN depth: {depth!r} (6n+4: 16, 22, 28, 40, ... up to "
                             f"{MAX_DEPTH})")
        check_positive_int("widen_factor", widen_factor, maximum=MAX_WIDTH // 64)
        dropout = check_dropout(dropout)
        n = (depth - 4) // 6
        widths = (16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.conv1 = nn.Conv2d(c, 16, 3, padding=1, bias=False)
        blocks: list[nn.Module] = []
        in_planes = 16
        for group, planes in enumerate(widths):
            for i in range(n):
                stride = 2 if group > 0 and i == 0 else 1
                blocks.append(WideBlock(in_planes, planes, stride, dropout))
                in_planes = planes
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(in_planes)
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        out = self.blocks(self.conv1(x))
        out = F.relu(self.bn(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)
