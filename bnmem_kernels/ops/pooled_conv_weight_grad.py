"""pooled_conv_weight_grad: Conv2d weight gradients of seeds whose output gradients sit on max-pool maxima."""
from __future__ import annotations

import torch

from .. import _backend
from .._validate import require_same, require_tensor
from ..reference.pooled_conv_weight_grad import pooled_conv_weight_grad as _reference
from .conv_weight_grad_sq import _pair

OP = "pooled_conv_weight_grad"


def _fake(x_pad, vals, idx, out_size, kernel_size, stride, dilation, groups):
    return x_pad.new_empty(vals.shape[1], vals.shape[0], x_pad.shape[1] // groups, *kernel_size)


def compiled_op():
    """torch.ops.bnmem.pooled_conv_weight_grad (C++ CPU / CUDA), with its fake registered. Loads _C."""
    return _backend.compiled_op(OP, _fake)


@torch.library.custom_op("bnmem::pooled_conv_weight_grad_triton", mutates_args=())
def pooled_conv_weight_grad_triton(x_pad: torch.Tensor, vals: torch.Tensor, idx: torch.Tensor, out_size: list[int],
                                   kernel_size: list[int], stride: list[int], dilation: list[int],
                                   groups: int) -> torch.Tensor:
    from ..triton.pooled_conv_weight_grad import pooled_conv_weight_grad_triton as kernel

    return kernel(x_pad, vals, idx, out_size, kernel_size, stride, dilation, groups)


pooled_conv_weight_grad_triton.register_fake(_fake)
_backend.register(OP, {"cuda": lambda *args: compiled_op()(*args), "triton": pooled_conv_weight_grad_triton,
                       "cpu": lambda *args: compiled_op()(*args), "reference": _reference})


def _check(x_pad, vals, idx, out_size, kernel_size, stride, dilation, groups):
    require_tensor("x_pad", x_pad)
    require_tensor("vals", vals)
    require_tensor("idx", idx, floating=False)
    require_same(("x_pad", "vals"), (x_pad, vals))
    require_same(("x_pad", "idx"), (x_pad, idx), dtype=False)
    if idx.dtype != torch.int64:
        raise TypeError(f"idx must be an int64 tensor, got {idx.dtype}")
    osz, ks = _pair("out_size", out_size), _pair("kernel_size", kernel_size)
    st, dil = _pair("stride", stride), _pair("dilation", dilation)
    if isinstance(groups, bool) or not isinstance(groups, int):
        raise TypeError(f"groups must be an int, got {type(groups).__name__}")
    if x_pad.dim() != 4:
        raise ValueError(f"x_pad must be [B, C_in, Hp, Wp], got {tuple(x_pad.shape)}")
    if vals.dim() != 4:
        raise ValueError(f"vals must be [C_out, N, B, P], got {tuple(vals.shape)}")
    if idx.dim() != 3:
        raise ValueError(f"idx must be [B, C_out, P], got {tuple(idx.shape)}")
    B, C = x_pad.shape[:2]
    Co, N, Bv, P = vals.shape
    if Bv != B:
        raise ValueError(f"vals must be [C_out, N, B, P] with B = {B} (x_pad's), got {tuple(vals.shape)}")
    if tuple(idx.shape) != (B, Co, P):
        raise ValueError(f"idx must be [B, C_out, P] = {(B, Co, P)} (from x_pad and vals), got {tuple(idx.shape)}")
    if groups < 1 or C == 0 or C % groups or Co % groups:
        raise ValueError(f"groups must be positive and divide C_in = {C} and C_out = {Co}, got {groups}")
    for d in range(2):
        span = dil[d] * (ks[d] - 1) + 1
        most = (x_pad.shape[2 + d] - span) // st[d] + 1 if x_pad.shape[2 + d] >= span else 0
        if osz[d] > most:
            raise ValueError(f"out_size {tuple(osz)} exceeds the conv output of x_pad {tuple(x_pad.shape)} (already "
                             f"padded) with kernel_size {tuple(ks)}, stride {tuple(st)}, dilation {tuple(dil)}: "
                             f"dimension {d} can be at most {most}")
    return osz, ks, st, dil


def _check_idx_range(idx, osz, chosen):
    """idx entries in [0, Ho*Wo). On CPU a ValueError with the range found. On a GPU without a host sync
    (the exact chain calls this op 8 times per step): the cuda backend checks inside its kernel, the
    others through an asynchronous device assert here; either fails the stream with this message, which
    the next synchronizing call reports. No backend reads through an out-of-range entry."""
    if not idx.numel() or idx.device.type == "meta":
        return
    n = osz[0] * osz[1]
    if idx.device.type == "cpu":
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= n:
            raise ValueError(f"idx entries must lie in [0, Ho*Wo) = [0, {n}), got min {lo}, max {hi}")
    elif chosen != "cuda":
        torch._assert_async(((idx >= 0) & (idx < n)).all(), f"pooled_conv_weight_grad: idx entries must lie in "
                            f"[0, Ho*Wo) = [0, {n})")


def pooled_conv_weight_grad(x_pad: torch.Tensor, vals: torch.Tensor, idx: torch.Tensor, out_size, kernel_size,
                            stride=1, dilation=1, groups: int = 1, *, backend: str | None = None) -> torch.Tensor:
    """Conv2d weight gradient of N seeds whose output gradients are nonzero at one position per (sample b,
    output channel o, pooled slot p) -- the maxima of a max pool after the conv -> dW [N, C_out, C_in/g, kh, kw]:

      dW[n, o, i, a, c] = sum_{b, p} vals[o, n, b, p] x_pad[b, g(o) C_in/g + i, oh sh + a dh, ow sw + c dw],
      (oh, ow) = divmod(idx[b, o, p], Wo)

    x_pad: the conv input ALREADY PADDED [B, C_in, Hp, Wp]; vals [C_out, N, B, P] (channel-major);
    idx [B, C_out, P] int64, flat positions oh*Wo + ow in the Ho x Wo conv output grid, the same for
    every seed (duplicates add); out_size (Ho, Wo) at most the conv output of x_pad. kernel_size,
    stride, dilation: int or pair; groups: the layer's groups (g(o) = o's group). Any strides, no
    unfolded or gathered copy of the input (compiled/Triton backends). Accumulates in fp64 for fp64,
    fp32 otherwise; returns the input dtype.
    `backend`: None (BNMEM_BACKEND or auto), "cuda", "triton", "cpu" or "reference".
    """
    osz, ks, st, dil = _check(x_pad, vals, idx, out_size, kernel_size, stride, dilation, groups)
    chosen = _backend.select_backend(OP, x_pad.device, backend)
    _check_idx_range(idx, osz, chosen)
    if chosen == "reference":
        return _reference(x_pad, vals, idx, osz, ks, st, dil, groups)
    if chosen == "triton":
        return pooled_conv_weight_grad_triton(x_pad, vals, idx, osz, ks, st, dil, groups)
    return compiled_op()(x_pad, vals, idx, osz, ks, st, dil, groups)
