// The CUDA perturbation kernel (perturb_kernel.cu) behind torch.ops.zounlearn.perturb_: the
// pointer checks, then one multi-tensor launch per dtype (and per 120 tensors) on the current
// stream of params[0]'s device.
#include <cstdint>
#include <vector>

#include "ops_cuda.h"

namespace zo::gpu {

void perturb_(at::TensorList params, at::IntArrayRef offsets, at::ArrayRef<double> coefs, at::IntArrayRef streams,
              int64_t seed, c10::string_view dist, double alpha) {
  constexpr const char* op = "perturb_";
  const Terms terms = checked_terms(params.size(), offsets, coefs, streams, seed, alpha, op);
  const Dist d = checked_dist(dist, op);
  if (params.empty()) return;
  // One list per dtype (float32, bfloat16, float16): a launch holds one dtype.
  std::vector<void*> ptrs[3];
  std::vector<int64_t> numels[3], bases[3];
  for (size_t i = 0; i < params.size(); ++i) {
    const int type = static_cast<int>(checked_elem_type(params, offsets[i], op, i));
    if (params[i].numel() == 0) continue;
    ptrs[type].push_back(params[i].data_ptr());
    numels[type].push_back(params[i].numel());
    bases[type].push_back(offsets[i]);
  }
  for (int type = 0; type < 3; ++type) {
    if (ptrs[type].empty()) continue;
    launch_on(params[0].device().index(), op, [&](int sm_count, cudaStream_t stream) {
      return perturb_launch(static_cast<ElemType>(type), ptrs[type].data(), numels[type].data(), bases[type].data(),
                            static_cast<int>(ptrs[type].size()), terms, d, sm_count, stream);
    });
  }
  bump_versions(params);
}

}  // namespace zo::gpu
