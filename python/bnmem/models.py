"""One architecture family where only the normalization layer changes.

norm: "bn" BatchNorm (batch statistics in training), "bn-frozen" the same module switched to running
statistics after a warm-up (see train.py), "bn-population" the same module normalizing with the
statistics of the model's whole training pool, recomputed at the start of every epoch
(`set_population_stats`; the same reparametrization as BN, no per-batch coupling), "gn" GroupNorm(4 groups),
"ln" layer norm — for the CNN
GroupNorm(1, C) (normalizes over C, H, W per sample, per-channel affine like BN's), for the MLP
nn.LayerNorm — and "none" (identity). Every other layer, and the initialization of every weight
shared by the variants, is identical under the same seed (norm layers draw no random numbers).
"""
from __future__ import annotations

import torch.nn as nn


def norm_layer(norm: str, channels: int, *, conv: bool) -> nn.Module:
    # -frozen-pop: mitigate.py's freeze with population statistics; -population: the mechanism arm
    if norm in ("bn", "bn-frozen", "bn-frozen-pop", "bn-population"):
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


def set_population_stats(model: nn.Module, x, chunk: int = 4096) -> None:
    """bn-population: set every BN layer's running statistics to the statistics of the pool x
    (the model's training examples, unaugmented) and put the BN layers in eval mode, so training
    normalizes every batch with the same pool statistics (no per-batch coupling, gradients do not
    flow through the statistics). One no-grad forward in train mode with cumulative averaging
    (momentum None): each layer's statistics are over the pool as normalized by the layers below.
    A pool larger than `chunk` is forwarded in chunks (statistics averaged over chunks; inner layers
    then see chunk-normalized inputs: an approximation, exact for pools <= chunk). The variance is
    the biased (population) one, as batch-statistics BN uses."""
    import torch

    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    flags = [m.training for m in model.modules()]
    n = int(x.shape[0])
    try:
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
        counts = {}

        def count(mod, args):   # values per channel of the first chunk (returns None: input unchanged)
            counts.setdefault(mod, args[0].numel() // args[0].shape[1])

        hooks = [m.register_forward_pre_hook(count) for m in bns]
        model.train()
        try:
            with torch.no_grad():
                for s in range(0, n, chunk):
                    model(x[s:s + chunk])
        finally:
            for h in hooks:
                h.remove()
        for m in bns:   # unbiased over the first chunk's values (what BN stores) -> biased (what it normalizes with)
            c = counts.get(m, 1)
            if c > 1:
                m.running_var.mul_((c - 1) / c)
    finally:
        for m, mom in zip(bns, saved):
            m.momentum = mom
        for m, f in zip(model.modules(), flags):
            m.training = f
    freeze_batchnorm(model)
