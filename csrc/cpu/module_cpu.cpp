// The Python module zounlearn._C_cpu: the CPU ops of ops_cpu.h.
#include <torch/extension.h>

#include "ops_cpu.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "zounlearn CPU kernels (ZO-RNG v1)";
#if defined(__AVX2__)
  m.attr("isa") = "avx2";
#else
  m.attr("isa") = "baseline";
#endif
  // A test checks this: 1 would mean the module was built without OpenMP, whatever
  // torch.get_num_threads() says.
  m.def("parallel_threads", &zo::cpu::parallel_threads);
  m.def("perturb_", &zo::cpu::perturb_, "theta <- alpha * theta + sum_k c_k z(seed, stream_k, e), in place");
  m.def("zo_update_", &zo::cpu::zo_update_,
        "theta <- rule(theta + restore z_last, sum_k c_k z_k, m, v), in place (update_rules.h)");
  m.def("grad_update_", &zo::cpu::grad_update_, "theta <- rule(theta, grad, m, v), in place (update_rules.h)");
}
