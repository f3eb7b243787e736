"""conv_weight_grad_sq: per-sample squared Frobenius norms of a Conv2d weight gradient, implicit im2col."""
from __future__ import annotations

import torch

from .. import _backend
from .._validate import require_same, require_tensor
from ..reference.conv_weight_grad_sq import conv_weight_grad_sq as _reference
from ..reference.ghost_norm import accumulation_dtype

OP = "conv_weight_grad_sq"


def _fake(x, grad_out, kernel_size, stride, dilation, groups):
    return x.new_empty(x.shape[0], dtype=accumulation_dtype(x.dtype))


def compiled_op():
    """torch.ops.bnmem.conv_weight_grad_sq (C++ CPU / CUDA), with its fake registered. Loads _C."""
    return _backend.compiled_op("conv_weight_grad_sq", _fake)


@torch.library.custom_op("bnmem::conv_weight_grad_sq_triton", mutates_args=())
def conv_weight_grad_sq_triton(x: torch.Tensor, grad_out: torch.Tensor, kernel_size: list[int], stride: list[int],
                               dilation: list[int], groups: int) -> torch.Tensor:
    from ..triton.conv_weight_grad_sq import conv_weight_grad_sq_triton as kernel

    return kernel(x, grad_out, kernel_size, stride, dilation, groups)


conv_weight_grad_sq_triton.register_fake(_fake)


def _compiled(x, grad_out, kernel_size, stride, dilation, groups):
    return compiled_op()(x, grad_out, kernel_size, stride, dilation, groups)


_backend.register(OP, {"cuda": _compiled, "triton": conv_weight_grad_sq_triton, "cpu": _compiled,
                       "reference": _reference})


def _pair(name, v):
    if isinstance(v, bool) or not isinstance(v, (int, tuple, list)):
        raise TypeError(f"{name} must be an int or a pair of ints, got {type(v).__name__}")
    v = (v, v) if isinstance(v, int) else tuple(v)
    if len(v) != 2 or not all(isinstance(e, int) and not isinstance(e, bool) for e in v):
        raise TypeError(f"{name} must be an int or a pair of ints, got {v!r}")
    if min(v) < 1:
        raise ValueError(f"{name} entries must be positive, got {v!r}")
    return [int(e) for e in v]


def _check(x, grad_out, kernel_size, stride, dilation, groups):
    require_tensor("x", x)
    require_tensor("grad_out", grad_out)
    require_same(("x", "grad_out"), (x, grad_out))
    ks, st, dil = _pair("kernel_size", kernel_size), _pair("stride", stride), _pair("dilation", dilation)
    if isinstance(groups, bool) or not isinstance(groups, int):
        raise TypeError(f"groups must be an int, got {type(groups).__name__}")
    if x.dim() != 4 or grad_out.dim() != 4:
        raise ValueError(f"x must be [B, C_in, Hp, Wp] and grad_out [B, C_out, OH, OW] (a Conv1d input as H = 1), "
                         f"got x {tuple(x.shape)} and grad_out {tuple(grad_out.shape)}")
    if x.shape[0] != grad_out.shape[0]:
        raise ValueError(f"x and grad_out must share B, got x {tuple(x.shape)} and grad_out {tuple(grad_out.shape)}")
    C, Co = x.shape[1], grad_out.shape[1]
    if groups < 1 or C % groups or Co % groups or C == 0:
        raise ValueError(f"groups must be positive and divide C_in = {C} and C_out = {Co}, got {groups}")
    expected = []
    for d in range(2):
        span = dil[d] * (ks[d] - 1) + 1
        expected.append((x.shape[2 + d] - span) // st[d] + 1 if x.shape[2 + d] >= span else 0)
    if min(expected) < 1 or list(grad_out.shape[2:]) != expected:
        raise ValueError(f"grad_out spatial size {tuple(grad_out.shape[2:])} does not match the conv of x "
                         f"{tuple(x.shape)} (already padded) with kernel_size {tuple(ks)}, stride {tuple(st)}, "
                         f"dilation {tuple(dil)}: expected {tuple(expected)} (each at least 1)")
    return ks, st, dil


def conv_weight_grad_sq(x: torch.Tensor, grad_out: torch.Tensor, kernel_size, stride=1, dilation=1,
                        groups: int = 1, *, backend: str | None = None) -> torch.Tensor:
    """Per-sample ||dW_i||_F^2 of a Conv2d weight gradient -> [B], without forming dW_i or im2col.

      dW_i[co, ci, kh, kw] = sum_{oh, ow} grad_out[i, co, oh, ow] x[i, g_ci, oh sh + kh dh, ow sw + kw dw]

    x: the layer input ALREADY PADDED as the layer pads it, [B, C_in, Hp, Wp] (a Conv1d input is the
    H = 1 case: x.unsqueeze(2), kernel (1, k)); grad_out: the gradient at the layer output [B, C_out,
    OH, OW], whose size must match the conv arithmetic. kernel_size, stride, dilation: int or pair;
    groups: the layer's groups (g_ci = the input channel ci of co's group). Any strides. fp64 inputs
    give fp64; fp32, fp16 and bf16 accumulate in and return fp32.
    `backend`: None (BNMEM_BACKEND or auto), "cuda", "triton", "cpu" or "reference".
    """
    ks, st, dil = _check(x, grad_out, kernel_size, stride, dilation, groups)
    return _backend.dispatch(OP, x.device, backend)(x, grad_out, ks, st, dil, groups)
