// Torch binding of the CPU optimizer updates (update_cpu_kernel.h). Arguments arrive validated
// by zounlearn.ops; the checks here guard the raw pointers and all run before any write.
#include <torch/extension.h>

#include <atomic>
#include <cstring>
#include <vector>

#include "../op_args.h"
#include "ops_cpu.h"
#include "parallel_groups.h"
#include "update_cpu_kernel.h"

namespace zo::cpu {
namespace {

// Calls fn(std::integral_constant<Rule, R>) for the runtime rule.
template <typename F>
void with_rule(Rule r, const F& fn) {
  switch (r) {
    case Rule::kSgd: return fn(std::integral_constant<Rule, Rule::kSgd>{});
    case Rule::kSign: return fn(std::integral_constant<Rule, Rule::kSign>{});
    case Rule::kAdam: return fn(std::integral_constant<Rule, Rule::kAdam>{});
    case Rule::kAdaZo: return fn(std::integral_constant<Rule, Rule::kAdaZo>{});
    case Rule::kSignAdam: return fn(std::integral_constant<Rule, Rule::kSignAdam>{});
    case Rule::kAdamMoments: return fn(std::integral_constant<Rule, Rule::kAdamMoments>{});
    case Rule::kQuantized: return fn(std::integral_constant<Rule, Rule::kQuantized>{});
    case Rule::kSophia: return fn(std::integral_constant<Rule, Rule::kSophia>{});
  }
}

// Calls fn(T*) with the tensor's data as the kernel's storage type.
template <typename F>
void with_dtype(const at::Tensor& t, void* data, const F& fn) {
  switch (t.scalar_type()) {
    case at::kFloat: return fn(static_cast<float*>(data));
    case at::kBFloat16: return fn(static_cast<bf16*>(data));
    default: return fn(static_cast<f16*>(data));
  }
}

void check_param(const at::Tensor& t, size_t i) {
  const auto type = t.scalar_type();
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), "params[", i, "] must be a contiguous CPU tensor");
  TORCH_CHECK(type == at::kFloat || type == at::kBFloat16 || type == at::kHalf, "params[", i,
              "] has unsupported dtype ", type);
}

// m or v: float32, like params[i]; empty when the rule keeps no such state.
float* state_ptr(const std::vector<at::Tensor>& state, bool used, const at::Tensor& p, size_t i, const char* name) {
  if (!used) return nullptr;
  TORCH_CHECK(state.size() > i, name, ": one tensor per parameter");
  const at::Tensor& s = state[i];
  TORCH_CHECK(s.device().is_cpu() && s.is_contiguous() && s.scalar_type() == at::kFloat && s.numel() == p.numel(),
              name, "[", i, "] must be a contiguous float32 CPU tensor with as many elements as params[", i, "]");
  return s.data_ptr<float>();
}

}  // namespace

void zo_update_(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& m,
                const std::vector<at::Tensor>& v, const std::vector<int64_t>& offsets, const std::vector<double>& coefs,
                const std::vector<int64_t>& streams, int64_t seed, int64_t dist, double restore, int64_t rule,
                const std::vector<double>& hyper) {
  const Terms terms = checked_terms(params.size(), offsets, 1.0, coefs, streams, seed, dist);
  const Rule r = checked_rule(rule, "zo_update_");
  TORCH_CHECK(r != Rule::kAdamMoments && r != Rule::kQuantized, "zo_update_: rule ", rule, " is first-order only");
  const Hyper h = checked_hyper(hyper, "zo_update_");
  std::vector<State> states;
  GroupRanges ranges;
  for (size_t i = 0; i < params.size(); ++i) {
    check_param(params[i], i);
    TORCH_CHECK(offsets[i] >= 0, "zo_update_: offsets[", i, "] must be >= 0");
    states.push_back({state_ptr(m, rule_uses_m(r), params[i], i, "m"), state_ptr(v, rule_uses_v(r), params[i], i, "v")});
    const auto base = static_cast<uint64_t>(offsets[i]);
    const int64_t first = first_group(base);
    ranges.add(i, first, params[i].numel() == 0 ? 0 : end_group(base, params[i].numel()) - first);
  }
  const auto d = static_cast<Dist>(dist);
  const auto c = static_cast<float>(restore);
  with_rule(r, [&](auto rule_tag) {
    parallel_over_groups(ranges, [&](size_t i, int64_t g0, int64_t g1) {
      const at::Tensor& t = params[i];
      with_dtype(t, t.data_ptr(), [&](auto* data) {
        zo_update_groups<decltype(rule_tag)::value>(data, states[i], t.numel(), static_cast<uint64_t>(offsets[i]),
                                                    terms, c, h, d, g0, g1);
      });
    });
  });
}

void grad_update_(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                  const std::vector<at::Tensor>& m, const std::vector<at::Tensor>& v,
                  const std::optional<at::Tensor>& scales, int64_t rule, const std::vector<double>& hyper) {
  const Rule r = checked_rule(rule, "grad_update_");
  const Hyper h = checked_hyper(hyper, "grad_update_");
  TORCH_CHECK(grads.size() == params.size(), "grad_update_: one gradient per parameter");
  const bool uses_scales = r == Rule::kAdamMoments || r == Rule::kQuantized;
  float* scale = nullptr;
  if (uses_scales) {
    TORCH_CHECK(scales.has_value() && scales->device().is_cpu() && scales->is_contiguous() &&
                    scales->scalar_type() == at::kFloat && scales->numel() == static_cast<int64_t>(params.size()),
                "grad_update_: scales must be a float32 CPU tensor with one value per parameter");
    scale = scales->data_ptr<float>();
  }
  std::vector<State> states;
  GroupRanges ranges;
  for (size_t i = 0; i < params.size(); ++i) {
    check_param(params[i], i);
    TORCH_CHECK(grads[i].device().is_cpu() && grads[i].is_contiguous() &&
                    grads[i].scalar_type() == params[i].scalar_type() && grads[i].numel() == params[i].numel(),
                "grads[", i, "] must be a contiguous CPU tensor like params[", i, "]");
    states.push_back({state_ptr(m, rule_uses_m(r), params[i], i, "m"), state_ptr(v, rule_uses_v(r), params[i], i, "v")});
    ranges.add(i, 0, (params[i].numel() + kGroup - 1) / kGroup);
  }
  // kAdamMoments: each task's max |u| joins its tensor's by compare-and-swap on the float bits
  // (non-negative floats order as their bit patterns; a NaN's bits exceed inf's).
  std::vector<std::atomic<uint32_t>> max_bits(params.size());
  for (auto& b : max_bits) b.store(0);
  with_rule(r, [&](auto rule_tag) {
    parallel_over_groups(ranges, [&](size_t i, int64_t g0, int64_t g1) {
      const at::Tensor& t = params[i];
      const float s = r == Rule::kQuantized ? scale[i] : 0.0f;
      with_dtype(t, t.data_ptr(), [&](auto* data) {
        using T = std::remove_pointer_t<decltype(data)>;
        const float local = grad_update_range<decltype(rule_tag)::value>(
            data, static_cast<const T*>(grads[i].data_ptr()), states[i], s, h, g0 * kGroup,
            std::min(g1 * kGroup, t.numel()));
        uint32_t seen = max_bits[i].load();
        const uint32_t bits = float_bits(local);
        while (bits > seen && !max_bits[i].compare_exchange_weak(seen, bits)) {
        }
      });
    });
  });
  if (r == Rule::kAdamMoments) {
    for (size_t i = 0; i < params.size(); ++i) scale[i] = bits_float(max_bits[i].load());
  }
}

}  // namespace zo::cpu
