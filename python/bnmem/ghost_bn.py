"""Ghost (virtual) batch normalization: batch statistics over virtual batches of a fixed size.

Norm name "gbn<V>" (e.g. "gbn8"): in training, the batch is split into consecutive virtual
batches of V samples (a last virtual batch of a single sample is merged into the one before it:
one sample has no batch statistics), and each is normalized with its own statistics by ONE
inner `nn.BatchNorm{1,2}d` (shared affine parameters and running statistics). A sample is thus
coupled only to the V - 1 others of its virtual batch, instead of the whole batch.
In eval mode (or when the inner BN is put in eval mode, e.g. `models.freeze_batchnorm`) it is
exactly the inner BN with its running statistics.

Running statistics are updated once per virtual batch (ceil(B / V) momentum updates per step),
as in the usual ghost-BN implementations.

Why a wrapper around a real BatchNorm (not a BatchNorm subclass): bnmem_kernels' per-sample
gradient rules see the inner BN called once per virtual batch, with that virtual batch's saved
statistics, which is exactly its computation; a subclass would be matched to the BatchNorm rule
with the statistics of the whole batch (wrong). The wrapper owns no parameters itself, so it needs
no rule. tests/suite/test_mitigate.py checks every mode against the autograd reference.
"""
from __future__ import annotations

import re

import torch
import torch.nn as nn

_NAME = re.compile(r"^gbn(\d+)$")


def parse_virtual_batch(norm: str) -> int | None:
    """"gbn16" -> 16; any other name -> None. Raises ValueError for gbn0 / gbn1."""
    m = _NAME.match(norm)
    if not m:
        return None
    v = int(m.group(1))
    if v < 2:
        raise ValueError(f"ghost batch norm {norm!r}: the virtual batch size must be >= 2")
    return v


class GhostBatchNorm(nn.Module):
    def __init__(self, channels: int, virtual_batch_size: int, *, conv: bool = True, eps: float = 1e-5,
                 momentum: float = 0.1):
        super().__init__()
        if virtual_batch_size < 2:
            raise ValueError(f"virtual_batch_size must be >= 2, got {virtual_batch_size}")
        self.virtual_batch_size = int(virtual_batch_size)
        self.bn = (nn.BatchNorm2d if conv else nn.BatchNorm1d)(channels, eps=eps, momentum=momentum)

    def split_sizes(self, b: int) -> list:
        v = self.virtual_batch_size
        sizes = [v] * (b // v) + ([b % v] if b % v else [])
        if len(sizes) > 1 and sizes[-1] == 1:
            sizes[-2:] = [sizes[-2] + 1]
        return sizes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.bn.training) or x.shape[0] <= self.virtual_batch_size:
            return self.bn(x)
        return torch.cat([self.bn(c) for c in x.split(self.split_sizes(x.shape[0]))])

    def extra_repr(self) -> str:
        return f"virtual_batch_size={self.virtual_batch_size}"


def ghost_norm_layer(norm: str, channels: int, *, conv: bool) -> GhostBatchNorm:
    return GhostBatchNorm(channels, parse_virtual_batch(norm), conv=conv)
