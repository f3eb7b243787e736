// Shared helpers for the CPU and CUDA implementations (host-side only).
#pragma once
// Light ATen headers only (no torch/extension.h): .cu files include this too, and nvcc on the
// full torch/extension.h takes ~80 s a file versus ~18 s.
#include <ATen/core/Tensor.h>
#include <optional>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>

namespace bnmem {

// Hand-vectorized CPU loops are compiled twice, baseline (SSE2) and __attribute__((target("avx2,fma"))),
// and picked at run time: cpu_use_avx2() is true when this CPU runs AVX2 + FMA and BNMEM_CPU_ISA is not
// "baseline" (the tests force the baseline build that way; same numbers up to rounding).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__CUDACC__)
#define BNMEM_X86_DISPATCH 1
inline bool cpu_use_avx2() {
  const char* isa = std::getenv("BNMEM_CPU_ISA");
  if (isa != nullptr && std::strcmp(isa, "baseline") == 0) return false;
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
#endif

// Ghost-norm route (docs/math.md, "Ghost norms"): 1 = Gram <G_i G_i^T, A_i A_i^T>, 2 = materialize
// G_i^T A_i. The choice is made once, by the Python wrapper (bnmem_kernels.ops.ghost_norm_linear),
// and passed down: the kernels never decide it themselves.
enum GhostRoute : int64_t { kRouteGram = 1, kRouteMaterialize = 2 };

inline bool ghost_use_gram(int64_t route) {
  TORCH_CHECK(route == kRouteGram || route == kRouteMaterialize,
              "bnmem::ghost_norm_linear: route must be 1 (gram) or 2 (materialize), got ", route,
              "; bnmem_kernels.ghost_norm_linear(route='auto') picks one");
  return route == kRouteGram;
}

// Norms of fp16/bf16 inputs are returned in fp32: a squared norm overflows fp16 easily.
inline at::ScalarType norm_out_dtype(at::ScalarType t) {
  return (t == at::kHalf || t == at::kBFloat16) ? at::kFloat : t;
}

inline void check_ghost_linear_inputs(const at::Tensor& a, const at::Tensor& g) {
  TORCH_CHECK(a.dim() == 3 && g.dim() == 3, "bnmem::ghost_norm_linear: a and g must be [B, T, d], got ",
              a.sizes(), " and ", g.sizes());
  TORCH_CHECK(a.size(0) == g.size(0) && a.size(1) == g.size(1),
              "bnmem::ghost_norm_linear: a and g must share B and T, got ", a.sizes(), " and ", g.sizes());
  TORCH_CHECK(a.scalar_type() == g.scalar_type(), "bnmem::ghost_norm_linear: a and g must share a dtype, got ",
              a.scalar_type(), " and ", g.scalar_type());
  TORCH_CHECK(at::isFloatingType(a.scalar_type()), "bnmem::ghost_norm_linear: floating inputs needed, got ",
              a.scalar_type());
  TORCH_CHECK(a.device() == g.device(), "bnmem::ghost_norm_linear: a and g on different devices");
}

// lira_scores (and lira_global_std, op names it): conf [M, N, A] fp32/fp64, keep [M, N] bool on conf's
// device; global_std, when given, [2, M, A].
inline void check_lira_inputs(const at::Tensor& conf, const at::Tensor& keep,
                              const std::optional<at::Tensor>& global_std, const char* op = "bnmem::lira_scores") {
  TORCH_CHECK(conf.dim() == 3, op, ": conf must be [M, N, A], got ", conf.sizes());
  TORCH_CHECK(keep.dim() == 2 && keep.size(0) == conf.size(0) && keep.size(1) == conf.size(1),
              op, ": keep must be [M, N] matching conf, got ", keep.sizes());
  TORCH_CHECK(keep.scalar_type() == at::kBool, op, ": keep must be bool");
  TORCH_CHECK(conf.scalar_type() == at::kFloat || conf.scalar_type() == at::kDouble,
              op, ": conf must be fp32 or fp64, got ", conf.scalar_type());
  TORCH_CHECK(keep.device() == conf.device(), op, ": conf and keep on different devices");
  if (global_std.has_value())
    TORCH_CHECK(global_std->dim() == 3 && global_std->size(0) == 2 && global_std->size(1) == conf.size(0) &&
                    global_std->size(2) == conf.size(2),
                op, ": global_std must be [2, M, A], got ", global_std->sizes());
}

// conv_weight_grad_sq: x [B, C_in, Hp, Wp] (already padded), g [B, C_out, OH, OW] of one floating dtype on
// one device; kernel_size/stride/dilation pairs of positive ints; groups dividing C_in and C_out; OH, OW
// matching the conv arithmetic.
inline void check_conv_weight_grad_sq_inputs(const at::Tensor& x, const at::Tensor& g, at::IntArrayRef kernel_size,
                                             at::IntArrayRef stride, at::IntArrayRef dilation, int64_t groups) {
  const char* op = "bnmem::conv_weight_grad_sq";
  TORCH_CHECK(x.dim() == 4 && g.dim() == 4, op, ": x [B, C_in, Hp, Wp] and grad_out [B, C_out, OH, OW] needed, got ",
              x.sizes(), " and ", g.sizes());
  TORCH_CHECK(kernel_size.size() == 2 && stride.size() == 2 && dilation.size() == 2, op,
              ": kernel_size, stride, dilation must have 2 entries each");
  TORCH_CHECK(x.scalar_type() == g.scalar_type() && at::isFloatingType(x.scalar_type()), op,
              ": x and grad_out must share one floating dtype, got ", x.scalar_type(), " and ", g.scalar_type());
  TORCH_CHECK(x.device() == g.device(), op, ": x and grad_out on different devices");
  TORCH_CHECK(x.size(0) == g.size(0), op, ": x and grad_out must share B, got ", x.sizes(), " and ", g.sizes());
  for (int d = 0; d < 2; ++d)
    TORCH_CHECK(kernel_size[d] >= 1 && stride[d] >= 1 && dilation[d] >= 1, op,
                ": kernel_size, stride, dilation must be positive");
  TORCH_CHECK(groups >= 1 && x.size(1) >= groups && x.size(1) % groups == 0 && g.size(1) % groups == 0, op,
              ": groups must divide C_in and C_out, got groups ", groups, ", C_in ", x.size(1), ", C_out ", g.size(1));
  for (int d = 0; d < 2; ++d) {
    const int64_t span = dilation[d] * (kernel_size[d] - 1) + 1;
    TORCH_CHECK(x.size(2 + d) >= span && g.size(2 + d) == (x.size(2 + d) - span) / stride[d] + 1, op,
                ": grad_out ", g.sizes(), " does not match the conv of x ", x.sizes(), " with kernel_size ",
                kernel_size, ", stride ", stride, ", dilation ", dilation);
  }
}

}  // namespace bnmem
