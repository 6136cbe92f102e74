// Torch binding of the CPU kernel (perturb_cpu_kernel.h): argument plumbing and at::parallel_for.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <vector>

#include "perturb_cpu_kernel.h"

namespace {

constexpr int64_t kGrain = 1024;  // groups per task: 128K elements

template <typename T>
void perturb_tensor(T* data, int64_t numel, uint64_t base, const zo::Terms& terms, zo::Dist dist) {
  at::parallel_for(zo::cpu::first_group(base), zo::cpu::end_group(base, numel), kGrain, [&](int64_t g0, int64_t g1) {
    zo::cpu::perturb_groups(data, numel, base, terms, dist, g0, g1);
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
      case at::kBFloat16: perturb_tensor(reinterpret_cast<zo::cpu::bf16*>(t.data_ptr<at::BFloat16>()), t.numel(), base, terms, d); break;
      case at::kHalf: perturb_tensor(reinterpret_cast<zo::cpu::f16*>(t.data_ptr<at::Half>()), t.numel(), base, terms, d); break;
      default: TORCH_CHECK(false, "perturb_: params[", i, "] has unsupported dtype ", t.scalar_type());
    }
  }
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "zounlearn CPU kernels (ZO-RNG v1)";
#if defined(__AVX2__)
  m.attr("isa") = "avx2";
#else
  m.attr("isa") = "baseline";
#endif
  m.def("perturb_", &perturb_, "theta <- alpha * theta + sum_k c_k z(seed, stream_k, e), in place");
}
