// One at::parallel_for over the 128-element groups of many tensors: tensor i owns groups
// [first[i], first[i] + count[i]) of its own numbering; tasks never mix what a group means.
// Many small tensors share one parallel region instead of paying for one each.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace zo::cpu {

constexpr int64_t kGrain = 1024;  // groups per task: 128K elements

struct GroupRanges {
  std::vector<size_t> tensor;   // which input tensor each range belongs to
  std::vector<int64_t> first;   // its first group
  std::vector<int64_t> starts{0};  // prefix sums of group counts

  void add(size_t i, int64_t first_group, int64_t count) {
    if (count == 0) return;
    tensor.push_back(i);
    first.push_back(first_group);
    starts.push_back(starts.back() + count);
  }
};

// fn(tensor index, g0, g1) for disjoint group ranges covering everything, in parallel.
template <typename F>
void parallel_over_groups(const GroupRanges& r, const F& fn) {
  at::parallel_for(0, r.starts.back(), kGrain, [&](int64_t begin, int64_t end) {
    size_t j = std::upper_bound(r.starts.begin(), r.starts.end(), begin) - r.starts.begin() - 1;
    for (int64_t task = begin; task < end; ++j) {
      const int64_t stop = std::min(end, r.starts[j + 1]);
      const int64_t g0 = r.first[j] + (task - r.starts[j]);
      fn(r.tensor[j], g0, g0 + (stop - task));
      task = stop;
    }
  });
}

}  // namespace zo::cpu
