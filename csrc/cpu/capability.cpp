// The CPU capability of capability.h: cpuid says what the processor has, xgetbv what the
// operating system saves on a context switch (AVX needs the YMM state, AVX-512 also the
// opmask and ZMM states).
#include "capability.h"

#include <c10/util/Exception.h>
#include <cpuid.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>

namespace zo::cpu {
namespace {

struct Build {
  const char* name;
  const KernelTable& (*table)();
  const char* const* needs;  // cpu features, null-terminated
};

constexpr const char* kNoFeatures[] = {nullptr};
constexpr const char* kAvx2Features[] = {"avx2", "fma", "f16c", nullptr};
constexpr const char* kAvx512Features[] = {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512dq", "avx512vl",
                                           nullptr};
constexpr const char* kAvx512Bf16Features[] = {"avx2",     "fma",      "f16c",        "avx512f", "avx512bw",
                                               "avx512dq", "avx512vl", "avx512_bf16", nullptr};
// Lowest first; the same names and order as isa_flags.json (a test checks).
const Build kBuilds[] = {{"generic", kernels_generic, kNoFeatures},
                         {"avx2", kernels_avx2, kAvx2Features},
                         {"avx512", kernels_avx512, kAvx512Features},
                         {"avx512_bf16", kernels_avx512_bf16, kAvx512Bf16Features}};

struct Features {
  bool avx2 = false, fma = false, f16c = false, avx512f = false, avx512bw = false, avx512dq = false,
       avx512vl = false, avx512_bf16 = false;
};

uint64_t xcr0() {
  uint32_t eax, edx;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (static_cast<uint64_t>(edx) << 32) | eax;
}

Features detect() {
  Features f;
  unsigned eax, ebx, ecx, edx;
  if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx) || !(ecx & bit_OSXSAVE)) return f;
  const uint64_t saved = xcr0();
  const bool ymm = (saved & 0x6) == 0x6;     // SSE and AVX state
  const bool zmm = (saved & 0xE6) == 0xE6;   // ... and opmask, ZMM0-15 upper halves, ZMM16-31
  const bool avx = ymm && (ecx & bit_AVX);
  f.fma = avx && (ecx & bit_FMA);
  f.f16c = avx && (ecx & bit_F16C);
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return f;
  f.avx2 = avx && (ebx & bit_AVX2);
  f.avx512f = zmm && (ebx & bit_AVX512F);
  f.avx512bw = f.avx512f && (ebx & bit_AVX512BW);
  f.avx512dq = f.avx512f && (ebx & bit_AVX512DQ);
  f.avx512vl = f.avx512f && (ebx & bit_AVX512VL);
  if (__get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx)) f.avx512_bf16 = f.avx512f && (eax & bit_AVX512BF16);
  return f;
}

bool has(const Features& f, const std::string& feature) {
  if (feature == "avx2") return f.avx2;
  if (feature == "fma") return f.fma;
  if (feature == "f16c") return f.f16c;
  if (feature == "avx512f") return f.avx512f;
  if (feature == "avx512bw") return f.avx512bw;
  if (feature == "avx512dq") return f.avx512dq;
  if (feature == "avx512vl") return f.avx512vl;
  return feature == "avx512_bf16" && f.avx512_bf16;
}

const Features& features() {
  static const Features f = detect();
  return f;
}

// The first feature of build b this processor lacks; null when it can run b.
const char* missing(const Build& b) {
  for (const char* const* need = b.needs; *need != nullptr; ++need) {
    if (!has(features(), *need)) return *need;
  }
  return nullptr;
}

std::string runnable_names() {
  std::string names;
  for (const Build& b : kBuilds) {
    if (missing(b) == nullptr) names += (names.empty() ? "" : ", ") + std::string(b.name);
  }
  return names;
}

// The table of build `name`; `what` names the request in the error (the variable, or the call).
const KernelTable& checked(const std::string& name, const std::string& what) {
  for (const Build& b : kBuilds) {
    if (name != b.name) continue;
    const char* lacks = missing(b);
    TORCH_CHECK(lacks == nullptr, what, ": this processor cannot run the ", name, " kernels (it lacks ", lacks,
                "); choose one of: ", runnable_names(), ", or auto");
    return b.table();
  }
  TORCH_CHECK(false, what, ": no such CPU capability; choose one of: ", runnable_names(), ", or auto");
}

const KernelTable& best() {
  const KernelTable* chosen = &kBuilds[0].table();
  for (const Build& b : kBuilds) {
    if (missing(b) == nullptr) chosen = &b.table();
  }
  return *chosen;
}

std::atomic<const KernelTable*> active{nullptr};

}  // namespace

const KernelTable& kernels() {
  const KernelTable* table = active.load(std::memory_order_acquire);
  if (table != nullptr) return *table;
  const char* requested = std::getenv(kCapabilityEnv);
  const std::string name = requested == nullptr ? "" : requested;
  const KernelTable* chosen = name.empty() || name == "auto" ? &best() : &checked(name, std::string(kCapabilityEnv) + "=" + name);
  // A set_capability() that raced this first call wins.
  return active.compare_exchange_strong(table, chosen, std::memory_order_acq_rel) ? *chosen : *table;
}

void set_capability(const std::string& name) {
  active.store(name == "auto" ? &best() : &checked(name, "CPU capability '" + name + "'"), std::memory_order_release);
}

std::vector<std::pair<std::string, bool>> capabilities() {
  std::vector<std::pair<std::string, bool>> out;
  for (const Build& b : kBuilds) out.emplace_back(b.name, missing(b) == nullptr);
  return out;
}

}  // namespace zo::cpu
