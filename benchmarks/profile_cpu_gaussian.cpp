// Where the CPU Gaussian pass spends its time, stage by stage, single thread, data in L1/L2.
// Build and run (from the repository root):
//   g++ -O3 -std=c++17 -ffp-contract=off -fno-math-errno -mavx2 -mfma -mf16c -Icsrc \
//       benchmarks/profile_cpu_gaussian.cpp -o /tmp/profile_cpu_gaussian && /tmp/profile_cpu_gaussian
// Prints nanoseconds per element of each stage of zo::cpu::gaussian_group and of the whole.
#include "cpu/perturb_cpu_kernel.h"  // torch-free
#include <chrono>
#include <cstdio>
using namespace zo; using namespace zo::cpu;
alignas(32) uint32_t c0[32], c1[32], c2[32], c3[32];
alignas(32) float r01[32], r23[32], t01[32], t23[32], z[128];
template <class F> double T(F f) { double best = 1e9; for (int r = 0; r < 50; ++r) { auto s = std::chrono::steady_clock::now(); for (int g = 0; g < 4096; ++g) f(g); best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - s).count()); } return best / (4096.0 * 128) * 1e9; }
int main() {
  printf("philox  %.3f\n", T([](int g){ philox_lanes<32>(1, g * 32, 0, c0, c1, c2, c3); }));
  printf("radius  %.3f (log, sqrt; the compiler may hoist part of it)\n", T([](int g){ c0[g&31] = g; for (int i = 0; i < 32; ++i) { r01[i] = box_muller_radius(c0[i]); r23[i] = box_muller_radius(c2[i]); } }));
  printf("angle   %.3f\n", T([](int g){ c1[g&31] = g; for (int i = 0; i < 32; ++i) { t01[i] = box_muller_angle(c1[i]); t23[i] = box_muller_angle(c3[i]); } }));
  printf("sincos  %.3f\n", T([](int g){ t01[g&31] = g*1e-4f; for (int i = 0; i < 32; ++i) { float s01, cc01, s23, cc23; box_muller_sincos(t01[i], s01, cc01); box_muller_sincos(t23[i], s23, cc23);
    z[4*i] = r01[i]*cc01; z[4*i+1] = r01[i]*s01; z[4*i+2] = r23[i]*cc23; z[4*i+3] = r23[i]*s23; } }));
  printf("whole   %.3f\n", T([](int g){ gaussian_group(1, g, 0, z); }));
}
