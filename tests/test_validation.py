"""Bad input raises an error that names the tensor and the problem, and changes nothing."""

from __future__ import annotations

import pytest
import torch

from zounlearn.ops import backends, perturb_, sample

BACKENDS = [name for name, why in backends.status().items() if why is None and backends.runs_on(name, "cpu")]


def good() -> torch.Tensor:
    return torch.arange(10, dtype=torch.float32)


BAD_CALLS = {
    "integer dtype": (lambda: [good(), torch.arange(5)], {}, r"params\[1\].*dtype must be float32"),
    "complex dtype": (lambda: [good(), torch.zeros(3, dtype=torch.complex64)], {}, r"params\[1\].*complex"),
    "float64": (lambda: [good(), torch.zeros(3, dtype=torch.float64)], {}, r"params\[1\].*float64"),
    "non-contiguous": (lambda: [good(), torch.zeros(4, 6).t()], {}, r"params\[1\].*not contiguous"),
    "two devices": (lambda: [good(), torch.zeros(3, device="meta")], {}, r"params\[1\].*all tensors must share"),
    "nine terms": (lambda: [good()], dict(coefs=[0.1] * 9), r"1 to 8 terms"),
    "no terms": (lambda: [good()], dict(coefs=[]), r"1 to 8 terms"),
    "streams mismatch": (lambda: [good()], dict(coefs=[0.1, 0.2], streams=[1]), r"one stream per coefficient"),
    "negative offset": (lambda: [good(), good()], dict(offsets=[0, -3]), r"offsets\[1\] = -3"),
    "offset past 2^63": (lambda: [good()], dict(offsets=[2**63 - 5]), r"offsets\[0\].*2\^63"),
    "offsets count": (lambda: [good(), good()], dict(offsets=[0]), r"one base offset per tensor"),
    "same tensor twice": (lambda: [good()] * 2, {}, r"params\[1\] and params\[0\] share memory"),
    "unknown dist": (lambda: [good()], dict(dist="uniform"), r"dist must be one of"),
    "unknown backend": (lambda: [good()], dict(backend="opencl"), r"unknown backend 'opencl'"),
    "float seed": (lambda: [good()], dict(seed=1.5), r"seed must be an int"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(BAD_CALLS))
def test_bad_input_raises_and_changes_nothing(name, backend):
    make, kwargs, message = BAD_CALLS[name]
    params = make()
    before = [p.clone() if p.device.type != "meta" else p for p in params]
    kwargs = {"coefs": [0.5], "seed": 1, "backend": backend, **kwargs}
    with pytest.raises((ValueError, TypeError), match=message):
        perturb_(params, **kwargs)
    for p, b in zip(params, before):
        if p.device.type != "meta":
            assert torch.equal(p, b)


def test_same_tensor_through_a_view_is_caught():
    t = torch.zeros(10)
    with pytest.raises(ValueError, match="share memory"):
        perturb_([t, t.view(2, 5)], 1.0, 0)


def test_empty_inputs_are_fine():
    perturb_([], 1.0, 0)
    empty = torch.zeros(0)
    perturb_(empty, 1.0, 0)
    assert sample(0, 1).numel() == 0
