"""The scripts in examples/ run as a user runs them, under `accelerate launch` (one process, the CPU):
the Trainer path and our own loop, on the small embedded model saved as a Hugging Face directory
with its data as JSONL files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--cpu",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


def _run(script: str, small_files, output: Path, *extra: str) -> str:
    forget = [p for p in small_files["forget"] if p.endswith("qa.jsonl") or p.endswith("text.jsonl")]
    retain = [p for p in small_files["retain"] if p.endswith("qa.jsonl") or p.endswith("text.jsonl")]
    command = [*ACCELERATE, str(EXAMPLES / script), "--model", small_files["model"], "--forget", *forget,
               "--retain", *retain, "--output", str(output), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env, cwd=output.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_trainer_example_under_accelerate(small_files, tmp_path):
    out = _run("trainer_unlearn.py", small_files, tmp_path / "run", "--steps", "4")
    assert "forget/loss" in out and "retain/qa_accuracy" in out
    state = json.loads((tmp_path / "run" / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and (tmp_path / "run" / "checkpoint-2" / "optimizer.pt").is_file()


def test_lora_example_in_our_loop_under_accelerate(small_files, tmp_path):
    out = _run("lora_unlearn.py", small_files, tmp_path / "run", "--steps", "3")
    assert "4-bit:" in out and "trainable params" in out
    run = tmp_path / "run"
    assert (run / "model" / "adapter_model.safetensors").is_file() and (run / "merged" / "model.safetensors").is_file()
    assert json.loads((run / "report.json").read_text())["summary"]["steps"] == 3
