// LiRA scoring on CPU (at::parallel_for / OpenMP): logit_confidence and lira_scores.
//
// lira_scores streams over examples n: per (n, a) one pass for the in/out group means, one for the
// centred sums S1 = sum d, S2 = sum d^2 (d = x - group mean), and for center=median one sort of
// each group. Each group then loses one model for target t (t itself if t is in the group, else
// the group's member at drop_position(n, size) in index order, a fixed hash of n: fit sizes n_in - 1 and n_out - 1 whatever t's membership, the
// null-unbiased rule of reference/lira.py): its contribution is subtracted in O(1) (mean/std) or
// read off the sorted list's middle values (median), fused with the Gaussian log-likelihoods and
// the mean over augmentations. Everything is computed in fp64 (fp32 inputs are widened), O(M N A) work
// (plus O(M log M) per (n, a) for the median). Each thread works through its examples in blocks of
// ~8192 (target, example, augmentation) terms (scratch: 3 such buffers per thread, 192 KB): the
// offline one-sided log Phi runs vectorized over a whole block (log_ndtr_block).
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../include/bnmem_common.h"

namespace bnmem {
namespace {

constexpr double kLogSqrt2Pi = 0.91893853320467274178;  // 0.5 log(2 pi)

// log Phi(z), to ~1e-15 relative over the whole line, on a block of values at once (in place):
// with h = Phi(-|z|) = erfc(|z| / sqrt 2) / 2 (full relative precision), log Phi = log h for z <= 0
// and log1p(-h) for z > 0, the latter as Kahan's log1p(x) = x log(u) / (u - 1), u = 1 + x
// (exact where u == 1). erfc and log run as ATen's vectorized CPU kernels (SLEEF, 1-1.5 ulp, runtime
// CPU dispatch) on the whole block; below z = -20 (where Phi underflows soon) a 40-term continued
// fraction of the Mills ratio (converged to ~1e-16 there) replaces log h, as in scipy's log_ndtr.
// NaN stays NaN, +inf gives -0, -inf gives -inf. h and y: scratch of length L.
inline double log_ndtr_tail(double z) {  // z < -3
  const double x = -z;
  double r = x;
  for (int k = 40; k >= 1; --k) r = x + k / r;
  return -0.5 * x * x - kLogSqrt2Pi - std::log(r);
}
// GCC vectorizes the selects (c ? a : b on doubles) of log_ndtr_block only when comparisons may be
// assumed not to trap; this changes no result (trapping math concerns exception flags only). Not
// applied to the main loop: measured slower there.
#if defined(__GNUC__) && !defined(__clang__)
#define BNMEM_SELECTS_VECTORIZE __attribute__((optimize("no-trapping-math")))
#else
#define BNMEM_SELECTS_VECTORIZE
#endif
BNMEM_SELECTS_VECTORIZE void log_ndtr_block(double* z, double* h, double* y, int64_t L) {
  constexpr double kInvSqrt2 = 0.70710678118654752440;
  const auto opt = at::TensorOptions().dtype(at::kDouble);
  at::Tensor ht = at::from_blob(h, {L}, opt), yt = at::from_blob(y, {L}, opt);
  for (int64_t i = 0; i < L; ++i) h[i] = std::fabs(z[i]) * kInvSqrt2;
  at::erfc_out(ht, ht);
  // branch-free (the sign of z is random): every operand computed, then selected
  for (int64_t i = 0; i < L; ++i) {
    const double hi = 0.5 * h[i], u = 1.0 - hi;
    h[i] = hi;
    y[i] = z[i] > 0 ? u : hi;
  }
  at::log_out(yt, yt);
  for (int64_t i = 0; i < L; ++i)  // rare
    if (z[i] < -20.0) y[i] = log_ndtr_tail(z[i]);
  for (int64_t i = 0; i < L; ++i) {
    const double hi = h[i], d = (1.0 - hi) - 1.0;  // u - 1, exact
    const double f = -hi / (d == 0 ? -1.0 : d);    // x / (u - 1), x = -h
    const double yi = y[i], pos = d == 0 ? -hi : yi * f;
    z[i] = z[i] > 0 ? pos : yi;
  }
}

// Median (numpy convention) of the sorted values s[0..L) without one copy of x (x in the list).
inline double loo_median(const double* s, int64_t L, double x) {
  if (L % 2 == 0) {  // L - 1 odd: the middle of the remaining L - 1
    const int64_t h = L / 2 - 1;
    return x <= s[h] ? s[h + 1] : s[h];
  }
  const int64_t h = (L - 1) / 2;  // L - 1 even: mean of the two middle ones
  const double lo = s[h - 1], mid = s[h], hi = s[h + 1];
  if (x <= lo) return 0.5 * (mid + hi);
  if (x >= hi) return 0.5 * (lo + mid);
  return 0.5 * (lo + hi);
}

// The group member (0-based, in model-index order) a group of `size` models loses at example n when
// the target is not in it; the same hash as reference/lira.py drop_position.
inline int64_t drop_position(int64_t n, int64_t size) {
  const uint32_t h = static_cast<uint32_t>(static_cast<uint64_t>(n) * 2654435761ull);
  return static_cast<int64_t>(h >> 16) % size;
}

struct Group {
  int64_t cnt = 0;
  double mean = 0, s1 = 0, s2 = 0, inv_loo = 0;  // 1 / (cnt - 1)
  inline void finish() {
    inv_loo = cnt > 1 ? 1.0 / static_cast<double>(cnt - 1) : 0.0;
  }
  // mean and population variance over the group without the dropped member (d = its value - mean)
  // (multiplications by the precomputed reciprocal: no division per target).
  inline void stats(double d, double& mu, double& var) const {
    const double inv = inv_loo;
    const double m = (s1 - d) * inv;
    mu = mean + m;
    var = (s2 - d * d) * inv - m * m;
    var = var < 0 ? 0.0 : var;
  }
};

// Examples [begin, end) (one thread's share). The variant flags are template parameters, so that
// each variant's per-target loop is compiled without the others' branches; the group sums and the
// target loop select on keep instead of branching on it (keep is random: branches on it would be
// mispredicted half the time).
template <typename scalar_t, bool online, bool median, bool logpdf>
void lira_scores_range(const scalar_t* conf, const bool* keep, const double* gstd, scalar_t* out, int64_t M,
                       int64_t N, int64_t A, int64_t begin, int64_t end) {
  const int64_t need = gstd ? 1 : 2;
  const int64_t need_in = online ? need : 0, need_out = need;
  const double nan = std::numeric_limits<double>::quiet_NaN();
  constexpr bool one_sided = !online && !logpdf;
  // examples per block: the block's M * NB * A per-augmentation values (log Phi arguments when
  // one_sided, evaluated on the whole block at once) fit in ~64 KB per buffer
  const int64_t NB = std::max<int64_t>(1, 8192 / (M * A));
  {
    std::vector<double> x(M * A), sin(M), sout(M), val(NB * M * A), h, y;
    if (one_sided) h.resize(val.size()), y.resize(val.size());
    std::vector<char> k(M);
    std::vector<int64_t> mem_in(M), mem_out(M);
    for (int64_t n0 = begin; n0 < end; n0 += NB) {
      const int64_t n1 = std::min(end, n0 + NB);
      for (int64_t n = n0; n < n1; ++n) {
        // val[((n - n0) * M + t) * A + a]: target t's term of augmentation a (NaN: t cannot be scored)
        double* vn = val.data() + (n - n0) * M * A;
        int64_t n_in = 0, n_o = 0;
        for (int64_t m = 0; m < M; ++m) {
          k[m] = keep[m * N + n];
          (k[m] ? mem_in[n_in++] : mem_out[n_o++]) = m;  // members in index order
          const scalar_t* row = conf + (m * N + n) * A;
          for (int64_t a = 0; a < A; ++a) x[m * A + a] = static_cast<double>(row[a]);
        }
        const int64_t n_out = M - n_in;
        // the model each group loses for targets outside it
        const int64_t pick_in = n_in ? mem_in[drop_position(n, n_in)] : 0;
        const int64_t pick_out = n_out ? mem_out[drop_position(n, n_out)] : 0;
        for (int64_t a = 0; a < A; ++a) {
          Group gi, go;
          gi.cnt = n_in;
          go.cnt = n_out;
          // branch-free sums (adding 0.0 for the other group's models leaves each sum exact)
          for (int64_t m = 0; m < M; ++m) {
            const double v = x[m * A + a];
            gi.mean += k[m] ? v : 0.0;
            go.mean += k[m] ? 0.0 : v;
          }
          if (n_in) gi.mean /= n_in;
          if (n_out) go.mean /= n_out;
          int64_t li = 0, lo = 0;
          for (int64_t m = 0; m < M; ++m) {
            const double v = x[m * A + a];
            const double di = k[m] ? v - gi.mean : 0.0, dout = k[m] ? 0.0 : v - go.mean;
            gi.s1 += di;
            gi.s2 += di * di;
            go.s1 += dout;
            go.s2 += dout * dout;
            if (median) (k[m] ? sin[li++] : sout[lo++]) = v;
          }
          gi.finish();
          go.finish();
          if (median) {
            std::sort(sin.begin(), sin.begin() + li);
            std::sort(sout.begin(), sout.begin() + lo);
          }
          // every target is fitted on n_in - 1 in- and n_out - 1 out-models: valid per example
          const bool ok = (!online || n_in - 1 >= need_in) && n_out - 1 >= need_out;
          const double x_pick_in = x[pick_in * A + a], x_pick_out = x[pick_out * A + a];
          for (int64_t t = 0; t < M; ++t) {
            const bool t_in = k[t];
            const double c = x[t * A + a];
            // the value each group loses: t's own, or the group's picked model's
            const double drop_o = t_in ? x_pick_out : c;
            // variances, not stds: the online log-ratio needs one log and no sqrt
            double mu_o, var_o;
            go.stats(drop_o - go.mean, mu_o, var_o);
            // (the medians read only inside the groups: only where t can be scored)
            if (median && ok) mu_o = loo_median(sout.data(), lo, drop_o);
            if (gstd) var_o = gstd[(1 * M + t) * A + a] * gstd[(1 * M + t) * A + a];
            const double e_o = (c - mu_o) * (c - mu_o);
            double v;
            if (online) {
              const double drop_i = t_in ? c : x_pick_in;
              double mu_i, var_i;
              gi.stats(drop_i - gi.mean, mu_i, var_i);
              if (median && ok) mu_i = loo_median(sin.data(), li, drop_i);
              if (gstd) var_i = gstd[t * A + a] * gstd[t * A + a];
              // log N(c; mu_i, s_i) - log N(c; mu_o, s_o)
              // one division: r = 1 / (var_i var_o)
              const double r = 1.0 / (var_i * var_o);
              v = 0.5 * ((e_o * var_i - (c - mu_i) * (c - mu_i) * var_o) * r - std::log(var_i * var_i * r));
            } else if (logpdf) {
              v = 0.5 * (e_o / var_o + std::log(var_o)) + kLogSqrt2Pi;  // -log N(c; mu_o, s_o)
            } else {  // log Phi of it below, for the whole block
              v = (c - mu_o) / (gstd ? gstd[(1 * M + t) * A + a] : std::sqrt(var_o));
            }
            vn[t * A + a] = ok ? v : nan;
          }
        }
      }
      const int64_t nb = n1 - n0;
      if (one_sided) log_ndtr_block(val.data(), h.data(), y.data(), nb * M * A);
      for (int64_t n = n0; n < n1; ++n) {
        const double* vn = val.data() + (n - n0) * M * A;
        for (int64_t t = 0; t < M; ++t) {
          double acc = 0;
          for (int64_t a = 0; a < A; ++a) acc += vn[t * A + a];
          out[t * N + n] = static_cast<scalar_t>(acc / static_cast<double>(A));
        }
      }
    }
  }
}

template <typename scalar_t, bool online, bool median, bool logpdf>
void lira_scores_kernel(const scalar_t* conf, const bool* keep, const double* gstd, scalar_t* out,
                        int64_t M, int64_t N, int64_t A) {
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    lira_scores_range<scalar_t, online, median, logpdf>(conf, keep, gstd, out, M, N, A, begin, end);
  });
}

at::Tensor lira_scores_cpu(const at::Tensor& conf_in, const at::Tensor& keep_in,
                           const std::optional<at::Tensor>& global_std, bool online, bool median, bool logpdf) {
  check_lira_inputs(conf_in, keep_in, global_std);
  const at::Tensor conf = conf_in.contiguous();
  const at::Tensor keep = keep_in.contiguous();
  const int64_t M = conf.size(0), N = conf.size(1), A = conf.size(2);
  at::Tensor gstd;
  if (global_std.has_value()) {
    gstd = global_std->to(at::kDouble).contiguous();
  }
  at::Tensor out = at::empty({M, N}, conf.options());
  AT_DISPATCH_FLOATING_TYPES(conf.scalar_type(), "lira_scores_cpu", [&] {
    const scalar_t* c = conf.const_data_ptr<scalar_t>();
    const bool* k = keep.const_data_ptr<bool>();
    const double* g = gstd.defined() ? gstd.const_data_ptr<double>() : nullptr;
    scalar_t* o = out.data_ptr<scalar_t>();
    if (online) {
      (median ? lira_scores_kernel<scalar_t, true, true, false> : lira_scores_kernel<scalar_t, true, false, false>)(
          c, k, g, o, M, N, A);
    } else if (logpdf) {
      (median ? lira_scores_kernel<scalar_t, false, true, true> : lira_scores_kernel<scalar_t, false, false, true>)(
          c, k, g, o, M, N, A);
    } else {
      (median ? lira_scores_kernel<scalar_t, false, true, false> : lira_scores_kernel<scalar_t, false, false, false>)(
          c, k, g, o, M, N, A);
    }
  });
  return out;
}

// Global stds for variance="global": out[g, t, a] (g = 0 in, 1 out) = population std of the group's
// values of augmentation a over all examples and all models but t. Two passes over conf per model
// (sums, then squares centred on the grand mean), all in fp64; t's own share subtracted at the end.
template <typename scalar_t>
void lira_global_std_kernel(const scalar_t* conf, const bool* keep, double* out, int64_t M, int64_t N, int64_t A) {
  std::vector<double> cnt(2 * M, 0.0), sum(2 * M * A, 0.0), sq(2 * M * A, 0.0);
  at::parallel_for(0, M, 1, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m)
      for (int64_t n = 0; n < N; ++n) {
        const int64_t g = keep[m * N + n] ? 0 : 1;
        cnt[g * M + m] += 1;
        const scalar_t* row = conf + (m * N + n) * A;
        for (int64_t a = 0; a < A; ++a) sum[(g * M + m) * A + a] += static_cast<double>(row[a]);
      }
  });
  std::vector<double> total(2, 0.0), center(2 * A, 0.0);
  for (int64_t g = 0; g < 2; ++g) {
    for (int64_t m = 0; m < M; ++m) total[g] += cnt[g * M + m];
    for (int64_t a = 0; a < A; ++a) {
      for (int64_t m = 0; m < M; ++m) center[g * A + a] += sum[(g * M + m) * A + a];
      center[g * A + a] /= (total[g] > 0 ? total[g] : 1.0);
    }
  }
  at::parallel_for(0, M, 1, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m)
      for (int64_t n = 0; n < N; ++n) {
        const int64_t g = keep[m * N + n] ? 0 : 1;
        const scalar_t* row = conf + (m * N + n) * A;
        for (int64_t a = 0; a < A; ++a) {
          const double d = static_cast<double>(row[a]) - center[g * A + a];
          sq[(g * M + m) * A + a] += d * d;
        }
      }
  });
  const double nan = std::numeric_limits<double>::quiet_NaN();
  for (int64_t g = 0; g < 2; ++g)
    for (int64_t a = 0; a < A; ++a) {
      double s_all = 0, q_all = 0;
      for (int64_t m = 0; m < M; ++m) {
        s_all += sum[(g * M + m) * A + a] - cnt[g * M + m] * center[g * A + a];
        q_all += sq[(g * M + m) * A + a];
      }
      for (int64_t t = 0; t < M; ++t) {
        const double n_t = total[g] - cnt[g * M + t];
        const double s_t = s_all - (sum[(g * M + t) * A + a] - cnt[g * M + t] * center[g * A + a]);
        const double q_t = q_all - sq[(g * M + t) * A + a];
        const double mean = s_t / n_t;
        const double var = q_t / n_t - mean * mean;
        out[(g * M + t) * A + a] = n_t >= 2 ? std::sqrt(var > 0 ? var : 0.0) : nan;
      }
    }
}

at::Tensor lira_global_std_cpu(const at::Tensor& conf_in, const at::Tensor& keep_in) {
  check_lira_inputs(conf_in, keep_in, std::nullopt, "bnmem::lira_global_std");
  const at::Tensor conf = conf_in.contiguous();
  const at::Tensor keep = keep_in.contiguous();
  const int64_t M = conf.size(0), N = conf.size(1), A = conf.size(2);
  at::Tensor out = at::empty({2, M, A}, conf.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(conf.scalar_type(), "lira_global_std_cpu", [&] {
    lira_global_std_kernel<scalar_t>(conf.const_data_ptr<scalar_t>(), keep.const_data_ptr<bool>(),
                                     out.data_ptr<double>(), M, N, A);
  });
  return out;
}

// c = z_y - logsumexp_{k != y} z_k: one pass with a running max and a rescaled sum.
template <typename scalar_t>
void logit_confidence_kernel(const scalar_t* z, const int64_t* y, void* out_v, int64_t R, int64_t K) {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t* out = static_cast<acc_t*>(out_v);
  at::parallel_for(0, R, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* row = z + r * K;
      const int64_t label = y[r];
      acc_t mx = -std::numeric_limits<acc_t>::infinity(), s = 0;
      for (int64_t k = 0; k < K; ++k) {
        if (k == label) continue;
        const acc_t v = static_cast<acc_t>(row[k]);
        if (v == -std::numeric_limits<acc_t>::infinity()) continue;  // contributes exp(-inf) = 0
        if (v > mx) {
          s = s * std::exp(mx - v) + acc_t(1);
          mx = v;
        } else {
          s += std::exp(v - mx);
        }
      }
      out[r] = static_cast<acc_t>(row[label]) - (mx + std::log(s));
    }
  });
}

at::Tensor logit_confidence_cpu(const at::Tensor& logits_in, const at::Tensor& labels_in) {
  TORCH_CHECK(logits_in.dim() == 2, "bnmem::logit_confidence: logits must be [R, K], got ", logits_in.sizes());
  TORCH_CHECK(labels_in.dim() == 1 && labels_in.size(0) == logits_in.size(0),
              "bnmem::logit_confidence: labels must be [R], got ", labels_in.sizes());
  TORCH_CHECK(labels_in.scalar_type() == at::kLong, "bnmem::logit_confidence: labels must be int64");
  TORCH_CHECK(logits_in.size(1) >= 2, "bnmem::logit_confidence: K >= 2 needed");
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor labels = labels_in.contiguous();
  const int64_t R = logits.size(0), K = logits.size(1);
  at::Tensor out = at::empty({R}, logits.options().dtype(norm_out_dtype(logits.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "logit_confidence_cpu", [&] {
    logit_confidence_kernel<scalar_t>(logits.const_data_ptr<scalar_t>(), labels.const_data_ptr<int64_t>(),
                                      out.data_ptr(), R, K);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(bnmem, CPU, m) {
  m.impl("lira_scores", &lira_scores_cpu);
  m.impl("logit_confidence", &logit_confidence_cpu);
  m.impl("lira_global_std", &lira_global_std_cpu);
}

}  // namespace bnmem
