"""logit_confidence: c = z_y - logsumexp_{k != y} z_k = log(p_y / (1 - p_y)), fused over K."""
from __future__ import annotations

import torch

from .. import _backend
from .._validate import require_tensor

OP = "logit_confidence"


def out_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fake(logits, labels):
    return logits.new_empty(logits.shape[0], dtype=out_dtype(logits.dtype))


def compiled_op():
    """torch.ops.bnmem.logit_confidence (C++ CPU / CUDA) on [R, K] logits and [R] int64 labels."""
    return _backend.compiled_op("logit_confidence", _fake)


@torch.library.custom_op("bnmem::logit_confidence_triton", mutates_args=())
def logit_confidence_triton(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    from ..triton.lira import logit_confidence_triton as kernel

    return kernel(logits, labels)


logit_confidence_triton.register_fake(_fake)


def reference(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch on [R, K]: the max and the sum of exp over k != y, accumulated in fp32/fp64."""
    acc = out_dtype(logits.dtype)
    z = logits.to(acc)
    y = labels[:, None]
    zy = z.gather(1, y).squeeze(1)
    others = z.scatter(1, y, -torch.inf)
    return zy - torch.logsumexp(others, dim=1)


def _compiled(logits, labels):
    return compiled_op()(logits, labels)


_backend.register(OP, {"cuda": _compiled, "triton": logit_confidence_triton, "cpu": _compiled,
                       "reference": reference})


def logit_confidence(logits, labels, *, backend=None):
    require_tensor("logits", logits)
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be an integer torch.Tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor (class indices), got {labels.dtype}")
    if labels.device != logits.device:
        raise ValueError(f"logits are on {logits.device} but labels on {labels.device}")
    if logits.dim() < 1 or tuple(logits.shape[:-1]) != tuple(labels.shape):
        raise ValueError(f"logits must be [..., K] and labels [...] with the same leading shape, got "
                         f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)}")
    K = logits.shape[-1]
    if K < 2:
        raise ValueError(f"logit_confidence needs K >= 2 classes, got K = {K}")
    lead = labels.shape
    z = logits.reshape(-1, K)
    y = labels.reshape(-1).long()
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= K):
        raise ValueError(f"labels must lie in [0, {K}), got range [{int(y.min())}, {int(y.max())}]")
    return _backend.dispatch(OP, logits.device, backend)(z, y).reshape(lead)
