// Shared by the CPU and CUDA kernels of the registered ops (zounlearn/ops/library.py): the ops'
// scalar arguments turned into zo::Terms, zo::Rule and zo::Hyper, and the checks that guard the
// raw pointers handed to the torch-free kernels. zounlearn/ops/validation.py is the validation
// layer with the helpful messages; these only keep a direct torch.ops call from touching memory
// it must not, and all of them run before anything is written.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "update_rules.h"
#include "zo_rng.h"

namespace zo {

// The ops' hyperparameter arguments, in the schema's order: `void op(... ZO_HYPER_PARAMS)`.
#define ZO_HYPER_PARAM(name) , double name
#define ZO_HYPER_PARAMS ZO_HYPER_FIELDS(ZO_HYPER_PARAM)
#define ZO_HYPER_CAST(name) static_cast<float>(name),
#define ZO_HYPER_FROM_ARGS Hyper{ZO_HYPER_FIELDS(ZO_HYPER_CAST)}

// The kernels of the registered ops, as each device's namespace declares them (zo::cpu, zo::gpu):
// the schemas of zounlearn/ops/library.py in C++ types.
#define ZO_DECLARE_OP_KERNELS                                                                                   \
  void perturb_(at::TensorList params, at::IntArrayRef offsets, at::ArrayRef<double> coefs,                     \
                at::IntArrayRef streams, int64_t seed, c10::string_view dist, double alpha);                    \
  void perturb_into(at::TensorList params, at::TensorList out, at::IntArrayRef offsets,                         \
                    at::ArrayRef<double> coefs, at::IntArrayRef streams, int64_t seed, c10::string_view dist,   \
                    double alpha);                                                                              \
  void zo_update_(at::TensorList params, at::TensorList m, at::TensorList v, at::IntArrayRef offsets,           \
                  at::ArrayRef<double> coefs, at::IntArrayRef streams, int64_t seed, c10::string_view dist,     \
                  double restore, c10::string_view rule, c10::string_view rounding,                             \
                  int64_t rounding_stream ZO_HYPER_PARAMS);                                                     \
  void grad_update_(at::TensorList params, at::TensorList grads, at::TensorList m, at::TensorList v,            \
                    const std::optional<at::Tensor>& scales, at::IntArrayRef offsets, int64_t seed,             \
                    c10::string_view rule, c10::string_view rounding, int64_t rounding_stream ZO_HYPER_PARAMS);

inline Dist checked_dist(c10::string_view dist, const char* op) {
  if (dist == "rademacher") return Dist::kRademacher;
  TORCH_CHECK(dist == "gaussian", op, ": dist must be 'rademacher' or 'gaussian', got '", dist, "'");
  return Dist::kGaussian;
}

inline Rounding checked_rounding(c10::string_view rounding, int64_t seed, int64_t stream, const char* op) {
  TORCH_CHECK(rounding == "nearest" || rounding == "stochastic", op,
              ": rounding must be 'nearest' or 'stochastic', got '", rounding, "'");
  return Rounding{rounding == "stochastic", static_cast<uint64_t>(seed), static_cast<uint64_t>(stream)};
}

inline Terms checked_terms(size_t n_params, at::IntArrayRef offsets, at::ArrayRef<double> coefs,
                           at::IntArrayRef streams, int64_t seed, double alpha, const char* op) {
  TORCH_CHECK(n_params == offsets.size(), op, ": one offset per tensor");
  TORCH_CHECK(!coefs.empty() && coefs.size() <= kMaxTerms && coefs.size() == streams.size(), op,
              ": 1 to 8 terms, one stream per coefficient");
  return make_terms(alpha, coefs.data(), streams.data(), static_cast<int>(coefs.size()), seed);
}

inline Rule checked_rule(c10::string_view name, bool zeroth_order, const char* op) {
  Rule r{};
  TORCH_CHECK(rule_from_name(name.data(), name.size(), &r), op, ": unknown rule '", name, "'");
  TORCH_CHECK(!zeroth_order || rule_zeroth_order(r), op, ": rule '", name, "' is first-order only");
  return r;
}

// A contiguous tensor of float32, bfloat16 or float16 on `device`.
inline void check_param(const at::Tensor& t, const c10::Device& device, const char* op, size_t i) {
  const at::ScalarType type = t.scalar_type();
  TORCH_CHECK(t.device() == device && t.is_contiguous(), op, ": params[", i, "] must be a contiguous tensor on ",
              device);
  TORCH_CHECK(type == at::kFloat || type == at::kBFloat16 || type == at::kHalf, op, ": params[", i,
              "] has unsupported dtype ", type);
}

// A contiguous `dtype` tensor on p's device with as many elements as p.
inline void check_like(const at::Tensor& t, const at::Tensor& p, at::ScalarType dtype, const char* op,
                       const char* kind, size_t i) {
  TORCH_CHECK(t.device() == p.device() && t.is_contiguous() && t.scalar_type() == dtype && t.numel() == p.numel(),
              op, ": ", kind, "[", i, "] must be a contiguous ", dtype, " tensor on ", p.device(),
              " with as many elements as params[", i, "]");
}

// The one dtype of a call's m and v: float32, or bfloat16 (the lean state); float32 when the
// rule keeps none or nothing is given (checked_state then refuses a missing tensor).
inline at::ScalarType checked_state_dtype(at::TensorList m, at::TensorList v, Rule r, const char* op) {
  const at::TensorList first = rule_uses_m(r) ? m : v;
  if (!(rule_uses_m(r) || rule_uses_v(r)) || first.empty()) return at::kFloat;
  const at::ScalarType type = first[0].scalar_type();
  TORCH_CHECK(type == at::kFloat || type == at::kBFloat16, op, ": state must be float32 or bfloat16, got ", type);
  return type;
}

// m or v, when the rule uses it (one `dtype` tensor per parameter, checked): each tensor's data;
// null pointers when the rule keeps no such state.
inline std::vector<void*> checked_state(at::TensorList state, at::TensorList params, bool used, at::ScalarType dtype,
                                        const char* op, const char* kind) {
  std::vector<void*> data(params.size(), nullptr);
  if (!used) return data;
  TORCH_CHECK(state.size() == params.size(), op, ": ", kind, ": one tensor per parameter");
  for (size_t i = 0; i < params.size(); ++i) {
    check_like(state[i], params[i], dtype, op, kind, i);
    data[i] = state[i].data_ptr();
  }
  return data;
}

// As torch's in-place ops do: autograd then refuses a tensor changed after it was saved.
inline void bump_versions(at::TensorList tensors) {
  for (const at::Tensor& t : tensors) t.unsafeGetTensorImpl()->bump_version();
}

// What an update wrote: the parameters and the state the rule writes.
inline void bump_written(at::TensorList params, at::TensorList m, at::TensorList v, Rule r) {
  bump_versions(params);
  if (rule_writes_m(r)) bump_versions(m);
  if (rule_writes_v(r)) bump_versions(v);
}

}  // namespace zo
