"""The CPU kernel header (csrc/cpu/perturb_cpu_kernel.h) built on its own, once for AVX2 and
once for baseline x86-64, against the oracle: the extension here is built for one ISA only,
so this is what exercises the other code path (scalar Philox rounds, SSE2 loops)."""

from __future__ import annotations

import pathlib
import shutil
import subprocess

import pytest
import torch

from zounlearn import rng

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROGRAM = r"""
#include "cpu/perturb_cpu_kernel.h"
#include <cstdio>
#include <cstdlib>
#include <vector>
// usage: seed stream offset numel dist -> z(seed, stream, offset + i) as hex floats
int main(int argc, char** argv) {
  const uint64_t seed = strtoull(argv[1], nullptr, 10), stream = strtoull(argv[2], nullptr, 10);
  const uint64_t base = strtoull(argv[3], nullptr, 10);
  const int64_t n = atoll(argv[4]);
  const auto dist = static_cast<zo::Dist>(atoi(argv[5]));
  std::vector<float> z(n, 0.0f);
  const double coef = 1.0;
  const int64_t s = static_cast<int64_t>(stream);
  const zo::Terms t = zo::make_terms(0.0, &coef, &s, 1, static_cast<int64_t>(seed));
  const int64_t g0 = zo::cpu::first_group(base), g1 = zo::cpu::end_group(base, n);
  zo::cpu::perturb_groups(z.data(), z.data(), n, base, t, dist, g0, g1);
  for (float v : z) printf("%a\n", v);
}
"""
ISAS = {"baseline": [], "avx2": ["-mavx2", "-mfma", "-mf16c"]}
CASES = [(2**64 - 1, 3, 2**32 - 70, 1000), (12345, 0, 5, 4097), (7, 2**40 + 7, 0, 129)]


@pytest.fixture(scope="module", params=list(ISAS))
def kernel_program(request, tmp_path_factory):
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("g++ not found")
    directory = tmp_path_factory.mktemp(request.param)
    (directory / "main.cpp").write_text(PROGRAM)
    flags = ["-O3", "-std=c++17", "-ffp-contract=off", "-fno-math-errno", *ISAS[request.param]]
    binary = directory / "kernel"
    subprocess.run([cxx, *flags, f"-I{ROOT / 'csrc'}", str(directory / "main.cpp"), "-o", str(binary)], check=True)
    return binary


@pytest.mark.parametrize("dist", rng.DISTRIBUTIONS)
def test_kernel_matches_oracle(kernel_program, dist):
    for seed, stream, offset, numel in CASES:
        args = [str(seed), str(stream), str(offset), str(numel), str(rng.DISTRIBUTIONS.index(dist))]
        out = subprocess.run([str(kernel_program), *args], capture_output=True, text=True, check=True).stdout
        got = torch.tensor([float.fromhex(v) for v in out.split()], dtype=torch.float32)
        want = rng.sample(seed, stream, offset, numel, dist)
        if dist == "rademacher":
            assert torch.equal(got, want)
        else:
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
