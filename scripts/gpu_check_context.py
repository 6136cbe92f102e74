"""What the stages of `make gpu-check` share: where things are, the sizes of a full and a dry run
(docs/gpu-check.md says how each was chosen from the review's H200 model), a stage's context, and
running a command with a timeout into a log."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"


@dataclass(frozen=True)
class Sizes:
    device: str
    backends: tuple[str, ...]
    flat_log2: int  # one tensor of 2^flat_log2 elements
    list_model: str  # a model's parameter list (zounlearn.bench.models.MODELS)
    hf_model: str  # a causal LM built from a config (HF_CONFIGS)
    batch: tuple[int, int]  # sequences x tokens
    memory_dtype: str
    rounds: int
    shards: int  # pytest and compile processes at once
    flat_dtypes: tuple[str, ...]
    interpreter: bool  # Triton in its interpreter (~0.2 s a launch): the smallest case and one pass of each op
    selection: dict  # stage -> extra pytest arguments


# 12 processes on 16 cores: Triton compiles in the process that launches, ptxas beside it.
FULL = Sizes("cuda", ("cuda", "triton"), 28, "llama-7b", "tinyllama-1.1b", (8, 512), "bfloat16", 5,
             min(12, max(1, (os.cpu_count() or 2) - 4)), ("float32", "bfloat16"), False, {})
DRY = Sizes("cpu", ("cpp", "triton"), 12, "tiny", "tiny", (2, 32), "float32", 1, 2, ("float32",), True,
            {"gpu-paths": ("-k", "perturb_"),
             "tests": ("-k", "opcheck or hand_formula or known_answers or mezo_step_by_hand or empty_inputs")})


@dataclass
class Context:
    out: Path  # this stage's folder
    dry_run: bool
    deadline: float  # time.monotonic() by which the stage must have written its result

    @property
    def sizes(self) -> Sizes:
        return DRY if self.dry_run else FULL

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def save(self, result: dict) -> None:
        from zounlearn.atomic import write_json

        write_json(self.out / "result.json", result)


def run_logged(cmd: list[str], log: Path, timeout: float, env: dict | None = None) -> tuple[int | None, str]:
    """(exit status or None when cut off at timeout, the output's tail), the output also in log."""
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True)
        try:
            code = proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = None
    return code, log.read_text(errors="replace")[-3000:]


