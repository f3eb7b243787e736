"""The suite's one door to bnmem_kernels' per-sample gradient norms (the public fast API:
`bnmem_kernels.per_sample_grad_norms`, `bnmem_kernels.GradNormProbe`); every result records its source."""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

import bnmem_kernels

MODES = ("exact", "column", "detached", "eval")


def per_sample_ce(outputs, targets):
    """Per-sample cross-entropy [B] (the loss_fn handed to the kernels)."""
    return F.cross_entropy(outputs, targets, reduction="none")


def per_sample_grad_norms(model, x, y, mode: str) -> tuple[torch.Tensor, str]:
    """-> (norms [B], source): bnmem_kernels.per_sample_grad_norms of the per-sample cross-entropy.
    Exact mode with the engine chosen by the static rule on every call (not by timing): the same
    engine, hence the same rounding, in every run with the same seed."""
    if mode == "exact":
        from bnmem_kernels.norms.exact import exact_report
        norms, _ = exact_report(model, per_sample_ce, x, y, selection="static")
        return norms.detach(), "bnmem_kernels"
    return bnmem_kernels.per_sample_grad_norms(model, per_sample_ce, x, y, mode=mode).detach(), "bnmem_kernels"


class StepProbe:
    """Per-sample gradient norms of every training step from the training step's own backward
    (`bnmem_kernels.GradNormProbe`: no extra backward). The norms are those of the per-sample
    losses l_i (not l_i / B).
    """

    source = "GradNormProbe"

    def __init__(self, model, mode: str):
        self.model, self.mode = model, mode
        self.norms = None

    @contextlib.contextmanager
    def step(self, x, y):
        """Use around forward + backward of one step whose loss is the MEAN of the per-sample losses
        (GradNormProbe(reduction="mean") scales the recorded gradients back by B)."""
        with bnmem_kernels.GradNormProbe(self.model, mode=self.mode, reduction="mean") as probe:
            yield
        self.norms = probe.norms.detach()
