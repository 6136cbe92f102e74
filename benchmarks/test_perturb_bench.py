"""One perturbation pass: the C++ CPU op (each build of its kernels this processor runs) vs the
MeZO-style pure-PyTorch step vs the memory ceiling (`add_` on the same tensor: the same bytes
read and written).

    make bench            # or: .venv/bin/python -m pytest benchmarks --benchmark-only

conftest.py prints the table (GB/s and both ratios) that benchmarks/README.md records.
"""

from __future__ import annotations

import pytest
import torch

from zounlearn.ops import backends, perturb_
from zounlearn.optim.mezo import mezo_perturb

CASES = [(torch.float32, 24), (torch.float32, 26), (torch.bfloat16, 24), (torch.bfloat16, 26)]
SEED, SCALE = 1234, 1e-3


def _kernels():
    yield "add_ ceiling", lambda p: p.data.add_(1.0)
    yield "MeZO reference", lambda p: mezo_perturb([p], SEED, SCALE)
    if backends.runs_on("cpp", "cpu"):  # the CPU default, in each build of its kernels this processor runs
        for build in [name for name, runs in backends.cpu_capabilities().items() if runs]:
            for dist in ("rademacher", "gaussian"):
                yield f"cpp {dist} [{build}]", _in_build(build, lambda p, d=dist: perturb_(p, SCALE, SEED, dist=d))


def _in_build(build: str, fn):
    def run(*args):
        with backends.cpu_capability(build):
            fn(*args)

    return run


@pytest.mark.parametrize("kind", [k for k, _ in _kernels()])
@pytest.mark.parametrize(("dtype", "log2n"), CASES, ids=[f"{str(d)[6:]}-2^{n}" for d, n in CASES])
def test_perturb_pass(benchmark, dtype, log2n, kind):
    fn = dict(_kernels())[kind]
    p = torch.nn.Parameter(torch.randn(1 << log2n).to(dtype), requires_grad=False)
    case = f"{str(dtype)[6:]} 2^{log2n}"
    benchmark.group = case
    benchmark.extra_info.update(table="perturb", case=case, kind=kind, bytes=2 * p.numel() * p.element_size())
    rounds = 3 if kind == "MeZO reference" else 10
    benchmark.pedantic(fn, args=(p,), rounds=rounds, warmup_rounds=1, iterations=1)
    assert torch.isfinite(p.data[:1000]).all()
