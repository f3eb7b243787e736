"""norm_affine_grad_sq: per-sample squared norms of a normalization layer's gamma and beta gradients."""
from __future__ import annotations

import torch

from .. import _backend
from .._validate import require_same, require_tensor
from ..reference import norm_affine as ref
from ..reference.ghost_norm import accumulation_dtype

OP = "norm_affine_grad_sq"


def _fake(x, dy, mean, rstd):
    return x.new_empty(x.shape[0], 2, dtype=accumulation_dtype(x.dtype))


def compiled_op():
    """torch.ops.bnmem.norm_affine_grad_sq (C++ CPU / CUDA), with its fake registered. Loads _C."""
    return _backend.compiled_op("norm_affine_grad_sq", _fake)


@torch.library.custom_op("bnmem::norm_affine_grad_sq_triton", mutates_args=())
def norm_affine_grad_sq_triton(x: torch.Tensor, dy: torch.Tensor, mean: torch.Tensor,
                               rstd: torch.Tensor) -> torch.Tensor:
    from ..triton.norm_affine_grad_sq import norm_affine_grad_sq_triton as kernel

    return kernel(x, dy, mean, rstd)


norm_affine_grad_sq_triton.register_fake(_fake)


def _compiled(x, dy, mean, rstd):
    return compiled_op()(x, dy, mean, rstd)


_backend.register(OP, {"cuda": _compiled, "triton": norm_affine_grad_sq_triton, "cpu": _compiled,
                       "reference": ref.norm_affine_grad_sq})


def _check(x, dy, mean, rstd):
    for n, t in (("x", x), ("dy", dy), ("mean", mean), ("rstd", rstd)):
        require_tensor(n, t)
    require_same(("x", "dy"), (x, dy))
    require_same(("x", "mean", "rstd"), (x, mean, rstd), dtype=False)
    if x.dim() != 3 or dy.shape != x.shape:
        raise ValueError(f"x and dy must both be [B, C, S], got x {tuple(x.shape)} and dy {tuple(dy.shape)}")
    acc = accumulation_dtype(x.dtype)
    out = []
    for n, t in (("mean", mean), ("rstd", rstd)):
        try:
            out.append(t.to(acc).expand(x.shape))
        except RuntimeError:
            raise ValueError(f"{n} must broadcast to x's shape [B, C, S] = {tuple(x.shape)}, got "
                             f"{tuple(t.shape)}") from None
    return out


def norm_affine_grad_sq(x: torch.Tensor, dy: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, *,
                        backend: str | None = None) -> torch.Tensor:
    """Per-sample (||dgamma_i||^2, ||dbeta_i||^2) of a normalization layer -> [B, 2].

    x, dy: [B, C, S] (the layer's input and the gradient at its output; C indexes gamma/beta, S the
    positions summed over; any strides). mean, rstd: the layer's statistics, broadcastable to
    [B, C, S] (BN [1, C, 1], IN/GN [B, C, 1], LN [B, 1, S]). Computes, recomputing xhat on the fly,
      dgamma_i[c] = sum_s dy_ics (x_ics - mean) rstd,  dbeta_i[c] = sum_s dy_ics,
    and returns their squared norms over c. fp64 in -> fp64 out; fp32/bf16/fp16 accumulate in and
    return fp32. `backend`: None (BNMEM_BACKEND or auto), "cuda", "triton", "cpu" or "reference".
    """
    mean, rstd = _check(x, dy, mean, rstd)
    return _backend.dispatch(OP, x.device, backend)(x, dy, mean, rstd)
