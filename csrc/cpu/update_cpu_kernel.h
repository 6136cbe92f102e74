// The CPU kernels of the fused optimizer updates (update_rules.h), free of torch headers.
// Both walk a tensor's 128-element groups of the global index space: zo_update_groups
// regenerates the directions of a group once per term, as perturb_groups does, then applies the
// rule element by element; grad_update_groups reads the gradient instead. State m, v is
// float32; theta is rounded once at the store, to nearest or stochastically (Rounding).
#pragma once

#include <stdint.h>

#include <algorithm>
#include <type_traits>

#include "../update_rules.h"
#include "perturb_cpu_kernel.h"

namespace zo::cpu {
inline namespace ZO_ISA_NAMESPACE {

// The rounding words of group grp when theta is stored stochastically into a half tensor (null:
// rounded to nearest), in `words`.
template <typename T>
inline const uint32_t* rounding_words(const Rounding& rd, int64_t grp, uint32_t* words) {
  if (std::is_same_v<T, float> || !rd.stochastic) return nullptr;
  rounding_group(rd, grp, words);
  return words;
}

// theta[j] <- rule(theta[j], g[j], state) for the n elements of one group whose state starts at
// index i of m and v; |u| into abs_u (kAdamMoments). Arrays in, arrays out: the loop vectorises.
template <Rule R>
inline void apply_rule_n(const Hyper& h, float* theta, const float* g, State s, int64_t i, int64_t n, float scale,
                         float* abs_u) {
  for (int64_t j = 0; j < n; ++j) {
    float m = 0.0f, v = 0.0f;
    if constexpr (rule_uses_m(R)) m = s.m[i + j];
    if constexpr (rule_uses_v(R)) v = s.v[i + j];
    theta[j] = apply_rule<R>(h, theta[j], g[j], m, v, scale, abs_u + j);
    if constexpr (rule_writes_m(R)) s.m[i + j] = m;
    if constexpr (rule_writes_v(R)) s.v[i + j] = v;
  }
}

// The elements of one tensor in global groups [g0, g1): g = sum_k c_k z_k, theta += r z_last, rule.
template <Rule R, typename T>
void zo_update_groups(T* data, State s, int64_t numel, uint64_t base, const Terms& t, float restore,
                      const Hyper& h, Dist dist, const Rounding& rd, int64_t g0, int64_t g1) {
  alignas(64) float g[kGroup];
  alignas(64) float shift[kGroup];  // restore * z_last
  alignas(64) float z[kGroup];
  alignas(64) float theta[kGroup];
  alignas(64) float unused[kGroup];
  alignas(64) uint32_t words[kGroup];
  SignWords signs[kMaxTerms];
  for (int64_t grp = g0; grp < g1; ++grp) {
    const uint64_t group_start = static_cast<uint64_t>(grp) * kGroup;
    const uint64_t e0 = std::max(group_start, base);
    const uint64_t e1 = std::min(group_start + kGroup, base + numel);
    for (int j = 0; j < kGroup; ++j) g[j] = 0.0f;
    for (int k = 0; k < t.count; ++k) {
      const bool last = k == t.count - 1;
      if (dist == Dist::kRademacher) {
        const Words r = signs[k].at(t.seed, t.stream[k], grp);
        for (int q = 0; q < 4; ++q) {
          for (uint32_t b = 0; b < 32; ++b) g[32 * q + b] += signed_coef(t.coef[k], (r.w[q] >> b) & 1u);
          if (last) {
            for (uint32_t b = 0; b < 32; ++b) shift[32 * q + b] = signed_coef(restore, (r.w[q] >> b) & 1u);
          }
        }
      } else {
        gaussian_group(t.seed, grp, t.stream[k], z);
        for (int j = 0; j < kGroup; ++j) g[j] = add_term(g[j], t.coef[k], z[j]);
        if (last) {
          for (int j = 0; j < kGroup; ++j) shift[j] = restore * z[j];
        }
      }
    }
    const int64_t lane0 = static_cast<int64_t>(e0 - group_start);
    const int64_t i0 = static_cast<int64_t>(e0 - base);
    const int64_t len = static_cast<int64_t>(e1 - e0);
    load_n(data + i0, theta, len);
    for (int64_t j = 0; j < len; ++j) theta[j] += shift[lane0 + j];
    apply_rule_n<R>(h, theta, g + lane0, s, i0, len, 0.0f, unused);
    const uint32_t* r = rounding_words<T>(rd, grp, words);
    store_n(theta, data + i0, len, r == nullptr ? nullptr : r + lane0);
  }
}

// The elements of one tensor in global groups [g0, g1) with its gradient. Returns max |u| for
// kAdamMoments (which stores nothing into the parameter).
template <Rule R, typename T>
float grad_update_groups(T* data, const T* grad, State s, int64_t numel, uint64_t base, float scale,
                         const Hyper& h, const Rounding& rd, int64_t g0, int64_t g1) {
  alignas(64) float theta[kGroup];
  alignas(64) float g[kGroup];
  alignas(64) float abs_u[kGroup];
  alignas(64) uint32_t words[kGroup];
  float max_abs_u = 0.0f;
  for (int j = 0; j < kGroup; ++j) g[j] = 0.0f;
  for (int64_t grp = g0; grp < g1; ++grp) {
    const uint64_t group_start = static_cast<uint64_t>(grp) * kGroup;
    const uint64_t e0 = std::max(group_start, base);
    const uint64_t e1 = std::min(group_start + kGroup, base + numel);
    const int64_t lane0 = static_cast<int64_t>(e0 - group_start);
    const int64_t i0 = static_cast<int64_t>(e0 - base);
    const int64_t len = static_cast<int64_t>(e1 - e0);
    load_n(data + i0, theta, len);
    if constexpr (rule_reads_grad(R)) load_n(grad + i0, g, len);
    apply_rule_n<R>(h, theta, g, s, i0, len, scale, abs_u);
    if constexpr (R != Rule::kAdamMoments) {
      const uint32_t* r = rounding_words<T>(rd, grp, words);
      store_n(theta, data + i0, len, r == nullptr ? nullptr : r + lane0);
    } else {
      for (int64_t j = 0; j < len; ++j) {  // NaN wins, as in torch.max
        max_abs_u = abs_u[j] > max_abs_u || abs_u[j] != abs_u[j] ? abs_u[j] : max_abs_u;
      }
    }
  }
  return max_abs_u;
}

}  // namespace ZO_ISA_NAMESPACE
}  // namespace zo::cpu
