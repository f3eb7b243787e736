"""Exact per-sample gradients by treating BatchNorm's batch statistics as variables (docs/math.md).

With s = (mu_k, var_k) the batch statistics of every BatchNorm call k, l_i(theta; X) =
F_i(theta, s(theta, X)), where F_i, the loss of sample i with the statistics held fixed, depends
on sample i alone. Hence (chain rule, s total functions of theta)

    g_i = f_i + J^T v_i,   f_i = dF_i/dtheta,  v_i = dF_i/ds,  J = ds/dtheta (total derivative).

Three phases, all exact:
1. One forward of the whole batch in train mode in which every BatchNorm computes its statistics
   explicitly (recorded with their autograd graph: J) and every nn.Dropout draws its mask once
   (recorded: one forward means one mask, the mask the autograd loop would see).
2. Per sample, F_i with the recorded statistics and masks injected: torch.func.vmap(grad) over
   chunks of samples gives f_i and v_i (the per-sample head, never recomputed per seed).
3. J^T v_i per BatchNorm call k: either seed-batched backward passes of the statistics with the
   seeds v_ik (one per sample, "B route"), or 2 C_k passes forming J_k's rows once, then a GEMM
   with V_k ("S route"); per call the smaller of B and 2 C_k (S route only while J_k fits a
   memory budget). Passes for a low BatchNorm only traverse the graph below it.
The per-parameter squared norms ||f_i + J^T v_i||^2 are formed per chunk of samples, so at most a
chunk x P slab of gradients is alive (plus J_k for S-route calls).

It refuses (raises Unsupported, and the caller falls back to the seed-batched VJP engine) when it
cannot be sure: vmap fails on some op, targets that are not a batch tensor, or the per-sample
losses of phase 2 differ from the batch forward's (a cross-sample coupling other than BatchNorm
modules, e.g. a functional batch_norm or dropout call inside a custom forward).
"""
from __future__ import annotations

import contextlib
import warnings

import torch
import torch.nn as nn

from ._parallel import map_passes

_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
# S route only while the J_k of all S-route calls (2 C_k x P entries each) stay below this many bytes.
S_ROUTE_BYTES = 256 * 2**20
# phase-2 per-sample losses must reproduce the batch forward's to this relative accuracy
_LOSS_RTOL = {torch.float64: 1e-9, torch.float32: 1e-4}


class Unsupported(Exception):
    """This engine cannot vouch for the model; the message says why (the caller falls back)."""


class NotCheaper(Exception):
    """The coupled plan needs at least as many backward passes as the seed loop (policy, not a
    limitation): the caller runs the general engine instead, without a warning, on `losses`, the
    per-sample losses of the batch forward already done (one forward: one set of dropout masks)."""

    def __init__(self, message, losses):
        super().__init__(message)
        self.losses = losses


class _Tape:
    """Phase 1 records BatchNorm statistics and dropout masks in call order; phase 2 replays them."""

    def __init__(self):
        self.recording = True
        self.stats: list = []      # [(module, mu [C], var [C])], with graph
        self.masks: list = []      # [mask [B, ...]]
        self.replay_stats: list = []
        self.replay_masks: list = []
        self.k_stats = 0
        self.k_masks = 0
        self.bn_inputs: list = []
        self.outputs: list = []     # (Linear/Conv module, its output) in phase 1   # the tensors the BatchNorm calls received (phase 1)

    def replay(self, stats, masks):
        self.recording = False
        self.replay_stats, self.replay_masks = stats, masks
        self.k_stats = self.k_masks = 0


class _BatchNormStats(torch.autograd.Function):
    """Train-mode BatchNorm returning its batch statistics as outputs: (y, mu, var), biased var.

    Backward (dy, dmu, dvar): the fused native BatchNorm backward for dy, plus the statistics' own
    derivatives d mu / dx = 1/M, d var / dx_j = 2 (x_j - mu) / M. The phase-1 graph of the coupled
    engine, whose passes from the statistics (J^T v) cross every lower BatchNorm this way.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight, bias, eps):
        # the statistics exactly as the per-sample replay (phase 2) uses them, so both phases agree
        # to rounding even where f_i and J^T v_i nearly cancel
        var, mean = torch.var_mean(x, dim=[0] + list(range(2, x.dim())), unbiased=False)
        invstd = torch.rsqrt(var + eps)
        shape = [1, -1] + [1] * (x.dim() - 2)
        y = (x - mean.view(shape)) * invstd.view(shape)
        if weight is not None:
            y = y * weight.view(shape)
        if bias is not None:
            y = y + bias.view(shape)
        return y, mean, var, invstd

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, eps = inputs
        _, save_mean, _, save_invstd = output
        ctx.save_for_backward(x, weight, save_mean, save_invstd)
        ctx.eps = eps
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(save_invstd)

    @staticmethod
    def backward(ctx, dy, dmu, dvar, _dinvstd):
        x, weight, mean, invstd = ctx.saved_tensors
        shape = [1, -1] + [1] * (x.dim() - 2)
        M = x.numel() // x.shape[1]
        dx = dw = db = None
        if dy is not None:
            need_w = weight is not None and ctx.needs_input_grad[1]
            need_b = ctx.needs_input_grad[2]
            dx, dw, db = torch.ops.aten.native_batch_norm_backward(
                dy, x, weight, None, None, mean, invstd, True, ctx.eps, [True, need_w, need_b])
        if dvar is not None:
            add = (x - mean.view(shape)) * (dvar * (2.0 / M)).view(shape)
            dx = add if dx is None else dx + add
        if dmu is not None:
            add = (dmu / M).view(shape).expand_as(x)
            dx = add if dx is None else dx + add
        return dx, dw, db, None


def _bn_stats(x, weight, bias, eps):
    """(y, mu, var) of a train-mode BatchNorm, all three differentiable (_BatchNormStats)."""
    y, mu, var, _ = _BatchNormStats.apply(x, weight, bias, eps)
    return y, mu, var


def _bn_forward(module, tape):
    def forward(x):
        if not (module.training or module.running_mean is None):
            raise Unsupported(f"BatchNorm {type(module).__name__} is in eval mode inside a train-mode forward")
        shape = [1, -1] + [1] * (x.dim() - 2)
        if tape.recording:
            tape.bn_inputs.append(x)
            x = x.view_as(x)          # one entry edge into the producer's graph node (see _zero_biases)
            if x.numel() // x.shape[1] <= 1:
                raise ValueError(f"Expected more than 1 value per channel when training, got input size {x.size()}")
            y, mu, var = _bn_stats(x, module.weight, module.bias, module.eps)
            tape.stats.append((module, mu, var))
            return y
        if tape.k_stats >= len(tape.replay_stats):
            raise Unsupported("BatchNorm called more often than in the batch forward")
        mu, var = tape.replay_stats[tape.k_stats]
        tape.k_stats += 1
        y = (x - mu.view(shape)) * torch.rsqrt(var.view(shape) + module.eps)
        if module.weight is not None:
            y = y * module.weight.view(shape)
        if module.bias is not None:
            y = y + module.bias.view(shape)
        return y
    return forward


def _dropout_forward(module, tape):
    orig = type(module).forward

    def forward(x):
        if not module.training:
            return x
        if tape.recording:
            mask = orig(module, torch.ones_like(x)).detach()   # same shape -> the same random draws
            tape.masks.append(mask)
        else:
            if tape.k_masks >= len(tape.replay_masks):
                raise Unsupported("dropout called more often than in the batch forward")
            mask = tape.replay_masks[tape.k_masks]
            tape.k_masks += 1
        return x * mask
    return forward


@contextlib.contextmanager
def _patched(model, tape):
    patched = []
    handles = []
    try:
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)):
                handles.append(m.register_forward_hook(
                    lambda mod, a, o: tape.outputs.append((mod, o, a[0] if a else None)) if tape.recording else None))
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                if type(m).forward is not nn.modules.batchnorm._BatchNorm.forward:
                    # e.g. ghost (virtual-batch) BN: its own statistics, not the whole batch's
                    raise Unsupported(f"{type(m).__name__} overrides BatchNorm's forward; the coupled path "
                                      "models torch's whole-batch BatchNorm only")
                m.forward = _bn_forward(m, tape)
                patched.append(m)
            elif isinstance(m, _DROPOUTS):
                m.forward = _dropout_forward(m, tape)
                patched.append(m)
        yield
    finally:
        for m in patched:
            del m.forward
        for h in handles:
            h.remove()


def _consumer_counts(root) -> dict:
    """For every autograd node reachable from `root`: how many edges point to it."""
    counts: dict = {}
    seen = {root}
    stack = [root]
    while stack:
        node = stack.pop()
        for child, _ in node.next_functions:
            if child is None:
                continue
            counts[child] = counts.get(child, 0) + 1
            if child not in seen:
                seen.add(child)
                stack.append(child)
    return counts


def _zero_biases(model, tape, losses, names) -> list:
    """Names of biases whose output feeds one BatchNorm (train mode) and nothing else: BN removes any
    per-channel shift of its input, so their exact per-sample gradient is exactly zero (docs/math.md).
    Proven from the graph: the BatchNorm's input is the module's output tensor itself and the node
    producing it has exactly one consumer (the BatchNorm's entry view)."""
    if losses.grad_fn is None:
        return []
    counts = _consumer_counts(losses.grad_fn)
    by_id = {id(p): n for n, p in zip(names, [dict(model.named_parameters())[n] for n in names])}
    out = []
    for module, produced, _ in tape.outputs:
        bias = getattr(module, "bias", None)
        if not isinstance(bias, torch.nn.Parameter) or id(bias) not in by_id:
            continue
        if any(produced is x for x in tape.bn_inputs) and produced.grad_fn is not None \
                and counts.get(produced.grad_fn, 0) == 1:
            out.append(by_id[id(bias)])
    return out


def _reachable(roots) -> set:
    seen = set(r for r in roots if r is not None)
    stack = list(seen)
    while stack:
        node = stack.pop()
        for child, _ in node.next_functions:
            if child is not None and child not in seen:
                seen.add(child)
                stack.append(child)
    return seen


def _ownership(model, params, called_modules):
    """(index of each trainable parameter, how many modules own each parameter, how often each module
    was called in the forward), keyed by id."""
    index = {id(p): q for q, p in enumerate(params)}
    owners: dict = {}
    for m in model.modules():
        for p in m.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    calls: dict = {}
    for module in called_modules:
        calls[id(module)] = calls.get(id(module), 0) + 1
    return index, owners, calls


def _sole_producer(x, outputs, counts, owners, calls):
    """(module, z, u, own params) when the BatchNorm input x is the output z of one Linear/Conv call
    (not transposed, called once, parameters owned by it alone) consumed by that BatchNorm only; else
    None. `outputs`: the (module, output, input) records of the forward."""
    hit = [(m, o, u) for m, o, u in outputs if o is x]
    if len(hit) != 1:
        return None
    module, z, u = hit[0]
    if getattr(module, "transposed", False) or calls[id(module)] != 1 or z.grad_fn is None \
            or counts.get(z.grad_fn, 0) != 1:
        return None
    own = [p for p in (module.weight, getattr(module, "bias", None)) if p is not None]
    if any(owners.get(id(p), 0) != 1 for p in own):
        return None
    return module, z, u, own


def _closed_form_producers(model, tape, losses, names, params) -> dict:
    """BatchNorm calls k whose input z_k is the output of a Linear/Conv module m_k used once, with
    unshared parameters, consumed by that BatchNorm only. Then (docs/math.md, the layer beneath a BN)
        d mu_kc / d W_k = (1/M) row c of VJP(z_k; ones),  d var_kc / d W_k = (2/M) row c of VJP(z_k; z_k - mu_k)
    (row c of W_k feeds channel c only), the same for the bias. Returns {k: info}: "q" (indices of
    m_k's trainable parameters), "rows" (the two VJPs per parameter), "input_free" (m_k's input
    depends on no parameter: J_k is this block alone) and "top" (no other BatchNorm's statistics
    depend on z_k: no other pass needs W_k)."""
    if losses.grad_fn is None:
        return {}
    counts = _consumer_counts(losses.grad_fn)
    index, owners, calls = _ownership(model, params, [module for module, _, _ in tape.outputs])
    stat_nodes = [mu.grad_fn for _, mu, _ in tape.stats]
    out = {}
    for k, x in enumerate(tape.bn_inputs[:len(tape.stats)]):
        found = _sole_producer(x, tape.outputs, counts, owners, calls)
        if found is None:
            continue
        module, z, u, own = found
        q = [index[id(p)] for p in own if id(p) in index]
        if not q:
            continue
        others = [n for j, n in enumerate(stat_nodes) if j != k]
        top = z.grad_fn not in _reachable(others)
        out[k] = {"q": q, "z": z, "M": z.numel() // z.shape[1],
                  "input_free": u is None or not u.requires_grad, "top": top}
    return out


def _closed_form_rows(c, mu, params) -> None:
    """Adds the two VJPs of `_closed_form_producers` to its entry c (only for the entries used)."""
    z = c.pop("z")
    shape = [1, -1] + [1] * (z.dim() - 2)
    ps = [params[i] for i in c["q"]]
    c["r1"] = torch.autograd.grad(z, ps, grad_outputs=torch.ones_like(z), retain_graph=True)
    c["rz"] = torch.autograd.grad(z, ps, grad_outputs=(z.detach() - mu.detach().view(shape)), retain_graph=True)


def _chunks(B, c):
    return [list(range(s, min(B, s + c))) for s in range(0, B, c)]


def batched_seeds_default(device) -> bool:
    """Seed-batched backward (is_grads_batched, one vmapped pass per chunk) on GPUs; one pass per seed on
    CPU, where the batching rules of the convolution backward make the batched pass ~3x slower than
    the passes one by one (measured, torch 2.13, 2 threads)."""
    return torch.device(device).type != "cpu"


def _batched_vjp(outputs, params, seeds, batched=True):
    """sum_k J_k^T seeds_k for a batch of seeds ([c, *out.shape] each) -> [c, *p.shape] or None per param."""
    if batched and seeds[0].shape[0] > 1:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*(batching rule|performance drop|vmap).*")
            try:
                return torch.autograd.grad(outputs, params, grad_outputs=seeds, is_grads_batched=True,
                                           retain_graph=True, allow_unused=True)
            except (RuntimeError, NotImplementedError):   # an op without a batching rule: one by one
                pass
    per = map_passes(lambda r: torch.autograd.grad(outputs, params, grad_outputs=[s[r] for s in seeds],
                                                   retain_graph=True, allow_unused=True),
                     range(seeds[0].shape[0]), seeds[0].device)
    return [None if per[0][q] is None else torch.stack([g[q] for g in per]) for q in range(len(params))]


def plan_routes(sizes, requires, closed_free, B, P, elem, route=None):
    """(plan, backward passes) of phase 3. Per BatchNorm call k (C_k = sizes[k] channels): "none" (its
    statistics depend on no parameter), "closed" (k in closed_free: J_k is the closed-form block of
    the layer beneath alone), else "S" (2 C_k < B while all S-route J_k together fit S_ROUTE_BYTES)
    or "B"; `route` forces "B" / "S" where a route is needed. Passes: B if any call takes the B route,
    plus 2 C_k per S-route call. Shared by coupled_sq_norms and the policy pre-check (the same plan)."""
    plan = []
    j_bytes = 0                     # all S-route J_k together stay within S_ROUTE_BYTES
    for k, C in enumerate(sizes):
        need = 2 * C * P * elem
        s_ok = j_bytes + need <= S_ROUTE_BYTES
        r = route or ("S" if (2 * C < B and s_ok) else "B")
        if not requires[k]:
            r = "none"      # statistics of an input no parameter feeds: J_k = 0
        elif k in closed_free:
            r = "closed"    # J_k is the closed-form block of the layer beneath alone
        if r == "S":
            j_bytes += need
        plan.append(r)
    n_passes = (B if any(r == "B" for r in plan) else 0) + sum(2 * sizes[k] for k, r in enumerate(plan) if r == "S")
    return plan, n_passes


def policy_precheck(model, loss_fn, args, targets, names, params, B):
    """The CPU policy decided on one plain forward (native BatchNorm), before any coupled work.

    Returns (losses, reason): the per-sample losses of that forward (its graph, its dropout masks) and,
    when the coupled plan would need >= B backward passes, the reason (the caller runs the seed loop on
    these losses: one forward in all); reason None when the coupled path may pay off or when the plan
    cannot be read off a plain forward (then the caller rewinds the RNG and runs the coupled path,
    which decides, refuses or warns exactly as without this pre-check). The plan is plan_routes on
    what _closed_form_producers reads in the coupled forward: per BatchNorm call its channel count,
    whether its statistics require grad, whether the layer beneath is a closed-form block on an input
    no parameter feeds. Caller sets train mode, enable_grad and restores the model's state."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if targets is not None and not isinstance(targets, torch.Tensor):
        return None, None
    for m in bns:
        if type(m).forward is not nn.modules.batchnorm._BatchNorm.forward or not m.training:
            return None, None
    outputs, bn_calls = [], []
    handles = []
    try:
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)):
                handles.append(m.register_forward_hook(
                    lambda mod, a, o: outputs.append((mod, o, a[0] if a else None))))
        for m in bns:
            handles.append(m.register_forward_pre_hook(lambda mod, a: bn_calls.append((mod, a[0]))))
        losses = loss_fn(model(*args), targets)
    finally:
        for h in handles:
            h.remove()
    if not isinstance(losses, torch.Tensor) or tuple(losses.shape) != (B,) or losses.grad_fn is None \
            or not bn_calls:
        return losses, None
    counts = _consumer_counts(losses.grad_fn)
    index, owners, calls = _ownership(model, params, [module for module, _, _ in outputs])
    sizes, requires, free = [], [], set()
    for k, (bn, x) in enumerate(bn_calls):
        sizes.append(x.shape[1])
        requires.append(bool(x.requires_grad or any(t is not None and t.requires_grad for t in (bn.weight, bn.bias))))
        found = _sole_producer(x, outputs, counts, owners, calls)
        if found is None or not any(id(p) in index for p in found[3]):
            continue
        module, z, u, own = found
        if u is None or not u.requires_grad:
            free.add(k)
    plan, n_passes = plan_routes(sizes, requires, free, B, sum(p.numel() for p in params), params[0].element_size())
    policy_precheck.last_plan = (plan, n_passes)      # for tests: the plan the decision was made on
    if n_passes >= B:
        return losses, f"the coupled plan needs {n_passes} backward passes, the seed loop {B}"
    return losses, None


def coupled_sq_norms(model, loss_fn, args, targets, names, params, acc, B, chunk, route=None, batched=None,
                     only_if_fewer_passes=False):
    """{name: [B] squared exact per-sample gradient norms}, plus a dict describing what ran.

    `route`: None (per BatchNorm call, the cheaper of "B" and "S"), or force "B" / "S" (tests).
    `only_if_fewer_passes`: raise NotCheaper when the plan needs >= B backward passes (B-route
    seeds plus S-route rows), i.e. no fewer than the general engine's B.
    Raises Unsupported when it cannot vouch for the model. Caller sets train mode and restores state.
    """
    from torch.func import functional_call, grad, vmap

    if batched is None:
        batched = batched_seeds_default(args[0].device)

    if targets is not None and not isinstance(targets, torch.Tensor):
        raise Unsupported(f"targets of type {type(targets).__name__} cannot be split per sample")
    tape = _Tape()
    with _patched(model, tape):
        # phase 1: the batch forward, statistics with their graph
        out = model(*args)
        losses = loss_fn(out, targets)
        if not isinstance(losses, torch.Tensor) or tuple(losses.shape) != (B,):
            return None, {"losses": losses}     # the caller's check_losses reports it
        if isinstance(out, torch.Tensor) and out.dim() and out.shape[0] == B and losses.requires_grad:
            from .exact_chain import ChainUnsupported, per_sample_loss_grads
            try:                              # phase 2 below splits the loss per sample: it must be per sample
                per_sample_loss_grads(loss_fn, out, targets, losses)
            except ChainUnsupported as exc:
                raise Unsupported(str(exc)) from exc
        zero = _zero_biases(model, tape, losses, names)
        closed = _closed_form_producers(model, tape, losses, names, params) if route is None else {}
        tape.outputs, tape.bn_inputs = [], []
        stats = [(mu, var) for _, mu, var in tape.stats]
        masks = list(tape.masks)
        stat_leaves = [t.detach() for pair in stats for t in pair]
        pdict = {n: p.detach() for n, p in zip(names, params)}

        def F(pd, st, mk, xs, t):
            tape.replay([(st[2 * k], st[2 * k + 1]) for k in range(len(st) // 2)],
                        [m.unsqueeze(0) for m in mk])
            out = functional_call(model, pd, tuple(x.unsqueeze(0) for x in xs))
            loss = loss_fn(out, None if t is None else t.unsqueeze(0))
            if tape.k_stats != len(tape.replay_stats) or tape.k_masks != len(tape.replay_masks):
                raise Unsupported("the per-sample forward did not call every BatchNorm/dropout of the batch forward")
            loss = loss.reshape(())
            return loss, loss.detach()

        in_dims = (None, None, 0, 0, None if targets is None else 0)
        per_sample = vmap(grad(F, argnums=(0, 1), has_aux=True), in_dims=in_dims)
        dt = params[0].dtype
        rtol = _LOSS_RTOL.get(dt, 1e-2)
        lscale = losses.detach().abs().mean() + torch.finfo(losses.dtype).tiny

        # phase 3 plan: per BatchNorm call, B route (seeds v_i) or S route (J_k's 2 C_k rows)
        plan, n_passes = plan_routes([mu.numel() for mu, _ in stats], [mu.requires_grad for mu, _ in stats],
                                     {k for k, c in closed.items() if c["input_free"]}, B,
                                     sum(p.numel() for p in params), params[0].element_size(), route)
        if only_if_fewer_passes and n_passes >= B:
            raise NotCheaper(f"the coupled plan needs {n_passes} backward passes, the seed loop {B}", losses)
        # closed forms used: J_k alone ("closed") or W_k's block of a top BatchNorm (no pass needs W_k)
        # closed forms used: J_k alone ("closed"), W_k's block of a top BatchNorm (no pass needs W_k), and
        # W_k's block of an S-route call (its 2 C_k row passes leave W_k out: no weight-gradient GEMM)
        closed = {k: c for k, c in closed.items()
                  if plan[k] in ("closed", "S") or (c["top"] and plan[k] != "none")}
        # parameters whose J blocks are all closed form: no pass needs them (autograd skips their GEMMs)
        for k, c in closed.items():
            _closed_form_rows(c, stats[k][0], params)
        skip = {q for c in closed.values() if c["top"] for q in c["q"]}
        pass_q = [q for q in range(len(params)) if q not in skip]

        def vjp(outs, seeds, qs=pass_q):
            ps = [params[q] for q in qs]
            g = _batched_vjp(outs, ps, seeds, batched) if ps else []
            full = [None] * len(params)
            for q, gq in zip(qs, g):
                full[q] = gq
            return full
        J = {}
        for k, r in enumerate(plan):
            if r != "S":
                continue
            mu, var = stats[k]
            C = mu.numel()
            own = set(closed[k]["q"]) if k in closed else set()   # added in closed form below
            qs = [q for q in pass_q if q not in own]
            eye = torch.eye(2 * C, dtype=mu.dtype, device=mu.device)
            rows = [None] * len(params)
            for ch in _chunks(2 * C, chunk):
                e = eye[ch]
                g = vjp([mu, var], [e[:, :C], e[:, C:]], qs)
                rows = [None if gq is None else (gq if rq is None else torch.cat([rq, gq])) for rq, gq in zip(rows, g)]
            J[k] = rows                     # per param [2C, *p.shape]
        b_calls = [k for k, r in enumerate(plan) if r == "B"]

        sq = {n: torch.zeros(B, dtype=acc, device=losses.device) for n in names}
        for ch in _chunks(B, chunk):
            idx = torch.tensor(ch, device=losses.device)
            xs = [a[idx] for a in args]
            t = None if targets is None else targets[idx]
            mk = [m[idx] for m in masks]
            try:
                (f, v), l2 = per_sample(pdict, stat_leaves, mk, xs, t)
            except Unsupported:
                raise
            except Exception as exc:   # no vmap rule, data-dependent control flow, ...
                raise Unsupported(f"per-sample vmap failed: {type(exc).__name__}: {exc}") from exc
            l1 = losses.detach()[idx]
            if not bool(((l2 - l1).abs() <= rtol * (l1.abs() + lscale)).all()):
                raise Unsupported("the per-sample losses with BatchNorm statistics held fixed differ from the batch "
                                  "forward's: the model couples samples other than through BatchNorm modules")
            jtv = [None] * len(params)
            for k in J:
                Vk = torch.cat([v[2 * k], v[2 * k + 1]], dim=1)          # [c, 2C]
                for q, Jq in enumerate(J[k]):
                    if Jq is not None:
                        add = (Vk @ Jq.reshape(Jq.shape[0], -1)).reshape(len(ch), *Jq.shape[1:])
                        jtv[q] = add if jtv[q] is None else jtv[q] + add
            for k, c in closed.items():
                vmu, vvar = v[2 * k] / c["M"], v[2 * k + 1] * (2.0 / c["M"])
                for q, r1, rz in zip(c["q"], c["r1"], c["rz"]):
                    add = (torch.einsum("ic,c...->ic...", vmu, r1) + torch.einsum("ic,c...->ic...", vvar, rz))
                    jtv[q] = add if jtv[q] is None else jtv[q] + add
            if b_calls:
                outs = [t_ for k in b_calls for t_ in stats[k]]
                seeds = [v[2 * k + j] for k in b_calls for j in (0, 1)]
                g = vjp(outs, seeds)
                jtv = [gq if jq is None else (jq if gq is None else jq + gq) for jq, gq in zip(jtv, g)]
            for q, n in enumerate(names):
                gi = f[n] if jtv[q] is None else f[n] + jtv[q]
                sq[n][ch] = gi.to(acc).reshape(len(ch), -1).square().sum(1)
    for n in zero:
        sq[n].zero_()
    info = {"bn_calls": len(stats), "routes": plan, "passes": n_passes, "closed_form": sorted(closed), "dropout_masks": len(masks), "zero_biases": zero}
    return sq, info
