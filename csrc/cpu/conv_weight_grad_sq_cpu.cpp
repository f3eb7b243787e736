// conv_weight_grad_sq on CPU: out[i] = ||dW_i||_F^2 of a Conv2d weight gradient, implicit im2col.
//   dW_i[co, ci, kh, kw] = sum_{oh, ow} g[i, co, oh, ow] x[i, g_ci, oh sh + kh dh, ow sw + kw dw]
// (x already padded). Samples in parallel (at::parallel_for); per sample, in thread-local buffers:
//  * x is re-laid out by stride phase, x'[c, rh, rw, a, b] = x[c, a sh + rh, b sw + rw], so tap
//    (kh, kw) at output (oh, ow) reads x'[c, (kh dh) % sh, (kw dw) % sw, oh + (kh dh) / sh,
//    ow + (kw dw) / sw]: for every stride and dilation a tap is a contiguous window of row stride Wq;
//  * g is copied with the same row stride Wq ("flat": rows laid end to end, zeros in the gaps, so
//    every weight entry is ONE contiguous dot of length (OH - 1) Wq + OW) or, when the gaps would
//    cost more, row by row padded to the vector width;
//  * a register-blocked micro-kernel computes a CB x TB block of weight entries (CB output channels
//    x TB taps) as vector partial sums, over chunks of positions that stay in L1; the partial sums
//    of the whole [C_out/g, C_in/g kh kw] tile live in a thread-local buffer and are reduced,
//    squared and summed (in double) at the end. Nothing bigger than one sample is ever formed.
// Inputs of any strides are read in place; fp16/bf16 are converted to fp32 when copied, so they
// accumulate in fp32. The micro-kernel is compiled twice (AVX2+FMA and baseline SSE2) and picked at
// run time (BNMEM_CPU_ISA=baseline forces SSE2). (An AVX-512 build, 4 x 6 blocks, measured 10%
// slower on the Zen 4 dev machine.)
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "../include/bnmem_common.h"
#include <torch/library.h>

namespace bnmem {
namespace {

// Everything the per-sample kernel needs to know about the shapes, worked out once per call.
struct Geometry {
  int64_t C, Co, groups, Cig, Cog, K;   // K = Cig * KH * KW weight entries per output channel
  int64_t OH, OW, Hu, Wu;               // Hu, Wu: the rows/columns of x the conv reads
  int64_t sh, sw, Hq, Wq;               // stride phases; phase planes are [Hq, Wq]
  int64_t plane_c;                      // x' elements per input channel: sh * sw * Hq * Wq
  bool flat;                            // one contiguous dot per entry (else one per output row)
  int64_t nseg, seglen;                 // flat: 1 x padded length; rows: OH x OW padded
  int64_t Lg;                           // g' elements per output channel
  int64_t xsize;                        // x' buffer elements (with zero slack for the padded tails)
  std::vector<int64_t> tap_off;         // [K]: offset of each tap's window in x' (group-local)
};

int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

Geometry make_geometry(int64_t C, int64_t Co, int64_t groups, int64_t OH, int64_t OW, int64_t KH, int64_t KW,
                       int64_t sh, int64_t sw, int64_t dh, int64_t dw, int64_t lanes) {
  Geometry g;
  g.C = C, g.Co = Co, g.groups = groups, g.Cig = C / groups, g.Cog = Co / groups, g.K = g.Cig * KH * KW;
  g.OH = OH, g.OW = OW, g.sh = sh, g.sw = sw;
  g.Hu = (OH - 1) * sh + (KH - 1) * dh + 1;
  g.Wu = (OW - 1) * sw + (KW - 1) * dw + 1;
  g.Hq = (g.Hu + sh - 1) / sh;
  g.Wq = (g.Wu + sw - 1) / sw;
  g.plane_c = sh * sw * g.Hq * g.Wq;
  const int64_t flat_len = round_up((OH - 1) * g.Wq + OW, lanes);
  const int64_t row_len = round_up(OW, lanes);
  g.flat = flat_len <= OH * row_len;
  g.nseg = g.flat ? 1 : OH;
  g.seglen = g.flat ? flat_len : row_len;
  g.Lg = g.nseg * g.seglen;
  g.tap_off.resize(g.K);
  int64_t max_off = 0;
  for (int64_t ci = 0; ci < g.Cig; ++ci)
    for (int64_t kh = 0; kh < KH; ++kh)
      for (int64_t kw = 0; kw < KW; ++kw) {
        const int64_t rh = kh * dh % sh, qh = kh * dh / sh, rw = kw * dw % sw, qw = kw * dw / sw;
        const int64_t off = ((ci * sh + rh) * sw + rw) * g.Hq * g.Wq + qh * g.Wq + qw;
        g.tap_off[(ci * KH + kh) * KW + kw] = off;
        max_off = std::max(max_off, off);
      }
  const int64_t read_len = (g.nseg - 1) * g.Wq + g.seglen;   // elements a tap's window spans
  g.xsize = std::max(C * g.plane_c, (C - g.Cig) * g.plane_c + max_off + read_len);
  return g;
}

// x'[c, rh, rw, a, b] = x[c, a sh + rh, b sw + rw] for the read rows/columns (others stay zero).
template <typename scalar_t, typename T>
void pack_x(const scalar_t* x, const int64_t* xs, const Geometry& geo, T* xq) {
  for (int64_t c = 0; c < geo.C; ++c)
    for (int64_t h = 0; h < geo.Hu; ++h) {
      const scalar_t* src = x + c * xs[0] + h * xs[1];
      T* dst = xq + c * geo.plane_c + (h % geo.sh) * geo.sw * geo.Hq * geo.Wq + (h / geo.sh) * geo.Wq;
      if (geo.sw == 1 && xs[2] == 1) {
        for (int64_t w = 0; w < geo.Wu; ++w) dst[w] = static_cast<T>(src[w]);
      } else {
        for (int64_t rw = 0; rw < geo.sw; ++rw) {   // phase rw: columns rw, rw + sw, ...
          T* d = dst + rw * geo.Hq * geo.Wq;
          const scalar_t* sp = src + rw * xs[2];
          const int64_t n = (geo.Wu - rw + geo.sw - 1) / geo.sw, step = geo.sw * xs[2];
          for (int64_t b = 0; b < n; ++b) d[b] = static_cast<T>(sp[b * step]);
        }
      }
    }
}

// g'[co, p]: flat, p = oh Wq + ow; by rows, p = oh seglen + ow (gaps stay zero).
template <typename scalar_t, typename T>
void pack_g(const scalar_t* g, const int64_t* gs, const Geometry& geo, T* gq) {
  const int64_t rs = geo.flat ? geo.Wq : geo.seglen;
  for (int64_t co = 0; co < geo.Co; ++co)
    for (int64_t oh = 0; oh < geo.OH; ++oh) {
      const scalar_t* src = g + co * gs[0] + oh * gs[1];
      T* dst = gq + co * geo.Lg + oh * rs;
      if (gs[2] == 1) {
        for (int64_t ow = 0; ow < geo.OW; ++ow) dst[ow] = static_cast<T>(src[ow]);
      } else {
        for (int64_t ow = 0; ow < geo.OW; ++ow) dst[ow] = static_cast<T>(src[ow * gs[2]]);
      }
    }
}

// ---------------------------------------------------------------------------------------------
// The micro-kernel and the per-sample driver. GCC vector extensions, so the same source compiles
// for each instruction set; FMA contraction allowed here only (the file is built with -std=c++17,
// where GCC turns contraction off).
#pragma GCC push_options
#pragma GCC optimize("fp-contract=fast")
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"

#include "../include/bnmem_simd_inl.h"  // loadu, storeu, bcast (inside this region on purpose)

// acc[c][t] (vector partial sums at tile + (c * ld + t) * W) += sum over segments s < nseg and
// v < len of g[c][s sg + v] * x[t][s sx + v]; CB x TB accumulators stay in registers.
// DIRECT (the whole sum in one call): start from zero, and add the squares of the finished entries
// to *sq instead of going through the tile.
template <int CB, int TB, bool DIRECT, typename V, typename T>
BNMEM_INLINE void micro(const T* const* gp, const T* const* xp, int64_t nseg, int64_t len, int64_t sg, int64_t sx,
                        T* tile, int64_t ld, double* sq) {
  constexpr int W = sizeof(V) / sizeof(T);
  V a[CB][TB];
  const T* g[CB];
  const T* x[TB];
#pragma GCC unroll 8
  for (int c = 0; c < CB; ++c) {
    g[c] = gp[c];
#pragma GCC unroll 8
    for (int t = 0; t < TB; ++t) a[c][t] = DIRECT ? V{} : loadu<V>(tile + (c * ld + t) * W);
  }
#pragma GCC unroll 8
  for (int t = 0; t < TB; ++t) x[t] = xp[t];
  for (int64_t s = 0; s < nseg; ++s) {
    for (int64_t v = 0; v < len; v += W) {
      V xv[TB];
#pragma GCC unroll 8
      for (int t = 0; t < TB; ++t) xv[t] = loadu<V>(x[t] + v);
#pragma GCC unroll 8
      for (int c = 0; c < CB; ++c) {
        const V gv = loadu<V>(g[c] + v);
#pragma GCC unroll 8
        for (int t = 0; t < TB; ++t) a[c][t] += gv * xv[t];
      }
    }
#pragma GCC unroll 8
    for (int c = 0; c < CB; ++c) g[c] += sg;
#pragma GCC unroll 8
    for (int t = 0; t < TB; ++t) x[t] += sx;
  }
  if constexpr (DIRECT) {
    double total = 0;
    for (int c = 0; c < CB; ++c)
      for (int t = 0; t < TB; ++t) {
        T e = 0;
        for (int j = 0; j < W; ++j) e += a[c][t][j];
        total += static_cast<double>(e) * static_cast<double>(e);
      }
    *sq += total;
  } else {
#pragma GCC unroll 8
    for (int c = 0; c < CB; ++c)
#pragma GCC unroll 8
      for (int t = 0; t < TB; ++t) storeu(tile + (c * ld + t) * W, a[c][t]);
  }
}

// micro<cb, tb> for run-time cb <= CB, tb <= TB.
template <int CB, int TB, bool DIRECT, typename V, typename T>
BNMEM_INLINE void micro_tb(int tb, const T* const* gp, const T* const* xp, int64_t nseg, int64_t len, int64_t sg,
                           int64_t sx, T* tile, int64_t ld, double* sq) {
  if constexpr (TB >= 1) {
    if (tb == TB) return micro<CB, TB, DIRECT, V, T>(gp, xp, nseg, len, sg, sx, tile, ld, sq);
    micro_tb<CB, TB - 1, DIRECT, V, T>(tb, gp, xp, nseg, len, sg, sx, tile, ld, sq);
  }
}

template <int CB, int TB, bool DIRECT, typename V, typename T>
BNMEM_INLINE void micro_any(int cb, int tb, const T* const* gp, const T* const* xp, int64_t nseg, int64_t len,
                            int64_t sg, int64_t sx, T* tile, int64_t ld, double* sq) {
  if constexpr (CB >= 1) {
    if (cb == CB) return micro_tb<CB, TB, DIRECT, V, T>(tb, gp, xp, nseg, len, sg, sx, tile, ld, sq);
    micro_any<CB - 1, TB, DIRECT, V, T>(cb, tb, gp, xp, nseg, len, sg, sx, tile, ld, sq);
  }
}

constexpr int kCB = 4;            // output channels per register block
constexpr int64_t kChunk = 2048;  // positions per pass: a 4-row g block + the x windows stay in L1/L2

// ||dW_i||^2 of one packed sample. tile: Cog * K * W scratch values.
template <typename T, int VBYTES, int TB>
BNMEM_INLINE double sample_sq(const Geometry& geo, const T* xq, const T* gq, T* tile) {
  typedef T V __attribute__((vector_size(VBYTES)));
  constexpr int W = VBYTES / sizeof(T);
  const int64_t K = geo.K, Cog = geo.Cog;
  double total = 0;
  for (int64_t grp = 0; grp < geo.groups; ++grp) {
    const T* xg = xq + grp * geo.Cig * geo.plane_c;
    const T* gg = gq + grp * Cog * geo.Lg;
    // pieces: flat -> chunks of positions of the one segment; rows -> chunks of rows
    const int64_t rows_per = geo.flat ? 1 : std::max<int64_t>(1, kChunk / geo.seglen);
    const int64_t n_pieces = geo.flat ? (geo.seglen + kChunk - 1) / kChunk : (geo.nseg + rows_per - 1) / rows_per;
    const bool direct = n_pieces == 1;   // one pass: entries finish in registers, no tile
    if (!direct) std::fill(tile, tile + Cog * K * W, T(0));
    for (int64_t pc = 0; pc < n_pieces; ++pc) {
      int64_t g_off, x_off, nseg, len;
      if (geo.flat) {
        g_off = x_off = pc * kChunk;
        nseg = 1;
        len = std::min(kChunk, geo.seglen - g_off);
      } else {
        const int64_t s0 = pc * rows_per;
        g_off = s0 * geo.seglen;
        x_off = s0 * geo.Wq;
        nseg = std::min(rows_per, geo.nseg - s0);
        len = geo.seglen;
      }
      for (int64_t c0 = 0; c0 < Cog; c0 += kCB) {
        const int cb = static_cast<int>(std::min<int64_t>(kCB, Cog - c0));
        const T* gptr[kCB];
        for (int c = 0; c < cb; ++c) gptr[c] = gg + (c0 + c) * geo.Lg + g_off;
        for (int64_t t0 = 0; t0 < K; t0 += TB) {
          const int tb = static_cast<int>(std::min<int64_t>(TB, K - t0));
          const T* xptr[TB];
          for (int t = 0; t < tb; ++t) xptr[t] = xg + geo.tap_off[t0 + t] + x_off;
          if (direct)
            micro_any<kCB, TB, true, V, T>(cb, tb, gptr, xptr, nseg, len, geo.seglen, geo.Wq, nullptr, K, &total);
          else
            micro_any<kCB, TB, false, V, T>(cb, tb, gptr, xptr, nseg, len, geo.seglen, geo.Wq, tile + (c0 * K + t0) * W,
                                            K, &total);
        }
      }
    }
    if (direct) continue;
    for (int64_t e = 0; e < Cog * K; ++e) {
      T s = 0;
      for (int j = 0; j < W; ++j) s += tile[e * W + j];
      total += static_cast<double>(s) * static_cast<double>(s);
    }
  }
  return total;
}

using SampleFn = double (*)(const Geometry&, const void*, const void*, void*);

template <typename T>
double sample_baseline(const Geometry& geo, const void* xq, const void* gq, void* tile) {
  return sample_sq<T, 16, 3>(geo, static_cast<const T*>(xq), static_cast<const T*>(gq), static_cast<T*>(tile));
}

#ifdef BNMEM_X86_DISPATCH
template <typename T>
__attribute__((target("avx2,fma"))) double sample_avx2(const Geometry& geo, const void* xq, const void* gq,
                                                       void* tile) {
  return sample_sq<T, 32, 3>(geo, static_cast<const T*>(xq), static_cast<const T*>(gq), static_cast<T*>(tile));
}

#endif

#pragma GCC diagnostic pop
#pragma GCC pop_options
// ---------------------------------------------------------------------------------------------

// The widest kernel this CPU runs, and its vector width in bytes.
// BNMEM_CPU_ISA=baseline forces the SSE2 build (tests cover it that way; same numbers up to rounding).
template <typename T>
SampleFn pick_kernel(int64_t* vbytes) {
#ifdef BNMEM_X86_DISPATCH
  if (cpu_use_avx2()) {
    *vbytes = 32;
    return &sample_avx2<T>;
  }
#endif
  *vbytes = 16;
  return &sample_baseline<T>;
}

template <typename scalar_t, typename T>
void run(const at::Tensor& x, const at::Tensor& g, at::IntArrayRef ks, at::IntArrayRef st, at::IntArrayRef dil,
         int64_t groups, at::Tensor& out) {
  const int64_t B = x.size(0);
  int64_t vbytes = 16;
  const SampleFn fn = pick_kernel<T>(&vbytes);
  const int64_t W = vbytes / int64_t(sizeof(T));
  const Geometry geo = make_geometry(x.size(1), g.size(1), groups, g.size(2), g.size(3), ks[0], ks[1], st[0], st[1],
                                     dil[0], dil[1], W);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* gp = g.const_data_ptr<scalar_t>();
  const int64_t xs[3] = {x.stride(1), x.stride(2), x.stride(3)};
  const int64_t gs[3] = {g.stride(1), g.stride(2), g.stride(3)};
  const int64_t xb = x.stride(0), gb = g.stride(0);
  using out_t = std::conditional_t<std::is_same_v<T, double>, double, float>;
  out_t* op = out.data_ptr<out_t>();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> xq(geo.xsize, T(0)), gq(geo.Co * geo.Lg, T(0)), tile(geo.Cog * geo.K * W);
    for (int64_t i = begin; i < end; ++i) {
      pack_x(xp + i * xb, xs, geo, xq.data());
      pack_g(gp + i * gb, gs, geo, gq.data());
      op[i] = static_cast<out_t>(fn(geo, xq.data(), gq.data(), tile.data()));
    }
  });
}

at::Tensor conv_weight_grad_sq_cpu(const at::Tensor& x, const at::Tensor& g, at::IntArrayRef kernel_size,
                                   at::IntArrayRef stride, at::IntArrayRef dilation, int64_t groups) {
  check_conv_weight_grad_sq_inputs(x, g, kernel_size, stride, dilation, groups);
  const int64_t B = x.size(0);
  at::Tensor out = at::empty({B}, x.options().dtype(norm_out_dtype(x.scalar_type())));
  if (B == 0 || g.size(1) == 0) return out.zero_();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "conv_weight_grad_sq_cpu", [&] {
    using T = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    run<scalar_t, T>(x, g, kernel_size, stride, dilation, groups, out);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(bnmem, CPU, m) { m.impl("conv_weight_grad_sq", &conv_weight_grad_sq_cpu); }

}  // namespace bnmem
