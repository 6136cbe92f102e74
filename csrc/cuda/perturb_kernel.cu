// Multi-tensor fused perturbation kernel (docs/rng.md), no torch:
// out <- alpha * theta + sum_k c_k * z_k, in place (out = theta) or into another tensor.
//
// Per tile (multi_tensor.cuh): loads are issued first; the tile's random numbers are then
// generated once into shared memory (rng_tile.cuh), and each thread applies all terms in
// float32 and rounds once at the store.
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels.cuh"
#include "multi_tensor.cuh"
#include "rng_tile.cuh"

namespace zo {
namespace {

using namespace mt;

template <typename T, Dist D>
struct Perturb {
  static constexpr int kPtrs = 2;  // the parameter, the output (the same pointer in place)
  Terms terms;

  __device__ __forceinline__ void operator()(const Tile<kPtrs>& t) const {
    Run<T> x[kRuns];
    load_tile(x, t.at<const T>(0), t.n, t.vec(0));
    if constexpr (D == Dist::kRademacher) {
      rademacher(x, t);
    } else {
      gaussian(x, t);
    }
    store_tile(t.at<T>(1), x, t.n, t.vec(1));
  }

  __device__ __forceinline__ void rademacher(Run<T> (&x)[kRuns], const Tile<kPtrs>& t) const {
    const RademacherWords w = rademacher_words(t, terms);
#pragma unroll
    for (int r = 0; r < kRuns; ++r) {
      const int j0 = run_start(r);
      if (j0 >= t.n) continue;
      const uint64_t e = t.G + j0;
      float a[kRun];
#pragma unroll
      for (int j = 0; j < kRun; ++j) a[j] = scale(terms.alpha, to_float(x[r].v[j]));
      w.add_terms(terms, e, a);
#pragma unroll
      for (int j = 0; j < kRun; ++j) x[r].v[j] = from_float<T>(a[j]);
    }
  }

  __device__ __forceinline__ void gaussian(Run<T> (&x)[kRuns], const Tile<kPtrs>& t) const {
    const GaussianNormals z = gaussian_normals(t);
    float a[kRuns][kRun];
    // Not unrolled: one copy of the Box-Muller code keeps the kernel small.
#pragma unroll 1
    for (int k = 0; k < terms.count; ++k) {
      z.fill(terms.seed, terms.stream[k]);
      const float c = terms.coef[k];
#pragma unroll
      for (int r = 0; r < kRuns; ++r) {
        const int j0 = run_start(r);
        if (j0 >= t.n) continue;
        // Converting here, not before the Philox loop, lets the loads land while it runs.
        if (k == 0) {
#pragma unroll
          for (int j = 0; j < kRun; ++j) a[r][j] = scale(terms.alpha, to_float(x[r].v[j]));
        }
#pragma unroll
        for (int j = 0; j < kRun; ++j) a[r][j] = add_term(a[r][j], c, z.at(j0 + j));
      }
      z.release();
    }
#pragma unroll
    for (int r = 0; r < kRuns; ++r) {
      if (run_start(r) >= t.n) continue;
#pragma unroll
      for (int j = 0; j < kRun; ++j) x[r].v[j] = from_float<T>(a[r][j]);
    }
  }
};

static_assert(BatchOf<Perturb<float, Dist::kGaussian>>::kCap == 99, "tensors per launch, as kernels.cuh says");

}  // namespace

cudaError_t perturb_launch(ElemType dtype, const void* const* ptrs, void* const* outs, const int64_t* numels,
                           const int64_t* offsets, int n_tensors, const Terms& terms, Dist dist, int sm_count,
                           cudaStream_t stream) {
  if (n_tensors < 0 || !valid_terms(terms, dist) || !valid_elem_type(dtype)) return cudaErrorInvalidValue;
  // Validate everything before launching anything: global indices must stay below 2^63.
  for (int i = 0; i < n_tensors; ++i) {
    if (numels[i] < 0 || offsets[i] < 0 || numels[i] > INT64_MAX - offsets[i] ||
        (numels[i] > 0 && (ptrs[i] == nullptr || outs[i] == nullptr))) {
      return cudaErrorInvalidValue;
    }
  }
  return with_elem_type(dtype, [&](auto type) {
    using T = typename decltype(type)::type;
    return with_dist(dist, [&](auto d) {
      return launch_tensors(
          Perturb<T, decltype(d)::value>{terms}, n_tensors,
          [&](int i, void** p, int64_t& base) {
            p[0] = const_cast<void*>(ptrs[i]);  // only read
            p[1] = outs[i];
            base = offsets[i];
            return numels[i];
          },
          sm_count, stream);
    });
  });
}

}  // namespace zo
