"""The CIFAR ResNets of He et al. (2016), section 4.2: ResNet-20, -32, -44, -56, -110 (depth ``6n + 2``).

A 3×3 convolution with 16 filters, then three groups of ``n`` basic blocks with 16, 32 and 64 filters (the
first block of the second and third groups halves the feature map), global average pooling and a linear
classifier. Shortcuts that change shape are identities on a strided input, zero-padded in the channels
("option A", as in the paper), so the network has the paper's parameter counts (ResNet-56: 0.85M,
ResNet-110: 1.7M).

Example::

    >>> model = cifar_resnet(56, num_classes=10)
    >>> sum(p.numel() for p in model.parameters())
    853018
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["cifar_resnet", "CifarResNet", "BasicBlock"]


class BasicBlock(nn.Module):
    """Two 3×3 convolutions with batch normalization, and an identity shortcut (option A)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.stride = stride
        self.pad = planes - in_planes

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1 and self.pad == 0:
            return x
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """``depth = 6n + 2`` layers; ``in_channels`` 3 for CIFAR, 1 for grey-scale digits; ``width`` scales the
    filter counts (16 in the paper)."""

    def __init__(self, depth: int = 56, num_classes: int = 10, in_channels: int = 3, width: int = 16) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"depth must be 6n + 2 (20, 32, 44, 56, 110, ...), not {depth}")
        n = (depth - 2) // 6
        self.conv = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        planes, layers = width, []
        for group, out_planes in enumerate((width, 2 * width, 4 * width)):
            blocks = []
            for i in range(n):
                blocks.append(BasicBlock(planes, out_planes, stride=2 if group > 0 and i == 0 else 1))
                planes = out_planes
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.fc = nn.Linear(planes, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.conv(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(x.mean(dim=(2, 3)))


def cifar_resnet(depth: int = 56, num_classes: int = 10, in_channels: int = 3, width: int = 16) -> CifarResNet:
    """ResNet-``depth`` for 32×32 CIFAR images (any square input works)."""
    return CifarResNet(depth, num_classes, in_channels, width)
