// The multi-tensor machinery of the CUDA kernels (in the style of apex's / PyTorch's
// multi_tensor_apply), no torch. An op is a functor: its members are the launch's scalar
// arguments, and operator()(const Tile<kPtrs>&) does the work of one tile with all the
// CTA's threads. multi_tensor_kernel<Op> walks the tiles of up to batch_cap tensors per
// launch; launch_tensors packs the tensors of a call into such batches.
//
// Work unit: a tile of kTile = 4096 consecutive elements of one tensor, aligned to the
// tensor's start (so 16-byte vector access depends only on the tensor's pointers), not to
// its global base offset (so a tile's random blocks may start mid-group). A CTA walks tiles
// grid-stride and finds each tile's tensor from per-tensor tile prefix sums in the kernel
// parameters. All indices are 64-bit; only offsets inside a tile are int.
//
// Per tile, each thread owns kRuns runs of kRun contiguous elements (one 16-byte vector of
// bf16/fp16, two of float), runs strided by kThreads so every warp access is coalesced.
// Math is float32 for every storage type, rounded once at the store.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "kernels.cuh"

namespace zo {
namespace mt {

constexpr int kThreads = 256;
constexpr int kRun = 8;   // contiguous elements per run: 16 B of bf16/fp16, 32 B of float
constexpr int kRuns = 2;  // runs per thread per tile
constexpr int kTile = kThreads * kRun * kRuns;  // 4096 elements
constexpr int kMaxTensors = 120;                // per launch, whatever the op
constexpr size_t kParamBytes = 4096;            // kernel parameter space every launch stays within

// The tensors of one launch, in the kernel parameters. ptr[s][i] is pointer s (the param,
// its state, ...; the op says which) of tensor i.
template <int P, int Cap>
struct Batch {
  static constexpr int kPtrs = P;
  static constexpr int kCap = Cap;
  void* ptr[P][Cap];
  int64_t numel[Cap];
  int64_t base[Cap];      // global index of element 0
  int64_t tile_end[Cap];  // inclusive prefix sum of tiles per tensor
  int n;
};

// Tensors per launch for P pointers each next to op_bytes of op arguments: 120 for one
// pointer, fewer for more (the update ops carry param, state and gradient pointers).
constexpr int batch_cap(int ptrs, size_t op_bytes) {
  const size_t fit = (kParamBytes - op_bytes - sizeof(int64_t)) / (sizeof(int64_t) * (ptrs + 3));
  return fit < static_cast<size_t>(kMaxTensors) ? static_cast<int>(fit) : kMaxTensors;
}

template <typename Op>
using BatchOf = Batch<Op::kPtrs, batch_cap(Op::kPtrs, sizeof(Op))>;

// One tile as an op sees it.
template <int P>
struct Tile {
  void* ptr[P];     // the tensor's pointers (its element 0, not the tile's)
  int tensor;       // index in the batch
  int64_t start;    // index of the tile's element 0 in the tensor, a multiple of kTile
  int n;            // elements in the tile, 1 .. kTile
  uint64_t G;       // global index of the tile's element 0: base + start
  unsigned parity;  // flips from one tile of a CTA to its next (double-buffered shared memory)

  // Pointer s at the tile's element 0.
  template <typename T>
  __device__ __forceinline__ T* at(int s) const {
    return static_cast<T*>(ptr[s]) + start;
  }
  // Runs start at multiples of 16 bytes from the tensor's start, so its alignment decides for all.
  __device__ __forceinline__ bool vec(int s) const { return (reinterpret_cast<uintptr_t>(ptr[s]) & 15u) == 0; }
};

template <typename Op>
__global__ void __launch_bounds__(kThreads)
    multi_tensor_kernel(const __grid_constant__ BatchOf<Op> batch, const __grid_constant__ Op op) {
  const int64_t total = batch.tile_end[batch.n - 1];
  int cur = 0;
  unsigned parity = 0;
  for (int64_t tile = blockIdx.x; tile < total; tile += gridDim.x, parity ^= 1u) {
    while (tile >= batch.tile_end[cur]) ++cur;  // a CTA's tiles only increase
    Tile<Op::kPtrs> t;
#pragma unroll
    for (int s = 0; s < Op::kPtrs; ++s) t.ptr[s] = batch.ptr[s][cur];
    t.tensor = cur;
    t.start = (tile - (cur ? batch.tile_end[cur - 1] : 0)) * kTile;
    const int64_t left = batch.numel[cur] - t.start;  // >= 1
    t.n = static_cast<int>(left < kTile ? left : kTile);
    t.G = static_cast<uint64_t>(batch.base[cur]) + static_cast<uint64_t>(t.start);
    t.parity = parity;
    op(t);
  }
}

// ---- element access ----

template <typename T>
struct alignas(16) Run {
  T v[kRun];
};
static_assert(sizeof(Run<float>) == 32 && sizeof(Run<__nv_bfloat16>) == 16 && sizeof(Run<__half>) == 16,
              "a run is whole 16-byte vectors");

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

// Round to nearest even (NaN stays NaN), as torch's conversions.
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

// Stochastic rounding with the element's rounding word r (zo_rng.h); float32 needs none.
template <typename T>
__device__ __forceinline__ T from_float_stochastic(float x, uint32_t r);
template <>
__device__ __forceinline__ float from_float_stochastic<float>(float x, uint32_t) {
  return x;
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float_stochastic<__nv_bfloat16>(float x, uint32_t r) {
  return __ushort_as_bfloat16(bf16_stochastic(x, r));
}
template <>
__device__ __forceinline__ __half from_float_stochastic<__half>(float x, uint32_t r) {
  return __ushort_as_half(f16_stochastic(x, r));
}

// Stores run values a[j] (global indices e .. e + kRun - 1) into x with rd's rounding: one
// Philox block of rounding words, or two where the run straddles a block boundary.
template <typename T>
__device__ __forceinline__ void round_run(Run<T>& x, const float (&a)[kRun], const Rounding& rd, uint64_t e) {
  if (std::is_same_v<T, float> || !rd.stochastic) {
#pragma unroll
    for (int j = 0; j < kRun; ++j) x.v[j] = from_float<T>(a[j]);
    return;
  }
  const uint64_t block = e / kRoundingPerBlock;
  const Words first = philox(rd.seed, block, rd.stream);
  const Words second = e % kRoundingPerBlock ? philox(rd.seed, block + 1, rd.stream) : first;
#pragma unroll
  for (int j = 0; j < kRun; ++j) {
    const uint64_t ej = e + j;
    x.v[j] = from_float_stochastic<T>(a[j], rounding_bits(ej / kRoundingPerBlock == block ? first : second, ej));
  }
}

// Tile-local index of element 0 of run r of this thread.
__device__ __forceinline__ int run_start(int r) { return (r * kThreads + static_cast<int>(threadIdx.x)) * kRun; }

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

// This thread's runs of a tile of n elements starting at q.
template <typename T>
__device__ __forceinline__ void load_tile(Run<T> (&x)[kRuns], const T* q, int n, bool vec) {
#pragma unroll
  for (int r = 0; r < kRuns; ++r) load_run(x[r], q + run_start(r), n - run_start(r), vec);
}

template <typename T>
__device__ __forceinline__ void store_tile(T* q, const Run<T> (&x)[kRuns], int n, bool vec) {
#pragma unroll
  for (int r = 0; r < kRuns; ++r) store_run(q + run_start(r), x[r], n - run_start(r), vec);
}

// ---- host side ----

// Resident CTAs per SM; queried once per kernel (it depends only on the architecture,
// and only sizes the grid).
template <typename Op>
int blocks_per_sm() {
  static const int cached = [] {
    int n = 0;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, multi_tensor_kernel<Op>, kThreads, 0) != cudaSuccess ||
        n < 1) {
      (void)cudaGetLastError();  // not sticky; don't report it as the launch's error
      n = 2;
    }
    return n;
  }();
  return cached;
}

template <typename Op>
cudaError_t launch_batch(const BatchOf<Op>& b, const Op& op, int sm_count, cudaStream_t stream) {
  static_assert(sizeof(BatchOf<Op>) + sizeof(Op) <= kParamBytes, "kernel parameters must fit in 4 KB");
  const int64_t tiles = b.tile_end[b.n - 1];
  const int64_t cap = static_cast<int64_t>(std::max(sm_count, 1)) * blocks_per_sm<Op>();
  const int grid = static_cast<int>(std::min(tiles, cap));
  multi_tensor_kernel<Op><<<grid, kThreads, 0, stream>>>(b, op);
  return cudaGetLastError();
}

// Runs op over tensors 0 .. n - 1: tensor(i, ptrs, base) writes tensor i's Op::kPtrs pointers
// and global base index and returns its element count (0 skips it). Tensors are packed in call
// order into batches of up to BatchOf<Op>::kCap, one launch each. Arguments must be validated.
template <typename Op, typename F>
cudaError_t launch_tensors(const Op& op, int n, const F& tensor, int sm_count, cudaStream_t stream) {
  using B = BatchOf<Op>;
  B b{};
  int64_t tiles = 0;
  for (int i = 0; i < n; ++i) {
    void* ptrs[B::kPtrs] = {};
    int64_t base = 0;
    const int64_t numel = tensor(i, ptrs, base);
    if (numel <= 0) continue;
    for (int s = 0; s < B::kPtrs; ++s) b.ptr[s][b.n] = ptrs[s];
    b.numel[b.n] = numel;
    b.base[b.n] = base;
    tiles += numel / kTile + (numel % kTile != 0);  // no numel + kTile - 1: it could overflow
    b.tile_end[b.n] = tiles;
    if (++b.n == B::kCap) {
      const cudaError_t err = launch_batch(b, op, sm_count, stream);
      if (err != cudaSuccess) return err;
      b.n = 0;
      tiles = 0;
    }
  }
  return b.n ? launch_batch(b, op, sm_count, stream) : cudaSuccess;
}

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls fn(TypeTag<T>{}) with T the storage type of dtype (float, __nv_bfloat16, __half).
template <typename F>
cudaError_t with_elem_type(ElemType dtype, const F& fn) {
  switch (dtype) {
    case ElemType::kFloat32: return fn(TypeTag<float>{});
    case ElemType::kBFloat16: return fn(TypeTag<__nv_bfloat16>{});
    case ElemType::kFloat16: return fn(TypeTag<__half>{});
  }
  return cudaErrorInvalidValue;
}

// Calls fn(TypeTag<S>{}) with S the storage type of rule R's state (float, or __nv_bfloat16: the
// lean state); the rules that keep none take float only, so they get no second instantiation.
template <Rule R, typename F>
cudaError_t with_state_type(ElemType state, const F& fn) {
  if constexpr (rule_uses_m(R) || rule_uses_v(R)) {
    if (state == ElemType::kBFloat16) return fn(TypeTag<__nv_bfloat16>{});
  }
  return state == ElemType::kFloat32 ? fn(TypeTag<float>{}) : cudaSuccess;
}

inline bool valid_elem_type(ElemType dtype) {
  return dtype == ElemType::kFloat32 || dtype == ElemType::kBFloat16 || dtype == ElemType::kFloat16;
}

}  // namespace mt
}  // namespace zo
