"""Checks shared by the public ops: bad input fails early with a message naming the argument."""
from __future__ import annotations

import torch


def require_tensor(name: str, x, *, floating: bool = True) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if floating and not x.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor (fp16, bf16, fp32, fp64), got {x.dtype}")
    return x


def require_same(names: tuple[str, ...], tensors: tuple[torch.Tensor, ...], *, dtype=True, device=True):
    first = tensors[0]
    for n, t in zip(names[1:], tensors[1:]):
        if device and t.device != first.device:
            raise ValueError(f"{names[0]} is on {first.device} but {n} is on {t.device}; move them to one device")
        if dtype and t.dtype != first.dtype:
            raise TypeError(f"{names[0]} is {first.dtype} but {n} is {t.dtype}; cast them to one dtype")
