// The CPU kernel of the fused op, free of torch headers so it can be built and
// benchmarked on its own: out <- alpha * theta + sum_k c_k * z_k, in place (out = theta) or
// into another tensor of the same shape. Work is split into groups of 128 global elements
// (one Rademacher Philox block, or 32 Gaussian blocks); each group is loaded once, updated in
// a float32 buffer for every term and stored with one rounding. No parameter-sized temporaries.
// AVX2 and AVX-512 builds run Philox lane-parallel with intrinsics and AVX-512 the full groups
// 16 elements at a time; every build computes the same IEEE operations in the same order.
#pragma once

#include <stdint.h>

#include <algorithm>
#include <type_traits>

#include "../zo_rng.h"
#include "storage.h"

namespace zo::cpu {
inline namespace ZO_ISA_NAMESPACE {

#if defined(__AVX512F__)
// (a * b) mod 2^32 and (a * b) >> 32 for 16 lanes: two widening multiplies (even and odd
// lanes) whose 64-bit products' halves one masked pair swap each puts in place.
inline void mul_lo_hi_x16(__m512i a, __m512i b, __m512i& lo, __m512i& hi) {
  const __m512i even = _mm512_mul_epu32(a, b);
  const __m512i odd = _mm512_mul_epu32(_mm512_shuffle_epi32(a, _MM_PERM_CDAB), b);
  hi = _mm512_mask_shuffle_epi32(odd, 0x5555, even, _MM_PERM_CDAB);
  lo = _mm512_mask_shuffle_epi32(even, 0xAAAA, odd, _MM_PERM_CDAB);
}
#elif defined(__AVX2__)
// (a * b) mod 2^32 and (a * b) >> 32 for 8 lanes: two widening multiplies and blends;
// gcc's own vectorisation of the scalar round shuffles far more (and uses vpmulld).
inline void mul_lo_hi_x8(__m256i a, __m256i b, __m256i& lo, __m256i& hi) {
  const __m256i even = _mm256_mul_epu32(a, b);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), b);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
}
#endif

// Philox4x32-10 of blocks first .. first + N - 1 of one stream: words into c0..c3[0 .. N).
// first is a multiple of N (a power of two), so the blocks share their high 32 bits.
template <int N>
inline void philox_lanes(uint64_t seed, uint64_t first, uint64_t stream, uint32_t* c0, uint32_t* c1, uint32_t* c2,
                         uint32_t* c3) {
  static_assert(N % 16 == 0 && (N & (N - 1)) == 0, "N: a power of two, 16 lanes at a time");
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#if defined(__AVX512F__)
  // The whole state stays in registers (N / 16 independent chains, whose multiply latencies
  // overlap); three-way XORs are one VPTERNLOGD each.
  constexpr int V = N / 16;
  const __m512i ma = _mm512_set1_epi32(static_cast<int>(0xD2511F53u));
  const __m512i mb = _mm512_set1_epi32(static_cast<int>(0xCD9E8D57u));
  const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  __m512i s0[V], s1[V], s2[V], s3[V];
  for (int v = 0; v < V; ++v) {
    s0[v] = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(first) + 16u * v)), lanes);
    s1[v] = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(first >> 32)));
    s2[v] = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(stream)));
    s3[v] = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(stream >> 32)));
  }
  for (int round = 0; round < kPhiloxRounds; ++round) {
    const __m512i key0 = _mm512_set1_epi32(static_cast<int>(k0));
    const __m512i key1 = _mm512_set1_epi32(static_cast<int>(k1));
    for (int v = 0; v < V; ++v) {
      __m512i lo_b, hi_b, lo_a, hi_a;
      mul_lo_hi_x16(s2[v], mb, lo_b, hi_b);
      mul_lo_hi_x16(s0[v], ma, lo_a, hi_a);
      s0[v] = _mm512_ternarylogic_epi32(hi_b, s1[v], key0, 0x96);  // a ^ b ^ c
      s2[v] = _mm512_ternarylogic_epi32(hi_a, s3[v], key1, 0x96);
      s1[v] = lo_b;
      s3[v] = lo_a;
    }
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  for (int v = 0; v < V; ++v) {
    _mm512_storeu_si512(c0 + 16 * v, s0[v]);
    _mm512_storeu_si512(c1 + 16 * v, s1[v]);
    _mm512_storeu_si512(c2 + 16 * v, s2[v]);
    _mm512_storeu_si512(c3 + 16 * v, s3[v]);
  }
#else
  // Counters are written whole-vector (no scalar stores that vector loads would stall on).
  for (int i = 0; i < N; ++i) {
    c0[i] = static_cast<uint32_t>(first) + static_cast<uint32_t>(i);
    c1[i] = static_cast<uint32_t>(first >> 32);
    c2[i] = static_cast<uint32_t>(stream);
    c3[i] = static_cast<uint32_t>(stream >> 32);
  }
#if defined(__AVX2__)
  const __m256i ma = _mm256_set1_epi32(static_cast<int>(0xD2511F53u));
  const __m256i mb = _mm256_set1_epi32(static_cast<int>(0xCD9E8D57u));
  // Rounds outside, lanes inside: the N / 8 chains are independent, so their
  // multiply latencies overlap instead of adding up.
  for (int round = 0; round < kPhiloxRounds; ++round) {
    const __m256i key0 = _mm256_set1_epi32(static_cast<int>(k0));
    const __m256i key1 = _mm256_set1_epi32(static_cast<int>(k1));
    for (int i = 0; i < N; i += 8) {
      __m256i* p0 = reinterpret_cast<__m256i*>(c0 + i);
      __m256i* p1 = reinterpret_cast<__m256i*>(c1 + i);
      __m256i* p2 = reinterpret_cast<__m256i*>(c2 + i);
      __m256i* p3 = reinterpret_cast<__m256i*>(c3 + i);
      __m256i lo_b, hi_b, lo_a, hi_a;
      mul_lo_hi_x8(_mm256_loadu_si256(p2), mb, lo_b, hi_b);
      mul_lo_hi_x8(_mm256_loadu_si256(p0), ma, lo_a, hi_a);
      _mm256_storeu_si256(p0, _mm256_xor_si256(_mm256_xor_si256(hi_b, _mm256_loadu_si256(p1)), key0));
      _mm256_storeu_si256(p2, _mm256_xor_si256(_mm256_xor_si256(hi_a, _mm256_loadu_si256(p3)), key1));
      _mm256_storeu_si256(p1, lo_b);
      _mm256_storeu_si256(p3, lo_a);
    }
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
#else
  for (int round = 0; round < kPhiloxRounds; ++round) {
    for (int i = 0; i < N; ++i) philox_round(c0[i], c1[i], c2[i], c3[i], k0, k1);
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
#endif
#endif
}

// The Rademacher words of the groups of one stream (a group's 128 signs are one Philox block,
// the block numbered as the group), Philox-ed lane-parallel 16 consecutive groups at a time.
class SignWords {
 public:
  Words at(uint64_t seed, uint64_t stream, int64_t g) {
    const int64_t batch = g & ~int64_t{15};
    if (batch != batch_) {
      batch_ = batch;
      philox_lanes<16>(seed, static_cast<uint64_t>(batch), stream, w_[0], w_[1], w_[2], w_[3]);
    }
    const int j = static_cast<int>(g & 15);
    return Words{{w_[0][j], w_[1][j], w_[2][j], w_[3][j]}};
  }

 private:
  alignas(64) uint32_t w_[4][16];
  int64_t batch_ = -1;
};

// The 128 normals of one group: 32 Gaussian blocks whose Philox rounds and Box-Muller
// run lane-parallel over the 32 blocks, so both loops vectorise.
inline void gaussian_group(uint64_t seed, uint64_t group, uint64_t stream, float* z) {
  constexpr int kBlocks = kGroup / kGaussianPerBlock;
  alignas(32) uint32_t c0[kBlocks], c1[kBlocks], c2[kBlocks], c3[kBlocks];
  philox_lanes<kBlocks>(seed, group * kBlocks, stream, c0, c1, c2, c3);
  // box_muller step by step: words (0, 1) give lanes 0, 1 and words (2, 3) lanes 2, 3.
  float r01[kBlocks], r23[kBlocks], t01[kBlocks], t23[kBlocks];
  for (int i = 0; i < kBlocks; ++i) {
    r01[i] = box_muller_radius(c0[i]);
    r23[i] = box_muller_radius(c2[i]);
  }
  for (int i = 0; i < kBlocks; ++i) {
    t01[i] = box_muller_angle(c1[i]);
    t23[i] = box_muller_angle(c3[i]);
  }
  for (int i = 0; i < kBlocks; ++i) {
    float s01, c01, s23, c23;
    box_muller_sincos(t01[i], s01, c01);
    box_muller_sincos(t23[i], s23, c23);
    z[4 * i] = r01[i] * c01;
    z[4 * i + 1] = r01[i] * s01;
    z[4 * i + 2] = r23[i] * c23;
    z[4 * i + 3] = r23[i] * s23;
  }
}

// The rounding words of the 128 elements of group g (element j has global index 128 g + j):
// 16 Philox blocks of 8 words each, lane-parallel as gaussian_group's.
inline void rounding_group(const Rounding& rd, int64_t g, uint32_t* bits) {
  constexpr int kBlocks = kGroup / kRoundingPerBlock;
  alignas(64) uint32_t c[4][kBlocks];
  philox_lanes<kBlocks>(rd.seed, static_cast<uint64_t>(g) * kBlocks, rd.stream, c[0], c[1], c[2], c[3]);
#if defined(__AVX512F__)
  // Element j = 8 b + 2 w + h is half h of word w of block b: block-major order of the words,
  // read 16 bits at a time. A 4 x 16 transpose (32-bit lanes, then 128-bit lanes) gives it.
  const __m512i a = _mm512_load_si512(c[0]), b = _mm512_load_si512(c[1]);
  const __m512i cc = _mm512_load_si512(c[2]), d = _mm512_load_si512(c[3]);
  const __m512i ab_lo = _mm512_unpacklo_epi32(a, b), ab_hi = _mm512_unpackhi_epi32(a, b);
  const __m512i cd_lo = _mm512_unpacklo_epi32(cc, d), cd_hi = _mm512_unpackhi_epi32(cc, d);
  // u_k: in 128-bit lane L, the four words of block 4 L + k.
  const __m512i u0 = _mm512_unpacklo_epi64(ab_lo, cd_lo), u1 = _mm512_unpackhi_epi64(ab_lo, cd_lo);
  const __m512i u2 = _mm512_unpacklo_epi64(ab_hi, cd_hi), u3 = _mm512_unpackhi_epi64(ab_hi, cd_hi);
  const __m512i p0 = _mm512_shuffle_i32x4(u0, u1, 0x44), p1 = _mm512_shuffle_i32x4(u0, u1, 0xEE);
  const __m512i p2 = _mm512_shuffle_i32x4(u2, u3, 0x44), p3 = _mm512_shuffle_i32x4(u2, u3, 0xEE);
  const __m512i blocks[4] = {_mm512_shuffle_i32x4(p0, p2, 0x88), _mm512_shuffle_i32x4(p0, p2, 0xDD),
                             _mm512_shuffle_i32x4(p1, p3, 0x88), _mm512_shuffle_i32x4(p1, p3, 0xDD)};
  for (int i = 0; i < 4; ++i) {  // blocks 4 i .. 4 i + 3: elements 32 i .. 32 i + 31
    _mm512_storeu_si512(bits + 32 * i, _mm512_cvtepu16_epi32(_mm512_castsi512_si256(blocks[i])));
    _mm512_storeu_si512(bits + 32 * i + 16, _mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(blocks[i], 1)));
  }
#else
  for (int j = 0; j < kGroup; ++j) bits[j] = (c[(j >> 1) & 3][j >> 3] >> (16 * (j & 1))) & 0xFFFFu;
#endif
}

// One full group of 128 elements, K terms, one load and one store per element. The
// fixed trip counts (K is a template argument) let the compiler vectorise over b.
template <int K, typename T>
inline void rademacher_full_group(const T* in, T* out, const Words* r, const Terms& t) {
#if defined(__AVX512F__)
  // Lane l of vector v is element 16 v + l, whose sign is bit 16 (v & 1) + l of word v / 2:
  // 16 bits of the word are the vector's mask, and c_k's sign is flipped under it.
  const __m512 alpha = _mm512_set1_ps(t.alpha);
  const __m512i sign = _mm512_set1_epi32(static_cast<int>(0x80000000u));
  for (int v = 0; v < kGroup / 16; ++v) {
    __m512 x = _mm512_mul_ps(alpha, load16(in + 16 * v));
    for (int k = 0; k < K; ++k) {
      const auto negative = static_cast<__mmask16>(r[k].w[v >> 1] >> (16 * (v & 1)));
      const __m512i c = _mm512_set1_epi32(static_cast<int>(float_bits(t.coef[k])));
      x = _mm512_add_ps(x, _mm512_castsi512_ps(_mm512_mask_xor_epi32(c, negative, c, sign)));
    }
    store16(x, out + 16 * v);
  }
#else
  if constexpr (std::is_same_v<T, float>) {
    for (int q = 0; q < 4; ++q) {
      for (uint32_t b = 0; b < 32; ++b) {
        float x = scale(t.alpha, load(in[32 * q + b]));
        for (int k = 0; k < K; ++k) x += signed_coef(t.coef[k], (r[k].w[q] >> b) & 1u);
        store(x, out[32 * q + b]);
      }
    }
  } else {
    // Half types: loads, terms and stores in separate loops. In place (in == out), gcc cannot
    // tell the fused loop's 16-bit loads and stores apart and keeps it scalar.
    alignas(32) float x[kGroup];
    load_n(in, x, kGroup);
    for (int j = 0; j < kGroup; ++j) x[j] = scale(t.alpha, x[j]);
    for (int k = 0; k < K; ++k) {
      for (int q = 0; q < 4; ++q) {
        for (uint32_t b = 0; b < 32; ++b) x[32 * q + b] += signed_coef(t.coef[k], (r[k].w[q] >> b) & 1u);
      }
    }
    store_n(x, out, kGroup, nullptr);
  }
#endif
}

template <int K, typename T>
inline void gaussian_full_group(const T* in, T* out, const float (*z)[kGroup], const Terms& t) {
#if defined(__AVX512F__)
  const __m512 alpha = _mm512_set1_ps(t.alpha);
  for (int v = 0; v < kGroup / 16; ++v) {
    __m512 x = _mm512_mul_ps(alpha, load16(in + 16 * v));
    for (int k = 0; k < K; ++k) {
      x = _mm512_add_ps(x, _mm512_mul_ps(_mm512_set1_ps(t.coef[k]), _mm512_loadu_ps(z[k] + 16 * v)));
    }
    store16(x, out + 16 * v);
  }
#else
  alignas(32) float x[kGroup];  // separate loops, as rademacher_full_group's half types
  load_n(in, x, kGroup);
  for (int j = 0; j < kGroup; ++j) x[j] = scale(t.alpha, x[j]);
  for (int k = 0; k < K; ++k) {
    for (int j = 0; j < kGroup; ++j) x[j] = add_term(x[j], t.coef[k], z[k][j]);
  }
  store_n(x, out, kGroup, nullptr);
#endif
}

// The first and last group of a tensor may hold fewer elements: lanes lane0 .. lane0 + len - 1.
template <int K, typename T>
inline void partial_group(const T* in, T* out, int64_t lane0, int64_t len, const Words* r,
                          const float (*z)[kGroup], const Terms& t, Dist dist) {
  for (int64_t j = 0; j < len; ++j) {
    float x = scale(t.alpha, load(in[j]));
    for (int k = 0; k < K; ++k) {
      x = dist == Dist::kRademacher ? x + signed_coef(t.coef[k], rademacher_bit(r[k], lane0 + j))
                                    : add_term(x, t.coef[k], z[k][lane0 + j]);
    }
    store(x, out[j]);
  }
}

template <int K, typename T>
void perturb_groups_k(const T* src, T* dst, int64_t numel, uint64_t base, const Terms& t, Dist dist, int64_t g0,
                      int64_t g1) {
  Words r[K];
  SignWords signs[K];
  float z[K][kGroup];
  for (int64_t g = g0; g < g1; ++g) {
    const uint64_t group_start = static_cast<uint64_t>(g) * kGroup;
    const uint64_t e0 = std::max(group_start, base);
    const uint64_t e1 = std::min(group_start + kGroup, base + numel);
    const T* in = src + (e0 - base);
    T* out = dst + (e0 - base);
    for (int k = 0; k < K; ++k) {
      if (dist == Dist::kRademacher) {
        r[k] = signs[k].at(t.seed, t.stream[k], g);
      } else {
        gaussian_group(t.seed, g, t.stream[k], z[k]);
      }
    }
    if (e1 - e0 == kGroup) {
      if (dist == Dist::kRademacher) {
        rademacher_full_group<K>(in, out, r, t);
      } else {
        gaussian_full_group<K>(in, out, z, t);
      }
    } else {
      partial_group<K>(in, out, static_cast<int64_t>(e0 - group_start), static_cast<int64_t>(e1 - e0), r, z, t,
                       dist);
    }
  }
}

// The elements of one tensor (numel, global offset base) that fall in groups [g0, g1): read
// from src, written to dst (the same pointer in place, or a tensor of the same shape).
template <typename T>
void perturb_groups(const T* src, T* dst, int64_t numel, uint64_t base, const Terms& t, Dist dist, int64_t g0,
                    int64_t g1) {
  switch (t.count) {
    case 1: return perturb_groups_k<1>(src, dst, numel, base, t, dist, g0, g1);
    case 2: return perturb_groups_k<2>(src, dst, numel, base, t, dist, g0, g1);
    case 3: return perturb_groups_k<3>(src, dst, numel, base, t, dist, g0, g1);
    case 4: return perturb_groups_k<4>(src, dst, numel, base, t, dist, g0, g1);
    case 5: return perturb_groups_k<5>(src, dst, numel, base, t, dist, g0, g1);
    case 6: return perturb_groups_k<6>(src, dst, numel, base, t, dist, g0, g1);
    case 7: return perturb_groups_k<7>(src, dst, numel, base, t, dist, g0, g1);
    case 8: return perturb_groups_k<8>(src, dst, numel, base, t, dist, g0, g1);
    default: return;  // callers check 1 <= count <= kMaxTerms
  }
}

}  // namespace ZO_ISA_NAMESPACE
}  // namespace zo::cpu
