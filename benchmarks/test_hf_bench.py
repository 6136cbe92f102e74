"""The Trainer path (zounlearn.hf) against our own loop on the same recipe: steps per second and peak
memory, each path in a fresh process (hf_vs_loop.py), the ratio taken in the same run.

    .venv/bin/python -m pytest benchmarks/test_hf_bench.py --benchmark-only   # conftest prints the table
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.parametrize("path", ["loop", "trainer"])
@pytest.mark.parametrize("optimizer", ["adamw", "adazo", "hybrid"])
def test_trainer_against_our_loop(benchmark, optimizer, path):
    def measure():
        out = subprocess.run([sys.executable, os.path.join(HERE, "hf_vs_loop.py"), path, optimizer], check=True,
                             capture_output=True, text=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    result = benchmark.pedantic(measure, rounds=1, iterations=1)
    benchmark.group = f"Trainer vs loop, {optimizer}"
    benchmark.extra_info.update(table="hf", optimizer=optimizer, path=path, **result)
    assert result["steps_per_second"] > 0
