"""Reference per-sample gradient norms: plain autograd loops, the ground truth (docs/math.md, four modes).

per_sample_grad_norms(model, loss_fn, inputs, targets, *, mode="exact", per_layer=False,
                      backend=None, max_chunk=None)
    -> norms [B]  |  (norms [B], {parameter name: norms [B]})

- exact:    one forward in train mode (batch statistics), then for each i
            autograd.grad(l_i, params): g_i includes BN's cross-sample coupling.
- detached: one forward in train mode in which every BatchNorm's batch mean/var are detached
            (constants in the backward); then the same loop. GN/LN/IN stay differentiated.
- eval:     model.eval() (running statistics); the same loop.
- column:   one forward in train mode; G = d(sum_j l_j)/d(out) at every module that owns
            parameters; then, per module and sample, autograd.grad(out, module params,
            grad_outputs=G masked to sample i) = G_i^T A_i (the column split of .grad; for affine
            norm layers sum_t dy_it xhat_it and sum_t dy_it). Needs every parameter-owning module to
            be called once per forward with the batch as dim 0 of its output.
Only parameters with requires_grad count; total^2 = sum of per-parameter squares; norms are
accumulated in fp64 for fp64 parameters, fp32 otherwise, and returned in the parameter dtype.
`backend` and `max_chunk` are accepted for signature compatibility and ignored. The model is
left exactly as it was (training flags, buffers, .grad, hooks).
"""
from __future__ import annotations

import torch

from ..norms._checks import (check_call, check_losses, result_dtype, trainable_parameters)
from ..norms._state import preserved_model_state, set_mode, temporary_hooks
from .ghost_norm import accumulation_dtype


def _uses_batch_stats(bn: torch.nn.modules.batchnorm._BatchNorm) -> bool:
    return bn.training or bn.running_mean is None


def _detached_bn_hook(module, args, output):
    """Recompute a BatchNorm's output with its batch statistics detached (constants in backward)."""
    if not _uses_batch_stats(module):
        return output
    x = args[0]
    dims = [0] + list(range(2, x.dim()))
    shape = [1, -1] + [1] * (x.dim() - 2)
    mean = x.detach().mean(dim=dims)
    var = x.detach().var(dim=dims, unbiased=False)
    y = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + module.eps)
    if module.weight is not None:
        y = y * module.weight.view(shape) + module.bias.view(shape)
    return y


def _loop(losses, names, params, acc):
    B = losses.shape[0]
    sq = {n: torch.zeros(B, dtype=acc, device=losses.device) for n in names}
    for i in range(B):
        grads = torch.autograd.grad(losses[i], params, retain_graph=True, allow_unused=True)
        for n, g in zip(names, grads):
            if g is not None:
                sq[n][i] = g.to(acc).square().sum()
    return sq


def _column(model, loss_fn, args, targets, names, params, acc, B, keep=None):
    owners = [(mn, m) for mn, m in model.named_modules()
              if any(p.requires_grad for p in m.parameters(recurse=False))]
    outs: dict[str, list] = {mn: [] for mn, _ in owners}

    def make_hook(mn):
        def hook(module, a, output):
            outs[mn].append(output)
            return output.clone()   # later in-place ops (ReLU(inplace=True)) must not touch `output`
        return hook

    with temporary_hooks() as handles:
        for mn, m in owners:
            handles.append(m.register_forward_hook(make_hook(mn)))
        losses = check_losses(loss_fn(model(*args), targets), B)
    for mn, o in outs.items():
        if len(o) != 1:
            raise ValueError(f"reference column mode needs module {mn!r} to run exactly once per forward, "
                             f"it ran {len(o)} times")
    live = [(mn, m, outs[mn][0]) for mn, m in owners]
    grads_out = torch.autograd.grad(losses.sum(), [o for _, _, o in live], retain_graph=True,
                                    allow_unused=True)
    pname = {id(p): n for n, p in zip(names, params)}
    sq = {n: torch.zeros(B, dtype=acc, device=losses.device) for n in names}
    for (mn, m, out), G in zip(live, grads_out):
        mparams = [p for p in m.parameters(recurse=False) if p.requires_grad]
        if G is None:
            continue
        for i in range(B):
            Gi = torch.zeros_like(G)
            Gi[i] = G[i]
            gs = torch.autograd.grad(out, mparams, grad_outputs=Gi, retain_graph=True, allow_unused=True)
            for p, g in zip(mparams, gs):
                if g is not None:
                    sq[pname[id(p)]][i] = g.to(acc).square().sum()
                    if keep is not None:
                        keep.setdefault(pname[id(p)], torch.zeros((B,) + p.shape, dtype=p.dtype,
                                                                  device=p.device))[i] = g
    return sq


def column_per_sample_grads(model, loss_fn, inputs, targets):
    """The column split itself: {parameter name: [B, *shape]} with sum over dim 0 == .grad of
    sum_i l_i (train mode). Materializes B x P: for tests on small models only."""
    args, B = check_call(model, loss_fn, inputs, targets, "column", None)
    named = trainable_parameters(model)
    names = [n for n, _ in named]
    params = [p for _, p in named]
    keep: dict = {}
    with preserved_model_state(model), torch.enable_grad():
        set_mode(model, "column")
        _column(model, loss_fn, args, targets, names, params, accumulation_dtype(params[0].dtype), B, keep)
    return {n: keep.get(n, torch.zeros((B,) + p.shape, dtype=p.dtype, device=p.device)) for n, p in named}


def per_sample_grad_norms(model, loss_fn, inputs, targets, *, mode="exact", per_layer=False,
                          backend=None, max_chunk=None):
    """Per-sample gradient norms by autograd loops (see module doc for the four modes)."""
    args, B = check_call(model, loss_fn, inputs, targets, mode, max_chunk, per_layer)
    named = trainable_parameters(model)
    names = [n for n, _ in named]
    params = [p for _, p in named]
    out_dtype = result_dtype(model)
    acc = accumulation_dtype(out_dtype)
    with preserved_model_state(model), torch.enable_grad():
        set_mode(model, mode)
        if mode == "column":
            sq = _column(model, loss_fn, args, targets, names, params, acc, B)
        else:
            with temporary_hooks() as handles:
                if mode == "detached":
                    for name, m in model.named_modules():
                        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                            if type(m).forward is not torch.nn.modules.batchnorm._BatchNorm.forward:
                                raise ValueError(
                                    f"module {name!r} ({type(m).__name__}) overrides BatchNorm's forward; the "
                                    "reference detached mode recomputes torch's whole-batch BatchNorm only")
                            handles.append(m.register_forward_hook(_detached_bn_hook))
                losses = check_losses(loss_fn(model(*args), targets), B)
            sq = _loop(losses, names, params, acc)
    total = torch.stack(list(sq.values())).sum(0).sqrt().to(out_dtype)
    if not per_layer:
        return total
    return total, {n: v.sqrt().to(out_dtype) for n, v in sq.items()}
