// The CPU module's ops, bound to Python in module_cpu.cpp.
#pragma once

#include <torch/extension.h>

#include <optional>
#include <vector>

namespace zo::cpu {

void perturb_(const std::vector<at::Tensor>& params, const std::vector<int64_t>& offsets, double alpha,
              const std::vector<double>& coefs, const std::vector<int64_t>& streams, int64_t seed, int64_t dist);

void zo_update_(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& m,
                const std::vector<at::Tensor>& v, const std::vector<int64_t>& offsets, const std::vector<double>& coefs,
                const std::vector<int64_t>& streams, int64_t seed, int64_t dist, double restore, int64_t rule,
                const std::vector<double>& hyper);

void grad_update_(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                  const std::vector<at::Tensor>& m, const std::vector<at::Tensor>& v,
                  const std::optional<at::Tensor>& scales, int64_t rule, const std::vector<double>& hyper);

// Threads this module's at::parallel_for really uses (1 when built without OpenMP).
int parallel_threads();

}  // namespace zo::cpu
