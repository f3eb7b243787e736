"""Score-stage statistics of the per-step influence recorded during training (step_influence.py).

Per variant, from every model's sampled steps (actual training batches), per group of the batch's
samples (in_dist; every OOD canary kind pooled as "ood"; each kind):
- mean leave-one-out influence infl_i and the ratio OOD / in-dist of the group means;
- the same ratio for the per-sample gradient norms ||g_i|| of the same samples (exact, or eval for
  BN with fixed statistics), to set the influence beside the norm the rest of the study uses;
- the coupling amplification a_i = infl_i / (||g_i - gbar|| / (B - 1)): 1 without batch coupling
  (a check), the factor by which BN's coupling scales sample i's pull on the step otherwise;
  mean per group, and its ratio OOD / in-dist;
- each of these per phase of training: a sampled step is early / middle / late by where it falls
  in its model's own steps (thirds), since matched fit gives the models different lengths.
Means pool the samples of the resampled models (every sample of every sampled step counts once).
Intervals: 95% percentile bootstrap over MODELS (the sampled batches of one model are not
independent of each other), with the same model resamples for every variant (model m of every
variant shares its init, keep mask and batch order: paired differences in score.compare).
"""
from __future__ import annotations

import numpy as np

PHASES = ("early", "middle", "late")
TIMING_KEYS = ("kernel_seconds", "extra_seconds", "train_seconds")   # moved to results.json "timings" (score.py)


def _phase(step, steps):
    f = step / max(1, steps)
    return PHASES[min(2, int(3 * f))]


def model_resamples(M: int, n_boot: int, seed: int) -> list:
    rng = np.random.default_rng([seed, 18])
    return [rng.integers(0, M, M) for _ in range(n_boot)]


def _collect(t, group):
    """One trace -> rows (phase, group code, infl, norm, amplification) of every recorded sample."""
    if "infl" not in t or t["infl"].size == 0:
        return None
    idx, steps = t["infl_idx"], int(t["steps"])
    ok = idx >= 0
    n_valid = ok.sum(1, keepdims=True)
    amp = t["infl"] / (t["infl_centered"] / np.maximum(n_valid - 1, 1))
    ph = np.array([PHASES.index(_phase(s, steps)) for s in t["infl_steps"]])[:, None].repeat(idx.shape[1], 1)
    g = np.where(ok, group[np.where(ok, idx, 0)], -1)
    return dict(phase=ph[ok], group=g[ok], infl=t["infl"][ok], norm=t["infl_exact"][ok], amp=amp[ok])


def _sums(rows, sel_phase):
    """[groups, (n, sum infl, sum norm, sum amp)] for rows in the phase (None = all)."""
    out = np.zeros((int(rows["group"].max()) + 1 if len(rows["group"]) else 1, 4))
    m = np.ones(len(rows["group"]), bool) if sel_phase is None else rows["phase"] == sel_phase
    for k, (col) in enumerate(("infl", "norm", "amp")):
        np.add.at(out[:, k + 1], rows["group"][m], rows[col][m])
    np.add.at(out[:, 0], rows["group"][m], 1)
    return out


def _figures(S, group_names):
    """Summed table over models -> {name: value}."""
    def mean(col, gs):
        n = S[gs, 0].sum()
        return S[gs, col].sum() / n if n else np.nan
    ood = [k for k in range(1, S.shape[0])]
    res = {}
    with np.errstate(invalid="ignore", divide="ignore"):
        base_i, base_n, base_a = mean(1, [0]), mean(2, [0]), mean(3, [0])
        res["infl/in_dist"], res["norm/in_dist"], res["amp/in_dist"] = base_i, base_n, base_a
        for name, gs in [("ood", ood)] + [(group_names[k], [k]) for k in ood]:
            res[f"infl/{name}"], res[f"norm/{name}"], res[f"amp/{name}"] = mean(1, gs), mean(2, gs), mean(3, gs)
            res[f"ratio/{name}"] = mean(1, gs) / base_i
            res[f"norm_ratio/{name}"] = mean(2, gs) / base_n
            res[f"amp_ratio/{name}"] = mean(3, gs) / base_a
    return {k: float(v) for k, v in res.items()}


def variant_stats(traces, group, n_boot: int, seed: int):
    """-> (results dict, {stat key: (point, bootstrap values)}) for one variant's traces."""
    from .data import GROUPS
    per = [_collect(t, group) for t in traces]
    if not traces or any(p is None for p in per):
        return dict(recorded=False), {}
    G = len(GROUPS)
    tables = {}
    for ph in [None] + list(PHASES):
        t = np.zeros((len(per), G, 4))
        for m, rows in enumerate(per):
            s = _sums(rows, None if ph is None else PHASES.index(ph))
            t[m, :s.shape[0]] = s
        tables[ph or "all"] = t
    boots = model_resamples(len(per), n_boot, seed)
    out = dict(recorded=True, points_per_model=[int(t["infl_steps"].size) for t in traces],
               batch_size=int(traces[0]["infl_idx"].shape[1]),
               norm_modes=sorted({str(x) for t in traces for x in t["infl_norm_modes"]}),
               samples={g: int(tables["all"][:, k, 0].sum()) for k, g in enumerate(GROUPS)},
               kernel_seconds=float(sum(float(t["infl_kernel_seconds"]) for t in traces)),
               extra_seconds=float(sum(float(t["infl_extra_seconds"]) for t in traces)),
               train_seconds=float(sum(float(t["seconds"]) for t in traces)), phases={})
    stats = {}
    for ph, t in tables.items():
        point = _figures(t.sum(0), GROUPS)
        bvals = [_figures(t[b].sum(0), GROUPS) for b in boots]
        entry = {}
        for k, v in point.items():
            vals = [b[k] for b in bvals]
            finite = [x for x in vals if np.isfinite(x)]
            entry[k] = dict(value=v, ci=[float(np.percentile(finite, 2.5)), float(np.percentile(finite, 97.5))]
                            if len(finite) >= 2 else [float("nan")] * 2)
            if k.split("/")[0] in ("ratio", "norm_ratio", "amp_ratio", "amp") and k.endswith(("/ood", "/in_dist")):
                stats[f"infl/{ph}/{k}"] = (v, vals)
        out["phases"][ph] = entry
    return out, stats
