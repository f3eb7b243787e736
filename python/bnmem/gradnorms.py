"""The suite's one door to bnmem_kernels' per-sample gradient norms.

Uses the public fast API (`bnmem_kernels.per_sample_grad_norms`, `bnmem_kernels.GradNormProbe`)
where it is available and falls back to `bnmem_kernels.reference.per_sample_grad_norms` (plain
autograd, same definitions) where it is not yet; every result records which one produced it.
"""
from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

MODES = ("exact", "column", "detached", "eval")


def per_sample_ce(outputs, targets):
    """Per-sample cross-entropy [B] (the loss_fn handed to the kernels)."""
    return F.cross_entropy(outputs, targets, reduction="none")


@functools.lru_cache(maxsize=None)
def fast_mode_available(mode: str) -> bool:
    """Does bnmem_kernels.per_sample_grad_norms implement `mode` (on a tiny BN model)?"""
    try:
        import bnmem_kernels
        fn = getattr(bnmem_kernels, "per_sample_grad_norms")
    except (ImportError, AttributeError):
        return False
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(8, 3))
    x = torch.randn(4, 1, 4, 4, generator=g)
    try:
        fn(model, per_sample_ce, x, torch.tensor([0, 1, 2, 0]), mode=mode)
    except NotImplementedError:
        return False
    return True


def probe_available() -> bool:
    try:
        import bnmem_kernels
        return hasattr(bnmem_kernels, "GradNormProbe")
    except ImportError:
        return False


def per_sample_grad_norms(model, x, y, mode: str) -> tuple[torch.Tensor, str]:
    """-> (norms [B], source) with source 'bnmem_kernels' or 'reference'."""
    if fast_mode_available(mode):
        import bnmem_kernels
        return bnmem_kernels.per_sample_grad_norms(model, per_sample_ce, x, y, mode=mode).detach(), "bnmem_kernels"
    from bnmem_kernels import reference
    return reference.per_sample_grad_norms(model, per_sample_ce, x, y, mode=mode).detach(), "reference"


class StepProbe:
    """Per-sample gradient norms of every training step, from the user's own backward.

    With `bnmem_kernels.GradNormProbe`: no extra backward. Without it (not landed yet): the
    reference function on the same batch before the step (B autograd calls; slow).
    The norms are those of the per-sample losses l_i (not l_i / B).
    """

    def __init__(self, model, mode: str):
        self.model, self.mode = model, mode
        self.source = "GradNormProbe" if probe_available() else "reference"
        self.norms = None

    @contextlib.contextmanager
    def step(self, x, y):
        """Use around forward + backward of one step whose loss is the MEAN of the per-sample losses
        (GradNormProbe(reduction="mean") scales the recorded gradients back by B)."""
        if self.source == "GradNormProbe":
            import bnmem_kernels
            with bnmem_kernels.GradNormProbe(self.model, mode=self.mode, reduction="mean") as probe:
                yield
            self.norms = probe.norms.detach()
        else:
            from bnmem_kernels import reference
            self.norms = reference.per_sample_grad_norms(self.model, per_sample_ce, x, y, mode=self.mode).detach()
            yield
