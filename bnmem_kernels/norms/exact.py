"""Exact per-sample gradient norms through BatchNorm's cross-sample coupling (mode="exact").

Placeholder until the exact engine lands: the one-pass engine calls `exact_per_sample_grad_norms`
for mode="exact".
"""
from __future__ import annotations


def exact_per_sample_grad_norms(model, loss_fn, inputs, targets, *, per_layer=False, backend=None,
                                max_chunk=None):
    raise NotImplementedError(
        "mode='exact' (exact per-sample gradient norms through BatchNorm's batch coupling) is not "
        "available yet; use bnmem_kernels.reference.per_sample_grad_norms(..., mode='exact') (the "
        "autograd loop) meanwhile")
