// How the CPU kernels read and write each storage type (float32, bfloat16, float16): one element
// at a time, and 16 at a time on AVX-512. Every path stores the same bits: bfloat16 to nearest
// even by the integer rounding below (or VCVTNEPS2BF16 where it agrees: everywhere but float32
// subnormals, which it flushes), float16 by IEEE conversion, stochastic rounding by zo_rng.h's
// rules. Torch-free.
//
// Everything here and in the kernel headers lives in the namespace of one build
// (kernels_isa.cpp is compiled once per instruction set with -DZO_CPU_ISA=name): an inline
// function the linker may keep only one copy of must never be an AVX-512 copy that another
// build calls.
#pragma once

#include <stdint.h>
#include <string.h>

#include <type_traits>

#if defined(__AVX2__)
// GCC 12's AVX-512 headers trip -W(maybe-)uninitialized on their own _mm512_undefined_* (GCC bug 105593).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#endif

#include "../zo_rng.h"
#include "kernel_table.h"

#ifndef ZO_CPU_ISA
#define ZO_CPU_ISA native  // a program that includes the kernels directly, with its own flags
#endif
#define ZO_ISA_CAT2(a, b) a##b
#define ZO_ISA_CAT(a, b) ZO_ISA_CAT2(a, b)
#define ZO_ISA_NAMESPACE ZO_ISA_CAT(isa_, ZO_CPU_ISA)

namespace zo::cpu {
inline namespace ZO_ISA_NAMESPACE {

// Storage types with the same layout as at::BFloat16 / at::Half.
struct bf16 {
  uint16_t bits;
};
using f16 = _Float16;  // IEEE binary16: conversions round to nearest even (F16C when enabled)

inline float load(float x) { return x; }
inline float load(bf16 x) { return bits_float(static_cast<uint32_t>(x.bits) << 16); }
inline float load(f16 x) { return static_cast<float>(x); }

inline void store(float x, float& out) { out = x; }
inline void store(float x, f16& out) { out = static_cast<f16>(x); }
// Round to nearest even, as torch does; NaN stays a quiet NaN. Branch-free so it vectorises.
inline void store(float x, bf16& out) {
  const uint32_t u = float_bits(x);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const uint32_t nan = ((u >> 16) | 0x40u) & 0xFFFFu;
  out.bits = static_cast<uint16_t>(x != x ? nan : rounded);
}

// Stochastic rounding with the element's rounding word r (zo_rng.h); float32 needs none.
inline void store_stochastic(float x, uint32_t, float& out) { out = x; }
inline void store_stochastic(float x, uint32_t r, bf16& out) { out.bits = bf16_stochastic(x, r); }
inline void store_stochastic(float x, uint32_t r, f16& out) {
  const uint16_t bits = f16_stochastic(x, r);
  memcpy(&out, &bits, sizeof bits);
}

#if defined(__AVX512F__)
// 16 consecutive elements as float32, and back with one rounding.
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const bf16* p) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
inline __m512 load16(const f16* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }

inline void store16(__m512 x, float* p) { _mm512_storeu_ps(p, x); }
inline void store16(__m512 x, f16* p) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

// store(float, bf16&) for 16 lanes.
inline __m256i bf16_nearest16(__m512 x) {
  const __m512i u = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb), 16);
  const __m512i nan = _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
  return _mm512_cvtepi32_epi16(_mm512_mask_blend_epi32(_mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), rounded, nan));
}

inline void store16(__m512 x, bf16* p) {
  __m256i bits;
#if defined(__AVX512BF16__)
  // VCVTNEPS2BF16 rounds to nearest even and quiets NaN as above (Intel SDM), but flushes a
  // float32 subnormal to zero where torch rounds it: those vectors take the integer rounding.
  const __m512i u = _mm512_castps_si512(x);
  const __mmask16 subnormal = _mm512_testn_epi32_mask(u, _mm512_set1_epi32(0x7F800000)) &
                              _mm512_test_epi32_mask(u, _mm512_set1_epi32(0x007FFFFF));
  bits = subnormal == 0 ? reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(x)) : bf16_nearest16(x);
#else
  bits = bf16_nearest16(x);
#endif
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), bits);
}

// bf16_stochastic (zo_rng.h) for 16 lanes with their rounding words r (16 bits each).
inline void store16_stochastic(__m512 x, __m512i r, bf16* p) {
  const __m512i u = _mm512_castps_si512(x);
  const __m512i sign = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x8000));
  const __m512i mag = _mm512_and_si512(u, _mm512_set1_epi32(0x7FFFFFFF));
  // Rounded away from zero where r < the 16 dropped bits.
  const __mmask16 up = _mm512_cmplt_epu32_mask(r, _mm512_and_si512(mag, _mm512_set1_epi32(0xFFFF)));
  __m512i bits = _mm512_mask_add_epi32(_mm512_srli_epi32(mag, 16), up, _mm512_srli_epi32(mag, 16), _mm512_set1_epi32(1));
  // Past the largest finite value: to nearest (inf from 0x7F7F8000 on); NaN: the quiet NaN.
  const __mmask16 past = _mm512_cmpgt_epu32_mask(mag, _mm512_set1_epi32(0x7F7F0000));
  const __mmask16 to_inf = _mm512_cmpge_epu32_mask(mag, _mm512_set1_epi32(0x7F7F8000));
  bits = _mm512_mask_mov_epi32(bits, past, _mm512_mask_blend_epi32(to_inf, _mm512_set1_epi32(0x7F7F),
                                                                   _mm512_set1_epi32(0x7F80)));
  bits = _mm512_or_si512(sign, bits);
  const __mmask16 nan = _mm512_cmpgt_epu32_mask(mag, _mm512_set1_epi32(0x7F800000));
  bits = _mm512_mask_mov_epi32(bits, nan, _mm512_set1_epi32(0x7FC0));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(bits));
}
#endif

// x[0 .. n) = the n elements at in, as float32. Whole groups take the vector instructions that
// gcc does not find itself (it vectorises neither the float16 conversions nor, in place, a loop
// that both loads and stores 16-bit values).
template <typename T>
inline void load_n(const T* in, float* x, int64_t n) {
#if defined(__AVX512F__)
  if (n == kGroup) {
    for (int j = 0; j < kGroup; j += 16) _mm512_storeu_ps(x + j, load16(in + j));
    return;
  }
#elif defined(__F16C__)
  if constexpr (std::is_same_v<T, f16>) {
    if (n == kGroup) {
      for (int j = 0; j < kGroup; j += 8) {
        _mm256_storeu_ps(x + j, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(in + j))));
      }
      return;
    }
  }
#endif
  for (int64_t j = 0; j < n; ++j) x[j] = load(in[j]);
}

// out[0 .. n) = x[0 .. n) rounded to T: to nearest even, or stochastically with the elements'
// rounding words r (null: to nearest).
template <typename T>
inline void store_n(const float* x, T* out, int64_t n, const uint32_t* r) {
  if constexpr (std::is_same_v<T, float>) {
    memcpy(out, x, n * sizeof(float));
    return;
  }
  if (r != nullptr) {
#if defined(__AVX512F__)
    if constexpr (std::is_same_v<T, bf16>) {
      if (n == kGroup) {
        for (int j = 0; j < kGroup; j += 16) {
          store16_stochastic(_mm512_loadu_ps(x + j), _mm512_loadu_si512(r + j), out + j);
        }
        return;
      }
    }
#endif
    for (int64_t j = 0; j < n; ++j) store_stochastic(x[j], r[j], out[j]);
    return;
  }
#if defined(__AVX512F__)
  if (n == kGroup) {
    for (int j = 0; j < kGroup; j += 16) store16(_mm512_loadu_ps(x + j), out + j);
    return;
  }
#elif defined(__F16C__)
  if constexpr (std::is_same_v<T, f16>) {
    if (n == kGroup) {
      for (int j = 0; j < kGroup; j += 8) {
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + j),
                         _mm256_cvtps_ph(_mm256_loadu_ps(x + j), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      }
      return;
    }
  }
#endif
  for (int64_t j = 0; j < n; ++j) store(x[j], out[j]);
}

}  // namespace ZO_ISA_NAMESPACE
}  // namespace zo::cpu
