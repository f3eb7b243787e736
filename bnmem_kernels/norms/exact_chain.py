"""Exact per-sample gradients of sequential networks by a hand-written, seed-batched backward.

For a model that is an nn.Sequential chain of known layers (Conv2d, Linear, BatchNorm1d/2d in train
mode, elementwise activations, dropout, max/avg/adaptive pooling, Flatten; no hooks), the backward of
one sample's loss l_i through the whole batch splits, at every level, into two parts (docs/math.md, "BN's
coupling, exactly"):

- the *diagonal* part, living on sample i only: f_i, the gradient with BatchNorm statistics held
  fixed. For all i at once it is one ordinary backward of the batch (row i = seed i).
- the *coupling* part, spread over the whole batch: every train-mode BatchNorm turns the gradient
  dy arriving at its output into (gamma/sigma) dy plus a per-channel affine term -(gamma/sigma)(a + b xhat),
  a = mean(dy), b = mean(dy xhat). Below the top BatchNorm it is carried per chunk of seeds.
At the first max pool below the top BatchNorm the diagonal part joins the coupling part (on its own
sample's row), so from there down one pass carries both.

The coupling part is carried in three forms, so that no step does more work than its structure needs:
- affine (alpha, beta per seed and channel, at a BatchNorm's input): the Conv/Linear beneath takes
  it in closed form: weight gradient alpha (x) r1 + beta * Rz (two weight gradients of the conv, shared
  by all seeds); where the gradient is affine only (under the top BatchNorm), the input gradient is
  beta @ Q + alpha @ P, Q the input gradients of xhat's channels one at a time (built once per call by
  one grouped convolution, where it fits AFFINE_BASIS_BUDGET; else transposed convolutions of xhat with
  the seeds' kernels stacked), written straight into the values of a max pool beneath;
- pooled (below a max pool): the gradient lives on the maxima only: values [C, n, B, P] at the
  pool's indices; elementwise layers and BatchNorms act on the values, and a Conv beneath takes its
  weight gradient from the windows at the maxima only (the pooled_conv_weight_grad kernel: K^2 times
  fewer MACs for K x K pools); its input gradient is one transposed convolution of the scattered
  gradient, a few seeds at a time, written into the values of the max pool beneath (if any);
- dense: [n, B, *shape], through every layer's own batched backward.

Same numbers as the autograd loop (to rounding); the model is not modified (the forward calls each
layer as model(x) would, BatchNorm through torch's native kernel without running statistics).
`chain_layers` says whether a model is such a chain (ChainUnsupported otherwise, and the caller takes
another path); `chain_sq_norms` computes {name: [B] squared norms}; large buffers come from a pool
kept between calls (_Arena, `release_workspaces`). Memory: a layer's per-seed parameter gradients become
norms as soon as the layer is done, and the first block's xhat is dropped once the two caches that use
it exist (_drop_low_xhats).
"""
from __future__ import annotations

import os
import threading

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.grad import conv2d_weight

_ELEMENTWISE = (nn.ReLU, nn.LeakyReLU, nn.ELU, nn.CELU, nn.SELU, nn.GELU, nn.SiLU, nn.Mish, nn.Tanh, nn.Sigmoid,
                nn.Softplus, nn.ReLU6, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Tanhshrink, nn.Softsign,
                nn.LogSigmoid, nn.Identity)
_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
_LINEAR_OPS = (nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.Flatten)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d)
_LOSS_RTOL = {torch.float64: 1e-9, torch.float32: 1e-4}


class ChainUnsupported(Exception):
    """The model is not a chain this engine models exactly; the message says why."""


def _kind(m) -> str:
    t = type(m)
    if t is nn.Conv2d:
        if m.padding_mode != "zeros":
            raise ChainUnsupported(f"Conv2d with padding_mode={m.padding_mode!r}")
        if isinstance(m.padding, str) and m.padding != "valid":
            raise ChainUnsupported(f"Conv2d with padding={m.padding!r}")
        return "conv"
    if t is nn.Linear:
        return "linear"
    if t in _BN:
        return "bn"
    if t in _ELEMENTWISE:
        return "ew"
    if t in _DROPOUTS:
        return "dropout"
    if t is nn.MaxPool2d or t is nn.MaxPool1d or t is nn.AdaptiveMaxPool2d or t is nn.AdaptiveMaxPool1d:
        if getattr(m, "return_indices", False):
            raise ChainUnsupported(f"{t.__name__} with return_indices=True")
        return "maxpool"
    if t in _LINEAR_OPS:
        return "linop"
    raise ChainUnsupported(f"layer {t.__name__} is not one the chain engine models")


_MODULE_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks", "_global_forward_hooks_always_called")


def _refuse_hooks(model) -> None:
    """The chain's forward and backward are hand-written: a hook (module, global or on a parameter)
    that changes what a layer computes would be skipped, so any hook makes it refuse."""
    import torch.nn.modules.module as mm

    for name in _GLOBAL_HOOKS:
        if getattr(mm, name, None):
            raise ChainUnsupported(f"a global module hook is registered (torch.nn.modules.module.{name})")
    for mname, m in model.named_modules():
        for h in _MODULE_HOOKS:
            if getattr(m, h, None):
                raise ChainUnsupported(f"module {mname or type(m).__name__!r} has {h[1:]} registered")
        for pname, p in m.named_parameters(recurse=False):
            if getattr(p, "_backward_hooks", None):
                raise ChainUnsupported(f"parameter {mname}.{pname} has a tensor hook registered")


class TracedChain(list):
    """chain_layers' result for a model that is not an nn.Sequential but whose forward torch.fx traces to
    a straight line of known layers (functional ops as their module equivalents): the engine then checks
    its forward's output against model(x) before using it (ChainUnsupported if they differ)."""

    traced = True


def _functional_layer(node):
    """The nn.Module equivalent of an fx call_function / call_method node on one tensor, or None."""
    import torch.fx as fx

    args, kw = list(node.args[1:]), dict(node.kwargs)
    if any(isinstance(a, fx.Node) for a in args) or any(isinstance(v, fx.Node) for v in kw.values()):
        return None
    t = node.target
    ew = {F.relu: nn.ReLU, torch.relu: nn.ReLU, "relu": nn.ReLU, torch.tanh: nn.Tanh, "tanh": nn.Tanh,
          torch.sigmoid: nn.Sigmoid, "sigmoid": nn.Sigmoid, F.silu: nn.SiLU, F.gelu: nn.GELU, F.elu: nn.ELU,
          F.leaky_relu: nn.LeakyReLU}
    if t in ew:
        kw.pop("inplace", None)
        if args and t in (F.relu, torch.relu, "relu", F.silu):
            args = []                          # F.relu(x, inplace)
        return ew[t](*args, **kw)
    pools = {F.max_pool2d: nn.MaxPool2d, F.max_pool1d: nn.MaxPool1d, F.avg_pool2d: nn.AvgPool2d,
             F.avg_pool1d: nn.AvgPool1d, F.adaptive_avg_pool2d: nn.AdaptiveAvgPool2d,
             F.adaptive_avg_pool1d: nn.AdaptiveAvgPool1d, F.adaptive_max_pool2d: nn.AdaptiveMaxPool2d,
             F.adaptive_max_pool1d: nn.AdaptiveMaxPool1d}
    if t in pools:
        return pools[t](*args, **kw)
    if t in (torch.flatten, "flatten"):
        start = args[0] if args else kw.get("start_dim", 0)
        end = args[1] if len(args) > 1 else kw.get("end_dim", -1)
        return nn.Flatten(start, end) if start == 1 and end == -1 else None
    return None


def _traced_layers(model) -> "TracedChain":
    """The modules of a straight-line fx trace of model.forward (one input, each op on the previous one's
    output), or ChainUnsupported."""
    import torch.fx as fx

    try:
        gm = fx.symbolic_trace(model)
    except Exception as exc:    # data-dependent control flow, unsupported Python: not a chain we can read
        raise ChainUnsupported(f"the model is not an nn.Sequential and torch.fx cannot trace it "
                               f"({type(exc).__name__})") from None
    out, prev = TracedChain(), None
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            if prev is not None:
                raise ChainUnsupported("the model's forward takes more than one input")
            prev = node
            continue
        if node.op == "output":
            if node.args[0] is not prev:
                raise ChainUnsupported("the model's forward returns something other than its last op's output")
            break
        if len(node.users) != 1 or not node.args or node.args[0] is not prev:
            raise ChainUnsupported(f"the model's forward is not a straight chain (at {node.name!r}: a branch "
                                   "or merge)")
        if node.op == "call_module":
            if len(node.args) != 1 or node.kwargs:
                raise ChainUnsupported(f"module {node.target!r} called with extra arguments")
            m = model.get_submodule(node.target)
        elif node.op in ("call_function", "call_method"):
            m = _functional_layer(node)
            if m is None:
                raise ChainUnsupported(f"op {getattr(node.target, '__name__', node.target)!r} is not one the chain "
                                       "engine models")
        else:
            raise ChainUnsupported(f"fx node {node.op} {node.target!r} in the forward")
        out.append(m)
        prev = node
    return out


def chain_layers(model) -> list:
    """[(module, kind)] of an nn.Sequential chain (nested plain Sequentials flattened), or of a model whose
    forward torch.fx traces to a straight line of known layers (returned as a TracedChain); raises
    ChainUnsupported for anything else (branches, an unknown layer, a module with parameters used twice,
    a registered hook)."""
    if isinstance(model, nn.Sequential) and type(model).forward is nn.Sequential.forward:
        items, out = model, []
    else:
        _refuse_hooks(model)                   # before tracing (a hook is not in the trace)
        items = _traced_layers(model)
        out = TracedChain()
    seen = set()

    def walk(seq):
        for m in seq:
            if isinstance(m, nn.Sequential):
                if type(m).forward is not nn.Sequential.forward:
                    raise ChainUnsupported(f"{type(m).__name__} overrides Sequential.forward")
                walk(m)
                continue
            if id(m) in seen and any(p.requires_grad for p in m.parameters(recurse=False)):
                raise ChainUnsupported(f"{type(m).__name__} is used twice (shared parameters)")
            seen.add(id(m))
            out.append((m, _kind(m)))
    walk(items)
    _refuse_hooks(model)
    if not any(k == "bn" for _, k in out):
        raise ChainUnsupported("no BatchNorm (nothing couples samples)")
    if isinstance(out, TracedChain) and any(k == "dropout" for _, k in out):
        raise ChainUnsupported("dropout in a traced (non-Sequential) chain: its masks could not be checked")
    return out


def _numel(shape) -> int:
    out = 1
    for d in shape:
        out *= d
    return out


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _own_params(m, index):
    """[(slot name, parameter index)] of m's trainable parameters."""
    return [(s, index[id(p)]) for s, p in (("weight", getattr(m, "weight", None)), ("bias", getattr(m, "bias", None)))
            if isinstance(p, torch.Tensor) and id(p) in index]


class _Arena:
    """The large buffers of one call (workspaces, unfolded inputs, gathered rows, bases), drawn from a
    pool kept between calls, one per thread, and handed back at the end of the call.

    Why: a fresh large allocation is first-touched page by page (~1.8 us per 4 KiB page on the VMs
    measured, i.e. ~0.45 ms per MB), and glibc returns a call's freed memory to the OS, so without the
    pool every call pays for its whole footprint again (~50 MB, ~25 ms, on the bench CNN at B = 64).
    The pool keeps at most BNMEM_EXACT_POOL_MB (default 256) MiB; 0 disables it;
    `release_workspaces()` empties it."""

    _free: dict = {}            # (thread id, shape, dtype, device) -> [tensors]
    _bytes = 0
    _lock = threading.Lock()

    def __init__(self):
        self.held: list = []

    @staticmethod
    def limit() -> int:
        env = os.environ.get("BNMEM_EXACT_POOL_MB", "256")
        try:
            mb = float(env)
        except ValueError:
            raise ValueError(f"BNMEM_EXACT_POOL_MB must be a number of MiB >= 0, got {env!r}") from None
        return int(max(mb, 0.0) * 2**20)

    def empty(self, shape, dtype, device):
        key = (threading.get_ident(), tuple(shape), dtype, torch.device(device))
        with _Arena._lock:
            lst = _Arena._free.get(key)
            t = lst.pop() if lst else None
            if t is not None:
                _Arena._bytes -= t.numel() * t.element_size()
        if t is None:
            t = torch.empty(shape, dtype=dtype, device=device)
        self.held.append((key, t))
        return t

    def release(self):
        limit = self.limit()
        with _Arena._lock:
            for key, t in self.held:
                nb = t.numel() * t.element_size()
                if _Arena._bytes + nb <= limit:
                    _Arena._free.setdefault(key, []).append(t)
                    _Arena._bytes += nb
        self.held = []


def release_workspaces() -> int:
    """Free the buffers exact mode's chain engine keeps between calls; returns the bytes released."""
    with _Arena._lock:
        nb, _Arena._bytes = _Arena._bytes, 0
        _Arena._free.clear()
    return nb


def _workspace(r, key, shape, like):
    """A contiguous buffer of `shape` for this record, kept across the chunks of one call, one per thread:
    a view of the first `numel` entries of one flat buffer (the first chunk, the largest, sizes it), so
    that a smaller last chunk reuses it whatever dimension its seeds run along."""
    key = (key, threading.get_ident())
    numel = _numel(shape)
    buf = r.cache.get(key)
    if buf is None or buf.numel() < numel:
        buf = r.cache[key] = r.arena.empty((numel,), like.dtype, like.device)
    return buf[:numel].view(shape)


class _Rec:
    """What the forward of one layer leaves for the backward."""

    def __init__(self, m, kind, x, arena):
        self.m, self.kind, self.x, self.arena = m, kind, x, arena
        self.xshape = self.yshape = None
        self.params: list = []
        self.diag_out = None        # the diagonal part's gradient at the output (param layers)
        self.cache: dict = {}


def _gather_at(idx, t):
    """t [B, C, *spatial] at a max pool's maxima idx [B, C, P] (flat positions), as [C, 1, B, P]."""
    g = t.reshape(t.shape[0], t.shape[1], -1).gather(2, idx)
    return g.permute(1, 0, 2).unsqueeze(1).contiguous()


class _Pooled:
    """A gradient that lives on the maxima of a max pool: vals [C, n, B, P] (channel-major, so that the
    per-channel GEMMs and sums read it contiguously) at the flat input positions idx [B, C, P] (the same
    for every seed) of a pool input with `numel` positions per channel."""

    def __init__(self, vals, idx, numel):
        self.vals, self.idx, self.numel = vals, idx, numel

    def gather(self, t):
        """t [B, C, *spatial] at the maxima, as [C, 1, B, P] (broadcasts against vals)."""
        return _gather_at(self.idx, t)

    def sums(self, w=None):
        """[n, C]: sum over samples and maxima of vals (weighted by w [C, 1, B, P]; the products a few
        channels at a time, so no temporary as large as vals)."""
        if w is None:
            return self.vals.sum((2, 3)).t()
        C = self.vals.shape[0]
        step = max(1, C // 4)
        return torch.cat([(self.vals[c0:c0 + step] * w[c0:c0 + step]).sum((2, 3)) for c0 in range(0, C, step)]).t()

    def scatter_into(self, D):
        """D [n, B, C, numel] += vals at their positions (in place)."""
        C, n, B, P = self.vals.shape
        D.permute(2, 0, 1, 3).scatter_add_(3, self.idx.permute(1, 0, 2).unsqueeze(1).expand(C, n, B, P), self.vals)

    def scale_(self, f):
        """vals *= f in place (the engine owns vals)."""
        self.vals.mul_(f)
        return self


class _Grad:
    """The coupling part of n seeds' gradients at one tensor of the chain: dense [n, B, *shape] and/or
    pooled and/or affine (alpha, beta [n, C] with the BatchNorm's xhat [B, C, *spatial])."""

    def __init__(self, dense=None, pooled=None, affine=None):
        self.dense, self.pooled, self.affine = dense, pooled, affine

    def seeds(self, j0, j1):
        """The gradients of seeds j0..j1 only (views)."""
        pooled = None if self.pooled is None else _Pooled(self.pooled.vals[:, j0:j1], self.pooled.idx,
                                                          self.pooled.numel)
        affine = None if self.affine is None else (self.affine[0][j0:j1], self.affine[1][j0:j1], self.affine[2])
        return _Grad(None if self.dense is None else self.dense[j0:j1], pooled, affine)

    def materialize(self, n, shape, dtype, device, out=None):
        """Everything as one dense tensor [n, *shape] (shape includes B), written into `out` if given."""
        D = self.dense
        if out is None:
            if self.affine is None and self.pooled is None:
                return D
            out = torch.empty((n,) + tuple(shape), dtype=dtype, device=device)
        if self.affine is not None:
            alpha, beta, xhat = self.affine
            v = [n, 1, alpha.shape[1]] + [1] * (xhat.dim() - 2)
            torch.mul(xhat.unsqueeze(0), beta.view(v), out=out).add_(alpha.view(v))
            if D is not None:
                out.add_(D)
        elif D is not None:
            out.copy_(D)
        else:
            out.zero_()
        if self.pooled is not None:
            self.pooled.scatter_into(out.view(n, shape[0], shape[1], -1))
        return out


def _forward(layers, x, index, arena):
    """Run the chain on the batch as model(x) would (BatchNorm: batch statistics, running statistics
    untouched); one record per layer."""
    recs = []
    with torch.no_grad():
        for m, kind in layers:
            r = _Rec(m, kind, x, arena)
            r.backend = arena.backend
            r.params = _own_params(m, index)
            if kind == "bn":
                if x.dim() not in (2, 3, 4):
                    raise ChainUnsupported(f"{type(m).__name__} on a {x.dim()}-d input")
                if not (m.training or m.running_mean is None):
                    raise ChainUnsupported(f"{type(m).__name__} in eval mode")
                if x.numel() // x.shape[1] <= 1:
                    raise ValueError(f"Expected more than 1 value per channel when training, got input size {x.size()}")
                # torch's own train-mode kernel (the loop's forward), which also returns its statistics
                y, mean, invstd = torch.native_batch_norm(x, m.weight, m.bias, None, None, True, 0.0, m.eps)
                v = [1, -1] + [1] * (x.dim() - 2)
                r.xhat = torch.addcmul((-mean * invstd).view(v), x, invstd.view(v))
                r.scale = invstd if m.weight is None else m.weight.detach() * invstd
                r.M = x.numel() // x.shape[1]
            elif kind == "dropout":
                r.d = m(torch.ones_like(x)) if m.training else None   # the mask the forward draws, scaled
                y = x if r.d is None else x * r.d
            elif kind == "ew" and type(m) is nn.ReLU:
                y = torch.relu(x)
                r.d = y > 0          # torch's ReLU backward: the gradient where output > 0 (a bool mask: 1/4 the memory)
            elif kind == "ew":
                with torch.enable_grad():
                    xr = x.detach().requires_grad_(True)
                    yr = m(xr.clone() if getattr(m, "inplace", False) else xr)
                    r.d = torch.autograd.grad(yr, xr, torch.ones_like(yr))[0] if type(m) is not nn.Identity else None
                y = yr.detach()
            elif kind == "maxpool":
                t = type(m)
                if t is nn.MaxPool2d:
                    y, idx = F.max_pool2d(x, m.kernel_size, m.stride, m.padding, m.dilation, ceil_mode=m.ceil_mode,
                                          return_indices=True)
                elif t is nn.MaxPool1d:
                    y, idx = F.max_pool1d(x, m.kernel_size, m.stride, m.padding, m.dilation, ceil_mode=m.ceil_mode,
                                          return_indices=True)
                elif t is nn.AdaptiveMaxPool2d:
                    y, idx = F.adaptive_max_pool2d(x, m.output_size, return_indices=True)
                else:
                    y, idx = F.adaptive_max_pool1d(x, m.output_size, return_indices=True)
                r.idx = idx.reshape(idx.shape[0], idx.shape[1], -1)
            elif kind == "conv":
                if x.dim() != 4:
                    raise ChainUnsupported(f"Conv2d on a {x.dim()}-d input")
                y = m(x)
            elif kind == "linear":
                if x.dim() != 2:
                    raise ChainUnsupported(f"Linear on a {x.dim()}-d input (only [B, features])")
                y = m(x)
            else:
                y = m(x)
            # keep only what the backward reads: shapes, a Conv's/Linear's input, the per-kind records
            r.xshape, r.yshape = tuple(x.shape), tuple(y.shape)
            if kind == "conv":
                r.cache["geom"] = _ConvGeom(r, y)
            if kind not in ("conv", "linear"):
                r.x = None
            recs.append(r)
            x = y
    return recs, x


# ----------------------------------------------------------------------------------------------
# sample-wise layers on a batch of n seeds: g [n, B, *out] -> [n, B, *in]

def _samplewise_back(r, g):
    n, B = g.shape[:2]
    if r.kind in ("ew", "dropout"):
        return g if r.d is None else g * r.d
    if r.kind == "maxpool":
        C = r.xshape[1]
        flat = g.reshape(n * B, C, -1)
        idx = r.idx.unsqueeze(0).expand(n, B, C, flat.shape[-1]).reshape(flat.shape)
        out = torch.zeros(n * B, C, _numel(r.xshape[2:]), dtype=g.dtype, device=g.device)
        out.scatter_add_(2, idx, flat)
        return out.view(n, *r.xshape)
    if r.kind == "linop":
        if type(r.m) is nn.Flatten:
            return g.reshape(n, *r.xshape)
        with torch.enable_grad():
            z = torch.zeros((n * B,) + r.xshape[1:], dtype=g.dtype, device=g.device, requires_grad=True)
            out = r.m(z)
            return torch.autograd.grad(out, z, g.reshape(out.shape))[0].view(n, *r.xshape)
    raise AssertionError(r.kind)


# ----------------------------------------------------------------------------------------------
# Conv2d / Linear: weight gradients and input gradients of the three forms

class _ConvGeom:
    def __init__(self, r, y):
        m = r.m
        self.k = _pair(m.kernel_size)
        self.s = _pair(m.stride)
        self.p = (0, 0) if isinstance(m.padding, str) else _pair(m.padding)
        self.dil = _pair(m.dilation)
        self.g = m.groups
        self.W = m.weight.detach()
        B, I, H, W_ = r.x.shape
        self.B, self.I, self.H, self.Wd = B, I, H, W_
        self.O, self.Ho, self.Wo = y.shape[1], y.shape[2], y.shape[3]
        self.r = (I // self.g) * self.k[0] * self.k[1]


def _conv_Ut(r):
    """The unfolded input as [g, B * L, r] (L = output positions; the rows of every GEMM with it), cached."""
    if "Ut" not in r.cache:
        c = r.cache["geom"]
        U = r.arena.empty((c.B, c.g * c.r, c.Ho * c.Wo), c.W.dtype, c.W.device)
        torch.ops.aten.im2col.out(r.x, list(c.k), list(c.dil), list(c.p), list(c.s), out=U)
        Ut = r.arena.empty((c.g, c.B * c.Ho * c.Wo, c.r), c.W.dtype, c.W.device)
        Ut.view(c.g, c.B, c.Ho * c.Wo, c.r).copy_(U.view(c.B, c.g, c.r, -1).permute(1, 0, 3, 2))
        r.cache["Ut"] = Ut
    return r.cache["Ut"]


def _conv_wgrad(r, D):
    """sum over samples and positions: D [n, B, O, Ho, Wo] -> [n, O, r]."""
    c = r.cache["geom"]
    n = D.shape[0]
    Og = c.O // c.g
    Dm = D.reshape(n, c.B, c.g, Og, -1).permute(2, 0, 3, 1, 4).reshape(c.g, n * Og, -1)
    G = torch.bmm(Dm, _conv_Ut(r))                             # [g, n * Og, r]
    return G.view(c.g, n, Og, c.r).transpose(0, 1).reshape(n, c.O, c.r)


def _conv_pooled_wgrad(r, pooled):
    """The weight gradient of a pooled gradient -> [n, O, r]: only the input windows at the maxima
    enter (1/K^2 of the dense GEMM's work for K x K pools). By the pooled_conv_weight_grad kernel
    (windows read in place) on the backend `r.backend` selects; where auto finds no compiled or Triton
    backend, by the plain-PyTorch route below (a row gather of the unfolded input, then a GEMM per
    output channel), faster than the op's reference, same numbers to rounding."""
    from ..ops.pooled_conv_weight_grad import pooled_conv_weight_grad

    c = r.cache["geom"]
    vals = pooled.vals
    O, n, B, P = vals.shape
    if r.backend != "torch":
        if "x_pad" not in r.cache:
            r.cache["x_pad"] = F.pad(r.x, (c.p[1], c.p[1], c.p[0], c.p[0])) if any(c.p) else r.x
        out = pooled_conv_weight_grad(r.cache["x_pad"], vals, pooled.idx, (c.Ho, c.Wo), c.k, c.s, c.dil, c.g,
                                      backend=r.backend)
        return out.view(n, O, c.r)
    key = ("Ug", id(pooled.idx))
    if key not in r.cache:
        # rows of the unfolded input [g B L, r] at every (o, b, p)'s maximum: one row gather
        L = c.Ho * c.Wo
        Og = O // c.g
        base = (torch.arange(c.g, device=vals.device).view(1, c.g, 1, 1) * (B * L)
                + torch.arange(B, device=vals.device).view(B, 1, 1, 1) * L)
        flat = (pooled.idx.view(B, c.g, Og, P) + base).permute(1, 2, 0, 3).reshape(-1)
        Ug = r.arena.empty((O * B * P, c.r), vals.dtype, vals.device)
        torch.index_select(_conv_Ut(r).reshape(-1, c.r), 0, flat, out=Ug)
        r.cache[key] = Ug.view(O, B * P, c.r)
    return torch.bmm(vals.view(O, n, B * P), r.cache[key]).transpose(0, 1)   # [n, O, r]


def _conv_affine_terms(r, xhat):
    """(r1 [r], Rz [O, r], sum xhat [O]) for the closed form of an affine gradient (groups = 1):
    r1 = sum over samples and positions of the unfolded input, Rz[o] = the same weighted by xhat[:, o]
    (weight gradients of the conv, with output gradients 1 (of the samples' sum) and xhat)."""
    if "aff" not in r.cache:
        c = r.cache["geom"]
        # r1 is linear in the input and its output gradient is the same for every sample: the samples'
        # sum through one weight gradient of a batch of one
        ones = torch.ones(1, 1, c.Ho, c.Wo, dtype=c.W.dtype, device=c.W.device)
        r1 = conv2d_weight(r.x.sum(0, keepdim=True), (1, c.I, c.k[0], c.k[1]), ones, c.s, c.p, c.dil).reshape(-1)
        Rz = conv2d_weight(r.x, tuple(c.W.shape), xhat.contiguous(), c.s, c.p, c.dil).reshape(c.O, -1)
        r.cache["aff"] = (r1, Rz, xhat.sum((0, 2, 3)))
    return r.cache["aff"]


def _output_padding(c):
    """The transposed convolution's output_padding that gives back the conv's input size."""
    op = []
    for a in range(2):
        size = (c.Ho if a == 0 else c.Wo) - 1
        full = size * c.s[a] - 2 * c.p[a] + c.dil[a] * (c.k[a] - 1) + 1
        op.append((c.H if a == 0 else c.Wd) - full)
    return tuple(op)


def _conv_input_grad(c, D, weight=None):
    """Input gradient of the conv for output gradients D [N, O, Ho, Wo]: one transposed convolution
    (mkldnn's deconvolution runs ~2x faster than convolution_backward's input gradient on CPU);
    `weight` [O, I', kh, kw] in place of the conv's own (groups = 1 then)."""
    op = _output_padding(c)
    if weight is not None:
        return F.conv_transpose2d(D, weight, None, c.s, c.p, op, 1, c.dil)
    return F.conv_transpose2d(D, c.W, None, c.s, c.p, op, c.g, c.dil)


DGRAD_SEEDS = 2


AFFINE_BASIS_BUDGET = 1.0    # Q is built when it takes at most this fraction of the forward's activations
AFFINE_BASIS_MIN_B = 16      # ... and B is at least this: below, Q's build (mkldnn's buffers for the grouped
                             # convolution) outweighs what it saves (bench CNN at B = 8: 4.2x plain memory with
                             # Q, 2.5x without; the time is small either way)


def _conv_affine_basis(r, xhat):
    """Q [O, I, B * H * W]: the conv's input gradients of xhat's channels one at a time (output gradient
    xhat[:, o] in channel o, zero elsewhere), for every o, once per call (groups = 1). For stride 1, one
    grouped forward convolution with the flipped kernels (I outputs per input channel; mkldnn runs it
    channels-last ~20x faster than the grouped transposed convolution), then one 2-d transpose; else
    the grouped transposed convolution."""
    if "Q" not in r.cache:
        c = r.cache["geom"]
        W, HW = c.W, c.H * c.Wd
        pad = [c.dil[a] * (c.k[a] - 1) - c.p[a] for a in range(2)]
        Q = r.arena.empty((c.O * c.I, c.B * HW), W.dtype, W.device)
        if c.s == (1, 1) and min(pad) >= 0 and (c.H, c.Wd) == (c.Ho + 2 * pad[0] - c.dil[0] * (c.k[0] - 1),
                                                            c.Wo + 2 * pad[1] - c.dil[1] * (c.k[1] - 1)):
            Wf = W.flip(2, 3).reshape(c.O * c.I, 1, c.k[0], c.k[1])
            q = F.conv2d(xhat.contiguous(memory_format=torch.channels_last), Wf, None, 1, tuple(pad), c.dil, c.O)
            Q.copy_(q.permute(0, 2, 3, 1).reshape(c.B * HW, c.O * c.I).t())   # memory [B, H, W, O, I]: a 2-d transpose
            del q
        else:
            q = F.conv_transpose2d(xhat, W, None, c.s, c.p, _output_padding(c), c.O, c.dil)
            Q.view(c.O * c.I, c.B, HW).copy_(q.view(c.B, c.O * c.I, HW).transpose(0, 1))
            del q
        r.cache["Q"] = Q.view(c.O, c.I, -1)
    return r.cache["Q"]


def _conv_affine_input_grad(r, alpha, beta, xhat, n, pool=None):
    """The input gradient of a gradient that is affine only (under the top BatchNorm; groups = 1):
    alpha (x) 1 + beta (x) xhat for n seeds, as a _Grad: dense [n, B, I, H, W] (a view of [I, n, B, H W]),
    or the values of the max pool `pool` beneath (pooled [I, n, B, P], written straight into them). The
    beta part is one batched GEMM with Q, the input gradients of xhat's channels one at a time
    (_conv_affine_basis, once per call: as much work as one seed's transposed convolution), where Q
    (O x the conv's input) takes at most AFFINE_BASIS_BUDGET x the forward's activation bytes and B is at
    least AFFINE_BASIS_MIN_B; else
    transposed convolutions of xhat with the seeds' kernels stacked (n seeds' worth of work). The alpha
    part is alpha @ P, P the input gradient of a constant 1 in each output channel (computed once)."""
    c = r.cache["geom"]
    W, HW = c.W, c.H * c.Wd
    if "P" not in r.cache:
        eye = torch.eye(c.O, dtype=W.dtype, device=W.device).view(c.O, c.O, 1, 1).expand(c.O, c.O, c.Ho, c.Wo)
        r.cache["P"] = _conv_input_grad(c, eye.contiguous()).reshape(c.O, c.I, HW)
    out = _workspace(pool, "ws_vals", (c.I, n, c.B, HW), W) if pool is not None else \
        _workspace(r, "ws_affine", (c.I, n, c.B, HW), W)
    if c.B >= AFFINE_BASIS_MIN_B and c.O * c.I * c.B * HW * W.element_size() <= AFFINE_BASIS_BUDGET * r.arena.act_bytes:
        # out[i] = beta @ Q[:, i] for every input channel i (Q[:, i]: a strided batch, rows contiguous)
        torch.bmm(beta.unsqueeze(0).expand(c.I, n, c.O), _conv_affine_basis(r, xhat).transpose(0, 1),
                  out=out.view(c.I, n, -1))
    else:
        # Q too large: one transposed convolution of xhat per few seeds, their kernels stacked along the
        # output channels (W_s[o, i] = beta[s, o] W[o, i]; a few per call: torch's column buffer grows with them)
        sub = min(n, DGRAD_SEEDS)
        for j0 in range(0, n, sub):
            j1 = min(n, j0 + sub)
            Ws = (beta[j0:j1].t().unsqueeze(2) * W.reshape(c.O, 1, -1)).reshape(c.O, (j1 - j0) * c.I, c.k[0], c.k[1])
            res = _conv_input_grad(c, xhat, weight=Ws).view(c.B, j1 - j0, c.I, HW)
            out[:, j0:j1] = res.permute(2, 1, 0, 3)
    out += torch.einsum("so,oip->isp", alpha, r.cache["P"]).unsqueeze(2)
    if pool is not None:
        return _Grad(pooled=_Pooled(out, pool.idx, _numel(pool.xshape[2:])))
    return _Grad(out.view(c.I, n, c.B, c.H, c.Wd).permute(1, 2, 0, 3, 4))


def _conv_back(r, G, n, need_input, want_bias=True, pool=None):
    """(weight grad [n, O, I/g, kh, kw] or None, bias grad [n, O] or None, _Grad at the input or None).
    Weight gradient: each form by its cheapest route (dense: one GEMM; pooled: the rows at the maxima
    only; affine: closed form). Input gradient: when the gradient is affine only, one transposed
    convolution of xhat with per-seed kernels; else transposed convolutions of the materialized
    gradient, DGRAD_SEEDS seeds at a time."""
    c = r.cache["geom"]
    shape = (c.B, c.O, c.Ho, c.Wo)
    want_w = any(s == "weight" for s, _ in r.params)
    want_b = want_bias and any(s == "bias" for s, _ in r.params)
    if G.affine is not None and c.g != 1:
        G = _Grad(G.materialize(n, shape, c.W.dtype, c.W.device))   # the closed forms are for groups = 1
    wg = bg = None

    def add(a, b):
        return b if a is None else a + b
    if G.dense is not None:
        if want_w:
            wg = add(wg, _conv_wgrad(r, G.dense))
        if want_b:
            bg = add(bg, G.dense.sum((1, 3, 4)))
    if G.pooled is not None:
        if want_w:
            wg = add(wg, _conv_pooled_wgrad(r, G.pooled))
        if want_b:
            bg = add(bg, G.pooled.sums())
    if G.affine is not None:
        alpha, beta, xhat = G.affine
        if want_w or want_b:
            r1, Rz, sx = _conv_affine_terms(r, xhat)
            if want_w:
                if wg is None:
                    wg = (alpha.unsqueeze(2) * r1).addcmul_(beta.unsqueeze(2), Rz)
                else:
                    wg.addcmul_(alpha.unsqueeze(2), r1).addcmul_(beta.unsqueeze(2), Rz)
            if want_b:
                bg = add(bg, alpha * (c.B * c.Ho * c.Wo) + beta * sx)
    if wg is not None:
        wg = wg.view(n, *c.W.shape)
    if not need_input:
        return wg, bg, None
    if G.dense is None and G.pooled is None and c.g == 1:
        return wg, bg, _conv_affine_input_grad(r, G.affine[0], G.affine[1], G.affine[2], n, pool)
    # every form scattered/expanded to full resolution, then transposed convolutions, DGRAD_SEEDS seeds at a
    # time (as fast per seed as one large call, and a quarter of the memory: the materialized gradient,
    # the convolution's output and mkldnn's own reordered copies of both)
    # `pool`: the max pool right beneath, whose pooled form the results go to directly (no buffer of
    # the whole input gradient: each few seeds' part lands in the pooled values [C, n, B, P])
    if pool is not None:
        out = _workspace(pool, "ws_vals", (c.I, n, c.B, c.H * c.Wd), c.W)
    else:
        out = _workspace(r, "ws_dgrad", (n * c.B, c.I, c.H, c.Wd), c.W)
    sub = min(n, DGRAD_SEEDS)
    ws = _workspace(r, "ws_out", (sub,) + shape, c.W)
    for j0 in range(0, n, sub):
        j1 = min(n, j0 + sub)
        D = G.seeds(j0, j1).materialize(j1 - j0, shape, c.W.dtype, c.W.device, out=ws[:j1 - j0])
        res = _conv_input_grad(c, D.view((j1 - j0) * c.B, *shape[1:]))
        if pool is not None:
            out[:, j0:j1] = res.view(j1 - j0, c.B, c.I, -1).permute(2, 0, 1, 3)
        else:
            out[j0 * c.B:j1 * c.B] = res
    if pool is not None:
        return wg, bg, _Grad(pooled=_Pooled(out, pool.idx, _numel(pool.xshape[2:])))
    return wg, bg, _Grad(out.view(n, c.B, c.I, c.H, c.Wd))


def _linear_back(r, G, n, need_input, want_bias=True):
    m = r.m
    W = m.weight.detach()
    D = G.materialize(n, r.yshape, W.dtype, W.device)
    wg = torch.matmul(D.transpose(1, 2), r.x) if any(s == "weight" for s, _ in r.params) else None
    bg = D.sum(1) if want_bias and any(s == "bias" for s, _ in r.params) else None
    return wg, bg, (_Grad(D @ W) if need_input else None)


# ----------------------------------------------------------------------------------------------

def _bn_sums(r, G, n):
    """(sum dy, sum dy xhat) per seed and channel [n, C] of a coupling gradient at the BN output."""
    s1 = s2 = None
    if G.dense is not None:
        D = G.dense
        red = [1] + list(range(3, D.dim()))
        s1 = D.sum(red)
        s2 = (D * r.xhat.unsqueeze(0)).sum(red)
    if G.pooled is not None:
        key = ("xhat_g", id(G.pooled.idx))
        if key not in r.cache:
            r.cache[key] = G.pooled.gather(r.xhat)
        a, b = G.pooled.sums(), G.pooled.sums(r.cache[key])
        s1 = a if s1 is None else s1 + a
        s2 = b if s2 is None else s2 + b
    return s1, s2


def _drop_low_xhats(recs, bns, need_below):
    """A BatchNorm between a max pool (a conv above it, elementwise layers between) and a groups = 1 conv that
    needs no input gradient (the first block of a CNN) uses its xhat only through two caches: the gather at
    the pool's maxima (its sums) and the closed form of the conv beneath. Both are built now and xhat is
    dropped: it is the largest activation of such a network, held through the whole call otherwise.
    Returns how many were dropped."""
    K, dropped = len(recs), 0
    for k in bns:
        below = recs[k - 1] if k >= 1 else None
        if below is None or below.kind != "conv" or below.m.groups != 1 or need_below[k - 1]:
            continue
        j = k + 1
        while j < K and recs[j].kind in ("ew", "dropout"):
            j += 1
        if not (j + 1 < K and recs[j].kind == "maxpool" and len(recs[j].xshape) == 4 and recs[j + 1].kind == "conv"):
            continue
        r, idx = recs[k], recs[j].idx
        r.cache[("xhat_g", id(idx))] = _gather_at(idx, r.xhat)
        _conv_affine_terms(below, r.xhat)
        r.xhat = None
        dropped += 1
    return dropped


def _diag_backward(recs, dout, need_below, merge=None):
    """The diagonal part for all B seeds at once (row j = seed j): one backward of the batch with the
    BatchNorm statistics held fixed. Stores, per parameter layer, the gradient at its output, and per
    BatchNorm the per-seed sums (sum dy, sum dy xhat) [B, C] that spawn the coupling part. Stops at
    layer `merge` (its output gradient stored): below it the coupling pass carries the diagonal too."""
    g = dout.unsqueeze(0)                                     # [1, B, *out]
    for k in range(len(recs) - 1, -1, -1):
        r = recs[k]
        if (r.params and r.kind != "bn") or k == merge:
            r.diag_out = g[0]
        if k == merge:
            break
        if r.kind == "bn":
            dy = g[0]
            sp = list(range(2, dy.dim()))
            r.diag_s1 = dy.sum(sp) if sp else dy.clone()
            r.diag_s2 = (dy * r.xhat).sum(sp) if sp else dy * r.xhat
        if not need_below[k]:
            break
        if r.kind == "bn":
            v = [1, 1, -1] + [1] * (g.dim() - 3)
            g = g * r.scale.view(v)
        elif r.kind == "conv":
            c = r.cache["geom"]
            g = _conv_input_grad(c, g[0]).unsqueeze(0)
        elif r.kind == "linear":
            g = g @ r.m.weight.detach()
        else:
            g = _samplewise_back(r, g)


def _per_sample_wgrad(r, rows):
    """The diagonal part's own parameter gradients for seeds `rows`: {slot: [c, *p.shape]}, fresh tensors
    (the caller accumulates into them in place)."""
    out = {}
    sl = slice(rows[0], rows[-1] + 1)          # rows: a contiguous range of seeds
    D = r.diag_out[sl] if r.kind != "bn" else None
    slots = {s for s, _ in r.params}
    if r.kind == "conv":
        c = r.cache["geom"]
        n, Og = len(rows), c.O // c.g
        if "weight" in slots:
            U = F.unfold(r.x[sl], c.k, dilation=c.dil, padding=c.p, stride=c.s)     # [c, g r, L]
            Ur = U.view(n, c.g, c.r, -1).transpose(2, 3)                            # [c, g, L, r]
            out["weight"] = torch.matmul(D.reshape(n, c.g, Og, -1), Ur).reshape(n, *c.W.shape)
        if "bias" in slots:
            out["bias"] = D.sum((2, 3))
    elif r.kind == "linear":
        if "weight" in slots:
            out["weight"] = D.unsqueeze(2) * r.x[sl].unsqueeze(1)
        if "bias" in slots:
            out["bias"] = D.clone()
    elif r.kind == "bn":
        # the BN's own affine parameters: sum_t dy xhat and sum_t dy of the diagonal part
        if "weight" in slots:
            out["weight"] = r.diag_s2[sl].clone()
        if "bias" in slots:
            out["bias"] = r.diag_s1[sl].clone()
    return out


class LossCouplesSamples(ChainUnsupported):
    """loss_fn's loss of sample i depends on other samples' outputs (in value or in gradient)."""


def per_sample_loss_grads(loss_fn, out, targets, losses):
    """d l_i / d out_i for every i, after checking that loss_fn is per sample: the batch losses'
    Jacobian w.r.t. `out` must be block-diagonal (l_i depends on out_i alone). Two backward passes of
    the loss: G0 = d(sum_i l_i)/d out and G1 = d(sum_i v_i l_i)/d out with random v_i in [1, 2]; with a
    block-diagonal Jacobian G1_j = v_j G0_j, otherwise the rows differ (for random v, unless every
    off-diagonal block is zero). A loss that couples samples only in its gradient, e.g.
    l - l.mean() + l.mean().detach(), fails it; one whose coupling carries no gradient (a detached batch
    term) passes, rightly: it changes no gradient. Then G0_i = d l_i / d out_i.
    `losses` = loss_fn(out, targets) [B] with its graph (kept). Raises LossCouplesSamples."""
    rtol = _LOSS_RTOL.get(out.dtype, 1e-2)
    gen = torch.Generator().manual_seed(1234)                   # the user's RNG stays untouched
    v = (1.0 + torch.rand(losses.shape[0], generator=gen, dtype=torch.float64)).to(losses.dtype).to(losses.device)
    g0, = torch.autograd.grad(losses, out, grad_outputs=torch.ones_like(losses), retain_graph=True,
                              allow_unused=True)
    g1, = torch.autograd.grad(losses, out, grad_outputs=v, retain_graph=True, allow_unused=True)
    if g0 is None or g1 is None:
        raise LossCouplesSamples("loss_fn's losses do not depend on the model's outputs")
    want = g0 * v.view([-1] + [1] * (g0.dim() - 1))
    scale = want.abs().mean() + torch.finfo(want.dtype).tiny
    if not bool(((g1 - want).abs() <= rtol * (want.abs() + scale)).all()):
        raise LossCouplesSamples("loss_fn couples the samples in its gradient (d(sum_i v_i l_i)/d out is not "
                                 "v_i * d l_i / d out_i)")
    return g0


def chain_sq_norms(layers, loss_fn, x, targets, names, params, acc, B, chunk, backend=None, check_output=None):
    """({name: [B] squared exact per-sample gradient norms}, info) for the chain `layers` (chain_layers).
    `backend` (None/"auto", "cuda", "triton", "cpu", "reference"): where the pooled_conv_weight_grad
    kernel runs. `check_output(out)`: called on the chain forward's output (a TracedChain's check against
    model(x); raises ChainUnsupported). Raises ChainUnsupported when the loss is not per sample (the
    caller takes another path)."""
    dt = params[0].dtype
    if targets is not None and not isinstance(targets, torch.Tensor):
        raise ChainUnsupported(f"targets of type {type(targets).__name__} cannot be split per sample")
    if dt not in (torch.float32, torch.float64) or x.dtype != dt:
        raise ChainUnsupported(f"dtype {dt} (the chain engine runs fp32 and fp64 models)")
    index = {id(p): q for q, p in enumerate(params)}
    from .. import _backend

    which = _backend.select_backend("pooled_conv_weight_grad", x.device, None if backend == "auto" else backend)
    if which == "reference" and backend in (None, "auto") and not os.environ.get(_backend.ENV_VAR):
        which = "torch"          # nothing compiled: the plain-PyTorch gather route, not the slow definition
    arena = _Arena()
    arena.backend = which
    try:
        sq, info = _chain_sq_norms(layers, loss_fn, x, targets, names, params, acc, B, chunk, index, arena,
                                   check_output)
        if sq is not None:
            # the engine's own large buffers against the activations a plain step keeps (auto's memory check)
            info["arena_bytes"] = sum(t.numel() * t.element_size() for _, t in arena.held)
            info["act_bytes"] = arena.act_bytes
            # per seed, one layer's parameter gradients are alive (with their temporaries, ~3 copies)
            elem = params[0].element_size()
            info["seed_param_bytes"] = 3 * elem * max(
                (sum(params[q].numel() for _, q in _own_params(m, index)) for m, _ in layers), default=0)
            info["param_bytes"] = elem * sum(p.numel() for p in params)
        return sq, info
    finally:
        arena.release()


def _chain_sq_norms(layers, loss_fn, x, targets, names, params, acc, B, chunk, index, arena, check_output=None):
    dt = params[0].dtype
    recs, out = _forward(layers, x, index, arena)
    if check_output is not None:
        check_output(out)
    arena.act_bytes = sum(_numel(r.yshape) for r in recs) * x.element_size()   # ~ what a plain backward keeps
    # per-sample losses and their gradients at the network output (the loss must be per sample)
    with torch.enable_grad():
        o = out.detach().requires_grad_(True)
        losses = loss_fn(o, targets)
        if not isinstance(losses, torch.Tensor) or tuple(losses.shape) != (B,) or not losses.requires_grad:
            return None, {"losses": losses}         # the caller's check_losses reports it
        dout = per_sample_loss_grads(loss_fn, o, targets, losses)

    K = len(recs)
    has_params = [bool(r.params) for r in recs]
    need_below = [any(has_params[:k]) for k in range(K)]      # input gradient of layer k needed
    bns = [k for k, r in enumerate(recs) if r.kind == "bn"]
    top = bns[-1]
    # the first max pool below the top BN: there the diagonal part joins the coupling part (at its
    # sample's row), so that below it one pooled pass carries both (no per-sample weight gradients)
    merge = next((k for k in range(top - 1, -1, -1) if recs[k].kind == "maxpool" and len(recs[k].xshape) in (3, 4)
                  and need_below[k]), None)
    _diag_backward(recs, dout, need_below, merge)
    # a bias whose output feeds a train-mode BatchNorm directly: exactly zero (BN removes shifts)
    zero_bias = [k + 1 < K and recs[k + 1].kind == "bn" and r.kind in ("conv", "linear") for k, r in enumerate(recs)]
    dropped = _drop_low_xhats(recs, bns, need_below)
    zero = [names[q] for k, r in enumerate(recs) if zero_bias[k] for s, q in r.params if s == "bias"]

    sq = {n: torch.zeros(B, dtype=acc, device=x.device) for n in names}

    def one_chunk(rows):
        start = rows[0]
        rows = list(range(start, min(B, start + chunk)))
        n = len(rows)
        grads: dict = {}

        def acc_grad(q, g):            # every g is a fresh tensor of this chunk: sums in place
            grads[q] = g if q not in grads else grads[q].add_(g)

        def flush():                   # a layer's parameters get all their parts at that layer: norms now
            for q, g in grads.items():
                sq[names[q]][start:start + n] = g.reshape(n, -1).to(acc).square().sum(1)
            grads.clear()
        G = _Grad()
        skip = None
        for k in range(K - 1, -1, -1):
            flush()
            r = recs[k]
            merged = merge is not None and k < merge          # the diagonal part travels in G here
            if r.params and not merged:
                for s, g in _per_sample_wgrad(r, rows).items():
                    acc_grad(dict(r.params)[s], g)
            if k > top:
                continue                                     # above the top BN: the diagonal part only
            if r.kind == "bn":
                if G.affine is not None:           # a BatchNorm right above this one: its BN term, dense
                    G = _Grad(G.materialize(n, r.yshape, dt, x.device))
                e1, e2 = _bn_sums(r, G, n)               # the coupling part's sums (None above the top BN)
                slots = dict(r.params)
                if e1 is not None:
                    if "weight" in slots:
                        acc_grad(slots["weight"], e2)
                    if "bias" in slots:
                        acc_grad(slots["bias"], e1)
                if merged:
                    s1, s2 = e1, e2
                else:
                    s1, s2 = r.diag_s1[start:start + n], r.diag_s2[start:start + n]
                    if e1 is not None:
                        s1, s2 = s1 + e1, s2 + e2
                if not need_below[k]:
                    break
                sc = r.scale
                v = [1, 1, -1] + [1] * (len(r.xshape) - 2)
                dense = None if G.dense is None else G.dense * sc.view(v)
                pooled = None if G.pooled is None else G.pooled.scale_(sc.view(-1, 1, 1, 1))
                alpha, beta = -(sc / r.M) * s1, -(sc / r.M) * s2
                G = _Grad(dense, pooled, (alpha, beta, r.xhat))
                continue
            if k == skip:
                continue                                  # a max pool whose pooled form the conv above made
            if r.kind in ("conv", "linear"):
                kw = {}
                below = recs[k - 1] if k >= 1 else None
                if r.kind == "conv" and need_below[k] and below is not None and below.kind == "maxpool" \
                        and len(below.xshape) == 4:
                    kw["pool"], skip = below, k - 1
                back = _conv_back if r.kind == "conv" else _linear_back
                wg, bg, G = back(r, G, n, need_below[k], want_bias=not zero_bias[k], **kw)
                if skip == merge and merge is not None and k - 1 == merge:
                    # the diagonal part joins (see below), straight into the pool's values [C, n, B, P]
                    j = torch.arange(n, device=x.device)
                    d = recs[merge].diag_out[start:start + n]
                    G.pooled.vals[:, j, j + start] += d.reshape(n, d.shape[1], -1).transpose(0, 1)
                slots = dict(r.params)
                if wg is not None:
                    acc_grad(slots["weight"], wg)
                if bg is not None:
                    acc_grad(slots["bias"], bg)
                del wg, bg                      # the dict holds them until the flush
                if not need_below[k]:
                    break
                continue
            if not need_below[k]:
                break
            # sample-wise layers: a max pool starts a pooled form (the gradient on its maxima), which the
            # elementwise layers beneath keep (their derivative at the maxima); else dense
            if k == merge:
                # the diagonal part joins: seed j's own gradient at this pool's output, on its sample's row
                D = G.materialize(n, r.yshape, dt, x.device)     # an engine buffer (written in place)
                D = torch.zeros((n,) + r.yshape, dtype=dt, device=x.device) if D is None else D
                j = torch.arange(n, device=D.device)
                D[j, j + start] += r.diag_out[start:start + n]
                G = _Grad(D)
                del D                                 # G holds it; freed once the pool below has copied it
            if r.kind == "maxpool" and len(r.xshape) in (3, 4) and G.pooled is None and G.affine is None \
                    and G.dense is not None:
                vals = _workspace(r, "ws_vals", (r.idx.shape[1], n) + tuple(r.idx.shape[::2]), G.dense)
                vals.copy_(G.dense.reshape(n, *r.idx.shape).permute(2, 0, 1, 3))
                G = _Grad(pooled=_Pooled(vals, r.idx, _numel(r.xshape[2:])))
                continue
            if r.kind in ("ew", "dropout") and G.dense is None and G.affine is None and G.pooled is not None:
                if r.d is not None:
                    key = ("d_g", id(G.pooled.idx))
                    if key not in r.cache:
                        r.cache[key] = G.pooled.gather(r.d)
                    G.pooled.scale_(r.cache[key])
                continue
            D = G.materialize(n, r.yshape, dt, x.device)
            G = _Grad(None if D is None else _samplewise_back(r, D))
        flush()

    # chunks of seeds in turn, each op with all intra-op threads (worker threads of one intra-op thread
    # each were measured slower here: the chunks' large ops are memory-bound and switching torch's
    # thread count re-initializes its thread pool); the first chunk builds the cached operands
    for s0 in range(0, B, chunk):
        one_chunk(list(range(s0, min(B, s0 + chunk))))
    for nm in zero:
        sq[nm].zero_()
    info = {"layers": len(recs), "bn_calls": len(bns), "chunk": chunk, "zero_biases": zero,
            "pooled_wgrad_backend": arena.backend,
            "pooled": sum(1 for r in recs if r.kind == "maxpool"), "xhat_dropped": dropped}
    return sq, info
