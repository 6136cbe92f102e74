"""The CUDA kernel compiles with plain nvcc (no torch) and never spills registers.

Runs without a GPU: it only needs nvcc. ptxas -v reports, per compiled function,
"N bytes stack frame, N bytes spill stores, N bytes spill loads"; every one must be 0 spills.
"""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
KERNEL = ROOT / "csrc" / "cuda" / "perturb_kernel.cu"

_PROPS = re.compile(r"Function properties for (\S+)\s*\n\s*(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Compiling entry function '(\S+)' for '(sm_\d+)'.*?Used (\d+) registers", re.S)


def _nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return None


NVCC = _nvcc()


@pytest.mark.nvcc
@pytest.mark.skipif(NVCC is None, reason="nvcc not found on PATH, in $CUDA_HOME/bin or /usr/local/cuda/bin")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_kernel_compiles_without_spills(arch: str, tmp_path: Path) -> None:
    cmd = [NVCC, f"-arch={arch}", "-O3", "-std=c++17", "-Xptxas", "-v", "-I", str(ROOT / "csrc"),
           "-c", str(KERNEL), "-o", str(tmp_path / f"perturb_kernel_{arch}.o")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"nvcc failed:\n{log}"

    props = _PROPS.findall(log)
    assert props, f"ptxas reported no functions:\n{log}"
    regs = {name: int(n) for name, sm, n in _USED.findall(log) if sm == arch}
    spilling = [(name, int(st), int(ld)) for name, _, st, ld in props if int(st) or int(ld)]
    assert not spilling, f"{arch}: register spills (function, stores, loads): {spilling}\n{log}"
    for name, frame, _, _ in props:
        print(f"{arch} {name}: {regs.get(name, '?')} registers, {frame} bytes stack frame, 0 spills")
