// norm_affine_grad_sq on CUDA. x, dy, mean, rstd: [B, C, S], any strides (stats usually stride 0).
// Kernel 1: grid (B, ceil(C / kWarps)), one warp per (i, c): lanes stride over s, recompute
//   xhat = (x - mean) * rstd, accumulate sum dy*xhat and sum dy, warp-reduce, write [B, C, 2].
// Kernel 2: one block per sample sums the squares over c -> out [B, 2]. No atomics (deterministic).
#include "cuda_utils.cuh"
#include "../include/bnmem_common.h"

namespace bnmem {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = 32 * kWarps;

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;
}

template <typename scalar_t, typename acc_t>
__global__ void norm_affine_channel_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ dy,
                                           const acc_t* __restrict__ mean, const acc_t* __restrict__ rstd,
                                           acc_t* __restrict__ part, int64_t C, int64_t S,
                                           int64_t sxb, int64_t sxc, int64_t sxs, int64_t sdb, int64_t sdc,
                                           int64_t sds, int64_t smb, int64_t smc, int64_t sms, int64_t srb,
                                           int64_t src, int64_t srs) {
  const int64_t b = blockIdx.x;
  const int64_t c = int64_t(blockIdx.y) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (c >= C) return;  // whole warp leaves together
  const scalar_t* xi = x + b * sxb + c * sxc;
  const scalar_t* di = dy + b * sdb + c * sdc;
  const acc_t* mi = mean + b * smb + c * smc;
  const acc_t* ri = rstd + b * srb + c * src;
  acc_t sg = 0, sb = 0;
  for (int64_t s = lane; s < S; s += 32) {
    const acc_t d = static_cast<acc_t>(di[s * sds]);
    sg += d * (static_cast<acc_t>(xi[s * sxs]) - mi[s * sms]) * ri[s * srs];
    sb += d;
  }
  sg = warp_sum(sg);
  sb = warp_sum(sb);
  if (lane == 0) {
    part[(b * C + c) * 2] = sg;
    part[(b * C + c) * 2 + 1] = sb;
  }
}

template <typename acc_t>
__global__ void norm_affine_square_sum_kernel(const acc_t* __restrict__ part, acc_t* __restrict__ out, int64_t C) {
  __shared__ acc_t shared[kThreads];
  const int64_t b = blockIdx.x;
  acc_t g2 = 0, b2 = 0;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    const acc_t g = part[(b * C + c) * 2], e = part[(b * C + c) * 2 + 1];
    g2 += g * g;
    b2 += e * e;
  }
  g2 = block_sum(g2, shared);
  b2 = block_sum(b2, shared);
  if (threadIdx.x == 0) {
    out[b * 2] = g2;
    out[b * 2 + 1] = b2;
  }
}

at::Tensor norm_affine_grad_sq_cuda(const at::Tensor& x, const at::Tensor& dy, const at::Tensor& mean,
                                    const at::Tensor& rstd) {
  TORCH_CHECK(x.dim() == 3 && dy.sizes() == x.sizes() && mean.sizes() == x.sizes() && rstd.sizes() == x.sizes(),
              "bnmem::norm_affine_grad_sq: x, dy, mean, rstd must all be [B, C, S] (expand the stats), got ",
              x.sizes(), ", ", dy.sizes(), ", ", mean.sizes(), ", ", rstd.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()) && dy.scalar_type() == x.scalar_type(),
              "bnmem::norm_affine_grad_sq: x and dy must share a floating dtype");
  const auto acc_type = norm_out_dtype(x.scalar_type());
  TORCH_CHECK(mean.scalar_type() == acc_type && rstd.scalar_type() == acc_type,
              "bnmem::norm_affine_grad_sq: mean and rstd must be in the accumulation dtype ", acc_type);
  TORCH_CHECK(x.device() == dy.device() && x.device() == mean.device() && x.device() == rstd.device(),
              "bnmem::norm_affine_grad_sq: all inputs must be on one device");
  DeviceScope scope(x);
  const int64_t B = x.size(0), C = x.size(1), S = x.size(2);
  at::Tensor out = at::empty({B, 2}, x.options().dtype(acc_type));
  if (B == 0) return out;
  if (C == 0) return out.zero_();
  at::Tensor part = at::empty({B, C, 2}, x.options().dtype(acc_type));
  const cudaStream_t stream = current_stream(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "norm_affine_grad_sq_cuda", [&] {
    using acc_t = typename AccOf<scalar_t>::type;
    const dim3 grid(static_cast<unsigned>(B), static_cast<unsigned>((C + kWarps - 1) / kWarps));
    norm_affine_channel_kernel<scalar_t, acc_t><<<grid, kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), dy.const_data_ptr<scalar_t>(), mean.const_data_ptr<acc_t>(),
        rstd.const_data_ptr<acc_t>(), part.data_ptr<acc_t>(), C, S, x.stride(0), x.stride(1), x.stride(2),
        dy.stride(0), dy.stride(1), dy.stride(2), mean.stride(0), mean.stride(1), mean.stride(2), rstd.stride(0),
        rstd.stride(1), rstd.stride(2));
    BNMEM_CUDA_CHECK(cudaGetLastError());
    norm_affine_square_sum_kernel<acc_t><<<static_cast<unsigned>(B), kThreads, 0, stream>>>(
        part.const_data_ptr<acc_t>(), out.data_ptr<acc_t>(), C);
  });
  BNMEM_CUDA_CHECK(cudaGetLastError());
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(bnmem, CUDA, m) { m.impl("norm_affine_grad_sq", &norm_affine_grad_sq_cuda); }

}  // namespace bnmem
