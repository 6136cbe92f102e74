// Multi-tensor zeroth-order optimizer update (update_rules.h, docs/rng.md), no torch. Per element
// e of a parameter with state m, v (float32, or bfloat16 loaded to float32 and stored back
// rounded with state_rounding's words):
//   theta = param + restore * z_last(e),  g = 0 + c_0 z_0(e) + ... + c_{K-1} z_{K-1}(e),
//   param <- apply_rule<R>(theta, g, m, v), rounded once to the param's dtype.
// Directions are regenerated per tile into shared memory (rng_tile.cuh), as in perturb_kernel.cu;
// the state is loaded with the parameter before the random numbers are generated.
#include <cuda_runtime.h>

#include <cstdint>

#include "../update_rules.h"
#include "kernels.cuh"
#include "multi_tensor.cuh"
#include "rng_tile.cuh"

namespace zo {
namespace {

using namespace mt;

template <typename T, Dist D, Rule R, typename S>
struct ZoUpdate {
  static constexpr int kPtrs = 3;  // param, m, v
  Terms terms;
  Hyper h;
  Rounding rd;
  float restore;

  __device__ __forceinline__ void operator()(const Tile<kPtrs>& t) const {
    T* const p = t.at<T>(0);
    S* const pm = rule_uses_m(R) ? t.at<S>(1) : nullptr;  // null when the rule keeps no m
    S* const pv = rule_uses_v(R) ? t.at<S>(2) : nullptr;
    Run<T> x[kRuns];
    Run<S> m[kRuns], v[kRuns];
    load_tile(x, p, t.n, t.vec(0));
    if (rule_uses_m(R)) load_tile(m, pm, t.n, t.vec(1));
    if (rule_uses_v(R)) load_tile(v, pv, t.n, t.vec(2));

    if constexpr (D == Dist::kRademacher) {
      const RademacherWords w = rademacher_words(t, terms);
#pragma unroll
      for (int r = 0; r < kRuns; ++r) {
        const int j0 = run_start(r);
        if (j0 >= t.n) continue;
        const uint64_t e = t.G + j0;
        float g[kRun], theta[kRun];
#pragma unroll
        for (int j = 0; j < kRun; ++j) g[j] = 0.0f;
        w.add_terms(terms, e, g);
        const uint32_t last = w.bits(terms.count - 1, e);
#pragma unroll
        for (int j = 0; j < kRun; ++j) theta[j] = to_float(x[r].v[j]) + signed_coef(restore, (last >> j) & 1u);
        apply(x[r], m[r], v[r], theta, g, e);
      }
    } else {
      const GaussianNormals z = gaussian_normals(t);
      float g[kRuns][kRun], theta[kRuns][kRun];
#pragma unroll
      for (int r = 0; r < kRuns; ++r) {
#pragma unroll
        for (int j = 0; j < kRun; ++j) g[r][j] = 0.0f;
      }
      // Not unrolled: one copy of the Box-Muller code keeps the kernel small.
#pragma unroll 1
      for (int k = 0; k < terms.count; ++k) {
        z.fill(terms.seed, terms.stream[k]);
        const float c = terms.coef[k];
        const bool last = k == terms.count - 1;
#pragma unroll
        for (int r = 0; r < kRuns; ++r) {
          const int j0 = run_start(r);
          if (j0 >= t.n) continue;
#pragma unroll
          for (int j = 0; j < kRun; ++j) {
            const float zj = z.at(j0 + j);
            g[r][j] = add_term(g[r][j], c, zj);
            if (last) theta[r][j] = add_term(to_float(x[r].v[j]), restore, zj);
          }
        }
        z.release();
      }
#pragma unroll
      for (int r = 0; r < kRuns; ++r) {
        if (run_start(r) >= t.n) continue;
        apply(x[r], m[r], v[r], theta[r], g[r], t.G + run_start(r));
      }
    }

    store_tile(p, x, t.n, t.vec(0));
    if (rule_writes_m(R)) store_tile(pm, m, t.n, t.vec(1));
    if (rule_writes_v(R)) store_tile(pv, v, t.n, t.vec(2));
  }

  // One run from global index e: the rule on every element (those past the tensor's end compute
  // garbage, never stored), rounded once; lean state with its own rounding words.
  __device__ __forceinline__ void apply(Run<T>& x, Run<S>& m, Run<S>& v, const float (&theta)[kRun],
                                        const float (&g)[kRun], uint64_t e) const {
    float a[kRun], mf[kRun], vf[kRun];
#pragma unroll
    for (int j = 0; j < kRun; ++j) {
      mf[j] = to_float(m.v[j]);
      vf[j] = to_float(v.v[j]);
      a[j] = apply_rule<R>(h, theta[j], g[j], mf[j], vf[j], 0.0f, nullptr);
    }
    round_run(x, a, rd, e);
    if constexpr (rule_writes_m(R)) round_run(m, mf, state_rounding(rd, kStateStreamM), e);
    if constexpr (rule_writes_v(R)) round_run(v, vf, state_rounding(rd, kStateStreamV), e);
  }
};

static_assert(BatchOf<ZoUpdate<float, Dist::kGaussian, Rule::kAdam, float>>::kCap == 81, "tensors per launch, as kernels.cuh says");

}  // namespace

cudaError_t zo_update_launch(const UpdateTensor* tensors, int n_tensors, const Terms& terms, Dist dist,
                             float restore, Rule rule, const Hyper& hyper, const Rounding& rd, int sm_count,
                             cudaStream_t stream) {
  if (n_tensors < 0 || !valid_terms(terms, dist) || !rule_valid(rule) || !rule_zeroth_order(rule)) {
    return cudaErrorInvalidValue;
  }
  // Validate everything before launching anything: global indices must stay below 2^63.
  for (int i = 0; i < n_tensors; ++i) {
    const UpdateTensor& u = tensors[i];
    if (u.numel < 0 || u.offset < 0 || u.numel > INT64_MAX - u.offset || !valid_elem_type(u.dtype) ||
        (u.state != ElemType::kFloat32 && u.state != ElemType::kBFloat16) ||
        (u.numel > 0 && (u.param == nullptr || (rule_uses_m(rule) && u.m == nullptr) ||
                         (rule_uses_v(rule) && u.v == nullptr)))) {
      return cudaErrorInvalidValue;
    }
  }
  for (const ElemType dtype : {ElemType::kFloat32, ElemType::kBFloat16, ElemType::kFloat16}) {
    for (const ElemType state : {ElemType::kFloat32, ElemType::kBFloat16}) {
      const cudaError_t err = with_elem_type(dtype, [&](auto type) {
        using T = typename decltype(type)::type;
        return with_dist(dist, [&](auto d) {
          constexpr Dist D = decltype(d)::value;  // here: inside the next lambda d is a captured reference
          return with_rule(rule, [&](auto r) -> cudaError_t {
            constexpr Rule R = decltype(r)::value;
            if constexpr (!rule_zeroth_order(R)) {
              return cudaErrorInvalidValue;  // not instantiated: the rules that need a gradient
            } else {
              return with_state_type<R>(state, [&](auto state_type) {
                using S = typename decltype(state_type)::type;
                return launch_tensors(
                    ZoUpdate<T, D, R, S>{terms, hyper, rd, restore}, n_tensors,
                    [&](int i, void** p, int64_t& base) -> int64_t {
                      const UpdateTensor& u = tensors[i];
                      if (u.dtype != dtype || u.state != state) return 0;
                      p[0] = u.param;
                      p[1] = u.m;
                      p[2] = u.v;
                      base = u.offset;
                      return u.numel;
                    },
                    sm_count, stream);
              });
            }
          });
        });
      });
      if (err != cudaSuccess) return err;
    }
  }
  return cudaSuccess;
}

}  // namespace zo
