"""Triton kernel for conv_weight_grad_sq: out[i] = ||dW_i||_F^2 of a Conv2d weight gradient.

Program (i, group x o-block x k-block) forms a [BO, BK] block of dW_i for one group, W[o, k] =
sum_l g[i, o, l] x[i, ci(k), oh(l) sh + kh(k) dh, ow(l) sw + kw(k) dw], with tl.dot of a grad tile
[BO, BT] and an input tile [BK, BT] read by implicit im2col (addresses computed from (k, l); no
unfolded input in memory), looping over the output positions l in BT chunks, then reduces the
block's squares into a [B, P] partial buffer summed afterwards (deterministic, no atomics).
Strided inputs are read in place.
"""
import torch
import triton
import triton.language as tl

from .._backend import triton_interpreting
from .ghost_norm_linear import _mm_nt


@triton.jit
def conv_wgrad_sq_kernel(x_ptr, g_ptr, part_ptr, CIG, COG, K, L, OW, KH, KW, SH, SW, DH, DW,
                         sx_b, sx_c, sx_h, sx_w, sg_b, sg_c, sg_h, sg_w, n_o, n_k,
                         BO: tl.constexpr, BK: tl.constexpr, BT: tl.constexpr,
                         USE_DOT: tl.constexpr, ACC: tl.constexpr):
    i = tl.program_id(0)
    pid = tl.program_id(1)
    grp = pid // (n_o * n_k)
    ok = pid % (n_o * n_k)
    ro = (ok // n_k) * BO + tl.arange(0, BO)          # output channel within the group
    rk = (ok % n_k) * BK + tl.arange(0, BK)           # (ci, kh, kw) within the group
    ci = rk // (KH * KW)
    kh = (rk // KW) % KH
    kw = rk % KW
    x_base = x_ptr + i * sx_b + (grp * CIG + ci) * sx_c + kh * DH * sx_h + kw * DW * sx_w     # [BK]
    g_base = g_ptr + i * sg_b + (grp * COG + ro) * sg_c                                       # [BO]
    acc = tl.zeros((BO, BK), dtype=ACC)
    for l0 in range(0, L, BT):
        rl = l0 + tl.arange(0, BT)
        oh = rl // OW
        ow = rl % OW
        gt = tl.load(g_base[:, None] + oh[None, :] * sg_h + ow[None, :] * sg_w,
                     mask=(ro[:, None] < COG) & (rl[None, :] < L), other=0.0)
        xt = tl.load(x_base[:, None] + (oh * SH)[None, :] * sx_h + (ow * SW)[None, :] * sx_w,
                     mask=(rk[:, None] < K) & (rl[None, :] < L), other=0.0)
        acc += _mm_nt(gt, xt, USE_DOT)
    total = tl.sum(tl.sum(acc * acc, axis=1), axis=0)
    tl.store(part_ptr + i * tl.num_programs(1) + pid, total)


def conv_weight_grad_sq_triton(x: torch.Tensor, g: torch.Tensor, kernel_size, stride, dilation,
                               groups: int) -> torch.Tensor:
    """Partial sums per program, then a sum over them. Inputs validated by the caller."""
    B, C = x.shape[:2]
    Co, OH, OW = g.shape[1:]
    KH, KW = kernel_size
    fp64 = x.dtype == torch.float64
    acc_dtype = torch.float64 if fp64 else torch.float32
    if B == 0 or Co == 0:
        return torch.zeros(B, dtype=acc_dtype, device=x.device)
    use_dot = 0 if fp64 else 2 if (x.dtype == torch.bfloat16 and triton_interpreting()) else 1
    cig, cog = C // groups, Co // groups
    K, L = cig * KH * KW, OH * OW
    BO = BK = 16 if fp64 else 32
    BT = 16 if fp64 else 32
    n_o, n_k = triton.cdiv(cog, BO), triton.cdiv(K, BK)
    part = torch.empty(B, groups * n_o * n_k, dtype=acc_dtype, device=x.device)
    conv_wgrad_sq_kernel[(B, groups * n_o * n_k)](
        x, g, part, cig, cog, K, L, OW, KH, KW, stride[0], stride[1], dilation[0], dilation[1],
        *x.stride(), *g.stride(), n_o, n_k,
        BO=BO, BK=BK, BT=BT, USE_DOT=use_dot, ACC=tl.float64 if fp64 else tl.float32)
    return part.sum(dim=1)
