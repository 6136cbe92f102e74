// Element math of the fused optimizer updates (docs/optimizers.md), compiled for the host
// by the CPU op and for the device by the CUDA op. No torch headers here.
//
// Every rule maps (theta, g, m, v) of one element to new values in float32, one IEEE
// operation at a time in the order written (no fused multiply-add: the CPU op builds with
// -ffp-contract=off, the CUDA op with --fmad=false, Triton with enable_fp_fusion=False),
// so the pure-PyTorch reference (zounlearn/ops/reference.py) computes the same bits.
// Compound scalars (1 - beta1, bias corrections, ...) arrive precomputed in float32.
#pragma once

#include "zo_rng.h"

namespace zo {

enum class Rule : int {
  kSgd = 0,           // momentum SGD, coupled weight decay (torch.optim.SGD, dampening 0)
  kSign = 1,          // sign descent, decoupled weight decay
  kAdam = 2,          // Adam, decoupled weight decay (AdamW)
  kAdaZo = 3,         // R-AdaZO: v tracks m^2, no bias correction
  kSignAdam = 4,      // Signum: sign of the first moment
  kAdamMoments = 5,   // compressed Adam, pass 1: moments, and |u| for the tensor's max
  kQuantized = 6,     // compressed Adam, pass 2: theta -= lr Q(u; levels) with the tensor's max
  kSophia = 7,        // SophiaG: clipped m / (rho h + eps), h kept in v
};
constexpr int kRules = 8;

// Which state tensors a rule reads or writes.
ZO_HD bool rule_uses_m(Rule r) { return r != Rule::kSign; }
ZO_HD bool rule_uses_v(Rule r) {
  return r == Rule::kAdam || r == Rule::kAdaZo || r == Rule::kAdamMoments || r == Rule::kQuantized ||
         r == Rule::kSophia;
}

// Hyperparameters of one call, float32, in the order zounlearn.ops.update.Hyper lists them.
struct Hyper {
  float lr;
  float decay;         // 1 - lr * weight_decay (decoupled rules); 1 for kSgd
  float weight_decay;  // coupled weight decay (kSgd only)
  float beta1;         // also the momentum of kSgd
  float one_minus_beta1;
  float beta2;
  float one_minus_beta2;
  float eps;
  float bias_correction1;       // 1 - beta1^t (kAdam, kAdamMoments, kQuantized)
  float sqrt_bias_correction2;  // sqrt(1 - beta2^t)
  float levels;                 // kQuantized: 2^(bits-1) - 1; 0 means sign
  float rho;                    // kSophia
};
constexpr int kHyperFields = 12;

inline Hyper make_hyper(const double* h) {
  return Hyper{static_cast<float>(h[0]), static_cast<float>(h[1]),  static_cast<float>(h[2]),
               static_cast<float>(h[3]), static_cast<float>(h[4]),  static_cast<float>(h[5]),
               static_cast<float>(h[6]), static_cast<float>(h[7]),  static_cast<float>(h[8]),
               static_cast<float>(h[9]), static_cast<float>(h[10]), static_cast<float>(h[11])};
}

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
  } else {  // kSophia: sign(m) min(|m| / (rho h + eps), 1) is this clamp, exactly
    m = h.beta1 * m + h.one_minus_beta1 * g;
    const float ratio = m / (h.rho * v + h.eps);
    return h.decay * theta - h.lr * clamp_unit(ratio);
  }
}

}  // namespace zo
