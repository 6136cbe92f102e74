// Element math of the fused optimizer updates (docs/optimizers.md), compiled for the host
// by the CPU op and for the device by the CUDA op. No torch headers here.
//
// Every rule maps (theta, g, m, v) of one element to new values in float32, one IEEE
// operation at a time in the order written (no fused multiply-add: the CPU op builds with
// -ffp-contract=off, the CUDA op with --fmad=false, Triton with enable_fp_fusion=False),
// so the pure-PyTorch reference (zounlearn/ops/reference.py) computes the same bits.
// Compound scalars (1 - beta1, bias corrections, ...) arrive precomputed in float32.
#pragma once

#include <string.h>

#include <type_traits>

#include "zo_rng.h"

namespace zo {

// The registry of update rules, in zounlearn/ops/rules.py's order (tests/test_update_ops.py checks
// the compiled table against it): X(enumerator, schema name, reads m, reads v, writes m, writes v,
// zeroth-order). Everything below that depends on the rule derives from this table.
#define ZO_UPDATE_RULES(X)                       \
  X(kSgd, "sgd", 1, 0, 1, 0, 1)                  \
  X(kSign, "sign", 0, 0, 0, 0, 1)                \
  X(kAdam, "adam", 1, 1, 1, 1, 1)                \
  X(kAdaZo, "adazo", 1, 1, 1, 1, 1)              \
  X(kSignAdam, "sign_adam", 1, 0, 1, 0, 1)       \
  X(kAdamMoments, "adam_moments", 1, 1, 1, 1, 0) \
  X(kQuantized, "quantized", 1, 1, 0, 0, 0)      \
  X(kSophia, "sophia", 1, 1, 1, 0, 0)            \
  X(kDescent, "descent", 0, 0, 0, 0, 1)
// kSgd: momentum SGD, coupled weight decay (torch.optim.SGD, dampening 0); kSign: sign descent;
// kAdam: AdamW; kAdaZo: R-AdaZO (v tracks m^2, no bias correction); kSignAdam: Signum;
// kAdamMoments / kQuantized: compressed Adam's two passes (moments and max |u| per tensor, then
// theta -= lr Q(u; levels)); kSophia: SophiaG's clipped m / (rho h + eps), h kept in v;
// kDescent: plain descent theta = decay theta - lr g (ZO-SGD without momentum, coupled decay in decay).

enum class Rule : int {
#define ZO_RULE_ENUMERATOR(e, ...) e,
  ZO_UPDATE_RULES(ZO_RULE_ENUMERATOR)
#undef ZO_RULE_ENUMERATOR
};

#define ZO_RULE_COUNT(...) +1
constexpr int kRules = 0 ZO_UPDATE_RULES(ZO_RULE_COUNT);
#undef ZO_RULE_COUNT

ZO_HD constexpr bool rule_valid(Rule r) { return static_cast<int>(r) >= 0 && static_cast<int>(r) < kRules; }

struct RuleTraits {
  bool reads_m, reads_v, writes_m, writes_v, zeroth_order;
};

ZO_HD constexpr RuleTraits rule_traits(Rule r) {
  switch (r) {
#define ZO_RULE_TRAITS_CASE(e, name, rm, rv, wm, wv, zo) \
  case Rule::e:                                          \
    return RuleTraits{rm != 0, rv != 0, wm != 0, wv != 0, zo != 0};
    ZO_UPDATE_RULES(ZO_RULE_TRAITS_CASE)
#undef ZO_RULE_TRAITS_CASE
  }
  return RuleTraits{false, false, false, false, false};
}

// Which state tensors a rule reads or writes.
ZO_HD constexpr bool rule_uses_m(Rule r) { return rule_traits(r).reads_m || rule_traits(r).writes_m; }
ZO_HD constexpr bool rule_uses_v(Rule r) { return rule_traits(r).reads_v || rule_traits(r).writes_v; }
ZO_HD constexpr bool rule_writes_m(Rule r) { return rule_traits(r).writes_m; }
ZO_HD constexpr bool rule_writes_v(Rule r) { return rule_traits(r).writes_v; }
ZO_HD constexpr bool rule_zeroth_order(Rule r) { return rule_traits(r).zeroth_order; }

// Compressed Adam's passes share one max |u| per tensor: written by the first, read by the second.
ZO_HD constexpr bool rule_writes_scales(Rule r) { return r == Rule::kAdamMoments; }
ZO_HD constexpr bool rule_reads_scales(Rule r) { return r == Rule::kQuantized; }
// kQuantized uses the moments the first pass left; it needs no gradient.
ZO_HD constexpr bool rule_reads_grad(Rule r) { return r != Rule::kQuantized; }

// The rule a schema name denotes (host only); false for an unknown name.
inline bool rule_from_name(const char* name, size_t length, Rule* out) {
#define ZO_RULE_NAME_CASE(e, n, ...)                                          \
  if (length == sizeof(n) - 1 && strncmp(name, n, length) == 0) {             \
    *out = Rule::e;                                                           \
    return true;                                                              \
  }
  ZO_UPDATE_RULES(ZO_RULE_NAME_CASE)
#undef ZO_RULE_NAME_CASE
  return false;
}

// Calls fn(std::integral_constant<Rule, R>{}) for the runtime rule r, which must be a valid
// enumerator; every rule instantiates fn, so fn skips what it does not support with if constexpr.
template <typename F>
auto with_rule(Rule r, const F& fn) -> decltype(fn(std::integral_constant<Rule, Rule::kSgd>{})) {
  switch (r) {
#define ZO_RULE_DISPATCH_CASE(e, ...) \
  case Rule::e:                       \
    return fn(std::integral_constant<Rule, Rule::e>{});
    ZO_UPDATE_RULES(ZO_RULE_DISPATCH_CASE)
#undef ZO_RULE_DISPATCH_CASE
  }
  return fn(std::integral_constant<Rule, Rule::kSgd>{});  // unreachable for a valid r
}

// The rules' scalars, in zounlearn/ops/rules.py Hyper's order, which is also the order of the
// ops' schema arguments (tests/test_update_ops.py checks the names): X(field).
#define ZO_HYPER_FIELDS(X)                                                              \
  X(lr)                                                                                 \
  X(decay)        /* 1 - lr * weight_decay (decoupled rules); 1 for kSgd */             \
  X(weight_decay) /* coupled weight decay (kSgd only) */                                \
  X(beta1)        /* also the momentum of kSgd */                                       \
  X(one_minus_beta1)                                                                    \
  X(beta2)                                                                              \
  X(one_minus_beta2)                                                                    \
  X(eps)                                                                                \
  X(bias_correction1)      /* 1 - beta1^t (kAdam, kAdamMoments, kQuantized) */          \
  X(sqrt_bias_correction2) /* sqrt(1 - beta2^t) */                                      \
  X(levels)                /* kQuantized: 2^(bits-1) - 1; 0 means sign */               \
  X(rho)                   /* kSophia */

// Hyperparameters of one call, float32.
struct Hyper {
#define ZO_HYPER_MEMBER(name) float name;
  ZO_HYPER_FIELDS(ZO_HYPER_MEMBER)
#undef ZO_HYPER_MEMBER
};

// torch.sign for finite x, without a branch; NaN gives 0.
ZO_HD float sign_of(float x) { return static_cast<float>(x > 0.0f) - static_cast<float>(x < 0.0f); }

// Round half to even for |x| < 2^22 (quantizer levels are far smaller): adding and
// subtracting 1.5 * 2^23 rounds x to an integer in the default rounding mode. Without
// fast-math no compiler folds the pair, and every backend gets the same bits.
ZO_HD float round_even(float x) {
  const float magic = 12582912.0f;
  return (x + magic) - magic;
}

// torch.clamp(x, -1, 1): NaN stays NaN (fminf/fmaxf would drop it).
ZO_HD float clamp_unit(float x) { return x < -1.0f ? -1.0f : (x > 1.0f ? 1.0f : x); }

// Adam's update direction with torch's bias correction: (m / bc1) / (sqrt(v) / sqrt(bc2) + eps).
ZO_HD float adam_direction(const Hyper& h, float m, float v) {
  return (m / h.bias_correction1) / (sqrtf(v) / h.sqrt_bias_correction2 + h.eps);
}

// Q(u; levels) with scale = max |u| over the tensor: levels == 0 is sign(u); otherwise
// scale * round(u / scale * levels) / levels, and 0 for an all-zero tensor.
ZO_HD float quantize(float u, float scale, float levels) {
  if (levels == 0.0f) return sign_of(u);
  if (!(scale > 0.0f)) return 0.0f;
  return round_even(u / scale * levels) / levels * scale;
}

// One element: theta is the current value (in float32, any restore already added), g its
// gradient or gradient estimate; m and v are updated in place when the rule uses them.
// Returns the new theta. kAdamMoments returns theta unchanged and puts |u| in *out_abs_u.
template <Rule R>
ZO_HD float apply_rule(const Hyper& h, float theta, float g, float& m, float& v, float scale, float* out_abs_u) {
  if constexpr (R == Rule::kSgd) {
    g = g + h.weight_decay * theta;
    m = h.beta1 * m + g;
    return theta - h.lr * m;
  } else if constexpr (R == Rule::kSign) {
    return h.decay * theta - h.lr * sign_of(g);
  } else if constexpr (R == Rule::kAdam) {
    m = h.beta1 * m + h.one_minus_beta1 * g;
    v = h.beta2 * v + h.one_minus_beta2 * (g * g);
    return h.decay * theta - h.lr * adam_direction(h, m, v);
  } else if constexpr (R == Rule::kAdaZo) {
    m = h.beta1 * m + h.one_minus_beta1 * g;
    v = h.beta2 * v + h.one_minus_beta2 * (m * m);
    return h.decay * theta - h.lr * (m / (sqrtf(v) + h.eps));
  } else if constexpr (R == Rule::kSignAdam) {
    m = h.beta1 * m + h.one_minus_beta1 * g;
    return h.decay * theta - h.lr * sign_of(m);
  } else if constexpr (R == Rule::kAdamMoments) {
    m = h.beta1 * m + h.one_minus_beta1 * g;
    v = h.beta2 * v + h.one_minus_beta2 * (g * g);
    *out_abs_u = fabsf(adam_direction(h, m, v));
    return theta;
  } else if constexpr (R == Rule::kQuantized) {
    return h.decay * theta - h.lr * quantize(adam_direction(h, m, v), scale, h.levels);
  } else if constexpr (R == Rule::kSophia) {  // sign(m) min(|m| / (rho h + eps), 1) is this clamp, exactly
    m = h.beta1 * m + h.one_minus_beta1 * g;
    const float ratio = m / (h.rho * v + h.eps);
    return h.decay * theta - h.lr * clamp_unit(ratio);
  } else {  // kDescent
    return h.decay * theta - h.lr * g;
  }
}

}  // namespace zo
