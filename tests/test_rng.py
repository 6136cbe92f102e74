"""ZO-RNG v1 (docs/rng.md): the pure-PyTorch oracle against published Philox answers, the
C++ op against the oracle, and the statistics of both distributions."""

from __future__ import annotations

import math
import random

import pytest
import torch

from zounlearn import rng
from zounlearn.ops import backends, sample

# Fixed edge cases plus fresh random 64-bit seeds each run (their values name the test case).
SEEDS = [0, 1, 12345, 2**32, 2**32 + 5, 2**63 + 3, 2**64 - 1] + [random.getrandbits(64) for _ in range(3)]
STREAMS = [0, 1, 7, 2**40 + 7, 2**64 - 1]
OFFSETS = [0, 5, 1000, 2**32 - 70, 2**40 + 3]  # 2**32 - 70 crosses 2^32 inside the tensor
SIZES = [0, 1, 127, 128, 129, 4097]


def test_philox_known_answers():
    """Random123's published Philox4x32-10 known-answer vectors (kat_vectors), in our word order:
    counter = (block lo, block hi, stream lo, stream hi), key = (seed lo, seed hi)."""
    cases = [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    ]
    for counter, key, expected in cases:
        block = counter[0] | counter[1] << 32
        stream = counter[2] | counter[3] << 32
        seed = key[0] | key[1] << 32
        block -= (block >> 63) << 64  # as the int64 the oracle takes
        words = rng.philox(seed, torch.tensor([block]), stream)
        assert tuple(int(w) for w in words) == expected


def test_seed_and_stream_wrap_mod_2_64():
    assert torch.equal(rng.sample(-1, 3, 10, 300), rng.sample(2**64 - 1, 3, 10, 300))
    assert torch.equal(rng.sample(5, -2, 10, 300), rng.sample(5, 2**64 - 2, 10, 300))
    assert not torch.equal(rng.sample(5, 0, 10, 300), rng.sample(5 + 2**32, 0, 10, 300))


def test_offset_slices_one_stream():
    """The whole model is one flat vector: a window of the stream equals the window of a longer draw."""
    for dist in rng.DISTRIBUTIONS:
        long = rng.sample(9, 2, 100, 1000, dist)
        assert torch.equal(rng.sample(9, 2, 357, 200, dist), long[257:457])


cpp = pytest.mark.skipif(not backends.runs_on("cpp", "cpu"), reason="C++ extension not built")


@pytest.fixture(autouse=False)
def on_cpp():
    with backends.use("cpp"):
        yield


@cpp
@pytest.mark.usefixtures("on_cpp")
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("stream", STREAMS)
def test_cpp_rademacher_bit_exact(seed, stream):
    for offset in OFFSETS:
        for size in SIZES:
            got = sample(size, seed, stream, offset=offset)
            assert torch.equal(got, rng.sample(seed, stream, offset, size)), (offset, size)


@cpp
@pytest.mark.usefixtures("on_cpp")
@pytest.mark.parametrize("shape", [(3, 45), (7, 129), (2, 3, 5)])
def test_cpp_odd_shapes_row_major(shape):
    got = sample(shape, 77, 1, offset=2**32 - 100)
    assert torch.equal(got.reshape(-1), rng.sample(77, 1, 2**32 - 100, got.numel()))


@cpp
@pytest.mark.usefixtures("on_cpp")
@pytest.mark.parametrize("seed", SEEDS)
def test_cpp_gaussian_within_1e6(seed):
    for stream in (0, 3, 2**40 + 7):
        for offset in OFFSETS:
            for size in SIZES:
                got = sample(size, seed, stream, offset=offset, dist="gaussian")
                want = rng.sample(seed, stream, offset, size, "gaussian")
                torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


@cpp
@pytest.mark.usefixtures("on_cpp")
def test_cpp_gaussian_many_values_within_1e6():
    """2^18 normals cover the tails of log and the four sincos quadrants of the polynomial path."""
    got = sample(1 << 18, 2024, 5, offset=3, dist="gaussian")
    want = rng.sample(2024, 5, 3, 1 << 18, "gaussian")
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


N_STAT = 1 << 20


def _draw(dist: str, seed: int = 123, stream: int = 0, offset: int = 0) -> torch.Tensor:
    return sample(N_STAT, seed, stream, offset=offset, dist=dist).double()


def test_rademacher_values_and_balance():
    scipy_stats = pytest.importorskip("scipy.stats")
    z = _draw("rademacher")
    assert set(z.unique().tolist()) == {-1.0, 1.0}
    plus = int((z > 0).sum())
    # P(z = +1) = 1/2: a two-sided binomial test at 1e-6 (no tuning: one fixed draw)
    assert scipy_stats.binomtest(plus, N_STAT, 0.5).pvalue > 1e-6


def test_gaussian_moments_and_ks():
    scipy_stats = pytest.importorskip("scipy.stats")
    z = _draw("gaussian")
    n = z.numel()
    assert abs(z.mean().item()) < 5 / math.sqrt(n)
    assert abs(z.var().item() - 1) < 5 * math.sqrt(2 / n)
    assert scipy_stats.kstest(z.numpy(), "norm").pvalue > 1e-4
    assert z.abs().max().item() <= math.sqrt(-2 * math.log(1e-7)) + 1e-5


@pytest.mark.parametrize("dist", rng.DISTRIBUTIONS)
@pytest.mark.parametrize(
    "other",
    [dict(seed=124), dict(seed=123 + 2**32), dict(stream=1), dict(stream=2**32), dict(offset=1), dict(offset=128)],
)
def test_streams_uncorrelated(dist, other):
    """Different seeds, streams and neighbouring elements give uncorrelated directions."""
    a = _draw(dist)
    b = _draw(dist, **{"seed": 123, "stream": 0, "offset": 0, **other})
    corr = torch.corrcoef(torch.stack([a, b]))[0, 1].item()
    assert abs(corr) < 5 / math.sqrt(N_STAT)
