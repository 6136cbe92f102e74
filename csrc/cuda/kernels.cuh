// Host API of the CUDA kernels (perturb_kernel.cu, zo_update_kernel.cu, grad_update_kernel.cu).
// No torch headers, so the kernels build with plain nvcc; the torch glue (*_cuda.cpp) calls these.
//
// Every launcher validates all its arguments before it launches anything and then returns
// cudaErrorInvalidValue (nothing launched, no memory touched); otherwise it returns the
// first launch error (cudaGetLastError after each launch), otherwise cudaSuccess. Tensors
// are contiguous device buffers; tensors with 0 elements are skipped. sm_count (the
// device's SM count) only sizes the grid.
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

#include "../update_rules.h"
#include "../zo_rng.h"

namespace zo {

enum class ElemType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// The fused perturbation out <- alpha * theta + sum_k c_k * z_k (docs/rng.md), on n_tensors
// tensors that all hold `dtype`: tensor i has numels[i] elements at ptrs[i], written to outs[i]
// (ptrs[i] itself in place), and its element j has global index offsets[i] + j. One kernel
// launch per 99 tensors on `stream`.
cudaError_t perturb_launch(ElemType dtype, const void* const* ptrs, void* const* outs, const int64_t* numels,
                           const int64_t* offsets, int n_tensors, const Terms& terms, Dist dist, int sm_count,
                           cudaStream_t stream);

// One tensor of an optimizer update (update_rules.h): a parameter and its state, float32 or
// bfloat16 (the lean state: stored back with state_rounding's words, zo_rng.h).
struct UpdateTensor {
  void* param;       // numel elements of dtype, updated in place
  const void* grad;  // grad_update_: numel elements of dtype; zo_update_: unused
  void* m;           // numel elements of state when the rule uses m (rule_uses_m), else unused
  void* v;           // numel elements of state when the rule uses v (rule_uses_v), else unused
  int64_t numel;
  int64_t offset;    // global index of element 0 (the directions' and the rounding words')
  ElemType dtype;    // the tensors of one call may mix dtypes
  ElemType state;    // m's and v's: kFloat32 or kBFloat16
};

// zo_update_: per element, theta = param + restore * z_last, g = sum_k c_k z_k (k in order,
// from 0), then apply_rule<rule>; theta is stored with one rounding (rd's). terms.alpha is
// ignored. rule: a zeroth-order one (rule_zeroth_order). Launches per dtype, state dtype and 81 tensors.
cudaError_t zo_update_launch(const UpdateTensor* tensors, int n_tensors, const Terms& terms, Dist dist,
                             float restore, Rule rule, const Hyper& hyper, const Rounding& rd, int sm_count,
                             cudaStream_t stream);

// grad_update_: per element, apply_rule<rule>(param, grad, m, v). scales holds one float per
// tensor (n_tensors, tensor i's at scales[i]) for kAdamMoments, which overwrites it with
// max |u| over the tensor (0 for an empty one) and leaves params unchanged, and for
// kQuantized, which reads it; other rules ignore it. Launches per dtype, state dtype and 62 tensors.
cudaError_t grad_update_launch(const UpdateTensor* tensors, int n_tensors, float* scales, Rule rule,
                               const Hyper& hyper, const Rounding& rd, int sm_count, cudaStream_t stream);

}  // namespace zo
