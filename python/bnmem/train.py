"""Train stage: M shadow models per variant on their keep-mask halves of the candidate pool, on a
local pool of processes (one torch thread each, all cores), resumable model by model.

Each model writes `models/<variant>/m<k>.npz` (training trace: per-candidate gradient norm per
epoch from the step probe, loss/accuracy per epoch, the scheduled exact/column/detached/eval norms)
and then `models/<variant>/m<k>.pt` (state_dict). A model counts as finished when both exist;
both are written atomically, so a killed run loses at most the models in flight.

Divergence: a non-finite training loss (checked every step) or non-finite weights (checked every
epoch and before saving) stop that model's training where it happens. The stated remedy: the
model is trained again from scratch with the next seed attempt (init and batch order from
SeedSequence([seed, 7, m, attempt])), at most MAX_ATTEMPTS times; every diverged attempt (variant,
model, attempt, epoch, step, learning rate, reason) is kept in the trace (`diverged`,
`diverged_reason`) and summed up per variant in the manifest and the report, because how often a
variant diverges is itself a result. If every attempt diverges, the stage stops with an error
naming the model (never a traceback at the score stage after all the work).

Matched fit (fit.py, default on): a model stops at the end of the first epoch whose eval-mode
accuracy on its in-distribution training candidates reaches `fit_target`, or continues past the
schedule at a constant small learning rate up to `fit_max_epochs`; `fit_history` (the criterion
per epoch) and `epochs_trained` are in the trace; epoch_norms has one row per epoch trained.
Per-step influence (step_influence.py): at sampled steps, on the step's own
batch before the step, loo_influence + exact norms of every sample (`infl_*` arrays of the trace).
bn-population: BN normalizes with the pool statistics recomputed at every epoch start
(models.set_population_stats) and once more after the last epoch (the statistics the eval-mode
queries use).
"""
from __future__ import annotations

import contextlib
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from . import fit, gradnorms, step_influence
from .config import Config, from_dict
from .errors import BnmemError
from .models import build_model, freeze_batchnorm, has_batchnorm, set_population_stats
from .runfolder import read_npz, save_state_dict, write_npz


def model_paths(root, variant, m):
    base = os.path.join(root, "models", variant, f"m{m:03d}")
    return base + ".pt", base + ".npz"


def is_done(root, variant, m) -> bool:
    return all(os.path.exists(p) for p in model_paths(root, variant, m))


MAX_ATTEMPTS = 3


class Diverged(Exception):
    """Raised inside a training attempt: the loss or the weights became non-finite."""

    def __init__(self, epoch: int, step: int, lr: float, reason: str):
        super().__init__(f"{reason} at epoch {epoch}, step {step} (lr {lr:.3g})")
        self.epoch, self.step, self.lr, self.reason = epoch, step, lr, reason


def _nonfinite_param(model) -> str | None:
    for name, p in model.named_parameters():
        if not bool(torch.isfinite(p).all()):
            return name
    return None


def seeds_for(cfg: Config, m: int, attempt: int = 0):
    """Model m of every variant shares its init and batch order (paired comparison). attempt > 0: the
    seeds of a retraining after a divergence (see the module docstring)."""
    ss = np.random.SeedSequence([cfg.seed, 7, m] + ([attempt] if attempt else []))
    torch_seed, order_seed = ss.generate_state(2)
    return int(torch_seed), int(order_seed)


def _schedule(total_steps: int, points: int) -> list:
    s = np.unique(np.round(np.geomspace(1, total_steps, points)).astype(int))
    return [int(v) for v in s]


def _probe_batch(train_idx, group, size, rng):
    """Fixed batch for the exact schedule: up to half OOD canaries (round-robin over kinds), rest in-dist."""
    kinds = [list(rng.permutation(train_idx[group[train_idx] == g])) for g in np.unique(group[train_idx]) if g != 0]
    chosen = []
    while len(chosen) < size // 2 and any(kinds):
        for k in kinds:
            if k and len(chosen) < size // 2:
                chosen.append(k.pop())
    ind = rng.permutation(train_idx[group[train_idx] == 0])
    rest = [i for i in ind if i not in set(chosen)][:size - len(chosen)]
    chosen += rest
    if len(chosen) < size:  # few in-distribution examples: top up with more canaries
        chosen += [i for k in kinds for i in k][:size - len(chosen)]
    return np.array(chosen, dtype=np.int64)


def order_digest(order) -> str:
    """A short fingerprint of one epoch's example order (recorded per epoch: pairing is checkable)."""
    import hashlib
    return hashlib.sha256(np.ascontiguousarray(order, dtype=np.int64).tobytes()).hexdigest()[:16]


def train_one(root: str, cfg_dict: dict, variant: str, m: int) -> dict:
    """Train model m of `variant`; write its trace and checkpoint. Deterministic in (seed, m).
    A diverged attempt is retrained with the next seed attempt (module docstring); BnmemError
    naming the model when all MAX_ATTEMPTS diverge."""
    if variant.startswith("gn-dp"):  # DP-SGD arms of the mitigation study (dp.py: Opacus, Poisson sampling)
        from .dp import train_one_dp
        return train_one_dp(root, cfg_dict, variant, m)
    torch.set_num_threads(1)
    cfg = from_dict(cfg_dict)
    t0 = time.perf_counter()
    d = read_npz(os.path.join(root, "data.npz"))
    diverged = []
    for attempt in range(MAX_ATTEMPTS):
        try:
            return _train_attempt(root, cfg, d, variant, m, attempt, diverged, t0)
        except Diverged as exc:
            diverged.append((attempt, exc.epoch, exc.step, exc.lr, exc.reason))
    raise BnmemError(f"train: {variant} model {m} diverged in all {MAX_ATTEMPTS} attempts ("
                     + "; ".join(f"attempt {a}: {r} at epoch {e}, step {s}, lr {lr:.3g}" for a, e, s, lr, r in diverged)
                     + f"); lower --lr (now {cfg.lr:g}); the models trained so far are kept")


def _train_attempt(root, cfg, d, variant, m, attempt, diverged, t0) -> dict:
    x_all, y_all, group = torch.from_numpy(d["x"]), torch.from_numpy(d["y"]), d["group"]
    keep = d["keep"][m]
    train_idx = np.flatnonzero(keep)
    N = len(y_all)
    n_classes = int(max(y_all.max().item(), d["y_test"].max()) + 1)
    torch_seed, order_seed = seeds_for(cfg, m, attempt)
    torch.manual_seed(torch_seed)
    from .cifar import autocast, grad_scaler, resolve_device, train_augment
    dev = resolve_device(cfg.device)
    model = build_model(cfg.arch, variant, x_all.shape[1:], n_classes, cfg.width).to(dev)
    aug_gen = torch.Generator().manual_seed(order_seed) if cfg.augment else None
    scaler = grad_scaler(dev)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    rng = np.random.default_rng(order_seed)
    steps_per_epoch = int(np.ceil(len(train_idx) / cfg.batch_size))
    total = steps_per_epoch * cfg.epochs
    lr_sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total, pct_start=0.15)
    bn = has_batchnorm(model)
    log_exact = m < cfg.exact_models
    sched_steps = _schedule(total, cfg.exact_points) if log_exact else []
    # own generator: the exact schedule must not shift the batch order (models pair across variants)
    probe_idx = (_probe_batch(train_idx, group, min(cfg.probe_batch, len(train_idx)), np.random.default_rng([order_seed, 1]))
                 if log_exact else np.zeros(0, np.int64))
    sched_norms = np.full((len(sched_steps), len(gradnorms.MODES), len(probe_idx)), np.nan, np.float32)
    sched_sources = []

    fit_on = cfg.fit_target > 0
    max_epochs = cfg.fit_max_epochs if fit_on else cfg.epochs
    fit_idx = train_idx[group[train_idx] == 0]          # the fit criterion's examples (fit.py)
    infl = step_influence.Recorder(total, cfg.influence_points, cfg.batch_size)
    epoch_norms = np.full((max_epochs, N), np.nan, np.float32)
    loss_hist, acc_hist, fit_hist = [], [], []
    step = 0
    probe_mode = "column"
    stepper = None
    digests = []
    population = variant == "bn-population"
    for epoch in range(max_epochs):
        model.train()
        if variant in ("bn-frozen", "bn-frozen-pop") and epoch >= cfg.frozen_warmup_epochs:
            if variant == "bn-frozen-pop" and probe_mode != "eval":  # population statistics at the freeze
                from .mitigate import recompute_bn_statistics
                recompute_bn_statistics(model, x_all[train_idx], cfg.batch_size, dev)
            freeze_batchnorm(model)
            probe_mode = "eval"
        if population:   # pool statistics of this epoch, BN layers in eval mode (models.set_population_stats)
            set_population_stats(model, x_all[train_idx].to(dev))
            probe_mode = "eval"
        extending = epoch >= cfg.epochs
        if extending:    # fit.py: constant learning rate after the schedule
            for pg in opt.param_groups:
                pg["lr"] = cfg.lr * cfg.fit_extend_lr
        if stepper is None or stepper.mode != probe_mode:
            stepper = gradnorms.StepProbe(model, probe_mode)
        order = rng.permutation(train_idx)
        digests.append(order_digest(order))
        tot_loss = tot_correct = 0.0
        for b in range(steps_per_epoch):
            idx = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
            if bn and len(idx) == 1:  # BN cannot train on a batch of one; fold it into the previous step
                continue
            xb, yb = x_all[idx], y_all[idx]
            if aug_gen is not None:
                xb = train_augment(xb, aug_gen)
            xb, yb = xb.to(dev, non_blocking=True), yb.to(dev, non_blocking=True)
            if infl.due(step, len(idx)):   # this step's batch, before the step (the model is left as it is)
                infl.record(step, epoch, idx, model, xb, yb)
            opt.zero_grad(set_to_none=True)
            probing = cfg.probe_every > 0 and step % cfg.probe_every == 0
            with stepper.step(xb, yb) if probing else contextlib.nullcontext():
                with autocast(dev):
                    out = model(xb)
                losses = F.cross_entropy(out.float(), yb, reduction="none")
                scaler.scale(losses.mean()).backward()
            loss_sum = losses.sum().item()
            if not math.isfinite(loss_sum):   # before the probe's norms and the step use it
                raise Diverged(epoch, step, opt.param_groups[0]["lr"], "non-finite training loss")
            if probing:
                epoch_norms[epoch, idx] = (stepper.norms.float() / scaler.get_scale()).cpu().numpy()  # fp16: unscale
            scaler.step(opt)
            scaler.update()
            if not extending:
                lr_sched.step()
            step += 1
            tot_loss += loss_sum
            tot_correct += (out.argmax(1) == yb).sum().item()
            if step in sched_steps:
                k = sched_steps.index(step)
                xp, yp = x_all[probe_idx].to(dev), y_all[probe_idx].to(dev)
                for j, mode in enumerate(gradnorms.MODES):  # all four also without BN (equal there: a check)
                    nrm, src = gradnorms.per_sample_grad_norms(model, xp, yp, mode)
                    sched_norms[k, j] = nrm.float().cpu().numpy()
                    sched_sources.append(f"{mode}:{src}")
        loss_hist.append(tot_loss / len(train_idx))
        acc_hist.append(tot_correct / len(train_idx))
        bad = _nonfinite_param(model)
        if bad is not None:
            raise Diverged(epoch, step, opt.param_groups[0]["lr"], f"non-finite weights ({bad})")
        if population and (epoch + 1 == max_epochs or fit_on):   # the statistics the trained weights see
            set_population_stats(model, x_all[train_idx].to(dev))
        fit_hist.append(fit.eval_accuracy(model, x_all[fit_idx], y_all[fit_idx], dev))
        if variant == "bn-frozen" and epoch >= cfg.frozen_warmup_epochs:
            freeze_batchnorm(model)
        if fit.stop(cfg, epoch, fit_hist[-1]):
            break

    model.eval()
    with torch.no_grad():
        test_acc = (model(torch.from_numpy(d["x_test"]).to(dev)).argmax(1).cpu().numpy() == d["y_test"]).mean()
    pt, npz = model_paths(root, variant, m)
    write_npz(npz, epoch_norms=epoch_norms[:len(fit_hist)], train_loss=np.array(loss_hist, np.float32),
              train_acc=np.array(acc_hist, np.float32), fit_history=np.array(fit_hist, np.float64),
              epochs_trained=np.int64(len(fit_hist)), fit_target=np.float64(cfg.fit_target), **infl.arrays(),
              test_acc=np.float32(test_acc), sched_steps=np.array(sched_steps, np.int64),
              probe_idx=probe_idx, sched_norms=sched_norms,
              sched_sources=np.array(sorted(set(sched_sources)), dtype="U64"),
              step_probe_source=np.array(stepper.source), steps=np.int64(step), attempt=np.int64(attempt),
              diverged=np.array([[a, e, s] for a, e, s, _, _ in diverged], np.int64).reshape(-1, 3),
              diverged_lr=np.array([lr for *_, lr, _ in diverged], np.float64),
              diverged_reason=np.array([r for *_, r in diverged], dtype="U64"),
              order_digest=np.array(digests),
              seconds=np.float64(time.perf_counter() - t0))
    save_state_dict(pt, {k: v.cpu() for k, v in model.state_dict().items()})
    return dict(variant=variant, m=m, test_acc=float(test_acc), train_acc=float(acc_hist[-1]),
                epochs=len(fit_hist), fit=float(fit_hist[-1]),
                seconds=time.perf_counter() - t0, diverged=[list(x) for x in diverged])


def run_stage(root: str, cfg: Config, progress=True, log=print, pool=None) -> list:
    from .executor import n_workers, parallel_map

    tasks = [(v, m) for m in range(cfg.models) for v in cfg.variants if not is_done(root, v, m)]
    n_all = cfg.models * len(cfg.variants)
    if not tasks:
        return []
    workers = n_workers(cfg.workers, len(tasks))
    log(f"train: {len(tasks)} of {n_all} models to train ({n_all - len(tasks)} already done), "
        f"{workers} worker process(es)")
    cfg_dict = {**cfg.hashed_dict(), "data_dir": cfg.data_dir}
    rf = None
    if os.path.exists(os.path.join(root, "manifest.json")):
        from .runfolder import RunFolder
        rf = RunFolder(root)
    out = []
    for r in parallel_map(train_one, [(root, cfg_dict, v, m) for v, m in tasks], workers=workers,
                          desc="train", progress=progress, pool=pool,
                          postfix=lambda r: f"{r['variant']} m{r['m']} test acc {r['test_acc']:.2f}"):
        if rf is not None:   # the sha256 of a finished model, as soon as it is there
            rf.record([rf.rel(p) for p in model_paths(root, r["variant"], r["m"])[::-1]])
        for a, e, s, lr, why in r.get("diverged", []):
            log(f"train: {r['variant']} model {r['m']} diverged ({why} at epoch {e}, step {s}, lr {lr:.3g}, seed "
                f"attempt {a}); retrained with seed attempt {a + 1} (recorded in its trace and the report)")
        out.append(r)
    return out


def stability_summary(root: str, cfg: Config) -> dict:
    """{"diverged": {variant: [{m, attempt, epoch, step, lr, reason}, ...]}} from every finished trace
    (empty lists when nothing diverged): the stability of each variant, for the manifest and report."""
    out = {}
    for v in cfg.variants:
        rows = []
        for m in range(cfg.models):
            p = model_paths(root, v, m)[1]
            if not os.path.exists(p):
                continue
            t = read_npz(p)
            if "diverged" not in t:
                continue
            for (a, e, s), lr, why in zip(t["diverged"].tolist(), t["diverged_lr"].tolist(),
                                          t["diverged_reason"].tolist()):
                rows.append(dict(m=m, attempt=a, epoch=e, step=s, lr=lr, reason=why))
        out[v] = rows
    return {"diverged": out}
