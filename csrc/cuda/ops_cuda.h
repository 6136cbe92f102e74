// The CUDA kernels of the registered ops (zounlearn/ops/library.py), registered for the CUDA
// dispatch key by module_cuda.cpp, and the pieces their torch glue shares. Only at::Tensor and
// c10/cuda headers: ATen/cuda/CUDAContext.h would drag in cuBLAS/cuSPARSE/cuSOLVER headers, and
// torch/extension.h (the whole C++ API and pybind11, about 5x the compile time) is for
// module_cuda.cpp alone. The checks here guard the raw pointers handed to the kernels
// (kernels.cuh) and all run before anything is launched, so a call that fails them changes
// no tensor.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <limits>
#include <optional>

#include "../op_args.h"
#include "kernels.cuh"

namespace zo::gpu {

ZO_DECLARE_OP_KERNELS

// The kernels' storage type of params[i], checked to be a contiguous tensor of float32,
// bfloat16 or float16 on params[0]'s (CUDA) device whose global indices stay below 2^63.
inline ElemType checked_elem_type(at::TensorList params, int64_t offset, const char* op, size_t i) {
  const at::Tensor& t = params[i];
  TORCH_CHECK(params[0].is_cuda(), op, ": params[0] must be a CUDA tensor");
  check_param(t, params[0].device(), op, i);
  TORCH_CHECK(offset >= 0 && t.numel() <= std::numeric_limits<int64_t>::max() - offset, op, ": params[", i,
              "]: global indices must lie in [0, 2^63)");
  const at::ScalarType type = t.scalar_type();
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
