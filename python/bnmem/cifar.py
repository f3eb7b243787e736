"""CIFAR-10 helpers around the suite's loader (data.py reads the python pickle batches):
training augmentations (random crop with zero padding + horizontal flip), LiRA's query
augmentations (horizontal flip x small shifts), a synthetic CIFAR-shaped batch writer for tests,
and the device / mixed-precision helpers of the GPU path.

Nothing here reads or downloads CIFAR-10 itself: `data._load_cifar10(folder)` is the one loader.
"""
from __future__ import annotations

import contextlib
import os
import pickle

import numpy as np
import torch

CIFAR_NAMES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)


# -- augmentations ---------------------------------------------------------------------------
def train_augment(x: torch.Tensor, generator: torch.Generator, *, pad: int = 4, flip: bool = True) -> torch.Tensor:
    """Standard CIFAR augmentation of a batch [B, C, H, W]: each image shifted by a random
    (dy, dx) in [-pad, pad]^2 with zero fill (= a random crop of the zero-padded image) and
    flipped left-right with probability 1/2. Deterministic in `generator`; returns a new tensor."""
    if x.dim() != 4:
        raise ValueError(f"x must be [B, C, H, W], got shape {tuple(x.shape)}")
    B, _, H, W = x.shape
    if pad < 0:
        raise ValueError(f"pad must be >= 0, got {pad}")
    out = x
    if pad:
        xp = torch.nn.functional.pad(x, (pad, pad, pad, pad))
        off = torch.randint(0, 2 * pad + 1, (B, 2), generator=generator)
        rows = (off[:, 0, None] + torch.arange(H)[None])                       # [B, H]
        cols = (off[:, 1, None] + torch.arange(W)[None])                       # [B, W]
        bi = torch.arange(B)[:, None, None]
        out = xp.permute(0, 2, 3, 1)[bi, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    if flip:
        f = torch.rand(B, generator=generator) < 0.5
        out = torch.where(f[:, None, None, None], out.flip(-1), out)
    return out.contiguous()


def query_augmentations(shifts: int, flip: bool = True) -> list:
    """LiRA's query set: (flip, dy, dx) for flip in {False, True} x the suite's shift list
    (identity first: augmentation 0 is always the plain image)."""
    from .query import shift_list  # lazy: query.py may import this module
    flips = (False, True) if flip else (False,)
    return [(f, dy, dx) for f in flips for dy, dx in shift_list(shifts)]


def apply_query_augmentation(x: torch.Tensor, aug) -> torch.Tensor:
    from .query import shift_images
    f, dy, dx = aug
    return shift_images(x.flip(-1) if f else x, dy, dx)


# -- synthetic CIFAR-shaped pickle batches (tests) --------------------------------------------
def write_synthetic_cifar(folder, n_per_batch: int = 20, seed: int = 0, names=CIFAR_NAMES) -> str:
    """Write CIFAR-10-format python pickle batches (uint8 data [n, 3072], labels list, bytes keys)
    with class-dependent images (learnable) into `folder`; returns the folder."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    protos = rng.integers(0, 256, size=(10, 3, 32, 32))
    for k, name in enumerate(names):
        labels = rng.integers(0, 10, n_per_batch)
        noise = rng.integers(-40, 41, size=(n_per_batch, 3, 32, 32))
        data = np.clip(protos[labels] + noise, 0, 255).astype(np.uint8).reshape(n_per_batch, 3072)
        batch = {b"batch_label": f"synthetic batch {k}".encode(), b"labels": labels.tolist(), b"data": data,
                 b"filenames": [f"img{k}_{i}.png".encode() for i in range(n_per_batch)]}
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump(batch, f, protocol=2)
    return str(folder)


# -- device and mixed precision ----------------------------------------------------------------
def resolve_device(device: str | None) -> torch.device:
    """"auto"/None -> cuda when available, else cpu; "cuda" without a GPU is an error (no silent CPU)."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    d = torch.device(device)
    if d.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but no CUDA GPU is available; use --device cpu")
    if d.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu, cuda or auto, got {device!r}")
    return d


def amp_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype for training: bf16 on GPUs that support it, else fp16; None on CPU
    (CPU training stays fp32 — autocast there would change the numbers of the CPU runs)."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast(device: torch.device):
    """Context for the forward + loss: autocast on CUDA (amp_dtype), a no-op on CPU."""
    dt = amp_dtype(device)
    if dt is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=dt)


def grad_scaler(device: torch.device):
    """A GradScaler for fp16 autocast (bf16 needs none); disabled (pass-through) otherwise."""
    return torch.amp.GradScaler("cuda", enabled=amp_dtype(device) == torch.float16)
