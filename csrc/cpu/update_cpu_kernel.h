// The CPU kernels of the fused optimizer updates (update_rules.h), free of torch headers.
// Both walk a tensor's 128-element groups of the global index space: zo_update_groups
// regenerates the directions of a group once per term, as perturb_groups does, then applies the
// rule element by element; grad_update_groups reads the gradient instead. State m, v is
// float32, or bfloat16 (StateGroup); theta is rounded once at the store, to nearest or
// stochastically (Rounding).
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

// theta[j] <- rule(theta[j], g[j], m[j], v[j]) for the n elements of one group (m and v: its
// float32 state, unused when the rule keeps none); |u| into abs_u (kAdamMoments). Arrays in,
// arrays out: the loop vectorises.
template <Rule R>
inline void apply_rule_n(const Hyper& h, float* theta, const float* g, float* pm, float* pv, int64_t n, float scale,
                         float* abs_u) {
  for (int64_t j = 0; j < n; ++j) {
    float m = 0.0f, v = 0.0f;
    if constexpr (rule_uses_m(R)) m = pm[j];
    if constexpr (rule_uses_v(R)) v = pv[j];
    theta[j] = apply_rule<R>(h, theta[j], g[j], m, v, scale, abs_u + j);
    if constexpr (rule_writes_m(R)) pm[j] = m;
    if constexpr (rule_writes_v(R)) pv[j] = v;
  }
}

// One group's m and v as the rule sees them, stored as S: float32 state is used in place;
// bfloat16 (lean) state is loaded into float32 scratch and stored back rounded with its own
// rounding words (state_rounding: independent of the parameters').
template <Rule R, typename S>
struct StateGroup {
  alignas(64) float m_buf[kGroup];
  alignas(64) float v_buf[kGroup];
  float* m = nullptr;
  float* v = nullptr;

  // The n elements from index i of the tensor's state.
  void load(State s, int64_t i, int64_t n) {
    if constexpr (std::is_same_v<S, float>) {
      if constexpr (rule_uses_m(R)) m = static_cast<float*>(s.m) + i;
      if constexpr (rule_uses_v(R)) v = static_cast<float*>(s.v) + i;
    } else {
      m = m_buf;
      v = v_buf;
      if constexpr (rule_uses_m(R)) load_n(static_cast<const S*>(s.m) + i, m_buf, n);
      if constexpr (rule_uses_v(R)) load_n(static_cast<const S*>(s.v) + i, v_buf, n);
    }
  }

  // Lean state back, for the elements of group grp from lane lane0 (words: scratch).
  void store(State s, int64_t i, int64_t n, const Rounding& rd, int64_t grp, int64_t lane0, uint32_t* words) {
    if constexpr (!std::is_same_v<S, float>) {
      if constexpr (rule_writes_m(R)) store_state(m_buf, static_cast<S*>(s.m) + i, n, state_rounding(rd, kStateStreamM),
                                                  grp, lane0, words);
      if constexpr (rule_writes_v(R)) store_state(v_buf, static_cast<S*>(s.v) + i, n, state_rounding(rd, kStateStreamV),
                                                  grp, lane0, words);
    }
  }

  static void store_state(const float* x, S* out, int64_t n, const Rounding& rd, int64_t grp, int64_t lane0,
                          uint32_t* words) {
    const uint32_t* r = rounding_words<S>(rd, grp, words);
    store_n(x, out, n, r == nullptr ? nullptr : r + lane0);
  }
};

// The elements of one tensor in global groups [g0, g1): g = sum_k c_k z_k, theta += r z_last, rule.
template <Rule R, typename T, typename S>
void zo_update_groups(T* data, State s, int64_t numel, uint64_t base, const Terms& t, float restore,
                      const Hyper& h, Dist dist, const Rounding& rd, int64_t g0, int64_t g1) {
  alignas(64) float g[kGroup];
  alignas(64) float shift[kGroup];  // restore * z_last
  alignas(64) float z[kGroup];
  alignas(64) float theta[kGroup];
  alignas(64) float unused[kGroup];
  alignas(64) uint32_t words[kGroup];
  StateGroup<R, S> state;
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
    // float32 theta is updated where it lies: the copies in and out cost a fifth of the pass.
    float* th = theta;
    if constexpr (std::is_same_v<T, float>) {
      th = data + i0;
    } else {
      load_n(data + i0, theta, len);
    }
    for (int64_t j = 0; j < len; ++j) th[j] += shift[lane0 + j];
    state.load(s, i0, len);
    apply_rule_n<R>(h, th, g + lane0, state.m, state.v, len, 0.0f, unused);
    if constexpr (!std::is_same_v<T, float>) {
      const uint32_t* r = rounding_words<T>(rd, grp, words);
      store_n(theta, data + i0, len, r == nullptr ? nullptr : r + lane0);
    }
    state.store(s, i0, len, rd, grp, lane0, words);
  }
}

// The elements of one tensor in global groups [g0, g1) with its gradient. Returns max |u| for
// kAdamMoments (which stores nothing into the parameter).
template <Rule R, typename T, typename S>
float grad_update_groups(T* data, const T* grad, State s, int64_t numel, uint64_t base, float scale,
                         const Hyper& h, const Rounding& rd, int64_t g0, int64_t g1) {
  alignas(64) float theta[kGroup];
  alignas(64) float g[kGroup];
  alignas(64) float abs_u[kGroup];
  alignas(64) uint32_t words[kGroup];
  StateGroup<R, S> state;
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
    state.load(s, i0, len);
    apply_rule_n<R>(h, theta, g, state.m, state.v, len, scale, abs_u);
    state.store(s, i0, len, rd, grp, lane0, words);
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
