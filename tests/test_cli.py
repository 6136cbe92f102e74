"""The command line's `info`, run as a user would (the unlearning commands: test_cli_unlearn.py)."""

from __future__ import annotations

import re
import subprocess
import sys

from zounlearn.ops import backends


def run(*args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "zounlearn", *args], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_info_lists_every_backend_with_a_reason():
    text = run("info")
    for name, why in backends.status().items():
        line = next(line for line in text.splitlines() if line.strip().startswith(name + " "))
        assert ("available" in line) and (why is None or "unavailable: " in line)
    assert re.search(r"default for cpu tensors: (cpp|reference)", text)


def test_info_timing_round_trip_restores_parameters():
    text = run("info", "--timing", "--numel", "100000", "--repeats", "1")
    rows = [r for r in map(str.split, text.splitlines()) if len(r) == 5 and r[1] in ("rademacher", "gaussian")]
    assert {(r[0], r[1]) for r in rows} >= {("reference", "rademacher"), ("reference", "gaussian")}
    for row in rows:
        assert float(row[2]) > 0 and float(row[3]) > 0
        # +mu, -2mu, +mu with mu = 1e-3 on N(0, 1) values: a few float32 roundings, never a lost step
        assert float(row[4]) < 1e-5


def test_bad_command_exits_nonzero():
    out = subprocess.run([sys.executable, "-m", "zounlearn", "frobnicate"], capture_output=True, text=True)
    assert out.returncode == 2 and "invalid choice" in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_import_without_extensions_falls_back_to_reference():
    """A missing extension never breaks `import zounlearn`: info says why, the op still runs."""
    code = (
        "import sys; sys.modules['zounlearn._C_cpu'] = None; sys.modules['zounlearn._C_cuda'] = None\n"
        "import torch, zounlearn\n"
        "from zounlearn.ops import backends\n"
        "assert 'not built' in backends.status()['cpp'], backends.status()\n"
        "assert backends.active('cpu') == 'reference'\n"
        "x = torch.zeros(300); zounlearn.perturb_(x, 1.0, 5, alpha=0.0)\n"
        "assert torch.equal(x, zounlearn.rng.sample(5, 0, 0, 300))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
