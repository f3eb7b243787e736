// conv_weight_grad_sq on CUDA: out[i] = ||dW_i||_F^2 of a Conv2d weight gradient, implicit im2col.
// Block (sample i, group x 16 x 16 tile of (output channel o, weight column k = (ci, kh, kw))): per
// stage of 32 output positions l it stages a grad tile g[o, l] and an input tile x[k, l] read
// straight from the padded input (x[ci, oh sh + kh dh, ow sw + kw dw]; no unfolded copy) into
// shared memory; each thread owns one dW_i[o, k] and accumulates it over all l. The block then
// reduces its squares into a [B, P] partial buffer, summed per sample by a second kernel
// (deterministic, no atomics). Any input strides; fp16/bf16 accumulate in fp32.
#include "cuda_utils.cuh"
#include "../include/bnmem_common.h"

namespace bnmem {
namespace {

constexpr int kTile = 16;                  // o x k tile: one thread per entry
constexpr int kThreads = kTile * kTile;    // 256
constexpr int kStage = 32;                 // output positions per shared-memory stage

struct ConvArgs {
  int64_t Cig, Cog, K, L, OW, KH, KW, sh, sw, dh, dw;
  int64_t sx[4], sg[4];
  int64_t n_o, n_k;
};

template <typename scalar_t, typename acc_t>
__global__ void conv_wgrad_sq_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ g,
                                     acc_t* __restrict__ part, ConvArgs a) {
  __shared__ acc_t gs[kTile][kStage + 1];
  __shared__ acc_t xs[kTile][kStage + 1];
  __shared__ acc_t red[kThreads];
  const int64_t i = blockIdx.x;
  const int64_t pid = blockIdx.y;
  const int64_t grp = pid / (a.n_o * a.n_k), ok = pid % (a.n_o * a.n_k);
  const int64_t o0 = (ok / a.n_k) * kTile, k0 = (ok % a.n_k) * kTile;
  const int tid = threadIdx.x, to = tid / kTile, tk = tid % kTile;
  const scalar_t* xi = x + i * a.sx[0] + grp * a.Cig * a.sx[1];
  const scalar_t* gi = g + i * a.sg[0] + grp * a.Cog * a.sg[1];
  acc_t w = 0;
  for (int64_t l0 = 0; l0 < a.L; l0 += kStage) {
    for (int e = tid; e < kTile * kStage; e += kThreads) {
      const int r = e / kStage, c = e % kStage;
      const int64_t l = l0 + c, oh = l / a.OW, ow = l % a.OW;
      const int64_t o = o0 + r, k = k0 + r;
      gs[r][c] = (o < a.Cog && l < a.L) ? static_cast<acc_t>(gi[o * a.sg[1] + oh * a.sg[2] + ow * a.sg[3]]) : acc_t(0);
      acc_t xv = 0;
      if (k < a.K && l < a.L) {
        const int64_t ci = k / (a.KH * a.KW), kh = (k / a.KW) % a.KH, kw = k % a.KW;
        xv = static_cast<acc_t>(xi[ci * a.sx[1] + (oh * a.sh + kh * a.dh) * a.sx[2] + (ow * a.sw + kw * a.dw) * a.sx[3]]);
      }
      xs[r][c] = xv;
    }
    __syncthreads();
#pragma unroll 8
    for (int c = 0; c < kStage; ++c) w += gs[to][c] * xs[tk][c];
    __syncthreads();
  }
  const acc_t s = block_sum(w * w, red);
  if (tid == 0) part[i * gridDim.y + pid] = s;
}

template <typename acc_t>
__global__ void sum_parts_kernel(const acc_t* __restrict__ part, acc_t* __restrict__ out, int64_t P) {
  __shared__ acc_t red[kThreads];
  const int64_t i = blockIdx.x;
  acc_t s = 0;
  for (int64_t p = threadIdx.x; p < P; p += blockDim.x) s += part[i * P + p];
  s = block_sum(s, red);
  if (threadIdx.x == 0) out[i] = s;
}

at::Tensor conv_weight_grad_sq_cuda(const at::Tensor& x, const at::Tensor& g, at::IntArrayRef kernel_size,
                                    at::IntArrayRef stride, at::IntArrayRef dilation, int64_t groups) {
  check_conv_weight_grad_sq_inputs(x, g, kernel_size, stride, dilation, groups);
  DeviceScope scope(x);
  const int64_t B = x.size(0);
  const auto out_dtype = norm_out_dtype(x.scalar_type());
  at::Tensor out = at::zeros({B}, x.options().dtype(out_dtype));
  if (B == 0 || g.size(1) == 0) return out;
  ConvArgs a;
  a.Cig = x.size(1) / groups, a.Cog = g.size(1) / groups, a.KH = kernel_size[0], a.KW = kernel_size[1];
  a.K = a.Cig * a.KH * a.KW, a.L = g.size(2) * g.size(3), a.OW = g.size(3);
  a.sh = stride[0], a.sw = stride[1], a.dh = dilation[0], a.dw = dilation[1];
  for (int d = 0; d < 4; ++d) a.sx[d] = x.stride(d), a.sg[d] = g.stride(d);
  a.n_o = (a.Cog + kTile - 1) / kTile, a.n_k = (a.K + kTile - 1) / kTile;
  const int64_t P = groups * a.n_o * a.n_k;
  TORCH_CHECK(P <= 65535, "bnmem::conv_weight_grad_sq: too many (group, tile) blocks per sample (", P, " > 65535)");
  at::Tensor part = at::empty({B, P}, x.options().dtype(out_dtype));
  const dim3 grid(static_cast<unsigned>(B), static_cast<unsigned>(P));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "conv_weight_grad_sq_cuda", [&] {
    using acc_t = typename AccOf<scalar_t>::type;
    conv_wgrad_sq_kernel<scalar_t, acc_t><<<grid, kThreads, 0, current_stream(x)>>>(
        x.const_data_ptr<scalar_t>(), g.const_data_ptr<scalar_t>(), part.data_ptr<acc_t>(), a);
    BNMEM_CUDA_CHECK(cudaGetLastError());
    sum_parts_kernel<acc_t><<<static_cast<unsigned>(B), kThreads, 0, current_stream(x)>>>(
        part.const_data_ptr<acc_t>(), out.data_ptr<acc_t>(), P);
  });
  BNMEM_CUDA_CHECK(cudaGetLastError());
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(bnmem, CUDA, m) { m.impl("conv_weight_grad_sq", &conv_weight_grad_sq_cuda); }

}  // namespace bnmem
