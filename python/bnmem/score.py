"""Score stage: the three studies' numbers from the trained models' files.

(iii) membership inference: LiRA (online/offline, per-example/global variance) and RMIA scores of
every model as target via `bnmem_kernels.lira`, metrics via `bnmem_kernels.metrics`, overall and
per group, per variant and query mode (eval; train-mode batch statistics for BN models);
(i) Feldman memorization per candidate; (ii) gradient-norm trajectories per group and, for the
scheduled probe batches, how far column/detached/eval norms are from exact.
Confidence intervals: percentile bootstrap over candidates, resampled within each group, with the
SAME resamples for every variant (paired: the variants share candidates, keep masks and seeds), so
differences between variants get their own intervals.

Writes `scores.npz` (per variant/mode/attack score matrices, memorization, mean gradient norms)
and `results.json` (every figure; the report renders from these two files and data.npz).
"""
from __future__ import annotations

import glob
import os
import platform
import time
import warnings

import numpy as np
import torch

from . import __version__
from .config import Config, from_dict
from .data import GROUPS
from .gradnorms import MODES
from .runfolder import read_json, read_npz, write_json, write_npz

FPRS = (0.01, 0.001)
ATTACK_ARGS = {
    "lira_online": dict(online=True, variance="per_example"),
    "lira_online_global": dict(online=True, variance="global"),
    "lira_offline": dict(online=False, variance="per_example"),
    "lira_offline_global": dict(online=False, variance="global"),
}


def attack_scores(logits: np.ndarray, labels: np.ndarray, keep: np.ndarray, attack: str) -> np.ndarray:
    """logits [M, N, A, K] -> scores [M, N] (NaN where the estimator lacks models), via bnmem_kernels.lira."""
    from bnmem_kernels import lira

    z = torch.from_numpy(logits).double()
    y = torch.from_numpy(labels)[None, :, None].expand(z.shape[:3])
    k = torch.from_numpy(keep)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # NaN counts are recorded in results instead
        if attack == "rmia":
            prob = torch.softmax(z, -1).gather(-1, y[..., None])[..., 0]
            return lira.rmia_scores(prob, k).numpy()
        conf = lira.logit_confidence(z, y)
        return lira.lira_scores(conf, k, **ATTACK_ARGS[attack]).numpy()


def mia_metrics(scores: np.ndarray, keep: np.ndarray) -> dict | None:
    """AUC and TPR at FPRS over all (target model, candidate) pairs with a finite score."""
    from bnmem_kernels import metrics

    s, k = scores.ravel(), keep.ravel()
    ok = np.isfinite(s)
    s, k = torch.from_numpy(s[ok]), torch.from_numpy(k[ok])
    n_pos = int(k.sum())
    if n_pos == 0 or n_pos == len(k):
        return None
    out = {"auc": metrics.roc_auc(s, k)}
    for f in FPRS:
        out[f"tpr@{f:g}"] = metrics.tpr_at_fpr(s, k, f)
    out["n_members"], out["n_nonmembers"] = n_pos, int(len(k) - n_pos)
    return out


def memorization(correct: np.ndarray, keep: np.ndarray) -> dict:
    """Feldman & Zhang: mem[n] = P[correct | n in] - P[correct | n out], over the shadow models.
    correct, keep [M, N] bool -> per-example mem, p_in, p_out and a normal-approximation 95% half-width."""
    n_in, n_out = keep.sum(0), (~keep).sum(0)
    p_in = (correct & keep).sum(0) / np.maximum(n_in, 1)
    p_out = (correct & ~keep).sum(0) / np.maximum(n_out, 1)
    half = 1.96 * np.sqrt(p_in * (1 - p_in) / np.maximum(n_in, 1) + p_out * (1 - p_out) / np.maximum(n_out, 1))
    return dict(mem=p_in - p_out, p_in=p_in, p_out=p_out, half_width=half)


def stratified_resamples(group: np.ndarray, n_boot: int, seed: int) -> list:
    rng = np.random.default_rng([seed, 99])
    members = [np.flatnonzero(group == g) for g in range(len(GROUPS))]
    return [np.concatenate([rng.choice(ix, size=len(ix)) for ix in members if len(ix)]) for _ in range(n_boot)]


def ci(values) -> list:
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], float)
    if len(v) < 2:
        return [float("nan"), float("nan")]
    return [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))]


def group_names(group):
    """Groups present, plus "ood" (every canary kind pooled) when there are canaries."""
    names = [g for k, g in enumerate(GROUPS) if (group == k).any()]
    return names + (["ood"] if (group > 0).any() else [])


def in_group(group: np.ndarray, g: str) -> np.ndarray:
    """Boolean mask of the candidates in group g ("ood" = any canary kind)."""
    return group > 0 if g == "ood" else group == GROUPS.index(g)


def _hardware() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return dict(cpu=cpu, cores=os.cpu_count(), machine=platform.machine(), gpu=None if not torch.cuda.is_available()
                else torch.cuda.get_device_name(0))


def _versions() -> dict:
    import matplotlib
    import scipy
    import sklearn

    from bnmem_kernels import info
    v = dict(bnmem=__version__, numpy=np.__version__, scipy=scipy.__version__, sklearn=sklearn.__version__,
             matplotlib=matplotlib.__version__)
    try:
        v["bnmem_kernels"] = info.collect()
    except Exception as exc:  # versions are informative; a broken kernel build shows up elsewhere
        v["bnmem_kernels"] = f"info failed: {exc}"
    return v


def _setup(root, cfg):
    d = read_npz(os.path.join(root, "data.npz"))
    attacks = cfg.attack_list()
    # The primary attack (bootstrap intervals, figures): online LiRA with per-example variance when there
    # are enough models for it; with fewer, offline LiRA (global variance), which needs only OUT models and
    # stays sane where the online fit from 1-2 IN models is biased (AUC < 0.5 seen at M = 4).
    primary = next((a for a in ("lira_online", "lira_offline_global", "lira_online_global") if a in attacks),
                   attacks[0])
    boots = stratified_resamples(d["group"], cfg.bootstrap, cfg.seed)
    return d, attacks, primary, boots


def score_variant(root: str, cfg_dict: dict, v: str):
    """All numbers of one variant -> (variant, results dict, {stat: (point, bootstrap values)}, {name: array}).
    Groups without data (e.g. gradient norms with the step probe off) give NaN, silently."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return _score_variant(root, cfg_dict, v)


def _score_variant(root: str, cfg_dict: dict, v: str):
    torch.set_num_threads(1)
    cfg = from_dict(cfg_dict)
    d, attacks, primary, boots = _setup(root, cfg)
    y, group, keep = d["y"], d["group"], d["keep"]
    groups = group_names(group)
    gidx = {g: np.flatnonzero(in_group(group, g)) for g in groups}
    arrays, stats = {}, {}
    lg = read_npz(os.path.join(root, "logits", f"{v}.npz"))
    traces = [read_npz(p) for p in sorted(glob.glob(os.path.join(root, "models", v, "m*.npz")))]
    vr = dict(test_acc=[float(t["test_acc"]) for t in traces],
              train_acc=[float(t["train_acc"][-1]) for t in traces],
              step_probe_source=sorted({str(t["step_probe_source"]) for t in traces}),
              modes={})
    for qmode in ("eval", "train"):
        if qmode not in lg:
            continue
        logits = lg[qmode]
        qr = dict(attacks={}, memorization={})
        # (iii) membership inference
        for a in attacks:
            s = attack_scores(logits, y, keep, a)
            arrays[f"{v}/{qmode}/{a}"] = s.astype(np.float32)
            entry = dict(nan_scores=int((~np.isfinite(s)).sum()), overall=mia_metrics(s, keep), groups={})
            for g in groups:
                entry["groups"][g] = mia_metrics(s[:, gidx[g]], keep[:, gidx[g]])
            if a == primary and boots:
                bs = {"overall": [], **{g: [] for g in groups}}
                for idx in boots:
                    bs["overall"].append(mia_metrics(s[:, idx], keep[:, idx]))
                    gb = group[idx]
                    for g in groups:
                        sub = idx[in_group(gb, g)]
                        bs[g].append(mia_metrics(s[:, sub], keep[:, sub]))
                for key, m in [("overall", entry["overall"])] + [(g, entry["groups"][g]) for g in groups]:
                    if m is None:
                        continue
                    for metric in ["auc"] + [f"tpr@{f:g}" for f in FPRS]:
                        vals = [b[metric] if b else None for b in bs[key]]
                        m[f"{metric}_ci"] = ci(vals)
                        stats[f"{qmode}/{key}/{metric}"] = (m[metric], vals)
            qr["attacks"][a] = entry
        # (i) memorization, from the unaugmented query
        correct = logits[:, :, 0, :].argmax(-1) == y[None]
        mem = memorization(correct, keep)
        arrays[f"{v}/{qmode}/mem"] = mem["mem"].astype(np.float32)
        arrays[f"{v}/{qmode}/mem_half_width"] = mem["half_width"].astype(np.float32)
        for g in groups:
            ix = gidx[g]
            point = float(mem["mem"][ix].mean())
            vals = [float(mem["mem"][idx[in_group(group[idx], g)]].mean()) for idx in boots]
            qr["memorization"][g] = dict(mean=point, ci=ci(vals), median=float(np.median(mem["mem"][ix])),
                                         p_in=float(mem["p_in"][ix].mean()), p_out=float(mem["p_out"][ix].mean()),
                                         frac_above_0_5=float((mem["mem"][ix] > 0.5).mean()))
            stats[f"{qmode}/mem/{g}"] = (point, vals)
        vr["modes"][qmode] = qr
    # (ii) gradient norms over training (step probe), per example and per group
    E = max(t["epoch_norms"].shape[0] for t in traces)   # matched fit: models differ in epochs (NaN-padded)
    en = np.stack([np.pad(t["epoch_norms"], ((0, E - t["epoch_norms"].shape[0]), (0, 0)), constant_values=np.nan)
                   for t in traces])  # [M, E, N], NaN when OUT
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        per_ex = np.nanmean(en, axis=(0, 1))            # mean over models and epochs while IN
        last = np.nanmean(np.stack([t["epoch_norms"][-1] for t in traces]), axis=0)   # each model's final epoch
        traj = {g: np.nanmean(en[:, :, gidx[g]], axis=(0, 2)).tolist() for g in groups}
    arrays[f"{v}/gradnorm_mean"] = per_ex.astype(np.float32)
    arrays[f"{v}/gradnorm_last"] = last.astype(np.float32)
    gn = dict(trajectory=traj, per_group={}, ratio_vs_in_dist={}, ratio_last_epoch_vs_in_dist={})
    for g in groups:
        ix = gidx[g]
        gn["per_group"][g] = dict(mean=float(np.nanmean(per_ex[ix])), last_epoch=float(np.nanmean(last[ix])))
    base_b = [float(np.nanmean(per_ex[idx[group[idx] == 0]])) for idx in boots]
    base_l = [float(np.nanmean(last[idx[group[idx] == 0]])) for idx in boots]
    for g in groups:
        if g == "in_dist":
            continue
        for key, arr, bb in (("ratio_vs_in_dist", per_ex, base_b), ("ratio_last_epoch_vs_in_dist", last, base_l)):
            point = float(np.nanmean(arr[gidx[g]]) / np.nanmean(arr[gidx["in_dist"]]))
            vals = [float(np.nanmean(arr[idx[in_group(group[idx], g)]])) / b for idx, b in zip(boots, bb)]
            gn[key][g] = dict(ratio=point, ci=ci(vals))
            stats[f"grad/{key}/{g}"] = (point, vals)
    # exact vs column / detached / eval on the scheduled probe batches
    sched = [t for t in traces if t["sched_norms"].size]
    if sched:
        gaps = {}
        for j, mode in enumerate(MODES):
            if mode == "exact":
                continue
            rel = np.concatenate([(np.abs(t["sched_norms"][:, j] - t["sched_norms"][:, 0])
                                   / np.maximum(t["sched_norms"][:, 0], 1e-30)).ravel() for t in sched])
            ratio = np.concatenate([(t["sched_norms"][:, j] / np.maximum(t["sched_norms"][:, 0], 1e-30)).ravel()
                                    for t in sched])
            gaps[mode] = dict(median_rel_diff=float(np.nanmedian(rel)), mean_rel_diff=float(np.nanmean(rel)),
                              max_rel_diff=float(np.nanmax(rel)), median_ratio_to_exact=float(np.nanmedian(ratio)))
        by_group = {}
        for g in groups:
            r = []
            for t in sched:
                sel = in_group(group[t["probe_idx"]], g)
                if sel.any():
                    r.append((t["sched_norms"][:, 1, sel] / np.maximum(t["sched_norms"][:, 0, sel], 1e-30)).ravel())
            if r:
                by_group[g] = float(np.nanmedian(np.concatenate(r)))
        gn["exact_gap"] = dict(models=len(sched), points=[int(s) for s in sched[0]["sched_steps"]],
                               probe_batch=int(sched[0]["probe_idx"].size), vs_exact=gaps,
                               column_over_exact_median_by_group=by_group,
                               sources=sorted({str(s) for t in sched for s in t["sched_sources"]}),
                               exact_norms_mean_by_point=np.mean([t["sched_norms"][:, 0].mean(1) for t in sched], 0).tolist())
    vr["gradnorms"] = gn
    # matched fit (fit.py) and per-step influence (influence_stats.py): their own modules
    from . import fit, influence_stats
    if "eval" in vr["modes"]:
        vr["fit"] = fit.summary(traces, vr["modes"]["eval"]["memorization"], vr["test_acc"])
    vr["influence"], infl_stats = influence_stats.variant_stats(traces, group, cfg.bootstrap, cfg.seed)
    vr["_influence_seconds"] = {k: vr["influence"].pop(k) for k in influence_stats.TIMING_KEYS if k in vr["influence"]}
    stats.update(infl_stats)
    return v, vr, stats, arrays


def run_stage(root: str, cfg: Config, log=print, pool=None) -> None:
    from .executor import n_workers, parallel_map

    t0 = time.perf_counter()
    d, attacks, primary, _ = _setup(root, cfg)
    meta = read_json(os.path.join(root, "data.json"))
    res = dict(bnmem=__version__, config=cfg.hashed_dict(), config_hash=cfg.hash(), data=meta,
               versions=_versions(), hardware=_hardware(), groups=group_names(d["group"]), attacks=attacks,
               primary_attack=primary, fprs=list(FPRS), bootstrap=cfg.bootstrap, variants={})
    from .executor import study_threads   # what every stage ran on (not this process's count after a resume)
    res["hardware"]["threads"] = study_threads(cfg.workers, cfg.models * len(cfg.variants))
    cfg_dict = {**cfg.hashed_dict(), "data_dir": cfg.data_dir}
    tasks = [(root, cfg_dict, v) for v in cfg.variants]
    got = {}
    for v, vr, stats, arr in parallel_map(score_variant, tasks, workers=n_workers(cfg.workers, len(tasks)),
                                          desc="score", progress=cfg.progress, pool=pool):
        got[v] = (vr, stats, arr)
    arrays, per_variant_stats = {}, {}
    for v in cfg.variants:  # fixed order, whatever order the workers finished in
        vr, stats, arr = got[v]
        res["variants"][v] = vr
        per_variant_stats[v] = stats
        arrays.update(arr)
    res["comparisons"] = compare(per_variant_stats, cfg.variants)
    res["timings"] = dict(score_seconds=round(time.perf_counter() - t0, 1),   # wall times: not numbers of the study
                          influence={v: res["variants"][v].pop("_influence_seconds") for v in cfg.variants})
    write_npz(os.path.join(root, "scores.npz"), **{k.replace("/", "__"): a for k, a in arrays.items()})
    write_json(os.path.join(root, "results.json"), res)


def compare(stats: dict, variants) -> dict:
    """BN (and bn-frozen) minus each non-BN variant, for every statistic both have, with paired
    bootstrap intervals (same resamples). Positive = the BN variant is higher (more memorization /
    larger gradient-norm ratio / more leakage)."""
    out = {}
    for a in [v for v in ("bn", "bn-frozen") if v in stats]:
        for b in [v for v in variants if v not in ("bn", a)]:   # bn also vs its mechanism arms (bn-frozen, bn-population)
            rows = {}
            for key, (pa, va) in stats[a].items():
                bkey = key
                if key not in stats[b] and key.startswith("train/"):
                    bkey = "eval/" + key[len("train/"):]  # BN queried with batch stats vs the other's only mode
                if bkey not in stats[b]:
                    continue
                pb, vb = stats[b][bkey]
                if pa is None or pb is None:
                    continue
                diffs = [x - y for x, y in zip(va, vb) if x is not None and y is not None]
                lo, hi = ci(diffs)
                rows[key if bkey == key else f"{key} (vs {bkey})"] = dict(a=pa, b=pb, diff=pa - pb, ci=[lo, hi],
                                 verdict=("higher" if lo > 0 else "lower" if hi < 0 else "no clear difference"))
            out[f"{a} - {b}"] = rows
    return out
