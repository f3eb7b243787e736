"""Per-layer rules for one-pass per-sample gradient norms: ONE table, one rule per layer type.

A rule turns what the forward and backward saw at one module call into per-sample squared norms
of that module's own parameters (docs/math.md, "column": the weight gradient split over the samples):
  - `capture(module, x, output, mode)`, in the forward hook: returns the state the rule needs
    later (the input, statistics; never a copy of the output; every tensor with the batch as
    dim 0, or a leading 1 when shared by all samples, so the engine can chunk samples), and for mode="detached" a
    replacement output (only BatchNorm: batch statistics detached, see `BatchNormRule`);
  - `sq_norms(module, state, grad_out, backend)`, after the backward: {local parameter name:
    [B] squared norms}, computed from the module input A and the output gradient G without ever
    forming a per-sample gradient of more than one sample chunk (ghost norms, docs/math.md).

Adding a layer type = one class with those two methods and `@register(nn.SomeLayer)`. A module
that owns parameters and has no rule makes the engine raise `UnsupportedModuleError`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.conv_weight_grad_sq import conv_weight_grad_sq
from ..ops.ghost_norm_linear import ghost_norm_linear
from ..ops.norm_affine_grad_sq import norm_affine_grad_sq
from .._backend import select_backend
from ..reference.ghost_norm import accumulation_dtype, use_gram

RULES: dict[type, "Rule"] = {}


class UnsupportedModuleError(TypeError):
    """A module owns trainable parameters but no rule knows its per-sample gradient."""


def register(*types):
    """Class decorator: the rule handles these module types (and their subclasses)."""
    def deco(cls):
        for t in types:
            RULES[t] = cls()
        return cls
    return deco


def rule_for(module: nn.Module, name: str = "") -> "Rule":
    for t in type(module).__mro__:
        if t in RULES:
            if type(module).forward is not t.forward:   # e.g. a ghost-BatchNorm subclass: not what the rule knows
                raise UnsupportedModuleError(
                    f"module {name or '<root>'!r} of type {type(module).__module__}.{type(module).__name__} "
                    f"subclasses {t.__name__} but overrides its forward; the {t.__name__} rule only knows "
                    f"{t.__name__}.forward. Add a rule for it in bnmem_kernels/norms/rules.py (@register)")
            return RULES[t]
    supported = ", ".join(sorted(t.__name__ for t in RULES))
    raise UnsupportedModuleError(
        f"module {name or '<root>'!r} of type {type(module).__module__}.{type(module).__name__} owns trainable "
        f"parameters but has no per-sample gradient rule; supported layer types: {supported} (and any "
        f"module without parameters of its own). Freeze its parameters (requires_grad=False), or add a rule "
        f"in bnmem_kernels/norms/rules.py (@register)")


class Rule:
    """Base: capture the module input; subclasses define sq_norms."""

    def capture(self, module, x, output, mode):
        return {"x": x}, None

    def sq_norms(self, module, state, grad_out, backend):  # pragma: no cover - abstract
        raise NotImplementedError


def _acc(t: torch.Tensor) -> torch.dtype:
    return accumulation_dtype(t.dtype)


def _bias_sq(g_rows: torch.Tensor) -> torch.Tensor:
    """g_rows [B, T, d_out] -> ||sum_t g_it||^2 per sample."""
    return g_rows.to(_acc(g_rows)).sum(dim=1).square().sum(dim=1)


# --------------------------------------------------------------------------------------- Linear
@register(nn.Linear)
class LinearRule(Rule):
    """y = x W^T + b, x [B, *, d_in]: A_i = x_i as [T, d_in] rows, G_i [T, d_out];
    ||dW_i||^2 = ||G_i^T A_i||^2 (ghost_norm_linear), ||db_i||^2 = ||sum_t g_it||^2."""

    def sq_norms(self, module, state, grad_out, backend):
        x = state["x"]
        B = x.shape[0]
        a = x.reshape(B, -1, x.shape[-1])
        g = grad_out.reshape(B, -1, grad_out.shape[-1])
        out = {"weight": ghost_norm_linear(a, g, backend=backend)}
        if module.bias is not None:
            out["bias"] = _bias_sq(g)
        return out


# ----------------------------------------------------------------------------------------- Conv
def unfold2d(x, ks, dil, pad, st):
    """F.unfold (im2col) of x [B, C, H, W] -> [B, C * kh * kw, L], as one strided copy of a zero-padded
    view (x.as_strided over (c, kh, kw, oh, ow)); ATen's CPU im2col is ~10x slower here."""
    if any(pad):
        x = F.pad(x, (pad[1], pad[1], pad[0], pad[0]))
    B, C, H, W = x.shape
    oh = (H - dil[0] * (ks[0] - 1) - 1) // st[0] + 1
    ow = (W - dil[1] * (ks[1] - 1) - 1) // st[1] + 1
    sb, sc, sh, sw = x.stride()
    v = x.as_strided((B, C, ks[0], ks[1], oh, ow), (sb, sc, dil[0] * sh, dil[1] * sw, st[0] * sh, st[1] * sw),
                     x.storage_offset())
    return v.reshape(B, C * ks[0] * ks[1], oh * ow)


def _conv_rows(module, x):
    """Unfold a ConvNd input (1-D or 2-D) into per-group rows: [B * groups, L, C_in/groups * K]."""
    x, ks, dil, st = _conv_padded(module, x)   # 'same' may pad asymmetrically: pad explicitly as the layer does
    cols = unfold2d(x, ks, dil, (0, 0), st)                           # [B, C_in * K, L]
    B, CK, L = cols.shape
    gr = module.groups
    return cols.view(B * gr, CK // gr, L).transpose(1, 2)             # [B * groups, L, C_in/g * K] (view)


def _conv_padded(module, x):
    """The conv input zero/reflect/... padded as the layer pads it, as [B, C, H, W] (1-D: H = 1), and
    the layer's (kernel, dilation, stride) as 2-D tuples."""
    nd = len(module.kernel_size)
    pad_mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    if module.padding_mode != "zeros" or isinstance(module.padding, str) or any(module.padding):
        x = F.pad(x, module._reversed_padding_repeated_twice, mode=pad_mode)
    ks, st, dil = tuple(module.kernel_size), tuple(module.stride), tuple(module.dilation)
    if nd == 1:
        x, ks, st, dil = x.unsqueeze(2), (1,) + ks, (1,) + st, (1,) + dil
    return x, ks, dil, st


_GROUPED_CHUNK_BYTES = 8 << 20


def conv_weight_sq_grouped(module, x, g):
    """||dW_i||^2 of a Conv1d/Conv2d (any stride) from the backend's own weight-gradient kernel: the
    batch folded into the channels of one sample ([1, B C_in, H, W]) and groups = B * groups, so
    the kernel returns every sample's weight gradient ("expanded weights"), squared and summed.
    Materializes per-sample gradients of this one layer, in sample chunks of at most ~8 MB.
    A Conv2d with symmetric zero padding passes its padding to the kernel (no padded copy of x)."""
    if x.dim() == 4 and module.padding_mode == "zeros" and not isinstance(module.padding, str):
        xp, ks, dil, st, pad = x, tuple(module.kernel_size), tuple(module.dilation), tuple(module.stride), \
            list(module.padding)
    else:
        (xp, ks, dil, st), pad = _conv_padded(module, x), [0, 0]
    B, C, Hp, Wp = xp.shape
    gr = module.groups
    Co = g.shape[1]
    OH = (Hp + 2 * pad[0] - dil[0] * (ks[0] - 1) - 1) // st[0] + 1
    OW = (Wp + 2 * pad[1] - dil[1] * (ks[1] - 1) - 1) // st[1] + 1
    g4 = g.reshape(B, Co, OH, OW)
    per_sample = Co * (C // gr) * ks[0] * ks[1] * x.element_size()
    chunk = max(1, _GROUPED_CHUNK_BYTES // per_sample)
    acc = _acc(x)
    out = []
    for s in range(0, B, chunk):
        n = min(chunk, B - s)
        w = torch.empty(n * Co, C // gr, ks[0], ks[1], dtype=x.dtype, device=x.device)
        dw = torch.ops.aten.convolution_backward(
            g4[s:s + n].reshape(1, n * Co, OH, OW), xp[s:s + n].reshape(1, n * C, Hp, Wp), w, None, list(st),
            pad, list(dil), False, [0, 0], n * gr, [False, True, False])[1]
        out.append(dw.reshape(n, -1).to(acc).square().sum(dim=1))
    return torch.cat(out)


@register(nn.Conv1d, nn.Conv2d)
class ConvRule(Rule):
    """Per group: A_i = unfolded input rows [L, C_in/g * k], G_i = output gradient rows [L, C_out/g];
    ||dW_i||^2 = sum_groups ||G_i^T A_i||^2. Three routes:
      * Gram (2 L^2 < d_in d_out, ghost_norm_linear's criterion): <G_i G_i^T, A_i A_i^T> through
        ghost_norm_linear on the unfolded input, samples x groups stacked into its batch;
      * otherwise the weight gradient is materialized per sample, by
          - conv_weight_grad_sq (implicit im2col: no unfolded input, no per-sample gradient in memory),
          - or, on the cpu backend when materializing is the cheaper route in flops
            (L (d_in + d_out) >= d_in d_out) and there are more than 4 input channels per group,
            conv_weight_sq_grouped (the backend's weight-gradient kernel with the batch folded into
            the groups, mkldnn), which runs at plain-wgrad speed there.
    Measured at B = 64, 1 thread: 16->32 ch 16x16: grouped 1.6 ms; 3->16 ch 32x32:
    conv_weight_grad_sq 0.74 ms (torch's whole-batch weight gradient 0.76 ms), unfold2d +
    ghost_norm_linear 2.0-3.1 ms, grouped 130 ms (mkldnn, 64 groups of 3 channels)."""

    def sq_norms(self, module, state, grad_out, backend):
        x = state["x"]
        B, gr = x.shape[0], module.groups
        g = grad_out.reshape(B, grad_out.shape[1], -1)                # [B, C_out, L]
        L = g.shape[2]
        d_in = x.shape[1] // gr * math.prod(module.kernel_size)
        d_out = g.shape[1] // gr
        cpu_materialize = (L * (d_in + d_out) >= d_in * d_out
                           and select_backend("ghost_norm_linear", x.device, backend) == "cpu")
        if cpu_materialize and x.shape[1] // gr > 4:
            # CPU, materializing is the cheaper route in flops (T d_in d_out <= T^2 (d_in + d_out)), enough
            # input channels for the backend's grouped weight-gradient kernel to run well
            out = {"weight": conv_weight_sq_grouped(module, x, g)}
        elif use_gram(L, d_in, d_out):
            a = _conv_rows(module, x)
            g_rows = g.reshape(B * gr, g.shape[1] // gr, -1).transpose(1, 2)
            out = {"weight": ghost_norm_linear(a, g_rows, route="gram", backend=backend).view(B, gr).sum(dim=1)}
        else:
            out = {"weight": _conv_weight_grad_sq(module, x, grad_out, backend)}
        if module.bias is not None:
            out["bias"] = g.to(_acc(g)).sum(dim=2).square().sum(dim=1)
        return out


def _conv_weight_grad_sq(module, x, grad_out, backend):
    """||dW_i||^2 of a Conv1d/Conv2d by conv_weight_grad_sq on the input padded as the layer pads it
    (1-D as H = 1)."""
    xp, ks, dil, st = _conv_padded(module, x)
    g4 = grad_out.unsqueeze(2) if grad_out.dim() == 3 else grad_out
    return conv_weight_grad_sq(xp, g4, ks, st, dil, module.groups, backend=backend)


@register(nn.ConvTranspose1d, nn.ConvTranspose2d)
class ConvTransposeRule(Rule):
    """y = conv_transpose(x, W), W [C_in, C_out/g, *k]: dW_i[ci, co, k] = sum_p x_i[ci, p] G_i[co, p s + k d - pad],
    i.e. the roles of conv swap: A = the input rows [L_in, C_in/g], 'G' = the output gradient
    unfolded with the layer's stride/padding/dilation [L_in, C_out/g * k]."""

    def sq_norms(self, module, state, grad_out, backend):
        x = state["x"]
        B, gr, nd = x.shape[0], module.groups, len(module.kernel_size)
        ks, st, dil, pad = (tuple(module.kernel_size), tuple(module.stride), tuple(module.dilation),
                            tuple(module.padding))
        g = grad_out
        if nd == 1:
            g, ks, st, dil, pad = g.unsqueeze(2), (1,) + ks, (1,) + st, (1,) + dil, (0,) + pad
        cols = unfold2d(g, ks, dil, pad, st)                          # [B, C_out * K, L_in]
        xr = x.reshape(B, x.shape[1], -1)
        if cols.shape[2] != xr.shape[2]:
            raise ValueError(f"ConvTranspose rule: unfolded output gradient has {cols.shape[2]} positions, the "
                             f"input {xr.shape[2]}; unsupported output_size/output_padding combination")
        a = xr.reshape(B * gr, xr.shape[1] // gr, -1).transpose(1, 2)
        gc = cols.reshape(B * gr, cols.shape[1] // gr, -1).transpose(1, 2)
        out = {"weight": ghost_norm_linear(a, gc, backend=backend).view(B, gr).sum(dim=1)}
        if module.bias is not None:
            gg = grad_out.reshape(B, grad_out.shape[1], -1)
            out["bias"] = gg.to(_acc(gg)).sum(dim=2).square().sum(dim=1)
        return out


# ----------------------------------------------------------------------------------- Embedding
@register(nn.Embedding)
class EmbeddingRule(Rule):
    """dW_i = sum_t onehot(idx_it) g_it^T: rows of repeated indices add up before squaring.
    Plain torch (a sort/unique + index_add, O(B T d)): no kernel is warranted, the work is one
    pass over G. Tokens at padding_idx get no gradient."""

    def capture(self, module, x, output, mode):
        if module.max_norm is not None:
            raise ValueError("nn.Embedding with max_norm renormalizes its weight in place during the forward "
                             "(the call would change the model); per-sample norms do not support max_norm")
        return {"x": x}, None

    def sq_norms(self, module, state, grad_out, backend):
        idx = state["x"]
        B = idx.shape[0]
        V = module.num_embeddings
        g = grad_out.reshape(B, -1, grad_out.shape[-1]).to(_acc(grad_out))
        idx = idx.reshape(B, -1)
        if module.padding_idx is not None:
            g = g * (idx != module.padding_idx).unsqueeze(-1).to(g.dtype)
        key = (torch.arange(B, device=idx.device).unsqueeze(1) * V + idx).flatten()
        uniq, inv = torch.unique(key, return_inverse=True)
        rows = torch.zeros(uniq.shape[0], g.shape[-1], dtype=g.dtype, device=g.device)
        rows.index_add_(0, inv, g.reshape(-1, g.shape[-1]))
        sq = torch.zeros(B, dtype=g.dtype, device=g.device)
        sq.index_add_(0, uniq // V, rows.square().sum(dim=1))
        return {"weight": sq}


# ------------------------------------------------------------------------------ normalization
def _norm_sq(module, x3, g3, mean3, rstd3, backend):
    out = norm_affine_grad_sq(x3, g3, mean3, rstd3, backend=backend)
    res = {}
    if getattr(module, "weight", None) is not None:
        res["weight"] = out[:, 0]
    if getattr(module, "bias", None) is not None:
        res["bias"] = out[:, 1]
    return res


def _saved_stats(output, node_name):
    """(mean, rstd) that the layer's autograd node saved in the forward, or None."""
    fn = getattr(output, "grad_fn", None)
    if fn is None or fn.name() != node_name:
        return None
    try:
        return fn._saved_result1, fn._saved_result2
    except (AttributeError, RuntimeError):
        return None


class _DetachedBatchNorm(torch.autograd.Function):
    """Train-mode BatchNorm whose backward treats the batch statistics as constants ("detached"):
    forward = torch's fused batch-statistics BatchNorm (also returning mean and 1/std), backward =
    torch's fused eval-mode BatchNorm backward with those statistics as the running ones."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        out, mean, rstd = torch.native_batch_norm(x, weight, bias, None, None, True, 0.0, eps)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.eps = eps
        ctx.mark_non_differentiable(mean, rstd)
        return out, mean, rstd

    @staticmethod
    def backward(ctx, dy, _dmean, _drstd):
        x, weight, mean, rstd = ctx.saved_tensors
        need = [ctx.needs_input_grad[0], weight is not None and ctx.needs_input_grad[1], ctx.needs_input_grad[2]]
        var = rstd.reciprocal().square() - ctx.eps          # eval backward divides by sqrt(var + eps) = 1/rstd
        dx, dw, db = torch.ops.aten.native_batch_norm_backward(dy.contiguous(), x, weight, mean, var, None, None,
                                                               False, ctx.eps, need)
        return dx, dw, db, None


@register(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
class BatchNormRule(Rule):
    """Statistics per channel: batch statistics (train mode, or no running stats) or running
    statistics (eval). dgamma_i[c] = sum_t dy xhat, dbeta_i[c] = sum_t dy (norm_affine_grad_sq).
    mode="detached": the engine replaces the layer's forward for the call (`patch_detached`) by
    the output with the batch mean/var computed without autograd, so the backward treats them as
    constants; those statistics go straight to `capture` (nothing computed twice). A layer whose
    forward was not replaced gets its output recomputed that way in `capture` instead."""

    _stash: dict = {}   # id(output) -> (output, mean, rstd) of a replaced forward, until its capture

    @classmethod
    def patch_detached(cls, module, keep_stats):
        """Replace module.forward (an instance attribute; torch's hooks still run around it) by the
        detached computation; keep_stats: hand the statistics to `capture` (the layer has a rule
        hook). Returns a handle whose remove() restores the class forward."""
        def forward(x):
            if not (module.training or module.running_mean is None):
                return type(module).forward(module, x)
            out, mean, rstd = _DetachedBatchNorm.apply(x, module.weight, module.bias, module.eps)
            if keep_stats:
                cls._stash[id(out)] = (out, mean, rstd)
            return out

        class Handle:
            def remove(self):
                module.__dict__.pop("forward", None)
                cls._stash.clear()
        module.forward = forward
        return Handle()

    @staticmethod
    def _batch_stats(module, x):
        with torch.no_grad():
            var, mean = torch.var_mean(x.detach().to(_acc(x)), dim=[0] + list(range(2, x.dim())), correction=0)
            return mean, torch.rsqrt(var + module.eps)

    def capture(self, module, x, output, mode):
        batch = module.training or module.running_mean is None
        acc = _acc(x)
        replace = None
        if not batch:
            mean = module.running_mean.detach().to(acc).clone()
            rstd = torch.rsqrt(module.running_var.detach().to(acc) + module.eps)
        elif mode == "detached" and self._stash.get(id(output), (None,))[0] is output:
            _, mean, rstd = self._stash.pop(id(output))     # the replaced forward's own statistics
        else:
            saved = _saved_stats(output, "NativeBatchNormBackward0")
            if saved is not None and saved[0].numel() == x.shape[1] and saved[1].numel() == x.shape[1]:
                mean, rstd = saved[0].detach().to(acc), saved[1].detach().to(acc)
            else:
                mean, rstd = self._batch_stats(module, x)
            if mode == "detached":
                replace = self.detached_output(module, x, mean, rstd)
        return {"x": x, "mean": mean.reshape(1, -1), "rstd": rstd.reshape(1, -1)}, replace

    @staticmethod
    def detached_output(module, x, mean=None, rstd=None):
        """BatchNorm's output with its batch statistics as constants: (x - mu) rstd gamma + beta, with
        mu, rstd computed from x without autograd. Used for every BatchNorm in mode="detached",
        with or without parameters. Returns None when the layer uses running statistics."""
        if not (module.training or module.running_mean is None):
            return None
        if mean is None:
            mean, rstd = BatchNormRule._batch_stats(module, x)
        # eval-mode batch_norm with the batch statistics passed as constants: one fused op whose backward
        # treats them as constants. var = rstd^-2 with eps = 0 reproduces rstd to rounding.
        var = rstd.reciprocal().square()
        return F.batch_norm(x, mean.to(x.dtype).reshape(-1), var.to(x.dtype).reshape(-1), module.weight, module.bias,
                            training=False, momentum=0.0, eps=0.0)

    def sq_norms(self, module, state, grad_out, backend):
        x = state["x"]
        B, C = x.shape[:2]
        x3 = x.reshape(B, C, -1)
        g3 = grad_out.reshape(B, C, -1)
        return _norm_sq(module, x3, g3, state["mean"].view(1, C, 1), state["rstd"].view(1, C, 1), backend)


@register(nn.GroupNorm)
class GroupNormRule(Rule):
    """Statistics per (sample, group), stay differentiated in every mode (they are per sample)."""

    def capture(self, module, x, output, mode):
        B, G = x.shape[0], module.num_groups
        acc = _acc(x)
        saved = _saved_stats(output, "NativeGroupNormBackward0")
        if saved is not None and saved[0].numel() == B * G:
            mean, rstd = saved[0].detach().to(acc).reshape(B, G), saved[1].detach().to(acc).reshape(B, G)
        else:
            with torch.no_grad():
                var, mean = torch.var_mean(x.detach().to(acc).reshape(B, G, -1), dim=2, correction=0)
                rstd = torch.rsqrt(var + module.eps)
        return {"x": x, "mean": mean, "rstd": rstd}, None

    def sq_norms(self, module, state, grad_out, backend):
        x = state["x"]
        B, C = x.shape[:2]
        per = C // module.num_groups
        mean = state["mean"].repeat_interleave(per, dim=1).view(B, C, 1)
        rstd = state["rstd"].repeat_interleave(per, dim=1).view(B, C, 1)
        return _norm_sq(module, x.reshape(B, C, -1), grad_out.reshape(B, C, -1), mean, rstd, backend)


@register(nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
class InstanceNormRule(Rule):
    """Statistics per (sample, channel) (or running statistics in eval with track_running_stats)."""

    def capture(self, module, x, output, mode):
        acc = _acc(x)
        B, C = x.shape[:2]
        if not module.training and module.track_running_stats and module.running_mean is not None:
            mean = module.running_mean.detach().to(acc).clone().view(1, C)
            rstd = torch.rsqrt(module.running_var.detach().to(acc) + module.eps).view(1, C)
        else:
            with torch.no_grad():
                var, mean = torch.var_mean(x.detach().to(acc).reshape(B, C, -1), dim=2, correction=0)
                rstd = torch.rsqrt(var + module.eps)
        return {"x": x, "mean": mean, "rstd": rstd}, None

    def sq_norms(self, module, state, grad_out, backend):
        x = state["x"]
        B, C = x.shape[:2]
        return _norm_sq(module, x.reshape(B, C, -1), grad_out.reshape(B, C, -1),
                        state["mean"].reshape(-1, C, 1), state["rstd"].reshape(-1, C, 1), backend)


@register(nn.LayerNorm)
class LayerNormRule(Rule):
    """x [B, *lead, *normalized_shape]: rows t (lead positions) normalized over D; gamma/beta index
    D, so norm_affine_grad_sq sees x as [B, D, T] with statistics per (sample, t)."""

    def capture(self, module, x, output, mode):
        acc = _acc(x)
        B = x.shape[0]
        saved = _saved_stats(output, "NativeLayerNormBackward0")
        T = x[0].numel() // math.prod(module.normalized_shape)
        if saved is not None and saved[0].numel() == B * T:
            mean, rstd = saved[0].detach().to(acc).reshape(B, T), saved[1].detach().to(acc).reshape(B, T)
        else:
            with torch.no_grad():
                var, mean = torch.var_mean(x.detach().to(acc).reshape(B, T, -1), dim=2, correction=0)
                rstd = torch.rsqrt(var + module.eps)
        return {"x": x, "mean": mean, "rstd": rstd}, None

    def sq_norms(self, module, state, grad_out, backend):
        x = state["x"]
        B = x.shape[0]
        D = math.prod(module.normalized_shape)
        x3 = x.reshape(B, -1, D).transpose(1, 2)
        g3 = grad_out.reshape(B, -1, D).transpose(1, 2)
        T = x3.shape[2]
        return _norm_sq(module, x3, g3, state["mean"].view(B, 1, T), state["rstd"].view(B, 1, T), backend)


def supported_types() -> list[str]:
    return sorted(t.__name__ for t in RULES)
