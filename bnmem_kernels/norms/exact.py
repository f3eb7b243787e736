"""Exact per-sample gradient norms through BatchNorm's cross-sample coupling (mode="exact").

    exact_per_sample_grad_norms(model, loss_fn, inputs, targets, *, per_layer=False, backend=None,
                                max_chunk=None) -> Tensor[B] | (Tensor[B], {name: Tensor[B]})

g_i = d l_i(theta; X) / d theta with BatchNorm in train mode (batch statistics), the numbers of
the autograd loop `reference.per_sample_grad_norms(..., mode="exact")`, in bounded memory.

Paths (`exact_report` says which ran and why):
- "chain" (exact_chain.py): an nn.Sequential of known layers (Conv2d, Linear, BatchNorm1d/2d,
  elementwise activations, dropout, max/avg pooling, Flatten). A hand-written backward of all seeds
  at once: the per-sample part as one batch backward, BatchNorm's coupling part per chunk of seeds
  in closed forms (affine terms under each BatchNorm, the gradient on a max pool's maxima only).
  Tried first by "auto"; a model it does not model goes on to the paths below (report["chain"]
  says why), with no warning: it is a choice of engine, not a change of numbers.
- "coupled" (exact_coupled.py): BatchNorm statistics as variables, g_i = f_i + J^T v_i; the
  per-sample part by torch.func.vmap over samples, J^T v_i by seed-batched backward passes of the
  statistics only (or J's 2C rows per BatchNorm when 2C < B). Taken whenever it can vouch for the
  model: every cross-sample coupling goes through BatchNorm modules (checked: the per-sample losses
  with statistics held fixed must reproduce the batch forward's), and every op has a vmap rule.
- "seed_batched" (exact_fallback.py): any model. One forward, then batched VJPs of chunks of
  per-sample losses (is_grads_batched), or one seed at a time where an op has no batching rule.
  Taken when "coupled" refuses (a warning, once per reason, says so), and on CPU when the coupled
  plan needs no fewer backward passes than B (policy, no warning: the passes cost the same there;
  e.g. a 3-conv BN-CNN at B = 64, where the coupled plan needs 64 passes, but not at B = 256). That
  decision is read off one plain forward (exact_coupled.policy_precheck: the same plan_routes on the
  same graph facts), whose losses the loop then uses: one forward in all, as the loop's own.
All give the loop's numbers (the paths differ only by rounding); none changes numbers silently.

Dropout: one forward means one mask. Both paths use the masks of their single batch forward,
as the autograd loop does after its one forward (with the same RNG state, the same masks).
`max_chunk`: at most this many samples per per-sample (vmap) chunk and seeds per batched pass;
None -> DEFAULT_CHUNK (on the chain path chain_default_chunk(B): CHAIN_CHUNK seeds, at most half the
batch). Memory grows with the chunk. On CPU the seed passes run one seed at a time
(torch's batched backward, is_grads_batched, measured ~3x slower there), spread over worker threads
with one intra-op thread each (norms/_parallel.py; BNMEM_PASS_THREADS sets their number, default
torch.get_num_threads()); on GPUs batched per chunk.
`backend`: on the chain path, where the pooled_conv_weight_grad kernel runs (the weight gradients on
max-pool maxima); the other paths run PyTorch ops on the inputs' device and only validate it.
The chain path keeps its large buffers between calls (exact_chain.release_workspaces(); at most
BNMEM_EXACT_POOL_MB MiB, default 256, 0 disables).
The model is left exactly as it was (training flags, buffers incl. BN running stats and
num_batches_tracked, .grad, hooks).
"""
from __future__ import annotations

import warnings

import torch

from .. import _backend
from ._checks import check_call, check_losses, result_dtype, trainable_parameters
from ._state import preserved_model_state, set_mode

DEFAULT_CHUNK = 16
# seeds per chunk of the chain engine when max_chunk is None: memory grows with it, speed up to ~16
# (bench CNN, B = 64, 2 threads: 12 -> 53.5 ms, 16 -> 48-52 ms; peak memory 3.2x one plain fwd+bwd)
CHAIN_CHUNK = 16


def chain_default_chunk(B: int) -> int:
    """CHAIN_CHUNK, but at most half the batch (at least 4): at small B the engine's fixed buffers weigh
    more against one plain forward+backward (bench CNN: B = 16 at 16 seeds 4.2x, at 8 seeds 3.0x)."""
    return min(B, CHAIN_CHUNK, max(4, B // 2))


class ExactFallbackWarning(UserWarning):
    """mode="exact" ran on the general seed-batched engine (same numbers, slower); says why."""


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _get_rng(device):
    device = torch.device(device)
    return torch.get_rng_state(), (device, torch.cuda.get_rng_state(device)) if device.type == "cuda" else None


def _set_rng(state):
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda[1], cuda[0])


def exact_report(model, loss_fn, inputs, targets, *, per_layer=False, backend=None, max_chunk=None,
                 path="auto", route=None):
    """Run mode="exact" and return (result, report): report = {"path": "coupled" | "seed_batched",
    "reason": why the general engine ran ("" otherwise; "policy: ..." when the coupled plan would
    need no fewer backward passes than the seed loop on CPU, where passes are not batched),
    "chunk": ..., "routes": per BatchNorm call, "passes": backward passes of the coupled plan}.

    `path`: "auto" (chain, else coupled, falling back when it refuses), "chain" / "coupled" (raise
    instead of falling back) or "seed_batched". `route`: None, "B" or "S" (force the coupled path's route; tests).
    """
    from .exact_chain import ChainUnsupported, chain_layers, chain_sq_norms
    from .exact_coupled import (NotCheaper, Unsupported, batched_seeds_default, coupled_sq_norms,
                                 policy_precheck)
    from .exact_fallback import seed_batched_sq_norms

    args, B = check_call(model, loss_fn, inputs, targets, "exact", max_chunk, per_layer)
    if backend is not None and backend != "auto" and backend not in _backend.BACKENDS:
        raise ValueError(f"unknown backend={backend!r}; choose one of {_backend.BACKENDS} or 'auto'")
    if path not in ("auto", "chain", "coupled", "seed_batched"):
        raise ValueError(f"path must be 'auto', 'chain', 'coupled' or 'seed_batched', got {path!r}")
    named = trainable_parameters(model)
    names = [n for n, _ in named]
    params = [p for _, p in named]
    out_dtype = result_dtype(model)
    acc = _acc(out_dtype)
    chunk = min(B, max_chunk or DEFAULT_CHUNK)
    report = {"path": None, "reason": "", "chunk": chunk}
    sq = None
    with preserved_model_state(model), torch.enable_grad():
        if path in ("auto", "chain") and route is None:
            # a Sequential chain of known layers: the hand-written seed-batched backward (exact_chain.py)
            rng = None
            try:
                layers = chain_layers(model)
                set_mode(model, "exact")
                rng = _get_rng(args[0].device)
                if len(args) != 1:
                    raise ChainUnsupported(f"{len(args)} inputs (a chain takes one)")
                ch = min(B, max_chunk) if max_chunk else chain_default_chunk(B)
                sq, info = chain_sq_norms(layers, loss_fn, args[0], targets, names, params, acc, B, ch, backend)
                if sq is None:
                    check_losses(info["losses"], B)
                report.update(info)
                report["path"], path = "chain", "done"
            except ChainUnsupported as exc:
                if path == "chain":
                    raise
                report["chain"] = str(exc)        # not a chain this engine models: the other paths
                if rng is not None:
                    _set_rng(rng)                 # the next forward draws the very same dropout masks
        if path in ("auto", "coupled"):
            set_mode(model, "exact")
            rng = _get_rng(args[0].device)
            # on CPU the passes run one by one and cost what the loop's do: the coupled path only
            # pays off when its plan needs fewer passes than B (S-route rows, closed forms)
            policy = path == "auto" and not batched_seeds_default(args[0].device)
            if policy and route is None:
                # decided on one plain forward whose losses the loop then uses (one forward in all;
                # native BatchNorm nodes make the seed passes cheaper than the coupled graph's)
                losses, why = policy_precheck(model, loss_fn, args, targets, names, params, B)
                if why is not None:
                    check_losses(losses, B)
                    report["reason"] = f"policy: {why}"
                    sq = seed_batched_sq_norms(losses, names, params, acc, chunk)
                    report["path"] = "seed_batched"
                    path = "done"
                else:
                    del losses
                    _set_rng(rng)       # the coupled forward draws the very same dropout masks
        if path in ("auto", "coupled"):
            try:
                sq, info = coupled_sq_norms(model, loss_fn, args, targets, names, params, acc, B, chunk, route,
                                            only_if_fewer_passes=policy)
                if sq is None:
                    check_losses(info["losses"], B)
                report.update(info)
                report["path"] = "coupled"
            except NotCheaper as exc:
                # the seed loop on a plain forward: its passes through native BatchNorm nodes are ~25%
                # cheaper than through the coupled graph's; the RNG goes back to where the coupled
                # forward started, so this forward draws the very same dropout masks
                report["reason"] = f"policy: {exc}"
                _set_rng(rng)
            except Unsupported as exc:
                if path == "coupled":
                    raise
                report["reason"] = str(exc)
                warnings.warn(f"bnmem exact mode: the coupled fast path does not apply ({exc}); running the general "
                              "seed-batched engine (same numbers, slower)", ExactFallbackWarning, stacklevel=3)
        if sq is None:
            set_mode(model, "exact")
            # after a refusal the RNG has moved on: this forward draws its own dropout masks (exact
            # for them, as one fresh forward is)
            losses = check_losses(loss_fn(model(*args), targets), B)
            sq = seed_batched_sq_norms(losses, names, params, acc, chunk)
            report["path"] = "seed_batched"
    total = torch.stack(list(sq.values())).sum(0).sqrt().to(out_dtype)
    result = total if not per_layer else (total, {n: v.sqrt().to(out_dtype) for n, v in sq.items()})
    return result, report


def exact_per_sample_grad_norms(model, loss_fn, inputs, targets, *, per_layer=False, backend=None,
                                max_chunk=None):
    """Exact per-sample gradient norms (BatchNorm's batch coupling included); see the module doc."""
    return exact_report(model, loss_fn, inputs, targets, per_layer=per_layer, backend=backend,
                        max_chunk=max_chunk)[0]
