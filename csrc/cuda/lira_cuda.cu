// LiRA scoring on CUDA: logit_confidence and lira_scores (docs/math.md, "LiRA and RMIA").
//
// logit_confidence: one warp per row; each lane keeps a running max and a rescaled sum of
// exponentials over its strided share of K (skipping the label), then the lanes merge their
// (max, sum) pairs by shuffles. One read of the logits; fp32 accumulation (fp64 for fp64).
//
// lira_scores: a block owns E consecutive examples and all M models; its E * A (example,
// augmentation) columns are contiguous in every model row of conf, staged 32 columns at a time in
// shared memory (coalesced reads). Per column: in/out group means and centred sums S1, S2 over the
// models (fp64), for center=median the middle order statistics of each group from a bitonic sort of
// the column's (group, value) keys in shared memory (O(M log^2 M) comparisons over all threads,
// depth O(log^2 M); the chunk is then staged again from global memory, median only); then every
// thread scores its targets t. Each group loses one model per target before the fit (t itself
// where t is in the group, else the group's picked member (drop_position): fit sizes n_in - 1, n_out - 1
// whatever t's membership, the null-unbiased rule of reference/lira.py; the picked member is the
// one at drop_position(n, size) in index order, a fixed hash of n); its value is subtracted
// from the sums, Gaussian log-likelihoods in the input precision, and the columns are folded into
// per-example sums in column order (deterministic). Each conf value is read once (twice for the
// median), each score written once.
#include "cuda_utils.cuh"
#include "../include/bnmem_common.h"

#include <algorithm>
#include <cmath>
#include <optional>

namespace bnmem {
namespace {

constexpr int kLanes = 32;  // columns (example, augmentation) per chunk
constexpr int kRows = 8;    // threads over models per column
constexpr double kLogSqrt2PiD = 0.91893853320467274178;

template <typename T>
__device__ __forceinline__ T log_ndtr_tail(T z) {  // z < -10: continued fraction of the Mills ratio
  const T x = -z;
  T r = x;
  for (int k = 40; k >= 1; --k) r = x + T(k) / r;
  return T(-0.5) * x * x - T(kLogSqrt2PiD) - log(r);
}

// log Phi(z) as scipy's log_ndtr: erfc down to where it would underflow (z = -20 in fp64, -10 in
// fp32), the continued fraction below, log1p(-Phi(-z)) above z = 3.
template <typename T>
__device__ __forceinline__ T log_ndtr(T z) {
  constexpr T kLow = sizeof(T) == 8 ? T(-20) : T(-10);
  if (z > T(3)) return log1p(T(-0.5) * erfc(z * T(0.70710678118654752440)));
  if (z < kLow) return log_ndtr_tail(z);
  return log(T(0.5) * erfc(-z * T(0.70710678118654752440)));
}

template <typename T>
__device__ __forceinline__ T norm_logpdf(T c, T mu, T s) {
  const T z = (c - mu) / s;
  return T(-0.5) * z * z - log(s) - T(kLogSqrt2PiD);
}

struct GroupStat {
  double cnt, mean, s1, s2, lo, mid, hi;  // lo/mid/hi: sorted[p-1], sorted[p], sorted[p+1], p = (cnt-1)/2
  double last;                            // the value of the group's picked model (lost for targets outside it)
};

// Mean (or numpy median) and population std of the group without one member of value x.
__device__ __forceinline__ void group_center(const GroupStat& g, double x, bool median, double& mu, double& sd) {
  const double n = g.cnt - 1.0;
  const double d = x - g.mean;
  const double m = (g.s1 - d) / n;
  mu = g.mean + m;
  const double var = (g.s2 - d * d) / n - m * m;
  sd = sqrt(var > 0 ? var : 0.0);
  if (median) {
    const bool even = (static_cast<long long>(g.cnt) % 2) == 0;
    if (even) {
      mu = x <= g.mid ? g.hi : g.mid;
    } else {
      mu = x <= g.lo ? 0.5 * (g.mid + g.hi) : (x >= g.hi ? 0.5 * (g.lo + g.mid) : 0.5 * (g.lo + g.hi));
    }
  }
}

// (flag, value) lexicographic order: in-group (flag 0) first, then out-group, ascending values.
template <typename scalar_t>
__device__ __forceinline__ bool key_greater(unsigned char fa, scalar_t va, unsigned char fb, scalar_t vb) {
  return fa > fb || (fa == fb && va > vb);
}

// Sorts every column of tile [M][kLanes] (with its flags) ascending by (flag, value), all threads
// together: a bitonic network written with ascending comparators only (a flip step, then
// half-cleaners), so that comparators whose upper index is >= M can be skipped (virtual +inf
// padding up to the next power of two stays in place). O(M log^2 M) comparisons per column.
template <typename scalar_t>
__device__ void sort_columns(scalar_t* tile, unsigned char* flg, int64_t M, int tid, int nthreads) {
  int64_t P = 1;
  while (P < M) P <<= 1;
  for (int64_t k = 2; k <= P; k <<= 1) {
    for (int64_t j = k >> 1; j >= 1; j >>= 1) {
      const bool flip = j == (k >> 1);
      for (int64_t q = tid; q < (P >> 1) * kLanes; q += nthreads) {
        const int64_t col = q % kLanes, pq = q / kLanes;
        const int64_t i = (pq / j) * 2 * j + pq % j;  // bit j of i is 0
        const int64_t r = flip ? (i ^ (k - 1)) : (i + j);
        if (r >= M) continue;
        const int64_t ia = i * kLanes + col, ib = r * kLanes + col;
        const scalar_t va = tile[ia], vb = tile[ib];
        const unsigned char fa = flg[ia], fb = flg[ib];
        if (key_greater(fa, va, fb, vb)) {
          tile[ia] = vb;
          tile[ib] = va;
          flg[ia] = fb;
          flg[ib] = fa;
        }
      }
      __syncthreads();
    }
  }
}

// Columns are (example, augmentation) pairs: conf viewed as [M, N * A] is contiguous per model, so a
// warp reads 32 consecutive columns of one model row (coalesced for every A). A block owns E whole
// examples (E * A columns, walked in chunks of 32) and all M models.
template <typename scalar_t>
__global__ void __launch_bounds__(kLanes * kRows)
lira_scores_kernel(const scalar_t* __restrict__ conf, const bool* __restrict__ keep,
                   const scalar_t* __restrict__ gstd, scalar_t* __restrict__ out, int64_t M, int64_t N,
                   int64_t A, int64_t E, bool online, bool median, bool logpdf, int need_in, int need_out) {
  using acc_t = typename AccOf<scalar_t>::type;
  extern __shared__ unsigned char smem_raw[];
  scalar_t* tile = reinterpret_cast<scalar_t*>(smem_raw);            // [M][kLanes]: x, then v
  scalar_t* acc = tile + M * kLanes;                                  // [M][E]: sum over a of v
  int* last_idx = reinterpret_cast<int*>(acc + M * E);                // [2][E]: picked in/out model
  unsigned char* kp = reinterpret_cast<unsigned char*>(last_idx + 2 * E);  // [M][E]: keep
  unsigned char* flg = kp + M * E;                                    // [M][kLanes]: sort flags (median)
  __shared__ double red[4][kRows][kLanes];
  __shared__ GroupStat stat[2][kLanes];  // 0: in, 1: out, per column

  const int lane = threadIdx.x, row = threadIdx.y;
  const int tid = row * kLanes + lane, nthreads = kLanes * kRows;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * E;
  for (int64_t i = tid; i < M * E; i += nthreads) {
    const int64_t m = i / E, n = n0 + i % E;
    kp[i] = n < N ? static_cast<unsigned char>(keep[m * N + n]) : 0;
    acc[i] = scalar_t(0);
  }
  for (int64_t e = tid; e < E; e += nthreads) {
    // the member at drop_position(n, size) of each group (same hash as reference/lira.py)
    const int64_t n = n0 + e;
    int64_t cnt_in = 0;
    for (int64_t m = 0; m < M && n < N; ++m) cnt_in += keep[m * N + n] ? 1 : 0;
    const uint32_t h = static_cast<uint32_t>(static_cast<uint64_t>(n) * 2654435761ull) >> 16;
    const int64_t want_in = cnt_in ? h % cnt_in : -1, want_out = (M - cnt_in) ? h % (M - cnt_in) : -1;
    int li = 0, lo = 0;
    int64_t ri = 0, ro = 0;
    for (int64_t m = 0; m < M && n < N; ++m) {
      if (keep[m * N + n]) {
        if (ri++ == want_in) li = static_cast<int>(m);
      } else {
        if (ro++ == want_out) lo = static_cast<int>(m);
      }
    }
    last_idx[e] = li;
    last_idx[E + e] = lo;
  }
  __syncthreads();

  const int64_t cols = E * A;
  for (int64_t c0 = 0; c0 < cols; c0 += kLanes) {
    const int64_t j = c0 + lane, e = j / A;
    const bool live = j < cols && n0 + e < N;
    const int64_t ee = live ? e : 0;
    // stage the column chunk; group sums
    double p_in = 0, p_out = 0, c_in = 0;
    for (int64_t m = row; m < M; m += kRows) {
      const scalar_t v = live ? conf[(m * N + n0) * A + j] : scalar_t(0);
      tile[m * kLanes + lane] = v;
      if (kp[m * E + ee]) {
        p_in += static_cast<double>(v);
        c_in += 1;
      } else {
        p_out += static_cast<double>(v);
      }
    }
    red[0][row][lane] = p_in;
    red[1][row][lane] = p_out;
    red[2][row][lane] = c_in;
    __syncthreads();
    double mean_in = 0, mean_out = 0, n_in = 0;
    for (int r = 0; r < kRows; ++r) {
      mean_in += red[0][r][lane];
      mean_out += red[1][r][lane];
      n_in += red[2][r][lane];
    }
    const double n_out = static_cast<double>(M) - n_in;
    mean_in /= (n_in > 0 ? n_in : 1.0);
    mean_out /= (n_out > 0 ? n_out : 1.0);
    __syncthreads();
    double s1i = 0, s2i = 0, s1o = 0, s2o = 0;
    for (int64_t m = row; m < M; m += kRows) {
      const double v = static_cast<double>(tile[m * kLanes + lane]);
      if (kp[m * E + ee]) {
        const double d = v - mean_in;
        s1i += d;
        s2i += d * d;
      } else {
        const double d = v - mean_out;
        s1o += d;
        s2o += d * d;
      }
    }
    red[0][row][lane] = s1i;
    red[1][row][lane] = s2i;
    red[2][row][lane] = s1o;
    red[3][row][lane] = s2o;
    __syncthreads();
    if (row < 2) {
      GroupStat g;
      g.cnt = row == 0 ? n_in : n_out;
      g.mean = row == 0 ? mean_in : mean_out;
      g.s1 = g.s2 = 0;
      for (int r = 0; r < kRows; ++r) {
        g.s1 += red[2 * row][r][lane];
        g.s2 += red[2 * row + 1][r][lane];
      }
      g.lo = g.mid = g.hi = 0;
      g.last = static_cast<double>(tile[static_cast<int64_t>(last_idx[row * E + ee]) * kLanes + lane]);
      stat[row][lane] = g;
    }
    __syncthreads();
    if (median) {
      // sort each column by (group, value); the group's middle order statistics are then read at
      // known positions (in-group first: [0, n_in), out-group: [n_in, M)); the chunk is staged again
      for (int64_t m = row; m < M; m += kRows) flg[m * kLanes + lane] = kp[m * E + ee] ? 0 : 1;
      __syncthreads();
      sort_columns<scalar_t>(tile, flg, M, tid, nthreads);
      if (row < 2) {
        GroupStat& g = stat[row][lane];
        const int64_t cnt = static_cast<int64_t>(g.cnt), base = row == 0 ? 0 : static_cast<int64_t>(n_in);
        const int64_t p = (cnt - 1) / 2;
        auto at = [&](int64_t i) {
          return i >= 0 && i < cnt ? static_cast<double>(tile[(base + i) * kLanes + lane]) : 0.0;
        };
        g.lo = at(p - 1);
        g.mid = at(p);
        g.hi = at(p + 1);
      }
      __syncthreads();
      for (int64_t m = row; m < M; m += kRows)
        tile[m * kLanes + lane] = live ? conf[(m * N + n0) * A + j] : scalar_t(0);
      __syncthreads();
    }
    const GroupStat gi = stat[0][lane], go = stat[1][lane];
    const int64_t a = live ? j % A : 0;
    for (int64_t t = row; t < M; t += kRows) {
      // each thread reads and then overwrites only its own cell [t][lane]: x -> v
      const bool t_in = kp[t * E + ee];
      const double x = static_cast<double>(tile[t * kLanes + lane]);
      // the value each group loses: t's own where t is in it, else its picked model's
      double mu_o, sd_o;
      group_center(go, t_in ? go.last : x, median, mu_o, sd_o);
      if (gstd) sd_o = static_cast<double>(gstd[(M + t) * A + a]);
      const acc_t c = static_cast<acc_t>(x);
      acc_t v;
      if (online) {
        double mu_i, sd_i;
        group_center(gi, t_in ? x : gi.last, median, mu_i, sd_i);
        if (gstd) sd_i = static_cast<double>(gstd[t * A + a]);
        v = norm_logpdf<acc_t>(c, mu_i, sd_i) - norm_logpdf<acc_t>(c, mu_o, sd_o);
      } else if (logpdf) {
        v = -norm_logpdf<acc_t>(c, mu_o, sd_o);
      } else {
        v = log_ndtr<acc_t>((c - static_cast<acc_t>(mu_o)) / static_cast<acc_t>(sd_o));
      }
      tile[t * kLanes + lane] = live ? static_cast<scalar_t>(v) : scalar_t(0);
    }
    __syncthreads();
    // fold this chunk's columns into their examples, in column order (deterministic)
    const int64_t e_first = c0 / A, e_last = (c0 + kLanes - 1 < cols ? c0 + kLanes - 1 : cols - 1) / A;
    const int64_t span = e_last - e_first + 1;
    for (int64_t i = tid; i < M * span; i += nthreads) {
      const int64_t t = i / span, e2 = e_first + i % span;
      const int64_t j0 = e2 * A > c0 ? e2 * A : c0;
      const int64_t j1 = (e2 + 1) * A < c0 + kLanes ? (e2 + 1) * A : c0 + kLanes;
      acc_t sum = 0;
      for (int64_t jj = j0; jj < j1; ++jj) sum += static_cast<acc_t>(tile[t * kLanes + (jj - c0)]);
      acc[t * E + e2] += static_cast<scalar_t>(sum);
    }
    __syncthreads();
  }
  // scores: NaN where the target leaves too few in/out models
  for (int64_t i = tid; i < M * E; i += nthreads) {
    const int64_t t = i / E, e = i % E, n = n0 + e;
    if (n >= N) continue;
    int64_t cnt_in = 0;
    for (int64_t m = 0; m < M; ++m) cnt_in += kp[m * E + e];
    // every target is fitted on cnt_in - 1 in- and (M - cnt_in) - 1 out-models
    const bool ok = (!online || cnt_in - 1 >= need_in) && (M - cnt_in) - 1 >= need_out;
    out[t * N + n] = ok ? acc[i] / static_cast<scalar_t>(A) : static_cast<scalar_t>(NAN);
  }
}

template <typename scalar_t>
void launch_lira(const at::Tensor& conf, const at::Tensor& keep, const at::Tensor& gstd, at::Tensor& out,
                 bool online, bool median, bool logpdf) {
  const int64_t M = conf.size(0), N = conf.size(1), A = conf.size(2);
  const int need = gstd.defined() ? 1 : 2;
  // examples per block: about 64 columns (32 in fp64) so the score writes come in runs
  int dev = 0, max_smem = 0;
  BNMEM_CUDA_CHECK(cudaGetDevice(&dev));
  BNMEM_CUDA_CHECK(cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  auto kernel = lira_scores_kernel<scalar_t>;
  // the kernel's static shared memory (red, stat) counts against the same per-block limit
  cudaFuncAttributes attr;
  BNMEM_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
  const size_t static_smem = attr.sharedSizeBytes;
  auto smem_for = [&](int64_t e) {  // tile, acc, last_idx, kp, flg
    return static_cast<size_t>(M) * (kLanes * sizeof(scalar_t) + e * (sizeof(scalar_t) + 1) + kLanes) +
           2 * e * sizeof(int);
  };
  int64_t E = std::max<int64_t>(1, (sizeof(scalar_t) == 8 ? 32 : 64) / A);
  while (E > 1 && smem_for(E) + static_smem > static_cast<size_t>(max_smem)) E /= 2;  // large M
  const size_t smem = smem_for(E);
  TORCH_CHECK(smem + static_smem <= static_cast<size_t>(max_smem), "bnmem::lira_scores (cuda): M = ", M,
              " models need ", smem + static_smem, " bytes of shared memory per block, the device has ",
              max_smem, "; use backend='triton' or 'reference'");
  // without the opt-in attribute a block may use 48 KB in all (static + dynamic)
  if (smem + static_smem > 48 * 1024)
    BNMEM_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  const dim3 block(kLanes, kRows);
  const dim3 grid(static_cast<unsigned>((N + E - 1) / E));
  kernel<<<grid, block, smem, current_stream(conf)>>>(
      conf.const_data_ptr<scalar_t>(), keep.const_data_ptr<bool>(),
      gstd.defined() ? gstd.const_data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>(), M, N, A, E, online,
      median, logpdf, online ? need : 0, need);
}

at::Tensor lira_scores_cuda(const at::Tensor& conf_in, const at::Tensor& keep_in,
                            const std::optional<at::Tensor>& global_std, bool online, bool median, bool logpdf) {
  check_lira_inputs(conf_in, keep_in, global_std);
  DeviceScope scope(conf_in);
  const at::Tensor conf = conf_in.contiguous();
  const at::Tensor keep = keep_in.contiguous();
  const int64_t M = conf.size(0), N = conf.size(1), A = conf.size(2);
  at::Tensor gstd;
  if (global_std.has_value()) {
    gstd = global_std->to(conf.scalar_type()).contiguous();
  }
  at::Tensor out = at::empty({M, N}, conf.options());
  if (N == 0 || M == 0) return out;
  if (conf.scalar_type() == at::kDouble) {
    launch_lira<double>(conf, keep, gstd, out, online, median, logpdf);
  } else {
    launch_lira<float>(conf, keep, gstd, out, online, median, logpdf);
  }
  BNMEM_CUDA_CHECK(cudaGetLastError());
  return out;
}

// ---------------------------------------------------------------------------- logit_confidence
template <typename acc_t>
__device__ __forceinline__ void merge(acc_t& m, acc_t& s, acc_t m2, acc_t s2) {
  const acc_t mx = m > m2 ? m : m2;
  if (mx == -INFINITY) return;  // both empty
  s = s * exp(m - mx) + s2 * exp(m2 - mx);
  m = mx;
}

template <typename scalar_t, typename acc_t>
__global__ void logit_confidence_kernel(const scalar_t* __restrict__ z, const int64_t* __restrict__ y,
                                        acc_t* __restrict__ out, int64_t R, int64_t K) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (r >= R) return;  // whole warps exit together
  const scalar_t* row = z + r * K;
  const int64_t label = y[r];
  acc_t m = -INFINITY, s = 0;
  for (int64_t k = lane; k < K; k += 32) {
    if (k == label) continue;
    const acc_t v = static_cast<acc_t>(row[k]);
    if (v == -INFINITY) continue;
    if (v > m) {
      s = s * exp(m - v) + acc_t(1);
      m = v;
    } else {
      s += exp(v - m);
    }
  }
  for (int off = 16; off > 0; off >>= 1) {
    const acc_t m2 = __shfl_xor_sync(0xffffffffu, m, off);
    const acc_t s2 = __shfl_xor_sync(0xffffffffu, s, off);
    merge(m, s, m2, s2);
  }
  if (lane == 0) out[r] = static_cast<acc_t>(row[label]) - (m + log(s));
}

at::Tensor logit_confidence_cuda(const at::Tensor& logits_in, const at::Tensor& labels_in) {
  TORCH_CHECK(logits_in.dim() == 2, "bnmem::logit_confidence: logits must be [R, K], got ", logits_in.sizes());
  TORCH_CHECK(labels_in.dim() == 1 && labels_in.size(0) == logits_in.size(0),
              "bnmem::logit_confidence: labels must be [R], got ", labels_in.sizes());
  TORCH_CHECK(labels_in.scalar_type() == at::kLong, "bnmem::logit_confidence: labels must be int64");
  TORCH_CHECK(logits_in.size(1) >= 2, "bnmem::logit_confidence: K >= 2 needed");
  DeviceScope scope(logits_in);
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor labels = labels_in.contiguous();
  const int64_t R = logits.size(0), K = logits.size(1);
  at::Tensor out = at::empty({R}, logits.options().dtype(norm_out_dtype(logits.scalar_type())));
  if (R == 0) return out;
  constexpr int kWarps = 8;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "logit_confidence_cuda", [&] {
    using acc_t = typename AccOf<scalar_t>::type;
    logit_confidence_kernel<scalar_t, acc_t><<<static_cast<unsigned>((R + kWarps - 1) / kWarps), 32 * kWarps, 0,
                                               current_stream(logits)>>>(
        logits.const_data_ptr<scalar_t>(), labels.const_data_ptr<int64_t>(), out.data_ptr<acc_t>(), R, K);
  });
  BNMEM_CUDA_CHECK(cudaGetLastError());
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(bnmem, CUDA, m) {
  m.impl("lira_scores", &lira_scores_cuda);
  m.impl("logit_confidence", &logit_confidence_cuda);
}

}  // namespace bnmem
