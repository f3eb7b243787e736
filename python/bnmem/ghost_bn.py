"""Ghost (virtual) batch normalization: batch statistics over virtual batches of a fixed size.

Norm name "gbn<V>" (e.g. "gbn8"): in training, the batch is split into consecutive virtual
batches of V samples (a last virtual batch of a single sample is merged into the one before it:
one sample has no batch statistics), and each is normalized with its own statistics and the
module's shared affine parameters. A sample is thus coupled only to the V - 1 others of its
virtual batch, instead of the whole batch. Running statistics are updated once per virtual batch
(ceil(B / V) momentum updates per step, unbiased variances), as the usual ghost-BN implementations
that call BN once per chunk do. In eval mode (or frozen: `models.freeze_batchnorm`), or with a batch
of at most V samples, it is exactly nn.BatchNorm.

`GhostBatchNorm1d/2d` subclass `nn.BatchNorm1d/2d`, so everything the suite does with BN layers
(has_batchnorm, freeze_batchnorm, eval/train-mode queries, state dicts) applies unchanged.
Per-sample gradient norms: bnmem_kernels' one-pass engine needs ONE module call per forward and a
rule per module type (a BatchNorm rule would use the whole batch's statistics: wrong here), so this
module normalizes the virtual batches functionally inside its single call. Its `GhostBatchNormRule`
is registered in the kernels' rule table with `@bnmem_kernels.norms.rules.register` when this module
is imported (the documented extension point; nothing in bnmem_kernels is edited): per-sample
statistics = those of the sample's virtual batch, then the kernels' `norm_affine_grad_sq`, as for
GroupNorm.
tests/suite/test_mitigate.py checks every mode against the autograd reference.
"""
from __future__ import annotations

import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from bnmem_kernels import norm_affine_grad_sq
from bnmem_kernels.norms import rules

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


def split_sizes(b: int, v: int) -> list:
    sizes = [v] * (b // v) + ([b % v] if b % v else [])
    if len(sizes) > 1 and sizes[-1] == 1:
        sizes[-2:] = [sizes[-2] + 1]
    return sizes


class _Ghost:
    def _init_ghost(self, virtual_batch_size):
        if int(virtual_batch_size) < 2:
            raise ValueError(f"virtual_batch_size must be >= 2, got {virtual_batch_size}")
        self.virtual_batch_size = int(virtual_batch_size)

    def uses_virtual_batches(self, x) -> bool:
        return self.training and x.shape[0] > self.virtual_batch_size

    def forward(self, x):
        if not self.uses_virtual_batches(x):
            return super().forward(x)
        self._check_input_dim(x)
        chunks = x.split(split_sizes(x.shape[0], self.virtual_batch_size))
        out = torch.cat([F.batch_norm(c, None, None, self.weight, self.bias, True, 0.0, self.eps) for c in chunks])
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                dims = [0] + list(range(2, x.dim()))
                for c in chunks:
                    self.num_batches_tracked.add_(1)
                    f = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                    var, mean = torch.var_mean(c.detach(), dim=dims, correction=1)
                    self.running_mean.mul_(1 - f).add_(mean.to(self.running_mean.dtype), alpha=f)
                    self.running_var.mul_(1 - f).add_(var.to(self.running_var.dtype), alpha=f)
        return out

    def extra_repr(self):
        return super().extra_repr() + f", virtual_batch_size={self.virtual_batch_size}"


class GhostBatchNorm1d(_Ghost, nn.BatchNorm1d):
    def __init__(self, num_features, virtual_batch_size, **kw):
        nn.BatchNorm1d.__init__(self, num_features, **kw)
        self._init_ghost(virtual_batch_size)


class GhostBatchNorm2d(_Ghost, nn.BatchNorm2d):
    def __init__(self, num_features, virtual_batch_size, **kw):
        nn.BatchNorm2d.__init__(self, num_features, **kw)
        self._init_ghost(virtual_batch_size)


def ghost_norm_layer(norm: str, channels: int, *, conv: bool) -> nn.Module:
    return (GhostBatchNorm2d if conv else GhostBatchNorm1d)(channels, parse_virtual_batch(norm))


@rules.register(GhostBatchNorm1d, GhostBatchNorm2d)
class GhostBatchNormRule(rules.Rule):
    """Per-sample statistics = the sample's virtual batch's; otherwise (eval, frozen, a batch of at
    most V samples) BatchNorm's own rule. Registered in bnmem_kernels' rule table when this module is
    imported, as the library's own rules are."""

    @staticmethod
    def _bn_rule():
        return rules.RULES[nn.BatchNorm2d]

    def capture(self, module, x, output, mode):
        if not module.uses_virtual_batches(x):
            state, replace = self._bn_rule().capture(module, x, output, mode)
            return {**state, "bn": True}, replace
        B, C = x.shape[:2]
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        sizes = split_sizes(B, module.virtual_batch_size)
        dims = [0] + list(range(2, x.dim()))
        with torch.no_grad():
            stats = [torch.var_mean(c.detach().to(acc), dim=dims, correction=0) for c in x.split(sizes)]
            reps = torch.tensor(sizes, device=x.device)
            mean = torch.stack([m for _, m in stats]).repeat_interleave(reps, dim=0)          # [B, C]
            rstd = torch.rsqrt(torch.stack([v for v, _ in stats]) + module.eps).repeat_interleave(reps, dim=0)
        replace = None
        if mode == "detached":  # statistics constant in the backward
            shape = [B, C] + [1] * (x.dim() - 2)
            y = (x - mean.to(x.dtype).view(shape)) * rstd.to(x.dtype).view(shape)
            if module.weight is not None:
                pshape = [1, C] + [1] * (x.dim() - 2)
                y = y * module.weight.view(pshape) + module.bias.view(pshape)
            replace = y
        return {"x": x, "mean": mean, "rstd": rstd, "bn": False}, replace

    def sq_norms(self, module, state, grad_out, backend):
        if state["bn"]:
            return self._bn_rule().sq_norms(module, state, grad_out, backend)
        x = state["x"]
        B, C = x.shape[:2]
        out = norm_affine_grad_sq(x.reshape(B, C, -1), grad_out.reshape(B, C, -1), state["mean"].view(B, C, 1),
                                  state["rstd"].view(B, C, 1), backend=backend)
        res = {}
        if module.weight is not None:
            res["weight"] = out[:, 0]
        if module.bias is not None:
            res["bias"] = out[:, 1]
        return res
