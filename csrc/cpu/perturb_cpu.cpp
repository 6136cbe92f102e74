// The fused perturbation op on the CPU: theta <- alpha * theta + sum_k c_k * z_k, in place.
// Work is split into groups of 128 global elements (one Rademacher Philox block,
// or 32 Gaussian blocks); each group is loaded once, updated in a float32 buffer
// for every term and stored with one rounding. No parameter-sized temporaries.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <vector>

#include "../zo_rng.h"

namespace {

constexpr int64_t kGroup = zo::kRademacherPerBlock;
constexpr int64_t kGrain = 1024;  // groups per task: 128K elements

// acc[0 .. len) covers lanes lane0 .. lane0 + len - 1 of group `group`.
void add_rademacher(float* acc, int64_t lane0, int64_t len, uint64_t group, uint64_t seed,
                    uint64_t stream, float c) {
  const zo::Words r = zo::philox(seed, group, stream);
  if (len == kGroup) {
    // Fixed trip counts and no data-dependent indexing: this loop vectorises.
    for (int q = 0; q < 4; ++q) {
      const uint32_t w = r.w[q];
      float* a = acc + 32 * q;
      for (uint32_t b = 0; b < 32; ++b) a[b] += zo::signed_coef(c, (w >> b) & 1u);
    }
    return;
  }
  for (int64_t j = 0; j < len; ++j) acc[j] += zo::signed_coef(c, zo::rademacher_bit(r, lane0 + j));
}

void add_gaussian(float* acc, int64_t lane0, int64_t len, uint64_t group, uint64_t seed,
                  uint64_t stream, float c) {
  float z[kGroup];
  const int64_t first = lane0 / zo::kGaussianPerBlock;
  const int64_t last = (lane0 + len - 1) / zo::kGaussianPerBlock;
  const uint64_t blocks_per_group = kGroup / zo::kGaussianPerBlock;
  for (int64_t b = first; b <= last; ++b) {
    zo::gaussian4(zo::philox(seed, group * blocks_per_group + b, stream), z + 4 * b);
  }
  const float* zl = z + lane0;
  for (int64_t j = 0; j < len; ++j) acc[j] = zo::add_term(acc[j], c, zl[j]);
}

template <typename T>
void perturb_tensor(T* data, int64_t numel, uint64_t base, const zo::Terms& terms, zo::Dist dist) {
  if (numel == 0) return;
  const int64_t first_group = static_cast<int64_t>(base / kGroup);
  const int64_t end_group = static_cast<int64_t>((base + numel - 1) / kGroup) + 1;
  at::parallel_for(first_group, end_group, kGrain, [&](int64_t g0, int64_t g1) {
    float acc[kGroup];
    for (int64_t g = g0; g < g1; ++g) {
      const uint64_t group_start = static_cast<uint64_t>(g) * kGroup;
      const uint64_t e0 = std::max(group_start, base);
      const uint64_t e1 = std::min(group_start + kGroup, base + numel);
      const int64_t lane0 = static_cast<int64_t>(e0 - group_start);
      const int64_t len = static_cast<int64_t>(e1 - e0);
      T* p = data + (e0 - base);
      for (int64_t j = 0; j < len; ++j) acc[j] = zo::scale(terms.alpha, static_cast<float>(p[j]));
      for (int k = 0; k < terms.count; ++k) {
        if (dist == zo::Dist::kRademacher) {
          add_rademacher(acc, lane0, len, g, terms.seed, terms.stream[k], terms.coef[k]);
        } else {
          add_gaussian(acc, lane0, len, g, terms.seed, terms.stream[k], terms.coef[k]);
        }
      }
      for (int64_t j = 0; j < len; ++j) p[j] = static_cast<T>(acc[j]);
    }
  });
}

// Arguments arrive validated by zounlearn.ops; the checks here only guard the raw pointers.
void perturb_(const std::vector<at::Tensor>& params, const std::vector<int64_t>& offsets, double alpha,
              const std::vector<double>& coefs, const std::vector<int64_t>& streams, int64_t seed,
              int64_t dist) {
  TORCH_CHECK(params.size() == offsets.size(), "perturb_: one offset per tensor");
  TORCH_CHECK(!coefs.empty() && coefs.size() <= zo::kMaxTerms && coefs.size() == streams.size(),
              "perturb_: 1 to 8 terms, one stream per coefficient");
  zo::Terms terms{};
  terms.seed = static_cast<uint64_t>(seed);
  terms.alpha = static_cast<float>(alpha);
  terms.count = static_cast<int>(coefs.size());
  for (int k = 0; k < terms.count; ++k) {
    terms.coef[k] = static_cast<float>(coefs[k]);
    terms.stream[k] = static_cast<uint64_t>(streams[k]);
  }
  const auto d = static_cast<zo::Dist>(dist);
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& t = params[i];
    TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && offsets[i] >= 0,
                "perturb_: params[", i, "] must be a contiguous CPU tensor with offset >= 0");
    const auto base = static_cast<uint64_t>(offsets[i]);
    switch (t.scalar_type()) {
      case at::kFloat: perturb_tensor(t.data_ptr<float>(), t.numel(), base, terms, d); break;
      case at::kBFloat16: perturb_tensor(t.data_ptr<at::BFloat16>(), t.numel(), base, terms, d); break;
      case at::kHalf: perturb_tensor(t.data_ptr<at::Half>(), t.numel(), base, terms, d); break;
      default: TORCH_CHECK(false, "perturb_: params[", i, "] has unsupported dtype ", t.scalar_type());
    }
  }
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "zounlearn CPU kernels (ZO-RNG v1)";
  m.def("perturb_", &perturb_, "theta <- alpha * theta + sum_k c_k z(seed, stream_k, e), in place");
}
