"""Reference BatchNorm seeded backward (MATH.md, "BN's coupling, exactly").

For a BatchNorm in train mode over channel c with M = B*T elements, and the loss of ONE sample i
whose upstream gradient dy is nonzero only on sample i (true below everything per-sample), the
gradient at the BN input for every sample j of the batch is rank structured:

    dz^(i)_jct = scale_c * ( [j = i] dy_ict - a_ic - xhat_jct * b_ic ),
    a_ic = (1/M) sum_t dy_ict,   b_ic = (1/M) sum_t dy_ict xhat_ict,

with scale_c = gamma_c / sigma_c (1 / sigma_c without affine). A "seed" is a pair (i, dy_i).
"""
import torch


def bn_seeded_backward(xhat: torch.Tensor, scale: torch.Tensor, dy: torch.Tensor, seeds: torch.Tensor):
    """xhat [B, C, T], scale [C], dy [S, C, T] (seed s's upstream gradient on sample seeds[s]),
    seeds [S] int64 in [0, B) -> (dz [S, B, C, T], a [S, C], b [S, C]).

    Accumulates in fp64 for fp64 inputs and fp32 otherwise; outputs in the input dtype.
    """
    acc = torch.float64 if xhat.dtype == torch.float64 else torch.float32
    x, sc, g = xhat.to(acc), scale.to(acc), dy.to(acc)
    B, C, T = x.shape
    M = B * T
    xi = x[seeds.long()]                                     # [S, C, T] xhat of each seed's own sample
    a = g.sum(dim=2) / M                                     # [S, C]
    b = (g * xi).sum(dim=2) / M                              # [S, C]
    dz = -(a[:, None, :, None] + x[None] * b[:, None, :, None])      # [S, B, C, T]
    dz[torch.arange(len(seeds)), seeds.long()] += g
    dz = dz * sc[None, None, :, None]
    return dz.to(xhat.dtype), a.to(xhat.dtype), b.to(xhat.dtype)
