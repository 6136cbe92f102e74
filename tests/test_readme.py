"""The README's examples run as written and do what their comments say."""

from __future__ import annotations

import pathlib
import re
import shlex

import torch

from zounlearn.cli import build_parser
from zounlearn.ops import flat_offsets, sample

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _run(heading: str) -> dict:
    code = re.search(rf"## {heading}\s+```python\n(.*?)```", README.read_text(), re.S).group(1)
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)
    return namespace


def test_readme_example_trains_with_both_kinds():
    torch.manual_seed(0)
    ns = _run("Example")
    closure, zo, fo = ns["closure"], ns["zo"], ns["fo"]
    params = list(ns["model"].parameters())  # each optimizer counts each parameter's steps
    assert [zo.state[p]["step"] for p in params] == [300] * len(params)
    assert [fo.state[p]["step"] for p in params] == [1] * len(params)
    torch.manual_seed(0)
    ns_start = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
    start = torch.nn.functional.mse_loss(ns_start(ns["x"]), ns["y"]).item()
    assert closure().item() < 0.1 * start


def test_readme_op_example_is_one_zo_sgd_step():
    torch.manual_seed(0)
    ns = _run("The fused ops")
    model, params, seed, lr, g = (ns[k] for k in ("model", "params", "seed", "lr", "g"))
    torch.manual_seed(0)
    fresh = torch.nn.Linear(512, 512)  # the example's model before its step
    for p, p0, off in zip(params, fresh.parameters(), flat_offsets(params)):
        z = sample(p.shape, seed, offset=off)
        torch.testing.assert_close(p.detach(), p0.detach() - lr * g * z, rtol=0, atol=4e-7)
    assert g != 0


def test_readme_commands_parse():
    """Every `zounlearn ...` line of "Unlearning your model" is a valid command line (flags and values)."""
    block = re.search(r"## Unlearning your model\s+```bash\n(.*?)```", README.read_text(), re.S).group(1)
    lines = [shlex.split(line, comments=True) for line in block.replace("\\\n", " ").splitlines()]
    commands = [words for words in lines if words and words[0] == "zounlearn"]
    assert len(commands) >= 4
    for words in commands:
        build_parser().parse_args(words[1:])
