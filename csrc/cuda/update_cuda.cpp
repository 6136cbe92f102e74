// Torch glue for the CUDA optimizer updates (zo_update_kernel.cu, grad_update_kernel.cu): same
// signatures and semantics as the CPU module's. All tensors of a call live on params[0]'s
// device (one scales tensor serves them all) and may mix dtypes; the launcher groups them.
// Every check runs before anything is launched.
#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

#include "../op_args.h"
#include "../update_rules.h"
#include "ops_cuda.h"

namespace zo::gpu {
namespace {

// The parameters, checked: contiguous CUDA tensors of a supported dtype, all on params[0]'s device.
std::vector<UpdateTensor> checked_params(const std::vector<at::Tensor>& params, const char* op) {
  std::vector<UpdateTensor> out;
  out.reserve(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    const ElemType dtype = checked_elem_type(p, op, i);
    TORCH_CHECK(p.device() == params[0].device(), op, ": params[", i, "] is on ", p.device(), ", params[0] on ",
                params[0].device());
    out.push_back(UpdateTensor{p.data_ptr(), nullptr, nullptr, nullptr, p.numel(), 0, dtype});
  }
  return out;
}

// A contiguous tensor on params[i]'s device with its element count and the given dtype.
void check_like(const at::Tensor& t, const at::Tensor& p, at::ScalarType dtype, const char* op, const char* name,
                size_t i) {
  TORCH_CHECK(t.device() == p.device() && t.is_contiguous() && t.scalar_type() == dtype && t.numel() == p.numel(),
              op, ": ", name, "[", i, "] must be a contiguous ", dtype, " tensor on ", p.device(),
              " with as many elements as params[", i, "]");
}

// m or v into `tensors`: float32, like params[i]; ignored when the rule keeps no such state.
void add_state(std::vector<UpdateTensor>& tensors, const std::vector<at::Tensor>& params,
               const std::vector<at::Tensor>& state, bool used, float* UpdateTensor::*slot, const char* op,
               const char* name) {
  if (!used) return;
  TORCH_CHECK(state.size() == params.size(), op, ": ", name, ": one tensor per parameter");
  for (size_t i = 0; i < params.size(); ++i) {
    check_like(state[i], params[i], at::kFloat, op, name, i);
    tensors[i].*slot = static_cast<float*>(state[i].data_ptr());
  }
}

}  // namespace

void zo_update_(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& m,
                const std::vector<at::Tensor>& v, const std::vector<int64_t>& offsets, const std::vector<double>& coefs,
                const std::vector<int64_t>& streams, int64_t seed, int64_t dist, double restore, int64_t rule,
                const std::vector<double>& hyper) {
  constexpr const char* op = "zo_update_";
  const Terms terms = checked_terms(params.size(), offsets, 1.0, coefs, streams, seed, dist);
  const Rule r = checked_rule(rule, op);
  TORCH_CHECK(r != Rule::kAdamMoments && r != Rule::kQuantized, op, ": rule ", rule, " is first-order only");
  const Hyper h = checked_hyper(hyper, op);
  if (params.empty()) return;
  std::vector<UpdateTensor> tensors = checked_params(params, op);
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK(offsets[i] >= 0, op, ": offsets[", i, "] must be >= 0");
    TORCH_CHECK(tensors[i].numel <= std::numeric_limits<int64_t>::max() - offsets[i], op, ": params[", i,
                "] ends past global index 2^63");
    tensors[i].offset = offsets[i];
  }
  add_state(tensors, params, m, rule_uses_m(r), &UpdateTensor::m, op, "m");
  add_state(tensors, params, v, rule_uses_v(r), &UpdateTensor::v, op, "v");
  const auto d = static_cast<Dist>(dist);
  const auto c = static_cast<float>(restore);
  launch_on(params[0].device().index(), op, [&](int sm_count, cudaStream_t stream) {
    return zo_update_launch(tensors.data(), static_cast<int>(tensors.size()), terms, d, c, r, h, sm_count, stream);
  });
}

void grad_update_(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                  const std::vector<at::Tensor>& m, const std::vector<at::Tensor>& v,
                  const std::optional<at::Tensor>& scales, int64_t rule, const std::vector<double>& hyper) {
  constexpr const char* op = "grad_update_";
  const Rule r = checked_rule(rule, op);
  const Hyper h = checked_hyper(hyper, op);
  TORCH_CHECK(grads.size() == params.size(), op, ": one gradient per parameter");
  if (params.empty()) return;
  std::vector<UpdateTensor> tensors = checked_params(params, op);
  for (size_t i = 0; i < params.size(); ++i) {
    check_like(grads[i], params[i], params[i].scalar_type(), op, "grads", i);
    tensors[i].grad = grads[i].data_ptr();
  }
  add_state(tensors, params, m, rule_uses_m(r), &UpdateTensor::m, op, "m");
  add_state(tensors, params, v, rule_uses_v(r), &UpdateTensor::v, op, "v");
  float* scale = nullptr;
  if (r == Rule::kAdamMoments || r == Rule::kQuantized) {
    TORCH_CHECK(scales.has_value() && scales->device() == params[0].device() && scales->is_contiguous() &&
                    scales->scalar_type() == at::kFloat && scales->numel() == static_cast<int64_t>(params.size()),
                op, ": scales must be a float32 tensor on ", params[0].device(), " with one value per parameter");
    scale = static_cast<float*>(scales->data_ptr());
  }
  launch_on(params[0].device().index(), op, [&](int sm_count, cudaStream_t stream) {
    return grad_update_launch(tensors.data(), static_cast<int>(tensors.size()), scale, r, h, sm_count, stream);
  });
}

}  // namespace zo::gpu
