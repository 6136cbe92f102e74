"""Half precision: what a zeroth-order step does to bfloat16 and float16 weights, by rounding alone
and when it should learn, and what the exact mode costs. Tables printed by conftest.py and kept in
benchmarks/README.md:

    .venv/bin/python -m pytest benchmarks/test_half_precision_bench.py --benchmark-only -s

drift     ZO-SGD at lr = 0 on GPT-2-sized tensors (a 768 x 768 matrix of std 0.02 and a 3072-vector
          near 1): relative RMS change and fraction of elements changed after 1, 100 and 1000
          steps, in place, exact, and MeZO's own loop. Goal: exact 0, bit-identical.
learning  ZO-SGD on least squares (512 weights), float32 against bfloat16 in place with nearest
          rounding, in place with stochastic rounding, and exact with stochastic rounding.
cost      one ZO-SGD step on GPT-2 small (124 M parameters, bfloat16, batch 2 x 64) exact against in
          place, time as a ratio in one run; the steady-state peak memory in fresh processes
          (zounlearn.bench.memory).
"""

from __future__ import annotations

import pytest
import torch

from zounlearn import optim
from zounlearn.bench import memory
from zounlearn.optim.mezo import mezo_step

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class GPT2Sized(torch.nn.Module):
    """The issue's two tensors as a model's parameters: a projection and a norm's gain."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.proj = torch.nn.Linear(768, 768, bias=False)
        self.norm = torch.nn.LayerNorm(3072, elementwise_affine=True, bias=False)
        with torch.no_grad():
            self.proj.weight.copy_(torch.randn(768, 768, generator=gen) * 0.02)
            self.norm.weight.copy_(1.0 + 0.02 * torch.randn(3072, generator=gen))
        self.to(dtype)
        self.x = torch.randn(4, 768, generator=gen).to(dtype)
        self.y = torch.randn(4, 3072, generator=gen).to(dtype)

    def forward(self) -> torch.Tensor:
        return self.proj(self.x).float().square().mean() + self.norm(self.y).float().mean()


def _drift(dtype: torch.dtype, kind: str, steps: tuple[int, ...]) -> dict[str, float]:
    model = GPT2Sized(dtype)
    params = list(model.parameters())
    start = torch.cat([p.detach().float().reshape(-1) for p in params])
    closure = model.forward
    opt = None
    if kind != "MeZO's loop":
        opt = optim.ZOSGD(params, lr=0.0, mu=1e-3, seed=1, model=model,
                          perturbation="exact" if kind == "exact" else "in_place")
    out, done = {}, 0
    for target in steps:
        while done < target:
            if opt is None:
                mezo_step(params, closure, lr=0.0, mu=1e-3, seed=done)
            else:
                opt.step(closure)
            done += 1
        now = torch.cat([p.detach().float().reshape(-1) for p in params])
        out[f"rms@{target}"] = ((now - start).norm() / start.norm()).item()
        out[f"changed@{target}"] = (now != start).float().mean().item()
    return out


@pytest.mark.parametrize("kind", ["in place", "exact", "MeZO's loop"])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_drift_at_lr_zero(benchmark, dtype, kind):
    result = benchmark.pedantic(_drift, args=(DTYPES[dtype], kind, (1, 100, 1000)), rounds=1, iterations=1)
    benchmark.extra_info.update(table="drift", case=dtype, kind=kind, **result)
    if kind == "exact":
        assert result["changed@1000"] == 0.0


def _least_squares(kind: str, steps: int = 3000) -> dict[str, float]:
    dtype = torch.float32 if kind == "float32" else torch.bfloat16
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 512, generator=gen)
    w_true = torch.randn(512, generator=gen) * 0.02
    y = x @ w_true
    model = torch.nn.Linear(512, 1, bias=False).to(dtype)
    with torch.no_grad():
        model.weight.copy_((torch.randn(512, generator=gen) * 0.02).to(dtype).unsqueeze(0))
    rounding = "nearest" if kind == "bfloat16 nearest, in place" else "stochastic"
    perturbation = "exact" if "exact" in kind else "in_place"
    opt = optim.ZOSGD(model.parameters(), lr=2e-4, mu=1e-3, seed=3, model=model, rounding=rounding,
                      perturbation=perturbation)
    loss = lambda: ((model(x.to(dtype)).squeeze(-1).float() - y) ** 2).mean()  # noqa: E731
    out = {"loss@0": loss().item()}
    for step in range(1, steps + 1):
        opt.step(loss)
        if step in (300, 1000, 3000):
            out[f"loss@{step}"] = loss().item()
    return out


LEARNING = ["float32", "bfloat16 nearest, in place", "bfloat16 stochastic, in place", "bfloat16 stochastic, exact"]


@pytest.mark.parametrize("kind", LEARNING)
def test_learning_in_half_precision(benchmark, kind):
    result = benchmark.pedantic(_least_squares, args=(kind,), rounds=1, iterations=1)
    benchmark.extra_info.update(table="learning", case="ZO-SGD, least squares (512 weights)", kind=kind, **result)
    assert result["loss@3000"] < result["loss@0"] or kind == "bfloat16 nearest, in place"


def _gpt2(dtype: torch.dtype):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_positions=64)).to(dtype).eval()
    tokens = torch.randint(0, model.config.vocab_size, (2, 64))
    return model, lambda: model(tokens, labels=tokens).loss


@pytest.fixture(scope="module")
def gpt2_small():
    return _gpt2(torch.bfloat16)


@pytest.mark.parametrize("perturbation", ["in_place", "exact"])
def test_exact_mode_step_time(benchmark, gpt2_small, perturbation):
    model, loss = gpt2_small
    opt = optim.ZOSGD(model.parameters(), lr=0.0, mu=1e-3, model=model, perturbation=perturbation)
    benchmark.group = "exact mode cost"
    benchmark.extra_info.update(table="exact-cost", case="ZO-SGD step, GPT-2 small bfloat16, 2 x 64 tokens",
                                kind=perturbation)
    with torch.no_grad():
        benchmark.pedantic(opt.step, args=(loss,), rounds=5, warmup_rounds=1, iterations=1)


def test_exact_mode_peak_memory(benchmark):
    """Each kind in a fresh process (zounlearn.bench.memory): the steady-state peak RSS, bfloat16."""
    rows = benchmark.pedantic(memory.measure, args=(["inference", "ZOSGD", "ZOSGD exact"], "gpt2-small", "cpu",
                                                    torch.bfloat16, 2, 64), rounds=1, iterations=1)
    benchmark.group = "peak memory, half precision"
    benchmark.extra_info.update(table="memory-rows", rows=rows)
    assert all(r["peak_bytes"] > r["param_bytes"] for r in rows)
