// Torch binding of the CPU perturbation kernel (perturb_cpu_kernel.h): argument plumbing and
// one parallel loop over every tensor's groups.
#include <torch/extension.h>

#include <atomic>
#include <vector>

#include "../op_args.h"
#include "ops_cpu.h"
#include "parallel_groups.h"
#include "perturb_cpu_kernel.h"

namespace zo::cpu {

// Arguments arrive validated by zounlearn.ops; these checks guard the raw pointers, and all of
// them run before any tensor is written.
void perturb_(const std::vector<at::Tensor>& params, const std::vector<int64_t>& offsets, double alpha,
              const std::vector<double>& coefs, const std::vector<int64_t>& streams, int64_t seed, int64_t dist) {
  const Terms terms = checked_terms(params.size(), offsets, alpha, coefs, streams, seed, dist);
  GroupRanges ranges;
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& t = params[i];
    const auto type = t.scalar_type();
    TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && offsets[i] >= 0,
                "perturb_: params[", i, "] must be a contiguous CPU tensor with offset >= 0");
    TORCH_CHECK(type == at::kFloat || type == at::kBFloat16 || type == at::kHalf, "perturb_: params[", i,
                "] has unsupported dtype ", type);
    const auto base = static_cast<uint64_t>(offsets[i]);
    const int64_t first = first_group(base);
    ranges.add(i, first, t.numel() == 0 ? 0 : end_group(base, t.numel()) - first);
  }
  const auto d = static_cast<Dist>(dist);
  parallel_over_groups(ranges, [&](size_t i, int64_t g0, int64_t g1) {
    const at::Tensor& t = params[i];
    const auto base = static_cast<uint64_t>(offsets[i]);
    switch (t.scalar_type()) {
      case at::kFloat: return perturb_groups(static_cast<float*>(t.data_ptr()), t.numel(), base, terms, d, g0, g1);
      case at::kBFloat16:
        return perturb_groups(static_cast<bf16*>(t.data_ptr()), t.numel(), base, terms, d, g0, g1);
      default: return perturb_groups(static_cast<f16*>(t.data_ptr()), t.numel(), base, terms, d, g0, g1);
    }
  });
}

int parallel_threads() {
  std::atomic<int> threads{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) { threads.fetch_add(1); });
  return threads.load();
}

}  // namespace zo::cpu
