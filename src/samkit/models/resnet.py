"""CIFAR-style ResNets (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016,
section 4.2): ResNet-20/32/44/56/110."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from samkit.models.common import MAX_RESNET_DEPTH, check_dropout, check_image_shape


class _ShortcutA(nn.Module):
    """Option A: subsample by 2 and zero-pad the new channels (no parameters), as in the paper's
    CIFAR experiments; this is what gives ResNet-20 its 0.27M parameters."""

    def __init__(self, extra_channels: int) -> None:
        super().__init__()
        self.extra = extra_channels

    def forward(self, x: Tensor) -> Tensor:
        half = self.extra // 2
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, half, self.extra - half))


class BasicBlock(nn.Module):
    """``conv3×3 → BN → ReLU → conv3×3 → BN``, plus the shortcut, then ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int, shortcut: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            if shortcut == "A":
                self.shortcut = _ShortcutA(planes - in_planes)
            else:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                    nn.BatchNorm2d(planes),
                )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32×32 images: a 3×3 conv with 16 channels, three stages of ``n`` basic
    blocks with 16, 32 and 64 channels (stride 2 at the start of stages 2 and 3), global
    average pooling and a linear layer. Kaiming-normal initialization.

    Parameter counts (10 classes, shortcut A): ResNet-20 0.27M, ResNet-32 0.46M, ResNet-56
    0.85M, ResNet-110 1.7M, the paper's Table 6.

    Args:
        depth: 6n+2 (20, 32, 44, 56, 110, ...).
        shortcut: ``"A"`` (zero padding, the paper's CIFAR choice) or ``"B"`` (1×1 projection).
        dropout: dropout before the linear layer (not in the paper; default 0).
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        *,
        depth: int = 20,
        shortcut: str = "A",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        c, _, _ = check_image_shape(f"resnet{depth}", input_shape)
        if isinstance(depth, bool) or not isinstance(depth, int) or not (
            8 <= depth <= MAX_RESNET_DEPTH
        ) or (depth - 2) % 6:
            raise ValueError(f"Invalid ResNet depth: {depth!r} (6n+2: 20, 32, 44, 56, 110, ... up "
                             f"to {MAX_RESNET_DEPTH})")
        if shortcut not in ("A", "B"):
            raise ValueError(f"Invalid shortcut: {shortcut!r}; choose 'A' or 'B'")
        dropout = check_dropout(dropout)
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(c, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        blocks: list[nn.Module] = []
        in_planes = 16
        for stage, planes in enumerate((16, 32, 64)):
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(BasicBlock(in_planes, planes, stride, shortcut))
                in_planes = planes
        self.layers = nn.Sequential(*blocks)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layers(out)
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(self.dropout(out))
