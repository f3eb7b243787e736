"""Triton kernels for ghost_norm_linear: out[i] = ||G_i^T A_i||_F^2, a [B, T, d_in], g [B, T, d_out].

Gram route: program (i, p, q) with tile q >= p forms the partial Grams G_p G_q^T and A_p A_q^T on
chip (accumulated over feature chunks), multiplies them elementwise and reduces; off-diagonal tiles
count twice. Nothing T x T reaches memory. Materialize route: program (i, o-block, k-block) forms
a [BO, BK] block of G_i^T A_i over t-chunks and reduces its squares. Each program writes one partial
into a [B, P] buffer, summed afterwards (deterministic, no atomics). Strided inputs are read in place.
"""
import torch
import triton

from .._backend import triton_interpreting
import triton.language as tl


@triton.jit
def _mm_nt(x, y, USE_DOT: tl.constexpr):
    """x [M, K] @ y[N, K]^T in the accumulation dtype.

    USE_DOT: 0 = broadcast-and-reduce in fp64 (fp64 inputs), 1 = tl.dot (fp32 "ieee", fp16, bf16 with
    fp32 accumulation), 2 = tl.dot after upcasting to fp32 (bf16 in the Triton 3.9 CPU interpreter,
    whose bf16 tl.dot returns garbage).

    One return at the end: the compiler rejects early returns inside `if`s, constexpr ones included
    ("return types disagree"), which the CPU interpreter never sees (compile_check.py catches it).
    """
    if USE_DOT == 2:
        r = tl.dot(x.to(tl.float32), tl.trans(y.to(tl.float32)), input_precision="ieee")
    elif USE_DOT == 1:
        r = tl.dot(x, tl.trans(y), input_precision="ieee")
    else:
        r = tl.sum(x[:, None, :].to(tl.float64) * y[None, :, :].to(tl.float64), axis=2)
    return r


@triton.jit
def _gram_tile(x_ptr, s_t, s_d, t0, u0, T, D, BT: tl.constexpr, BD: tl.constexpr, USE_DOT: tl.constexpr,
               ACC: tl.constexpr):
    """X[t0:t0+BT] @ X[u0:u0+BT]^T for one sample (rows past T read as zero)."""
    rt = t0 + tl.arange(0, BT)
    ru = u0 + tl.arange(0, BT)
    acc = tl.zeros((BT, BT), dtype=ACC)
    for d0 in range(0, D, BD):
        rd = d0 + tl.arange(0, BD)
        xt = tl.load(x_ptr + rt[:, None] * s_t + rd[None, :] * s_d, mask=(rt[:, None] < T) & (rd[None, :] < D), other=0.0)
        xu = tl.load(x_ptr + ru[:, None] * s_t + rd[None, :] * s_d, mask=(ru[:, None] < T) & (rd[None, :] < D), other=0.0)
        acc += _mm_nt(xt, xu, USE_DOT)
    return acc


@triton.jit
def ghost_gram_kernel(a_ptr, g_ptr, part_ptr, T, DIN, DOUT,
                      sa_b, sa_t, sa_d, sg_b, sg_t, sg_d, n_tiles,
                      BT: tl.constexpr, BD: tl.constexpr, USE_DOT: tl.constexpr, ACC: tl.constexpr):
    i = tl.program_id(0)
    pq = tl.program_id(1)
    p = pq // n_tiles
    q = pq % n_tiles
    total = tl.zeros((), dtype=ACC)
    if q >= p:
        gg = _gram_tile(g_ptr + i * sg_b, sg_t, sg_d, p * BT, q * BT, T, DOUT, BT, BD, USE_DOT, ACC)
        aa = _gram_tile(a_ptr + i * sa_b, sa_t, sa_d, p * BT, q * BT, T, DIN, BT, BD, USE_DOT, ACC)
        weight = tl.where(q > p, 2.0, 1.0)
        total = (tl.sum(tl.sum(gg * aa, axis=1), axis=0) * weight).to(ACC)
    tl.store(part_ptr + i * n_tiles * n_tiles + pq, total)


@triton.jit
def ghost_materialize_kernel(a_ptr, g_ptr, part_ptr, T, DIN, DOUT,
                             sa_b, sa_t, sa_d, sg_b, sg_t, sg_d, n_k,
                             BO: tl.constexpr, BK: tl.constexpr, BT: tl.constexpr,
                             USE_DOT: tl.constexpr, ACC: tl.constexpr):
    i = tl.program_id(0)
    ok = tl.program_id(1)
    ro = (ok // n_k) * BO + tl.arange(0, BO)
    rk = (ok % n_k) * BK + tl.arange(0, BK)
    acc = tl.zeros((BO, BK), dtype=ACC)
    for t0 in range(0, T, BT):
        rt = t0 + tl.arange(0, BT)
        # G^T block [BO, BT] and A^T block [BK, BT]: W[o, k] = sum_t g[t, o] a[t, k]
        gT = tl.load(g_ptr + i * sg_b + rt[None, :] * sg_t + ro[:, None] * sg_d,
                     mask=(rt[None, :] < T) & (ro[:, None] < DOUT), other=0.0)
        aT = tl.load(a_ptr + i * sa_b + rt[None, :] * sa_t + rk[:, None] * sa_d,
                     mask=(rt[None, :] < T) & (rk[:, None] < DIN), other=0.0)
        acc += _mm_nt(gT, aT, USE_DOT)
    total = tl.sum(tl.sum(acc * acc, axis=1), axis=0)
    tl.store(part_ptr + i * tl.num_programs(1) + ok, total)


def ghost_norm_linear_triton(a: torch.Tensor, g: torch.Tensor, gram: bool) -> torch.Tensor:
    """Partial sums per program, then a sum over them. Inputs validated by the caller."""
    B, T, din = a.shape
    dout = g.shape[2]
    fp64 = a.dtype == torch.float64
    acc_dtype = torch.float64 if fp64 else torch.float32
    use_dot = 0 if fp64 else 2 if (a.dtype == torch.bfloat16 and triton_interpreting()) else 1
    ACC = tl.float64 if fp64 else tl.float32
    if B == 0:
        return torch.zeros(0, dtype=acc_dtype, device=a.device)
    BT, BD = 16, (16 if fp64 else 64)
    if gram:
        n_tiles = triton.cdiv(T, BT)
        part = torch.empty(B, n_tiles * n_tiles, dtype=acc_dtype, device=a.device)
        ghost_gram_kernel[(B, n_tiles * n_tiles)](
            a, g, part, T, din, dout, *a.stride(), *g.stride(), n_tiles,
            BT=BT, BD=BD, USE_DOT=use_dot, ACC=ACC)
    else:
        BO = BK = 16 if fp64 else 32
        n_o, n_k = triton.cdiv(dout, BO), triton.cdiv(din, BK)
        part = torch.empty(B, n_o * n_k, dtype=acc_dtype, device=a.device)
        ghost_materialize_kernel[(B, n_o * n_k)](
            a, g, part, T, din, dout, *a.stride(), *g.stride(), n_k,
            BO=BO, BK=BK, BT=BT, USE_DOT=use_dot, ACC=ACC)
    return part.sum(dim=1)
