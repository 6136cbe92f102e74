"""scripts/gpu_check.py's machinery on the CPU: a stage past its cap is cut off and the next one
still runs, the pytest shards cover every test once and keep a kernel's tests together, and the
summary reports failures and cut-off stages. (CI runs the whole `make gpu-check-dry`.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
sys.path.insert(0, str(SCRIPTS))
import gpu_check  # noqa: E402
from gpu_check_summary import write_summary  # noqa: E402


@pytest.fixture
def dry_env(monkeypatch):
    """What main(["--dry-run"]) sets in os.environ, put back afterwards."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def test_a_stage_past_its_cap_is_killed_and_the_next_still_runs(tmp_path, monkeypatch, dry_env):
    monkeypatch.setattr(gpu_check, "PLAN", [("memory", 6, 6), ("env", 60, 60)])  # memory takes ~20 s here
    code = gpu_check.main(["--dry-run", "--out", str(tmp_path)])
    results = json.loads((tmp_path / "summary.json").read_text())
    assert code == 1 and results["memory"]["status"] == "timeout" and results["memory"]["wall_seconds"] < 11
    assert results["env"]["status"] == "ok" and results["env"]["backends"]["reference"] == "available"
    summary = (tmp_path / "summary.md").read_text()
    assert "| memory | timeout |" in summary and "| env | ok |" in summary


def test_a_dry_run_cut_by_its_budget_is_no_failure(tmp_path, monkeypatch, dry_env):
    """A slow machine's budget is not the script's fault; on the GPU (no --dry-run) it would be."""
    monkeypatch.setattr(gpu_check, "PLAN", [("memory", 60, 60), ("env", 60, 60)])
    monkeypatch.setattr(gpu_check, "DRY_BUDGET", 6)
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "summary.json").read_text())
    assert results["memory"]["status"] == "timeout" and results["memory"]["cut_by_budget"]
    assert results["env"]["status"].startswith("skipped") and results["env"]["cut_by_budget"]
    assert "| memory | timeout (cut by the budget) |" in (tmp_path / "summary.md").read_text()


def test_the_sanitizer_cases_run_every_op_kind(tmp_path, monkeypatch, dry_env):
    """The cases compute-sanitizer runs on the GPU, here on the CPU backends (a wrong call fails)."""
    monkeypatch.setattr(gpu_check, "PLAN", [("sanitizer", 60, 60)])
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "summary.json").read_text())["sanitizer"]
    assert result["status"] == "ok" and any("every op kind" in line for line in result["ran"])


def _collected(tmp_path: Path, shard: str) -> list[str]:
    env = {**os.environ, "PYTHONPATH": str(SCRIPTS), "PYTEST_SHARD_IGNORE": "layout", "PYTEST_SHARD": shard}
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "pytest_shard",
                          "-p", "no:cacheprovider", str(tmp_path / "test_many.py")], capture_output=True, text=True,
                         env=env, cwd=tmp_path, check=True).stdout
    return [line for line in out.splitlines() if "::" in line]


def test_shards_cover_every_test_once_and_keep_groups_together(tmp_path):
    (tmp_path / "test_many.py").write_text(
        "import pytest\n\n"
        "@pytest.mark.parametrize('layout', ['a', 'b', 'c'])\n"
        "@pytest.mark.parametrize('rule', range(7))\n"
        "def test_case(rule, layout):\n    pass\n\n"
        "def test_plain():\n    pass\n")
    shards = [_collected(tmp_path, f"{i}/3") for i in range(3)]
    everything = sum(shards, [])
    assert len(set(everything)) == len(everything) == 22  # 7 x 3 cases and the plain test, each once
    assert all(5 <= len(s) <= 9 for s in shards)  # dealt largest group first to the emptiest shard
    for rule in range(7):  # the three layouts of one rule share a process (and its compiled kernels)
        assert sum(any(f"[{rule}-" in t for t in s) for s in shards) == 1


def test_summary_names_failures_and_cut_off_stages(tmp_path):
    results = {
        "correctness": {"status": "failed", "cap": 75, "wall_seconds": 40.0, "passed": 3, "failed": 1, "errors": 0,
                        "skipped": 0, "shards": 8, "cut_off": [],
                        "failures": [{"test": "tests/test_gpu_paths.py::test_x[cuda]", "message": "12 over tolerance"}],
                        "max_abs_error": {"cuda perturb_ gaussian": {"tests": 4, "max_abs_error": 2.5e-7}}},
        "bandwidth": {"status": "timeout", "cap": 45, "wall_seconds": 45.2, "rows": []},
    }
    text = write_summary(tmp_path, results, dry_run=False)
    assert "- FAILED tests/test_gpu_paths.py::test_x[cuda]: 12 over tolerance" in text
    assert "| bandwidth | timeout | 45.2 | 45 |" in text and "| cuda perturb_ gaussian | 4 | 2.5e-07 |" in text
    assert (tmp_path / "summary.md").read_text().strip() == text.strip()


@pytest.mark.parametrize("argv", [["--only", "nope"]])
def test_unknown_stage_is_refused(argv, capsys, dry_env):
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main(["--dry-run", *argv])
    assert exit_info.value.code == 2 and "unknown stage(s) ['nope']" in capsys.readouterr().err
