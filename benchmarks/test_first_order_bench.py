"""One fused first-order update pass on the CPU: zounlearn's AdamW rule (`grad_update_`, each
build of the cpp kernels this processor runs) against torch's own AdamW step, fused and
foreach, on the same parameter, gradient and moments (2^24 float32 elements: 28 bytes each
read or written), in one run.

    .venv/bin/python -m pytest benchmarks/test_first_order_bench.py --benchmark-only

conftest.py prints the table (median ms, speed-up over torch's fused AdamW) of benchmarks/README.md.
"""

from __future__ import annotations

import pytest
import torch

from zounlearn.ops import backends
from zounlearn.ops.rules import Hyper, Rule
from zounlearn.ops.update import grad_update_

N, LR, WD, BETAS, EPS, STEP = 1 << 24, 1e-3, 0.01, (0.9, 0.999), 1e-8, 10
CASE = f"AdamW pass, float32, 2^24 elements, {torch.get_num_threads()} threads"


def _tensors():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(N, generator=gen), torch.randn(N, generator=gen)


def _torch_step(**kind):
    theta, grad = _tensors()
    param = torch.nn.Parameter(theta)
    param.grad = grad
    optimizer = torch.optim.AdamW([param], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, **kind)
    optimizer.step()  # the state exists: what is timed is one steady-state step
    return optimizer.step


def _zounlearn_pass(build: str):
    theta, grad = _tensors()
    m, v = torch.zeros(N), torch.zeros(N)
    hyper = Hyper.make(LR, weight_decay=WD, beta1=BETAS[0], beta2=BETAS[1], eps=EPS, step=STEP)

    def run():
        with backends.cpu_capability(build):
            grad_update_([theta], [grad], rule=Rule.ADAM, hyper=hyper, m=[m], v=[v])

    return run


def _kinds():
    yield "torch AdamW (fused)", lambda: _torch_step(fused=True)
    yield "torch AdamW (foreach)", lambda: _torch_step(foreach=True)
    if backends.runs_on("cpp", "cpu"):
        for build in [name for name, runs in backends.cpu_capabilities().items() if runs]:
            yield f"grad_update_ adam [{build}]", lambda b=build: _zounlearn_pass(b)


@pytest.mark.parametrize("kind", [k for k, _ in _kinds()])
def test_adamw_pass(benchmark, kind):
    fn = dict(_kinds())[kind]()
    benchmark.group = CASE
    benchmark.extra_info.update(table="first-order", case=CASE, kind=kind)
    benchmark.pedantic(fn, rounds=3 if "foreach" in kind else 10, warmup_rounds=1, iterations=1)
