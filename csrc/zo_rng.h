// ZO-RNG v1 (docs/rng.md) and the element math of the fused update.
// Compiled for the host by the CPU op and for the device by the CUDA op, so the
// CPU tests exercise the very math the GPU runs. No torch headers here.
#pragma once

#include <math.h>
#include <stdint.h>

#if defined(__CUDACC__)
#define ZO_HD __host__ __device__ __forceinline__
#else
#define ZO_HD inline
#endif

namespace zo {

constexpr int kMaxTerms = 8;
constexpr int kRademacherPerBlock = 128;  // one Philox call serves 128 signs
constexpr int kGaussianPerBlock = 4;      // ... or 4 normals

enum class Dist : int { kRademacher = 0, kGaussian = 1 };

// All terms of one pass: theta <- alpha * theta + sum_k coef[k] * z(seed, stream[k], e).
struct Terms {
  uint64_t seed;
  uint64_t stream[kMaxTerms];
  float coef[kMaxTerms];
  float alpha;
  int count;
};

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

// Philox4x32-10, word for word Triton's tl.philox with 32-bit counters.
ZO_HD Words philox(uint64_t seed, uint64_t block, uint64_t stream) {
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  uint32_t c0 = static_cast<uint32_t>(block), c1 = static_cast<uint32_t>(block >> 32);
  uint32_t c2 = static_cast<uint32_t>(stream), c3 = static_cast<uint32_t>(stream >> 32);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    const uint32_t n0 = mulhi32(0xCD9E8D57u, c2) ^ c1 ^ k0;
    const uint32_t n2 = mulhi32(0xD2511F53u, c0) ^ c3 ^ k1;
    c1 = 0xCD9E8D57u * c2;
    c3 = 0xD2511F53u * c0;
    c0 = n0;
    c2 = n2;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return Words{{c0, c1, c2, c3}};
}

ZO_HD uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  return __builtin_bit_cast(uint32_t, x);
#endif
}

ZO_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  return __builtin_bit_cast(float, u);
#endif
}

// c * z for a Rademacher z = 1 - 2 * bit: flips the sign of c, exactly.
ZO_HD float signed_coef(float c, uint32_t bit) { return bits_float(float_bits(c) ^ (bit << 31)); }

// The sign bit of global element e inside its block's Philox output.
ZO_HD uint32_t rademacher_bit(const Words& r, uint64_t e) {
  return (r.w[(e >> 5) & 3] >> (e & 31)) & 1u;
}

// Triton's uint_to_uniform_float for 32-bit words.
ZO_HD float uniform(uint32_t word) {
  int32_t x = static_cast<int32_t>(word);
  x = x < 0 ? ~x : x;
  return static_cast<float>(x) * 4.6566127342e-10f;
}

// Triton's pair_uniform_to_normal (Box-Muller), in float32 with the precise math library.
ZO_HD void box_muller(uint32_t w1, uint32_t w2, float& n1, float& n2) {
  float u1 = uniform(w1);
  u1 = u1 < 1.0e-7f ? 1.0e-7f : u1;
  const float r = sqrtf(-2.0f * logf(u1));
  const float t = 6.283185307179586f * uniform(w2);
#if defined(__CUDA_ARCH__)
  float s, c;
  sincosf(t, &s, &c);
  n1 = r * c;
  n2 = r * s;
#else
  n1 = r * cosf(t);
  n2 = r * sinf(t);
#endif
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

}  // namespace zo
