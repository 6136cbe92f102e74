"""The README's examples run as written and do what their comments say."""

from __future__ import annotations

import pathlib
import re
import shlex

import pytest
import torch
from commands import environment, run

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


def _table(text: str) -> dict[str, tuple[float, float, float]]:
    """metric -> (before, after, change) from a `metric before after change` table."""
    rows = {}
    for line in text.splitlines():
        words = line.split()
        if len(words) == 4:
            try:
                rows[words[0]] = tuple(map(float, words[1:]))
            except ValueError:  # the header, or a line that is not a row
                continue
    return rows


def _machine() -> str:
    """This machine as the README names its own: the CPU, torch's kernels for it, torch's version."""
    cpuinfo = pathlib.Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
             if line.startswith("model name")] if cpuinfo.exists() else []
    cpu = names[0] if names else "unknown CPU"
    return f"{cpu} (torch's {torch.backends.cpu.get_cpu_capability()} kernels) with torch {torch.__version__}"


@pytest.mark.slow
def test_readme_demo_table_is_what_the_demo_prints(embedded_cache, tmp_path):
    """The demo as `make demo` runs it: the README's bounds on any machine, its table row for row on its own."""
    text = README.read_text()
    shown = _table(re.search(r"```\n(metric +before +after +change\n.*?)```", text, re.S).group(1))
    machine = re.search(r"These numbers are from an? (.+?), about", " ".join(text.split())).group(1)
    out = run(["demo", "--no-progress", "--output", str(tmp_path / "demo")], tmp_path, environment(embedded_cache))
    assert out.returncode == 0, out.stderr[-3000:]
    printed = _table(out.stdout)
    assert printed["forget/qa_accuracy"][0] >= 0.9 and printed["retain/qa_accuracy"][0] >= 0.9
    assert printed["forget/qa_accuracy"][1] <= 0.2 and printed["retain/qa_accuracy"][1] >= 0.6
    assert printed["mia_min_k"][1] < printed["mia_min_k"][0]
    if _machine() == machine:
        assert {key: printed[key] for key in shown} == shown, "update the README's demo table from this run"


def test_study_help_states_the_time_docs_study_measured():
    """`zounlearn study --help` quotes the full study's time from docs/study/study.md, rounded to minutes."""
    parser = next(a for a in build_parser()._subparsers._group_actions).choices["study"]
    claimed = re.search(r"(\d+) min for the full study", " ".join(parser.description.split())).group(1)
    study_md = (README.parent / "docs" / "study" / "study.md").read_text()
    measured = float(re.search(r"Command: `zounlearn study[^`]*` \((\d+(?:\.\d+)?) min on", study_md).group(1))
    assert int(claimed) == round(measured), f"study --help says {claimed} min, docs/study/study.md {measured} min"
