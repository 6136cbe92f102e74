"""The Triton kernel (kernels/perturb.py) against the ZO-RNG v1 oracle (zounlearn.rng).

Without a GPU the kernels run in Triton's interpreter; the compile test also builds
them, and the update kernel of kernels/update.py (whose values tests/test_update_ops.py
checks), for sm_90 (PTX and cubin) in a subprocess, which needs no GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any @triton.jit below runs
triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

import zounlearn.kernels  # noqa: E402
from zounlearn import rng  # noqa: E402
from zounlearn.kernels import perturb as perturb_module  # noqa: E402
from zounlearn.kernels import tables  # noqa: E402
from zounlearn.kernels import update as update_module  # noqa: E402
from zounlearn.ops import backends, reference  # noqa: E402
from zounlearn.ops.rules import Hyper, Rule  # noqa: E402

perturb_ = perturb_module.perturb_

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SEEDS = [0, 1, 2**32 + 5, 2**63 + 3 - 2**64, -1]  # the last two: 2**63 + 3 and 2**64 - 1 as signed int64
STREAMS = [0, 1, 2**40 + 7]
OFFSETS = [0, 5, 2**32 - 70, 2**40 + 3]  # 2**32 - 70 crosses 2^32 inside the tensor
SIZES = [0, 1, 127, 128, 129, 4097]
# Triton 3.9 turns the address table's alignment hints (kernels/tables.py) into vector loads;
# 3.8 (the CUDA build of torch's) compiles the same kernels to scalar loads: slower on a GPU,
# the same bits. The GPU machine's 3.6 is expected to behave as 3.8 (docs/gpu-check.md).
VECTOR_HINTS = tuple(int(x) for x in triton.__version__.split(".")[:2]) >= (3, 9)
SHAPES_2D = [(3, 45), (7, 129)]


def kernel_sample(seed: int, stream: int, offset: int, shape: tuple[int, ...], dist: str) -> torch.Tensor:
    """z through the fused op: perturb_ of zeros with alpha = 0 and one term of coef 1."""
    z = torch.zeros(shape, dtype=torch.float32, device=DEVICE)
    perturb_([z], [offset], [1.0], [stream], seed, dist, 0.0)
    return z.cpu()


def oracle(seed: int, stream: int, offset: int, shape: tuple[int, ...], dist: str) -> torch.Tensor:
    return rng.sample(seed, stream, offset, torch.Size(shape).numel(), dist).reshape(shape)


def reference_update(theta, offset, alpha, coefs, streams, seed, dist):
    """The shared oracle (zounlearn.ops.reference) on a CPU copy of theta."""
    out = theta.cpu().clone()
    reference.perturb_([out], [offset], coefs, streams, seed, dist, alpha)
    return out


def rounded_after_every_term(theta, offset, alpha, coefs, streams, seed, dist):
    """The wrong variant (a rounding per term instead of per pass), to show the tests can tell."""
    acc = theta.float().cpu() * torch.tensor(alpha, dtype=torch.float32)
    for coef, stream in zip(coefs, streams):
        z = rng.sample(seed, stream, offset, theta.numel(), dist).reshape(theta.shape)
        acc = (acc + torch.tensor(coef, dtype=torch.float32) * z).to(theta.dtype).float()
    return acc.to(theta.dtype)


def ulp(x: torch.Tensor) -> torch.Tensor:
    """Distance from |x| to the next float32 up."""
    a = x.abs()
    return torch.nextafter(a, torch.full_like(a, float("inf"))) - a


@pytest.mark.parametrize("stream", STREAMS)
@pytest.mark.parametrize("seed", SEEDS)
def test_rademacher_bit_exact(seed, stream):
    cases = [(offset, (size,)) for offset in OFFSETS for size in (1, 129, 4097)] + [(2**32 - 70, SHAPES_2D[1])]
    zs = [torch.zeros(shape, device=DEVICE) for _, shape in cases]
    perturb_(zs, [offset for offset, _ in cases], [1.0], [stream], seed, "rademacher", 0.0)
    for z, (offset, shape) in zip(zs, cases):
        assert torch.equal(z.cpu(), oracle(seed, stream, offset, shape, "rademacher")), (offset, shape)


@pytest.mark.parametrize("offset", OFFSETS)
def test_rademacher_bit_exact_all_sizes(offset):
    seed, stream = SEEDS[3], STREAMS[2]
    for shape in [(size,) for size in SIZES] + SHAPES_2D:
        assert torch.equal(kernel_sample(seed, stream, offset, shape, "rademacher"),
                           oracle(seed, stream, offset, shape, "rademacher")), shape


@pytest.mark.parametrize(("seed", "stream"), [(0, 0), (2**32 + 5, 1), (-1, 2**40 + 7)])
def test_gaussian_within_1e6(seed, stream):
    for offset in OFFSETS:
        for shape in [(1,), (130,), (4097,), SHAPES_2D[0]]:
            got = kernel_sample(seed, stream, offset, shape, "gaussian")
            torch.testing.assert_close(got, oracle(seed, stream, offset, shape, "gaussian"), rtol=0, atol=1e-6)


@triton.jit
def _triton_random_kernel(seed, first_block, words_ptr, normals_ptr, BLOCKS: tl.constexpr):
    """Triton's own tl.randint4x / tl.randn4x of blocks first_block + j, stored lane by lane."""
    j = tl.arange(0, BLOCKS)
    blocks = first_block + j.to(tl.int64)
    i0, i1, i2, i3 = tl.randint4x(seed, blocks)
    n0, n1, n2, n3 = tl.randn4x(seed, blocks)
    tl.store(words_ptr + 4 * j + 0, i0.to(tl.int64))
    tl.store(words_ptr + 4 * j + 1, i1.to(tl.int64))
    tl.store(words_ptr + 4 * j + 2, i2.to(tl.int64))
    tl.store(words_ptr + 4 * j + 3, i3.to(tl.int64))
    tl.store(normals_ptr + 4 * j + 0, n0)
    tl.store(normals_ptr + 4 * j + 1, n1)
    tl.store(normals_ptr + 4 * j + 2, n2)
    tl.store(normals_ptr + 4 * j + 3, n3)


@pytest.mark.parametrize("seed", [0, 2**32 + 5, 2**64 - 1])
@pytest.mark.parametrize("first_block", [0, 2**32 - 3])
def test_oracle_matches_triton_random(seed, first_block):
    """The oracle (stream 0) is Triton's tl.randint4x / tl.randn4x, code none of us wrote."""
    blocks = 64
    words = torch.zeros(4 * blocks, dtype=torch.int64, device=DEVICE)
    normals = torch.zeros(4 * blocks, dtype=torch.float32, device=DEVICE)
    _triton_random_kernel[(1,)](seed, first_block, words, normals, BLOCKS=blocks)
    expected_words = torch.stack(rng.philox(seed, torch.arange(first_block, first_block + blocks)), dim=1)
    assert torch.equal(words.cpu(), expected_words.reshape(-1))
    expected_normals = rng.sample(seed, 0, 4 * first_block, 4 * blocks, "gaussian")
    torch.testing.assert_close(normals.cpu(), expected_normals, rtol=0, atol=1e-6)


FUSED_STREAMS = [3, 0, 2**40 + 7, -5, 1, 2**63 + 11 - 2**64, 77, 2**32]


@pytest.mark.parametrize("num_terms", [1, 3, 8])
@pytest.mark.parametrize("alpha", [1.0, 0.999])
@pytest.mark.parametrize("dist", ["rademacher", "gaussian"])
def test_fused_float32(dist, alpha, num_terms):
    generator = torch.Generator().manual_seed(num_terms)
    offset = 2**32 - 1000 + 3
    theta = torch.randn(3000, generator=generator)
    coefs = (torch.randn(num_terms, generator=generator) * 1e-2).tolist()
    streams = FUSED_STREAMS[:num_terms]
    seed = 2**63 + 3 - 2**64
    got = theta.to(DEVICE, copy=True)
    perturb_([got], [offset], coefs, streams, seed, dist, alpha)
    expected = reference_update(theta, offset, alpha, coefs, streams, seed, dist)
    if dist == "rademacher":
        # c * z is exact and the kernel turns off FMA contraction, so even alpha != 1 is bit-exact.
        assert torch.equal(got.cpu(), expected)
    else:
        tolerance = ulp(expected) + 1e-6 * sum(abs(c) for c in coefs)
        assert ((got.cpu() - expected).abs() <= tolerance).all()


@pytest.mark.parametrize("num_terms", [1, 3])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_low_precision_rounds_once(dtype, num_terms):
    generator = torch.Generator().manual_seed(7)
    theta = torch.randn(5000, generator=generator).to(dtype)
    offset, alpha, seed = 2**40 + 3, 0.999, 12345
    coefs, streams = [0.02, -0.05, 0.011][:num_terms], [0, 2**40 + 7, 9][:num_terms]
    got = theta.to(DEVICE, copy=True)
    perturb_([got], [offset], coefs, streams, seed, "rademacher", alpha)
    expected = reference_update(theta, offset, alpha, coefs, streams, seed, "rademacher")
    assert torch.equal(got.cpu(), expected)
    rounded_per_term = rounded_after_every_term(theta, offset, alpha, coefs, streams, seed, "rademacher")
    # One rounding per pass is observable here: rounding every term would give other values.
    assert torch.equal(expected, rounded_per_term) == (num_terms == 1)


def test_bfloat16_rounds_to_nearest_even():
    """Ties, a carry into the exponent, huge values, inf and NaN, rounded like torch."""
    values = [1.0, 1.0078125, 1.9921875, -1.0078125, 3.3895e38, float("inf"), float("-inf"), float("nan")]
    theta = torch.tensor(values * 16, dtype=torch.bfloat16)
    coefs, streams, seed = [2.0**-8], [0], 4  # half a bfloat16 ulp at 1: every finite sum below 2 is a tie
    got = theta.to(DEVICE, copy=True)
    perturb_([got], [0], coefs, streams, seed, "rademacher", 1.0)
    expected = reference_update(theta, 0, 1.0, coefs, streams, seed, "rademacher")
    torch.testing.assert_close(got.cpu(), expected, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dist", ["rademacher", "gaussian"])
def test_plus_then_minus_restores(dist):
    theta = torch.randn(5000, generator=torch.Generator().manual_seed(3))
    offset, seed, stream, coef = 2**32 - 70, -1, 2**40 + 7, 3e-3
    perturbed = theta.to(DEVICE, copy=True)
    perturb_([perturbed], [offset], [coef], [stream], seed, dist, 1.0)
    restored = perturbed.clone()
    perturb_([restored], [offset], [-coef], [stream], seed, dist, 1.0)
    tolerance = ulp(torch.maximum(theta.abs(), perturbed.cpu().abs()))
    assert not torch.equal(perturbed.cpu(), theta)
    assert ((restored.cpu() - theta).abs() <= tolerance).all()


@pytest.mark.parametrize("dist", ["rademacher", "gaussian"])
def test_split_into_tensors_equals_flat(dist):
    """Base offsets make a list of tensors behave as one flat vector."""
    base, seed, coefs, streams = 2**32 - 1000, 99, [0.5, -0.25], [1, 2]
    flat = torch.randn(5000, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    pieces = [flat[:1000].clone(), flat[1000:1135].clone().reshape(3, 45), flat[1135:].clone()]
    perturb_(pieces, [base, base + 1000, base + 1135], coefs, streams, seed, dist, 1.0)
    perturb_([flat], [base], coefs, streams, seed, dist, 1.0)
    assert torch.equal(torch.cat([p.reshape(-1) for p in pieces]), flat)


@pytest.mark.parametrize("dist", ["rademacher", "gaussian"])
def test_touches_only_its_elements(dist):
    """Tiles overhang a tensor at both ends (lead = 5, ragged end): the overhang stays untouched."""
    buffer = torch.zeros(9000, device=DEVICE)
    view = buffer[300:4500]  # contiguous, with neighbours on both sides
    perturb_([view], [2**32 - 70 + 5], [1.0], [7], 11, dist, 1.0)
    torch.testing.assert_close(view.cpu(), oracle(11, 7, 2**32 - 70 + 5, (4200,), dist), rtol=0, atol=1e-6)
    assert (buffer[:300] == 0).all() and (buffer[4500:] == 0).all()


def test_empty_tensor_and_bad_arguments():
    empty = torch.zeros(0, device=DEVICE)
    perturb_([empty], [7], [1.0], [0], 0, "rademacher", 1.0)
    assert empty.numel() == 0
    theta = torch.zeros(4, device=DEVICE)
    with pytest.raises(ValueError):
        perturb_([theta], [0], [1.0], [0], 0, "uniform", 1.0)
    with pytest.raises(ValueError):
        perturb_([theta], [0], [1.0] * 9, [0] * 9, 0, "rademacher", 1.0)
    with pytest.raises(ValueError):
        perturb_([theta], [0], [1.0, 2.0], [0], 0, "rademacher", 1.0)
    assert torch.equal(theta.cpu(), torch.zeros(4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dist", ["rademacher", "gaussian"])
def test_update_spans_several_tiles(dist, dtype):
    """The update kernel on tensors of several tiles (tests/test_update_ops.py's fit in one or two):
    zo_update_ with 8 terms, then compressed Adam's passes, whose per-tile maxima meet in one scale;
    half-precision parameters stochastically rounded."""
    generator = torch.Generator().manual_seed(11)
    shapes = [(5000,), (3, 1100)]
    params = [torch.randn(s, generator=generator).to(dtype) for s in shapes]
    grads = [torch.randn(s, generator=generator).to(dtype) for s in shapes]
    h = Hyper.make(0.05, weight_decay=0.1, beta1=0.9, beta2=0.99, eps=1e-6, step=4, bits=3)
    coefs, offsets = [0.3, -0.2, 0.1, 0.5, -0.7, 0.05, 0.9, -0.33], [2**32 - 70, 2**32 - 70 + 5000]
    want = [[t.clone() for t in params], [torch.zeros(s) for s in shapes], [torch.zeros(s) for s in shapes]]
    got = [[t.to(DEVICE, copy=True) for t in ts] for ts in want]
    reference.zo_update_(*want, offsets, coefs, FUSED_STREAMS, -1, dist, 1e-3, Rule.ADAM.value, "stochastic", 3, *h)
    update_module.zo_update_(*got, offsets, coefs, FUSED_STREAMS, -1, dist, 1e-3, Rule.ADAM.value, "stochastic", 3,
                             *h)
    for g, w in zip(sum(got, []), sum(want, [])):
        if dist == "rademacher":
            assert torch.equal(g.cpu(), w)
        else:  # z within 1e-6: a value may land one unit of its dtype the other way
            torch.testing.assert_close(g.cpu().float(), w.float(), rtol=torch.finfo(g.dtype).eps, atol=1e-5)
    want_scales, got_scales = torch.full((2,), 9.0), torch.full((2,), 9.0, device=DEVICE)
    got = [[t.to(DEVICE, copy=True) for t in ts] for ts in want]  # the reference's state (Gaussian z differ)
    for rule in (Rule.ADAM_MOMENTS, Rule.QUANTIZED):
        reference.grad_update_(want[0], grads, want[1], want[2], want_scales, offsets, -1, rule.value, "stochastic", 4,
                               *h)
        update_module.grad_update_(got[0], [t.to(DEVICE) for t in grads], got[1], got[2], got_scales, offsets, -1,
                                   rule.value, "stochastic", 4, *h)
        assert torch.equal(got_scales.cpu(), want_scales), rule
        assert all(torch.equal(g.cpu(), w) for g, w in zip(sum(got, []), sum(want, []))), rule


# One call over many tensors (kernels/tables.py): (dtype, numel, at an address one element past
# a buffer's start, so not 16-byte aligned). Laid end to end from MIXED_BASE, across 2^32: the
# first six start at offsets that are multiples of 16, the rest (after 4097) do not; the fifth
# has numel and lead multiples of 16 but a misaligned pointer.
MIXED = [
    (torch.float32, 256, False), (torch.float32, 2048, False), (torch.bfloat16, 4096, False),
    (torch.float16, 512, False), (torch.float32, 256, True), (torch.bfloat16, 16, False),
    (torch.float32, 4097, False), (torch.bfloat16, 1, False), (torch.float16, 129, True), (torch.float32, 0, False),
    (torch.float32, 407, True), (torch.bfloat16, 300, False), (torch.float16, 105, False),
    (torch.float16, 2500, False), (torch.float32, 1, False), (torch.bfloat16, 33, True),
]
MIXED_BASE = 2**32 - 4096
MIXED_ALIGNED = {0, 1, 2, 3, 5}
MIXED_H = Hyper.make(0.05, weight_decay=0.1, beta1=0.9, beta2=0.99, eps=1e-6, step=4, bits=3)
MIXED_COEFS = [0.3, -0.2, 0.1]
OPS = ["perturb_", "perturb_into", "zo_update_", "grad_update_"]


def end_to_end(numels: list[int], base: int = MIXED_BASE) -> list[int]:
    return [base + sum(numels[:i]) for i in range(len(numels))]


def mixed_state(cases) -> dict:
    """CPU tensors for every op: params, out, grads (the params' dtypes), float32 m and v >= 0, scales."""
    generator = torch.Generator().manual_seed(17)
    params = [torch.randn(numel, generator=generator).to(dtype) for dtype, numel, _ in cases]
    return {
        "params": params,
        "out": [torch.zeros_like(p) for p in params],
        "grads": [torch.randn(p.shape, generator=generator).to(p.dtype) for p in params],
        "m": [torch.randn(p.shape, generator=generator) for p in params],
        "v": [torch.rand(p.shape, generator=generator) for p in params],
        "scales": torch.full((len(params),), 9.0),
    }


def placed(state: dict, cases) -> tuple[dict, list[torch.Tensor]]:
    """state's tensors on DEVICE, a misaligned case's one element into a zeroed buffer; and those buffers."""
    buffers, out = [], {"scales": state["scales"].to(DEVICE, copy=True)}
    for kind in ("params", "out", "grads", "m", "v"):
        out[kind] = []
        for t, (_, _, misaligned) in zip(state[kind], cases):
            buffer = torch.zeros(t.numel() + misaligned, dtype=t.dtype, device=DEVICE)
            out[kind].append(buffer[int(misaligned):])
            out[kind][-1].copy_(t)
            if misaligned:
                buffers.append(buffer)
    return out, buffers


def run_op(ops, op: str, dist: str, s: dict, offsets: list[int], rules=(Rule.ADAM_MOMENTS, Rule.QUANTIZED)) -> None:
    """op through ops (the reference module or zounlearn.kernels); grad_update_ once per rule."""
    streams, seed = FUSED_STREAMS[:len(MIXED_COEFS)], -1
    if op == "perturb_":
        ops.perturb_(s["params"], offsets, MIXED_COEFS, streams, seed, dist, 0.999)
    elif op == "perturb_into":
        ops.perturb_into(s["params"], s["out"], offsets, MIXED_COEFS, streams, seed, dist, 0.999)
    elif op == "zo_update_":
        ops.zo_update_(s["params"], s["m"], s["v"], offsets, MIXED_COEFS, streams, seed, dist, 1e-3, Rule.ADAM.value,
                       "stochastic", 3, *MIXED_H)
    else:
        for rule in rules:
            ops.grad_update_(s["params"], s["grads"], s["m"], s["v"], s["scales"], offsets, seed, rule.value,
                             "stochastic", 4, *MIXED_H)


@pytest.mark.parametrize(("op", "dist"), [("perturb_", "rademacher"), ("perturb_", "gaussian"),
                                          ("perturb_into", "rademacher"), ("zo_update_", "rademacher"),
                                          ("zo_update_", "gaussian"), ("grad_update_", None)])
def test_one_call_over_mixed_tensors(op, dist):
    """Every dtype, aligned and misaligned tensors, odd sizes, tensors smaller than a tile and of
    several tiles, an empty one, in one call: the reference's bits (Rademacher; Gaussian z within
    1e-6), and nothing written outside the tensors."""
    want = mixed_state(MIXED)
    got, buffers = placed(want, MIXED)
    offsets = end_to_end([numel for _, numel, _ in MIXED])
    run_op(zounlearn.kernels, op, dist, got, offsets)
    run_op(reference, op, dist, want, offsets)
    for kind in ("params", "out", "m", "v"):
        for i, (g, w) in enumerate(zip(got[kind], want[kind])):
            if dist == "gaussian":  # a value may land one unit of its dtype the other way
                torch.testing.assert_close(g.cpu().float(), w.float(), rtol=torch.finfo(g.dtype).eps, atol=1e-5)
            else:
                assert torch.equal(g.cpu(), w), (kind, i, MIXED[i])
    assert torch.equal(got["scales"].cpu(), want["scales"])
    assert all(buffer[0] == 0 for buffer in buffers)


class CountedLaunches:
    """Stands in for a JITFunction and records the grid of each launch it passes on."""

    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


def counted(monkeypatch, op: str) -> CountedLaunches:
    """The launches of op's kernel from now on."""
    module, name = (perturb_module, "_perturb_kernel") if op.startswith("perturb") else (update_module,
                                                                                         "_update_kernel")
    counter = CountedLaunches(getattr(module, name))
    monkeypatch.setattr(module, name, counter)
    return counter


def tiles(op: str, numels: list[int], offsets: list[int]) -> int:
    """Programs of all the tensors' tiles (Rademacher layout)."""
    groups = (perturb_module if op.startswith("perturb") else update_module).RADEMACHER_GROUPS_PER_PROGRAM
    tile = perturb_module.RADEMACHER_GROUP * groups
    return sum(triton.cdiv(o % perturb_module.RADEMACHER_GROUP + n, tile) for n, o in zip(numels, offsets) if n)


@pytest.mark.parametrize("op", OPS)
def test_one_launch_per_dtype_and_alignment(op, monkeypatch):
    """N tensors of one dtype and alignment: one launch whose grid covers all their tiles; the
    mixed call: one launch per (dtype, alignment) group, six."""
    cases = [(torch.float32, 16 * k, False) for k in (1, 2, 3, 8, 64, 129, 256, 300, 5, 7, 1, 40)]
    numels = [numel for _, numel, _ in cases]
    offsets = end_to_end(numels)
    launches = counted(monkeypatch, op)
    run_op(zounlearn.kernels, op, "rademacher", placed(mixed_state(cases), cases)[0], offsets, rules=[Rule.ADAM])
    assert launches.grids == [(tiles(op, numels, offsets),)]
    launches.grids.clear()
    offsets = end_to_end([numel for _, numel, _ in MIXED])
    run_op(zounlearn.kernels, op, "rademacher", placed(mixed_state(MIXED), MIXED)[0], offsets, rules=[Rule.ADAM])
    assert len(launches.grids) == 6
    assert sum(g for g, in launches.grids) == tiles(op, [numel for _, numel, _ in MIXED], offsets)


def test_table_groups_by_dtype_and_alignment():
    """The launches' tensors and rows: a misaligned pointer goes with the other tensors, whatever
    its numel and lead; empty tensors are left out; TILE_START counts each launch's tiles."""
    s, _ = placed(mixed_state(MIXED), MIXED)
    offsets = end_to_end([numel for _, numel, _ in MIXED])
    group, tile = perturb_module.RADEMACHER_GROUP, perturb_module.RADEMACHER_GROUP * 16
    launches = list(tables.launches([(p, None, None, None) for p in s["params"]], offsets, group, tile))
    seen = []
    for launch in launches:
        table = launch.table.cpu()
        indices = table[tables.INDEX.value].tolist()
        seen += indices
        assert launch.count == len(indices) and table.shape == (tables.ROWS, launch.count)
        assert all(MIXED[i][0] == s["params"][i].dtype and tables.TRITON_DTYPES[MIXED[i][0]] == launch.dtype
                   for i in indices)
        assert launch.aligned == (indices[0] in MIXED_ALIGNED)
        assert all((i in MIXED_ALIGNED) == launch.aligned for i in indices)
        assert table[tables.PARAM.value].tolist() == [s["params"][i].data_ptr() for i in indices]
        assert table[tables.NUMEL.value].tolist() == [MIXED[i][1] for i in indices]
        assert table[tables.LEAD.value].tolist() == [offsets[i] % group for i in indices]
        assert table[tables.FIRST_GROUP.value].tolist() == [offsets[i] // group for i in indices]
        counts = [triton.cdiv(offsets[i] % group + MIXED[i][1], tile) for i in indices]
        assert table[tables.TILE_START.value].tolist() == [sum(counts[:j]) for j in range(len(counts))]
        assert launch.tiles == sum(counts)
    assert sorted(seen) == [i for i, (_, numel, _) in enumerate(MIXED) if numel]


def test_launches_split_at_the_grid_limit(monkeypatch):
    """More programs than one grid takes: more launches, the same bits; a tensor that alone needs
    more is refused."""
    monkeypatch.setattr(tables, "MAX_GRID", 3)
    launches = counted(monkeypatch, "perturb_")
    want = mixed_state(MIXED)
    got, _ = placed(want, MIXED)
    offsets = end_to_end([numel for _, numel, _ in MIXED])
    run_op(zounlearn.kernels, "perturb_", "rademacher", got, offsets)
    run_op(reference, "perturb_", "rademacher", want, offsets)
    assert all(torch.equal(g.cpu(), w) for g, w in zip(got["params"], want["params"]))
    assert len(launches.grids) > 6 and all(g <= 3 for g, in launches.grids)
    with pytest.raises(ValueError, match="more than 3 programs"):
        perturb_([torch.zeros(3 * 2048 + 1, device=DEVICE)], [0], [1.0], [0], 0, "rademacher", 1.0)


def test_interpreter_refuses_cuda_tensors(monkeypatch):
    """The interpreter copies only a kernel's tensor arguments to the host, not the tensors behind
    a table's addresses: with it on, the triton backend is not offered for CUDA tensors."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert "interpreter" in backends._why_not.__wrapped__("triton", "cuda")


# Compiles the kernels for sm_90 with a fresh cache, in a process where TRITON_INTERPRET
# is unset (under the interpreter @triton.jit gives an interpreter object, not a compiler one).
COMPILE_SCRIPT = r"""
import importlib.util, json, os, re, sys
import triton
from triton.backends import backends
from triton.backends.compiler import GPUTarget

package_dir, = sys.argv[1:]
if "nvidia" not in backends:
    print("SKIP: this triton has no CUDA backend")
    sys.exit(0)
# The kernels package from the source tree, under a name of its own.
spec = importlib.util.spec_from_file_location("kernels_under_compile", os.path.join(package_dir, "__init__.py"),
                                              submodule_search_locations=[package_dir])
package = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = package
spec.loader.exec_module(package)
perturb = sys.modules["kernels_under_compile.perturb"]
update = sys.modules["kernels_under_compile.update"]
if not all(isinstance(k, triton.runtime.JITFunction) for k in (perturb._perturb_kernel, update._update_kernel)):
    sys.exit("the kernels are not JITFunctions: TRITON_INTERPRET is still set")
types = {"table_ptr": "*i64", "count": "i32", "alpha": "fp32", "restore": "fp32", "seed": "i64",
         "rounding_stream": "i64", "scales_ptr": "*fp32"}
types.update({f"coef{k}": "fp32" for k in range(perturb.MAX_TERMS)})
types.update({f"stream{k}": "i64" for k in range(perturb.MAX_TERMS)})
types.update({name: "fp32" for name in update.Hyper._fields})


def layout(module, dist):
    gaussian = dist == "gaussian"
    return {
        "GAUSSIAN": gaussian,
        "GROUP_SIZE": perturb.GAUSSIAN_GROUP if gaussian else perturb.RADEMACHER_GROUP,
        "GROUPS_PER_PROGRAM": module.GAUSSIAN_GROUPS_PER_PROGRAM if gaussian else module.RADEMACHER_GROUPS_PER_PROGRAM,
    }


DTYPES = {"fp32": triton.language.float32, "bf16": triton.language.bfloat16, "fp16": triton.language.float16}


def build(kernel, dtype, constexprs, num_terms, aligned=True):
    # The kernel of one launch over many tensors of `dtype` (kernels/tables.py), all aligned or not.
    constexprs = {**constexprs, "DTYPE": DTYPES[dtype], "ALIGNED": aligned}
    signature = {name: "constexpr" if name in constexprs else types[name] for name in kernel.arg_names}
    # What the launcher's specialization gives the table and the scales: 16-byte aligned tensors.
    attrs = {(kernel.arg_names.index(name),): [["tt.divisibility", 16]]
             for name in kernel.arg_names if name.endswith("_ptr")}
    try:
        compiled = triton.compile(
            triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs),
            target=GPUTarget("cuda", 90, 32),
            options=perturb.LAUNCH_OPTIONS,
        )
    except RuntimeError as error:
        if "Cannot find ptxas" in str(error):
            print(f"SKIP: {error} (TRITON_PTXAS_PATH can point to a CUDA toolkit's ptxas)")
            sys.exit(0)
        raise
    ptx = compiled.asm.get("ptx", "")
    return ptx, {
        "num_terms": num_terms,
        "has_ptx": "ptx" in compiled.asm,
        "sm_90": ".target sm_90" in ptx,
        "cubin_bytes": len(compiled.asm.get("cubin", b"")),
        "mul_hi": ptx.count("mul.hi.u32"),
        "fma_f32": len(re.findall(r"fma\.rn(\.ftz)?\.f32", ptx)),
        "vector_loads": ptx.count("ld.global.v"),
    }


results = {}
for dtype, dist, num_terms in [("fp32", "rademacher", 3), ("bf16", "rademacher", 1),
                               ("fp32", "gaussian", 1), ("bf16", "gaussian", 2)]:
    constexprs = {"NUM_TERMS": num_terms, **layout(perturb, dist)}
    _, results[f"{dtype}-{dist}-{num_terms}"] = build(perturb._perturb_kernel, dtype, constexprs, num_terms)
# The launch of the tensors that are not all aligned: it compiles, without vector loads.
_, results["bf16-rademacher-1-misaligned"] = build(perturb._perturb_kernel, "bf16",
                                                  {"NUM_TERMS": 1, **layout(perturb, "rademacher")}, 1, aligned=False)
# zo_update_ (num_terms > 0) and grad_update_ (num_terms = 0, Rademacher layout).
for dtype, rule, dist, num_terms in [("fp32", "ADAM", "rademacher", 3), ("fp16", "ADAZO", "rademacher", 1),
                                     ("bf16", "ADAM", "gaussian", 2), ("fp32", "ADAM_MOMENTS", "rademacher", 0),
                                     ("bf16", "QUANTIZED", "rademacher", 0), ("fp16", "SGD", "rademacher", 0),
                                     ("fp32", "SOPHIA", "rademacher", 0)]:
    info = update.Rule[rule].info  # what the launcher passes for the rule, from the registry
    constexprs = {"RULE": getattr(update, rule).value, "NUM_TERMS": num_terms, "HAS_M": info.reads_m or info.writes_m,
                  "HAS_V": info.reads_v or info.writes_v, "WRITES_M": info.writes_m, "WRITES_V": info.writes_v,
                  "STOCHASTIC": False, "STATE_DTYPE": DTYPES["fp32"], "STOCHASTIC_STATE": False,
                  **layout(update, dist)}
    ptx, build_info = build(update._update_kernel, dtype, constexprs, num_terms)
    build_info.update(
        approx_div=len(re.findall(r"div\.(approx|full)(\.ftz)?\.f32", ptx)),
        approx_sqrt=len(re.findall(r"sqrt\.approx(\.ftz)?\.f32", ptx)),
        ieee_div=ptx.count("div.rn.f32"),
        atomics=len(re.findall(r"\b(atom|red)\.global", ptx)),
    )
    results[f"update-{dtype}-{rule}-{dist}-{num_terms}"] = build_info
# Stochastic rounding of a bfloat16 and a float16 parameter and of bfloat16 (lean) state: it
# compiles, with IEEE math only.
for dtype in ("bf16", "fp16"):
    info = update.Rule["ADAZO"].info
    constexprs = {"RULE": update.ADAZO.value, "NUM_TERMS": 1, "HAS_M": True, "HAS_V": True, "WRITES_M": True,
                  "WRITES_V": True, "STOCHASTIC": True, "STATE_DTYPE": DTYPES["bf16"], "STOCHASTIC_STATE": True,
                  **layout(update, "rademacher")}
    ptx, build_info = build(update._update_kernel, dtype, constexprs, 1)
    build_info.update(approx_div=len(re.findall(r"div\.(approx|full)(\.ftz)?\.f32", ptx)))
    results[f"update-{dtype}-ADAZO-stochastic"] = build_info
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def sm90_build(tmp_path_factory):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton-cache"))
    done = subprocess.run(
        [sys.executable, "-c", COMPILE_SCRIPT, os.path.dirname(perturb_module.__file__)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    last_line = done.stdout.strip().splitlines()[-1]
    if last_line.startswith("SKIP: "):
        pytest.skip(last_line[len("SKIP: "):])
    return json.loads(last_line)


@pytest.mark.parametrize("variant", ["fp32-rademacher-3", "bf16-rademacher-1", "fp32-gaussian-1", "bf16-gaussian-2"])
def test_compiles_for_sm90(sm90_build, variant):
    build = sm90_build[variant]
    assert build["has_ptx"] and build["sm_90"] and build["cubin_bytes"] > 0, build
    assert build["vector_loads"] > 0 or not VECTOR_HINTS, f"an aligned tensor should get vector loads: {build}"
    if "rademacher" in variant:
        # One Philox per group per thread, not one per thread per row piece (8 Philox of ~20 mul.hi).
        assert build["mul_hi"] <= 20 * build["num_terms"], build
        # enable_fp_fusion=False reached the compiler: alpha * theta is not fused into the first add.
        assert build["fma_f32"] == 0, build


@pytest.mark.parametrize("variant", ["update-fp32-ADAM-rademacher-3", "update-fp16-ADAZO-rademacher-1",
                                     "update-bf16-ADAM-gaussian-2", "update-fp32-ADAM_MOMENTS-rademacher-0",
                                     "update-bf16-QUANTIZED-rademacher-0", "update-fp16-SGD-rademacher-0",
                                     "update-fp32-SOPHIA-rademacher-0"])
def test_update_compiles_for_sm90_with_ieee_math(sm90_build, variant):
    """The rules' bits on a GPU: IEEE division and square root (div_rn, sqrt_rn), no FMA."""
    build = sm90_build[variant]
    assert build["has_ptx"] and build["sm_90"] and build["cubin_bytes"] > 0, build
    assert build["vector_loads"] > 0 or not VECTOR_HINTS, f"aligned tensors should get vector loads: {build}"
    assert build["approx_div"] == 0, build
    assert build["ieee_div"] > 0 or "SGD" in variant, f"the rule's divisions should be div.rn.f32: {build}"
    assert ("ADAM_MOMENTS" in variant) == (build["atomics"] > 0), build
    if "rademacher" in variant:
        # The Gaussian transform has its own approximate sqrt and libdevice FMAs, as in perturb_.
        assert build["approx_sqrt"] == 0 and build["fma_f32"] == 0, build
        # The restore's z_last shares the last term's Philox (LLVM folds the repeat).
        assert build["mul_hi"] <= 20 * build["num_terms"], build


@pytest.mark.parametrize("variant", ["update-bf16-ADAZO-stochastic", "update-fp16-ADAZO-stochastic"])
def test_stochastic_rounding_compiles_for_sm90(sm90_build, variant):
    """The rounding words' Philox and the rounding itself compile, with IEEE divisions only."""
    build = sm90_build[variant]
    assert build["has_ptx"] and build["sm_90"] and build["cubin_bytes"] > 0, build
    assert build["approx_div"] == 0, build
    # One Philox for the direction and one per element for its rounding word (8 of a block share it).
    assert build["mul_hi"] > 20, build

