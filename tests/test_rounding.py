"""Stochastic rounding (ZO-RNG v2, docs/rng.md): the oracle against the definition worked out by
hand from torch's own half types, its randomness, and what it does for an optimizer in half
precision: an update far below half a unit survives in expectation, where nearest rounding loses it."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import DEVICE, FAST_BACKENDS

from zounlearn import optim, rng
from zounlearn.errors import UsageError

HALF = [torch.bfloat16, torch.float16]


def neighbours(a: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The values of dtype just below-or-at and just above |a| (a >= 0 float32), by torch.nextafter."""
    near = a.to(dtype)
    below = torch.where(near.float() > a, torch.nextafter(near, torch.zeros_like(near)), near)
    return below, torch.nextafter(below, torch.full_like(below, float("inf")))


@pytest.mark.parametrize("dtype", HALF)
def test_round_stochastic_takes_each_neighbour_with_its_exact_probability(dtype):
    """Over all 2^16 rounding words, x rounds to its upper neighbour exactly ceil(f 2^16) times,
    f = (|x| - lo) / (hi - lo), and to its lower one otherwise: nothing else is ever produced."""
    gen = torch.Generator().manual_seed(3)
    x = torch.cat([torch.randn(40, generator=gen) * 10 ** torch.randint(-6, 4, (40,), generator=gen),
                   torch.tensor([1.0, -2.5, 0.0, 1e-6, -7e-8, 3.1e-5])])  # exact, tiny, float16-subnormal
    bits = torch.arange(1 << 16)
    for value in x:
        got = rng.round_stochastic(value.repeat(1 << 16), bits, dtype).float()
        lo, hi = neighbours(value.abs().reshape(1), dtype)
        lo, hi = lo.float().item(), hi.float().item()
        frac = (abs(value.item()) - lo) / (hi - lo)
        ups = int((got.abs() == hi).sum())
        assert int((got.abs() == lo).sum()) + ups == 1 << 16, value
        assert ups == math.ceil(frac * (1 << 16)), (value, ups, frac)
        assert bool((torch.sign(got) == torch.sign(value)).all() | (got == 0).all())


def test_round_stochastic_edges():
    words = torch.tensor([0, 65535, 0, 0, 65535])
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 70000.0, 65504.0])
    y = rng.round_stochastic(x, words, torch.float16).float()
    assert y[0].isnan() and y[1] == float("inf") and y[2] == -float("inf")
    assert y[3] == float("inf") and y[4] == 65504.0  # past the largest finite float16: nearest


@pytest.mark.parametrize("dtype", HALF)
def test_stochastic_rounding_is_unbiased(dtype):
    """The mean of n roundings of one value lies within 5 binomial standard deviations of it."""
    n = 200_000
    for value in (1.0 + 2**-10, -0.3141, 3.3e-3):
        x = torch.full((n,), value)
        y = rng.round_stochastic(x, rng.rounding_bits(11, rng.ROUNDING_STREAM_BASE, 0, n), dtype).float()
        lo, hi = neighbours(torch.tensor([abs(value)]), dtype)
        p = (abs(value) - lo.item()) / (hi.item() - lo.item())
        sigma = (hi.item() - lo.item()) * math.sqrt(p * (1 - p) / n)
        assert abs(y.mean().item() - value) <= 5 * sigma + 1e-12, (value, y.mean().item())


def test_rounding_words_are_the_documented_halves_of_philox():
    """Element e: bits 16 (e & 1) .. of word (e >> 1) & 3 of Philox(seed, e >> 3, stream)."""
    seed, stream, offset, n = 7, rng.ROUNDING_STREAM_BASE + 3, 2**33 - 5, 40
    got = rng.rounding_bits(seed, stream, offset, n)
    for i in range(n):
        e = offset + i
        words = rng.philox(seed, torch.tensor([e >> 3]), stream)
        assert got[i].item() == (int(words[(e >> 1) & 3][0]) >> (16 * (e & 1))) & 0xFFFF


def _tiny_update_problem(dtype, rounding, cls, **options):
    """One parameter at 1.0 pushed by a constant gradient whose step is 0.1 of a unit at 1.0."""
    ulp = (torch.nextafter(torch.ones(1, dtype=dtype), torch.full((1,), 2.0, dtype=dtype)).float() - 1).item()
    p = torch.nn.Parameter(torch.ones(4096, dtype=dtype, device=DEVICE))
    opt = cls([p], lr=0.1 * ulp, rounding=rounding, **options)
    return p, opt, ulp


@pytest.mark.parametrize("backend", FAST_BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", HALF)
def test_a_tenth_of_a_unit_survives_in_expectation(dtype, backend):
    """SignSGD's step lr sign(g) = 0.1 unit: 20 steps move a bfloat16/float16 parameter by 2 units on
    average with stochastic rounding (within a binomial bound), by nothing with nearest."""
    for rounding in ("nearest", "stochastic"):
        p, opt, ulp = _tiny_update_problem(dtype, rounding, optim.SignSGD)
        for _ in range(20):
            p.grad = -torch.ones_like(p)
            opt.step()
        moved = (p.detach().float() - 1.0).mean().item() / ulp
        if rounding == "nearest":
            assert moved == 0.0
        else:
            assert abs(moved - 2.0) < 5 * math.sqrt(20 * 0.1 * 0.9 / p.numel()) + 0.05, moved


@pytest.mark.parametrize("dtype", HALF)
def test_zeroth_order_update_survives_too(dtype):
    """ZO-SGD on the loss sum(w) from w = 1: each step moves w by lr (sum_i z_i) z, about 0.1 of a unit
    (|sum z| ~ 32 for 1024 weights), so nearest rounding keeps w at 1 forever while stochastic
    rounding follows the true drift -steps * lr on average (6 of its standard deviations apart)."""
    n, steps = 1024, 40
    ulp = (torch.nextafter(torch.ones(1, dtype=dtype), torch.full((1,), 2.0, dtype=dtype)).float() - 1).item()
    lr = 0.1 * ulp / 32
    moved = {}
    for rounding in ("nearest", "stochastic"):
        model = torch.nn.Linear(n, 1, bias=False).to(dtype)
        torch.nn.init.constant_(model.weight, 1.0)
        opt = optim.ZOSGD(model.parameters(), lr=lr, mu=0.05, seed=3, rounding=rounding, model=model)
        for _ in range(steps):
            opt.step(lambda: model.weight.float().sum())
        moved[rounding] = (model.weight.detach().float() - 1.0).mean().item()
    assert moved["nearest"] == 0.0
    assert -1.6 * steps * lr < moved["stochastic"] < -0.4 * steps * lr, (moved, steps * lr)


def test_float32_is_unaffected_by_rounding():
    results = []
    for rounding in ("nearest", "stochastic"):
        p = torch.nn.Parameter(torch.linspace(-1, 1, 300))
        opt = optim.AdamW([p], lr=1e-3, rounding=rounding)
        for _ in range(3):
            p.grad = torch.cos(p.detach())
            opt.step()
        results.append(p.detach().clone())
    assert torch.equal(*results)


def test_stochastic_rounding_resumes_bit_identically():
    """The rounding streams are counted in the state dict: stopping and loading changes nothing."""
    def fresh(p):
        return optim.SignAdam([p], lr=3e-4, seed=9)

    p = torch.nn.Parameter(torch.linspace(-1, 1, 999).to(torch.bfloat16))
    opt = fresh(p)
    for step in range(6):
        if step == 3:
            saved = (copy.deepcopy(opt.state_dict()), p.detach().clone())
        p.grad = torch.sin(7 * p.detach())
        opt.step()
    q = torch.nn.Parameter(saved[1])
    opt2 = fresh(q)
    opt2.load_state_dict(saved[0])
    for _ in range(3):
        q.grad = torch.sin(7 * q.detach())
        opt2.step()
    assert torch.equal(p, q) and opt2.roundings == opt.roundings == 6


def test_unknown_rounding_fails_before_any_write():
    p = torch.nn.Parameter(torch.ones(5, dtype=torch.bfloat16))
    with pytest.raises(UsageError, match="rounding must be one of"):
        optim.AdaZO([p], rounding="up")
    opt = optim.SignSGD([{"params": [p], "rounding": "up"}])
    p.grad = torch.ones_like(p)
    with pytest.raises(UsageError, match="rounding must be one of"):
        opt.step()
    assert torch.equal(p, torch.ones(5, dtype=torch.bfloat16)) and not opt.state[p]


def test_float16_overflow_is_an_error_that_names_the_tensor():
    """An update that takes a float16 value past 65504 raises instead of leaving a silent inf."""
    p = [torch.nn.Parameter(torch.ones(3, dtype=torch.float16)), torch.nn.Parameter(torch.full((4,), 6.5e4).half())]
    opt = optim.SignSGD(p, lr=1e3)
    for t in p:
        t.grad = -torch.ones_like(t)
    with pytest.raises(UsageError, match=r"float16 overflow after the update: parameter 1 \(shape \(4,\)\)"):
        opt.step()
    bf = torch.nn.Parameter(torch.full((4,), 6.5e4).to(torch.bfloat16))  # bfloat16 has float32's range
    opt = optim.SignSGD([bf], lr=1e3)
    bf.grad = -torch.ones_like(bf)
    opt.step()
    assert torch.isfinite(bf).all()
