// The CUDA perturbation kernel (perturb_kernel.cu) behind torch.ops.zounlearn.perturb_: the
// pointer checks, then one multi-tensor launch per dtype (and per 99 tensors) on the current
// stream of params[0]'s device.
#include <cstdint>
#include <vector>

#include "ops_cuda.h"

namespace zo::gpu {

namespace {

// out <- alpha params + sum_k c_k z_k: one multi-tensor launch per dtype (and per 99 tensors) on the
// current stream of params[0]'s device; out is params itself in place.
void perturb(const char* op, at::TensorList params, at::TensorList out, at::IntArrayRef offsets,
             at::ArrayRef<double> coefs, at::IntArrayRef streams, int64_t seed, c10::string_view dist, double alpha) {
  const Terms terms = checked_terms(params.size(), offsets, coefs, streams, seed, alpha, op);
  const Dist d = checked_dist(dist, op);
  TORCH_CHECK(out.size() == params.size(), op, ": one output per tensor");
  if (params.empty()) return;
  // One list per dtype (float32, bfloat16, float16): a launch holds one dtype.
  std::vector<const void*> ptrs[3];
  std::vector<void*> outs[3];
  std::vector<int64_t> numels[3], bases[3];
  for (size_t i = 0; i < params.size(); ++i) {
    const int type = static_cast<int>(checked_elem_type(params, offsets[i], op, i));
    check_like(out[i], params[i], params[i].scalar_type(), op, "out", i);
    if (params[i].numel() == 0) continue;
    ptrs[type].push_back(params[i].data_ptr());
    outs[type].push_back(out[i].data_ptr());
    numels[type].push_back(params[i].numel());
    bases[type].push_back(offsets[i]);
  }
  for (int type = 0; type < 3; ++type) {
    if (ptrs[type].empty()) continue;
    launch_on(params[0].device().index(), op, [&](int sm_count, cudaStream_t stream) {
      return perturb_launch(static_cast<ElemType>(type), ptrs[type].data(), outs[type].data(), numels[type].data(),
                            bases[type].data(), static_cast<int>(ptrs[type].size()), terms, d, sm_count, stream);
    });
  }
  bump_versions(out);
}

}  // namespace

void perturb_(at::TensorList params, at::IntArrayRef offsets, at::ArrayRef<double> coefs, at::IntArrayRef streams,
              int64_t seed, c10::string_view dist, double alpha) {
  perturb("perturb_", params, params, offsets, coefs, streams, seed, dist, alpha);
}

void perturb_into(at::TensorList params, at::TensorList out, at::IntArrayRef offsets, at::ArrayRef<double> coefs,
                  at::IntArrayRef streams, int64_t seed, c10::string_view dist, double alpha) {
  perturb("perturb_into", params, out, offsets, coefs, streams, seed, dist, alpha);
}

}  // namespace zo::gpu
