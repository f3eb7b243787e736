"""The one-pass engine: per-sample gradient norms for mode="column" | "detached" | "eval" from ONE
backward pass of sum_i l_i, and the public `per_sample_grad_norms` (mode="exact" goes to exact.py).

How (docs/math.md, "Ghost norms"): forward hooks on every module that owns trainable parameters keep
its input A (and the statistics of normalization layers) and register a tensor hook on its output
that records G = d(sum_i l_i)/d out when the backward passes. `torch.autograd.grad(sum_i l_i,
taps)` runs the one backward, where the taps are, for each module at the bottom of the graph (its
input needs no gradient), its smallest parameter (a bias: one reduction) or, when that parameter is
large, a zero leaf added to its output. The backward must go through every module above a tap but
computes no other parameter gradient, so it skips the weight-gradient GEMMs (all but at most the
bottom layers'), and it never touches the user's `.grad` (autograd.grad returns, not accumulates). Each layer's rule (rules.py, one table)
turns (A, G) into per-sample squared norms of its parameters without a B x P tensor (ghost norms;
per-sample affine sums for normalization layers). Tensor hooks registered at the forward see the
gradient of the output as computed there, also when a later in-place op (ReLU(inplace=True))
rewrites it.

Modes: "column" and "detached" run the model in train mode (BatchNorm with batch statistics),
"eval" in eval mode (running statistics); "detached" computes each BatchNorm's output with its
batch statistics detached (rules.BatchNormRule.patch_detached). The model's training flags,
buffers (running stats, num_batches_tracked), .grad and hooks are restored on return (_state).
"""
from __future__ import annotations

import contextlib
import functools
import weakref

import torch
from torch import nn

from ..reference.ghost_norm import accumulation_dtype
from . import rules as _rules
from ._checks import check_call, check_losses, check_no_tied_parameters
from ._state import _HOOK_DICTS, ModelSnapshot, temporary_hooks


class LayerCapture:
    """What the forward hook saw at one module call (rule state + the tap on its output)."""

    __slots__ = ("name", "module", "rule", "state", "tap", "grad", "bottom")

    def __init__(self, name, module, rule, state, tap):
        self.name, self.module, self.rule, self.state, self.tap = name, module, rule, state, tap
        self.grad = None
        self.bottom = None   # (output, its version at the hook) for a bottom module tapped by a parameter


def parameter_modules(model: nn.Module):
    """[(module path, module, rule)] for every module that owns trainable parameters directly.
    Raises rules.UnsupportedModuleError (naming path, type and the supported types) for a module
    without a rule."""
    return list(model_plan(model).pmods)


class ModelPlan:
    """What the one-pass engine reads off a model that does not change between calls on the same model
    (cached by `model_plan`): the modules, the trainable parameters and their names, the modules that
    own them with their rules, the BatchNorm modules, the buffers."""

    __slots__ = ("fingerprint", "modules", "named", "pname", "_pmods", "local", "bns", "buffers", "params", "saved",
                 "_named_modules", "__weakref__")

    def __init__(self, model, fingerprint):
        self.fingerprint = fingerprint
        self.modules = list(model.modules())
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.pname = {id(p): n for n, p in self.named}
        self._named_modules = list(model.named_modules())
        self._pmods = None
        self.local = {}
        for name, m in self._named_modules:
            own = {n: p for n, p in m.named_parameters(recurse=False) if p.requires_grad}
            if own:
                self.local[id(m)] = own
        self.bns = [(name, m) for name, m in self._named_modules if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self.buffers = list(model.buffers())
        self.params = list(model.parameters())
        self.saved = None           # buffer copies reused between calls (PlanSnapshot), None while in use

    @property
    def pmods(self):
        """[(module path, module, rule)] of the modules owning trainable parameters (rules bound on first
        use; rules.UnsupportedModuleError for a module without a rule, on every use)."""
        if self._pmods is None:
            owners = [(name, m) for name, m in self._named_modules if id(m) in self.local]
            check_no_tied_parameters(owners)    # tied weights: refused, naming the shared parameter
            self._pmods = [(name, m, _rules.rule_for(m, name)) for name, m in owners]
        return self._pmods


class PlanSnapshot(ModelSnapshot):
    """preserved_model_state's snapshot (the same things restored, the same way) taken from a ModelPlan:
    no walk over the model, buffer values saved into copies kept between calls and written back in one
    foreach op (a per-buffer clone and copy cost ~10 us each, the whole one-pass step ~5 ms)."""

    def __init__(self, plan: ModelPlan):
        self.plan = plan
        self.modules = plan.modules
        self.training = [m.training for m in self.modules]
        bufs = plan.buffers
        saved, plan.saved = plan.saved, None            # taken (a concurrent call makes its own copies)
        if saved is None or len(saved) != len(bufs) or any(
                a.shape != b.shape or a.dtype != b.dtype or a.device != b.device for a, b in zip(saved, bufs)):
            saved = [b.detach().clone() for b in bufs]
        elif bufs:
            with torch.no_grad():
                torch._foreach_copy_(saved, [b.detach() for b in bufs])
        self._saved_bufs = saved
        self.buffers = []                               # ModelSnapshot.restore's buffer loop: nothing
        self.grads = [(p, p.grad) for p in plan.params]
        # hook dictionaries: a copy of the non-empty ones, None for the (usual) empty ones
        self.hooks = [tuple(dict(d) if d else None for d in (md.get(k) for k in _HOOK_DICTS))
                      for md in (m.__dict__ for m in self.modules)]
        self.full_backward = [m.__dict__.get("_is_full_backward_hook") for m in self.modules]

    def restore(self) -> None:
        """What ModelSnapshot.restore puts back, in the same way."""
        for m, flag in zip(self.modules, self.training):
            if m.training != flag:
                m.training = flag
        bufs, saved = self.plan.buffers, self._saved_bufs
        same = [(b, s) for b, s in zip(bufs, saved) if b.shape == s.shape and b.dtype == s.dtype]
        if same:
            with torch.no_grad():
                torch._foreach_copy_([b for b, _ in same], [s for _, s in same])
        for p, g in self.grads:
            if p.grad is not g:
                p.grad = g
        for m, saved_hooks, fb in zip(self.modules, self.hooks, self.full_backward):
            md = m.__dict__
            for k, d in zip(_HOOK_DICTS, saved_hooks):
                live = md.get(k)
                if live is None or (d is None and not live) or live == d:
                    continue
                for key in [key for key in live if d is None or key not in d]:
                    del live[key]
                if d is not None:
                    for key, v in d.items():
                        live[key] = v
            if "_is_full_backward_hook" in md and md["_is_full_backward_hook"] is not fb:
                m._is_full_backward_hook = fb
        self.plan.saved = saved


@contextlib.contextmanager
def plan_preserved_state(plan: ModelPlan):
    """preserved_model_state(model) from the model's cached plan (PlanSnapshot)."""
    snap = PlanSnapshot(plan)
    try:
        yield snap
    finally:
        snap.restore()


_PLANS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _fingerprint(model) -> tuple:
    """Changes whenever what ModelPlan holds may change: a module or parameter added, removed or replaced,
    requires_grad toggled, a dtype or device changed, a forward patched on an instance, a class swapped."""
    out = []
    for m in model.modules():
        out.append((id(m), type(m), "forward" in m.__dict__))
        for k, p in m._parameters.items():
            out.append((k, None) if p is None else (k, id(p), p.requires_grad, p.dtype, p.device))
        for k, b in m._buffers.items():
            out.append((k, None) if b is None else (k, id(b)))
    return tuple(out)


def model_plan(model) -> ModelPlan:
    """The cached ModelPlan of `model`, rebuilt when its fingerprint changed (one walk over the modules
    per call; the plan itself walks them several times and binds every rule)."""
    fp = _fingerprint(model)
    plan = _PLANS.get(model)
    if plan is None or plan.fingerprint != fp:
        plan = ModelPlan(model, fp)
        _PLANS[model] = plan
    return plan


def _record_grad(cap, g):
    cap.grad = g if cap.grad is None else cap.grad + g


def install_capture_hooks(model, mode, handles, *, tap: bool, on_output=None):
    """Register the forward hooks; returns the list the hooks append LayerCaptures to.

    tap=True: the hook returns out + z (z a zero leaf requiring grad, the tap autograd.grad asks
    for). tap=False (GradNormProbe): the output is left as is and `on_output(capture, output)`
    registers what it needs (a tensor hook). A module called twice in one forward is refused at
    norm time (per-sample norms do not add over calls)."""
    captures: list[LayerCapture] = []

    def make_hook(name, rule):
        def hook(module, args, output):
            if on_output is not None and not torch.is_grad_enabled():
                return None   # GradNormProbe: a no-grad forward (evaluation) is not a training step
            if not isinstance(output, torch.Tensor):
                raise TypeError(f"module {name!r} ({type(module).__name__}) returned {type(output).__name__}; "
                                "per-sample norms need modules with parameters to return one tensor")
            state, replacement = rule.capture(module, args[0], output, mode)
            out = output if replacement is None else replacement
            z, bottom = None, None
            if tap and out.requires_grad and not any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
                # a module at the bottom of the graph (its input needs no gradient): the backward must reach
                # it. autograd.grad asks for its smallest parameter (a bias: one reduction of G) when that is
                # cheaper than a zero tap on its output (out + z, z a stride-0 zero leaf requiring grad)
                small = min((p for p in module.parameters(recurse=False) if p.requires_grad), key=lambda p: p.numel())
                if small.numel() * 16 <= out.numel():
                    z = small   # replaced by `out` itself after the forward unless an in-place op rewrote it
                    bottom = (out, out._version)
                else:
                    z = torch.zeros((), dtype=out.dtype, device=out.device).expand(out.shape).requires_grad_()
                    out = out + z
            cap = LayerCapture(name, module, rule, state, z)
            cap.bottom = bottom
            captures.append(cap)
            if out.requires_grad:
                # a tensor hook records the gradient arriving at the output. Registered before any later
                # in-place op (ReLU(inplace=True)), it sees d/d(output as computed here).
                if on_output is not None:
                    on_output(cap, out)
                else:
                    out.register_hook(functools.partial(_record_grad, cap))
            return out if (replacement is not None or (z is not None and not isinstance(z, nn.Parameter))) else None
        return hook

    hooked = set()
    for name, m, rule in model_plan(model).pmods:
        handles.append(m.register_forward_hook(make_hook(name, rule)))
        hooked.add(id(m))
    if mode == "detached":   # every BatchNorm (with or without trainable parameters) is detached
        def detach_only(module, args, output):
            return _rules.BatchNormRule.detached_output(module, args[0])
        for m in model.modules():
            if not isinstance(m, nn.modules.batchnorm._BatchNorm):
                continue
            if type(m).forward is nn.modules.batchnorm._BatchNorm.forward and "forward" not in m.__dict__:
                # the detached output computed once, instead of torch's forward + a recomputation
                handles.append(_rules.BatchNormRule.patch_detached(m, keep_stats=id(m) in hooked))
            elif id(m) not in hooked:
                handles.append(m.register_forward_hook(detach_only))
    return captures


def _chunks(B, max_chunk):
    step = B if max_chunk is None else max_chunk
    return [(s, min(B, s + step)) for s in range(0, B, step)]


def _slice_state(state, s, e):
    """Rule states hold tensors with the batch as dim 0, or a leading 1 (shared by all samples)."""
    return {k: v[s:e] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] != 1 else v
            for k, v in state.items()}


def norms_from_captures(model, captures, B, *, per_layer, backend, max_chunk=None, scale=1.0):
    """Per-sample norms (total, and per parameter name if per_layer) from captured A and G.

    scale: the factor every G is to be multiplied by (GradNormProbe: B for a mean-reduced loss);
    squared norms are quadratic in G, so they are multiplied by scale^2 instead (no copy of G).
    Samples are processed in chunks of max_chunk (bounding the unfold/Gram workspace)."""
    plan = model_plan(model)
    named = plan.named
    out_dtype = named[0][1].dtype            # the first trainable parameter's (_checks.result_dtype)
    acc = accumulation_dtype(out_dtype)
    pname = plan.pname
    device = named[0][1].device
    parts: dict = {n: [] for n, _ in named}     # per parameter: (first sample, last + 1, squared norms)
    seen = {}
    for cap in captures:
        seen[cap.name] = seen.get(cap.name, 0) + 1
        if seen[cap.name] > 1:
            raise ValueError(f"module {cap.name!r} ({type(cap.module).__name__}) ran more than once in one forward; "
                             "per-sample norms of a shared (reused) module are not supported by the one-pass engine")
    for cap in captures:
        G = cap.grad
        if G is None:   # the module's output did not reach the loss: zero gradient
            continue
        local = plan.local.get(id(cap.module))
        if local is None:
            local = {n: p for n, p in cap.module.named_parameters(recurse=False) if p.requires_grad}
        for s, e in _chunks(B, max_chunk):
            st = cap.state if (s, e) == (0, B) else _slice_state(cap.state, s, e)
            res = cap.rule.sq_norms(cap.module, st, G if (s, e) == (0, B) else G[s:e], backend)
            for ln, v in res.items():
                if ln in local:
                    parts[pname[id(local[ln])]].append((s, e, v.to(acc)))
    sq = {}
    for n, got in parts.items():
        if len(got) == 1 and got[0][:2] == (0, B):
            sq[n] = got[0][2]                    # one full-batch result (the usual case): no zeros, no add
        else:
            sq[n] = torch.zeros(B, dtype=acc, device=device)
            for s, e, v in got:
                sq[n][s:e] += v
    if scale != 1.0:
        for v in sq.values():
            v.mul_(scale * scale)
    total = torch.stack(list(sq.values())).sum(dim=0).sqrt().to(out_dtype)
    if not per_layer:
        return total
    return total, {n: v.sqrt().to(out_dtype) for n, v in sq.items()}


def onepass_per_sample_grad_norms(model, loss_fn, inputs, targets, *, mode, per_layer=False, backend=None,
                                  max_chunk=None):
    """column / detached / eval norms from one backward pass (see the module docstring)."""
    args, B = check_call(model, loss_fn, inputs, targets, mode, max_chunk, per_layer)
    if mode == "exact":
        raise ValueError("onepass_per_sample_grad_norms computes column/detached/eval; exact is norms.exact")
    plan = model_plan(model)
    with plan_preserved_state(plan), torch.enable_grad():
        want = mode != "eval"                     # set_mode(model, mode), on the plan's module list
        if any(m.training != want for m in plan.modules):
            model.train(want)
        with temporary_hooks() as handles:
            captures = install_capture_hooks(model, mode, handles, tap=True)
            losses = check_losses(loss_fn(model(*args), targets), B)
        live = [c for c in captures if c.tap is not None]
        extra = [a for a in args if a.requires_grad]   # inputs that need grad: the backward must reach them
        if not live and not extra:
            raise RuntimeError("per_sample_grad_norms: found no module at the bottom of the graph to run the "
                               "backward to (every module with parameters takes an input that requires grad, "
                               "but none of the inputs does)")
        # a bottom module's output that no in-place op rewrote is itself the cheapest tap (its layer's
        # backward then does not run at all); otherwise its smallest parameter (a bias) is
        taps = []
        for c in live:
            if c.bottom is not None and c.bottom[0]._version == c.bottom[1]:
                c.tap = c.bottom[0]
            taps.append(c.tap)
        # the one backward: the tensor hooks fill the other captures' grads
        grads = torch.autograd.grad(losses.sum(), taps + extra, allow_unused=True)
        for c, g in zip(live, grads):
            if c.bottom is not None and c.tap is c.bottom[0]:
                c.grad = g
            # a tapped output holds its tensor hook -> the capture -> the output: a cycle through autograd's
            # C++ hook table that Python's GC cannot see (it leaked the activation every call): cut it here
            c.bottom = c.tap = None
        del losses, grads
        with torch.no_grad():
            return norms_from_captures(model, captures, B, per_layer=per_layer, backend=backend,
                                       max_chunk=max_chunk)


def per_sample_grad_norms(model, loss_fn, inputs, targets, *, mode="exact", per_layer=False, backend=None,
                          max_chunk=None):
    """Per-sample gradient norms ||d l_i / d theta|| of the per-sample losses l = loss_fn(model(inputs), targets).

    model: nn.Module; inputs: a tensor [B, ...] (or a tuple of tensors, passed as model(*inputs));
    targets: whatever loss_fn takes; loss_fn(outputs, targets) -> per-sample losses [B].
    mode (docs/math.md): "exact" (BN in train mode, with its cross-sample coupling; norms.exact),
    "column" (the split of the batch gradient over samples, G_i^T A_i per layer),
    "detached" (BN batch statistics constant in the backward), "eval" (running statistics).
    Only parameters with requires_grad count; total^2 = sum of per-parameter squares.
    Returns norms [B] in the parameter dtype, or (norms, {parameter name: norms [B]}) with
    per_layer=True. backend: the kernels' backend (None = BNMEM_BACKEND or auto). max_chunk: at
    most this many samples per kernel call. The model is left exactly as it was.
    Raises ValueError (bad mode / inputs / losses), TypeError, rules.UnsupportedModuleError.
    """
    if mode == "exact":
        check_call(model, loss_fn, inputs, targets, mode, max_chunk, per_layer)
        from .exact import exact_per_sample_grad_norms

        # (exact_report restores the model's state itself)
        return exact_per_sample_grad_norms(model, loss_fn, inputs, targets, per_layer=per_layer,
                                           backend=backend, max_chunk=max_chunk)
    return onepass_per_sample_grad_norms(model, loss_fn, inputs, targets, mode=mode, per_layer=per_layer,
                                         backend=backend, max_chunk=max_chunk)
