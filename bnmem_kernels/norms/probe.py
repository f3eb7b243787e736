"""GradNormProbe: per-sample gradient norms as a side effect of the user's own backward pass.

    with bnmem_kernels.GradNormProbe(model, mode="column", reduction="mean") as probe:
        loss = F.cross_entropy(model(x), y)           # mean over the batch
        loss.backward()                               # the user's ordinary backward
        optimizer.step()
    probe.norms        # [B]: ||d l_i / d theta|| per sample (column split, docs/math.md)
    probe.per_layer    # {parameter name: [B]}

Inside the block, forward hooks on every module that owns trainable parameters keep its input
(and normalization statistics) and put a tensor hook on its output that records the gradient
arriving there during the user's backward. The hooks return nothing, so the gradients, and the
user's .grad, are exactly what they would be without the probe; there is no second backward.
The norms are formed from those (A, G) pairs with the same per-layer rules as
`per_sample_grad_norms`, on first access (or at exit).

reduction: how the user's loss is formed from the per-sample losses l_i. "mean" (the default of
torch losses: loss = (1/B) sum_i l_i) -> the recorded gradients are 1/B of those of sum_i l_i and
the probe multiplies them by B; "sum" -> loss = sum_i l_i, used as is. The probe cannot tell the
two apart from the gradients, so say which; any other weighting is out of scope.
mode: "column" (model in train mode: BatchNorm with batch statistics; the norms are the column
split of the batch gradient) or "eval" (model in eval mode: running statistics; every sample is
independent and the norms are its exact per-sample gradient norms). The probe never changes the
training flag; a forward whose BatchNorm layers disagree with `mode` raises ValueError.
Each forward of the model inside the block starts a new step; the norms are those of the latest
forward + backward. Hooks are removed on exit, even on error.
"""
from __future__ import annotations

import torch
from torch import nn

from ._checks import check_parameters, trainable_parameters
from ._state import temporary_hooks
from .onepass import install_capture_hooks, model_plan, norms_from_captures, parameter_modules

PROBE_MODES = ("column", "eval")
REDUCTIONS = ("mean", "sum")


class GradNormProbe:
    """Context manager recording per-sample gradient norms during the user's own backward (module doc)."""

    def __init__(self, model: nn.Module, mode: str = "column", *, reduction: str = "mean", backend=None,
                 max_chunk=None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if mode not in PROBE_MODES:
            hint = (" (they change the backward itself: use bnmem_kernels.per_sample_grad_norms)"
                    if mode in ("exact", "detached") else "")
            raise ValueError(f"GradNormProbe mode must be one of {PROBE_MODES}, got {mode!r}{hint}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be 'mean' (loss = mean of per-sample losses) or 'sum', got {reduction!r}")
        if max_chunk is not None and (not isinstance(max_chunk, int) or max_chunk < 1):
            raise ValueError(f"max_chunk must be an int >= 1 or None, got {max_chunk!r}")
        if not trainable_parameters(model):
            raise ValueError("model has no parameters with requires_grad=True; there is no gradient to measure")
        parameter_modules(model)   # unknown layers (and tied weights) fail here, before the user's loop runs
        check_parameters(model, finite=False)   # a meta-device model: no values to measure
        self.model, self.mode, self.reduction = model, mode, reduction
        self.backend, self.max_chunk = backend, max_chunk
        self._handles_cm = None
        self._captures: list = []
        self._batch = None
        self._result = None

    # -- hooks -------------------------------------------------------------------------------
    def _check_mode(self):
        for name, m in model_plan(self.model).bns:      # the model's BatchNorms (cached plan)
            batch = m.training or m.running_mean is None
            if self.mode == "eval" and batch:
                raise ValueError(f"GradNormProbe(mode='eval') but BatchNorm {name!r} normalizes with batch "
                                 "statistics (train mode); call model.eval() or use mode='column'")
            if self.mode == "column" and not batch:
                raise ValueError(f"GradNormProbe(mode='column') but BatchNorm {name!r} is in eval mode "
                                 "(running statistics); call model.train() or use mode='eval'")

    def _pre_forward(self, module, args):
        if not torch.is_grad_enabled():
            return   # a no-grad forward (e.g. evaluation) has no backward: keep the latest step's norms
        self._check_mode()
        self._captures.clear()
        self._result = None
        first = args[0] if args else None
        self._batch = first.shape[0] if isinstance(first, torch.Tensor) and first.dim() else None

    def _on_output(self, cap, output):
        if output.requires_grad:
            def record(g, cap=cap):
                cap.grad = g if cap.grad is None else cap.grad + g
            output.register_hook(record)

    # -- context manager ---------------------------------------------------------------------
    def __enter__(self):
        self._handles_cm = temporary_hooks()
        handles = self._handles_cm.__enter__()
        try:
            handles.append(self.model.register_forward_pre_hook(self._pre_forward))
            self._captures = install_capture_hooks(self.model, self.mode, handles, tap=False,
                                                   on_output=self._on_output)
        except BaseException:
            self._handles_cm.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, exc_type, exc, tb):
        self._handles_cm.__exit__(exc_type, exc, tb)   # hooks removed, even on error
        if exc_type is None and self._result is None and self._ready():
            self._compute()
        self._captures = []                             # release activations
        return False

    # -- results -----------------------------------------------------------------------------
    def _ready(self):
        return bool(self._captures) and any(c.grad is not None for c in self._captures)

    def _compute(self):
        if self._batch is None:
            raise RuntimeError("GradNormProbe saw no forward of the model with a batched tensor input")
        scale = float(self._batch) if self.reduction == "mean" else 1.0
        with torch.no_grad():
            self._result = norms_from_captures(self.model, self._captures, self._batch, per_layer=True,
                                               backend=self.backend, max_chunk=self.max_chunk, scale=scale)
        return self._result

    def _get(self):
        if self._result is not None:
            return self._result
        if not self._ready():
            raise RuntimeError("GradNormProbe has no norms yet: run the model's forward and loss.backward() "
                               "inside the `with GradNormProbe(model) as probe:` block first")
        return self._compute()

    @property
    def norms(self) -> torch.Tensor:
        """[B] per-sample gradient norms of the latest forward + backward (parameter dtype)."""
        return self._get()[0]

    @property
    def per_layer(self) -> dict:
        """{parameter name: [B]} per-parameter per-sample norms."""
        return self._get()[1]
