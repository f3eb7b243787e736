"""CIFAR-style ResNets where the normalization layer is a parameter.

Archs (`--arch`):
  - "resnet18": He et al.'s ResNet-18 in the CIFAR form (3x3 stem, no max-pool; BasicBlocks
    [2, 2, 2, 2] at widths w, 2w, 4w, 8w; w = `width`, 64 for the standard model).
  - "resnet8": the small CIFAR ResNet (3x3 stem; BasicBlocks [1, 1, 1] at widths w, 2w, 4w;
    w = 16 for the standard model) — seconds per epoch on a CPU at 32x32.
The norm names are the suite's (`models.norm_layer`: bn, bn-frozen, gn, ln, none, and the ghost
batch norm variants "gbn<virtual batch>" of mitigate.py), so every variant's other layers and
initialization are identical under the same seed (norm layers draw no random numbers).
Convolutions carry a bias only when there is no normalization after them. Any input side works
(global average pooling before the classifier).
"""
from __future__ import annotations

import torch.nn as nn

ARCHS = {"resnet8": (1, 1, 1), "resnet18": (2, 2, 2, 2)}


def _norm(norm: str, channels: int) -> nn.Module:
    from .models import norm_layer  # one table of norm names for the whole suite
    return norm_layer(norm, channels, conv=True)


class BasicBlock(nn.Module):
    def __init__(self, norm: str, c_in: int, c_out: int, stride: int):
        super().__init__()
        bias = norm == "none"
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=bias)
        self.n1 = _norm(norm, c_out)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=bias)
        self.n2 = _norm(norm, c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=bias), _norm(norm, c_out))
        self.relu2 = nn.ReLU()

    def forward(self, x):
        out = self.relu1(self.n1(self.conv1(x)))
        out = self.n2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, blocks, norm: str, in_channels: int, n_classes: int, width: int):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=norm == "none"),
                                  _norm(norm, width), nn.ReLU())
        layers, c = [], width
        for i, n in enumerate(blocks):
            c_out = width * 2 ** i
            for j in range(n):
                layers.append(BasicBlock(norm, c, c_out, 2 if (i > 0 and j == 0) else 1))
                c = c_out
        self.layers = nn.Sequential(*layers)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(c, n_classes)

    def forward(self, x):
        return self.fc(self.pool(self.layers(self.stem(x))))


def build_resnet(arch: str, norm: str, in_channels: int, n_classes: int, width: int) -> ResNet:
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; ResNets: {', '.join(ARCHS)}")
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    return ResNet(ARCHS[arch], norm, in_channels, n_classes, width)
