// norm_affine_grad_sq on CPU: per-sample squared norms of a normalization layer's affine gradients.
//  x, dy, mean, rstd: [B, C, S] with any strides (stats are usually stride-0 expansions).
//  Pass 1, (i, c) pairs in parallel (at::parallel_for, OpenMP): sum_s dy*(x - mean)*rstd and
//  sum_s dy, recomputing xhat on the fly (never stored), into a [B, C, 2] buffer; contiguous rows go
//  through a lane-parallel loop compiled for the baseline ISA and AVX2+FMA (picked at run time).
//  Pass 2, samples in parallel: sum over c of the squares -> out [B, 2].
// fp16/bf16 accumulate in fp32 (at::opmath_type); out is fp64 for fp64 x, fp32 otherwise.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include "../include/bnmem_common.h"
#include <torch/library.h>

namespace bnmem {
namespace {

// One contiguous row: sg = sum_s dy_s (x_s - m), sb = sum_s dy_s, as an OpenMP SIMD reduction (the
// compiler may reassociate the two sums into vector lanes; an explicit lane array made GCC shuffle).
// Compiled for the baseline ISA and, on x86, for AVX2 + FMA, picked at run time (cpu_use_avx2;
// BNMEM_CPU_ISA=baseline forces the baseline build).
template <typename scalar_t, typename acc_t>
__attribute__((always_inline)) inline void row_sums(const scalar_t* xi, const scalar_t* di, int64_t S, acc_t m,
                                                    acc_t& sg_out, acc_t& sb_out) {
  acc_t sg = 0, sb = 0;
#pragma omp simd reduction(+ : sg, sb)
  for (int64_t s = 0; s < S; ++s) {
    const acc_t d = static_cast<acc_t>(di[s]);
    sg += d * (static_cast<acc_t>(xi[s]) - m);
    sb += d;
  }
  sg_out = sg;
  sb_out = sb;
}

template <typename scalar_t, typename acc_t>
using RowFn = void (*)(const scalar_t*, const scalar_t*, int64_t, acc_t, acc_t&, acc_t&);

template <typename scalar_t, typename acc_t>
void row_sums_baseline(const scalar_t* xi, const scalar_t* di, int64_t S, acc_t m, acc_t& sg, acc_t& sb) {
  row_sums<scalar_t, acc_t>(xi, di, S, m, sg, sb);
}

#ifdef BNMEM_X86_DISPATCH
template <typename scalar_t, typename acc_t>
__attribute__((target("avx2,fma"))) void row_sums_avx2(const scalar_t* xi, const scalar_t* di, int64_t S, acc_t m,
                                                       acc_t& sg, acc_t& sb) {
  row_sums<scalar_t, acc_t>(xi, di, S, m, sg, sb);
}
#endif

template <typename scalar_t, typename acc_t>
RowFn<scalar_t, acc_t> pick_row_sums() {
#ifdef BNMEM_X86_DISPATCH
  if (cpu_use_avx2()) return &row_sums_avx2<scalar_t, acc_t>;
#endif
  return &row_sums_baseline<scalar_t, acc_t>;
}

void check_inputs(const at::Tensor& x, const at::Tensor& dy, const at::Tensor& mean, const at::Tensor& rstd) {
  TORCH_CHECK(x.dim() == 3 && dy.sizes() == x.sizes() && mean.sizes() == x.sizes() && rstd.sizes() == x.sizes(),
              "bnmem::norm_affine_grad_sq: x, dy, mean, rstd must all be [B, C, S] (expand the stats), got ",
              x.sizes(), ", ", dy.sizes(), ", ", mean.sizes(), ", ", rstd.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()) && dy.scalar_type() == x.scalar_type(),
              "bnmem::norm_affine_grad_sq: x and dy must share a floating dtype, got ", x.scalar_type(), " and ",
              dy.scalar_type());
  const auto acc = norm_out_dtype(x.scalar_type());
  TORCH_CHECK(mean.scalar_type() == acc && rstd.scalar_type() == acc,
              "bnmem::norm_affine_grad_sq: mean and rstd must be in the accumulation dtype ", acc, ", got ",
              mean.scalar_type(), " and ", rstd.scalar_type());
  TORCH_CHECK(x.device() == dy.device() && x.device() == mean.device() && x.device() == rstd.device(),
              "bnmem::norm_affine_grad_sq: all inputs must be on one device");
}

at::Tensor norm_affine_grad_sq_cpu(const at::Tensor& x, const at::Tensor& dy, const at::Tensor& mean,
                                   const at::Tensor& rstd) {
  check_inputs(x, dy, mean, rstd);
  const int64_t B = x.size(0), C = x.size(1), S = x.size(2);
  const auto acc_type = norm_out_dtype(x.scalar_type());
  at::Tensor out = at::empty({B, 2}, x.options().dtype(acc_type));
  if (B == 0) return out;
  at::Tensor part = at::empty({B, C, 2}, x.options().dtype(acc_type));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "norm_affine_grad_sq_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    using op_t = at::opmath_type<scalar_t>;
    static_assert(std::is_same_v<op_t, acc_t>, "accumulation type");
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* dp = dy.const_data_ptr<scalar_t>();
    const acc_t* mp = mean.const_data_ptr<acc_t>();
    const acc_t* rp = rstd.const_data_ptr<acc_t>();
    acc_t* pp = part.data_ptr<acc_t>();
    const int64_t sxb = x.stride(0), sxc = x.stride(1), sxs = x.stride(2);
    const int64_t sdb = dy.stride(0), sdc = dy.stride(1), sds = dy.stride(2);
    const int64_t smb = mean.stride(0), smc = mean.stride(1), sms = mean.stride(2);
    const int64_t srb = rstd.stride(0), src = rstd.stride(1), srs = rstd.stride(2);
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(S, 1));
    const RowFn<scalar_t, acc_t> row = pick_row_sums<scalar_t, acc_t>();
    at::parallel_for(0, B * C, grain, [&](int64_t begin, int64_t end) {
      for (int64_t bc = begin; bc < end; ++bc) {
        const int64_t b = bc / C, c = bc % C;
        const scalar_t* xi = xp + b * sxb + c * sxc;
        const scalar_t* di = dp + b * sdb + c * sdc;
        const acc_t* mi = mp + b * smb + c * smc;
        const acc_t* ri = rp + b * srb + c * src;
        acc_t sg = 0, sb = 0;
        if (sxs == 1 && sds == 1 && sms == 0 && srs == 0) {  // BN / IN / GN layout: contiguous rows
          row(xi, di, S, mi[0], sg, sb);
          sg *= ri[0];
        } else {
          for (int64_t s = 0; s < S; ++s) {
            const acc_t d = static_cast<acc_t>(di[s * sds]);
            sg += d * (static_cast<acc_t>(xi[s * sxs]) - mi[s * sms]) * ri[s * srs];
            sb += d;
          }
        }
        pp[bc * 2] = sg;
        pp[bc * 2 + 1] = sb;
      }
    });
    acc_t* op = out.data_ptr<acc_t>();
    at::parallel_for(0, B, std::max<int64_t>(1, 4096 / std::max<int64_t>(C, 1)), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        acc_t g2 = 0, b2 = 0;
        for (int64_t c = 0; c < C; ++c) {
          const acc_t g = pp[(b * C + c) * 2], e = pp[(b * C + c) * 2 + 1];
          g2 += g * g;
          b2 += e * e;
        }
        op[b * 2] = g2;
        op[b * 2 + 1] = b2;
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(bnmem, CPU, m) { m.impl("norm_affine_grad_sq", &norm_affine_grad_sq_cpu); }

}  // namespace bnmem
