// Torch glue for the CUDA perturbation op: checks the raw pointers it hands out, groups the
// tensors by (device, dtype) and launches the multi-tensor kernel of perturb_kernel.cu on
// each device's current stream. Same signature and semantics as the CPU module's perturb_.
#include <cstdint>
#include <limits>
#include <vector>

#include "../op_args.h"
#include "ops_cuda.h"

namespace zo::gpu {
namespace {

struct Group {
  c10::DeviceIndex device;
  ElemType dtype;
  std::vector<void*> ptrs;
  std::vector<int64_t> numels;
  std::vector<int64_t> offsets;
};

}  // namespace

// Everything is checked before anything is launched, so a bad call changes no tensor.
void perturb_(const std::vector<at::Tensor>& params, const std::vector<int64_t>& offsets, double alpha,
              const std::vector<double>& coefs, const std::vector<int64_t>& streams, int64_t seed, int64_t dist) {
  const Terms terms = checked_terms(params.size(), offsets, alpha, coefs, streams, seed, dist);

  std::vector<Group> groups;
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& t = params[i];
    const ElemType dtype = checked_elem_type(t, "perturb_", i);
    TORCH_CHECK(offsets[i] >= 0, "perturb_: offsets[", i, "] must be >= 0");
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

  const auto d = static_cast<Dist>(dist);
  for (const Group& g : groups) {
    launch_on(g.device, "perturb_", [&](int sm_count, cudaStream_t stream) {
      return perturb_launch(g.dtype, g.ptrs.data(), g.numels.data(), g.offsets.data(),
                            static_cast<int>(g.ptrs.size()), terms, d, sm_count, stream);
    });
  }
}

}  // namespace zo::gpu
