"""The fused op `perturb_` on every backend this machine can run, against the pure-PyTorch
reference (zounlearn.ops.reference), which is itself checked against hand formulas."""

from __future__ import annotations

import pytest
import torch
from conftest import BACKENDS, DEVICE, DTYPES, FAST_BACKENDS, SHAPES

from zounlearn import rng
from zounlearn.errors import BackendUnavailable
from zounlearn.ops import backends, flat_offsets, perturb_, reference, sample


def make_params(dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    """Several tensors of odd sizes, one of them empty, laid out as one flat vector."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).to(dtype).to(DEVICE) for s in SHAPES]


def run_reference(params, offsets, alpha, coefs, streams, seed, dist):
    out = [p.clone() for p in params]
    reference.perturb_(out, offsets, coefs, streams, seed, dist, alpha)
    return out


CASES = [
    # (alpha, coefs, streams)
    (1.0, [1e-3], [0]),
    (0.999, [-0.5], [2**40 + 7]),
    (1.0, [1e-3, -2e-3, 5e-4], [0, 1, 2]),
    (0.97, [0.1 * (k + 1) * (-1) ** k for k in range(8)], list(range(8))),
]


@pytest.mark.parametrize("backend", FAST_BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=["K1", "K1-alpha", "K3", "K8-alpha"])
@pytest.mark.parametrize("base", [0, 2**32 - 500])
def test_rademacher_equals_reference(backend, dtype, case, base):
    alpha, coefs, streams = case
    params = make_params(dtype)
    offsets = flat_offsets(params, start=base)
    want = run_reference(params, offsets, alpha, coefs, streams, 99, "rademacher")
    perturb_(params, coefs, 99, streams=streams, offsets=offsets, alpha=alpha)
    for got, exp in zip(params, want):
        assert torch.equal(got, exp)


@pytest.mark.parametrize("backend", FAST_BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES[::3], ids=["K1", "K8-alpha"])
def test_gaussian_close_to_reference(backend, dtype, case):
    alpha, coefs, streams = case
    params = make_params(dtype)
    offsets = flat_offsets(params, start=2**32 - 500)
    want = run_reference(params, offsets, alpha, coefs, streams, 7, "gaussian")
    perturb_(params, coefs, 7, streams=streams, offsets=offsets, alpha=alpha, dist="gaussian")
    # z agrees to 1e-6, so the float32 result to sum |c| * 1e-6 plus one rounding; half types
    # may land one unit of their own precision apart when the two values straddle a rounding tie.
    atol = sum(abs(c) for c in coefs) * 1e-6
    for got, exp in zip(params, want):
        tol = atol + (exp.float().abs() * torch.finfo(dtype).eps).max().item() if exp.numel() else atol
        torch.testing.assert_close(got.float(), exp.float(), rtol=0, atol=tol)


def test_reference_matches_hand_formula():
    """alpha * theta, then + c_k * z_k in float32 in order, then one rounding."""
    theta = torch.randn(1000)
    for dtype in DTYPES:
        t = theta.to(dtype)
        got = t.clone()
        reference.perturb_([got], [10], [0.25, -0.125], [3, 4], 5, "gaussian", 0.9)
        acc = t.float() * torch.tensor(0.9, dtype=torch.float32)
        for c, s in ((0.25, 3), (-0.125, 4)):
            acc = acc + torch.tensor(c, dtype=torch.float32) * rng.sample(5, s, 10, 1000, "gaussian")
        assert torch.equal(got, acc.to(dtype))


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("dist", rng.DISTRIBUTIONS)
def test_plus_then_minus_restores_float32(backend, dist):
    """Within 1 ulp, at the scale of the larger of theta and theta + c z (the sum's rounding
    happens there: an element near 0 can move by several of its own tiny ulps)."""
    theta = torch.randn(5000, device=DEVICE)
    x = theta.clone()
    perturb_(x, 1e-3, 11, dist=dist)
    assert not torch.equal(x, theta)
    scale = torch.maximum(theta.abs(), x.abs())
    perturb_(x, -1e-3, 11, dist=dist)
    one_ulp = torch.nextafter(scale, torch.full_like(scale, float("inf"))) - scale
    assert bool(((x - theta).abs() <= one_ulp).all())


@pytest.mark.parametrize("backend", FAST_BACKENDS, indirect=True)
def test_multi_term_equals_sum_of_single_terms(backend):
    """One pass of K terms equals the float32 sum of the K single-term directions."""
    theta = torch.randn(3000, device=DEVICE)
    coefs, streams = [0.5, -0.25, 0.125], [4, 9, 2**33]
    fused = theta.clone()
    perturb_(fused, coefs, 8, streams=streams)
    acc = theta.clone()
    for c, s in zip(coefs, streams):
        acc = acc + sample(3000, 8, s, device=DEVICE) * c
    assert torch.equal(fused, acc)


@pytest.mark.parametrize("backend", FAST_BACKENDS, indirect=True)
def test_split_equals_flat(backend):
    """z depends on the global index only: one flat tensor equals the same data split in pieces."""
    flat = torch.randn(1000, device=DEVICE)
    pieces = [t.clone() for t in flat.split([1, 126, 300, 573])]
    perturb_(flat, 1.0, 3, dist="gaussian")
    perturb_(pieces, 1.0, 3, dist="gaussian")
    assert torch.equal(torch.cat(pieces), flat)


def test_default_streams_and_offsets():
    a, b = torch.zeros(10), torch.zeros(20)
    perturb_([a, b], [1.0, 2.0], 5, alpha=0.0)
    want = rng.sample(5, 0, 0, 30) + 2 * rng.sample(5, 1, 0, 30)
    assert torch.equal(torch.cat([a, b]), want)


def test_backend_from_environment(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "reference")
    with backends.use("auto"):
        assert backends.active("cpu") == "reference"
    monkeypatch.setenv(backends.ENV_VAR, "cuda")
    with backends.use("auto"), pytest.raises(BackendUnavailable, match="cannot run on cpu"):
        perturb_(torch.zeros(3), 1.0, 0)
    monkeypatch.delenv(backends.ENV_VAR)
    with backends.use("auto"):
        assert backends.active("cpu") == backends.PREFERENCE["cpu"][0]


def test_backend_from_environment_at_import():
    """The choice is made once, when zounlearn is imported, and registered with the dispatcher."""
    import subprocess
    import sys

    code = ("import torch, zounlearn\n"
            "from zounlearn.ops import backends\n"
            "print(backends.active('cpu'))\n"
            "x = torch.zeros(3)\n"
            "torch.ops.zounlearn.perturb_([x], [0], [1.0], [0], 0, 'rademacher', 1.0)\n")
    env = {**__import__("os").environ, backends.ENV_VAR: "reference"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["reference"]
    env[backends.ENV_VAR] = "opencl"
    failed = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert failed.returncode != 0 and "unknown backend 'opencl'" in failed.stderr
    assert failed.stdout.split() == ["opencl"], "importing must not fail for a bad choice; the op does"


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_autograd_sees_the_in_place_change(backend):
    """As torch's in-place ops: perturbing a tensor that autograd saved makes backward raise
    instead of returning a gradient computed from the changed values."""
    x = torch.tensor([1.0, 2.0, 3.0], device=DEVICE, requires_grad=True)
    y = x * 1.0
    loss = (y * y).sum()  # saves y for backward
    perturb_(y, 1.0, 0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    untouched = x * 1.0
    (untouched * untouched).sum().backward()
    assert torch.equal(x.grad, 2 * x.detach())


def test_requires_grad_parameter_is_perturbed_in_place():
    p = torch.nn.Parameter(torch.zeros(300))
    perturb_(p, 1.0, 1, alpha=0.0)
    assert p.requires_grad and p.grad_fn is None
    assert torch.equal(p.detach(), rng.sample(1, 0, 0, 300))


def test_opcheck_and_compile():
    """The torch.library registration holds: schema, fake implementation and torch.compile."""
    x = torch.randn(257)
    torch.library.opcheck(torch.ops.zounlearn.perturb_.default, ([x], [0], [0.5], [1], 3, "rademacher", 1.0))

    def step(t):
        perturb_(t, 0.5, 3)
        return t * 2

    eager = step(x.clone())
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)(x.clone())
    assert torch.equal(eager, compiled)


@pytest.mark.skipif(not backends.runs_on("cpp", "cpu"), reason="C++ extension not built")
@pytest.mark.parametrize("backend", ["cpp"], indirect=True)
def test_cpp_allocates_no_parameter_sized_tensor(backend):
    theta = torch.randn(1 << 22)  # 16 MiB
    perturb_(theta, 1e-3, 1)  # warm up
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        for dist in rng.DISTRIBUTIONS:
            perturb_(theta, [1e-3, 2e-3], 1, dist=dist)
    allocated = [e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0]
    assert max(allocated, default=0) < theta.numel() * theta.element_size() // 100


@pytest.mark.skipif(not backends.runs_on("cpp", "cpu"), reason="C++ extension not built")
@pytest.mark.parametrize("backend", ["reference"], indirect=True)
def test_reference_temporaries_are_chunk_sized(backend):
    """The check above can fail: the reference allocates, but only chunk-sized temporaries."""
    theta = torch.randn(1 << 22)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        perturb_(theta, 1e-3, 1)
    allocated = [e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0]
    assert theta.numel() * theta.element_size() // 100 < max(allocated) <= 64 * reference.CHUNK * 4


@pytest.mark.slow
@pytest.mark.skipif(not backends.runs_on("cpp", "cpu"), reason="C++ extension not built")
@pytest.mark.parametrize("backend", ["cpp"], indirect=True)
def test_cpp_more_than_2_31_elements(backend):
    """64-bit indexing: a bfloat16 tensor of 2^31 + 300 elements (4 GiB) at a base offset past 2^32."""
    n, base = 2**31 + 300, 2**32 + 17
    z = torch.zeros(n, dtype=torch.bfloat16)
    perturb_(z, 1.0, 42, offsets=[base], alpha=0.0)
    for start in (0, 2**31 - 200, n - 500):
        want = rng.sample(42, 0, base + start, 500).to(torch.bfloat16)
        assert torch.equal(z[start : start + 500], want), start


@pytest.mark.skipif(not backends.runs_on("cpp", "cpu"), reason="C++ extension not built")
def test_cpp_uses_torch_threads():
    """Built without OpenMP, at::parallel_for silently runs the op on one thread."""
    import zounlearn._C_cpu as ext

    assert ext.parallel_threads() == torch.get_num_threads()
