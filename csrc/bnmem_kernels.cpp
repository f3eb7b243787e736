// Op schemas, declared once. Each device registers its implementations in its own file:
//   csrc/cpu/<op>_cpu.cpp   TORCH_LIBRARY_IMPL(bnmem, CPU, m)
//   csrc/cuda/<op>_cuda.cu  TORCH_LIBRARY_IMPL(bnmem, CUDA, m)
// Python adds register_fake (and register_autograd where an op is differentiable) in
// bnmem_kernels/ops/<op>.py.
#include <torch/extension.h>

#include "include/bnmem_common.h"

#include <thread>

#ifdef _OPENMP
#include <omp.h>
#endif

TORCH_LIBRARY(bnmem, m) {
  // ghost_norm_linear: out[i] = ||G_i^T A_i||_F^2 for a [B, T, d_in], g [B, T, d_out].
  // route: 1 = Gram, 2 = materialize (the Python wrapper picks it: Gram when 2 T^2 < d_in d_out).
  m.def("ghost_norm_linear(Tensor a, Tensor g, int route) -> Tensor");
  // --- schemas of later ops go below, one block per op, with a one-line definition ---
  // logit_confidence: logits [R, K], labels [R] int64 -> c [R] = z_y - logsumexp_{k != y} z_k (docs/math.md).
  m.def("logit_confidence(Tensor logits, Tensor labels) -> Tensor");
  // lira_scores: conf [M, N, A], keep [M, N] bool, global_std [2, M, A] or None -> score [M, N],
  // leave-one-model-out LiRA (online / offline one-sided or logpdf; mean or median center).
  m.def("lira_scores(Tensor conf, Tensor keep, Tensor? global_std, bool online, bool median, bool logpdf) -> Tensor");
  // lira_global_std: conf [M, N, A], keep [M, N] -> [2, M, A] fp64, per target the pooled in/out std without it (CPU).
  m.def("lira_global_std(Tensor conf, Tensor keep) -> Tensor");
  // norm_affine_grad_sq: per-sample (||dgamma_i||^2, ||dbeta_i||^2) of a normalization layer, x, dy,
  // mean, rstd all [B, C, S] (stats expanded): dgamma_i[c] = sum_s dy (x - mean) rstd, dbeta_i[c] = sum_s dy.
  m.def("norm_affine_grad_sq(Tensor x, Tensor dy, Tensor mean, Tensor rstd) -> Tensor");
  // conv_weight_grad_sq: per-sample ||dW_i||_F^2 of a Conv2d weight gradient by implicit im2col, x already
  // padded [B, C_in, Hp, Wp], grad_out [B, C_out, OH, OW] -> [B] (fp64 for fp64, else fp32).
  m.def("conv_weight_grad_sq(Tensor x, Tensor grad_out, int[2] kernel_size, int[2] stride, int[2] dilation, int groups) -> Tensor");
  // pooled_conv_weight_grad: Conv2d weight gradient of N seeds whose output gradients sit at one position per
  // (b, o, pooled slot p): x_pad [B, C_in, Hp, Wp], vals [C_out, N, B, P], idx [B, C_out, P] (flat oh*Wo+ow)
  // -> dW [N, C_out, C_in/g, kh, kw] in the input dtype.
  m.def("pooled_conv_weight_grad(Tensor x_pad, Tensor vals, Tensor idx, int[2] out_size, int[2] kernel_size, int[2] stride, int[2] dilation, int groups) -> Tensor");
}

namespace {
bool built_with_cuda() {
#ifdef BNMEM_WITH_CUDA
  return true;
#else
  return false;
#endif
}

// the build of the hand-vectorized CPU loops this process runs (bnmem_common.h: cpu_use_avx2)
std::string cpu_simd() {
#ifdef BNMEM_X86_DISPATCH
  return bnmem::cpu_use_avx2() ? "avx2+fma" : "baseline";
#else
  return "baseline";
#endif
}

int openmp_max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 0;
#endif
}
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "bnmem compiled kernels; the ops live under torch.ops.bnmem";
  m.def("built_with_cuda", &built_with_cuda, "whether the CUDA sources were compiled in");
  m.def("openmp_max_threads", &openmp_max_threads, "OpenMP threads (0: built without OpenMP)");
  m.def("cpu_simd", &cpu_simd, "the CPU kernels' SIMD build picked at run time (BNMEM_CPU_ISA=baseline forces it)");
}
