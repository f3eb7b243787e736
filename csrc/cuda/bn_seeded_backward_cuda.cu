// bn_seeded_backward on CUDA (MATH.md, "BN's coupling, exactly"): one block per (seed s, channel c).
// The block reduces a_sc = (1/M) sum_t dy_sct and b_sc = (1/M) sum_t dy_sct xhat_ict (i = seeds[s])
// with a block reduction, then its threads stride over the B*T positions of channel c writing
//   dz_sjct = scale_c ([j = i] dy_sct - a_sc - xhat_jct b_sc).
#include "cuda_utils.cuh"
#include "../include/bnmem_common.h"

#include <tuple>

namespace bnmem {
namespace {

constexpr int kThreads = 256;


template <typename scalar_t, typename acc_t>
__global__ void bn_seeded_backward_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ scale,
                                          const scalar_t* __restrict__ g, const int64_t* __restrict__ seeds,
                                          scalar_t* __restrict__ dz, scalar_t* __restrict__ a_out,
                                          scalar_t* __restrict__ b_out, int64_t B, int64_t C, int64_t T,
                                          acc_t inv_m) {
  __shared__ acc_t shared[kThreads];
  const int64_t s = blockIdx.x, c = blockIdx.y;
  const int64_t i = seeds[s];
  const scalar_t* gs = g + (s * C + c) * T;
  const scalar_t* xi = x + (i * C + c) * T;
  acc_t sa = 0, sb = 0;
  for (int64_t t = threadIdx.x; t < T; t += blockDim.x) {
    const acc_t gv = static_cast<acc_t>(gs[t]);
    sa += gv;
    sb += gv * static_cast<acc_t>(xi[t]);
  }
  const acc_t a = block_sum(sa, shared) * inv_m;
  const acc_t b = block_sum(sb, shared) * inv_m;
  if (threadIdx.x == 0) {
    a_out[s * C + c] = static_cast<scalar_t>(a);
    b_out[s * C + c] = static_cast<scalar_t>(b);
  }
  const acc_t k = static_cast<acc_t>(scale[c]);
  const int64_t n = B * T;
  for (int64_t p = threadIdx.x; p < n; p += blockDim.x) {
    const int64_t j = p / T, t = p % T;
    const acc_t own = (j == i) ? static_cast<acc_t>(gs[t]) : acc_t(0);
    const acc_t v = k * (own - a - static_cast<acc_t>(x[(j * C + c) * T + t]) * b);
    dz[((s * B + j) * C + c) * T + t] = static_cast<scalar_t>(v);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_seeded_backward_cuda(const at::Tensor& xhat_in,
                                                                        const at::Tensor& scale_in,
                                                                        const at::Tensor& dy_in,
                                                                        const at::Tensor& seeds_in) {
  check_bn_seeded_inputs(xhat_in, scale_in, dy_in, seeds_in, /*int32_seeds=*/false);
  DeviceScope scope(xhat_in);
  const at::Tensor xhat = xhat_in.contiguous();
  const at::Tensor scale = scale_in.contiguous();
  const at::Tensor dy = dy_in.contiguous();
  const at::Tensor seeds = seeds_in.contiguous();
  const int64_t B = xhat.size(0), C = xhat.size(1), T = xhat.size(2), S = dy.size(0);
  at::Tensor dz = at::empty({S, B, C, T}, xhat.options());
  at::Tensor a = at::empty({S, C}, xhat.options());
  at::Tensor b = at::empty({S, C}, xhat.options());
  if (S == 0 || B == 0 || C == 0) return {dz, a, b};
  // seeds are trusted to lie in [0, B): the Python wrapper checks them before launching.
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xhat.scalar_type(), "bn_seeded_backward_cuda", [&] {
    using acc_t = typename AccOf<scalar_t>::type;
    const dim3 grid(static_cast<unsigned>(S), static_cast<unsigned>(C));
    bn_seeded_backward_kernel<scalar_t, acc_t><<<grid, kThreads, 0, current_stream(xhat)>>>(
        xhat.const_data_ptr<scalar_t>(), scale.const_data_ptr<scalar_t>(), dy.const_data_ptr<scalar_t>(),
        seeds.const_data_ptr<int64_t>(), dz.data_ptr<scalar_t>(), a.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(), B,
        C, T, acc_t(1) / static_cast<acc_t>(B * T));
  });
  BNMEM_CUDA_CHECK(cudaGetLastError());
  return {dz, a, b};
}

}  // namespace

TORCH_LIBRARY_IMPL(bnmem, CUDA, m) { m.impl("bn_seeded_backward", &bn_seeded_backward_cuda); }

}  // namespace bnmem
