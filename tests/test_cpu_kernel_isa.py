"""The cpp backend's builds of its kernels for each instruction set (generic x86-64, AVX2, AVX-512,
AVX-512 with BF16: csrc/cpu/isa_flags.json) compute the same bits: every op, rule, dtype, both
distributions and both roundings, on inputs with NaN payloads, infinities, signed zeros,
subnormals and overflow, through every build this processor runs, against the generic build.
The generic build itself is held to the reference by test_perturb.py and test_update_ops.py."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch
from conftest import DTYPES

from zounlearn import rng
from zounlearn.errors import BackendUnavailable
from zounlearn.ops import backends, flat_offsets
from zounlearn.ops.library import ops
from zounlearn.ops.rules import RULES, ZO_RULES, Hyper, Rule
from zounlearn.ops.validation import as_int64

pytestmark = pytest.mark.skipif(not backends.runs_on("cpp", "cpu"), reason="the cpp backend is not built")

ROOT = pathlib.Path(__file__).resolve().parents[1]
BUILDS = list(json.loads((ROOT / "csrc" / "cpu" / "isa_flags.json").read_text()))
RUNNABLE = [name for name, runs in backends.cpu_capabilities().items() if runs] if BUILDS else []
OTHERS = [pytest.param(name, marks=pytest.mark.skipif(name not in RUNNABLE, reason=f"this processor cannot run {name}"))
          for name in BUILDS[1:]]
# Odd sizes laid end to end from an offset that is no group boundary: partial and full groups.
SHAPES = [(37, 11), (129,), (0,), (1000,), (5, 3, 7), (1,), (3, 300)]
START = 2**32 - 333
ROUNDING_STREAM = -(2**62) - 5
STATE_DTYPES = [torch.float32, torch.bfloat16]  # bfloat16: the lean state
# float32 values that every store must round the same way (as float32, bfloat16 or float16).
SPECIALS = [float("nan"), -float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-39, -3e-40, 1.1e-38,
            3.38e38, -3.4e38, 65504.0, 65519.0, -70000.0, 3e-6, -6e-8, 1e-8, 1.0 + 2**-9, -(1.0 + 3 * 2**-9)]


def with_specials(t: torch.Tensor, every: int) -> torch.Tensor:
    """t (float32) with SPECIALS and NaNs of other payloads at every `every`-th element."""
    flat = t.reshape(-1)
    values = torch.tensor(SPECIALS * (flat.numel() // (every * len(SPECIALS)) + 1))[: len(flat[::every])]
    flat[::every] = values
    bits = flat.view(torch.int32)
    bits[5::every * 7] = 0x7FA00001  # a signalling NaN with a payload
    bits[9::every * 11] = -0x7F00001  # a negative quiet NaN with another
    return t


def inputs(dtype: torch.dtype, seed: int, state: bool = True, state_dtype: torch.dtype = torch.float32):
    """params (with specials), grads (with specials), m, v (v >= 0) of SHAPES, m and v in state_dtype."""
    gen = torch.Generator().manual_seed(seed)
    params = [with_specials(torch.randn(s, generator=gen), 13).to(dtype) for s in SHAPES]
    grads = [with_specials(torch.randn(s, generator=gen), 17).to(dtype) for s in SHAPES]
    m = [with_specials(torch.randn(s, generator=gen) * 0.3, 19) for s in SHAPES] if state else []
    v = [torch.rand(s, generator=gen) * 0.1 for s in SHAPES] if state else []
    if v:
        v[3][::23] = 0.0
        v[3][1::29] = float("inf")
    return params, grads, [t.to(state_dtype) for t in m], [t.to(state_dtype) for t in v]


def bits(t: torch.Tensor) -> torch.Tensor:
    """The bit patterns: NaN payloads and signed zeros count."""
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


def same_bits(fn, build: str, nan_payloads: bool = True) -> bool:
    """Whether fn() returns the same bit patterns under the generic build and under `build`.
    nan_payloads=False: where both results are NaN, the NaNs' own bits may differ. Where two NaN
    operands meet (theta and g, say), which one's payload IEEE 754 propagates is unspecified and
    the compiler orders a commutative operation's operands as it likes; a single NaN operand's
    payload, and everything else, is deterministic."""
    results = []
    for name in (BUILDS[0], build):
        with backends.use("cpp"), backends.cpu_capability(name):
            results.append(fn())
    for want, got in zip(*results):
        same = bits(want) == bits(got)
        if not nan_payloads:
            same |= want.isnan() & got.isnan()
        if not bool(same.all()):
            return False
    return True


def clones(ts):
    return [t.clone() for t in ts]


# Coefficients: one term; two whose sums are float32 subnormals (which bfloat16 keeps and some
# conversion instructions flush); three with a subnormal and a large one (float16 overflows); eight.
TERMS = {1: ([1e-3], [3]), 2: ([1e-39, -3e-41], [5, 2**33]), 3: ([0.3, -1e-41, 2.5e4], [0, 2**40 + 7, 9]),
         8: ([0.3, -0.2, 0.1, 0.5, -0.7, 0.05, 0.9, -0.33], [3, 0, 2**40 + 7, -5, 1, -(2**62), 77, 2**32])}


def perturb_cases(dtype, dist):
    params = inputs(dtype, 1, state=False)[0]
    offsets = flat_offsets(params, start=START)
    for count, (coefs, streams) in TERMS.items():
        for alpha in (1.0, 0.999, 0.0):
            yield params, offsets, coefs, streams, alpha, f"K={count} alpha={alpha}"


@pytest.mark.parametrize("build", OTHERS)
@pytest.mark.parametrize("dist", rng.DISTRIBUTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_perturb_same_bits_in_every_build(build, dtype, dist):
    for params, offsets, coefs, streams, alpha, case in perturb_cases(dtype, dist):
        def in_place():
            out = clones(params)
            ops.perturb_(out, offsets, coefs, streams, -1, dist, alpha)
            return out

        def into():
            out = [torch.full_like(p, 7.0) for p in params]
            ops.perturb_into(params, out, offsets, coefs, streams, 2**32 + 5, dist, alpha)
            return out

        for fn in (in_place, into):
            assert same_bits(fn, build), f"{fn.__name__} {case}"


def hyper(rule: Rule) -> Hyper:
    return Hyper.make(0.05, weight_decay=0.1, decoupled=rule is not Rule.SGD, beta1=0.9, beta2=0.99, eps=1e-6,
                      step=4, bits=3, rho=0.04)


@pytest.mark.parametrize("build", OTHERS)
@pytest.mark.parametrize("rounding", rng.ROUNDINGS)
@pytest.mark.parametrize("dist", rng.DISTRIBUTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("state_dtype", STATE_DTYPES, ids=str)
def test_zo_update_same_bits_in_every_build(build, dtype, dist, rounding, state_dtype):
    for rule in ZO_RULES:
        params, _, m, v = inputs(dtype, 2, state_dtype=state_dtype)
        m, v = (m if rule.uses_m else []), (v if rule.uses_v else [])
        offsets = flat_offsets(params, start=START)
        for count, (coefs, streams) in TERMS.items():
            def update():
                out = clones(params), clones(m), clones(v)
                ops.zo_update_(*out, offsets, coefs, streams, 17, dist, 1e-3, rule.value, rounding, ROUNDING_STREAM,
                               *hyper(rule))
                return [t for ts in out for t in ts]

            assert same_bits(update, build, nan_payloads=False), f"{rule.name} K={count}"


@pytest.mark.parametrize("build", OTHERS)
@pytest.mark.parametrize("rounding", rng.ROUNDINGS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("state_dtype", STATE_DTYPES, ids=str)
def test_grad_update_same_bits_in_every_build(build, dtype, rounding, state_dtype):
    for rule in RULES:
        params, grads, m, v = inputs(dtype, 3, state_dtype=state_dtype)
        m, v = (m if rule.uses_m else []), (v if rule.uses_v else [])
        offsets = flat_offsets(params, start=77)
        scales = torch.rand(len(params)) if rule in (Rule.QUANTIZED, Rule.ADAM_MOMENTS) else None
        if scales is not None:
            scales[2] = 0.0  # the empty tensor's

        def update():
            out = clones(params), clones(m), clones(v), [scales.clone()] if scales is not None else []
            ops.grad_update_(out[0], grads, out[1], out[2], out[3][0] if out[3] else None, offsets, 23, rule.value,
                             rounding, ROUNDING_STREAM, *hyper(rule))
            return [t for ts in out for t in ts]

        assert same_bits(update, build, nan_payloads=False), rule.name


@pytest.mark.parametrize("build", [BUILDS[0], *OTHERS])
@pytest.mark.parametrize("dist", rng.DISTRIBUTIONS)
def test_every_build_samples_the_oracle(build, dist):
    """z itself (alpha 0, one term of coefficient 1) against zounlearn.rng, in every build."""
    for seed, stream, offset, numel in [(2**64 - 1, 3, 2**32 - 70, 1000), (12345, 0, 5, 4097), (7, 2**40 + 7, 0, 129)]:
        with backends.use("cpp"), backends.cpu_capability(build):
            got = ops.sample([numel], as_int64(seed, "seed"), stream, offset, dist, torch.float32, "cpu")
        want = rng.sample(seed, stream, offset, numel, dist)
        if dist == "rademacher":
            assert torch.equal(got, want)
        else:
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_builds_are_the_flags_files_and_the_highest_runs():
    """capability.cpp's builds are isa_flags.json's, in its order, and the default is the highest
    this processor runs."""
    assert list(backends.cpu_capabilities()) == BUILDS
    assert RUNNABLE[0] == "generic"
    with backends.cpu_capability("auto"):
        assert backends.build_info("cpp").startswith(f"CPU kernels: {RUNNABLE[-1]}, chosen by cpuid")


def test_processor_flags_agree_with_cpuid():
    """What capability.cpp reads from cpuid against what the kernel reports in /proc/cpuinfo."""
    try:
        flags = set(next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split(":")[1].split())
    except (OSError, StopIteration):
        pytest.skip("no /proc/cpuinfo")
    needs = {"avx2": {"avx2", "fma", "f16c"}, "avx512": {"avx512f", "avx512bw", "avx512dq", "avx512vl"},
             "avx512_bf16": {"avx512_bf16"}}
    expected, have = ["generic"], set()
    for name in BUILDS[1:]:
        have |= needs[name]
        if have <= flags:
            expected.append(name)
    assert RUNNABLE == expected


def test_unknown_capability_is_refused():
    with pytest.raises(BackendUnavailable, match="no such CPU capability; choose one of: generic"):
        with backends.cpu_capability("avx9"):
            pass


def _run_with(value: str, code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, backends.CPU_CAPABILITY_ENV_VAR: value}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_environment_variable_chooses_the_build():
    code = ("import torch; from zounlearn.ops import perturb_, backends; p = torch.zeros(300); perturb_(p, 1.0, 3); "
            "print(backends.build_info('cpp')); print(int(p.abs().sum()))")
    done = _run_with("generic", code)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == [f"CPU kernels: generic, chosen by {backends.CPU_CAPABILITY_ENV_VAR}; "
                                        f"this processor runs {', '.join(RUNNABLE)}", "300"]
    bad = _run_with("sse9", code)
    assert bad.returncode != 0
    assert f"{backends.CPU_CAPABILITY_ENV_VAR}=sse9: no such CPU capability" in bad.stderr
