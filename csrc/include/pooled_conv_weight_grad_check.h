// pooled_conv_weight_grad: the input checks shared by the CPU and CUDA implementations (host side).
// Light ATen headers only (the .cu file includes this too). The idx range [0, Ho*Wo) is checked by
// each implementation (CPU: while reading idx; CUDA: in the kernel, reported by an asynchronous assert).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace bnmem {

// x_pad [B, C_in, Hp, Wp] floating, vals [C_out, N, B, P] of x_pad's dtype, idx [B, C_out, P] int64,
// all on one device; out_size/kernel_size/stride/dilation pairs of positive ints; groups dividing C_in
// and C_out; out_size within the conv of x_pad (Ho <= (Hp - dh (kh - 1) - 1) / sh + 1, same for W).
inline void check_pooled_conv_weight_grad_inputs(const at::Tensor& x, const at::Tensor& vals, const at::Tensor& idx,
                                                 at::IntArrayRef out_size, at::IntArrayRef kernel_size,
                                                 at::IntArrayRef stride, at::IntArrayRef dilation, int64_t groups) {
  const char* op = "bnmem::pooled_conv_weight_grad";
  TORCH_CHECK(x.dim() == 4 && vals.dim() == 4 && idx.dim() == 3, op,
              ": x_pad [B, C_in, Hp, Wp], vals [C_out, N, B, P] and idx [B, C_out, P] needed, got ", x.sizes(), ", ",
              vals.sizes(), " and ", idx.sizes());
  TORCH_CHECK(out_size.size() == 2 && kernel_size.size() == 2 && stride.size() == 2 && dilation.size() == 2, op,
              ": out_size, kernel_size, stride, dilation must have 2 entries each");
  TORCH_CHECK(x.scalar_type() == vals.scalar_type() && at::isFloatingType(x.scalar_type()), op,
              ": x_pad and vals must share one floating dtype, got ", x.scalar_type(), " and ", vals.scalar_type());
  TORCH_CHECK(idx.scalar_type() == at::kLong, op, ": idx must be int64, got ", idx.scalar_type());
  TORCH_CHECK(x.device() == vals.device() && x.device() == idx.device(), op,
              ": x_pad, vals and idx must be on one device");
  const int64_t B = x.size(0), C = x.size(1), Co = vals.size(0), P = vals.size(3);
  TORCH_CHECK(vals.size(2) == B && idx.size(0) == B && idx.size(1) == Co && idx.size(2) == P, op,
              ": inconsistent shapes x_pad ", x.sizes(), ", vals ", vals.sizes(), " (want [C_out, N, B, P]), idx ",
              idx.sizes(), " (want [B, C_out, P])");
  for (int d = 0; d < 2; ++d)
    TORCH_CHECK(kernel_size[d] >= 1 && stride[d] >= 1 && dilation[d] >= 1 && out_size[d] >= 1, op,
                ": out_size, kernel_size, stride, dilation must be positive");
  TORCH_CHECK(groups >= 1 && C >= groups && C % groups == 0 && Co % groups == 0, op,
              ": groups must divide C_in and C_out, got groups ", groups, ", C_in ", C, ", C_out ", Co);
  for (int d = 0; d < 2; ++d) {
    const int64_t span = dilation[d] * (kernel_size[d] - 1) + 1;
    TORCH_CHECK(x.size(2 + d) >= span && out_size[d] <= (x.size(2 + d) - span) / stride[d] + 1, op, ": out_size ",
                out_size, " exceeds the conv of x_pad ", x.sizes(), " with kernel_size ", kernel_size, ", stride ",
                stride, ", dilation ", dilation);
  }
}

}  // namespace bnmem
