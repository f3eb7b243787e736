"""Validation shared by every per-sample-gradient-norm entry point (engines and the reference).

Errors name the offending argument and what to do: TypeError for wrong types, ValueError for bad
values (unknown mode, empty batch, NaN/Inf inputs, a loss_fn that does not return [B], max_chunk < 1).
"""
from __future__ import annotations

import torch

MODES = ("exact", "column", "detached", "eval")


def as_input_tuple(inputs) -> tuple:
    """`inputs` as the positional arguments of `model(...)`: a tensor -> (tensor,); tuple/list as is."""
    if isinstance(inputs, torch.Tensor):
        return (inputs,)
    if isinstance(inputs, (tuple, list)) and inputs and all(isinstance(x, torch.Tensor) for x in inputs):
        return tuple(inputs)
    raise TypeError("inputs must be a torch.Tensor or a non-empty tuple/list of tensors (passed to "
                    f"model(*inputs)), got {type(inputs).__name__}")


def _nonfinite(name: str, x: torch.Tensor) -> None:
    if not (x.is_floating_point() or x.is_complex()):
        return
    if x.numel() and bool(torch.isfinite(x.sum())):   # one read, no mask: NaN/Inf always reach the sum
        return
    finite = torch.isfinite(x)
    if bool(finite.all()):
        return
    nan = torch.isnan(x)
    kinds = []
    if bool(nan.any()):
        kinds.append(f"NaN ({int(nan.sum())} entries)")
    inf = ~finite & ~nan
    if bool(inf.any()):
        kinds.append(f"Inf ({int(inf.sum())} entries)")
    bad = (~finite).reshape(x.shape[0], -1).any(dim=1).nonzero().flatten()[:8].tolist() if x.dim() else []
    raise ValueError(f"{name} contains {' and '.join(kinds)}" + (f", in samples {bad}" if bad else "")
                     + "; per-sample gradient norms need finite inputs")


def check_call(model, loss_fn, inputs, targets, mode, max_chunk, per_layer=False) -> tuple:
    """Validate the public arguments; returns (inputs as a tuple, batch size B)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable as loss_fn(outputs, targets) -> per-sample losses [B], "
                        f"got {type(loss_fn).__name__}")
    if not isinstance(mode, str) or mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if max_chunk is not None:
        if isinstance(max_chunk, bool) or not isinstance(max_chunk, int):
            raise TypeError(f"max_chunk must be an int >= 1 or None, got {type(max_chunk).__name__}")
        if max_chunk < 1:
            raise ValueError(f"max_chunk must be >= 1 (or None for no limit), got {max_chunk}")
    if not isinstance(per_layer, bool):
        raise TypeError(f"per_layer must be a bool, got {type(per_layer).__name__}")
    args = as_input_tuple(inputs)
    B = args[0].shape[0] if args[0].dim() else None
    if B is None:
        raise ValueError("inputs must have a leading batch dimension, got a 0-d tensor")
    if B == 0:
        raise ValueError("inputs is an empty batch (B = 0); per-sample gradient norms need B >= 1")
    for k, x in enumerate(args):
        if x.dim() == 0 or x.shape[0] != B:
            raise ValueError(f"every input must have the batch size B = {B} as dim 0; inputs[{k}] has shape "
                             f"{tuple(x.shape)}")
        _nonfinite("inputs" if len(args) == 1 else f"inputs[{k}]", x)
    if isinstance(targets, torch.Tensor):
        if targets.dim() == 0 or targets.shape[0] != B:
            raise ValueError(f"targets must have the batch size B = {B} as dim 0, got shape {tuple(targets.shape)}")
        _nonfinite("targets", targets)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("model has no parameters with requires_grad=True; there is no gradient to measure")
    check_parameters(model)
    return args, B


def check_parameters(model, *, finite: bool = True) -> None:
    """The model's parameters hold finite values on a real device: a meta-device parameter has no
    values at all, and a NaN/Inf weight makes every norm NaN. Raises ValueError naming the parameter.
    finite=False: only the meta-device check (GradNormProbe, built once before a training loop)."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad or p.is_floating_point()]
    meta = [n for n, p in params if p.is_meta]
    if meta:
        raise ValueError(f"model parameter {meta[0]!r}" + (f" (and {len(meta) - 1} more)" if len(meta) > 1 else "")
                         + " is on the meta device: it has a shape but no values; materialize the model first "
                         "(e.g. model.to_empty(device='cpu') and load its weights)")
    floats = [p for _, p in params if p.is_floating_point()]
    if not floats or not finite:
        return
    with torch.no_grad():
        if bool(torch.isfinite(torch.stack([p.detach().sum().to(torch.float64) for p in floats]).sum())):
            return   # NaN/Inf always reach a sum (an overflow to Inf of finite values is checked below)
    for n, p in params:
        if not p.is_floating_point():
            continue
        finite = torch.isfinite(p.detach())
        if not bool(finite.all()):
            nan = int(torch.isnan(p.detach()).sum())
            kinds = " and ".join(k for k in (f"NaN ({nan} entries)" if nan else "",
                                             f"Inf ({int((~finite).sum()) - nan} entries)"
                                             if int((~finite).sum()) > nan else "") if k)
            raise ValueError(f"model parameter {n!r} contains {kinds}; every per-sample gradient norm of such a "
                             "model is NaN: check the training that produced these weights")


def check_no_tied_parameters(owners) -> None:
    """owners: (module path, module) pairs whose own parameters enter the per-sample norms. A parameter
    owned by two modules (tied weights) gets a per-sample gradient that is the SUM of both modules'
    contributions; the one-pass rules give each module's squared norm, and adding those drops the
    cross term. Raises ValueError naming the shared parameter (mode="exact" handles tied weights)."""
    seen = {}
    for path, module in owners:
        for pname, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            full = f"{path}.{pname}" if path else pname
            if id(p) in seen and seen[id(p)][0] != path:
                raise ValueError(f"parameter {seen[id(p)][1]!r} is shared with {full!r} (tied weights: one "
                                 f"nn.Parameter used by modules {seen[id(p)][0]!r} and {path!r}); column/detached/"
                                 "eval norms and GradNormProbe add each module's squared norm and would drop the "
                                 "cross term between them. Use mode='exact', or untie the weights")
            seen.setdefault(id(p), (path, full))


def check_losses(losses, B: int) -> torch.Tensor:
    """loss_fn must return per-sample losses: a tensor of shape [B] (reduction='none')."""
    if not isinstance(losses, torch.Tensor):
        raise TypeError(f"loss_fn must return a tensor of per-sample losses [B], got {type(losses).__name__}")
    if tuple(losses.shape) != (B,):
        hint = " (did you use reduction='mean'/'sum'? use reduction='none')" if losses.dim() == 0 else ""
        raise ValueError(f"loss_fn must return per-sample losses of shape [{B}] (one per sample), got shape "
                         f"{tuple(losses.shape)}{hint}")
    if not losses.requires_grad:
        raise ValueError("loss_fn returned losses that do not depend on the model's parameters "
                         "(requires_grad is False); compute them from the outputs it is given")
    return losses


def trainable_parameters(model) -> list[tuple[str, torch.nn.Parameter]]:
    """named_parameters() with requires_grad, in model order (the per_layer keys)."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def result_dtype(model) -> torch.dtype:
    """The dtype of the returned norms: that of the (first trainable) parameter."""
    return trainable_parameters(model)[0][1].dtype
