// The CUDA optimizer updates (zo_update_kernel.cu, grad_update_kernel.cu) behind
// torch.ops.zounlearn.zo_update_ and grad_update_: all tensors of a call live on params[0]'s
// device (one scales tensor serves them all) and may mix dtypes; the launchers group them.
// Every check runs before anything is launched.
#include <cstdint>
#include <optional>
#include <vector>

#include "ops_cuda.h"

namespace zo::gpu {
namespace {

// Each parameter's m and v pointers into `tensors` (null when the rule keeps none) and their
// one dtype, checked.
void add_states(std::vector<UpdateTensor>& tensors, at::TensorList params, at::TensorList m, at::TensorList v,
                Rule r, const char* op) {
  const at::ScalarType type = checked_state_dtype(m, v, r, op);
  const std::vector<void*> pm = checked_state(m, params, rule_uses_m(r), type, op, "m");
  const std::vector<void*> pv = checked_state(v, params, rule_uses_v(r), type, op, "v");
  for (size_t i = 0; i < tensors.size(); ++i) {
    tensors[i].m = pm[i];
    tensors[i].v = pv[i];
    tensors[i].state = type == at::kBFloat16 ? ElemType::kBFloat16 : ElemType::kFloat32;
  }
}

}  // namespace

void zo_update_(at::TensorList params, at::TensorList m, at::TensorList v, at::IntArrayRef offsets,
                at::ArrayRef<double> coefs, at::IntArrayRef streams, int64_t seed, c10::string_view dist,
                double restore, c10::string_view rule, c10::string_view rounding,
                int64_t rounding_stream ZO_HYPER_PARAMS) {
  constexpr const char* op = "zo_update_";
  const Terms terms = checked_terms(params.size(), offsets, coefs, streams, seed, 1.0, op);
  const Dist d = checked_dist(dist, op);
  const Rule r = checked_rule(rule, true, op);
  const Rounding rd = checked_rounding(rounding, seed, rounding_stream, op);
  const Hyper h = ZO_HYPER_FROM_ARGS;
  if (params.empty()) return;
  std::vector<UpdateTensor> tensors;
  for (size_t i = 0; i < params.size(); ++i) {
    const ElemType dtype = checked_elem_type(params, offsets[i], op, i);
    tensors.push_back(UpdateTensor{params[i].data_ptr(), nullptr, nullptr, nullptr, params[i].numel(), offsets[i],
                                   dtype, ElemType::kFloat32});
  }
  add_states(tensors, params, m, v, r, op);
  const auto c = static_cast<float>(restore);
  launch_on(params[0].device().index(), op, [&](int sm_count, cudaStream_t stream) {
    return zo_update_launch(tensors.data(), static_cast<int>(tensors.size()), terms, d, c, r, h, rd, sm_count,
                            stream);
  });
  bump_written(params, m, v, r);
}

void grad_update_(at::TensorList params, at::TensorList grads, at::TensorList m, at::TensorList v,
                  const std::optional<at::Tensor>& scales, at::IntArrayRef offsets, int64_t seed,
                  c10::string_view rule, c10::string_view rounding, int64_t rounding_stream ZO_HYPER_PARAMS) {
  constexpr const char* op = "grad_update_";
  const Rule r = checked_rule(rule, false, op);
  const Rounding rd = checked_rounding(rounding, seed, rounding_stream, op);
  TORCH_CHECK(offsets.size() == params.size(), op, ": one offset per tensor");
  const Hyper h = ZO_HYPER_FROM_ARGS;
  TORCH_CHECK(grads.size() == params.size(), op, ": one gradient per parameter");
  if (params.empty()) return;
  std::vector<UpdateTensor> tensors;
  for (size_t i = 0; i < params.size(); ++i) {
    const ElemType dtype = checked_elem_type(params, offsets[i], op, i);
    const void* grad = nullptr;
    if (rule_reads_grad(r)) {
      check_like(grads[i], params[i], params[i].scalar_type(), op, "grads", i);
      grad = grads[i].data_ptr();
    }
    tensors.push_back(UpdateTensor{params[i].data_ptr(), grad, nullptr, nullptr, params[i].numel(), offsets[i],
                                   dtype, ElemType::kFloat32});
  }
  add_states(tensors, params, m, v, r, op);
  float* scale = nullptr;
  if (rule_writes_scales(r) || rule_reads_scales(r)) {
    TORCH_CHECK(scales.has_value() && scales->device() == params[0].device() && scales->is_contiguous() &&
                    scales->scalar_type() == at::kFloat && scales->numel() == static_cast<int64_t>(params.size()),
                op, ": scales must be a float32 tensor on ", params[0].device(), " with one value per parameter");
    scale = static_cast<float*>(scales->data_ptr());
  }
  launch_on(params[0].device().index(), op, [&](int sm_count, cudaStream_t stream) {
    return grad_update_launch(tensors.data(), static_cast<int>(tensors.size()), scale, r, h, rd, sm_count, stream);
  });
  bump_written(params, m, v, r);
  if (rule_writes_scales(r)) scales->unsafeGetTensorImpl()->bump_version();
}

}  // namespace zo::gpu
