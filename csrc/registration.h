// What both Python modules (zounlearn._C_cpu, zounlearn._C_cuda) bind: register_kernels(), which
// registers a device's kernels of the ops for its dispatch key when zounlearn/ops/backends.py
// chooses them. No Python runs between a torch.ops.zounlearn call and these kernels.
#pragma once

#include <torch/extension.h>
#include <torch/library.h>

#include <memory>

namespace zo {

// The kernels stay registered while Python holds this object.
struct Registration {
  std::unique_ptr<torch::Library> library;
};

}  // namespace zo

// In PYBIND11_MODULE(name, m): binds m.register_kernels() for namespace ns's kernels and `key`.
#define ZO_BIND_KERNEL_REGISTRATION(m, key, ns)                                                               \
  /* module_local: _C_cpu and _C_cuda both bind it, and pybind11 types are global by default */            \
  pybind11::class_<zo::Registration>(m, "Registration", pybind11::module_local());                            \
  m.def(                                                                                                      \
      "register_kernels",                                                                                     \
      [] {                                                                                                    \
        auto r = std::make_unique<zo::Registration>();                                                        \
        r->library = std::make_unique<torch::Library>(torch::Library::IMPL, "zounlearn", key, __FILE__,       \
                                                      __LINE__);                                              \
        r->library->impl("perturb_", TORCH_FN(ns::perturb_));                                                 \
        r->library->impl("perturb_into", TORCH_FN(ns::perturb_into));                                         \
        r->library->impl("zo_update_", TORCH_FN(ns::zo_update_));                                             \
        r->library->impl("grad_update_", TORCH_FN(ns::grad_update_));                                         \
        return r;                                                                                             \
      },                                                                                                      \
      "Register this module's kernels for torch.ops.zounlearn.*; deleting the returned object removes them.")
