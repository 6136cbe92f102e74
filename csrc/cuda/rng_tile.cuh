// ZO-RNG v1 (docs/rng.md) for one tile of multi_tensor.cuh, shared by the kernels that
// regenerate directions (perturb_, zo_update_). The tile's random numbers are generated once
// into shared memory by the whole CTA, so Philox runs once per 128-element group and term for
// Rademacher and once per 4 elements and term for Gaussian, whatever the tile's alignment;
// threads then read the values of their runs.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "../zo_rng.h"
#include "multi_tensor.cuh"

namespace zo {
namespace mt {

// Rademacher: a tile touches at most 32 groups, +1 when its start is not 128-aligned.
constexpr int kMaxGroups = kTile / kRademacherPerBlock + 1;
// Each run reads a 2-word window (its word and the next), so one word past the last group
// can be read (its bits then belong to no valid element); +4 keeps rows 16-byte aligned.
constexpr int kWordsPerTerm = 4 * kMaxGroups + 4;

// The Philox words of every term for one tile, in shared memory.
struct RademacherWords {
  const uint32_t (*w)[kWordsPerTerm];  // w[k]: term k's words from group g0 on
  uint64_t g0;                         // the tile's first group

  // Bits of elements e .. e + 7 of term k (bit j: element e + j, 1 means z = -1), e in the
  // tile; they may straddle two words (or two groups).
  __device__ __forceinline__ uint32_t bits(int k, uint64_t e) const {
    const int lw = static_cast<int>((e >> 5) - 4 * g0);  // word of element e, 0 .. 131
    return __funnelshift_r(w[k][lw], w[k][lw + 1], static_cast<uint32_t>(e) & 31u);
  }

  // a[j] += c_k z_k(e + j) for every term k in order; c * z is exact, so each add is the
  // reference's rounding.
  __device__ __forceinline__ void add_terms(const Terms& terms, uint64_t e, float (&a)[kRun]) const {
#pragma unroll
    for (int k = 0; k < kMaxTerms; ++k) {
      if (k < terms.count) {
        const uint32_t b = bits(k, e);
        const float c = terms.coef[k];
#pragma unroll
        for (int j = 0; j < kRun; ++j) a[j] += signed_coef(c, (b >> j) & 1u);
      }
    }
  }
};

// All threads of the CTA: generates the words of tile t (G, n) for every term, then one barrier.
// Double-buffered on t.parity, so one barrier per tile suffices: a CTA writes buffer b at
// tile i + 2 only after the barrier of tile i + 1, which every thread passes after reading tile i.
template <int P>
__device__ __forceinline__ RademacherWords rademacher_words(const Tile<P>& t, const Terms& terms) {
  __shared__ __align__(16) uint32_t words[2][kMaxTerms][kWordsPerTerm];
  uint32_t(*w)[kWordsPerTerm] = words[t.parity];
  const uint64_t g0 = t.G >> 7;
  const int ngroups = static_cast<int>(((t.G + t.n - 1) >> 7) - g0) + 1;
  for (int task = threadIdx.x; task < ngroups * terms.count; task += kThreads) {
    const int k = task / ngroups;
    const int g = task - k * ngroups;
    const Words r = philox(terms.seed, g0 + g, terms.stream[k]);
    *reinterpret_cast<uint4*>(&w[k][4 * g]) = make_uint4(r.w[0], r.w[1], r.w[2], r.w[3]);
  }
  __syncthreads();
  return RademacherWords{w, g0};
}

// Gaussian: a tile touches at most 1024 blocks, +1 when its start is not 4-aligned.
constexpr int kMaxBlocks = kTile / kGaussianPerBlock + 1;
// Normals are stored at pad(i) = i + i / 8: a warp reading element (run start + j) of its
// 32 runs hits addresses 9 * lane + const, 32 distinct banks.
__device__ __forceinline__ int pad(int i) { return i + (i >> 3); }
constexpr int kNormalSlots = 4 * kMaxBlocks + (4 * kMaxBlocks - 1) / 8;

// The normals of one term (stream) at a time for one tile, in shared memory. Per term:
// fill() (all threads, ends with a barrier), reads with at(), then release() (all threads).
struct GaussianNormals {
  float* normals;
  uint64_t b0;  // the tile's first block
  int nblocks;
  int lane0;    // slot of the tile's element 0

  __device__ __forceinline__ void fill(uint64_t seed, uint64_t stream) const {
    for (int lb = threadIdx.x; lb < nblocks; lb += kThreads) {
      float z[4];
      gaussian4(philox(seed, b0 + lb, stream), z);
#pragma unroll
      for (int q = 0; q < 4; ++q) normals[pad(4 * lb + q)] = z[q];
    }
    __syncthreads();
  }
  // z of the tile's element j.
  __device__ __forceinline__ float at(int j) const { return normals[pad(lane0 + j)]; }
  // All reads done before the next fill (of this tile or the next) overwrites.
  __device__ __forceinline__ void release() const { __syncthreads(); }
};

template <int P>
__device__ __forceinline__ GaussianNormals gaussian_normals(const Tile<P>& t) {
  __shared__ float normals[kNormalSlots];
  const uint64_t b0 = t.G >> 2;
  return GaussianNormals{normals, b0, static_cast<int>(((t.G + t.n - 1) >> 2) - b0) + 1, static_cast<int>(t.G & 3)};
}

// Calls fn(std::integral_constant<Dist, D>{}) for the runtime dist.
template <typename F>
cudaError_t with_dist(Dist dist, const F& fn) {
  switch (dist) {
    case Dist::kRademacher: return fn(std::integral_constant<Dist, Dist::kRademacher>{});
    case Dist::kGaussian: return fn(std::integral_constant<Dist, Dist::kGaussian>{});
  }
  return cudaErrorInvalidValue;
}

inline bool valid_terms(const Terms& terms, Dist dist) {
  return terms.count >= 1 && terms.count <= kMaxTerms && (dist == Dist::kRademacher || dist == Dist::kGaussian);
}

}  // namespace mt
}  // namespace zo
