// The Python module zounlearn._C_cpu: registers the CPU kernels of ops_cpu.h for the CPU dispatch
// key when zounlearn/ops/backends.py chooses them, and says which build of them runs.
#include <string>
#include <tuple>
#include <vector>

#include "../registration.h"
#include "ops_cpu.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "zounlearn CPU kernels (ZO-RNG v2)";
  m.def("capability", [] { return std::string(zo::cpu::kernels().name); },
        "The build of the kernels that runs (ZOUNLEARN_CPU_CAPABILITY, else the highest this processor runs).");
  m.def("set_capability", &zo::cpu::set_capability, "Run build `name` from now on ('auto': the highest).");
  m.def("capabilities", &zo::cpu::capabilities, "(name, this processor runs it) of every build, lowest first.");
  // A test checks this: 1 would mean the module was built without OpenMP, whatever
  // torch.get_num_threads() says.
  m.def("parallel_threads", &zo::cpu::parallel_threads);
  ZO_BIND_KERNEL_REGISTRATION(m, c10::DispatchKey::CPU, zo::cpu);
  m.def("rules", [] {
    std::vector<std::tuple<std::string, bool, bool, bool, bool, bool>> out;
#define ZO_RULE_ROW(e, name, rm, rv, wm, wv, zo) out.emplace_back(name, rm, rv, wm, wv, zo);
    ZO_UPDATE_RULES(ZO_RULE_ROW)
#undef ZO_RULE_ROW
    return out;
  }, "The compiled rule table: (name, reads m, reads v, writes m, writes v, zeroth-order) per rule.");
  m.def("hyper_fields", [] {
#define ZO_HYPER_NAME(name) #name,
    return std::vector<std::string>{ZO_HYPER_FIELDS(ZO_HYPER_NAME)};
#undef ZO_HYPER_NAME
  }, "The hyperparameters' names in the order the kernels take them.");
}
