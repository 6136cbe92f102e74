// Multi-tensor fused perturbation kernel (docs/rng.md), no torch.
//
// Work unit: a tile of kTile = 4096 consecutive elements of one tensor, aligned to the
// tensor's start (so 16-byte vector access depends only on the tensor's pointer), not to
// its global base offset (so a tile's random blocks may start mid-group). One launch covers
// up to kMaxTensors tensors of one dtype; a CTA walks tiles grid-stride and finds each
// tile's tensor from per-tensor tile prefix sums in the kernel parameters.
//
// Per tile, each thread owns kRuns runs of kRun contiguous elements (one 16-byte vector of
// bf16/fp16, two of float), runs strided by kThreads so every warp access is coalesced.
// Loads are issued first; the tile's random numbers are then generated once into shared
// memory (so Philox runs once per 128-element group for Rademacher and once per 4 elements
// for Gaussian, whatever the alignment), and each thread applies all terms in float32 and
// rounds once at the store.
#include "perturb_kernel.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

namespace zo {
namespace {

constexpr int kThreads = 256;
constexpr int kRun = 8;   // contiguous elements per run: 16 B of bf16/fp16, 32 B of float
constexpr int kRuns = 2;  // runs per thread per tile
constexpr int kTile = kThreads * kRun * kRuns;  // 4096 elements
constexpr int kMaxTensors = 120;                // keeps the kernel parameters under 4 KB

// Rademacher: a tile touches at most 32 groups, +1 when its start is not 128-aligned.
constexpr int kMaxGroups = kTile / kRademacherPerBlock + 1;
// Each run reads a 2-word window (its word and the next), so one word past the last group
// can be read (its bits then belong to no valid element); +4 keeps rows 16-byte aligned.
constexpr int kWordsPerTerm = 4 * kMaxGroups + 4;

// Gaussian: a tile touches at most 1024 blocks, +1 when its start is not 4-aligned.
constexpr int kMaxBlocks = kTile / kGaussianPerBlock + 1;
// Normals are stored at pad(i) = i + i / 8: a warp reading element (run start + j) of its
// 32 runs hits addresses 9 * lane + const, 32 distinct banks.
__device__ __forceinline__ int pad(int i) { return i + (i >> 3); }
constexpr int kNormalSlots = 4 * kMaxBlocks + (4 * kMaxBlocks - 1) / 8;

struct Batch {
  void* ptr[kMaxTensors];
  int64_t numel[kMaxTensors];
  int64_t base[kMaxTensors];      // global index of element 0
  int64_t tile_end[kMaxTensors];  // inclusive prefix sum of tiles per tensor
  int n;
};
static_assert(sizeof(Batch) + sizeof(Terms) <= 4096, "kernel parameters must fit in 4 KB");

template <typename T>
struct alignas(16) Run {
  T v[kRun];
};
static_assert(sizeof(Run<float>) == 32 && sizeof(Run<__nv_bfloat16>) == 16 && sizeof(Run<__half>) == 16,
              "a run is whole 16-byte vectors");

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}

// q points at the run's first element; avail = elements left in the tensor from q (may be <= 0).
template <typename T>
__device__ __forceinline__ void load_run(Run<T>& x, const T* q, int avail, bool vec) {
  if (vec && avail >= kRun) {
    x = *reinterpret_cast<const Run<T>*>(q);
  } else {
#pragma unroll
    for (int j = 0; j < kRun; ++j) {
      if (j < avail) x.v[j] = q[j];
    }
  }
}

template <typename T>
__device__ __forceinline__ void store_run(T* q, const Run<T>& x, int avail, bool vec) {
  if (vec && avail >= kRun) {
    *reinterpret_cast<Run<T>*>(q) = x;
  } else {
#pragma unroll
    for (int j = 0; j < kRun; ++j) {
      if (j < avail) q[j] = x.v[j];
    }
  }
}

// Tile-local index of element 0 of run r of this thread.
__device__ __forceinline__ int run_start(int r) { return (r * kThreads + static_cast<int>(threadIdx.x)) * kRun; }

// G: global index of the tile's element 0; n: elements in the tile (1 .. kTile).
template <typename T>
__device__ __forceinline__ void rademacher_tile(Run<T> (&x)[kRuns], uint64_t G, int n, unsigned parity,
                                                const Terms& terms) {
  // Double-buffered, so one barrier per tile suffices: a CTA writes buffer b at tile i + 2
  // only after the barrier of tile i + 1, which every thread passes after reading tile i.
  __shared__ __align__(16) uint32_t words[2][kMaxTerms][kWordsPerTerm];
  uint32_t(*w)[kWordsPerTerm] = words[parity];
  const uint64_t g0 = G >> 7;
  const int ngroups = static_cast<int>(((G + n - 1) >> 7) - g0) + 1;
  for (int task = threadIdx.x; task < ngroups * terms.count; task += kThreads) {
    const int k = task / ngroups;
    const int g = task - k * ngroups;
    const Words r = philox(terms.seed, g0 + g, terms.stream[k]);
    *reinterpret_cast<uint4*>(&w[k][4 * g]) = make_uint4(r.w[0], r.w[1], r.w[2], r.w[3]);
  }
  __syncthreads();

#pragma unroll
  for (int r = 0; r < kRuns; ++r) {
    const int j0 = run_start(r);
    if (j0 >= n) continue;
    const uint64_t e = G + j0;
    const int lw = static_cast<int>((e >> 5) - 4 * g0);  // word of element e, 0 .. 131
    const uint32_t sh = static_cast<uint32_t>(e) & 31u;
    float a[kRun];
#pragma unroll
    for (int j = 0; j < kRun; ++j) a[j] = scale(terms.alpha, to_float(x[r].v[j]));
#pragma unroll
    for (int k = 0; k < kMaxTerms; ++k) {
      if (k < terms.count) {
        // Bits of elements e .. e + 7; they may straddle two words (or two groups).
        const uint32_t bits = __funnelshift_r(w[k][lw], w[k][lw + 1], sh);
        const float c = terms.coef[k];
        // c * z is exact, so this single add is the reference's rounding.
#pragma unroll
        for (int j = 0; j < kRun; ++j) a[j] += signed_coef(c, (bits >> j) & 1u);
      }
    }
#pragma unroll
    for (int j = 0; j < kRun; ++j) x[r].v[j] = from_float<T>(a[j]);
  }
}

template <typename T>
__device__ __forceinline__ void gaussian_tile(Run<T> (&x)[kRuns], uint64_t G, int n, const Terms& terms) {
  __shared__ float normals[kNormalSlots];
  const uint64_t b0 = G >> 2;
  const int nblocks = static_cast<int>(((G + n - 1) >> 2) - b0) + 1;
  const int lane0 = static_cast<int>(G & 3);  // slot of the tile's element 0
  float a[kRuns][kRun];
  // Not unrolled: one copy of the Box-Muller code keeps the kernel small.
#pragma unroll 1
  for (int k = 0; k < terms.count; ++k) {
    const uint64_t stream = terms.stream[k];
    for (int lb = threadIdx.x; lb < nblocks; lb += kThreads) {
      float z[4];
      gaussian4(philox(terms.seed, b0 + lb, stream), z);
#pragma unroll
      for (int q = 0; q < 4; ++q) normals[pad(4 * lb + q)] = z[q];
    }
    __syncthreads();
    const float c = terms.coef[k];
#pragma unroll
    for (int r = 0; r < kRuns; ++r) {
      const int j0 = run_start(r);
      if (j0 >= n) continue;
      // Converting here, not before the Philox loop, lets the loads land while it runs.
      if (k == 0) {
#pragma unroll
        for (int j = 0; j < kRun; ++j) a[r][j] = scale(terms.alpha, to_float(x[r].v[j]));
      }
#pragma unroll
      for (int j = 0; j < kRun; ++j) a[r][j] = add_term(a[r][j], c, normals[pad(lane0 + j0 + j)]);
    }
    __syncthreads();  // all reads done before the next term (or tile) overwrites
  }
#pragma unroll
  for (int r = 0; r < kRuns; ++r) {
    if (run_start(r) >= n) continue;
#pragma unroll
    for (int j = 0; j < kRun; ++j) x[r].v[j] = from_float<T>(a[r][j]);
  }
}

template <typename T, Dist D>
__global__ void __launch_bounds__(kThreads) perturb_kernel(const __grid_constant__ Batch batch,
                                                           const __grid_constant__ Terms terms) {
  const int64_t total = batch.tile_end[batch.n - 1];
  int cur = 0;
  unsigned parity = 0;
  for (int64_t tile = blockIdx.x; tile < total; tile += gridDim.x, parity ^= 1u) {
    while (tile >= batch.tile_end[cur]) ++cur;  // a CTA's tiles only increase
    T* const p = static_cast<T*>(batch.ptr[cur]);
    const int64_t L = (tile - (cur ? batch.tile_end[cur - 1] : 0)) * kTile;  // tile start in the tensor
    const int64_t left = batch.numel[cur] - L;                                // >= 1
    const int n = static_cast<int>(left < kTile ? left : kTile);
    const uint64_t G = static_cast<uint64_t>(batch.base[cur]) + static_cast<uint64_t>(L);
    // Runs start at multiples of 16 bytes from p, so p's alignment decides for all of them.
    const bool vec = (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
    T* const t = p + L;

    Run<T> x[kRuns];
#pragma unroll
    for (int r = 0; r < kRuns; ++r) load_run(x[r], t + run_start(r), n - run_start(r), vec);

    if constexpr (D == Dist::kRademacher) {
      rademacher_tile(x, G, n, parity, terms);
    } else {
      gaussian_tile(x, G, n, terms);
    }

#pragma unroll
    for (int r = 0; r < kRuns; ++r) store_run(t + run_start(r), x[r], n - run_start(r), vec);
  }
}

// Resident CTAs per SM; queried once per kernel (it depends only on the architecture,
// and only sizes the grid).
template <typename T, Dist D>
int blocks_per_sm() {
  static const int cached = [] {
    int n = 0;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, perturb_kernel<T, D>, kThreads, 0) != cudaSuccess ||
        n < 1) {
      (void)cudaGetLastError();  // not sticky; don't report it as the launch's error
      n = 2;
    }
    return n;
  }();
  return cached;
}

template <typename T, Dist D>
cudaError_t launch_batch(const Batch& b, const Terms& terms, int sm_count, cudaStream_t stream) {
  const int64_t tiles = b.tile_end[b.n - 1];
  const int64_t cap = static_cast<int64_t>(sm_count) * blocks_per_sm<T, D>();
  const int grid = static_cast<int>(std::min(tiles, cap));
  perturb_kernel<T, D><<<grid, kThreads, 0, stream>>>(b, terms);
  return cudaGetLastError();
}

template <typename T, Dist D>
cudaError_t launch_all(void* const* ptrs, const int64_t* numels, const int64_t* offsets, int n_tensors,
                       const Terms& terms, int sm_count, cudaStream_t stream) {
  Batch b{};
  int64_t tiles = 0;
  for (int i = 0; i < n_tensors; ++i) {
    if (numels[i] == 0) continue;
    b.ptr[b.n] = ptrs[i];
    b.numel[b.n] = numels[i];
    b.base[b.n] = offsets[i];
    tiles += numels[i] / kTile + (numels[i] % kTile != 0);  // no numel + kTile - 1: it could overflow
    b.tile_end[b.n] = tiles;
    if (++b.n == kMaxTensors) {
      const cudaError_t err = launch_batch<T, D>(b, terms, sm_count, stream);
      if (err != cudaSuccess) return err;
      b.n = 0;
      tiles = 0;
    }
  }
  return b.n ? launch_batch<T, D>(b, terms, sm_count, stream) : cudaSuccess;
}

template <typename T>
cudaError_t launch_dist(Dist dist, void* const* ptrs, const int64_t* numels, const int64_t* offsets,
                        int n_tensors, const Terms& terms, int sm_count, cudaStream_t stream) {
  return dist == Dist::kRademacher
             ? launch_all<T, Dist::kRademacher>(ptrs, numels, offsets, n_tensors, terms, sm_count, stream)
             : launch_all<T, Dist::kGaussian>(ptrs, numels, offsets, n_tensors, terms, sm_count, stream);
}

}  // namespace

cudaError_t perturb_launch(ElemType dtype, void* const* ptrs, const int64_t* numels, const int64_t* offsets,
                           int n_tensors, const Terms& terms, Dist dist, int sm_count, cudaStream_t stream) {
  if (n_tensors < 0 || terms.count < 1 || terms.count > kMaxTerms ||
      (dist != Dist::kRademacher && dist != Dist::kGaussian)) {
    return cudaErrorInvalidValue;
  }
  // Validate everything before launching anything: global indices must stay below 2^63.
  for (int i = 0; i < n_tensors; ++i) {
    if (numels[i] < 0 || offsets[i] < 0 || numels[i] > INT64_MAX - offsets[i] ||
        (numels[i] > 0 && ptrs[i] == nullptr)) {
      return cudaErrorInvalidValue;
    }
  }
  sm_count = std::max(sm_count, 1);
  switch (dtype) {
    case ElemType::kFloat32:
      return launch_dist<float>(dist, ptrs, numels, offsets, n_tensors, terms, sm_count, stream);
    case ElemType::kBFloat16:
      return launch_dist<__nv_bfloat16>(dist, ptrs, numels, offsets, n_tensors, terms, sm_count, stream);
    case ElemType::kFloat16:
      return launch_dist<__half>(dist, ptrs, numels, offsets, n_tensors, terms, sm_count, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace zo
