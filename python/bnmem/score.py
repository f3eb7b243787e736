"""Score stage: the three studies' numbers from the trained models' files.

(iii) membership inference: LiRA (online/offline, per-example/global variance) and RMIA scores of
every model as target via `bnmem_kernels.lira`, metrics via `bnmem_kernels.metrics`, overall and
per group, per variant and query mode (eval; train-mode batch statistics for BN models);
(i) Feldman memorization per candidate; (ii) gradient-norm trajectories per group and, for the
scheduled probe batches, how far column/detached/eval norms are from exact.
Confidence intervals: a two-way percentile bootstrap (cfg.bootstrap >= 1,000 resamples) over
candidates (resampled within each group) AND shadow models (target rows, and the models behind
memorization and gradient-norm averages), with the SAME resamples for every variant (paired: the
variants share candidates, keep masks and seeds; model m of one variant is paired with model m of
another), so differences between variants get their own intervals. Vectorized: a resample is a
pair of multiplicity vectors, metrics are weighted sums over one sort. Per-candidate memorization:
Wilson intervals for p_in and p_out, Newcombe's hybrid score interval for their difference.
Null control: every attack again on the same logits with each candidate's keep column permuted
across models (a balanced assignment independent of the logits): AUC 0.5 and TPR 0.01 at 1% FPR
are what an unbiased estimator gives there; results["null_control"].
TPR at 0.1% FPR is reported only where every target has >= 1,000 non-members (pooled pairs of
different targets are correlated and do not count as independent).

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
Z95 = 1.959963984540054
ATTACK_ARGS = {
    "lira_online": dict(online=True, variance="per_example"),
    "lira_online_global": dict(online=True, variance="global"),
    "lira_offline": dict(online=False, variance="per_example"),
    "lira_offline_global": dict(online=False, variance="global"),
}


def _label_prob(logits, labels):
    z = torch.from_numpy(logits).double()
    y = torch.from_numpy(labels)[None, :, None].expand(z.shape[:3])
    return torch.softmax(z, -1).gather(-1, y[..., None])[..., 0]


def attack_scores(logits: np.ndarray, labels: np.ndarray, keep: np.ndarray, attack: str,
                  pop: tuple | None = None) -> np.ndarray:
    """logits [M, N, A, K] -> scores [M, N] (NaN where the estimator lacks models), via bnmem_kernels.lira.
    RMIA needs pop = (logits [M, P, A, K], labels [P]) of population images no model trained on."""
    from bnmem_kernels import lira

    z = torch.from_numpy(logits).double()
    y = torch.from_numpy(labels)[None, :, None].expand(z.shape[:3])
    k = torch.from_numpy(keep)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # NaN counts are recorded in results instead
        if attack == "rmia":
            if pop is None:
                raise ValueError("rmia needs the population's logits (held-out test images queried by every model)")
            return lira.rmia_scores(_label_prob(logits, labels), k, _label_prob(*pop)).numpy()
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


def wilson(k, n, z=Z95):
    """Wilson score interval (lo, hi) for k successes of n (elementwise; (0, 1) where n = 0)."""
    k, n = np.asarray(k, float), np.asarray(n, float)
    nn = np.maximum(n, 1)
    p = k / nn
    den = 1 + z * z / nn
    centre = (p + z * z / (2 * nn)) / den
    half = z * np.sqrt(p * (1 - p) / nn + z * z / (4 * nn * nn)) / den
    return np.where(n > 0, centre - half, 0.0), np.where(n > 0, centre + half, 1.0)


def memorization(correct: np.ndarray, keep: np.ndarray) -> dict:
    """Feldman & Zhang: mem[n] = P[correct | n in] - P[correct | n out], over the shadow models.
    correct, keep [M, N] bool -> per-example mem, p_in, p_out and a 95% interval [mem_lo, mem_hi]:
    Newcombe's hybrid score interval for a difference of proportions (from the two Wilson
    intervals; never of zero width at 0 or 1, unlike the Wald interval)."""
    n_in, n_out = keep.sum(0), (~keep).sum(0)
    k_in, k_out = (correct & keep).sum(0), (correct & ~keep).sum(0)
    p_in = k_in / np.maximum(n_in, 1)
    p_out = k_out / np.maximum(n_out, 1)
    l1, u1 = wilson(k_in, n_in)
    l2, u2 = wilson(k_out, n_out)
    d = p_in - p_out
    lo = d - np.sqrt((p_in - l1) ** 2 + (u2 - p_out) ** 2)
    hi = d + np.sqrt((u1 - p_in) ** 2 + (p_out - l2) ** 2)
    return dict(mem=d, p_in=p_in, p_out=p_out, mem_lo=lo, mem_hi=hi)


def _counts(draws: np.ndarray, size: int) -> np.ndarray:
    """draws [B, L] of indices in [0, size) -> multiplicities [B, size]."""
    B = draws.shape[0]
    flat = (draws + size * np.arange(B)[:, None]).ravel()
    return np.bincount(flat, minlength=B * size).reshape(B, size).astype(np.float64)


def two_way_resamples(group: np.ndarray, n_models: int, n_boot: int, seed: int):
    """(row weights [B, M], column weights [B, N]): multiplicities of models (uniform with
    replacement) and of candidates (with replacement within each group), the same for every variant."""
    rng = np.random.default_rng([seed, 99])
    rows = _counts(rng.integers(0, n_models, (n_boot, n_models)), n_models)
    cols = np.zeros((n_boot, len(group)))
    for g in range(len(GROUPS)):
        ix = np.flatnonzero(group == g)
        if len(ix):
            cols[:, ix] = _counts(rng.integers(0, len(ix), (n_boot, len(ix))), len(ix))
    return rows, cols


def weighted_roc_metrics(scores: np.ndarray, keep: np.ndarray, rows: np.ndarray, cols: np.ndarray,
                         fprs=(0.01,), chunk: int | None = None) -> dict:
    """AUC and TPR at each FPR of scores [R, C] (members keep) under every resample b, the pairs
    (t, n) weighted by rows[b, t] * cols[b, n]: the metrics of the resampled score multiset,
    computed from one sort (ties count 1/2, as roc_auc; TPR at FPR as tpr_at_fpr). -> {name: [B]}.
    `chunk`: resamples per pass; None -> about 600k weights a pass (cache-sized: at M = 32, N = 1160,
    16 resamples a pass took 1.2 s for 1,000 resamples, 125 a pass 3.2 s; same numbers)."""
    ok = np.isfinite(scores)
    r_i, c_i = np.nonzero(ok)
    s = torch.from_numpy(scores[ok].astype(np.float64))
    k = torch.from_numpy(keep[ok])
    order = torch.argsort(s, descending=True, stable=True)
    s, k, r_i, c_i = s[order], k[order], torch.from_numpy(r_i)[order], torch.from_numpy(c_i)[order]
    last = torch.ones(len(s), dtype=torch.bool)
    last[:-1] = s[1:] != s[:-1]
    ends = last.nonzero().flatten()
    # fp32 is exact here: weights are small integers and every partial sum <= the total R * C
    exact = rows.sum(1).max() * cols.sum(1).max() < 2 ** 24
    wdt = torch.float32 if exact else torch.float64
    R, C = torch.from_numpy(rows).to(wdt), torch.from_numpy(cols).to(wdt)
    kw = k.to(wdt)
    if chunk is None:
        chunk = max(1, min(R.shape[0], 600_000 // max(1, len(s))))
    out = {"auc": []} | {f"tpr@{f:g}": [] for f in fprs}
    for b0 in range(0, R.shape[0], chunk):
        w = R[b0:b0 + chunk][:, r_i] * C[b0:b0 + chunk][:, c_i]  # [b, L]
        cp = torch.cumsum(w * kw, 1)[:, ends].double()
        cn = torch.cumsum(w, 1)[:, ends].double() - cp
        P, Nn = cp[:, -1:], cn[:, -1:]
        pos = torch.diff(cp, dim=1, prepend=torch.zeros_like(cp[:, :1]))
        neg = torch.diff(cn, dim=1, prepend=torch.zeros_like(cn[:, :1]))
        with np.errstate(invalid="ignore", divide="ignore"):
            auc = (pos * (Nn - cn + 0.5 * neg)).sum(1) / (P * Nn)[:, 0]
            out["auc"].append(auc)
            fpr, tpr = cn / Nn, cp / P
            for f in fprs:
                out[f"tpr@{f:g}"].append(torch.where(fpr <= f, tpr, 0.0).amax(1))
    return {key: torch.cat(v).numpy() for key, v in out.items()}


def ci(values) -> list:
    v = np.asarray([np.nan if x is None else x for x in values], float)
    v = v[np.isfinite(v)]
    if len(v) < 2:
        return [float("nan"), float("nan")]
    return [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))]


def permuted_keep(keep: np.ndarray, seed: int) -> np.ndarray:
    """Each candidate's keep column shuffled across models (fixed seed): as balanced as keep, and
    independent of the logits, so no attack should find any membership signal in it."""
    rng = np.random.default_rng([seed, 7])
    perm = np.argsort(rng.random(keep.shape), axis=0)
    return np.take_along_axis(keep, perm, axis=0)


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


def primary_attack(attacks, n_models: int) -> str:
    """The attack the report leads with: online LiRA, with per-example variances from 64 shadow
    models on and one global variance below (Carlini et al. 2022: the per-example fit is the
    stronger attack only with many models; with few, fixed variance is)."""
    order = (("lira_online", "lira_online_global") if n_models >= 64 else ("lira_online_global", "lira_online")) \
        + ("lira_offline_global", "lira_offline", "rmia")
    return next((a for a in order if a in attacks), attacks[0])


def _setup(root, cfg):
    d = read_npz(os.path.join(root, "data.npz"))
    attacks = cfg.attack_list()
    primary = primary_attack(attacks, cfg.models)
    boots = two_way_resamples(d["group"], cfg.models, cfg.bootstrap, cfg.seed) if cfg.bootstrap else None
    return d, attacks, primary, boots


def _interval_fields(m: dict, vals: dict):
    for metric, v in vals.items():
        m[f"{metric}_ci"] = ci(v)
        m[f"{metric}_se"] = float(np.nanstd(v, ddof=1)) if np.isfinite(v).sum() > 1 else float("nan")


def _weighted_group_mean(arr_b: np.ndarray, boots, ix) -> np.ndarray:
    """[B]: the mean over the candidates ix of arr_b [B, N] under each resample's candidate weights
    (NaN entries, e.g. a candidate never IN in a resample of the models, left out)."""
    w = boots[1][:, ix]
    x = arr_b[:, ix]
    okx = np.isfinite(x)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (np.where(okx, x, 0.0) * w).sum(1) / (w * okx).sum(1)


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
        # (iii) membership inference, and the null control (keep permuted across models)
        pop = (lg[f"{qmode}_pop"], d["y_test"]) if f"{qmode}_pop" in lg else None
        keep_null = permuted_keep(keep, cfg.seed)
        qr["null_control"] = {}
        per_target_nonmembers = int((~keep).sum(1).min())
        for a in attacks:
            if a == "rmia" and pop is None:
                continue  # a run folder from before the population was queried
            s = attack_scores(logits, y, keep, a, pop)
            arrays[f"{v}/{qmode}/{a}"] = s.astype(np.float32)
            entry = dict(nan_scores=int((~np.isfinite(s)).sum()), overall=mia_metrics(s, keep), groups={})
            for g in groups:
                entry["groups"][g] = mia_metrics(s[:, gidx[g]], keep[:, gidx[g]])
            if boots is not None:
                rows, cols = boots
                for key, m, sub in [("overall", entry["overall"], slice(None))] + \
                        ([(g, entry["groups"][g], gidx[g]) for g in groups] if a == primary else []):
                    if m is None:
                        continue
                    vals = weighted_roc_metrics(s[:, sub], keep[:, sub], rows, cols[:, sub], FPRS)
                    _interval_fields(m, vals)
                    for metric, vv in vals.items():
                        stats[f"{qmode}/{key}/{metric}" + ("" if a == primary else f"/{a}")] = (m[metric], vv)
            for m in [entry["overall"]] + list(entry["groups"].values()):
                if m is not None and per_target_nonmembers < 1000:
                    m["tpr@0.001_note"] = (f"not reported: {per_target_nonmembers} non-members per target (< 1,000); "
                                           "pooled pairs of different targets are correlated")
            qr["attacks"][a] = entry
            sn = attack_scores(logits, y, keep_null, a, pop)
            nm = mia_metrics(sn, keep_null)
            if nm is not None and boots is not None:
                _interval_fields(nm, weighted_roc_metrics(sn, keep_null, boots[0], boots[1], (0.01,)))
            qr["null_control"][a] = nm
        # (i) memorization, from the unaugmented query
        correct = logits[:, :, 0, :].argmax(-1) == y[None]
        mem = memorization(correct, keep)
        arrays[f"{v}/{qmode}/mem"] = mem["mem"].astype(np.float32)
        arrays[f"{v}/{qmode}/mem_lo"] = mem["mem_lo"].astype(np.float32)
        arrays[f"{v}/{qmode}/mem_hi"] = mem["mem_hi"].astype(np.float32)
        mem_b = None
        if boots is not None:  # memorization under each resample of the models, [B, N]
            rows, cols = boots
            with np.errstate(invalid="ignore", divide="ignore"):
                p_in = (rows @ (correct & keep).astype(float)) / (rows @ keep.astype(float))
                p_out = (rows @ (correct & ~keep).astype(float)) / (rows @ (~keep).astype(float))
            mem_b = p_in - p_out
        for g in groups:
            ix = gidx[g]
            point = float(mem["mem"][ix].mean())
            vals = _weighted_group_mean(mem_b, boots, ix) if mem_b is not None else []
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
        last_pm = np.stack([t["epoch_norms"][-1] for t in traces])   # [M, N]: each model's own final epoch
        last = np.nanmean(last_pm, axis=0)
        traj = {g: np.nanmean(en[:, :, gidx[g]], axis=(0, 2)).tolist() for g in groups}
        per_model = np.nanmean(en, axis=1)              # [M, N], NaN where never IN
    arrays[f"{v}/gradnorm_mean"] = per_ex.astype(np.float32)
    arrays[f"{v}/gradnorm_last"] = last.astype(np.float32)
    gn = dict(trajectory=traj, per_group={}, ratio_vs_in_dist={}, ratio_last_epoch_vs_in_dist={})
    for g in groups:
        ix = gidx[g]
        gn["per_group"][g] = dict(mean=float(np.nanmean(per_ex[ix])), last_epoch=float(np.nanmean(last[ix])))
    boot_arr = {}
    if boots is not None:  # per-candidate means under each resample of the models, [B, N]
        for key, src in (("ratio_vs_in_dist", per_model), ("ratio_last_epoch_vs_in_dist", last_pm)):
            okm = np.isfinite(src)
            with np.errstate(invalid="ignore", divide="ignore"):
                boot_arr[key] = (boots[0] @ np.where(okm, src, 0.0)) / (boots[0] @ okm.astype(float))
    for g in groups:
        if g == "in_dist" or "in_dist" not in gidx:
            continue
        for key, arr in (("ratio_vs_in_dist", per_ex), ("ratio_last_epoch_vs_in_dist", last)):
            point = float(np.nanmean(arr[gidx[g]]) / np.nanmean(arr[gidx["in_dist"]]))
            vals = []
            if key in boot_arr:
                vals = (_weighted_group_mean(boot_arr[key], boots, gidx[g])
                        / _weighted_group_mean(boot_arr[key], boots, gidx["in_dist"]))
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
    res["null_control"] = null_control_summary(res)
    res["timings"] = dict(score_seconds=round(time.perf_counter() - t0, 1),   # wall times: not numbers of the study
                          influence={v: res["variants"][v].pop("_influence_seconds") for v in cfg.variants})
    write_npz(os.path.join(root, "scores.npz"), **{k.replace("/", "__"): a for k, a in arrays.items()})
    write_json(os.path.join(root, "results.json"), res)


def null_control_summary(res: dict) -> dict:
    """results["null_control"][attack]: the first variant's eval-mode null-control AUC and TPR at 1%
    FPR (with intervals), every variant and query mode under "by_variant", and "off": whether the
    null control misses its target (AUC 0.5, TPR 0.01) by more than its interval, Bonferroni-widened
    over all the null controls of the run (|x - target| > z * se, z for 0.05 / #checks two-sided;
    se: the two-way bootstrap SE, for the TPR at least the binomial SE of 0.01 from one target's members)
    so that a correct run raises no alarm by chance. results["null_control_off"] lists the misses."""
    from statistics import NormalDist

    cells = [(v, q, a, m) for v, vr in res["variants"].items() for q, qr in vr["modes"].items()
             for a, m in qr.get("null_control", {}).items() if m]
    n = max(1, 2 * len(cells))
    z = NormalDist().inv_cdf(1 - 0.025 / n)
    out, off = {}, []
    for v, q, a, m in cells:
        for metric, target in (("auc", 0.5), ("tpr@0.01", 0.01)):
            se = m.get(f"{metric}_se", float("nan"))
            if metric != "auc":  # few points near FPR 1%: the bootstrap SE can collapse to ~0 (e.g. at TPR 0);
                # floor it by the binomial SE of TPR 0.01 from one target's members (conservative: pairs correlate)
                se = max(se, (0.01 * 0.99 / max(1, m["n_members"] / res["config"]["models"])) ** 0.5)
            if np.isfinite(se) and abs(m[metric] - target) > z * max(se, 1e-12):
                off.append(dict(variant=v, mode=q, attack=a, metric=metric, value=m[metric], target=target,
                                se=se, z=z))
        top = out.setdefault(a, {"by_variant": {}})
        top["by_variant"].setdefault(v, {})[q] = m
        if "auc" not in top and q == "eval":
            top.update({k: m[k] for k in m}, variant=v, mode=q)
    for a in out:
        out[a]["off"] = any(o["attack"] == a for o in off)
    res["null_control_off"] = off
    res["null_control_z"] = z
    return out


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
