// Shared by the CPU and CUDA bindings: the op's scalar arguments, checked and turned into
// zo::Terms, zo::Rule and zo::Hyper. zounlearn.ops validates first; these checks guard the raw pointers.
#pragma once

#include <c10/util/Exception.h>

#include <cstdint>
#include <vector>

#include "update_rules.h"
#include "zo_rng.h"

namespace zo {

inline Terms checked_terms(size_t n_params, const std::vector<int64_t>& offsets, double alpha,
                           const std::vector<double>& coefs, const std::vector<int64_t>& streams, int64_t seed,
                           int64_t dist) {
  TORCH_CHECK(n_params == offsets.size(), "perturb_: one offset per tensor");
  TORCH_CHECK(!coefs.empty() && coefs.size() <= kMaxTerms && coefs.size() == streams.size(),
              "perturb_: 1 to 8 terms, one stream per coefficient");
  TORCH_CHECK(dist == 0 || dist == 1, "perturb_: dist must be 0 (rademacher) or 1 (gaussian), got ", dist);
  return make_terms(alpha, coefs.data(), streams.data(), static_cast<int>(coefs.size()), seed);
}

inline Rule checked_rule(int64_t rule, const char* op) {
  TORCH_CHECK(rule >= 0 && rule < kRules, op, ": unknown rule ", rule);
  return static_cast<Rule>(rule);
}

inline Hyper checked_hyper(const std::vector<double>& hyper, const char* op) {
  TORCH_CHECK(hyper.size() == kHyperFields, op, ": hyper must have ", kHyperFields, " values, got ", hyper.size());
  return make_hyper(hyper.data());
}

}  // namespace zo
