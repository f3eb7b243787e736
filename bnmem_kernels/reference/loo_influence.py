"""Reference leave-one-out influence: the loop of B reduced-batch passes (the tests' ground truth).

    loo_influence(model, loss_fn, inputs, targets, *, per_layer=False, backend=None, max_chunk=None)
        -> infl [B]  |  (infl [B], {parameter name: [B]})

infl_i = || grad L(X) - grad L(X without i) ||, L(Y) = the mean of loss_fn's per-sample losses on
the batch Y, the model run as it is (train mode: BatchNorm normalizes every batch, the reduced ones
too, with that batch's own statistics). One forward+backward on X, then one per reduced batch.

Dropout: a sample keeps ONE mask. `DropoutReplay` (a torch function mode) draws every dropout's
mask on the full batch and, on a reduced batch, uses the rows of the samples it keeps. The mask is
drawn on a tensor of ones through the very dropout function the model calls (so p, training,
channel-wise dropout2d and alpha dropout keep their meaning) and applied as x * mask (+ shift for
alpha dropout). Random ops other than the F.*dropout* functions are refused (the RNG state is
checked around every reduced pass). The RNG state is put back on return.
B = 1 is refused: the batch without its only sample is empty. The model is left exactly as it was
(training flags, buffers, .grad, hooks). `backend` and `max_chunk` are accepted and ignored.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..norms._checks import check_call, check_losses, result_dtype, trainable_parameters
from ..norms._state import preserved_model_state
from .ghost_norm import accumulation_dtype

_PLAIN = (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d)
_ALPHA = (F.alpha_dropout, F.feature_alpha_dropout)


def _arg(args, kwargs, pos, name, default):
    return kwargs[name] if name in kwargs else (args[pos] if len(args) > pos else default)


class DropoutReplay(TorchFunctionMode):
    """record(): every dropout call draws its mask on the batch and keeps it (in call order).
    replay(keep): call k uses the rows `keep` of the k-th recorded mask (keep: an index tensor of
    samples, flat [N] or, under torch.func.vmap, batched)."""

    def __init__(self):
        super().__init__()
        self.masks: list = []
        self.keep = None
        self.recording = True
        self.calls = 0

    def record(self):
        self.masks, self.recording, self.calls = [], True, 0

    def replay(self, keep):
        self.keep, self.recording, self.calls = keep, False, 0

    def dropout(self, func, args, kwargs):
        x = args[0] if args else kwargs["input"]
        p = _arg(args, kwargs, 1, "p", 0.5)
        training = _arg(args, kwargs, 2, "training", True)
        inplace = _arg(args, kwargs, 3, "inplace", False)
        if not training or p == 0:
            return x
        if self.recording:
            if x.dim() == 0:
                raise ValueError("leave-one-out influence: dropout on a 0-d tensor has no batch dimension")
            if func in _ALPHA:
                state = _rng_state(x.device)
                shift = func(torch.zeros_like(x), p, True, False)
                _set_rng_state(state)
                mask = (func(torch.ones_like(x), p, True, False) - shift, shift)
            else:
                mask = (func(torch.ones_like(x), p, True, False), None)
            self.masks.append(mask)
        else:
            if self.calls >= len(self.masks):
                raise ValueError("leave-one-out influence: a reduced-batch forward called dropout more often than "
                                 "the full-batch forward; the masks cannot be matched to samples")
            mask = tuple(m if m is None else m[self.keep] for m in self.masks[self.calls])
        self.calls += 1
        mult, shift = mask
        if mult.shape != x.shape:
            raise ValueError(f"leave-one-out influence: dropout input of shape {tuple(x.shape)} does not match "
                             f"its recorded mask {tuple(mult.shape)}; dropout must act on tensors with the "
                             "batch as dim 0")
        out = x.mul_(mult) if inplace else x * mult
        return out if shift is None else out + shift

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _PLAIN or func in _ALPHA:
            return self.dropout(func, args, kwargs)
        return func(*args, **kwargs)


def _rng_state(device):
    device = torch.device(device)
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda, device


def _set_rng_state(state):
    cpu, cuda, device = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


def check_targets(targets, B):
    if not isinstance(targets, torch.Tensor) or targets.dim() == 0 or targets.shape[0] != B:
        raise TypeError("leave-one-out influence needs targets as a tensor with the batch size "
                        f"B = {B} as dim 0 (each reduced batch drops one row)")


def reduced(args, targets, i):
    """(inputs, targets) of the batch without sample i."""
    B = args[0].shape[0]
    keep = torch.cat([torch.arange(i), torch.arange(i + 1, B)]).to(args[0].device)
    return keep, tuple(a[keep] for a in args), targets[keep.to(targets.device)]


def loo_influence(model, loss_fn, inputs, targets, *, per_layer=False, backend=None, max_chunk=None):
    """infl_i = ||grad L(X) - grad L(X without i)|| by B+1 forward+backward passes (module doc)."""
    args, B = check_call(model, loss_fn, inputs, targets, "exact", max_chunk, per_layer)
    if B < 2:
        raise ValueError("leave-one-out influence needs B >= 2 (the batch without its only sample is empty)")
    check_targets(targets, B)
    named = trainable_parameters(model)
    names, params = [n for n, _ in named], [p for _, p in named]
    acc = accumulation_dtype(result_dtype(model))
    rng = _rng_state(args[0].device)
    sq = {n: torch.zeros(B, dtype=acc, device=params[0].device) for n in names}
    try:
        with preserved_model_state(model), torch.enable_grad(), DropoutReplay() as drop:
            full = torch.autograd.grad(check_losses(loss_fn(model(*args), targets), B).mean(), params,
                                       allow_unused=True)
            for i in range(B):
                keep, xs, ts = reduced(args, targets, i)
                drop.replay(keep)
                before = _rng_state(args[0].device)
                gi = torch.autograd.grad(check_losses(loss_fn(model(*xs), ts), B - 1).mean(), params,
                                         allow_unused=True)
                if any(not torch.equal(a, b) for a, b in zip(before[:2], _rng_state(args[0].device)[:2])
                       if a is not None):
                    raise ValueError("leave-one-out influence: the model draws random numbers outside "
                                     "torch.nn.functional's dropout functions; they cannot be kept per sample")
                for n, p, a, b in zip(names, params, full, gi):
                    a = torch.zeros_like(p) if a is None else a
                    b = torch.zeros_like(p) if b is None else b
                    sq[n][i] = (a.to(acc) - b.to(acc)).square().sum()
    finally:
        _set_rng_state(rng)
    out_dtype = result_dtype(model)
    total = torch.stack(list(sq.values())).sum(0).sqrt().to(out_dtype)
    return total if not per_layer else (total, {n: v.sqrt().to(out_dtype) for n, v in sq.items()})
