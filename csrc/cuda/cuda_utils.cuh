// CUDA helpers that compile against a CPU-only torch too (cuda_runtime.h plus the light ATen
// headers below, a subset of torch/extension.h; ATen/cuda and c10/cuda do not compile there), so CI
// can compile-check every .cu file with nvcc (~18 s a file, versus ~80 s with torch/extension.h). When setup.py builds the
// CUDA extension against a CUDA torch it defines BNMEM_ATEN_CUDA and the current torch stream
// is used; the compile-check build falls back to the legacy default stream.
#pragma once
#include <cuda_runtime.h>
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#ifdef BNMEM_ATEN_CUDA
// Only the stream and device-guard headers: ATen/cuda/CUDAContext.h would also pull in the cuBLAS,
// cuSPARSE and cuSOLVER headers, which nothing here uses.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace bnmem {

#define BNMEM_CUDA_CHECK(expr)                                                              \
  do {                                                                                      \
    cudaError_t err__ = (expr);                                                             \
    TORCH_CHECK(err__ == cudaSuccess, "bnmem CUDA error: ", cudaGetErrorString(err__), " (", \
                #expr, ")");                                                                \
  } while (0)

inline cudaStream_t current_stream(const at::Tensor& t) {
#ifdef BNMEM_ATEN_CUDA
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
#else
  (void)t;
  return nullptr;
#endif
}

// Makes t's device current for the scope (ATen's CUDAGuard needs c10/cuda headers).
struct DeviceScope {
  int previous = -1;
  explicit DeviceScope(const at::Tensor& t) {
    BNMEM_CUDA_CHECK(cudaGetDevice(&previous));
    if (previous != t.device().index()) BNMEM_CUDA_CHECK(cudaSetDevice(t.device().index()));
  }
  ~DeviceScope() { cudaSetDevice(previous); }
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;
};

// Sum of v over the block; every thread gets the result. `shared` holds blockDim.x values.
template <typename acc_t>
__device__ __forceinline__ acc_t block_sum(acc_t v, acc_t* shared) {
  const int tid = threadIdx.x;
  shared[tid] = v;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (tid < s) shared[tid] += shared[tid + s];
    __syncthreads();
  }
  acc_t r = shared[0];
  __syncthreads();
  return r;
}

template <typename T>
struct AccOf { using type = float; };
template <>
struct AccOf<double> { using type = double; };

}  // namespace bnmem
