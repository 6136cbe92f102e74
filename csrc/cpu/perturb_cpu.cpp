// The CPU perturbation kernels (perturb_cpu_kernel.h) behind torch.ops.zounlearn.perturb_ and
// perturb_into: the pointer checks, then one parallel loop over every tensor's groups.
#include <ATen/Parallel.h>

#include <atomic>

#include "ops_cpu.h"

namespace zo::cpu {

void perturb_(at::TensorList params, at::IntArrayRef offsets, at::ArrayRef<double> coefs, at::IntArrayRef streams,
              int64_t seed, c10::string_view dist, double alpha) {
  constexpr const char* op = "perturb_";
  const Terms terms = checked_terms(params.size(), offsets, coefs, streams, seed, alpha, op);
  const Dist d = checked_dist(dist, op);
  const GroupRanges ranges = checked_groups(params, offsets, op);
  const KernelTable& k = kernels();
  parallel_over_groups(ranges, [&](size_t i, int64_t g0, int64_t g1) {
    const at::Tensor& t = params[i];
    k.perturb(dtype_of(t), t.data_ptr(), t.data_ptr(), t.numel(), static_cast<uint64_t>(offsets[i]), terms, d, g0,
              g1);
  });
  bump_versions(params);
}

void perturb_into(at::TensorList params, at::TensorList out, at::IntArrayRef offsets, at::ArrayRef<double> coefs,
                  at::IntArrayRef streams, int64_t seed, c10::string_view dist, double alpha) {
  constexpr const char* op = "perturb_into";
  const Terms terms = checked_terms(params.size(), offsets, coefs, streams, seed, alpha, op);
  const Dist d = checked_dist(dist, op);
  TORCH_CHECK(out.size() == params.size(), op, ": one output per tensor");
  const GroupRanges ranges = checked_groups(params, offsets, op);
  for (size_t i = 0; i < params.size(); ++i) check_like(out[i], params[i], params[i].scalar_type(), op, "out", i);
  const KernelTable& k = kernels();
  parallel_over_groups(ranges, [&](size_t i, int64_t g0, int64_t g1) {
    const at::Tensor& t = params[i];
    k.perturb(dtype_of(t), t.data_ptr(), out[i].data_ptr(), t.numel(), static_cast<uint64_t>(offsets[i]), terms, d,
              g0, g1);
  });
  bump_versions(out);
}

int parallel_threads() {
  std::atomic<int> threads{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) { threads.fetch_add(1); });
  return threads.load();
}

}  // namespace zo::cpu
