"""Exact per-sample gradient norms through BatchNorm's cross-sample coupling (mode="exact").

    exact_per_sample_grad_norms(model, loss_fn, inputs, targets, *, per_layer=False, backend=None,
                                max_chunk=None) -> Tensor[B] | (Tensor[B], {name: Tensor[B]})

g_i = d l_i(theta; X) / d theta with BatchNorm in train mode (batch statistics), the numbers of
the autograd loop `reference.per_sample_grad_norms(..., mode="exact")`, in bounded memory.

Paths (`exact_report` says which ran and why: report["path"], report["why"]):
- "chain" (exact_chain.py): an nn.Sequential of known layers (Conv2d, Linear, BatchNorm1d/2d,
  elementwise activations, dropout, max/avg pooling, Flatten), or any module whose forward torch.fx
  traces to such a straight line (functional relu/pools/flatten read as their modules; the chain's
  output is checked against model(x) before use). A hand-written backward of all seeds
  at once: the per-sample part as one batch backward, BatchNorm's coupling part per chunk of seeds
  in closed forms (affine terms under each BatchNorm, the gradient on a max pool's maxima only).
  A model it does not model goes on to the paths below (report["chain"] says why), with no
  warning: it is a choice of engine, not a change of numbers.
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
- "loop": the autograd loop itself (one forward, one backward pass per sample with all of torch's
  intra-op threads, no worker threads); a legitimate route where it is the fastest.

path="auto" (the default): the first call on a model and batch runs the static rule (chain, else
coupled when its plan needs fewer passes than B, else seed_batched, as above). Later calls on the same
problem (same model object, module structure and hooks, input shapes and dtypes, thread count,
options) time the other candidate engines (SELECT_TRIALS calls each, one where a first call was more
than SELECT_GIVE_UP x the best) and then keep the fastest: "never slower than the loop" by
measurement, since the loop is a candidate. Timed by wall clock, or by CPU time where everything runs
on one thread (steadier on a shared machine). The chain engine's buffers are checked after each of its
runs: above CHAIN_ARENA_RATIO x the activations of a plain step its chunk shrinks on the next calls
(the first call may exceed it). BNMEM_EXACT_AUTO=static keeps the static rule on every call;
reset_exact_selection() forgets the timings. Each exploring call gives the loop's numbers too.
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

import os
import threading
import time
import warnings
import weakref

import torch

from .. import _backend
from ._checks import check_call, check_losses
from ._state import set_mode

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


PATHS = ("auto", "chain", "coupled", "seed_batched", "loop")
# auto: how many timed calls of each candidate engine before the choice is fixed (the minimum counts)
SELECT_TRIALS = 2
# a candidate slower than this multiple of the best so far after one trial gets no second one
SELECT_GIVE_UP = 2.0
# the chain engine's large buffers (its workspace arena, plus the chunk's per-seed parameter gradients of
# one layer) may hold at most this multiple of what a plain step keeps (activations + one gradient), so
# that its peak stays within ~4x a plain step's; above it, auto runs it with fewer seeds per chunk on the
# next calls (measured after each chain run, per model and batch)
CHAIN_ARENA_RATIO = 2.5


class _Selection:
    """What auto knows about one (model structure, inputs, threads) key: the candidate engines, their
    timed calls, the choice once every live candidate has had its trials."""

    def __init__(self):
        self.times: dict = {}       # engine -> [seconds of each timed call]
        self.dead: dict = {}        # engine -> why it cannot run here
        self.order: list = []       # candidates, in the order they are tried
        self.choice = None
        self.calls = 0
        self.chain_chunk = None     # seeds per chunk of the chain engine when its default used too much memory

    def chain_memory(self, report):
        """After a chain run: if its buffers exceeded CHAIN_ARENA_RATIO x the activations, the chunk for the
        next calls shrinks in proportion (and its timings so far are dropped); at one seed, it is out."""
        used = report.get("chunk", 1)
        ratio = (report.get("arena_bytes", 0) + used * report.get("seed_param_bytes", 0)) / max(
            report.get("act_bytes", 0) + report.get("param_bytes", 0), 1)
        if ratio <= CHAIN_ARENA_RATIO:
            return True
        if used <= 1:
            self.dead["chain"] = f"memory: its buffers {ratio:.1f}x the activations at one seed per chunk"
            return False
        self.chain_chunk = max(1, int(used * CHAIN_ARENA_RATIO / ratio))
        self.times.pop("chain", None)
        if self.choice == "chain":
            self.choice = None
        return False

    def start(self, first, report, device):
        """After the first (static) call: the candidates the static rule left alive."""
        cands = ["chain", "coupled", "seed_batched", "loop"]
        from ._parallel import pass_workers

        if "chain" in report:
            self.dead["chain"] = report["chain"]
        reason = report.get("reason", "")
        if first == "seed_batched" and reason:
            self.dead["coupled"] = reason     # policy (plan not cheaper) or refusal
        if torch.device(device).type == "cpu" and pass_workers(device) <= 1:
            self.dead["loop"] = "one pass worker: the seed_batched engine is the plain loop"
        self.order = [first] + [c for c in cands if c != first and c not in self.dead]

    def next_engine(self):
        """The engine for this call: the choice, else the next candidate short of its trials."""
        if self.choice is not None:
            return self.choice
        live = [e for e in self.order if e not in self.dead]
        best = min((min(t) for e, t in self.times.items() if t and e not in self.dead), default=None)
        for trial in range(1, SELECT_TRIALS + 1):
            for e in live:
                t = self.times.get(e, [])
                if len(t) >= trial:
                    continue
                if t and best is not None and min(t) > SELECT_GIVE_UP * best:
                    continue                    # clearly slower: no second trial
                return e
        timed = {e: min(self.times[e]) for e in live if self.times.get(e)}
        self.choice = min(timed, key=timed.get) if timed else None
        return self.choice

    def why(self, engine):
        ms = {e: round(1e3 * min(t), 2) for e, t in self.times.items() if t}
        if self.choice is not None:
            return (f"timed: {engine} was the fastest of the engines tried on this model and batch "
                    f"(best ms per call {ms}; not run here: {self.dead or 'none'})")
        return f"exploring: timing {engine} (best ms so far {ms}); the fastest is kept once each has run"


_SELECTIONS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_SEL_LOCK = threading.Lock()


def reset_exact_selection(model=None) -> None:
    """Forget what auto timed (for `model`, or for every model)."""
    with _SEL_LOCK:
        if model is None:
            _SELECTIONS.clear()
        else:
            _SELECTIONS.pop(model, None)


def _selection_key(plan, args, targets, max_chunk, backend, per_layer):
    """What makes two calls the same problem for the engines: the module structure (the plan's
    fingerprint: modules, parameters, dtypes, patched forwards), the hooks, input shapes/dtypes/devices,
    targets' shape, threads and options."""
    hooks = tuple(len(d) for m in plan.modules for d in (m._forward_hooks, m._forward_pre_hooks,
                                                          m._backward_hooks, m._backward_pre_hooks))
    ins = tuple((tuple(a.shape), a.dtype, str(a.device)) for a in args)
    tgt = (tuple(targets.shape), targets.dtype) if isinstance(targets, torch.Tensor) else type(targets)
    return (plan.fingerprint, hooks, ins, tgt, torch.get_num_threads(), max_chunk, backend, per_layer)


def _selection_mode(selection=None) -> str:
    mode = selection if selection is not None else os.environ.get("BNMEM_EXACT_AUTO", "timed")
    if mode not in ("timed", "static"):
        what = "selection" if selection is not None else "BNMEM_EXACT_AUTO"
        raise ValueError(f"{what} must be 'timed' or 'static', got {mode!r}")
    return mode


def exact_report(model, loss_fn, inputs, targets, *, per_layer=False, backend=None, max_chunk=None,
                 path="auto", route=None, selection=None):
    """Run mode="exact" and return (result, report): report = {"path": the engine that ran ("chain" |
    "coupled" | "seed_batched" | "loop"), "why": why that engine, "reason": why the general engine ran
    ("" otherwise; "policy: ..." when the coupled plan would need no fewer backward passes than the
    seed loop on CPU, where passes are not batched), "chunk": ..., "routes": per BatchNorm call,
    "passes": backward passes of the coupled plan, "chain": why the chain engine did not apply}.

    `path`: "auto" (see the module doc: the static rule on the first call of a model and batch, then
    the fastest engine by timing), "chain" / "coupled" (raise instead of falling back), "seed_batched"
    or "loop" (the autograd loop: one forward, one backward pass per sample). `route`: None, "B" or "S"
    (force the coupled path's route; tests). `selection` (path="auto" only): "timed" (the fastest engine
    by timing after the first call) or "static" (the static rule on every call: the same engine, so the
    same rounding, run after run: what a reproducible study wants); None -> BNMEM_EXACT_AUTO, default
    "timed".
    """
    args, B = check_call(model, loss_fn, inputs, targets, "exact", max_chunk, per_layer)
    if backend is not None and backend != "auto" and backend not in _backend.BACKENDS:
        raise ValueError(f"unknown backend={backend!r}; choose one of {_backend.BACKENDS} or 'auto'")
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    from .onepass import model_plan, plan_preserved_state

    plan = model_plan(model)                  # modules, trainable names, buffers: cached between calls
    named = plan.named
    names = [n for n, _ in named]
    params = [p for _, p in named]
    out_dtype = params[0].dtype               # (_checks.result_dtype)
    acc = _acc(out_dtype)
    chunk = min(B, max_chunk or DEFAULT_CHUNK)
    sel = None
    if path == "auto" and route is None and _selection_mode(selection) == "timed":
        key = _selection_key(plan, args, targets, max_chunk, backend, per_layer)
        with _SEL_LOCK:
            per_model = _SELECTIONS.setdefault(model, {})
            sel = per_model.get(key)
            if sel is None:
                sel = per_model[key] = _Selection()
    # the selection's clock: CPU time where the engines run on one thread (steadier on a shared machine),
    # else wall time (worker threads and intra-op threads: what the user waits for)
    from ._parallel import pass_workers
    clock = time.process_time if torch.get_num_threads() == 1 and pass_workers(args[0].device) == 1 \
        and args[0].device.type == "cpu" else time.perf_counter
    cuda = args[0].device.type == "cuda"
    if cuda and sel is not None:
        torch.cuda.synchronize(args[0].device)     # time the work, not the launches
    t0 = clock()
    first_call = False
    with plan_preserved_state(plan), torch.enable_grad():
        sq = report = None
        engine = sel.next_engine() if sel is not None and sel.calls else None
        if engine is not None:
            rng = _get_rng(args[0].device)
            try:
                mc = sel.chain_chunk if engine == "chain" and sel.chain_chunk and not max_chunk else max_chunk
                sq, report = _run(engine, model, loss_fn, args, targets, names, params, acc, B, chunk, mc,
                                  backend, None, timed_auto=True)
                report["why"] = sel.why(engine)
            except _NotCheaperHere as exc:      # the coupled plan: no fewer passes than the loop
                sel.dead[engine] = str(exc)
                sq, report = exc.result
                report["why"] = f"exploring: {exc}; the seed loop ran on the same forward"
                sel = None                      # not a clean timing of either engine
            except _Refused as exc:             # e.g. a hook added since: the static rule below
                sel.dead[engine] = str(exc)
                sel.choice = None
                _set_rng(rng)
        if sq is None:
            sq, report = _run(path, model, loss_fn, args, targets, names, params, acc, B, chunk, max_chunk,
                              backend, route)
            if path != "auto":
                report["why"] = f"path={path!r} asked for"
            elif report["path"] == "chain":
                report["why"] = "static rule: a chain of layers the chain engine models"
            else:
                report["why"] = (f"static rule: not a chain ({report.get('chain')}); "
                                 + (report["reason"] or f"the coupled plan needs {report.get('passes')} passes < B"))
            if sel is not None and not sel.calls:
                sel.start(report["path"], report, args[0].device)
                report["why"] += "; later calls on this model and batch time the other engines"
                first_call = True       # its time holds one-time costs (imports, buffers): not recorded
    if cuda and sel is not None:
        torch.cuda.synchronize(args[0].device)
    elapsed = clock() - t0
    if sel is not None:
        with _SEL_LOCK:
            sel.calls += 1
            ok = report["path"] != "chain" or sel.chain_memory(report)
            if ok and report["path"] not in sel.dead and not first_call:
                sel.times.setdefault(report["path"], []).append(elapsed)
    report["seconds"] = elapsed
    total = torch.stack(list(sq.values())).sum(0).sqrt().to(out_dtype)
    result = total if not per_layer else (total, {n: v.sqrt().to(out_dtype) for n, v in sq.items()})
    return result, report


def _output_check(model, x):
    """For a chain read off an fx trace: the chain forward's output must be model(x)'s (same ops, so equal
    to rounding), else ChainUnsupported (the trace did not capture what the forward does)."""
    from .exact_chain import ChainUnsupported

    def check(out):
        with torch.no_grad():
            ref = model(x)
        tol = 1e-10 if out.dtype == torch.float64 else 1e-4
        if not isinstance(ref, torch.Tensor) or ref.shape != out.shape or not bool(
                ((ref - out).abs() <= tol * (ref.abs() + ref.abs().mean() + 1e-30)).all()):
            raise ChainUnsupported("the chain read off the fx trace does not reproduce model(x)")
    return check


class _Refused(Exception):
    """A forced engine (auto's timed choice) did not apply to this call."""


class _NotCheaperHere(_Refused):
    def __init__(self, message, result):
        super().__init__(message)
        self.result = result


def _run(path, model, loss_fn, args, targets, names, params, acc, B, chunk, max_chunk, backend, route,
         timed_auto=False):
    """(sq, report) of one engine (`path` forced) or of the static rule (path="auto"). Caller holds
    preserved_model_state and enable_grad. timed_auto: a refusal raises _Refused (auto's timed choice
    did not apply; the caller rewinds the RNG and runs the static rule)."""
    from .exact_chain import ChainUnsupported, chain_layers, chain_sq_norms
    from .exact_coupled import (NotCheaper, Unsupported, batched_seeds_default, coupled_sq_norms,
                                 policy_precheck)
    from .exact_fallback import seed_batched_sq_norms

    report = {"path": None, "reason": "", "chunk": chunk}
    sq = None
    if path == "loop":
        set_mode(model, "exact")
        losses = check_losses(loss_fn(model(*args), targets), B)
        sq = seed_batched_sq_norms(losses, names, params, acc, chunk, batched=False, workers=1)
        report["path"] = "loop"
        return sq, report
    if path in ("auto", "chain") and route is None:
        # a Sequential chain of known layers: the hand-written seed-batched backward (exact_chain.py)
        rng = None
        try:
            set_mode(model, "exact")          # before a trace: the forward as it runs in train mode
            layers = chain_layers(model)
            rng = _get_rng(args[0].device)
            if len(args) != 1:
                raise ChainUnsupported(f"{len(args)} inputs (a chain takes one)")
            ch = min(B, max_chunk) if max_chunk else chain_default_chunk(B)
            check = _output_check(model, args[0]) if getattr(layers, "traced", False) else None
            sq, info = chain_sq_norms(layers, loss_fn, args[0], targets, names, params, acc, B, ch, backend,
                                      check_output=check)
            if check is not None:
                info["traced"] = True
            if sq is None:
                check_losses(info["losses"], B)
            report.update(info)
            report["path"], path = "chain", "done"
        except ChainUnsupported as exc:
            if timed_auto:
                raise _Refused(str(exc)) from exc
            if path == "chain":
                raise
            report["chain"] = str(exc)        # not a chain this engine models: the other paths
            if rng is not None:
                _set_rng(rng)                 # the next forward draws the very same dropout masks
    policy = False
    if path in ("auto", "coupled"):
        set_mode(model, "exact")
        rng = _get_rng(args[0].device)
        # on CPU the passes run one by one and cost what the loop's do: the coupled path only
        # pays off when its plan needs fewer passes than B (S-route rows, closed forms)
        policy = (path == "auto" or timed_auto) and not batched_seeds_default(args[0].device)
        if policy and route is None and not timed_auto:
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
            if timed_auto:
                set_mode(model, "exact")
                losses = check_losses(loss_fn(model(*args), targets), B)
                report["path"] = "seed_batched"
                raise _NotCheaperHere(str(exc), (seed_batched_sq_norms(losses, names, params, acc, chunk), report))
        except Unsupported as exc:
            if timed_auto:
                raise _Refused(str(exc)) from exc
            if path == "coupled":
                raise
            report["reason"] = str(exc)
            warnings.warn(f"bnmem exact mode: the coupled fast path does not apply ({exc}); running the general "
                          "seed-batched engine (same numbers, slower)", ExactFallbackWarning, stacklevel=4)
    if sq is None:
        set_mode(model, "exact")
        # after a refusal the RNG has moved on: this forward draws its own dropout masks (exact
        # for them, as one fresh forward is)
        losses = check_losses(loss_fn(model(*args), targets), B)
        sq = seed_batched_sq_norms(losses, names, params, acc, chunk)
        report["path"] = "seed_batched"
    return sq, report


def exact_per_sample_grad_norms(model, loss_fn, inputs, targets, *, per_layer=False, backend=None,
                                max_chunk=None):
    """Exact per-sample gradient norms (BatchNorm's batch coupling included); see the module doc."""
    return exact_report(model, loss_fn, inputs, targets, per_layer=per_layer, backend=backend,
                        max_chunk=max_chunk)[0]
