// Which build of the CPU kernels runs (kernel_table.h), chosen as ATen's DispatchStub chooses its
// CPU capability: the highest instruction set this processor and its operating system support
// (cpuid, xgetbv), unless ZOUNLEARN_CPU_CAPABILITY names one; set_capability() switches later.
#pragma once

#include <string>
#include <utility>
#include <vector>

#include "kernel_table.h"

namespace zo::cpu {

constexpr const char* kCapabilityEnv = "ZOUNLEARN_CPU_CAPABILITY";

// The table every op call uses; the first call reads ZOUNLEARN_CPU_CAPABILITY and fails, with a
// one-line reason, when it names an unknown build or one this processor cannot run.
const KernelTable& kernels();

// Makes build `name` the one that runs (the same checks as the environment variable's).
void set_capability(const std::string& name);

// Every build, lowest instruction set first, with whether this processor can run it.
std::vector<std::pair<std::string, bool>> capabilities();

}  // namespace zo::cpu
