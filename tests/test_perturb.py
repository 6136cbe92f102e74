"""The fused op `perturb_` on every backend this machine can run, against the pure-PyTorch
reference (zounlearn.ops.reference), which is itself checked against hand formulas."""

from __future__ import annotations

import pytest
import torch

from zounlearn import rng
from zounlearn.ops import backends, flat_offsets, perturb_, reference, sample

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
RUNNABLE = [name for name, why in backends.status().items() if why is None and name != "reference"]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
RUNNABLE = [name for name in RUNNABLE if backends.runs_on(name, DEVICE)]


def make_params(dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    """Several tensors of odd sizes, one of them empty, laid out as one flat vector."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(37, 11), (129,), (0,), (5, 3, 7), (1,), (300,)]
    return [torch.randn(s, generator=gen).to(dtype).to(DEVICE) for s in shapes]


def run_reference(params, offsets, alpha, coefs, streams, seed, dist):
    out = [p.clone() for p in params]
    reference.perturb_(out, offsets, alpha, coefs, streams, seed, dist)
    return out


CASES = [
    # (alpha, coefs, streams)
    (1.0, [1e-3], [0]),
    (0.999, [-0.5], [2**40 + 7]),
    (1.0, [1e-3, -2e-3, 5e-4], [0, 1, 2]),
    (0.97, [0.1 * (k + 1) * (-1) ** k for k in range(8)], list(range(8))),
]


@pytest.mark.parametrize("backend", RUNNABLE)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=["K1", "K1-alpha", "K3", "K8-alpha"])
@pytest.mark.parametrize("base", [0, 2**32 - 500])
def test_rademacher_equals_reference(backend, dtype, case, base):
    alpha, coefs, streams = case
    params = make_params(dtype)
    offsets = flat_offsets(params, start=base)
    want = run_reference(params, offsets, alpha, coefs, streams, 99, "rademacher")
    perturb_(params, coefs, 99, streams=streams, offsets=offsets, alpha=alpha, backend=backend)
    for got, exp in zip(params, want):
        assert torch.equal(got, exp)


@pytest.mark.parametrize("backend", RUNNABLE)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES[::3], ids=["K1", "K8-alpha"])
def test_gaussian_close_to_reference(backend, dtype, case):
    alpha, coefs, streams = case
    params = make_params(dtype)
    offsets = flat_offsets(params, start=2**32 - 500)
    want = run_reference(params, offsets, alpha, coefs, streams, 7, "gaussian")
    perturb_(params, coefs, 7, streams=streams, offsets=offsets, alpha=alpha, dist="gaussian", backend=backend)
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
        reference.perturb_([got], [10], 0.9, [0.25, -0.125], [3, 4], 5, "gaussian")
        acc = t.float() * torch.tensor(0.9, dtype=torch.float32)
        for c, s in ((0.25, 3), (-0.125, 4)):
            acc = acc + torch.tensor(c, dtype=torch.float32) * rng.sample(5, s, 10, 1000, "gaussian")
        assert torch.equal(got, acc.to(dtype))


@pytest.mark.parametrize("backend", RUNNABLE + ["reference"])
@pytest.mark.parametrize("dist", rng.DISTRIBUTIONS)
def test_plus_then_minus_restores_float32(backend, dist):
    """Within 1 ulp, at the scale of the larger of theta and theta + c z (the sum's rounding
    happens there: an element near 0 can move by several of its own tiny ulps)."""
    theta = torch.randn(5000, device=DEVICE)
    x = theta.clone()
    perturb_(x, 1e-3, 11, dist=dist, backend=backend)
    assert not torch.equal(x, theta)
    scale = torch.maximum(theta.abs(), x.abs())
    perturb_(x, -1e-3, 11, dist=dist, backend=backend)
    one_ulp = torch.nextafter(scale, torch.full_like(scale, float("inf"))) - scale
    assert bool(((x - theta).abs() <= one_ulp).all())


@pytest.mark.parametrize("backend", RUNNABLE)
def test_multi_term_equals_sum_of_single_terms(backend):
    """One pass of K terms equals the float32 sum of the K single-term directions."""
    theta = torch.randn(3000, device=DEVICE)
    coefs, streams = [0.5, -0.25, 0.125], [4, 9, 2**33]
    fused = theta.clone()
    perturb_(fused, coefs, 8, streams=streams, backend=backend)
    acc = theta.clone()
    for c, s in zip(coefs, streams):
        acc = acc + sample(3000, 8, s, backend=backend, device=DEVICE) * c
    assert torch.equal(fused, acc)


@pytest.mark.parametrize("backend", RUNNABLE)
def test_split_equals_flat(backend):
    """z depends on the global index only: one flat tensor equals the same data split in pieces."""
    flat = torch.randn(1000, device=DEVICE)
    pieces = [t.clone() for t in flat.split([1, 126, 300, 573])]
    perturb_(flat, 1.0, 3, dist="gaussian", backend=backend)
    perturb_(pieces, 1.0, 3, dist="gaussian", backend=backend)
    assert torch.equal(torch.cat(pieces), flat)


def test_default_streams_and_offsets():
    a, b = torch.zeros(10), torch.zeros(20)
    perturb_([a, b], [1.0, 2.0], 5, alpha=0.0)
    want = rng.sample(5, 0, 0, 30) + 2 * rng.sample(5, 1, 0, 30)
    assert torch.equal(torch.cat([a, b]), want)


def test_backend_from_environment(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "reference")
    assert backends.select("cpu")[0] == "reference"
    monkeypatch.setenv(backends.ENV_VAR, "cuda")
    with pytest.raises(backends.BackendUnavailable, match="cannot run on cpu"):
        perturb_(torch.zeros(3), 1.0, 0)


def test_requires_grad_parameter_is_perturbed_in_place():
    p = torch.nn.Parameter(torch.zeros(300))
    perturb_(p, 1.0, 1, alpha=0.0)
    assert p.requires_grad and p.grad_fn is None
    assert torch.equal(p.detach(), rng.sample(1, 0, 0, 300))


def test_opcheck_and_compile():
    """The torch.library registration holds: schema, fake implementation and torch.compile."""
    x = torch.randn(257)
    torch.library.opcheck(
        torch.ops.zounlearn.perturb_.default, ([x], [0], 1.0, [0.5], [1], 3, "rademacher", "auto")
    )

    def step(t):
        perturb_(t, 0.5, 3)
        return t * 2

    eager = step(x.clone())
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)(x.clone())
    assert torch.equal(eager, compiled)


@pytest.mark.skipif(backends.status()["cpp"] is not None, reason="C++ extension not built")
def test_cpp_allocates_no_parameter_sized_tensor():
    theta = torch.randn(1 << 22)  # 16 MiB
    perturb_(theta, 1e-3, 1, backend="cpp")  # warm up
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        for dist in rng.DISTRIBUTIONS:
            perturb_(theta, [1e-3, 2e-3], 1, dist=dist, backend="cpp")
    allocated = [e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0]
    assert max(allocated, default=0) < theta.numel() * theta.element_size() // 100


@pytest.mark.skipif(backends.status()["cpp"] is not None, reason="C++ extension not built")
def test_reference_temporaries_are_chunk_sized():
    """The check above can fail: the reference allocates, but only chunk-sized temporaries."""
    theta = torch.randn(1 << 22)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        perturb_(theta, 1e-3, 1, backend="reference")
    allocated = [e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0]
    assert theta.numel() * theta.element_size() // 100 < max(allocated) <= 64 * reference.CHUNK * 4


@pytest.mark.slow
@pytest.mark.skipif(backends.status()["cpp"] is not None, reason="C++ extension not built")
def test_cpp_more_than_2_31_elements():
    """64-bit indexing: a bfloat16 tensor of 2^31 + 300 elements (4 GiB) at a base offset past 2^32."""
    n, base = 2**31 + 300, 2**32 + 17
    z = torch.zeros(n, dtype=torch.bfloat16)
    perturb_(z, 1.0, 42, offsets=[base], alpha=0.0, backend="cpp")
    for start in (0, 2**31 - 200, n - 500):
        want = rng.sample(42, 0, base + start, 500).to(torch.bfloat16)
        assert torch.equal(z[start : start + 500], want), start


@pytest.mark.skipif(backends.status()["cpp"] is not None, reason="C++ extension not built")
def test_cpp_uses_torch_threads():
    """Built without OpenMP, at::parallel_for silently runs the op on one thread."""
    import zounlearn._C_cpu as ext

    assert ext.parallel_threads() == torch.get_num_threads()
