"""Triton kernel for bn_seeded_backward (MATH.md, "BN's coupling, exactly").

One program per (seed s, channel c): it reduces a_sc = (1/M) sum_t dy_sct and
b_sc = (1/M) sum_t dy_sct xhat_ict over t-blocks (i = seeds[s]), then streams the rank-structured
expansion dz_sjct = scale_c ([j = i] dy_sct - a_sc - xhat_jct b_sc) over the B*T positions of that
channel in blocks. Nothing is atomically accumulated; strided inputs are read in place.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def bn_seeded_backward_kernel(x_ptr, sc_ptr, g_ptr, seed_ptr, dz_ptr, a_ptr, b_ptr,
                              B, C, T, inv_m, s_sc,
                              sx_b, sx_c, sx_t, sg_s, sg_c, sg_t,
                              BLOCK: tl.constexpr, ACC: tl.constexpr):
    s = tl.program_id(0)
    c = tl.program_id(1)
    i = tl.load(seed_ptr + s)
    sa = tl.zeros((BLOCK,), dtype=ACC)
    sb = tl.zeros((BLOCK,), dtype=ACC)
    for t0 in range(0, T, BLOCK):
        rt = t0 + tl.arange(0, BLOCK)
        m = rt < T
        g = tl.load(g_ptr + s * sg_s + c * sg_c + rt * sg_t, mask=m, other=0.0).to(ACC)
        xi = tl.load(x_ptr + i * sx_b + c * sx_c + rt * sx_t, mask=m, other=0.0).to(ACC)
        sa += g
        sb += g * xi
    a = tl.sum(sa, axis=0) * inv_m
    b = tl.sum(sb, axis=0) * inv_m
    tl.store(a_ptr + s * C + c, a.to(a_ptr.dtype.element_ty))
    tl.store(b_ptr + s * C + c, b.to(b_ptr.dtype.element_ty))
    k = tl.load(sc_ptr + c * s_sc).to(ACC)
    for p0 in range(0, B * T, BLOCK):
        rp = p0 + tl.arange(0, BLOCK)
        m = rp < B * T
        j = rp // T
        t = rp % T
        xj = tl.load(x_ptr + j * sx_b + c * sx_c + t * sx_t, mask=m, other=0.0).to(ACC)
        own = m & (j == i)
        g = tl.load(g_ptr + s * sg_s + c * sg_c + t * sg_t, mask=own, other=0.0).to(ACC)
        out = k * (g - a - xj * b)
        tl.store(dz_ptr + ((s * B + j) * C + c) * T + t, out.to(dz_ptr.dtype.element_ty), mask=m)


def bn_seeded_backward_triton(xhat: torch.Tensor, scale: torch.Tensor, dy: torch.Tensor, seeds: torch.Tensor):
    """Inputs validated by the caller. Returns (dz [S, B, C, T], a [S, C], b [S, C]) in xhat's dtype."""
    B, C, T = xhat.shape
    S = dy.shape[0]
    dz = torch.empty(S, B, C, T, dtype=xhat.dtype, device=xhat.device)
    a = torch.empty(S, C, dtype=xhat.dtype, device=xhat.device)
    b = torch.empty(S, C, dtype=xhat.dtype, device=xhat.device)
    if S == 0 or B == 0 or C == 0:
        return dz, a, b
    fp64 = xhat.dtype == torch.float64
    BLOCK = max(16, min(1024, triton.next_power_of_2(max(T, 1))))
    bn_seeded_backward_kernel[(S, C)](
        xhat, scale, dy, seeds.to(torch.int64).contiguous(), dz, a, b, B, C, T, 1.0 / (B * T), scale.stride(0),
        *xhat.stride(), *dy.stride(), BLOCK=BLOCK, ACC=tl.float64 if fp64 else tl.float32)
    return dz, a, b
