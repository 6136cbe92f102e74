// Multi-tensor first-order optimizer update (update_rules.h), no torch. Per element of a
// parameter with its gradient (same dtype) and state m, v (float32, or bfloat16 loaded to float32
// and stored back rounded with state_rounding's words):
//   param <- apply_rule<R>(param, grad, m, v, scale), rounded once to the param's dtype.
// kAdamMoments leaves the parameter unchanged and reduces max |u| over each tensor into
// scales[i] (zeroed first, then atomicMax on the float bits); kQuantized reads scales[i].
#include <cuda_runtime.h>

#include <cstdint>

#include "../update_rules.h"
#include "kernels.cuh"
#include "multi_tensor.cuh"

namespace zo {
namespace {

using namespace mt;

template <typename T, Rule R, typename S>
struct GradUpdate {
  static constexpr int kPtrs = 5;  // param, grad, m, v, &scales[i]
  Hyper h;
  Rounding rd;

  __device__ __forceinline__ void operator()(const Tile<kPtrs>& t) const {
    T* const p = t.at<T>(0);
    const T* const pg = t.at<const T>(1);
    S* const pm = rule_uses_m(R) ? t.at<S>(2) : nullptr;  // null when the rule keeps no m
    S* const pv = rule_uses_v(R) ? t.at<S>(3) : nullptr;
    Run<T> x[kRuns], gr[kRuns];
    Run<S> m[kRuns], v[kRuns];
    if (R != Rule::kAdamMoments) load_tile(x, p, t.n, t.vec(0));  // which neither reads nor writes it
    if (rule_reads_grad(R)) load_tile(gr, pg, t.n, t.vec(1));
    if (rule_uses_m(R)) load_tile(m, pm, t.n, t.vec(2));
    if (rule_uses_v(R)) load_tile(v, pv, t.n, t.vec(3));
    const float scale = R == Rule::kQuantized ? *static_cast<const float*>(t.ptr[4]) : 0.0f;

    // kAdamMoments: max |u| of this thread's elements as float bits; |u| >= 0 (or a NaN, whose
    // bits exceed inf's), so unsigned order is float order and a NaN wins, as in torch.max.
    uint32_t max_bits = 0;
#pragma unroll
    for (int r = 0; r < kRuns; ++r) {
      const int j0 = run_start(r);
      if (j0 >= t.n) continue;
      float a[kRun], mf[kRun], vf[kRun];
#pragma unroll
      for (int j = 0; j < kRun; ++j) {
        const float theta0 = R == Rule::kAdamMoments ? 0.0f : to_float(x[r].v[j]);
        const float g = rule_reads_grad(R) ? to_float(gr[r].v[j]) : 0.0f;
        float abs_u = 0.0f;
        mf[j] = to_float(m[r].v[j]);
        vf[j] = to_float(v[r].v[j]);
        a[j] = apply_rule<R>(h, theta0, g, mf[j], vf[j], scale, &abs_u);
        if constexpr (R == Rule::kAdamMoments) {
          if (j0 + j < t.n) max_bits = max(max_bits, float_bits(abs_u));  // elements past the end are garbage
        }
      }
      if constexpr (R != Rule::kAdamMoments) round_run(x[r], a, rd, t.G + j0);
      if constexpr (rule_writes_m(R)) round_run(m[r], mf, state_rounding(rd, kStateStreamM), t.G + j0);
      if constexpr (rule_writes_v(R)) round_run(v[r], vf, state_rounding(rd, kStateStreamV), t.G + j0);
    }

    if constexpr (R == Rule::kAdamMoments) {
      // One atomic per warp; scales[i] was zeroed before the launch, so zeros need none.
#pragma unroll
      for (int lane = 16; lane > 0; lane >>= 1) max_bits = max(max_bits, __shfl_xor_sync(0xFFFFFFFFu, max_bits, lane));
      if ((threadIdx.x & 31u) == 0 && max_bits != 0) atomicMax(static_cast<unsigned*>(t.ptr[4]), max_bits);
    } else {
      store_tile(p, x, t.n, t.vec(0));
    }
    if (rule_writes_m(R)) store_tile(pm, m, t.n, t.vec(2));
    if (rule_writes_v(R)) store_tile(pv, v, t.n, t.vec(3));
  }
};

static_assert(BatchOf<GradUpdate<float, Rule::kAdam, float>>::kCap == 62, "tensors per launch, as kernels.cuh says");

}  // namespace

cudaError_t grad_update_launch(const UpdateTensor* tensors, int n_tensors, float* scales, Rule rule,
                               const Hyper& hyper, const Rounding& rd, int sm_count, cudaStream_t stream) {
  const bool uses_scales = rule_writes_scales(rule) || rule_reads_scales(rule);
  if (n_tensors < 0 || !rule_valid(rule) ||
      (uses_scales && n_tensors > 0 && scales == nullptr)) {
    return cudaErrorInvalidValue;
  }
  // Validate everything before touching anything.
  for (int i = 0; i < n_tensors; ++i) {
    const UpdateTensor& u = tensors[i];
    if (u.numel < 0 || u.offset < 0 || u.numel > INT64_MAX - u.offset || !valid_elem_type(u.dtype) ||
        (u.state != ElemType::kFloat32 && u.state != ElemType::kBFloat16) ||
        (u.numel > 0 && (u.param == nullptr || (rule_reads_grad(rule) && u.grad == nullptr) ||
                         (rule_uses_m(rule) && u.m == nullptr) ||
                         (rule_uses_v(rule) && u.v == nullptr)))) {
      return cudaErrorInvalidValue;
    }
  }
  if (rule_writes_scales(rule) && n_tensors > 0) {
    // Overwritten, not maxed with the old values; empty tensors keep 0.
    const cudaError_t err = cudaMemsetAsync(scales, 0, sizeof(float) * static_cast<size_t>(n_tensors), stream);
    if (err != cudaSuccess) return err;
  }
  for (const ElemType dtype : {ElemType::kFloat32, ElemType::kBFloat16, ElemType::kFloat16}) {
    for (const ElemType state : {ElemType::kFloat32, ElemType::kBFloat16}) {
      const cudaError_t err = with_elem_type(dtype, [&](auto type) {
        using T = typename decltype(type)::type;
        return with_rule(rule, [&](auto r) {
          constexpr Rule R = decltype(r)::value;
          return with_state_type<R>(state, [&](auto state_type) {
            using S = typename decltype(state_type)::type;
            return launch_tensors(
                GradUpdate<T, R, S>{hyper, rd}, n_tensors,
                [&](int i, void** p, int64_t& base) -> int64_t {
                  const UpdateTensor& u = tensors[i];
                  if (u.dtype != dtype || u.state != state) return 0;
                  p[0] = u.param;
                  p[1] = const_cast<void*>(u.grad);  // only read
                  p[2] = u.m;
                  p[3] = u.v;
                  p[4] = uses_scales ? scales + i : nullptr;
                  base = u.offset;
                  return u.numel;
                },
                sm_count, stream);
          });
        });
      });
      if (err != cudaSuccess) return err;
    }
  }
  return cudaSuccess;
}

}  // namespace zo
