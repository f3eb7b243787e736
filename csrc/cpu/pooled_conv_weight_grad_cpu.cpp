// pooled_conv_weight_grad on CPU: the Conv2d weight gradient of N seeds whose output gradients are
// nonzero only at one position per (sample b, output channel o, pooled slot p):
//   dW[n, o, i, a, c] = sum_{b, p} vals[o, n, b, p] x_pad[b, g(o) Cig + i, oh sh + a dh, ow sw + c dw],
//   (oh, ow) = divmod(idx[b, o, p], Wo).
// Output channels in parallel (at::parallel_for); per o, an N x K accumulator (K = Cig kh kw) in a
// thread-local buffer (L1/L2), the (b, p) maxima taken in chunks. Two register-blocked routes:
//  * seeds in vector lanes (fp32/fp64 with N >= the vector width; the bench shapes): acc [K, Nv]; per
//    maximum j the window entries are read IN PLACE from x_pad (window corner + per-entry offset) and
//    broadcast against the chunk's values v[j, :] (6 entries x 2 vectors of seeds per register block);
//    no window is copied at all;
//  * window entries in vector lanes (N below the width, and fp16/bf16): each window is read once into
//    a [PB, Kpad] chunk scratch (fp16/bf16 converted to fp32 there), then 4 seeds x 3 vectors of
//    entries per register block, acc [Npad, Kpad] += v^T win.
// No unfolded matrix, no gathered copy bigger than one chunk; (b, p) and window corners without
// divisions. Inputs of any strides are read in place; fp16/bf16 accumulate in fp32 and are returned
// in the input dtype. The micro-kernels are compiled twice (AVX2+FMA and baseline SSE2) and picked at
// run time (bnmem_common.h cpu_use_avx2; BNMEM_CPU_ISA=baseline forces SSE2; the tests run both).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <vector>

#include "../include/bnmem_common.h"
#ifdef BNMEM_X86_DISPATCH
#include <immintrin.h>
#endif
#include "../include/pooled_conv_weight_grad_check.h"
#include <torch/library.h>

namespace bnmem {
namespace {

constexpr int kNB = 4;   // seeds per register block
constexpr int kTB = 3;   // vectors of window entries per register block

struct PGeom {
  int64_t N, Npad, B, P, BP, Co, Cog, Cig, K, Kpad, Wo, HoWo, sh, sw;
  int64_t PB;                      // (b, p) maxima per chunk
  int64_t sx[4], sv[4], si[3];
  std::vector<int64_t> tap;        // [K]: offset of window entry k = (i, a, c) from the window's corner
  std::vector<int64_t> posoff;     // [Ho Wo]: offset of the window corner of output position oh Wo + ow
};

int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// ---------------------------------------------------------------------------------------------
// The micro-kernel: GCC vector extensions, so the same source compiles for each instruction set;
// FMA contraction allowed here only.
#pragma GCC push_options
#pragma GCC optimize("fp-contract=fast")
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"

#include "../include/bnmem_simd_inl.h"  // loadu, storeu, bcast (inside this region on purpose)

// acc[c, t W .. t W + W) += sum_{j < pb} v[j Npad + c] win[j Kpad + t W ..], c < kNB, t < TB.
template <int TB, typename V, typename T>
BNMEM_INLINE void micro(const T* win, int64_t Kpad, const T* v, int64_t Npad, int64_t pb, T* acc, int64_t ld) {
  constexpr int W = sizeof(V) / sizeof(T);
  V a[kNB][TB];
#pragma GCC unroll 4
  for (int c = 0; c < kNB; ++c)
#pragma GCC unroll 4
    for (int t = 0; t < TB; ++t) a[c][t] = loadu<V>(acc + c * ld + t * W);
  for (int64_t j = 0; j < pb; ++j) {
    V xv[TB];
#pragma GCC unroll 4
    for (int t = 0; t < TB; ++t) xv[t] = loadu<V>(win + j * Kpad + t * W);
#pragma GCC unroll 4
    for (int c = 0; c < kNB; ++c) {
      const V bv = bcast<V>(v[j * Npad + c]);
#pragma GCC unroll 4
      for (int t = 0; t < TB; ++t) a[c][t] += bv * xv[t];
    }
  }
#pragma GCC unroll 4
  for (int c = 0; c < kNB; ++c)
#pragma GCC unroll 4
    for (int t = 0; t < TB; ++t) storeu(acc + c * ld + t * W, a[c][t]);
}

// acc [Npad, Kpad] += v[pb, Npad]^T win[pb, Kpad].
template <typename T, int VBYTES>
BNMEM_INLINE void chunk_update(const T* win, const T* v, int64_t pb, int64_t Npad, int64_t Kpad, T* acc) {
  typedef T V __attribute__((vector_size(VBYTES)));
  constexpr int W = VBYTES / sizeof(T);
  for (int64_t n0 = 0; n0 < Npad; n0 += kNB) {
    int64_t k0 = 0;
    for (; k0 + kTB * W <= Kpad; k0 += kTB * W)
      micro<kTB, V, T>(win + k0, Kpad, v + n0, Npad, pb, acc + n0 * Kpad + k0, Kpad);
    const int64_t rest = (Kpad - k0) / W;
    if (rest == 2) micro<2, V, T>(win + k0, Kpad, v + n0, Npad, pb, acc + n0 * Kpad + k0, Kpad);
    if (rest == 1) micro<1, V, T>(win + k0, Kpad, v + n0, Npad, pb, acc + n0 * Kpad + k0, Kpad);
  }
}

using ChunkFn = void (*)(const void*, const void*, int64_t, int64_t, int64_t, void*);

template <typename T>
void chunk_baseline(const void* win, const void* v, int64_t pb, int64_t Npad, int64_t Kpad, void* acc) {
  chunk_update<T, 16>(static_cast<const T*>(win), static_cast<const T*>(v), pb, Npad, Kpad, static_cast<T*>(acc));
}

#ifdef BNMEM_X86_DISPATCH
template <typename T>
__attribute__((target("avx2,fma"))) void chunk_avx2(const void* win, const void* v, int64_t pb, int64_t Npad,
                                                    int64_t Kpad, void* acc) {
  chunk_update<T, 32>(static_cast<const T*>(win), static_cast<const T*>(v), pb, Npad, Kpad, static_cast<T*>(acc));
}
#endif


// Seed-vectorized variant (N >= the vector width; float/double inputs): acc [K, Nv] (Nv = N padded to W)
// += for each maximum j the window entries x[off[j] + tap[k]] (broadcast, read in place: no gathered
// window) times v[j, :]. Register block: KB window entries x NVB vectors of seeds.
template <int KB, int NVB, typename V, typename T>
BNMEM_INLINE void micro_n(const T* x, const int64_t* off, const int64_t* tap, const T* v, int64_t Nv, int64_t pb,
                          T* acc) {
  constexpr int W = sizeof(V) / sizeof(T);
  V a[KB][NVB];
  int64_t tp[KB];
#pragma GCC unroll 8
  for (int k = 0; k < KB; ++k) {
    tp[k] = tap[k];
#pragma GCC unroll 4
    for (int t = 0; t < NVB; ++t) a[k][t] = loadu<V>(acc + k * Nv + t * W);
  }
  for (int64_t j = 0; j < pb; ++j) {
    const T* xb = x + off[j];
    V vv[NVB];
#pragma GCC unroll 4
    for (int t = 0; t < NVB; ++t) vv[t] = loadu<V>(v + j * Nv + t * W);
#pragma GCC unroll 8
    for (int k = 0; k < KB; ++k) {
      const V bx = bcast<V>(xb[tp[k]]);
#pragma GCC unroll 4
      for (int t = 0; t < NVB; ++t) a[k][t] += bx * vv[t];
    }
  }
#pragma GCC unroll 8
  for (int k = 0; k < KB; ++k)
#pragma GCC unroll 4
    for (int t = 0; t < NVB; ++t) storeu(acc + k * Nv + t * W, a[k][t]);
}

template <int KB, int NVB, typename V, typename T>
BNMEM_INLINE void micro_n_kb(int kb, const T* x, const int64_t* off, const int64_t* tap, const T* v, int64_t Nv,
                             int64_t pb, T* acc) {
  if constexpr (KB >= 1) {
    if (kb == KB) return micro_n<KB, NVB, V, T>(x, off, tap, v, Nv, pb, acc);
    micro_n_kb<KB - 1, NVB, V, T>(kb, x, off, tap, v, Nv, pb, acc);
  }
}

constexpr int kKB = 6;   // window entries per register block of the seed-vectorized kernel

template <typename T, int VBYTES>
BNMEM_INLINE void chunk_update_n(const T* x, const int64_t* off, const int64_t* tap, int64_t K, const T* v,
                                 int64_t pb, int64_t Nv, T* acc) {
  typedef T V __attribute__((vector_size(VBYTES)));
  constexpr int W = VBYTES / sizeof(T);
  for (int64_t k0 = 0; k0 < K; k0 += kKB) {
    const int kb = static_cast<int>(std::min<int64_t>(kKB, K - k0));
    int64_t n0 = 0;
    for (; n0 + 2 * W <= Nv; n0 += 2 * W)
      micro_n_kb<kKB, 2, V, T>(kb, x, off, tap + k0, v + n0, Nv, pb, acc + k0 * Nv + n0);
    if (n0 < Nv) micro_n_kb<kKB, 1, V, T>(kb, x, off, tap + k0, v + n0, Nv, pb, acc + k0 * Nv + n0);
  }
}

using ChunkNFn = void (*)(const void*, const int64_t*, const int64_t*, int64_t, const void*, int64_t, int64_t, void*);

template <typename T>
void chunk_n_baseline(const void* x, const int64_t* off, const int64_t* tap, int64_t K, const void* v, int64_t pb,
                      int64_t Nv, void* acc) {
  chunk_update_n<T, 16>(static_cast<const T*>(x), off, tap, K, static_cast<const T*>(v), pb, Nv, static_cast<T*>(acc));
}

#ifdef BNMEM_X86_DISPATCH
template <typename T>
__attribute__((target("avx2,fma"))) void chunk_n_avx2(const void* x, const int64_t* off, const int64_t* tap, int64_t K,
                                                      const void* v, int64_t pb, int64_t Nv, void* acc) {
  chunk_update_n<T, 32>(static_cast<const T*>(x), off, tap, K, static_cast<const T*>(v), pb, Nv, static_cast<T*>(acc));
}
#endif

#pragma GCC diagnostic pop
#pragma GCC pop_options

// Packing a chunk's values: a run of maxima of one sample, seed by seed (rows n of `src`, row stride ss, the
// run contiguous) into dst [run, ds] (seeds along a row). The generic loop moves one scalar at a time; with
// AVX2, float, 8 x 8 blocks are transposed in registers (the scalar loop was ~as long as the FMAs for
// K = 27, the first conv of the bench CNN).
using PackFn = void (*)(const float*, int64_t, int64_t, int64_t, float*, int64_t);

#ifdef BNMEM_X86_DISPATCH
__attribute__((target("avx2,fma"))) void pack_f32_avx2(const float* src, int64_t ss, int64_t N, int64_t run,
                                                       float* dst, int64_t ds) {
  int64_t n0 = 0;
  for (; n0 + 8 <= N; n0 += 8) {
    int64_t r = 0;
    for (; r + 8 <= run; r += 8) {
      const float* s0 = src + n0 * ss + r;
      const __m256 r0 = _mm256_loadu_ps(s0), r1 = _mm256_loadu_ps(s0 + ss), r2 = _mm256_loadu_ps(s0 + 2 * ss),
                   r3 = _mm256_loadu_ps(s0 + 3 * ss), r4 = _mm256_loadu_ps(s0 + 4 * ss),
                   r5 = _mm256_loadu_ps(s0 + 5 * ss), r6 = _mm256_loadu_ps(s0 + 6 * ss),
                   r7 = _mm256_loadu_ps(s0 + 7 * ss);
      const __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1), t2 = _mm256_unpacklo_ps(r2, r3),
                   t3 = _mm256_unpackhi_ps(r2, r3), t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5),
                   t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
      const __m256 u0 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0)),
                   u1 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2)),
                   u2 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0)),
                   u3 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2)),
                   u4 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(1, 0, 1, 0)),
                   u5 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(3, 2, 3, 2)),
                   u6 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(1, 0, 1, 0)),
                   u7 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(3, 2, 3, 2));
      float* d0 = dst + r * ds + n0;
      _mm256_storeu_ps(d0, _mm256_permute2f128_ps(u0, u4, 0x20));
      _mm256_storeu_ps(d0 + ds, _mm256_permute2f128_ps(u1, u5, 0x20));
      _mm256_storeu_ps(d0 + 2 * ds, _mm256_permute2f128_ps(u2, u6, 0x20));
      _mm256_storeu_ps(d0 + 3 * ds, _mm256_permute2f128_ps(u3, u7, 0x20));
      _mm256_storeu_ps(d0 + 4 * ds, _mm256_permute2f128_ps(u0, u4, 0x31));
      _mm256_storeu_ps(d0 + 5 * ds, _mm256_permute2f128_ps(u1, u5, 0x31));
      _mm256_storeu_ps(d0 + 6 * ds, _mm256_permute2f128_ps(u2, u6, 0x31));
      _mm256_storeu_ps(d0 + 7 * ds, _mm256_permute2f128_ps(u3, u7, 0x31));
    }
    for (; r < run; ++r)
      for (int64_t k = 0; k < 8; ++k) dst[r * ds + n0 + k] = src[(n0 + k) * ss + r];
  }
  for (; n0 < N; ++n0)
    for (int64_t r = 0; r < run; ++r) dst[r * ds + n0] = src[n0 * ss + r];
}
#endif

PackFn pick_pack() {
#ifdef BNMEM_X86_DISPATCH
  if (cpu_use_avx2()) return &pack_f32_avx2;
#endif
  return nullptr;
}
// ---------------------------------------------------------------------------------------------

template <typename T>
ChunkFn pick_kernel(int64_t* vbytes) {
#ifdef BNMEM_X86_DISPATCH
  if (cpu_use_avx2()) {
    *vbytes = 32;
    return &chunk_avx2<T>;
  }
#endif
  *vbytes = 16;
  return &chunk_baseline<T>;
}

template <typename T>
ChunkNFn pick_kernel_n(int64_t* vbytes) {
#ifdef BNMEM_X86_DISPATCH
  if (cpu_use_avx2()) {
    *vbytes = 32;
    return &chunk_n_avx2<T>;
  }
#endif
  *vbytes = 16;
  return &chunk_n_baseline<T>;
}

// The seed-vectorized route for float/double inputs with N >= the vector width: per output channel o,
// chunks of maxima j = (b, p) give window corners off[j] and the values v[j, :] (seeds padded to Nv).
template <typename T>
void run_n(const at::Tensor& x, const at::Tensor& vals, const at::Tensor& idx, at::IntArrayRef out_size,
           at::IntArrayRef ks, at::IntArrayRef st, at::IntArrayRef dil, int64_t groups, at::Tensor& out,
           ChunkNFn fn, int64_t W) {
  const int64_t N = vals.size(1), Nv = round_up(N, W), B = x.size(0), P = vals.size(3), BP = B * P;
  const int64_t Co = vals.size(0), Cog = Co / groups, Cig = x.size(1) / groups, KH = ks[0], KW = ks[1];
  const int64_t K = Cig * KH * KW, Wo = out_size[1], HoWo = out_size[0] * out_size[1];
  int64_t sx[4], sv[4], si[3];
  for (int d = 0; d < 4; ++d) sx[d] = x.stride(d), sv[d] = vals.stride(d);
  for (int d = 0; d < 3; ++d) si[d] = idx.stride(d);
  std::vector<int64_t> tap(K);
  std::vector<int64_t> posoff(HoWo);   // offset of the window corner of output position oh Wo + ow
  for (int64_t q = 0; q < HoWo; ++q) posoff[q] = (q / Wo) * st[0] * sx[2] + (q % Wo) * st[1] * sx[3];
  for (int64_t i = 0; i < Cig; ++i)
    for (int64_t a = 0; a < KH; ++a)
      for (int64_t c = 0; c < KW; ++c) tap[(i * KH + a) * KW + c] = i * sx[1] + a * dil[0] * sx[2] + c * dil[1] * sx[3];
  const int64_t PB = std::min<int64_t>(BP, std::clamp<int64_t>(16384 / (Nv * int64_t(sizeof(T))), 16, 512));
  const T* xp = x.const_data_ptr<T>();
  const T* vp = vals.const_data_ptr<T>();
  const int64_t* ip = idx.const_data_ptr<int64_t>();
  T* op = out.data_ptr<T>();
  const int64_t so_n = out.stride(0), so_o = out.stride(1);
  // float values with contiguous slots p: the register-transposing pack (where the CPU runs AVX2)
  PackFn pack = nullptr;
  if constexpr (std::is_same_v<T, float>)
    if (sv[3] == 1) pack = pick_pack();
  std::atomic<int64_t> bad{-1};
  at::parallel_for(0, Co, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> acc(K * Nv), vb(PB * Nv, T(0));
    std::vector<int64_t> off(PB);
    for (int64_t o = begin; o < end; ++o) {
      std::fill(acc.begin(), acc.end(), T(0));
      const T* xg = xp + (o / Cog) * Cig * sx[1];
      const T* vo = vp + o * sv[0];
      const int64_t* io = ip + o * si[1];
      int64_t b = 0, p = 0;   // (b, p) of the next maximum, advanced without divisions
      for (int64_t j0 = 0; j0 < BP; j0 += PB) {
        const int64_t pb = std::min(PB, BP - j0), b0 = b, p0 = p;
        for (int64_t jj = 0; jj < pb; ++jj) {
          const int64_t pos = io[b * si[0] + p * si[2]];
          if (pos < 0 || pos >= HoWo) {   // reported after the loop; contributes nothing
            bad.store(pos);
            off[jj] = -1;
          } else {
            off[jj] = b * sx[0] + posoff[pos];
          }
          if (++p == P) p = 0, ++b;
        }
        // the values, by runs of slots p of one sample and seed by seed (a contiguous vals: contiguous reads)
        for (int64_t jj = 0, bb = b0, pp = p0; jj < pb;) {
          const int64_t run = std::min(pb - jj, P - pp);
          if (pack != nullptr) {
            pack(reinterpret_cast<const float*>(vo + bb * sv[2] + pp), sv[1], N, run,
                 reinterpret_cast<float*>(vb.data() + jj * Nv), Nv);
          } else {
            for (int64_t n = 0; n < N; ++n) {
              const T* src = vo + n * sv[1] + bb * sv[2] + pp * sv[3];
              T* dst = vb.data() + jj * Nv + n;
              for (int64_t r = 0; r < run; ++r) dst[r * Nv] = src[r * sv[3]];
            }
          }
          jj += run, pp += run;
          if (pp == P) pp = 0, ++bb;
        }
        for (int64_t jj = 0; jj < pb; ++jj)
          if (off[jj] < 0) off[jj] = 0, std::fill(vb.data() + jj * Nv, vb.data() + jj * Nv + N, T(0));
        fn(xg, off.data(), tap.data(), K, vb.data(), pb, Nv, acc.data());
      }
      for (int64_t n = 0; n < N; ++n) {
        T* dst = op + n * so_n + o * so_o;
        for (int64_t k = 0; k < K; ++k) dst[k] = acc[k * Nv + n];
      }
    }
  });
  const int64_t b = bad.load();
  TORCH_CHECK(b == -1, "bnmem::pooled_conv_weight_grad: idx entries must lie in [0, Ho*Wo) = [0, ", HoWo, "), got ",
              b);
}

template <typename scalar_t, typename T>
void run(const at::Tensor& x, const at::Tensor& vals, const at::Tensor& idx, at::IntArrayRef out_size,
         at::IntArrayRef ks, at::IntArrayRef st, at::IntArrayRef dil, int64_t groups, at::Tensor& out) {
  if constexpr (std::is_same_v<scalar_t, T>) {   // float/double: seeds in vector lanes when they fill one
    int64_t nbytes = 16;
    const ChunkNFn fn_n = pick_kernel_n<T>(&nbytes);
    const int64_t lanes = nbytes / int64_t(sizeof(T));
    if (vals.size(1) >= lanes) return run_n<T>(x, vals, idx, out_size, ks, st, dil, groups, out, fn_n, lanes);
  }
  int64_t vbytes = 16;
  const ChunkFn fn = pick_kernel<T>(&vbytes);
  const int64_t W = vbytes / int64_t(sizeof(T));
  PGeom g;
  g.N = vals.size(1), g.Npad = round_up(g.N, kNB), g.B = x.size(0), g.P = vals.size(3), g.BP = g.B * g.P;
  g.Co = vals.size(0), g.Cog = g.Co / groups, g.Cig = x.size(1) / groups;
  const int64_t KH = ks[0], KW = ks[1];
  g.K = g.Cig * KH * KW, g.Kpad = round_up(g.K, W);
  g.Wo = out_size[1], g.HoWo = out_size[0] * out_size[1], g.sh = st[0], g.sw = st[1];
  for (int d = 0; d < 4; ++d) g.sx[d] = x.stride(d), g.sv[d] = vals.stride(d);
  for (int d = 0; d < 3; ++d) g.si[d] = idx.stride(d);
  g.tap.resize(g.K);
  g.posoff.resize(g.HoWo);
  for (int64_t q = 0; q < g.HoWo; ++q) g.posoff[q] = (q / g.Wo) * g.sh * g.sx[2] + (q % g.Wo) * g.sw * g.sx[3];
  for (int64_t i = 0; i < g.Cig; ++i)
    for (int64_t a = 0; a < KH; ++a)
      for (int64_t c = 0; c < KW; ++c)
        g.tap[(i * KH + a) * KW + c] = i * g.sx[1] + a * dil[0] * g.sx[2] + c * dil[1] * g.sx[3];
  // a chunk's windows ~16 KB (stay in L1 next to the accumulator block being updated)
  g.PB = std::min<int64_t>(g.BP, std::clamp<int64_t>(16384 / (g.Kpad * int64_t(sizeof(T))), 8, 64));

  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* vp = vals.const_data_ptr<scalar_t>();
  const int64_t* ip = idx.const_data_ptr<int64_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  const int64_t so_n = out.stride(0), so_o = out.stride(1);
  std::atomic<int64_t> bad{-1};
  at::parallel_for(0, g.Co, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> acc(g.Npad * g.Kpad), win(g.PB * g.Kpad, T(0)), vb(g.PB * g.Npad, T(0));
    for (int64_t o = begin; o < end; ++o) {
      std::fill(acc.begin(), acc.end(), T(0));
      const scalar_t* xg = xp + (o / g.Cog) * g.Cig * g.sx[1];
      const scalar_t* vo = vp + o * g.sv[0];
      const int64_t* io = ip + o * g.si[1];
      int64_t b = 0, p = 0;   // (b, p) of the next maximum, advanced without divisions
      for (int64_t j0 = 0; j0 < g.BP; j0 += g.PB) {
        const int64_t pb = std::min(g.PB, g.BP - j0);
        for (int64_t jj = 0; jj < pb; ++jj, (++p == g.P ? (p = 0, ++b) : b)) {
          const int64_t pos = io[b * g.si[0] + p * g.si[2]];
          T* w = win.data() + jj * g.Kpad;
          T* v = vb.data() + jj * g.Npad;
          if (pos < 0 || pos >= g.HoWo) {   // reported after the loop; contributes nothing
            bad.store(pos);
            std::fill(v, v + g.N, T(0));
            continue;
          }
          const scalar_t* base = xg + b * g.sx[0] + g.posoff[pos];
          for (int64_t k = 0; k < g.K; ++k) w[k] = static_cast<T>(base[g.tap[k]]);
          const scalar_t* vs = vo + b * g.sv[2] + p * g.sv[3];
          for (int64_t n = 0; n < g.N; ++n) v[n] = static_cast<T>(vs[n * g.sv[1]]);
        }
        fn(win.data(), vb.data(), pb, g.Npad, g.Kpad, acc.data());
      }
      for (int64_t n = 0; n < g.N; ++n) {
        scalar_t* dst = op + n * so_n + o * so_o;
        const T* src = acc.data() + n * g.Kpad;
        for (int64_t k = 0; k < g.K; ++k) dst[k] = static_cast<scalar_t>(src[k]);
      }
    }
  });
  const int64_t b = bad.load();
  TORCH_CHECK(b == -1, "bnmem::pooled_conv_weight_grad: idx entries must lie in [0, Ho*Wo) = [0, ", g.HoWo, "), got ",
              b);
}

at::Tensor pooled_conv_weight_grad_cpu(const at::Tensor& x, const at::Tensor& vals, const at::Tensor& idx,
                                       at::IntArrayRef out_size, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                       at::IntArrayRef dilation, int64_t groups) {
  check_pooled_conv_weight_grad_inputs(x, vals, idx, out_size, kernel_size, stride, dilation, groups);
  const int64_t N = vals.size(1), Co = vals.size(0), Cig = x.size(1) / groups;
  at::Tensor out = at::empty({N, Co, Cig, kernel_size[0], kernel_size[1]}, x.options());
  if (out.numel() == 0) return out;
  if (x.size(0) == 0 || vals.size(3) == 0) return out.zero_();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pooled_conv_weight_grad_cpu", [&] {
    using T = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    run<scalar_t, T>(x, vals, idx, out_size, kernel_size, stride, dilation, groups, out);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(bnmem, CPU, m) { m.impl("pooled_conv_weight_grad", &pooled_conv_weight_grad_cpu); }

}  // namespace bnmem
