// ghost_norm_linear on CPU: out[i] = ||G_i^T A_i||_F^2, samples in parallel (at::parallel_for, OpenMP).
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <vector>

#include "../include/bnmem_common.h"

namespace bnmem {
namespace {

template <typename scalar_t, typename acc_t>
inline acc_t dot(const scalar_t* x, const scalar_t* y, int64_t n) {
  acc_t s = 0;
  for (int64_t k = 0; k < n; ++k) s += static_cast<acc_t>(x[k]) * static_cast<acc_t>(y[k]);
  return s;
}

// <G G^T, A A^T> = sum_t |g_t|^2 |a_t|^2 + 2 sum_{t < t'} <g_t, g_t'> <a_t, a_t'>
template <typename scalar_t, typename acc_t>
acc_t gram_one(const scalar_t* a, const scalar_t* g, int64_t T, int64_t din, int64_t dout) {
  acc_t s = 0;
  for (int64_t t = 0; t < T; ++t) {
    const scalar_t* at = a + t * din;
    const scalar_t* gt = g + t * dout;
    s += dot<scalar_t, acc_t>(gt, gt, dout) * dot<scalar_t, acc_t>(at, at, din);
    acc_t off = 0;
    for (int64_t u = t + 1; u < T; ++u)
      off += dot<scalar_t, acc_t>(gt, g + u * dout, dout) * dot<scalar_t, acc_t>(at, a + u * din, din);
    s += 2 * off;
  }
  return s;
}

// sum of squares of W = sum_t g_t a_t^T ([dout, din]) accumulated in `w`.
template <typename scalar_t, typename acc_t>
acc_t materialize_one(const scalar_t* a, const scalar_t* g, int64_t T, int64_t din, int64_t dout,
                      std::vector<acc_t>& w) {
  std::fill(w.begin(), w.end(), acc_t(0));
  for (int64_t t = 0; t < T; ++t) {
    const scalar_t* at = a + t * din;
    const scalar_t* gt = g + t * dout;
    for (int64_t o = 0; o < dout; ++o) {
      const acc_t go = static_cast<acc_t>(gt[o]);
      acc_t* row = w.data() + o * din;
      for (int64_t k = 0; k < din; ++k) row[k] += go * static_cast<acc_t>(at[k]);
    }
  }
  acc_t s = 0;
  for (acc_t v : w) s += v * v;
  return s;
}

at::Tensor ghost_norm_linear_cpu(const at::Tensor& a_in, const at::Tensor& g_in, int64_t route) {
  check_ghost_linear_inputs(a_in, g_in);
  const at::Tensor a = a_in.contiguous();
  const at::Tensor g = g_in.contiguous();
  const int64_t B = a.size(0), T = a.size(1), din = a.size(2), dout = g.size(2);
  const bool gram = ghost_use_gram(route, T, din, dout);
  at::Tensor out = at::empty({B}, a.options().dtype(norm_out_dtype(a.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "ghost_norm_linear_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using out_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* ap = a.const_data_ptr<scalar_t>();
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    out_t* op = out.data_ptr<out_t>();
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> w(gram ? 0 : static_cast<size_t>(din * dout));
      for (int64_t i = begin; i < end; ++i) {
        const scalar_t* ai = ap + i * T * din;
        const scalar_t* gi = gp + i * T * dout;
        op[i] = static_cast<out_t>(gram ? gram_one<scalar_t, acc_t>(ai, gi, T, din, dout)
                                        : materialize_one<scalar_t, acc_t>(ai, gi, T, din, dout, w));
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(bnmem, CPU, m) { m.impl("ghost_norm_linear", &ghost_norm_linear_cpu); }

}  // namespace bnmem
