// The CUDA module's ops, bound to Python in module_cuda.cpp, and the pieces their torch glue
// shares. Only at::Tensor and c10/cuda headers: ATen/cuda/CUDAContext.h would drag in
// cuBLAS/cuSPARSE/cuSOLVER headers, and torch/extension.h (the whole C++ API and pybind11,
// about 5x the compile time) is for module_cuda.cpp alone.
// Arguments arrive validated by zounlearn.ops; the checks here guard the raw pointers handed
// to the kernels (kernels.cuh) and all run before anything is launched, so a call that fails
// them changes no tensor.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "kernels.cuh"

namespace zo::gpu {

void perturb_(const std::vector<at::Tensor>& params, const std::vector<int64_t>& offsets, double alpha,
              const std::vector<double>& coefs, const std::vector<int64_t>& streams, int64_t seed, int64_t dist);

void zo_update_(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& m,
                const std::vector<at::Tensor>& v, const std::vector<int64_t>& offsets, const std::vector<double>& coefs,
                const std::vector<int64_t>& streams, int64_t seed, int64_t dist, double restore, int64_t rule,
                const std::vector<double>& hyper);

void grad_update_(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                  const std::vector<at::Tensor>& m, const std::vector<at::Tensor>& v,
                  const std::optional<at::Tensor>& scales, int64_t rule, const std::vector<double>& hyper);

// The kernels' storage type of params[i]: a contiguous CUDA tensor of float32, bfloat16 or float16.
inline ElemType checked_elem_type(const at::Tensor& t, const char* op, size_t i) {
  TORCH_CHECK(t.is_cuda() && t.is_contiguous(), op, ": params[", i, "] must be a contiguous CUDA tensor");
  const at::ScalarType type = t.scalar_type();
  TORCH_CHECK(type == at::kFloat || type == at::kBFloat16 || type == at::kHalf, op, ": params[", i,
              "] has unsupported dtype ", type);
  return type == at::kFloat ? ElemType::kFloat32 : type == at::kBFloat16 ? ElemType::kBFloat16 : ElemType::kFloat16;
}

// Runs launch(sm_count, stream) on `device` and its current stream; a launcher's error raises.
template <typename F>
void launch_on(c10::DeviceIndex device, const char* op, const F& launch) {
  const c10::cuda::CUDAGuard guard(device);
  int sm_count = 0;  // sizes the grid only
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device));
  const cudaError_t err = launch(sm_count, c10::cuda::getCurrentCUDAStream(device).stream());
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

}  // namespace zo::gpu
