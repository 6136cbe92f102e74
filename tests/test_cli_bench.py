"""`zounlearn bench` on the CPU: the tables, the JSON file, and every bad input as one line, exit 2."""

from __future__ import annotations

import json

import pytest
import torch

from zounlearn.bench import calls, passes
from zounlearn.cli import main


def test_bench_prints_and_saves_every_pass_and_the_step(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--model", "tiny", "--rounds", "1", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    expected = ["torch add_", "torch copy_"] + [p.name for p in passes.fused_passes()] * len(result["backends"])
    assert [r["kind"] for r in result["passes"]] == expected
    assert [r["kind"] for r in result["steps"]][0] == "MeZO loop" and len(result["steps"]) == 3
    assert result["device"] == "cpu" and result["dtype"] == "float32" and result["layers"] == 2
    assert result["backends"] == [b for b in calls.runnable("cpu") if b != "triton"] or ["reference"]
    for row in result["passes"] + result["steps"]:
        assert row["kind"] in printed and row["ms"] > 0
    assert "speed-up vs MeZO loop" in printed and str(out) in printed


@pytest.mark.parametrize(("argv", "message"), [
    (["--layers", "3"], "tiny has 2 layers"),
    (["--layers", "0"], "tiny has 2 layers"),
    (["--rounds", "0"], "--rounds must be an integer >= 1"),
    (["--backends", "cuda"], "'cuda' cannot run here"),
    (["--backends", "nope"], "'nope' cannot run here"),
    (["--device", "tpu"], "unknown --device 'tpu'; use cpu, cuda or cuda:N"),
    (["--device", "meta"], "--device meta: only cpu and cuda"),
    (["--device", "cuda:0"], "sees no CUDA GPU"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, argv, message):
    if "cuda" in " ".join(argv) and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    out = tmp_path / "bench.json"
    assert main(["bench", "--model", "tiny", "--output", str(out), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not out.exists()
