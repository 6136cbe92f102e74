// The Python module zounlearn._C_cuda: registers the CUDA kernels of ops_cuda.h for the CUDA
// dispatch key when zounlearn/ops/backends.py chooses them.
#include "../registration.h"
#include "ops_cuda.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "zounlearn CUDA kernels (ZO-RNG v1)";
  ZO_BIND_KERNEL_REGISTRATION(m, c10::DispatchKey::CUDA, zo::gpu);
}
