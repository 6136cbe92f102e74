// Torch glue for the CUDA perturbation op: checks the raw pointers it hands out, groups the
// tensors by (device, dtype) and launches the multi-tensor kernel of perturb_kernel.cu on
// each device's current stream. Same signature and semantics as the CPU module's perturb_.
// Only c10/cuda headers: ATen/cuda/CUDAContext.h would drag in cuBLAS/cuSPARSE/cuSOLVER headers.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <cstdint>
#include <limits>
#include <vector>

#include "../op_args.h"
#include "perturb_kernel.cuh"

namespace {

struct Group {
  c10::DeviceIndex device;
  zo::ElemType dtype;
  std::vector<void*> ptrs;
  std::vector<int64_t> numels;
  std::vector<int64_t> offsets;
};

// Arguments arrive validated by zounlearn.ops; the checks here only guard the raw pointers.
// Everything is checked before anything is launched, so a bad call changes no tensor.
void perturb_(const std::vector<at::Tensor>& params, const std::vector<int64_t>& offsets, double alpha,
              const std::vector<double>& coefs, const std::vector<int64_t>& streams, int64_t seed,
              int64_t dist) {
  const zo::Terms terms = zo::checked_terms(params.size(), offsets, alpha, coefs, streams, seed, dist);

  std::vector<Group> groups;
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& t = params[i];
    TORCH_CHECK(t.is_cuda() && t.is_contiguous() && offsets[i] >= 0, "perturb_: params[", i,
                "] must be a contiguous CUDA tensor with offset >= 0");
    zo::ElemType dtype;
    switch (t.scalar_type()) {
      case at::kFloat: dtype = zo::ElemType::kFloat32; break;
      case at::kBFloat16: dtype = zo::ElemType::kBFloat16; break;
      case at::kHalf: dtype = zo::ElemType::kFloat16; break;
      default: TORCH_CHECK(false, "perturb_: params[", i, "] has unsupported dtype ", t.scalar_type());
    }
    const int64_t numel = t.numel();
    TORCH_CHECK(numel <= std::numeric_limits<int64_t>::max() - offsets[i], "perturb_: params[", i,
                "] ends past global index 2^63");
    if (numel == 0) continue;
    const c10::DeviceIndex device = t.device().index();
    Group* g = nullptr;
    for (Group& h : groups) {
      if (h.device == device && h.dtype == dtype) g = &h;
    }
    if (g == nullptr) {
      groups.push_back(Group{device, dtype, {}, {}, {}});
      g = &groups.back();
    }
    g->ptrs.push_back(t.data_ptr());
    g->numels.push_back(numel);
    g->offsets.push_back(offsets[i]);
  }

  const auto d = static_cast<zo::Dist>(dist);
  for (const Group& g : groups) {
    const c10::cuda::CUDAGuard guard(g.device);
    int sm_count = 0;  // sizes the grid only
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, g.device));
    const cudaError_t err =
        zo::perturb_launch(g.dtype, g.ptrs.data(), g.numels.data(), g.offsets.data(), static_cast<int>(g.ptrs.size()),
                           terms, d, sm_count, c10::cuda::getCurrentCUDAStream(g.device).stream());
    TORCH_CHECK(err == cudaSuccess, "perturb_: CUDA kernel launch failed: ", cudaGetErrorString(err));
  }
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "zounlearn CUDA kernels (ZO-RNG v1)";
  m.def("perturb_", &perturb_, "theta <- alpha * theta + sum_k c_k z(seed, stream_k, e), in place");
}
