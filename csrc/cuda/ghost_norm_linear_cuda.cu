// ghost_norm_linear on CUDA: one block per sample, block reduction, no atomics.
// Gram route: threads stride over (t, t') pairs with t <= t'; materialize route: threads stride
// over the d_out x d_in entries of G_i^T A_i, each summing over t.
#include "cuda_utils.cuh"
#include "../include/bnmem_common.h"

namespace bnmem {
namespace {

constexpr int kThreads = 256;

template <typename scalar_t, typename acc_t>
__global__ void ghost_norm_linear_kernel(const scalar_t* __restrict__ a, const scalar_t* __restrict__ g,
                                         acc_t* __restrict__ out, int64_t T, int64_t din, int64_t dout,
                                         bool gram) {
  __shared__ acc_t shared[kThreads];
  const int64_t i = blockIdx.x;
  const scalar_t* ai = a + i * T * din;
  const scalar_t* gi = g + i * T * dout;
  acc_t s = 0;
  if (gram) {
    const int64_t pairs = T * T;
    for (int64_t p = threadIdx.x; p < pairs; p += blockDim.x) {
      const int64_t t = p / T, u = p % T;
      if (u < t) continue;
      acc_t gg = 0, aa = 0;
      for (int64_t k = 0; k < dout; ++k) gg += static_cast<acc_t>(gi[t * dout + k]) * static_cast<acc_t>(gi[u * dout + k]);
      for (int64_t k = 0; k < din; ++k) aa += static_cast<acc_t>(ai[t * din + k]) * static_cast<acc_t>(ai[u * din + k]);
      s += (u == t ? acc_t(1) : acc_t(2)) * gg * aa;
    }
  } else {
    const int64_t entries = din * dout;
    for (int64_t e = threadIdx.x; e < entries; e += blockDim.x) {
      const int64_t o = e / din, k = e % din;
      acc_t w = 0;
      for (int64_t t = 0; t < T; ++t) w += static_cast<acc_t>(gi[t * dout + o]) * static_cast<acc_t>(ai[t * din + k]);
      s += w * w;
    }
  }
  s = block_sum(s, shared);
  if (threadIdx.x == 0) out[i] = s;
}

at::Tensor ghost_norm_linear_cuda(const at::Tensor& a_in, const at::Tensor& g_in, int64_t route) {
  check_ghost_linear_inputs(a_in, g_in);
  DeviceScope scope(a_in);
  const at::Tensor a = a_in.contiguous();
  const at::Tensor g = g_in.contiguous();
  const int64_t B = a.size(0), T = a.size(1), din = a.size(2), dout = g.size(2);
  const bool gram = ghost_use_gram(route);
  at::Tensor out = at::empty({B}, a.options().dtype(norm_out_dtype(a.scalar_type())));
  if (B == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "ghost_norm_linear_cuda", [&] {
    using acc_t = typename AccOf<scalar_t>::type;
    ghost_norm_linear_kernel<scalar_t, acc_t><<<B, kThreads, 0, current_stream(a)>>>(
        a.const_data_ptr<scalar_t>(), g.const_data_ptr<scalar_t>(), out.data_ptr<acc_t>(), T, din, dout, gram);
  });
  BNMEM_CUDA_CHECK(cudaGetLastError());
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(bnmem, CUDA, m) { m.impl("ghost_norm_linear", &ghost_norm_linear_cuda); }

}  // namespace bnmem
