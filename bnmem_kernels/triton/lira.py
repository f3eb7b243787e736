"""Triton kernels for LiRA: logit_confidence and lira_scores (docs/math.md, "LiRA and RMIA").

lira_scores: program p owns a block of BN examples and holds the [BN, BM] tile of (example, model)
values of one augmentation at a time (BM = M padded to a power of 2, models on the last axis).
Per row: the in/out group means, centred sums S1, S2, and (median) one tl.sort of each group
padded with +inf; each group then loses one model per target (the target itself where it is in
the group, else its member at drop_position(n, size), a fixed hash of n: the null-unbiased fit
rule of reference/lira.py),
whose value is subtracted in place or the median without it read from the sorted middle values; the Gaussian log-likelihoods are accumulated over
augmentations in registers and written once: reads M N A values, writes M N scores, no other
memory traffic (global stds, [2, M, A], come precomputed). The group statistics (centred sums and
the leave-one-out downdate) run in fp64 for every input dtype; the log-likelihoods run in the
input's precision (fp32 or fp64).

logit_confidence: program p owns BR rows and streams over K in chunks with a running max and a
rescaled sum of exponentials that skips the label: one read of the logits.
"""
import torch
import triton
import triton.language as tl

# a global read inside @triton.jit must be a tl.constexpr (a plain float compiles in the CPU
# interpreter only: every GPU compile of these kernels failed with it)
LOG_SQRT_2PI = tl.constexpr(0.91893853320467274178)


@triton.jit
def _log_ndtr(z):
    """log Phi(z): erf in |z| <= 3, a 40-term continued fraction of the Mills ratio beyond."""
    w = tl.maximum(tl.abs(z), 3.0)
    r = w
    for k in range(40, 0, -1):
        r = w + k / r
    tail = -0.5 * w * w - LOG_SQRT_2PI - tl.log(r)  # log Phi(-w)
    q = tl.exp(tail)  # Phi(-w) <= 1.35e-3: log1p(-q) by its series
    upper = -q * (1.0 + q * (0.5 + q * (1.0 / 3.0 + q * (0.25 + q * 0.2))))
    body = tl.log(0.5 * (1.0 + tl.erf(z * 0.7071067811865476)))
    return tl.where(z < -3.0, tail, tl.where(z > 3.0, upper, body))


@triton.jit
def _norm_logpdf(c, mu, s):
    zz = (c - mu) / s
    return -0.5 * zz * zz - tl.log(s) - LOG_SQRT_2PI


@triton.jit
def _pick(s, idx, rm):
    """s[row, idx[row]] for a [BN, BM] tile (0 where idx is out of range)."""
    return tl.sum(tl.where(rm[None, :] == idx[:, None], s, 0.0), axis=1)


@triton.jit
def _group_center(x, g, cnt, rn, rm, MEDIAN: tl.constexpr):
    """Mean/median and std of group g without one model, for every target: the target where it is
    in g, else g's member at drop_position(n, cnt) in model-index order (fit size cnt - 1 always).

    The sums and the downdate run in fp64 also for fp32 inputs: removing an outlying value from
    a small group cancels (S2 - d^2), which fp32 cannot resolve even centred."""
    out_dtype = x.dtype
    x = x.to(tl.float64)
    cntf = cnt.to(tl.float64)
    h = ((rn.to(tl.int64) * 2654435761) & 0xFFFFFFFF) >> 16   # drop_position(n, cnt)
    pos = (h % tl.maximum(cnt, 1).to(tl.int64)).to(tl.int32)
    rank = tl.cumsum(g.to(tl.int32), axis=1) - 1                # position of each member
    x_pick = tl.sum(tl.where(g & (rank == pos[:, None]), x, 0.0), axis=1)
    x_drop = tl.where(g, x, x_pick[:, None])
    mean = tl.sum(tl.where(g, x, 0.0), axis=1) / tl.maximum(cntf, 1.0)
    d = tl.where(g, x - mean[:, None], 0.0)
    s1 = tl.sum(d, axis=1)
    s2 = tl.sum(d * d, axis=1)
    n_t = cntf[:, None] - 1.0
    d_t = x_drop - mean[:, None]
    m_t = (s1[:, None] - d_t) / n_t
    mu = mean[:, None] + m_t
    var = tl.maximum((s2[:, None] - d_t * d_t) / n_t - m_t * m_t, 0.0)
    if MEDIAN:
        srt = tl.sort(tl.where(g, x, float("inf")), dim=1)
        p = (cnt - 1) // 2
        lo = _pick(srt, p - 1, rm)[:, None]
        mid = _pick(srt, p, rm)[:, None]
        hi = _pick(srt, p + 1, rm)[:, None]
        even = (cnt % 2 == 0)[:, None]
        loo_even = tl.where(x_drop <= mid, hi, mid)  # L even: L - 1 odd
        loo_odd = tl.where(x_drop <= lo, 0.5 * (mid + hi),
                           tl.where(x_drop >= hi, 0.5 * (lo + mid), 0.5 * (lo + hi)))
        mu = tl.where(even, loo_even, loo_odd)
    return mu.to(out_dtype), tl.sqrt(var).to(out_dtype)


@triton.jit
def lira_scores_kernel(conf_ptr, keep_ptr, gstd_ptr, out_ptr, M, N, A,
                       s_cm, s_cn, s_ca, s_km, s_kn,
                       BN: tl.constexpr, BM: tl.constexpr, ONLINE: tl.constexpr, MEDIAN: tl.constexpr,
                       LOGPDF: tl.constexpr, GLOBAL: tl.constexpr, NEED_IN: tl.constexpr,
                       NEED_OUT: tl.constexpr, ACC: tl.constexpr):
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    rm = tl.arange(0, BM)
    inside = (rn[:, None] < N) & (rm[None, :] < M)
    k = tl.load(keep_ptr + rm[None, :] * s_km + rn[:, None] * s_kn, mask=inside, other=0) != 0
    gin = k & inside
    gout = (~k) & inside
    n_in = tl.sum(gin.to(tl.int32), axis=1)
    n_out = tl.sum(gout.to(tl.int32), axis=1)
    acc = tl.zeros((BN, BM), dtype=ACC)
    for a in range(0, A):
        x = tl.load(conf_ptr + rm[None, :] * s_cm + rn[:, None] * s_cn + a * s_ca, mask=inside, other=0.0).to(ACC)
        mu_o, s_o = _group_center(x, gout, n_out, rn, rm, MEDIAN)
        if GLOBAL:
            s_o = tl.load(gstd_ptr + (M + rm) * A + a, mask=rm < M, other=1.0).to(ACC)[None, :] + 0.0 * x
        if ONLINE:
            mu_i, s_i = _group_center(x, gin, n_in, rn, rm, MEDIAN)
            if GLOBAL:
                s_i = tl.load(gstd_ptr + rm * A + a, mask=rm < M, other=1.0).to(ACC)[None, :] + 0.0 * x
            v = _norm_logpdf(x, mu_i, s_i) - _norm_logpdf(x, mu_o, s_o)
        elif LOGPDF:
            v = -_norm_logpdf(x, mu_o, s_o)
        else:
            v = _log_ndtr((x - mu_o) / s_o)
        acc += tl.where(inside, v, 0.0)
    ok = (n_out[:, None] - 1 >= NEED_OUT) & (rm[None, :] >= 0)  # every target: n_in - 1 in, n_out - 1 out
    if ONLINE:
        ok = ok & (n_in[:, None] - 1 >= NEED_IN)
    score = tl.where(ok, acc / A, float("nan"))
    tl.store(out_ptr + rm[None, :] * N + rn[:, None], score, mask=inside)


def lira_scores_triton(conf, keep, global_std, online: bool, median: bool, logpdf: bool):
    M, N, A = conf.shape
    fp64 = conf.dtype == torch.float64
    out = torch.empty(M, N, dtype=conf.dtype, device=conf.device)
    BM = triton.next_power_of_2(M)
    BN = max(1, min(64, 4096 // BM))
    need = 1 if global_std is not None else 2
    gstd = global_std.contiguous() if global_std is not None else out  # unused pointer when not GLOBAL
    keep_u8 = keep.view(torch.uint8)
    lira_scores_kernel[(triton.cdiv(N, BN),)](
        conf, keep_u8, gstd, out, M, N, A, *conf.stride(), *keep_u8.stride(),
        BN=BN, BM=BM, ONLINE=online, MEDIAN=median, LOGPDF=logpdf, GLOBAL=global_std is not None,
        NEED_IN=need if online else 0, NEED_OUT=need, ACC=tl.float64 if fp64 else tl.float32)
    return out


@triton.jit
def logit_confidence_kernel(z_ptr, y_ptr, out_ptr, R, K, s_r, s_k,
                            BR: tl.constexpr, BK: tl.constexpr, ACC: tl.constexpr):
    rr = tl.program_id(0) * BR + tl.arange(0, BR)
    rmask = rr < R
    y = tl.load(y_ptr + rr, mask=rmask, other=0)
    m = tl.full((BR,), float("-inf"), ACC)
    s = tl.zeros((BR,), ACC)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        msk = rmask[:, None] & (rk[None, :] < K) & (rk[None, :] != y[:, None])
        z = tl.load(z_ptr + rr[:, None] * s_r + rk[None, :] * s_k, mask=msk, other=float("-inf")).to(ACC)
        new_m = tl.maximum(m, tl.max(z, axis=1))
        safe = tl.where(new_m == float("-inf"), 0.0, new_m)
        s = s * tl.exp(m - safe) + tl.sum(tl.exp(z - safe[:, None]), axis=1)
        m = new_m
    zy = tl.load(z_ptr + rr * s_r + y * s_k, mask=rmask, other=0.0).to(ACC)
    tl.store(out_ptr + rr, zy - (m + tl.log(s)), mask=rmask)


def logit_confidence_triton(logits, labels):
    R, K = logits.shape
    fp64 = logits.dtype == torch.float64
    out = torch.empty(R, dtype=torch.float64 if fp64 else torch.float32, device=logits.device)
    if R == 0:
        return out
    BK = min(triton.next_power_of_2(K), 1024)
    BR = max(1, min(64, 4096 // BK))
    logit_confidence_kernel[(triton.cdiv(R, BR),)](
        logits, labels, out, R, K, *logits.stride(), BR=BR, BK=BK, ACC=tl.float64 if fp64 else tl.float32)
    return out
