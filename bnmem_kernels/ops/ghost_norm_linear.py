"""ghost_norm_linear: per-sample squared Frobenius norms of a linear layer's weight gradient."""
from __future__ import annotations

import torch

from .. import _backend
from .._validate import require_same, require_tensor
from ..reference import ghost_norm as ref

OP = "ghost_norm_linear"
_ROUTES = ("auto", "gram", "materialize")
GRAM, MATERIALIZE = 1, 2   # the route codes every backend takes (the C++ schema's `int route`)


def _fake(a, g, route):
    return a.new_empty(a.shape[0], dtype=ref.accumulation_dtype(a.dtype))


def compiled_op():
    """torch.ops.bnmem.ghost_norm_linear (C++ CPU / CUDA), with its fake registered. Loads _C."""
    return _backend.compiled_op("ghost_norm_linear", _fake)


@torch.library.custom_op("bnmem::ghost_norm_linear_triton", mutates_args=())
def ghost_norm_linear_triton(a: torch.Tensor, g: torch.Tensor, route: int) -> torch.Tensor:
    from ..triton.ghost_norm_linear import ghost_norm_linear_triton as kernel

    if route not in (GRAM, MATERIALIZE):
        raise ValueError(f"ghost_norm_linear_triton: route must be {GRAM} (gram) or {MATERIALIZE} (materialize), "
                         f"got {route}; bnmem_kernels.ghost_norm_linear(route='auto') picks one")
    return kernel(a, g, route == GRAM)


ghost_norm_linear_triton.register_fake(_fake)


def _compiled(a, g, route):
    return compiled_op()(a, g, route)


def _reference(a, g, route):
    return ref.ghost_norm_linear(a, g, "gram" if route == GRAM else "materialize")


_backend.register(OP, {"cuda": _compiled, "triton": ghost_norm_linear_triton, "cpu": _compiled,
                       "reference": _reference})


def route_code(route: str, T: int, d_in: int, d_out: int) -> int:
    """The route every backend takes: "auto" -> Gram when 2 T^2 < d_in d_out (ref.use_gram), else
    materialize; the one place the choice is made."""
    if route == "auto":
        return GRAM if ref.use_gram(T, d_in, d_out) else MATERIALIZE
    return GRAM if route == "gram" else MATERIALIZE


def _check(a, g, route):
    require_tensor("a", a)
    require_tensor("g", g)
    require_same(("a", "g"), (a, g))
    if a.dim() == 2 and g.dim() == 2:
        a, g = a.unsqueeze(1), g.unsqueeze(1)
    if a.dim() != 3 or g.dim() != 3:
        raise ValueError(f"a must be [B, T, d_in] and g [B, T, d_out] (or both 2-D for T = 1), "
                         f"got a {tuple(a.shape)} and g {tuple(g.shape)}")
    if a.shape[:2] != g.shape[:2]:
        raise ValueError(f"a and g must share B and T, got a {tuple(a.shape)} and g {tuple(g.shape)}")
    if route not in _ROUTES:
        raise ValueError(f"route must be one of {tuple(_ROUTES)}, got {route!r}")
    return a, g


def ghost_norm_linear(a: torch.Tensor, g: torch.Tensor, *, route: str = "auto",
                      backend: str | None = None) -> torch.Tensor:
    """Per-sample ||G_i^T A_i||_F^2 of a linear layer: a [B, T, d_in], g [B, T, d_out] -> [B].

    `a` holds each sample's input rows, `g` the gradient at the layer's output (T = 1 for a plain
    Linear; 2-D inputs are read as T = 1). The value is the squared norm of sample i's weight
    gradient, computed without forming it when the Gram route is cheaper (route="auto" takes the
    Gram route <G_i G_i^T, A_i A_i^T> when 2 T^2 < d_in d_out, else materializes G_i^T A_i).
    fp64 inputs give fp64; fp32, fp16 and bf16 inputs accumulate in and return fp32.
    `backend`: None (BNMEM_BACKEND or auto), "cuda", "triton", "cpu" or "reference".
    """
    a, g = _check(a, g, route)
    impl = _backend.dispatch(OP, a.device, backend)
    return impl(a, g, route_code(route, a.shape[1], a.shape[2], g.shape[2]))
