"""Snapshot and restore everything a per-sample-norm call may touch on the user's model.

`preserved_model_state(model)` is a context manager: on exit (also on error) it puts back
- every module's `training` flag,
- every buffer's values (BN running_mean / running_var / num_batches_tracked, ...), in place,
- every parameter's `.grad` object (the same tensor, or None) — the engines never write `.grad`,
  this guards against a user's loss_fn or model that does,
- every module's hook dictionaries (forward, forward-pre, backward, backward-pre, state-dict hooks
  are left alone): any hook registered inside the block and not removed is dropped.
Parameter values are not copied (nothing in bnmem writes them); `check_params_unchanged`
is for tests.
"""
from __future__ import annotations

import contextlib

import torch

_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks",
               "_backward_pre_hooks")


class ModelSnapshot:
    """What `preserved_model_state` restores; also usable directly (take / restore)."""

    def __init__(self, model: torch.nn.Module):
        self.modules = list(model.modules())
        self.training = [m.training for m in self.modules]
        self.buffers = [(b, b.detach().clone()) for b in model.buffers()]
        self.grads = [(p, p.grad) for p in model.parameters()]
        self.hooks = [{k: dict(getattr(m, k)) for k in _HOOK_DICTS if hasattr(m, k)} for m in self.modules]
        self.full_backward = [getattr(m, "_is_full_backward_hook", None) for m in self.modules]

    def restore(self) -> None:
        for m, flag in zip(self.modules, self.training):
            if m.training != flag:        # (nn.Module.__setattr__ is slow: only where it changed)
                m.training = flag
        with torch.no_grad():
            for b, saved in self.buffers:
                if b.shape == saved.shape:
                    b.copy_(saved)
        for p, g in self.grads:
            if p.grad is not g:
                p.grad = g
        for m, saved, fb in zip(self.modules, self.hooks, self.full_backward):
            for k, d in saved.items():
                live = getattr(m, k)
                if live == d:
                    continue
                for key in [key for key in live if key not in d]:
                    del live[key]
                for key, v in d.items():
                    live[key] = v
            if hasattr(m, "_is_full_backward_hook"):
                m._is_full_backward_hook = fb


@contextlib.contextmanager
def preserved_model_state(model: torch.nn.Module):
    """Run the block, then restore training flags, buffers, `.grad` objects and hooks (see module doc)."""
    snap = ModelSnapshot(model)
    try:
        yield snap
    finally:
        snap.restore()


@contextlib.contextmanager
def temporary_hooks():
    """Collects hook handles (`handles.append(h)`) and removes them all on exit, even on error."""
    handles: list = []
    try:
        yield handles
    finally:
        for h in handles:
            h.remove()


def set_mode(model: torch.nn.Module, mode: str) -> None:
    """The training flag each mode runs under: "eval" -> model.eval(); the batch-statistics modes
    ("exact", "column", "detached") -> model.train() (BatchNorm normalizes with batch statistics).
    Callers restore the user's flags with `preserved_model_state`."""
    want = mode != "eval"
    if any(m.training != want for m in model.modules()):
        model.train(want)
