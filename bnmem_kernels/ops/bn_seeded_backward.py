"""bn_seeded_backward: BatchNorm's input gradient for single-sample losses (seeds), all samples at once."""
from __future__ import annotations

import torch

from .. import _backend
from .._validate import require_same, require_tensor
from ..reference.bn_seeded_backward import bn_seeded_backward as _reference

OP = "bn_seeded_backward"


def _fake(xhat, scale, dy, seeds):
    S, (B, C, T) = dy.shape[0], xhat.shape
    return xhat.new_empty(S, B, C, T), xhat.new_empty(S, C), xhat.new_empty(S, C)


def compiled_op():
    """torch.ops.bnmem.bn_seeded_backward (C++ CPU / CUDA), with its fake registered. Loads _C."""
    return _backend.compiled_op("bn_seeded_backward", _fake)


@torch.library.custom_op("bnmem::bn_seeded_backward_triton", mutates_args=())
def bn_seeded_backward_triton(xhat: torch.Tensor, scale: torch.Tensor, dy: torch.Tensor,
                              seeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from ..triton.bn_seeded_backward import bn_seeded_backward_triton as kernel

    return kernel(xhat, scale, dy, seeds)


bn_seeded_backward_triton.register_fake(_fake)


def _check(xhat, scale, dy, seeds):
    require_tensor("xhat", xhat)
    require_tensor("scale", scale)
    require_tensor("dy", dy)
    require_same(("xhat", "scale", "dy"), (xhat, scale, dy))
    if not isinstance(seeds, torch.Tensor):
        if not isinstance(seeds, (list, tuple, range)):
            raise TypeError(f"seeds must be an integer tensor or a list of sample indices, got {type(seeds).__name__}")
        seeds = torch.tensor(list(seeds), dtype=torch.int64, device=xhat.device)
    if seeds.is_floating_point() or seeds.is_complex() or seeds.dtype == torch.bool:
        raise TypeError(f"seeds must hold integer sample indices, got {seeds.dtype}")
    if seeds.device != xhat.device:
        raise ValueError(f"xhat is on {xhat.device} but seeds is on {seeds.device}; move them to one device")
    if xhat.dim() < 2:
        raise ValueError(f"xhat must be [B, C, *spatial], got shape {tuple(xhat.shape)}")
    B, C = xhat.shape[:2]
    if tuple(scale.shape) != (C,):
        raise ValueError(f"scale must be [C] = [{C}] (gamma / sigma per channel), got {tuple(scale.shape)}")
    if seeds.dim() != 1:
        raise ValueError(f"seeds must be 1-D [S], got shape {tuple(seeds.shape)}")
    if dy.dim() != xhat.dim() or dy.shape[1:] != xhat.shape[1:] or dy.shape[0] != seeds.shape[0]:
        raise ValueError(f"dy must be [S, C, *spatial] = [{seeds.shape[0]}, {', '.join(map(str, xhat.shape[1:]))}] "
                         f"(one upstream gradient per seed), got {tuple(dy.shape)}")
    if seeds.numel() and (int(seeds.min()) < 0 or int(seeds.max()) >= B):
        raise ValueError(f"seeds must be sample indices in [0, {B}), got values in "
                         f"[{int(seeds.min())}, {int(seeds.max())}]")
    return seeds.to(torch.int64)


def bn_seeded_backward(xhat: torch.Tensor, scale: torch.Tensor, dy: torch.Tensor, seeds, *,
                       backend: str | None = None):
    """BatchNorm (train mode) input gradients of single-sample losses, for every sample of the batch.

    xhat [B, C, *spatial] the BN's normalized input, scale [C] = gamma / sigma (1 / sigma without
    affine), dy [S, C, *spatial] the upstream gradient at the BN output of seed s's loss, which lives
    on sample i = seeds[s] only; seeds [S] sample indices. With M = B * prod(spatial):

        a_sc = (1/M) sum_t dy_sct,   b_sc = (1/M) sum_t dy_sct xhat_ict,
        dz_sjct = scale_c ([j = i] dy_sct - a_sc - xhat_jct b_sc)   for every sample j.

    Returns (dz [S, B, C, *spatial], a [S, C], b [S, C]) in the input dtype (accumulated in fp64
    for fp64, fp32 otherwise). `backend`: None (BNMEM_BACKEND or auto), "cuda", "triton", "cpu",
    "reference".
    """
    seeds = _check(xhat, scale, dy, seeds)
    B, C = xhat.shape[:2]
    spatial = tuple(xhat.shape[2:])
    T = 1
    for n in spatial:
        T *= n
    x3 = xhat.reshape(B, C, T)
    g3 = dy.reshape(dy.shape[0], C, T)
    chosen = _backend.select_backend(OP, xhat.device, backend)
    if chosen == "reference":
        dz, a, b = _reference(x3, scale, g3, seeds)
    elif chosen == "triton":
        dz, a, b = bn_seeded_backward_triton(x3, scale, g3, seeds)
    else:
        dz, a, b = compiled_op()(x3, scale, g3, seeds)
    return dz.reshape(dz.shape[0], B, C, *spatial), a, b
