// The fused perturbation op on CUDA: theta <- alpha * theta + sum_k c_k * z_k, in place
// (docs/rng.md). Host API only; no torch headers, so it builds with plain nvcc.
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

#include "../zo_rng.h"

namespace zo {

enum class ElemType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// Applies `terms` to every element of n_tensors contiguous device tensors that all hold
// `dtype`: tensor i has numels[i] elements at ptrs[i], and its element j has global index
// offsets[i] + j. Tensors with numels[i] == 0 are skipped. One kernel launch per 120
// tensors on `stream`; sm_count (the device's SM count) only sizes the grid.
// Returns cudaErrorInvalidValue for bad arguments (nothing launched), otherwise the
// first launch error (cudaGetLastError after each launch), otherwise cudaSuccess.
cudaError_t perturb_launch(ElemType dtype, void* const* ptrs, const int64_t* numels, const int64_t* offsets,
                           int n_tensors, const Terms& terms, Dist dist, int sm_count, cudaStream_t stream);

}  // namespace zo
