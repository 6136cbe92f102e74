// The boundary between the torch glue (compiled once, for any x86-64) and the CPU kernels,
// which kernels_isa.cpp compiles once per instruction set (setup.py; the flags are in
// isa_flags.json): each build fills one KernelTable, and capability.cpp picks the table the
// processor can run. Torch-free, plain types only, so every build sees the same layout.
#pragma once

#include <stdint.h>

#include "../update_rules.h"
#include "../zo_rng.h"

namespace zo::cpu {

enum class DType : int { kFloat, kBFloat16, kHalf };

// Where one tensor's rule state lives (null where the rule keeps none), as float32 or as bfloat16
// (the lean state, stored with its own rounding words: zo_rng.h's state_rounding).
struct State {
  void* m;
  void* v;
  DType dtype;  // kFloat or kBFloat16
};

// Groups are numbered by global index: group g holds elements [128 g, 128 g + 128).
constexpr int64_t kGroup = kRademacherPerBlock;
inline int64_t first_group(uint64_t base) { return static_cast<int64_t>(base / kGroup); }
inline int64_t end_group(uint64_t base, int64_t numel) {
  return numel == 0 ? first_group(base) : static_cast<int64_t>((base + numel - 1) / kGroup) + 1;
}

// One build's kernels, each over the elements of one tensor (numel, global offset base) that
// fall in global groups [g0, g1); the tensor's data as `dtype`.
struct KernelTable {
  const char* name;
  // dst <- alpha src + sum_k c_k z_k (dst == src in place).
  void (*perturb)(DType dtype, const void* src, void* dst, int64_t numel, uint64_t base, const Terms& terms,
                  Dist dist, int64_t g0, int64_t g1);
  // theta <- rule(theta + restore z_last, g = sum_k c_k z_k, m, v); zeroth-order rules only.
  void (*zo_update)(Rule rule, DType dtype, void* data, State state, int64_t numel, uint64_t base,
                    const Terms& terms, float restore, const Hyper& hyper, Dist dist, const Rounding& rounding,
                    int64_t g0, int64_t g1);
  // theta <- rule(theta, grad, m, v); returns max |u| for kAdamMoments (0 otherwise).
  float (*grad_update)(Rule rule, DType dtype, void* data, const void* grad, State state, int64_t numel,
                       uint64_t base, float scale, const Hyper& hyper, const Rounding& rounding, int64_t g0,
                       int64_t g1);
};

// Each build's table (kernels_isa.cpp), lowest instruction set first; capability.cpp lists them.
const KernelTable& kernels_generic();
const KernelTable& kernels_avx2();
const KernelTable& kernels_avx512();
const KernelTable& kernels_avx512_bf16();

}  // namespace zo::cpu
