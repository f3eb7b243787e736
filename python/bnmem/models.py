"""One architecture family where only the normalization layer changes.

norm: "bn" BatchNorm (batch statistics in training), "bn-frozen" the same module switched to running
statistics after a warm-up (see train.py), "gn" GroupNorm(4 groups), "ln" layer norm — for the CNN
GroupNorm(1, C) (normalizes over C, H, W per sample, per-channel affine like BN's), for the MLP
nn.LayerNorm — and "none" (identity). Every other layer, and the initialization of every weight
shared by the variants, is identical under the same seed (norm layers draw no random numbers).
"""
from __future__ import annotations

import torch.nn as nn


def norm_layer(norm: str, channels: int, *, conv: bool) -> nn.Module:
    if norm in ("bn", "bn-frozen", "bn-frozen-pop"):  # -pop: mitigate.py's freeze with population statistics
        return nn.BatchNorm2d(channels) if conv else nn.BatchNorm1d(channels)
    if norm == "gn" or norm.startswith("gn-dp"):  # gn-dp<eps>: GroupNorm trained with DP-SGD (dp.py)
        return nn.GroupNorm(4 if channels % 4 == 0 else 1, channels)
    if norm == "ln":
        return nn.GroupNorm(1, channels) if conv else nn.LayerNorm(channels)
    if norm == "none":
        return nn.Identity()
    if norm.startswith("gbn"):  # ghost batch norm "gbn<virtual batch>", see ghost_bn.py
        from .ghost_bn import ghost_norm_layer
        return ghost_norm_layer(norm, channels, conv=conv)
    raise ValueError(f"unknown norm {norm!r}")


def small_cnn(norm: str, in_channels: int, side: int, n_classes: int, width: int = 16) -> nn.Sequential:
    """conv3x3(w) - norm - ReLU - maxpool2 - conv3x3(2w) - norm - ReLU - maxpool2 - linear."""
    w1, w2 = width, 2 * width
    s = side // 2 // 2
    return nn.Sequential(
        nn.Conv2d(in_channels, w1, 3, padding=1), norm_layer(norm, w1, conv=True), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(w1, w2, 3, padding=1), norm_layer(norm, w2, conv=True), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(w2 * s * s, n_classes))


def mlp(norm: str, in_channels: int, side: int, n_classes: int, width: int = 16) -> nn.Sequential:
    """flatten - linear(8w) - norm - ReLU - linear(8w) - norm - ReLU - linear."""
    h = 8 * width
    return nn.Sequential(
        nn.Flatten(), nn.Linear(in_channels * side * side, h), norm_layer(norm, h, conv=False), nn.ReLU(),
        nn.Linear(h, h), norm_layer(norm, h, conv=False), nn.ReLU(), nn.Linear(h, n_classes))


def build_model(arch: str, norm: str, shape, n_classes: int, width: int) -> nn.Sequential:
    c, side = int(shape[0]), int(shape[1])
    if arch == "cnn":
        return small_cnn(norm, c, side, n_classes, width)
    if arch == "mlp":
        return mlp(norm, c, side, n_classes, width)
    if arch.startswith("resnet"):  # CIFAR-style ResNets, see resnet.py
        from .resnet import build_resnet
        return build_resnet(arch, norm, c, n_classes, width)
    raise ValueError(f"unknown arch {arch!r}")


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def freeze_batchnorm(model: nn.Module) -> None:
    """Put BN layers in eval mode (running statistics) while the rest keeps training."""
    for mod in model.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            mod.eval()
