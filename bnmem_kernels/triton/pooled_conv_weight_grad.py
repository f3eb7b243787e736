"""Triton kernel for pooled_conv_weight_grad: Conv2d weight gradients of N seeds whose output gradients
sit at one position per (sample b, output channel o, pooled slot p).

Program (o, k-block) forms dW[:, o, k-block] (k = (i, a, c), the window entries of o's group): for each
block of BN seeds, acc[BN, BK] = sum over blocks of BJ maxima j = (b, p) of vals[o, n, b, p] (a [BN, BJ]
tile) times the windows x_pad[b, g(o) Cig + i, oh sh + a dh, ow sw + c dw] (a [BK, BJ] tile read at
the maxima straight from x_pad: no unfolded or gathered copy), by tl.dot (fp64: broadcast-and-reduce).
Strided inputs are read in place. Accumulates in fp32 (fp64 for fp64); stores the input dtype.
"""
import torch
import triton
import triton.language as tl

from .._backend import triton_interpreting
from .ghost_norm_linear import _mm_nt


@triton.jit
def pooled_wgrad_kernel(x_ptr, v_ptr, i_ptr, out_ptr, N, BP, P, CIG, COG, K, WO, HOWO, KH, KW, SH, SW, DH, DW,
                        sx_b, sx_c, sx_h, sx_w, sv_o, sv_n, sv_b, sv_p, si_b, si_o, si_p, so_n, so_o,
                        BN: tl.constexpr, BK: tl.constexpr, BJ: tl.constexpr,
                        USE_DOT: tl.constexpr, ACC: tl.constexpr):
    o = tl.program_id(0)
    rk = tl.program_id(1) * BK + tl.arange(0, BK)
    grp = o // COG
    ci = rk // (KH * KW)
    a = (rk // KW) % KH
    c = rk % KW
    x_k = x_ptr + (grp * CIG + ci).to(tl.int64) * sx_c + a * DH * sx_h + c * DW * sx_w         # [BK]
    km = rk < K
    for n0 in range(0, N, BN):
        rn = n0 + tl.arange(0, BN)
        nm = rn < N
        acc = tl.zeros((BN, BK), dtype=ACC)
        for j0 in range(0, BP, BJ):
            rj = j0 + tl.arange(0, BJ)
            jm = rj < BP
            b = (rj // P).to(tl.int64)
            p = rj % P
            pos = tl.load(i_ptr + b * si_b + o * si_o + p * si_p, mask=jm, other=0)
            jm = jm & (pos >= 0) & (pos < HOWO)   # never read through an out-of-range entry (the op asserts)
            oh = pos // WO
            ow = pos % WO
            x_j = b * sx_b + oh * SH * sx_h + ow * SW * sx_w                                        # [BJ]
            xt = tl.load(x_k[:, None] + x_j[None, :], mask=km[:, None] & jm[None, :], other=0.0)   # [BK, BJ]
            vt = tl.load(v_ptr + o * sv_o + rn[:, None] * sv_n + (b * sv_b + p * sv_p)[None, :],
                         mask=nm[:, None] & jm[None, :], other=0.0)                                # [BN, BJ]
            acc += _mm_nt(vt, xt, USE_DOT)
        tl.store(out_ptr + rn[:, None] * so_n + o * so_o + rk[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=nm[:, None] & km[None, :])


def pooled_conv_weight_grad_triton(x_pad: torch.Tensor, vals: torch.Tensor, idx: torch.Tensor, out_size,
                                   kernel_size, stride, dilation, groups: int) -> torch.Tensor:
    """dW [N, C_out, C_in/g, kh, kw] in x_pad's dtype. Inputs validated by the caller."""
    B, C = x_pad.shape[:2]
    Co, N, _, P = vals.shape
    KH, KW = kernel_size
    cig, cog = C // groups, Co // groups
    K = cig * KH * KW
    out = torch.empty(N, Co, cig, KH, KW, dtype=x_pad.dtype, device=x_pad.device)
    if out.numel() == 0:
        return out
    if B * P == 0:
        return out.zero_()
    fp64 = x_pad.dtype == torch.float64
    use_dot = 0 if fp64 else 2 if (x_pad.dtype == torch.bfloat16 and triton_interpreting()) else 1
    BN = 16
    BK = 16 if fp64 else 32
    BJ = 16 if fp64 else 32
    pooled_wgrad_kernel[(Co, triton.cdiv(K, BK))](
        x_pad, vals, idx, out, N, B * P, P, cig, cog, K, out_size[1], out_size[0] * out_size[1], KH, KW,
        stride[0], stride[1],
        dilation[0], dilation[1], *x_pad.stride(), *vals.stride(), *idx.stride(), out.stride(0), out.stride(1),
        BN=BN, BK=BK, BJ=BJ, USE_DOT=use_dot, ACC=tl.float64 if fp64 else tl.float32)
    return out
