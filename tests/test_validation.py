"""Bad input raises an error that names the tensor and the problem, and changes nothing."""

from __future__ import annotations

import pytest
import torch
from conftest import BACKENDS

from zounlearn.errors import BackendUnavailable
from zounlearn.ops import backends, perturb_, sample


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
    "overlapping views": (lambda: _overlapping(), {}, r"params\[1\] and params\[0\] share memory"),
    "unknown dist": (lambda: [good()], dict(dist="uniform"), r"dist must be one of"),
    "float seed": (lambda: [good()], dict(seed=1.5), r"seed must be an int"),
    "NaN coefficient": (lambda: [good()], dict(coefs=[0.5, float("nan")]), r"coefs\[1\] must be finite"),
    "inf coefficient": (lambda: [good()], dict(coefs=[float("-inf")]), r"coefs\[0\] must be finite"),
    "inf alpha": (lambda: [good()], dict(alpha=float("inf")), r"alpha must be finite"),
}


def _overlapping() -> list[torch.Tensor]:
    """Two views of one buffer that share 3 elements: each would be perturbed twice."""
    buffer = torch.arange(10, dtype=torch.float32)
    return [buffer[:6], buffer[3:]]


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("name", list(BAD_CALLS))
def test_bad_input_raises_and_changes_nothing(name, backend):
    make, kwargs, message = BAD_CALLS[name]
    params = make()
    before = [p.clone() if p.device.type != "meta" else p for p in params]
    kwargs = {"coefs": [0.5], "seed": 1, **kwargs}
    with pytest.raises((ValueError, TypeError), match=message):
        perturb_(params, **kwargs)
    for p, b in zip(params, before):
        if p.device.type != "meta":
            assert torch.equal(p, b)


def test_unknown_backend_is_named():
    with pytest.raises(BackendUnavailable, match="unknown backend 'opencl'"):
        with backends.use("opencl"):
            pass
    with pytest.raises(BackendUnavailable, match="unknown backend 'opencl'"):
        backends.require("opencl", "cpu")


def test_adjacent_views_are_not_overlapping():
    buffer = torch.zeros(10)
    perturb_([buffer[:5], buffer[5:]], 1.0, 0, offsets=[0, 5])
    assert torch.equal(buffer, sample(10, 0))


def test_same_tensor_through_a_view_is_caught():
    t = torch.zeros(10)
    with pytest.raises(ValueError, match="share memory"):
        perturb_([t, t.view(2, 5)], 1.0, 0)


def test_empty_inputs_are_fine():
    perturb_([], 1.0, 0)
    empty = torch.zeros(0)
    perturb_(empty, 1.0, 0)
    assert sample(0, 1).numel() == 0
