// ZO-RNG v2 (docs/rng.md): the directions (v1's, unchanged) and the rounding words of
// stochastic rounding, with the element math that uses them. Compiled for the host by the
// CPU op and for the device by the CUDA op, so the CPU tests exercise the very math the GPU
// runs. No torch headers here.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__CUDACC__)
#define ZO_HD __host__ __device__ __forceinline__
#else
#define ZO_HD inline
#endif

namespace zo {

constexpr int kMaxTerms = 8;
constexpr int kRademacherPerBlock = 128;  // one Philox call serves 128 signs
constexpr int kGaussianPerBlock = 4;      // ... or 4 normals
constexpr int kRoundingPerBlock = 8;      // ... or 8 rounding words of 16 bits

enum class Dist : int { kRademacher = 0, kGaussian = 1 };

// All terms of one pass: theta <- alpha * theta + sum_k coef[k] * z(seed, stream[k], e).
struct Terms {
  uint64_t seed;
  uint64_t stream[kMaxTerms];
  float coef[kMaxTerms];
  float alpha;
  int count;
};

// Terms from the ops' arguments: seed and streams arrive as int64 holding uint64 bits.
inline Terms make_terms(double alpha, const double* coefs, const int64_t* streams, int count, int64_t seed) {
  Terms t{};
  t.seed = static_cast<uint64_t>(seed);
  t.alpha = static_cast<float>(alpha);
  t.count = count;
  for (int k = 0; k < count; ++k) {
    t.coef[k] = static_cast<float>(coefs[k]);
    t.stream[k] = static_cast<uint64_t>(streams[k]);
  }
  return t;
}

struct Words {
  uint32_t w[4];
};

ZO_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// One Philox4x32 round; all four new words come from the old ones.
ZO_HD void philox_round(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3, uint32_t k0, uint32_t k1) {
  const uint32_t n0 = mulhi32(0xCD9E8D57u, c2) ^ c1 ^ k0;
  const uint32_t n2 = mulhi32(0xD2511F53u, c0) ^ c3 ^ k1;
  c1 = 0xCD9E8D57u * c2;
  c3 = 0xD2511F53u * c0;
  c0 = n0;
  c2 = n2;
}

constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;
constexpr int kPhiloxRounds = 10;

// Philox4x32-10, word for word Triton's tl.philox with 32-bit counters.
ZO_HD Words philox(uint64_t seed, uint64_t block, uint64_t stream) {
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  uint32_t c0 = static_cast<uint32_t>(block), c1 = static_cast<uint32_t>(block >> 32);
  uint32_t c2 = static_cast<uint32_t>(stream), c3 = static_cast<uint32_t>(stream >> 32);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < kPhiloxRounds; ++round) {
    philox_round(c0, c1, c2, c3, k0, k1);
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  return Words{{c0, c1, c2, c3}};
}

ZO_HD uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t u;
  memcpy(&u, &x, sizeof u);
  return u;
#endif
}

ZO_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float x;
  memcpy(&x, &u, sizeof x);
  return x;
#endif
}

// c * z for a Rademacher z = 1 - 2 * bit: flips the sign of c, exactly.
ZO_HD float signed_coef(float c, uint32_t bit) { return bits_float(float_bits(c) ^ (bit << 31)); }

// The sign bit of global element e inside its block's Philox output.
ZO_HD uint32_t rademacher_bit(const Words& r, uint64_t e) {
  return (r.w[(e >> 5) & 3] >> (e & 31)) & 1u;
}

// Triton's uint_to_uniform_float for 32-bit words: negatives fold as ~x (x ^ (x >> 31)).
ZO_HD float uniform(uint32_t word) {
  const int32_t x = static_cast<int32_t>(word);
  return static_cast<float>(x ^ (x >> 31)) * 4.6566127342e-10f;
}

// cond ? a : b without a branch, so loops that use it still vectorise.
ZO_HD float select(bool cond, float a, float b) {
  const uint32_t m = 0u - static_cast<uint32_t>(cond);
  return bits_float((float_bits(a) & m) | (float_bits(b) & ~m));
}

#if !defined(__CUDA_ARCH__)
// Host-side log and sincos: branch-free float32 Cephes polynomials that the compiler
// vectorises (glibc's are scalar calls). About 1 ulp on the ranges Box-Muller uses;
// tests hold the results to 1e-6 of torch's. The device uses CUDA's own logf/sincosf.
inline float log_poly(float x) {  // x normal and positive
  const uint32_t bits = float_bits(x);
  int e = static_cast<int>(bits >> 23) - 126;  // x = m * 2^e with m in [0.5, 1)
  float m = bits_float((bits & 0x007FFFFFu) | 0x3F000000u);
  const bool low = m < 0.707106781186547524f;
  e -= static_cast<int>(low);
  m = select(low, m + m - 1.0f, m - 1.0f);
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  const float fe = static_cast<float>(e);
  y += -2.12194440e-4f * fe;
  y += -0.5f * z;
  return (m + y) + 0.693359375f * fe;
}

inline void sincos_poly(float t, float& s, float& c) {  // 0 <= t <= 2 pi
  const float kf = static_cast<float>(static_cast<int>(t * 0.63661977236758134f + 0.5f));
  const int k = static_cast<int>(kf);
  // Cody-Waite reduction with pi/2 in three parts: r in [-pi/4, pi/4].
  const float r = ((t - kf * 1.5703125f) - kf * 4.837512969970703125e-4f) - kf * 7.54978995489188216e-8f;
  const float r2 = r * r;
  const float sp = ((-1.9515295891e-4f * r2 + 8.3321608736e-3f) * r2 - 1.6666654611e-1f) * r2 * r + r;
  const float cp = ((2.443315711809948e-5f * r2 - 1.388731625493765e-3f) * r2 + 4.166664568298827e-2f) * r2 * r2 -
                   0.5f * r2 + 1.0f;
  // Quadrant k: sin t = (sp, cp, -sp, -cp)[k & 3], cos t = (cp, -sp, -cp, sp)[k & 3].
  const bool odd = k & 1;
  s = bits_float(float_bits(select(odd, cp, sp)) ^ ((static_cast<uint32_t>(k) & 2u) << 30));
  c = bits_float(float_bits(select(odd, sp, cp)) ^ ((static_cast<uint32_t>(k + 1) & 2u) << 30));
}
#endif

// Triton's pair_uniform_to_normal (Box-Muller) in float32, in three steps that the
// CPU op runs as separate loops (each vectorises; fused, gcc gives up).
ZO_HD float box_muller_radius(uint32_t w1) {
  float u1 = uniform(w1);
  u1 = select(u1 > 1.0e-7f, u1, 1.0e-7f);  // not fmaxf or ?: -- either keeps the loop scalar
#if defined(__CUDA_ARCH__)
  return sqrtf(-2.0f * logf(u1));
#else
  return sqrtf(-2.0f * log_poly(u1));
#endif
}

ZO_HD float box_muller_angle(uint32_t w2) { return 6.283185307179586f * uniform(w2); }

ZO_HD void box_muller_sincos(float t, float& s, float& c) {
#if defined(__CUDA_ARCH__)
  sincosf(t, &s, &c);
#else
  sincos_poly(t, s, c);
#endif
}

ZO_HD void box_muller(uint32_t w1, uint32_t w2, float& n1, float& n2) {
  const float r = box_muller_radius(w1);
  float s, c;
  box_muller_sincos(box_muller_angle(w2), s, c);
  n1 = r * c;
  n2 = r * s;
}

// The four normals of one Gaussian block, lanes e & 3 = 0..3.
ZO_HD void gaussian4(const Words& r, float z[4]) {
  box_muller(r.w[0], r.w[1], z[0], z[1]);
  box_muller(r.w[2], r.w[3], z[2], z[3]);
}

// acc * 1 is exact, so alpha == 1 needs no special case; the explicit rounding
// keeps nvcc from fusing alpha * theta into the first term's add.
ZO_HD float scale(float alpha, float x) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(alpha, x);
#else
  return alpha * x;
#endif
}

ZO_HD float add_term(float acc, float c, float z) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(acc, __fmul_rn(c, z));
#else
  return acc + c * z;
#endif
}

// How a kernel rounds the float32 results it stores into a half-precision tensor: to nearest
// even, or stochastically with the rounding words of (seed, stream). float32 stores are exact.
struct Rounding {
  bool stochastic;
  uint64_t seed;
  uint64_t stream;
};

// Lean state (bfloat16 m and v) rounds with the parameters' stream with bit 62 (m) or 61 (v)
// flipped: independent of the parameters' words and of each other (docs/rng.md).
constexpr uint64_t kStateStreamM = uint64_t{1} << 62;
constexpr uint64_t kStateStreamV = uint64_t{1} << 61;
ZO_HD Rounding state_rounding(const Rounding& rd, uint64_t flip) {
  return Rounding{rd.stochastic, rd.seed, rd.stream ^ flip};
}

// The rounding word (16 bits) of global element e inside its block's Philox output. The word is
// selected, not indexed: a runtime index would put the four words in local memory on the device.
ZO_HD uint32_t rounding_bits(const Words& r, uint64_t e) {
  const uint32_t q = static_cast<uint32_t>(e >> 1) & 3u;
  const uint32_t word = q == 0 ? r.w[0] : q == 1 ? r.w[1] : q == 2 ? r.w[2] : r.w[3];
  return (word >> (16 * static_cast<uint32_t>(e & 1))) & 0xFFFFu;
}

// Stochastic rounding (docs/rng.md): |x| rounded toward zero to t, or away to the next value u
// iff r < f, f = (|x| - t) / (u - t) * 2^16 (computed exactly). NaN gives a quiet NaN and a
// magnitude past the largest finite value rounds to nearest, as the nearest-even store would.
ZO_HD uint16_t bf16_stochastic(float x, uint32_t r) {
  const uint32_t u = float_bits(x);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t mag = u & 0x7FFFFFFFu;
  if (mag > 0x7F800000u) return 0x7FC0u;                                // NaN
  if (mag > 0x7F7F0000u) return sign | (mag >= 0x7F7F8000u ? 0x7F80u : 0x7F7Fu);  // past the largest: nearest
  // bfloat16 keeps float32's exponent: t drops the low 16 bits, which are f itself.
  return static_cast<uint16_t>(sign | ((mag >> 16) + (r < (mag & 0xFFFFu) ? 1u : 0u)));
}

ZO_HD uint16_t f16_stochastic(float x, uint32_t r) {
  const uint32_t u = float_bits(x);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const float a = bits_float(u & 0x7FFFFFFFu);
  if (a != a) return 0x7E00u;                                           // NaN
  if (a > 65504.0f) return static_cast<uint16_t>(sign | (a >= 65520.0f ? 0x7C00u : 0x7BFFu));  // nearest
  uint32_t t;
  float f;
  const int e = static_cast<int>(float_bits(a) >> 23) - 127;
  if (e >= -14) {  // a normal float16: 10 of float32's 23 mantissa bits stay, 13 are dropped
    t = (static_cast<uint32_t>(e + 15) << 10) | ((float_bits(a) >> 13) & 0x3FFu);
    f = static_cast<float>((float_bits(a) & 0x1FFFu) << 3);
  } else {  // a subnormal float16 (or zero): whole units of 2^-24 stay
    const float units = a * 16777216.0f;  // exact: a power-of-two scaling
    const float whole = floorf(units);
    t = static_cast<uint32_t>(whole);
    f = (units - whole) * 65536.0f;  // exact: fewer than 24 significant bits
  }
  return static_cast<uint16_t>(sign | (t + (static_cast<float>(r) < f ? 1u : 0u)));
}

}  // namespace zo
