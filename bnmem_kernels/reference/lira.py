"""LiRA / RMIA ground truth (docs/math.md, "LiRA and RMIA").

Two implementations of every score:
  *_loop   the oracle: a per-target, per-example numpy/scipy loop in the style of the public LiRA
           code (np.mean / np.median / np.std over the other models, scipy.stats.norm). Slow
           (O(M^2 N A) and Python-level loops); tests and benchmarks compare against it.
  *_torch  vectorized plain PyTorch in fp64 on the input's device, O(M N A) (leave-one-model-out
           by subtracting the target's own contribution from centred sums; the median by one sort
           per (n, a)). This is what backend="reference" runs.

conf [M, N, A]: confidences (logit_confidence) of M models on N examples and A augmentations.
keep [M, N] bool: example n was in model m's training set. score[t, n] uses model t as the
target and OTHER models as shadows. The fit rule ("drop one from each group"): the in-group
{m : keep[m, n]} and the out-group {m : not keep[m, n]} each lose exactly one model before the
fit: the target itself if it belongs to the group, else the group's member at position
drop_position(n, group size) in model-index order (a fixed hash of n). Every
target is so fitted on n_in - 1 in-models and n_out - 1 out-models, whatever its own membership
(on balanced masks: M/2 - 1 each, the larger group dropping one model). Plain
leave-one-model-out (n_in - 1 vs n_out when the target is in, n_in vs n_out - 1 when out) ties
the fit sizes to the answer and scores members BELOW chance when there is no signal (MATH.md,
"Null bias of leave-one-model-out"); this rule has no such bias for any mask.
"""
from __future__ import annotations

import math

import numpy as np
import torch

LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)

# The fewest models a group needs, per estimator: a per-example population std of one value is 0
# (a degenerate Gaussian), so per-example fits need 2; with a global std one value gives a center.
MIN_PER_EXAMPLE = 2
MIN_GLOBAL = 1
MIN_POOLED = 2  # values pooled over examples for a global std


def drop_position(n, size):
    """Which member (0-based, in model-index order) a group of `size` models loses at example n
    when the target is not in it: ((n * 2654435761) mod 2^32) >> 16, mod size. A fixed hash of
    the example index, the same in every backend: it spreads the dropped model evenly over the
    models (a fixed choice such as "the highest index" always drops the same model, and trained
    models differ: with per-model offsets that biases the null AUC to 0.46/0.54 at M = 4)."""
    return (((n * 2654435761) & 0xFFFFFFFF) >> 16) % size


def needed_counts(online: bool, variance: str) -> tuple[int, int]:
    """(fewest in-models, fewest out-models) the estimator needs for one example."""
    need = MIN_PER_EXAMPLE if variance == "per_example" else MIN_GLOBAL
    return (need if online else 0), need


def valid_mask(keep: torch.Tensor, online: bool, variance: str) -> torch.Tensor:
    """[M, N] bool: which scores the estimator can form (enough in/out models in the fit).

    Every target's fit of example n uses n_in - 1 in-models and n_out - 1 out-models (one dropped
    from each group, see the module docstring), so validity is per example (and, for the global
    std, per target). O(M N)."""
    M, N = keep.shape
    n_in = keep.view(torch.uint8).sum(0, dtype=torch.int64)  # [N] (a bool reduction is ~2x slower)
    n_out = M - n_in
    need_in, need_out = needed_counts(online, variance)
    ok_n = n_out - 1 >= need_out
    if online:
        ok_n &= n_in - 1 >= need_in
    ok = ok_n[None, :].expand(M, N).clone()
    if variance == "global":  # values pooled over examples for target t's global std
        own_in = keep.sum(1, dtype=torch.int64)  # [M]
        pooled_in, pooled_out = n_in.sum() - own_in, n_out.sum() - (N - own_in)
        pooled_ok = pooled_out >= MIN_POOLED
        if online:
            pooled_ok &= pooled_in >= MIN_POOLED
        ok &= pooled_ok[:, None]
    return ok


# ----------------------------------------------------------------------------- the loop oracle
def _norm_logpdf(x, mu, s):
    import scipy.stats
    return scipy.stats.norm.logpdf(x, mu, s)


def _norm_logcdf(x, mu, s):
    import scipy.stats
    return scipy.stats.norm.logcdf(x, mu, s)


def lira_scores_loop(conf, keep, *, online=True, variance="per_example", center="mean",
                     offline_stat="one_sided"):
    """The oracle: public-LiRA-style loop over targets and examples, numpy fp64. Returns np [M, N].

    Differences from the public LiRA code (github.com/tensorflow/privacy, research/mi_lira_2021,
    whose Gaussian fits are in plot.py, generate_ours / generate_ours_offline), on purpose:
    every model is a target in turn and is left out of its own fit, and each group drops one
    model (the target, else its drop_position-th member: fit sizes n_in - 1, n_out - 1 whatever the
    target's membership; the public script scores one separate target against all shadows and
    cuts every example's in- and out-lists to one length each); the global ("fixed") variance is
    one population std per augmentation over the pooled in-values (resp. out-values) of all
    examples (the public online code takes the in-values' std for both Gaussians); no +1e-30 is
    added to the std; higher = member. Scores the estimator cannot form (too few models) are NaN.
    """
    conf = np.asarray(conf, dtype=np.float64)
    keep = np.asarray(keep, dtype=bool)
    M, N, A = conf.shape
    need_in, need_out = needed_counts(online, variance)
    agg = np.median if center == "median" else np.mean
    out = np.full((M, N), np.nan)
    for t in range(M):
        others = np.arange(M) != t
        c_o, k_o = conf[others], keep[others]
        if variance == "global":
            pin, pout = c_o[k_o], c_o[~k_o]  # [count, A]
            g_in = np.std(pin, axis=0) if len(pin) >= MIN_POOLED else np.full(A, np.nan)
            g_out = np.std(pout, axis=0) if len(pout) >= MIN_POOLED else np.full(A, np.nan)
        for n in range(N):
            dat_in = c_o[k_o[:, n], n, :]
            dat_out = c_o[~k_o[:, n], n, :]
            # each group loses one model: the target (already out) or its drop_position-th member
            if keep[t, n]:
                if len(dat_out):
                    dat_out = np.delete(dat_out, drop_position(n, len(dat_out)), axis=0)
            elif len(dat_in):
                dat_in = np.delete(dat_in, drop_position(n, len(dat_in)), axis=0)
            if (online and len(dat_in) < need_in) or len(dat_out) < need_out:
                continue
            sc = conf[t, n, :]
            mu_out = agg(dat_out, axis=0)
            s_out = np.std(dat_out, axis=0) if variance == "per_example" else g_out
            if online:
                mu_in = agg(dat_in, axis=0)
                s_in = np.std(dat_in, axis=0) if variance == "per_example" else g_in
                score = _norm_logpdf(sc, mu_in, s_in) - _norm_logpdf(sc, mu_out, s_out)
            elif offline_stat == "one_sided":
                score = _norm_logcdf(sc, mu_out, s_out)
            else:
                score = -_norm_logpdf(sc, mu_out, s_out)
            out[t, n] = np.mean(score)
    return out


def rmia_scores_loop(prob, keep, pop_prob, *, gamma=1.0, a=0.3, offline=True):
    """RMIA oracle (Zarifzadeh et al. 2024), per target and example in numpy fp64. Returns np [M, N].

    For target t: Pr(x|theta_t) = prob[t, x] (mean over augmentations); Pr(x) from the other
    models, each group losing one model as in lira_scores_loop: offline ((1 + a) mean_out(x) +
    (1 - a)) / 2, online (mean_in(x) + mean_out(x)) / 2. The population: pop_prob [M, P, A],
    examples no model trained on; Pr(z) = mean over the models other than t (offline: ((1 + a)
    mean + (1 - a)) / 2). ratio = Pr(.|theta_t) / Pr(.);
    score[t, x] = |{z : ratio(x) / ratio(z) > gamma}| / P.
    """
    prob = np.asarray(prob, dtype=np.float64).mean(axis=2)
    pop = np.asarray(pop_prob, dtype=np.float64).mean(axis=2)
    keep = np.asarray(keep, dtype=bool)
    M, N = prob.shape
    out = np.full((M, N), np.nan)
    for t in range(M):
        others = np.arange(M) != t
        p_o, k_o = prob[others], keep[others]
        mz = pop[others].mean(axis=0)
        pz = ((1 + a) * mz + (1 - a)) / 2 if offline else mz
        rz = pop[t] / pz
        for x in range(N):
            p_out = p_o[~k_o[:, x], x]
            p_in = p_o[k_o[:, x], x]
            if keep[t, x]:
                if len(p_out):
                    p_out = np.delete(p_out, drop_position(x, len(p_out)))
            elif len(p_in):
                p_in = np.delete(p_in, drop_position(x, len(p_in)))
            if len(p_out) < 1 or (not offline and len(p_in) < 1):
                continue
            px = ((1 + a) * p_out.mean() + (1 - a)) / 2 if offline else (p_in.mean() + p_out.mean()) / 2
            with np.errstate(divide="ignore", invalid="ignore"):
                out[t, x] = np.mean(prob[t, x] / px / rz > gamma)
    return out


# ------------------------------------------------------------------------- vectorized PyTorch
def log_ndtr(z: torch.Tensor) -> torch.Tensor:
    return torch.special.log_ndtr(z)


def global_std(conf: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """[2, M, A] fp64: for target t, the population std per augmentation of all in-values (row 0)
    resp. out-values (row 1) of all examples, over the models other than t. NaN where < 2 values.

    Per model m: count, sum and sum of squares (centred on the group's grand mean, fp64) of its
    in-values (out-values); target t's pool = totals minus its own. Reductions over N as batched
    matrix products ([M, 1, N] @ [M, N, A])."""
    x = conf.double()
    res = []
    for g in (keep, ~keep):
        w = g.double()[:, None, :]  # [M, 1, N]
        cnt_m = w.sum(2)  # [M, 1]
        cnt = cnt_m.sum(0)  # [1]
        s_m = torch.bmm(w, x).squeeze(1)  # [M, A]
        c = s_m.sum(0) / cnt.clamp_min(1)  # [A], grand mean (centre first)
        d = x - c
        s_m = s_m - cnt_m * c  # sums of centred values
        q_m = torch.bmm(w, d * d).squeeze(1)
        n_t = cnt - cnt_m  # [M, 1]
        s_t, q_t = s_m.sum(0) - s_m, q_m.sum(0) - q_m
        var = q_t / n_t - (s_t / n_t) ** 2
        std = var.clamp_min(0).sqrt()
        res.append(torch.where(n_t >= MIN_POOLED, std, torch.nan))
    return torch.stack(res)


def dropped_value(x, g):
    """[M, N, A]: for every target t, the value group g loses before the fit: x[t] where t is in g,
    else the value of g's member at drop_position(n, |g|) in model-index order (any value where g
    is empty: no fit is formed then). x [M, N, A], g [M, N, 1] bool."""
    M, N = x.shape[:2]
    idx = torch.arange(M, device=x.device).view(M, 1)
    members = torch.where(g[..., 0], idx, M + idx).argsort(0)  # [M, N]: members first, in index order
    size = g[..., 0].sum(0)                                     # [N]
    pos = drop_position(torch.arange(N, device=x.device, dtype=torch.int64), size.clamp_min(1))
    pick = members.gather(0, pos[None, :])                      # [1, N]
    x_pick = x.gather(0, pick[..., None].expand(1, N, x.shape[2]))
    return torch.where(g, x, x_pick)


def _fit_mean_std(x, g, x_drop):
    """Mean and population std of group g without one value (x_drop, a member's value) for every
    target t: x [M, N, A] fp64, g [M, N, 1] bool, x_drop [M, N, A]. Centred running sums: the
    group's sums minus the dropped value's share, O(M N A)."""
    gw = g.double()
    cnt = gw.sum(0)  # [N, 1]
    mean = (x * gw).sum(0) / cnt.clamp_min(1)
    d = (x - mean) * gw  # centred on the group's own mean; 0 outside the group
    s1, s2 = d.sum(0), (d * d).sum(0)
    d_t = x_drop - mean
    cnt_t = cnt - 1
    m_t = (s1 - d_t) / cnt_t
    return mean + m_t, ((s2 - d_t * d_t) / cnt_t - m_t * m_t).clamp_min(0).sqrt()


def _fit_median(x, g, x_drop):
    """Median (numpy's even-count convention) of group g without one copy of x_drop, per target.

    One sort per (n, a); removing a value at or below the middle shifts the upper half down by
    one, so the median without it needs only the sorted list's middle values."""
    M = x.shape[0]
    s = torch.where(g, x, torch.inf).sort(0).values  # group values first, ascending
    L = g.sum(0, keepdim=True).expand_as(x)  # [1, N, A] -> [M, N, A] group size

    def at(i):
        return s.gather(0, i.clamp(0, M - 1))

    h_even = L // 2 - 1  # L even -> L - 1 odd, median = s'[h]
    loo_odd = torch.where(x_drop <= at(h_even), at(h_even + 1), at(h_even))
    h = (L - 1) // 2  # L odd -> L - 1 even, median = (s'[h-1] + s'[h]) / 2
    lo, mid, hi = at(h - 1), at(h), at(h + 1)
    loo_even = torch.where(x_drop <= lo, 0.5 * (mid + hi),
                           torch.where(x_drop >= hi, 0.5 * (lo + mid), 0.5 * (lo + hi)))
    return torch.where(L % 2 == 0, loo_odd, loo_even)


def _loo_median(x, g):
    """Plain leave-one-model-out median (t dropped where in g, the full group's median elsewhere):
    kept for its index-arithmetic test; the scores use _fit_median (one model dropped always)."""
    M = x.shape[0]
    s = torch.where(g, x, torch.inf).sort(0).values
    L = g.sum(0, keepdim=True).expand_as(x)
    full = torch.where(L % 2 == 1, s.gather(0, ((L - 1) // 2).clamp(0, M - 1)),
                       0.5 * (s.gather(0, (L // 2 - 1).clamp(0, M - 1)) + s.gather(0, (L // 2).clamp(0, M - 1))))
    return torch.where(g, _fit_median(x, g, x), full)


def _logpdf(c, mu, s):
    z = (c - mu) / s
    return -0.5 * z * z - torch.log(s) - LOG_SQRT_2PI


def lira_scores_torch(conf, keep, *, online=True, variance="per_example", center="mean",
                      offline_stat="one_sided"):
    """Vectorized LiRA scores [M, N] (fp64), same definition as lira_scores_loop; NaN where invalid."""
    x = conf.double()
    k = keep[..., None]
    stats = {}
    gstd = global_std(conf, keep) if variance == "global" else None
    for name, g, row in (("in", k, 0), ("out", ~k, 1)):
        if name == "in" and not online:
            continue
        x_drop = dropped_value(x, g)
        mu, std = _fit_mean_std(x, g, x_drop)
        if center == "median":
            mu = _fit_median(x, g, x_drop)
        if gstd is not None:
            std = gstd[row][:, None, :].expand_as(x)
        stats[name] = (mu, std)
    mu_o, s_o = stats["out"]
    if online:
        mu_i, s_i = stats["in"]
        per_a = _logpdf(x, mu_i, s_i) - _logpdf(x, mu_o, s_o)
    elif offline_stat == "one_sided":
        per_a = log_ndtr((x - mu_o) / s_o)
    else:
        per_a = -_logpdf(x, mu_o, s_o)
    score = per_a.mean(2)
    return torch.where(valid_mask(keep, online, variance), score, torch.nan)


def _group_mean_dropped(p, g):
    """[M, N]: mean of p over group g (bool [M, N]) without one model per target (the target where
    it is in g, else its drop_position-th member), and that count (n_g - 1)."""
    x_drop = dropped_value(p[..., None], g[..., None])[..., 0]
    gw = g.double()
    cnt = gw.sum(0) - 1
    return ((p * gw).sum(0) - x_drop) / cnt, cnt


def rmia_ratio(prob, keep, *, a=0.3, offline=True):
    """[M, N] fp64: Pr(x | theta_t) / Pr(x), Pr(x) from the other models with one model dropped
    from each group as in lira_scores (n_in - 1 in-, n_out - 1 out-models; NaN if too few)."""
    p = prob.double().mean(2)  # [M, N]
    mean_out, cnt_out = _group_mean_dropped(p, ~keep)
    if offline:
        px = ((1 + a) * mean_out + (1 - a)) / 2
        ok = cnt_out >= 1
    else:
        mean_in, cnt_in = _group_mean_dropped(p, keep)
        px = (mean_in + mean_out) / 2
        ok = (cnt_out >= 1) & (cnt_in >= 1)
    ok = ok[None, :].expand_as(p)
    return torch.where(ok, p / px, torch.nan)


def rmia_population_ratio(pop_prob, *, a=0.3, offline=True):
    """[M, P] fp64: Pr(z | theta_t) / Pr(z) for population examples z that no model trained on:
    Pr(z) = the mean over the models other than t (offline: ((1 + a) mean + (1 - a)) / 2)."""
    q = pop_prob.double().mean(2)  # [M, P]
    M = q.shape[0]
    mean = (q.sum(0, keepdim=True) - q) / (M - 1)
    pz = ((1 + a) * mean + (1 - a)) / 2 if offline else mean
    return q / pz


def rmia_scores_torch(prob, keep, pop_prob, *, gamma=1.0, a=0.3, offline=True):
    """Vectorized RMIA [M, N] (fp64): one sort of the population ratios per target + searchsorted."""
    ratio = rmia_ratio(prob, keep, a=a, offline=offline)
    rz = rmia_population_ratio(pop_prob, a=a, offline=offline).sort(1).values.contiguous()
    # ratio(x) / ratio(z) > gamma  <=>  ratio(z) < ratio(x) / gamma   (ratios >= 0)
    q = (ratio / gamma).contiguous()
    below = torch.searchsorted(rz, torch.where(ratio.isnan(), 0.0, q), side="left")
    score = below.double() / rz.shape[1]
    return torch.where(ratio.isnan(), torch.nan, score)


def logit_confidence(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """c = z_y - logsumexp_{k != y} z_k, in fp64 (fp32 inputs) from the definition."""
    z = logits.double()
    zy = z.gather(-1, labels[..., None].long()).squeeze(-1)
    others = z.scatter(-1, labels[..., None].long(), -torch.inf)
    return zy - torch.logsumexp(others, dim=-1)
