// The CPU optimizer updates (update_cpu_kernel.h) behind torch.ops.zounlearn.zo_update_ and
// grad_update_: the pointer checks, all before any write, then one parallel loop per call.
#include <atomic>
#include <vector>

#include "ops_cpu.h"

namespace zo::cpu {
namespace {

// Where each parameter's m and v live (null when the rule keeps none) and their one dtype, checked.
std::vector<State> checked_states(at::TensorList params, at::TensorList m, at::TensorList v, Rule r, const char* op) {
  const at::ScalarType type = checked_state_dtype(m, v, r, op);
  const std::vector<void*> pm = checked_state(m, params, rule_uses_m(r), type, op, "m");
  const std::vector<void*> pv = checked_state(v, params, rule_uses_v(r), type, op, "v");
  const DType dtype = type == at::kBFloat16 ? DType::kBFloat16 : DType::kFloat;
  std::vector<State> states;
  for (size_t i = 0; i < params.size(); ++i) states.push_back({pm[i], pv[i], dtype});
  return states;
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
  const GroupRanges ranges = checked_groups(params, offsets, op);
  const std::vector<State> states = checked_states(params, m, v, r, op);
  const auto c = static_cast<float>(restore);
  const KernelTable& k = kernels();
  parallel_over_groups(ranges, [&](size_t i, int64_t g0, int64_t g1) {
    const at::Tensor& t = params[i];
    k.zo_update(r, dtype_of(t), t.data_ptr(), states[i], t.numel(), static_cast<uint64_t>(offsets[i]), terms, c, h,
                d, rd, g0, g1);
  });
  bump_written(params, m, v, r);
}

void grad_update_(at::TensorList params, at::TensorList grads, at::TensorList m, at::TensorList v,
                  const std::optional<at::Tensor>& scales, at::IntArrayRef offsets, int64_t seed,
                  c10::string_view rule, c10::string_view rounding, int64_t rounding_stream ZO_HYPER_PARAMS) {
  constexpr const char* op = "grad_update_";
  const Rule r = checked_rule(rule, false, op);
  const Rounding rd = checked_rounding(rounding, seed, rounding_stream, op);
  const Hyper h = ZO_HYPER_FROM_ARGS;
  TORCH_CHECK(grads.size() == params.size(), op, ": one gradient per parameter");
  float* scale = nullptr;
  if (rule_writes_scales(r) || rule_reads_scales(r)) {
    TORCH_CHECK(scales.has_value() && scales->device().is_cpu() && scales->is_contiguous() &&
                    scales->scalar_type() == at::kFloat && scales->numel() == static_cast<int64_t>(params.size()),
                op, ": scales must be a float32 CPU tensor with one value per parameter");
    scale = static_cast<float*>(scales->data_ptr());
  }
  TORCH_CHECK(offsets.size() == params.size(), op, ": one offset per tensor");
  const GroupRanges ranges = checked_groups(params, offsets, op);
  for (size_t i = 0; i < params.size(); ++i) {
    if (rule_reads_grad(r)) check_like(grads[i], params[i], params[i].scalar_type(), op, "grads", i);
  }
  const std::vector<State> states = checked_states(params, m, v, r, op);
  // kAdamMoments: each task's max |u| joins its tensor's by compare-and-swap on the float bits
  // (non-negative floats order as their bit patterns; a NaN's bits exceed inf's).
  std::vector<std::atomic<uint32_t>> max_bits(params.size());
  for (auto& b : max_bits) b.store(0);
  const KernelTable& k = kernels();
  parallel_over_groups(ranges, [&](size_t i, int64_t g0, int64_t g1) {
    const at::Tensor& t = params[i];
    const float s = rule_reads_scales(r) ? scale[i] : 0.0f;
    const void* grad = rule_reads_grad(r) ? grads[i].data_ptr() : nullptr;
    const float local = k.grad_update(r, dtype_of(t), t.data_ptr(), grad, states[i], t.numel(),
                                      static_cast<uint64_t>(offsets[i]), s, h, rd, g0, g1);
    uint32_t seen = max_bits[i].load();
    const uint32_t bits = float_bits(local);
    while (bits > seen && !max_bits[i].compare_exchange_weak(seen, bits)) {
    }
  });
  if (rule_writes_scales(r)) {
    for (size_t i = 0; i < params.size(); ++i) scale[i] = bits_float(max_bits[i].load());
    scales->unsafeGetTensorImpl()->bump_version();
  }
  bump_written(params, m, v, r);
}

}  // namespace zo::cpu
