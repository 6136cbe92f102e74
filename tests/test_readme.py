"""The README's example runs as written and does what its comments say."""

from __future__ import annotations

import pathlib
import re

import torch

from zounlearn.ops import flat_offsets, sample

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_is_one_zo_sgd_step():
    code = re.search(r"## Example\s+```python\n(.*?)```", README.read_text(), re.S).group(1)
    torch.manual_seed(0)
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)
    model, params, seed, lr, g = (namespace[k] for k in ("model", "params", "seed", "lr", "g"))
    torch.manual_seed(0)
    fresh = torch.nn.Linear(512, 512)  # the example's model before its step
    for p, p0, off in zip(params, fresh.parameters(), flat_offsets(params)):
        z = sample(p.shape, seed, offset=off)
        torch.testing.assert_close(p.detach(), p0.detach() - lr * g * z, rtol=0, atol=4e-7)
    assert g != 0
