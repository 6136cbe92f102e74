// The CPU kernels behind kernel_table.h, compiled once per instruction set by setup.py with
// -DZO_CPU_ISA=name and isa_flags.json's flags for that name. Torch-free: the only symbol it
// exports is its table (tests/test_cpu_kernel_isa.py checks), so no two builds share code.
#include <type_traits>

#include "kernel_table.h"
#include "perturb_cpu_kernel.h"
#include "update_cpu_kernel.h"

namespace zo::cpu {
namespace {

// fn(T*) with ptr as the kernel's storage type of dtype.
template <typename F>
void with_type(DType dtype, const void* ptr, const F& fn) {
  switch (dtype) {
    case DType::kFloat: return fn(static_cast<float*>(const_cast<void*>(ptr)));
    case DType::kBFloat16: return fn(static_cast<bf16*>(const_cast<void*>(ptr)));
    case DType::kHalf: return fn(static_cast<f16*>(const_cast<void*>(ptr)));
  }
}

// fn(S*) with S the storage type of a rule's state: bfloat16 (lean) or float32; only float32 for
// the rules that keep none, which need no second copy.
template <Rule R, typename F>
void with_state_type(DType dtype, const F& fn) {
  if constexpr (rule_uses_m(R) || rule_uses_v(R)) {
    if (dtype == DType::kBFloat16) return fn(static_cast<bf16*>(nullptr));
  }
  fn(static_cast<float*>(nullptr));
}

void perturb(DType dtype, const void* src, void* dst, int64_t numel, uint64_t base, const Terms& terms, Dist dist,
             int64_t g0, int64_t g1) {
  with_type(dtype, src, [&](auto* in) {
    using T = std::remove_pointer_t<decltype(in)>;
    perturb_groups<T>(in, static_cast<T*>(dst), numel, base, terms, dist, g0, g1);
  });
}

void zo_update(Rule rule, DType dtype, void* data, State state, int64_t numel, uint64_t base, const Terms& terms,
               float restore, const Hyper& hyper, Dist dist, const Rounding& rounding, int64_t g0, int64_t g1) {
  with_rule(rule, [&](auto rule_tag) {
    constexpr Rule R = decltype(rule_tag)::value;
    if constexpr (rule_zeroth_order(R)) {
      with_type(dtype, data, [&](auto* p) {
        with_state_type<R>(state.dtype, [&](auto* s) {
          using S = std::remove_pointer_t<decltype(s)>;
          zo_update_groups<R, std::remove_pointer_t<decltype(p)>, S>(p, state, numel, base, terms, restore, hyper,
                                                                     dist, rounding, g0, g1);
        });
      });
    }
  });
}

float grad_update(Rule rule, DType dtype, void* data, const void* grad, State state, int64_t numel, uint64_t base,
                  float scale, const Hyper& hyper, const Rounding& rounding, int64_t g0, int64_t g1) {
  float max_abs_u = 0.0f;
  with_rule(rule, [&](auto rule_tag) {
    constexpr Rule R = decltype(rule_tag)::value;
    with_type(dtype, data, [&](auto* p) {
      using T = std::remove_pointer_t<decltype(p)>;
      with_state_type<R>(state.dtype, [&](auto* s) {
        using S = std::remove_pointer_t<decltype(s)>;
        max_abs_u = grad_update_groups<R, T, S>(p, static_cast<const T*>(grad), state, numel, base, scale, hyper,
                                                rounding, g0, g1);
      });
    });
  });
  return max_abs_u;
}

#define ZO_ISA_STRING2(x) #x
#define ZO_ISA_STRING(x) ZO_ISA_STRING2(x)
constexpr KernelTable kTable{ZO_ISA_STRING(ZO_CPU_ISA), perturb, zo_update, grad_update};

}  // namespace

const KernelTable& ZO_ISA_CAT(kernels_, ZO_CPU_ISA)() { return kTable; }

}  // namespace zo::cpu
