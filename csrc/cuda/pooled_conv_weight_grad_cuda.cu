// pooled_conv_weight_grad on CUDA: the Conv2d weight gradient of N seeds whose output gradients sit at
// one position per (sample b, output channel o, pooled slot p):
//   dW[n, o, i, a, c] = sum_{b, p} vals[o, n, b, p] x_pad[b, g(o) Cig + i, oh sh + a dh, ow sw + c dw].
// Block (o, tile of kTK window entries k = (i, a, c)); 256 threads = kTK entries x kTN seed lanes, each
// thread owning kNPT seeds (n = n0 + tn + kTN r) of one entry. Per stage of kStage maxima j = (b, p) the
// block stages the windows at the maxima (read straight from x_pad: no unfolded or gathered copy in
// global memory) and the stage's values of kTN kNPT seeds in shared memory, then every thread adds
// its products; more seeds: another pass over the maxima. Writes dW once (no atomics, deterministic).
// Any input strides; fp16/bf16 accumulate in fp32 and are stored in the input dtype.
// idx is range-checked in the kernel, without a host sync: an entry outside [0, Ho*Wo) is never read
// through (its window counts as zero), raises a device flag, and an asynchronous assert on that flag
// fails the call's stream with the message below (the next synchronizing call reports it).
#include <ATen/ops/_assert_async.h>
#include <ATen/ops/eq.h>
#include "cuda_utils.cuh"
#include "../include/bnmem_common.h"
#include "../include/pooled_conv_weight_grad_check.h"

namespace bnmem {
namespace {

constexpr int kTK = 32;                 // window entries per block
constexpr int kTN = 8;                  // seed lanes per entry
constexpr int kNPT = 4;                 // seeds per thread per pass
constexpr int kThreads = kTK * kTN;     // 256
constexpr int kSeeds = kTN * kNPT;      // seeds per pass: 32
constexpr int kStage = 32;              // maxima per shared-memory stage

struct PoolArgs {
  int64_t N, B, P, BP, Cig, Cog, K, KH, KW, Wo, HoWo, sh, sw, dh, dw;
  int64_t sx[4], sv[4], si[3], so_n, so_o;
};

template <typename scalar_t, typename acc_t>
__global__ void pooled_wgrad_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ vals,
                                    const int64_t* __restrict__ idx, scalar_t* __restrict__ out, int* bad,
                                    PoolArgs a) {
  __shared__ acc_t win[kStage][kTK + 1];
  __shared__ acc_t vs[kStage][kSeeds + 1];
  __shared__ int64_t corner[kStage];
  const int64_t o = blockIdx.x;
  const int64_t k0 = static_cast<int64_t>(blockIdx.y) * kTK;
  const int tid = threadIdx.x, tk = tid % kTK, tn = tid / kTK;
  const scalar_t* xg = x + (o / a.Cog) * a.Cig * a.sx[1];
  const scalar_t* vo = vals + o * a.sv[0];
  const int64_t k = k0 + tk;   // this thread's window entry
  for (int64_t n0 = 0; n0 < a.N; n0 += kSeeds) {
    acc_t acc[kNPT];
#pragma unroll
    for (int r = 0; r < kNPT; ++r) acc[r] = 0;
    for (int64_t j0 = 0; j0 < a.BP; j0 += kStage) {
      if (tid < kStage) {
        const int64_t j = j0 + tid;
        int64_t off = -1;
        if (j < a.BP) {
          const int64_t b = j / a.P, p = j % a.P;
          const int64_t pos = idx[b * a.si[0] + o * a.si[1] + p * a.si[2]];
          if (pos >= 0 && pos < a.HoWo) {
            off = b * a.sx[0] + (pos / a.Wo) * a.sh * a.sx[2] + (pos % a.Wo) * a.sw * a.sx[3];
          } else {
            atomicExch(bad, 1);
          }
        }
        corner[tid] = off;
      }
      __syncthreads();
      // windows: kStage x kTK entries; values: kStage x kSeeds
      for (int e = tid; e < kStage * kTK; e += kThreads) {
        const int s = e / kTK, t = e % kTK;
        const int64_t off = corner[s];
        acc_t w = 0;
        if (off >= 0 && k0 + t < a.K) {
          const int64_t kk = k0 + t, i = kk / (a.KH * a.KW), r = (kk / a.KW) % a.KH, c = kk % a.KW;
          w = static_cast<acc_t>(xg[off + i * a.sx[1] + r * a.dh * a.sx[2] + c * a.dw * a.sx[3]]);
        }
        win[s][t] = w;
      }
      for (int e = tid; e < kStage * kSeeds; e += kThreads) {
        const int s = e % kStage, q = e / kStage;   // consecutive threads: consecutive maxima (p fastest)
        const int64_t j = j0 + s, n = n0 + q;
        acc_t v = 0;
        if (j < a.BP && n < a.N) v = static_cast<acc_t>(vo[n * a.sv[1] + (j / a.P) * a.sv[2] + (j % a.P) * a.sv[3]]);
        vs[s][q] = v;
      }
      __syncthreads();
#pragma unroll 8
      for (int s = 0; s < kStage; ++s) {
        const acc_t w = win[s][tk];
#pragma unroll
        for (int r = 0; r < kNPT; ++r) acc[r] += vs[s][tn + kTN * r] * w;
      }
      __syncthreads();
    }
    if (k < a.K) {
#pragma unroll
      for (int r = 0; r < kNPT; ++r) {
        const int64_t n = n0 + tn + kTN * r;
        if (n < a.N) out[n * a.so_n + o * a.so_o + k] = static_cast<scalar_t>(acc[r]);
      }
    }
  }
}

at::Tensor pooled_conv_weight_grad_cuda(const at::Tensor& x, const at::Tensor& vals, const at::Tensor& idx,
                                        at::IntArrayRef out_size, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                        at::IntArrayRef dilation, int64_t groups) {
  check_pooled_conv_weight_grad_inputs(x, vals, idx, out_size, kernel_size, stride, dilation, groups);
  DeviceScope scope(x);
  const int64_t N = vals.size(1), Co = vals.size(0), Cig = x.size(1) / groups;
  at::Tensor out = at::empty({N, Co, Cig, kernel_size[0], kernel_size[1]}, x.options());
  if (out.numel() == 0) return out;
  if (x.size(0) == 0 || vals.size(3) == 0) return out.zero_();
  const int64_t HoWo = out_size[0] * out_size[1];
  at::Tensor bad = at::zeros({1}, x.options().dtype(at::kInt));
  PoolArgs a;
  a.N = N, a.B = x.size(0), a.P = vals.size(3), a.BP = a.B * a.P, a.Cig = Cig, a.Cog = Co / groups;
  a.KH = kernel_size[0], a.KW = kernel_size[1], a.K = Cig * a.KH * a.KW, a.Wo = out_size[1], a.HoWo = HoWo;
  a.sh = stride[0], a.sw = stride[1], a.dh = dilation[0], a.dw = dilation[1];
  for (int d = 0; d < 4; ++d) a.sx[d] = x.stride(d), a.sv[d] = vals.stride(d);
  for (int d = 0; d < 3; ++d) a.si[d] = idx.stride(d);
  a.so_n = out.stride(0), a.so_o = out.stride(1);
  const int64_t n_k = (a.K + kTK - 1) / kTK;
  TORCH_CHECK(n_k <= 65535, "bnmem::pooled_conv_weight_grad: too many window tiles (", n_k, " > 65535)");
  const dim3 grid(static_cast<unsigned>(Co), static_cast<unsigned>(n_k));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pooled_conv_weight_grad_cuda", [&] {
    using acc_t = typename AccOf<scalar_t>::type;
    pooled_wgrad_kernel<scalar_t, acc_t><<<grid, kThreads, 0, current_stream(x)>>>(
        x.const_data_ptr<scalar_t>(), vals.const_data_ptr<scalar_t>(), idx.const_data_ptr<int64_t>(),
        out.data_ptr<scalar_t>(), bad.data_ptr<int>(), a);
  });
  BNMEM_CUDA_CHECK(cudaGetLastError());
  at::_assert_async(bad.eq(0), "bnmem::pooled_conv_weight_grad: idx entries must lie in [0, Ho*Wo)");
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(bnmem, CUDA, m) { m.impl("pooled_conv_weight_grad", &pooled_conv_weight_grad_cuda); }

}  // namespace bnmem
