"""Optimizer steps: the parameter-update part of one ZO-SGD step (3 fused passes) against
MeZO's own 4-pass loop, as a ratio to what was measured in the same run (peak memory:
test_memory_bench.py).

    make bench     # conftest.py prints the tables that benchmarks/README.md records
"""

from __future__ import annotations

import pytest
import torch

from zounlearn import optim
from zounlearn.ops import backends
from zounlearn.optim.mezo import mezo_step

# GPT-2 small's parameter list (124 M parameters in 148 tensors): embeddings, 12 blocks, final norm.
D = 768
BLOCK = [(D,), (D,), (D, 3 * D), (3 * D,), (D, D), (D,), (D,), (D,), (D, 4 * D), (4 * D,), (4 * D, D), (D,)]
SHAPES = [(50257, D), (1024, D)] + BLOCK * 12 + [(D,), (D,)]
MU, LR, SEED = 1e-3, 1e-6, 7


def _params(dtype: torch.dtype) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype) * 0.02) for s in SHAPES]


def _steps():
    # The loss is a constant: what is timed is the optimizer's own work on the parameters.
    yield "MeZO reference", lambda ps: mezo_step(ps, lambda: 1.0, lr=LR, mu=MU, seed=SEED)
    if backends.runs_on("cpp", "cpu"):
        for dist in ("rademacher", "gaussian"):
            yield f"ZOSGD {dist} (cpp)", lambda ps, d=dist: optim.ZOSGD(ps, lr=LR, mu=MU, dist=d).step(lambda: 1.0)


@pytest.mark.parametrize("kind", [k for k, _ in _steps()])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_zo_sgd_step_passes(benchmark, dtype, kind):
    params = _params(dtype)
    fn = dict(_steps())[kind]
    n = sum(p.numel() for p in params)
    case = f"ZO-SGD step, {str(dtype)[6:]}, {n / 1e6:.0f} M params in {len(params)} tensors"
    benchmark.group = case
    benchmark.extra_info.update(table="step", case=case, kind=kind)
    benchmark.pedantic(fn, args=(params,), rounds=3 if kind == "MeZO reference" else 10, warmup_rounds=1, iterations=1)
    assert all(torch.isfinite(p.data[:10]).all() for p in params)
