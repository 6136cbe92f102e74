"""The CUDA kernels compile with plain nvcc (no torch) and never spill registers.

Runs without a GPU: it only needs nvcc. Every .cu under csrc/cuda is compiled with the nvcc
flags setup.py builds the extension with (plus torch's own), and ptxas -v reports, per
compiled function, "N bytes stack frame, N bytes spill stores, N bytes spill loads"; every one
must be 0 spills, and every kernel instantiation the ops dispatch to must be there.
"""

import ast
import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from zounlearn.ops.rules import RULES

ROOT = Path(__file__).resolve().parent.parent
KERNELS = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))

# torch.utils.cpp_extension.COMMON_NVCC_FLAGS: the half/bfloat16 operator switches change the code.
TORCH_NVCC_FLAGS = [
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
    "--expt-relaxed-constexpr",
]

# Every instantiation of multi_tensor_kernel<Op>, as ptxas names them demangled.
DTYPES = ("float", "__nv_bfloat16", "__half")
DISTS = ("(zo::Dist)0", "(zo::Dist)1")
# From the rule registry: zo_update_ is instantiated for the zeroth-order rules only.
ZO_RULES = tuple(f"(zo::Rule){r.index}" for r, info in RULES.items() if info.zeroth_order)
ALL_RULES = tuple(f"(zo::Rule){r.index}" for r in RULES)
# State types per rule: float, and __nv_bfloat16 (the lean state) for the rules that keep state.
STATES = {f"(zo::Rule){r.index}": ("float", "__nv_bfloat16") if info.reads_m or info.reads_v else ("float",)
          for r, info in RULES.items()}
EXPECTED = {
    "perturb_kernel.cu": {("Perturb", t, d) for t in DTYPES for d in DISTS},
    "zo_update_kernel.cu": {("ZoUpdate", t, d, r, s) for t in DTYPES for d in DISTS for r in ZO_RULES
                            for s in STATES[r]},
    "grad_update_kernel.cu": {("GradUpdate", t, r, s) for t in DTYPES for r in ALL_RULES for s in STATES[r]},
}

_ENTRY = re.compile(
    r"Compiling entry function '(\S+)' for '(sm_\d+)'\s*\n.*?Function properties for \1\s*\n"
    r"\s*(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads\s*\n"
    r".*?Used (\d+) registers",
    re.S,
)
_PROPS = re.compile(
    r"Function properties for (\S+)\s*\n\s*(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads"
)
_OP = re.compile(r"multi_tensor_kernel<zo::\(anonymous namespace\)::(\w+)<([^<>]*)> >")


def _nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return None


NVCC = _nvcc()


def _setup_nvcc_flags() -> list[str]:
    """NVCC_FLAGS = [...] of setup.py, read without running it."""
    for node in ast.parse((ROOT / "setup.py").read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "NVCC_FLAGS" for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py defines no NVCC_FLAGS list")


def _demangle(names: list[str]) -> list[str]:
    cxxfilt = shutil.which("c++filt")
    if cxxfilt is None:
        pytest.skip("c++filt not found (binutils)")
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return out.splitlines()


def _compile(arch: str, kernel: Path, out: Path) -> str:
    # -cubin: device code only; the host half of the build is the extension's business.
    cmd = [NVCC, f"-arch={arch}", "-std=c++17", *_setup_nvcc_flags(), *TORCH_NVCC_FLAGS, "-Xptxas", "-v",
           "-I", str(ROOT / "csrc"), "-cubin", str(kernel), "-o", str(out / f"{kernel.stem}_{arch}.cubin")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"nvcc failed on {kernel.name}:\n{log}"
    return log


def test_setup_disables_fma_contraction() -> None:
    # update_rules.h relies on it: every + - * of the rules is one IEEE rounding, as the reference.
    flags = _setup_nvcc_flags()
    assert "--fmad=false" in flags and not any(f.startswith("--use_fast_math") for f in flags), flags


@pytest.mark.nvcc
@pytest.mark.skipif(NVCC is None, reason="nvcc not found on PATH, in $CUDA_HOME/bin or /usr/local/cuda/bin")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_kernels_compile_without_spills(arch: str, tmp_path: Path) -> None:
    assert {k.name for k in KERNELS} == set(EXPECTED), "a new .cu file needs its kernels listed in EXPECTED"
    with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
        logs = dict(zip(KERNELS, pool.map(lambda k: _compile(arch, k, tmp_path), KERNELS)))

    for kernel, log in logs.items():
        props = _PROPS.findall(log)
        assert props, f"ptxas reported no functions for {kernel.name}:\n{log}"
        spilling = [(name, int(st), int(ld)) for name, _, st, ld in props if int(st) or int(ld)]
        assert not spilling, f"{arch} {kernel.name}: register spills (function, stores, loads): {spilling}\n{log}"

        entries = [e for e in _ENTRY.findall(log) if e[1] == arch]
        names = _demangle([e[0] for e in entries])
        found = set()
        for demangled, (_, _, frame, _, _, regs) in zip(names, entries):
            op = _OP.search(demangled)
            assert op, f"unexpected kernel {demangled}"
            key = (op.group(1), *(a.strip() for a in op.group(2).split(",")))
            found.add(key)
            print(f"{arch} {' '.join(key)}: {regs} registers, {frame} bytes stack frame, 0 spills")
        assert len(entries) == len(found), f"{kernel.name}: duplicate kernels"
        assert found == EXPECTED[kernel.name], (
            f"{kernel.name}: missing {sorted(EXPECTED[kernel.name] - found)}, "
            f"unexpected {sorted(found - EXPECTED[kernel.name])}"
        )
