// The Python module zounlearn._C_cuda: the CUDA ops of ops_cuda.h, with the CPU module's signatures.
#include <torch/extension.h>

#include "ops_cuda.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "zounlearn CUDA kernels (ZO-RNG v1)";
  m.def("perturb_", &zo::gpu::perturb_, "theta <- alpha * theta + sum_k c_k z(seed, stream_k, e), in place");
  m.def("zo_update_", &zo::gpu::zo_update_,
        "theta <- rule(theta + restore z_last, sum_k c_k z_k, m, v), in place (update_rules.h)");
  m.def("grad_update_", &zo::gpu::grad_update_, "theta <- rule(theta, grad, m, v), in place (update_rules.h)");
}
