"""Leave-one-out influence of every sample on one SGD step: `loo_influence`.

One SGD step on the batch X = (x_1..x_B) moves the parameters by -eta * grad L(X), L(Y) the mean of
the per-sample losses (loss_fn, reduction none) on the batch Y, the model run as it is. Sample i's
influence on that step is how far the step moves when i is left out:

    infl_i = || grad L(X) - grad L(X without i) ||.

With BatchNorm in train mode, the batch without i is normalized with ITS OWN statistics, so leaving
i out changes every other sample's loss too; nothing short of B reduced forward+backward passes
gives the numbers (the reference, reference/loo_influence.py, is that loop). Without batch coupling
(GroupNorm / LayerNorm / no norm, or BatchNorm in eval mode) every l_j depends on x_j alone and

    grad L(X without i) = (B gbar - g_i) / (B - 1)   =>   infl_i = || g_i - gbar || / (B - 1),

g_i = grad l_i, gbar their mean: one pass, from ||g_i||^2 (ghost norms, rules.py), the per-layer
inner products <g_i, gbar> and ||gbar||^2. For a Linear/Conv layer <G_i^T A_i, D> = sum_t g_it^T D a_it,
i.e. the layer's forward with the weight D (no bias) dotted with G_i: no per-sample gradient is formed.

Routes (`loo_report` returns which ran and why; `loo_influence` the numbers only):
- "closed_form": the formula above. Taken when no BatchNorm uses batch statistics AND a check
  forward of the batch without sample 0 reproduces the other samples' losses (so no other module
  couples the samples), and every parameter module is a Linear, Conv1d/2d or BatchNorm/GroupNorm/
  LayerNorm.
- "stacked": the B reduced batches as groups of ONE batch of g * (B - 1) samples (g groups per
  pass, `max_chunk`); BatchNorm normalizes each group with that group's statistics (a torch
  function mode replaces F.batch_norm), everything else is per sample. One backward per pass to the
  outputs of the parameter modules; the per-group parameter gradients come from those output
  gradients G and the module inputs A (Linear: one bmm; Conv: torch's weight-gradient kernel with
  the groups folded into its channel groups; norm affine: sums of G * xhat), and only
  || grad L(X) - group gradient ||^2 per parameter is kept. Checked: the first group's losses must
  equal a direct forward of its reduced batch (else another module couples samples: next route).
- "vmap": torch.func.vmap over the removal index of torch.func.grad of the reduced-batch loss
  (BatchNorm's running statistics left out inside, dropout masks gathered by the index): any
  module with batching rules.
- "loop": the reference loop, for anything else.
"auto" tries them in that order. All give the loop's numbers up to rounding.

Dropout: every sample keeps one mask in every reduced batch (the full batch's, indexed; see
reference.loo_influence.DropoutReplay). The RNG state is restored on return, so the next forward
(e.g. the real training step) draws the masks the influence was computed with.
B = 1 raises ValueError (the batch without its only sample is empty). The model is left exactly
as it was: parameters, .grad, buffers (BatchNorm running statistics, num_batches_tracked),
training flags, hooks, RNG state.
"""
from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .norms._checks import check_call, check_losses, result_dtype, trainable_parameters
from .norms._state import preserved_model_state, temporary_hooks
from .reference.ghost_norm import accumulation_dtype
from .reference.loo_influence import (DropoutReplay, _rng_state, _set_rng_state, check_targets)

ROUTES = ("auto", "closed_form", "stacked", "vmap", "loop")
# bytes of activations one stacked pass may hold (groups per pass = budget / per-group estimate)
DEFAULT_BUDGET_MB = 256
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)
_KNOWN = (nn.Linear, nn.Conv1d, nn.Conv2d) + _NORMS


class _Refused(Exception):
    """This route does not apply to the model/call; the message says why (report["refused"])."""


# ------------------------------------------------------------------------------------------ the mode
class _LooMode(DropoutReplay):
    """DropoutReplay plus BatchNorm per group: with `groups = (g, m)` set, F.batch_norm in batch-statistics
    mode normalizes each of the g consecutive blocks of m samples with that block's own statistics;
    with `no_running = True` (the vmap route) it runs with batch statistics and no running statistics."""

    def __init__(self):
        super().__init__()
        self.groups = None
        self.no_running = False
        self.leaves: dict = {}     # id(BatchNorm parameter) -> its per-(group, channel) copy (stacked passes)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.batch_norm and (self.groups is not None or self.no_running):
            return self.batch_norm(*args, **kwargs)
        return super().__torch_function__(func, types, args, kwargs)

    def batch_norm(self, x, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1,
                   eps=1e-5):
        if not training:
            return F.batch_norm(x, running_mean, running_var, weight, bias, False, momentum, eps)
        if self.groups is None:
            return F.batch_norm(x, None, None, weight, bias, True, momentum, eps)
        g, m = self.groups
        # the stacked batch is sample-major (row k * g + group): [m * g, C, ...] viewed as [m, g * C, ...] is
        # one BatchNorm over g * C channels, each (group, channel) normalized over its own m samples
        xv = x.reshape(m, g * x.shape[1], *x.shape[2:])
        # gamma, beta repeated per group as leaves: the fused backward's weight gradient of the [m, g * C]
        # view is then every group's own dgamma / dbeta (asked for by the stacked pass)
        w, b = (None if t is None else self._leaf(t, g) for t in (weight, bias))
        return F.batch_norm(xv, None, None, w, b, True, momentum, eps).reshape(x.shape)

    def _leaf(self, t, g):
        leaf = t.detach().repeat(g)
        if t.requires_grad:
            self.leaves[id(t)] = leaf.requires_grad_()
        return leaf


# --------------------------------------------------------------------- per-sample / per-group grads
def _xhat(module, x, groups):
    """The normalized input of a norm layer as its forward computes it (fp of x)."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        C = x.shape[1]
        if module.training or module.running_mean is None:
            g, m = groups if groups is not None else (1, x.shape[0])
            xv = x.reshape(m, g * C, *x.shape[2:])          # sample-major groups (see _LooMode)
            return F.batch_norm(xv, None, None, None, None, True, 0.0, module.eps).reshape(x.shape)
        shape = [1, C] + [1] * (x.dim() - 2)
        return (x - module.running_mean.view(shape)) * torch.rsqrt(module.running_var.view(shape) + module.eps)
    if isinstance(module, nn.GroupNorm):
        xv = x.reshape(x.shape[0], module.num_groups, -1)
        var, mean = torch.var_mean(xv, dim=2, keepdim=True, correction=0)
        return ((xv - mean) * torch.rsqrt(var + module.eps)).reshape(x.shape)
    nd = len(module.normalized_shape)
    dims = tuple(range(x.dim() - nd, x.dim()))
    var, mean = torch.var_mean(x, dim=dims, keepdim=True, correction=0)
    return (x - mean) * torch.rsqrt(var + module.eps)


def _norm_affine(module, x, G, groups):
    """{local name: per-sample gradient [N, *shape]} of a norm layer's affine parameters."""
    xhat = _xhat(module, x, groups)
    N = x.shape[0]
    if isinstance(module, nn.LayerNorm):
        nd = len(module.normalized_shape)
        red = tuple(range(1, x.dim() - nd))
        gw = (G * xhat).sum(dim=red) if red else G * xhat
        gb = G.sum(dim=red) if red else G
    else:
        C = x.shape[1]
        gw = (G * xhat).reshape(N, C, -1).sum(2)
        gb = G.reshape(N, C, -1).sum(2)
    out = {}
    if getattr(module, "weight", None) is not None:
        out["weight"] = gw
    if getattr(module, "bias", None) is not None:
        out["bias"] = gb
    return out


def _conv_pad(module, x):
    """(x padded as the layer pads it unless zeros with int padding, padding for the kernel, 2-D shapes)."""
    nd = len(module.kernel_size)
    pad = [0, 0]
    if module.padding_mode == "zeros" and not isinstance(module.padding, str):
        pad = ([0] + list(module.padding)) if nd == 1 else list(module.padding)
    elif module.padding_mode != "zeros" or isinstance(module.padding, str):
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
    ks, st, dil = tuple(module.kernel_size), tuple(module.stride), tuple(module.dilation)
    if nd == 1:
        x, ks, st, dil = x.unsqueeze(2), (1,) + ks, (1,) + st, (1,) + dil
    return x, pad, ks, st, dil


def _conv_group_weight(module, x, G, g, m):
    """[g, *weight.shape]: per group, the sum of its m samples' weight gradients, by the weight-gradient
    kernel with the g groups folded into the conv's channel groups (sample-major rows: a free view)."""
    xp, pad, ks, st, dil = _conv_pad(module, x)
    if G.dim() == 3:
        G = G.unsqueeze(2)
    _, C, H, W = xp.shape
    Co, OH, OW = G.shape[1:]
    gr = module.groups
    xf = xp.reshape(m, g * C, H, W)
    Gf = G.reshape(m, g * Co, OH, OW)
    w = torch.empty(g * Co, C // gr, ks[0], ks[1], dtype=x.dtype, device=x.device)
    dw = torch.ops.aten.convolution_backward(Gf, xf, w, None, list(st), pad, list(dil), False, [0, 0], g * gr,
                                             [False, True, False])[1]
    return dw.reshape(g, *module.weight.shape)


def _group_grads(module, x, G, g, m, leaf_grads):
    """{local name: [g, *shape]} gradients of the g group losses (G already carries their 1/m).
    leaf_grads: id(BatchNorm parameter) -> [g * C] gradient of its per-group copy (_LooMode)."""
    local = _local(module)
    if local and all(id(p) in leaf_grads for p in local.values()):
        return {k: (torch.zeros(g, p.numel(), dtype=p.dtype, device=p.device) if leaf_grads[id(p)] is None
                    else leaf_grads[id(p)].reshape(g, -1)) for k, p in local.items()}
    if isinstance(module, nn.Linear):      # rows k * g + group: [m, g, T, d] -> per group [m T, d]
        a = x.reshape(m, g, -1, x.shape[-1]).transpose(0, 1).reshape(g, -1, x.shape[-1])
        gg = G.reshape(m, g, -1, G.shape[-1]).transpose(0, 1).reshape(g, -1, G.shape[-1])
        out = {"weight": torch.bmm(gg.transpose(1, 2), a)}
        if module.bias is not None:
            out["bias"] = gg.sum(1)
        return out
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        out = {"weight": _conv_group_weight(module, x, G, g, m)}
        if module.bias is not None:
            out["bias"] = G.reshape(m, g, G.shape[1], -1).sum(dim=(0, 3))
        return out
    per = _norm_affine(module, x, G, (g, m))
    return {k: v.reshape(m, g, *v.shape[1:]).sum(0) for k, v in per.items()}


def _sample_sq_and_inner(module, x, G, D):
    """Per sample: {local name: (||g_i||^2, <g_i, D>)} with g_i the column split G_i^T A_i (no coupling)."""
    from .norms import rules

    acc = accumulation_dtype(x.dtype)
    B = x.shape[0]
    out = {}
    if isinstance(module, _NORMS):
        for k, v in _norm_affine(module, x, G, None).items():
            v = v.reshape(B, -1).to(acc)
            out[k] = (v.square().sum(1), v @ D[k].reshape(-1).to(acc))
        return out
    sq = rules.rule_for(module).sq_norms(module, {"x": x}, G, None)
    if isinstance(module, nn.Linear):
        y = x @ D["weight"].t()                       # D a_it for every row
    else:
        y = module._conv_forward(x, D["weight"], None)  # sum_t g_it^T D a_it = <conv(x; D), G>
    out["weight"] = (sq["weight"], (y.to(acc) * G.to(acc)).reshape(B, -1).sum(1))
    if "bias" in sq:
        gb = G.reshape(B, -1, G.shape[-1]).sum(1) if isinstance(module, nn.Linear) else \
            G.reshape(B, G.shape[1], -1).sum(2)
        out["bias"] = (sq["bias"], gb.to(acc) @ D["bias"].to(acc))
    return out


# ------------------------------------------------------------------------------------ capture hooks
class _Capture:
    __slots__ = ("name", "module", "x", "grad", "tap", "live", "__weakref__")

    def __init__(self, name, module):
        self.name, self.module, self.x, self.grad, self.tap = name, module, None, None, None
        self.live = False   # its output required grad (so the backward should reach its tensor hook)


def _param_modules(model):
    return [(n, m) for n, m in model.named_modules() if any(p.requires_grad for p in m.parameters(recurse=False))]


def _record(cap, g):
    cap.grad = g if cap.grad is None else cap.grad + g


def _install(mods, handles, caps):
    """Forward hooks keeping each parameter module's input and the gradient at its output (a tensor hook
    registered at the forward: it sees d loss / d output as computed there, also if a later in-place op
    rewrites the output). A module at the bottom of the graph (its input needs no gradient) gets its
    output tapped by a zero leaf (out + z): the backward is asked for the taps only, so it never forms a
    weight gradient of the summed loss."""
    def make(name):
        def hook(module, args, output):
            if not isinstance(output, torch.Tensor) or not args or not isinstance(args[0], torch.Tensor):
                raise _Refused(f"module {name!r} does not map one tensor to one tensor")
            c = _Capture(name, module)
            c.x = args[0]
            caps.append(c)
            if not output.requires_grad:
                return None
            c.live = True
            if not args[0].requires_grad:
                c.tap = torch.zeros((), dtype=output.dtype, device=output.device).expand(output.shape).requires_grad_()
                output = output + c.tap
            output.register_hook(functools.partial(_record, c))
            return output if c.tap is not None else None
        return hook

    for n, m in mods:
        handles.append(m.register_forward_hook(make(n)))


def _backward(loss, caps, extra=()):
    """One backward of `loss` to the bottom taps and the leaves `extra`; fills every capture's .grad and
    returns the gradients of `extra`."""
    taps = [c.tap for c in caps if c.tap is not None]
    if not taps and not extra:
        raise _Refused("no module at the bottom of the graph to run the backward to")
    grads = torch.autograd.grad(loss, taps + list(extra), allow_unused=True)
    for c in caps:
        c.tap = None
    return grads[len(taps):]


def _unseen(c, leaf_grads=None):
    """Refuse when a module's output took part in the loss but its tensor hook never fired (an in-place op
    on a view output drops the hook): a zero there would be a silent wrong number."""
    if c.grad is None and c.live and not (leaf_grads and all(id(p) in leaf_grads for p in _local(c.module).values())):
        if any(True for _ in c.module.parameters(recurse=False)):
            raise _Refused(f"the gradient at the output of module {c.name!r} was not seen (an in-place op on a "
                           "view of it?)")


def _check_once(caps):
    seen = set()
    for c in caps:
        if c.name in seen:
            raise _Refused(f"module {c.name!r} runs more than once per forward")
        seen.add(c.name)


def _local(module):
    return {k: p for k, p in module.named_parameters(recurse=False) if p.requires_grad}


# ------------------------------------------------------------------------------------------ routes
def _closed_form(model, loss_fn, args, targets, B, names, D, acc, mode, losses_full):
    """infl_i^2 (B-1)^2 = ||g_i||^2 - 2 <g_i, gbar> + ||gbar||^2 per parameter, one capture pass."""
    mods = _param_modules(model)
    _require_known(mods, "closed-form")
    _coupling_check(model, loss_fn, args, targets, B, mode, losses_full, groups=False)
    pname = {id(p): n for n, p in model.named_parameters()}
    caps: list = []
    mode.replay(None)
    with temporary_hooks() as handles:
        _install(mods, handles, caps)
        losses = check_losses(loss_fn(model(*args), targets), B)
    _check_once(caps)
    _backward(losses.sum(), caps)
    sq = {n: torch.zeros(B, dtype=acc, device=D[n].device) + D[n].to(acc).square().sum() for n in names}
    with torch.no_grad():
        for c in caps:
            G = c.grad
            _unseen(c)
            if G is None:
                continue
            local = _local(c.module)
            Dl = {k: D[pname[id(p)]] * B for k, p in local.items()}     # grad of the sum of the losses
            for k, (s, inner) in _sample_sq_and_inner(c.module, c.x, G, Dl).items():
                if k in local:
                    n = pname[id(local[k])]
                    # ||g_i - gbar||^2 = ||g_i||^2 - 2 <g_i, Dsum> / B + ||gbar||^2 (gbar = D)
                    sq[n] = sq[n] + s.to(acc) - 2.0 * inner.to(acc) / B
    for n in names:
        sq[n] = sq[n].clamp_min(0) / float((B - 1) ** 2)
    return sq


def _require_known(mods, what):
    for n, m in mods:
        if not isinstance(m, _KNOWN):
            raise _Refused(f"module {n!r} ({type(m).__name__}) has no {what} rule here")
        if type(m).forward is not _base_forward(m):
            raise _Refused(f"module {n!r} ({type(m).__name__}) overrides its layer's forward")


def _base_forward(m):
    """The forward of the known layer type m is an instance of (BatchNorm: the shared _BatchNorm one)."""
    for base in type(m).__mro__:
        if base in (nn.Linear, nn.Conv1d, nn.Conv2d, nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm):
            return base.forward
    return None


def _keep_matrix(B, device):
    """[B, B-1]: row i = the samples of the batch without i."""
    idx = torch.arange(B, device=device)
    return idx.expand(B, B)[~torch.eye(B, dtype=torch.bool, device=device)].view(B, B - 1)


def _coupling_check(model, loss_fn, args, targets, B, mode, losses_full, groups, stacked_losses=None):
    """The losses of the batch without sample 0, by a direct forward (replayed masks), against the full
    batch's (groups=False: no coupling expected) or against the first group of a stacked pass."""
    keep = _keep_matrix(B, args[0].device)[0]
    mode.replay(keep)
    mode.groups = None
    with torch.no_grad():
        direct = loss_fn(model(*[a[keep] for a in args]), targets[keep.to(targets.device)])
    want = stacked_losses if groups else losses_full.detach()[1:]
    tol = torch.finfo(direct.dtype).eps ** 0.5
    if tuple(direct.shape) != (B - 1,) or not torch.allclose(direct, want, rtol=tol, atol=tol * float(
            want.abs().max().clamp_min(1))):
        raise _Refused("the losses of a reduced batch are not those of " +
                       ("its group in the stacked pass (a module other than BatchNorm couples the samples)"
                        if groups else "the full batch (the samples are coupled)"))


def _default_groups(caps, B, budget_mb):
    per_sample = sum(c.x[0].numel() * c.x.element_size() for c in caps if isinstance(c.x, torch.Tensor))
    per_group = max(1, 6 * per_sample * (B - 1))
    return max(1, min(B, (budget_mb << 20) // per_group))


def _stacked(model, loss_fn, args, targets, B, names, D, acc, mode, losses_full, max_chunk, report):
    mods = _param_modules(model)
    _require_known(mods, "per-group gradient")
    pname = {id(p): n for n, p in model.named_parameters()}
    keep_all = _keep_matrix(B, args[0].device)
    m = B - 1
    sq = {n: torch.zeros(B, dtype=acc, device=D[n].device) for n in names}
    budget = int(os.environ.get("BNMEM_LOO_BUDGET_MB", DEFAULT_BUDGET_MB))
    chunk = max_chunk
    checked = False
    s = 0
    while s < B:
        caps: list = []
        g = min(B - s, chunk or 2)      # the sizing pass (chunk None) does two groups
        keep = keep_all[s:s + g].t().reshape(-1)     # sample-major: row k * g + group
        mode.replay(keep)
        mode.groups = (g, m)
        mode.leaves = {}
        try:
            with temporary_hooks() as handles:
                _install(mods, handles, caps)
                losses = loss_fn(model(*[a[keep] for a in args]), targets[keep.to(targets.device)])
        finally:
            mode.groups = None
        check_losses(losses, g * m)
        _check_once(caps)
        if g > 1 and not checked:
            # a pass of one group is that reduced batch itself; with more, a module other than BatchNorm that
            # mixes samples would mix the groups: the first group's losses must be those of its own batch
            _coupling_check(model, loss_fn, args, targets, B, mode, losses_full, groups=True,
                            stacked_losses=losses.detach().view(m, g)[:, 0])
            checked = True
        if chunk is None:
            chunk = _default_groups(caps, B, budget)
        leaf_ids = list(mode.leaves)
        leaf_grads = dict(zip(leaf_ids, _backward(losses.sum() / m, caps, [mode.leaves[k] for k in leaf_ids])))
        mode.leaves = {}
        del losses
        with torch.no_grad():
            got = set()
            for c in caps:
                G = c.grad
                _unseen(c, leaf_grads)
                local = _local(c.module)
                # (a BatchNorm's gradients come from its per-group leaves: its output may be a view rewritten
                # in place by the next op, whose tensor hook then never fires)
                if G is None and not (local and all(id(p) in leaf_grads for p in local.values())):
                    continue
                for k, v in _group_grads(c.module, c.x, G, g, m, leaf_grads).items():
                    if k in local:
                        n = pname[id(local[k])]
                        got.add(n)
                        sq[n][s:s + g] = (D[n].to(acc) - v.to(acc)).reshape(g, -1).square().sum(1)
            for n in names:
                if n not in got:
                    sq[n][s:s + g] = D[n].to(acc).square().sum()
        del caps
        s += g
    report["groups_per_pass"] = chunk
    return sq


def _vmap(model, loss_fn, args, targets, B, names, D, acc, mode, max_chunk):
    from torch.func import functional_call, grad, vmap

    named = dict(trainable_parameters(model))
    params = {n: p.detach() for n, p in named.items()}
    buffers = dict(model.named_buffers())
    keep_all = _keep_matrix(B, args[0].device)
    tdev = targets.device

    def group_loss(p, keep):
        mode.replay(keep)
        # buffers as fresh copies made inside the transform: BatchNorm's num_batches_tracked += 1 is then
        # allowed (running statistics are not updated at all: the mode runs batch_norm without them)
        bufs = {n: b.clone() for n, b in buffers.items()}
        out = functional_call(model, {**p, **bufs}, tuple(a[keep] for a in args), strict=False)
        losses = loss_fn(out, targets[keep.to(tdev)])
        if losses.dim() != 1:
            raise _Refused("loss_fn output under vmap is not [B-1]")
        return losses.mean()

    gfn = vmap(grad(group_loss), in_dims=(None, 0))
    chunk = max_chunk or min(B, 16)
    sq = {n: torch.zeros(B, dtype=acc, device=D[n].device) for n in names}
    mode.no_running = True
    try:
        for s in range(0, B, chunk):
            gs = gfn(params, keep_all[s:s + chunk])
            for n in names:
                v = gs[n]
                sq[n][s:s + v.shape[0]] = (D[n].to(acc) - v.to(acc)).reshape(v.shape[0], -1).square().sum(1)
    except _Refused:
        raise
    except Exception as exc:   # an op without a batching rule, in-place on a captured tensor, ...
        raise _Refused(f"torch.func.vmap failed: {type(exc).__name__}: {str(exc)[:200]}") from exc
    finally:
        mode.no_running = False
    return sq


def _loop(model, loss_fn, args, targets, B, names, params, D, acc, mode):
    sq = {n: torch.zeros(B, dtype=acc, device=D[n].device) for n in names}
    keep_all = _keep_matrix(B, args[0].device)
    for i in range(B):
        keep = keep_all[i]
        mode.replay(keep)
        before = _rng_state(args[0].device)
        gi = torch.autograd.grad(check_losses(loss_fn(model(*[a[keep] for a in args]),
                                                      targets[keep.to(targets.device)]), B - 1).mean(),
                                 params, allow_unused=True)
        after = _rng_state(args[0].device)
        if not torch.equal(before[0], after[0]) or (before[1] is not None and not torch.equal(before[1], after[1])):
            raise ValueError("loo_influence: the model draws random numbers outside torch.nn.functional's dropout "
                             "functions; they cannot be kept per sample")
        for n, p, b in zip(names, params, gi):
            b = torch.zeros_like(p) if b is None else b
            sq[n][i] = (D[n].to(acc) - b.to(acc)).square().sum()
    return sq


def _batch_coupled(model):
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or m.running_mean is None)
               for m in model.modules())


def loo_report(model, loss_fn, inputs, targets, *, per_layer=False, backend=None, max_chunk=None, route="auto"):
    """Run loo_influence and return (result, report); report = {"route": the route that ran, "refused":
    {route: why it did not apply} for the routes "auto" tried before it, "groups_per_pass" (stacked)}.
    route: "auto" or one of "closed_form" | "stacked" | "vmap" | "loop" (raises ValueError if it does
    not apply)."""
    args, B = check_call(model, loss_fn, inputs, targets, "exact", max_chunk, per_layer)
    if route not in ROUTES:
        raise ValueError(f"route must be one of {ROUTES}, got {route!r}")
    if backend is not None and backend != "auto":
        from . import _backend
        if backend not in _backend.BACKENDS:
            raise ValueError(f"unknown backend={backend!r}; choose one of {_backend.BACKENDS} or 'auto'")
    if B < 2:
        raise ValueError("loo_influence needs B >= 2: the batch without its only sample is empty")
    check_targets(targets, B)
    named = trainable_parameters(model)
    names, params = [n for n, _ in named], [p for _, p in named]
    out_dtype = result_dtype(model)
    acc = accumulation_dtype(out_dtype)
    report = {"route": None, "refused": {}}
    rng = _rng_state(args[0].device)
    try:
        with preserved_model_state(model), torch.enable_grad(), _LooMode() as mode:
            losses = check_losses(loss_fn(model(*args), targets), B)      # records the dropout masks
            full = torch.autograd.grad(losses.mean(), params, allow_unused=True)
            D = {n: (torch.zeros_like(p) if g is None else g.detach()) for n, p, g in zip(names, params, full)}
            del full
            coupled = _batch_coupled(model)
            order = [route] if route != "auto" else (
                ["stacked", "vmap", "loop"] if coupled else ["closed_form", "stacked", "vmap", "loop"])
            sq = None
            for r in order:
                try:
                    if r == "closed_form":
                        if coupled:
                            raise _Refused("a BatchNorm uses batch statistics (the samples are coupled)")
                        sq = _closed_form(model, loss_fn, args, targets, B, names, D, acc, mode, losses)
                    elif r == "stacked":
                        sq = _stacked(model, loss_fn, args, targets, B, names, D, acc, mode, losses, max_chunk,
                                      report)
                    elif r == "vmap":
                        sq = _vmap(model, loss_fn, args, targets, B, names, D, acc, mode, max_chunk)
                    else:
                        sq = _loop(model, loss_fn, args, targets, B, names, params, D, acc, mode)
                    report["route"] = r
                    break
                except _Refused as exc:
                    if route != "auto":
                        raise ValueError(f"loo_influence route {r!r} does not apply: {exc}") from None
                    report["refused"][r] = str(exc)
    finally:
        _set_rng_state(rng)
    total = torch.stack(list(sq.values())).sum(0).sqrt().to(out_dtype)
    result = total if not per_layer else (total, {n: v.sqrt().to(out_dtype) for n, v in sq.items()})
    return result, report


def loo_influence(model, loss_fn, inputs, targets, *, per_layer=False, backend=None, max_chunk=None):
    """Leave-one-out influence of each sample on one SGD step (module doc for the math and routes).

    model: nn.Module, run as it is (train mode: BatchNorm with batch statistics, recomputed on each
    reduced batch); inputs: a tensor [B, ...] or a tuple of tensors (model(*inputs)); targets: a
    tensor [B, ...]; loss_fn(outputs, targets) -> per-sample losses [B] (reduction none).
    Returns infl [B] (infl_i = ||grad L(X) - grad L(X without i)||, L the mean loss) in the parameter
    dtype, or (infl, {parameter name: [B]}) with per_layer=True (infl^2 = sum of the squares).
    max_chunk: reduced batches per stacked/vmap pass (memory grows with it; None: sized from a
    budget of BNMEM_LOO_BUDGET_MB, default 256 MiB of activations). backend: validated only (all
    routes run PyTorch ops on the inputs' device). B must be >= 2.
    """
    return loo_report(model, loss_fn, inputs, targets, per_layer=per_layer, backend=backend,
                      max_chunk=max_chunk)[0]
