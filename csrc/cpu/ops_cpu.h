// The CPU kernels of the registered ops (zounlearn/ops/library.py), registered for the CPU
// dispatch key by module_cpu.cpp, and what their torch glue shares. The glue is compiled once;
// it calls the kernels of the build capability.h chose through its KernelTable.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

#include "../op_args.h"
#include "capability.h"
#include "kernel_table.h"
#include "parallel_groups.h"

namespace zo::cpu {

ZO_DECLARE_OP_KERNELS

// Threads this module's at::parallel_for really uses (1 when built without OpenMP).
int parallel_threads();

// The kernels' storage type of a checked parameter (float32, bfloat16 or float16).
inline DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat;
    case at::kBFloat16: return DType::kBFloat16;
    default: return DType::kHalf;
  }
}

// params[i], checked for the raw pointers: a contiguous CPU tensor of a supported dtype whose
// global indices offsets[i] .. offsets[i] + numel - 1 lie in [0, 2^63).
inline void check_param_at(const at::Tensor& t, int64_t offset, const char* op, size_t i) {
  check_param(t, c10::Device(c10::kCPU), op, i);
  TORCH_CHECK(offset >= 0 && t.numel() <= INT64_MAX - offset, op, ": params[", i,
              "]: global indices must lie in [0, 2^63)");
}

// The parameters, checked, and the global 128-element groups each one covers.
inline GroupRanges checked_groups(at::TensorList params, at::IntArrayRef offsets, const char* op) {
  GroupRanges ranges;
  for (size_t i = 0; i < params.size(); ++i) {
    check_param_at(params[i], offsets[i], op, i);
    const auto base = static_cast<uint64_t>(offsets[i]);
    const int64_t first = first_group(base);
    ranges.add(i, first, params[i].numel() == 0 ? 0 : end_group(base, params[i].numel()) - first);
  }
  return ranges;
}

}  // namespace zo::cpu
