"""Reference per-sample affine-parameter gradient norms of a normalization layer (docs/math.md, column).

For x, dy viewed as [B, C, S] (C = the affine parameter's index, S = positions reduced over) and the
layer's statistics mean, rstd broadcastable to [B, C, S]:
  xhat = (x - mean) * rstd
  dgamma_i[c] = sum_s dy_ics xhat_ics,   dbeta_i[c] = sum_s dy_ics
  out[i] = ( sum_c dgamma_i[c]^2 , sum_c dbeta_i[c]^2 )          -> [B, 2]
BatchNorm: mean/rstd per channel [1, C, 1]; InstanceNorm: per (i, c) [B, C, 1]; GroupNorm: per
(i, group) repeated over the group's channels [B, C, 1]; LayerNorm: x as [B, D, T], stats per
(i, t) [B, 1, T]. Accumulates in fp64 for fp64 x, fp32 otherwise (and returns that dtype).
"""
import torch

from .ghost_norm import accumulation_dtype


def norm_affine_grad_sq(x: torch.Tensor, dy: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    acc = accumulation_dtype(x.dtype)
    xhat = (x.to(acc) - mean.to(acc)) * rstd.to(acc)
    dy = dy.to(acc)
    dgamma = (dy * xhat).sum(dim=2)
    dbeta = dy.sum(dim=2)
    return torch.stack([dgamma.square().sum(dim=1), dbeta.square().sum(dim=1)], dim=1)
