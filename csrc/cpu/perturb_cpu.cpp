// Torch binding of the CPU kernel (perturb_cpu_kernel.h): argument plumbing and at::parallel_for.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <atomic>
#include <vector>

#include "../op_args.h"
#include "perturb_cpu_kernel.h"

namespace {

constexpr int64_t kGrain = 1024;  // groups per task: 128K elements

// One tensor's share of the work: its groups are [first, first + count) of the global index.
struct Span {
  void* data;
  int64_t numel;
  uint64_t base;
  at::ScalarType dtype;
  int64_t first;
  int64_t count;
};

void run_groups(const Span& s, const zo::Terms& terms, zo::Dist d, int64_t g0, int64_t g1) {
  switch (s.dtype) {
    case at::kFloat: return zo::cpu::perturb_groups(static_cast<float*>(s.data), s.numel, s.base, terms, d, g0, g1);
    case at::kBFloat16:
      return zo::cpu::perturb_groups(static_cast<zo::cpu::bf16*>(s.data), s.numel, s.base, terms, d, g0, g1);
    default: return zo::cpu::perturb_groups(static_cast<zo::cpu::f16*>(s.data), s.numel, s.base, terms, d, g0, g1);
  }
}

// Arguments arrive validated by zounlearn.ops; these checks guard the raw pointers, and all of
// them run before any tensor is written.
void perturb_(const std::vector<at::Tensor>& params, const std::vector<int64_t>& offsets, double alpha,
              const std::vector<double>& coefs, const std::vector<int64_t>& streams, int64_t seed,
              int64_t dist) {
  const zo::Terms terms = zo::checked_terms(params.size(), offsets, alpha, coefs, streams, seed, dist);
  std::vector<Span> spans;
  std::vector<int64_t> starts{0};  // prefix sums of group counts: one task space for all tensors
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& t = params[i];
    const auto type = t.scalar_type();
    TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && offsets[i] >= 0,
                "perturb_: params[", i, "] must be a contiguous CPU tensor with offset >= 0");
    TORCH_CHECK(type == at::kFloat || type == at::kBFloat16 || type == at::kHalf, "perturb_: params[", i,
                "] has unsupported dtype ", type);
    if (t.numel() == 0) continue;
    const auto base = static_cast<uint64_t>(offsets[i]);
    const int64_t first = zo::cpu::first_group(base);
    spans.push_back({t.data_ptr(), t.numel(), base, type, first, zo::cpu::end_group(base, t.numel()) - first});
    starts.push_back(starts.back() + spans.back().count);
  }
  const auto d = static_cast<zo::Dist>(dist);
  // Many small tensors share one parallel region instead of paying for one each.
  at::parallel_for(0, starts.back(), kGrain, [&](int64_t begin, int64_t end) {
    size_t i = std::upper_bound(starts.begin(), starts.end(), begin) - starts.begin() - 1;
    for (int64_t task = begin; task < end; ++i) {
      const int64_t stop = std::min(end, starts[i + 1]);
      const int64_t g0 = spans[i].first + (task - starts[i]);
      run_groups(spans[i], terms, d, g0, g0 + (stop - task));
      task = stop;
    }
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "zounlearn CPU kernels (ZO-RNG v1)";
#if defined(__AVX2__)
  m.attr("isa") = "avx2";
#else
  m.attr("isa") = "baseline";
#endif
  // How many threads this module's at::parallel_for really uses: 1 when it was built without
  // OpenMP, whatever torch.get_num_threads() says. A test checks it.
  m.def("parallel_threads", [] {
    std::atomic<int> threads{0};
    at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) { threads.fetch_add(1); });
    return threads.load();
  });
  m.def("perturb_", &perturb_, "theta <- alpha * theta + sum_k c_k z(seed, stream_k, e), in place");
}
