"""One perturbation pass: the C++ CPU op (each build of its kernels this processor runs) vs the
MeZO-style pure-PyTorch step vs the memory ceiling (`add_` on the same tensor: the same bytes
read and written).

    make bench            # or: .venv/bin/python -m pytest benchmarks --benchmark-only

The passes are zounlearn.bench's (the same `zounlearn bench` and `make gpu-check` time);
conftest.py prints the table (GB/s and both ratios) that benchmarks/README.md records.
"""

from __future__ import annotations

import pytest
import torch

from zounlearn.bench import calls, passes
from zounlearn.ops import backends
from zounlearn.optim.mezo import mezo_perturb

CASES = [(torch.float32, 24), (torch.float32, 26), (torch.bfloat16, 24), (torch.bfloat16, 26)]
MEZO = "MeZO reference"
KINDS = {"add_ ceiling": passes.Pass("add_"), MEZO: None}
BUILDS: dict[str, str] = {}  # kind -> the build of the CPU kernels it runs
if "cpp" in calls.runnable("cpu"):  # the CPU default, in each build of its kernels this processor runs
    BUILDS.update({f"cpp {dist} [{build}]": build for build, runs in backends.cpu_capabilities().items() if runs
                   for dist in ("rademacher", "gaussian")})
    KINDS.update({kind: passes.Pass("perturb_", kind.split()[1]) for kind in BUILDS})


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize(("dtype", "log2n"), CASES, ids=[f"{str(d)[6:]}-2^{n}" for d, n in CASES])
def test_perturb_pass(benchmark, dtype, log2n, kind):
    tensors = passes.Tensors.allocate([(1 << log2n,)], dtype, "cpu", state=False)
    p = KINDS[kind]
    # MeZO's zo_perturb_parameters: torch.manual_seed, torch.normal per tensor, an out-of-place add.
    fn = (lambda: mezo_perturb(tensors.params, passes.SEED, passes.MU)) if p is None else p.runner(tensors)
    case = f"{str(dtype)[6:]} 2^{log2n}"
    benchmark.group = case
    size = tensors.params[0].element_size()  # MeZO's step counts as the same 2 x size bytes an element
    benchmark.extra_info.update(table="perturb", case=case, kind=kind,
                                bytes=(2 * size if p is None else p.bytes_per_element(size)) * tensors.numel)
    with torch.no_grad(), calls.use("cpp"), backends.cpu_capability(BUILDS.get(kind, "auto")):
        benchmark.pedantic(fn, rounds=3 if p is None else 10, warmup_rounds=1, iterations=1)
    assert torch.isfinite(tensors.params[0].data[:1000]).all()
