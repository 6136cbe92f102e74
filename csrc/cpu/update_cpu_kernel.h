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

// One group's stores: with stochastic rounding into a half tensor, each element's word.
template <typename T>
struct GroupStore {
  static constexpr bool kHalf = !std::is_same_v<T, float>;
  const Rounding rd;
  alignas(32) uint32_t bits[kGroup];

  GroupStore(const Rounding& rounding, int64_t group) : rd(rounding) {
    if (kHalf && rd.stochastic) rounding_group(rd, group, bits);
  }

  // Element at lane j (its global index is 128 * group + j).
  void operator()(float x, int64_t j, T& out) const {
    if (kHalf && rd.stochastic) {
      store_stochastic(x, bits[j], out);
    } else {
      store(x, out);
    }
  }
};

// The elements of one tensor in global groups [g0, g1): g = sum_k c_k z_k, theta += r z_last, rule.
template <Rule R, typename T>
void zo_update_groups(T* data, State s, int64_t numel, uint64_t base, const Terms& t, float restore,
                      const Hyper& h, Dist dist, const Rounding& rd, int64_t g0, int64_t g1) {
  alignas(32) float g[kGroup];
  alignas(32) float shift[kGroup];  // restore * z_last
  alignas(32) float z[kGroup];
  float scratch_m = 0.0f, scratch_v = 0.0f;
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
    const GroupStore<T> store_at(rd, grp);
    const int64_t lane0 = static_cast<int64_t>(e0 - group_start);
    const int64_t i0 = static_cast<int64_t>(e0 - base);
    const int64_t len = static_cast<int64_t>(e1 - e0);
    for (int64_t j = 0; j < len; ++j) {
      const int64_t i = i0 + j;
      float& m = rule_uses_m(R) ? s.m[i] : scratch_m;
      float& v = rule_uses_v(R) ? s.v[i] : scratch_v;
      const float theta = load(data[i]) + shift[lane0 + j];
      store_at(apply_rule<R>(h, theta, g[lane0 + j], m, v, 0.0f, nullptr), lane0 + j, data[i]);
    }
  }
}

// The elements of one tensor in global groups [g0, g1) with its gradient. Returns max |u| for
// kAdamMoments (which stores nothing into the parameter).
template <Rule R, typename T>
float grad_update_groups(T* data, const T* grad, State s, int64_t numel, uint64_t base, float scale,
                         const Hyper& h, const Rounding& rd, int64_t g0, int64_t g1) {
  float scratch_m = 0.0f, scratch_v = 0.0f, max_abs_u = 0.0f;
  for (int64_t grp = g0; grp < g1; ++grp) {
    const uint64_t group_start = static_cast<uint64_t>(grp) * kGroup;
    const uint64_t e0 = std::max(group_start, base);
    const uint64_t e1 = std::min(group_start + kGroup, base + numel);
    const GroupStore<T> store_at(R == Rule::kAdamMoments ? Rounding{} : rd, grp);
    const int64_t lane0 = static_cast<int64_t>(e0 - group_start);
    for (int64_t i = static_cast<int64_t>(e0 - base), end = static_cast<int64_t>(e1 - base); i < end; ++i) {
      float& m = rule_uses_m(R) ? s.m[i] : scratch_m;
      float& v = rule_uses_v(R) ? s.v[i] : scratch_v;
      float abs_u = 0.0f;
      const float g = rule_reads_grad(R) ? load(grad[i]) : 0.0f;
      const float theta = apply_rule<R>(h, load(data[i]), g, m, v, scale, &abs_u);
      if constexpr (R != Rule::kAdamMoments) {
        store_at(theta, lane0 + (i - static_cast<int64_t>(e0 - base)), data[i]);
      } else {
        max_abs_u = abs_u > max_abs_u || abs_u != abs_u ? abs_u : max_abs_u;  // NaN wins, as torch.max
      }
    }
  }
  return max_abs_u;
}

}  // namespace ZO_ISA_NAMESPACE
}  // namespace zo::cpu
