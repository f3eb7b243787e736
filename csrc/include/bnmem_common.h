// Shared helpers for the CPU and CUDA implementations (host-side only).
#pragma once
// Light ATen headers only (no torch/extension.h): .cu files include this too, and nvcc on the
// full torch/extension.h takes ~80 s a file versus ~18 s.
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace bnmem {

// Ghost-norm route (MATH.md): the Gram route costs O(T^2 (d_in + d_out)) and needs two T x T
// Grams; materializing G_i^T A_i costs O(T d_in d_out). Gram when 2 T^2 < d_in * d_out.
enum GhostRoute : int64_t { kRouteAuto = 0, kRouteGram = 1, kRouteMaterialize = 2 };

inline bool ghost_use_gram(int64_t route, int64_t T, int64_t d_in, int64_t d_out) {
  TORCH_CHECK(route >= 0 && route <= 2, "bnmem: route must be 0 (auto), 1 (gram) or 2 (materialize), got ", route);
  if (route == kRouteAuto) return 2 * T * T < d_in * d_out;
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

}  // namespace bnmem
