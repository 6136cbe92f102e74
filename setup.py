"""Builds zounlearn's C++ CPU extension always and its CUDA extension when it can.

Environment: ZOUNLEARN_CPU_ARCH=generic builds the CPU op for any x86-64 (default: AVX2/FMA/F16C
when the building machine has them, as source-built extensions usually are run where they
were built; `native` passes -march=native); ZOUNLEARN_SKIP_CUDA=1 never builds CUDA; ZOUNLEARN_FORCE_CUDA=1 builds it
even without a visible GPU (needs nvcc and a CUDA build of torch); TORCH_CUDA_ARCH_LIST
and MAX_JOBS are honoured by torch.utils.cpp_extension. Build with
`pip install --no-build-isolation .` so the extension links against the torch you run.
"""

import os
import shutil

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(HERE, "csrc")
# -ffp-contract=off keeps alpha * theta + c * z two roundings, as the reference computes it.
# -fopenmp: at::parallel_for is an inline OpenMP loop; without it the op runs on one thread.
CXX_FLAGS = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-fopenmp"]
# --fmad=false: csrc/update_rules.h's expressions compile to separately rounded IEEE operations,
# as the reference computes them (division and sqrtf are IEEE by default: no fast-math, keep
# -prec-div/-prec-sqrt). tests/test_cuda_compile.py compiles the kernels with these flags.
NVCC_FLAGS = ["-O3", "--fmad=false", "-lineinfo"]
CUDA_SOURCES = ["module_cuda.cpp", "perturb_cuda.cpp", "update_cuda.cpp",
                "perturb_kernel.cu", "zo_update_kernel.cu", "grad_update_kernel.cu"]


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _cpu_arch_flags() -> list[str]:
    arch = os.environ.get("ZOUNLEARN_CPU_ARCH", "auto")
    if arch == "generic":
        return []
    if arch == "native":
        return ["-march=native"]
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        flags = []
    return ["-mavx2", "-mfma", "-mf16c"] if {"avx2", "fma", "f16c"} <= set(flags) else []


def _cuda_wanted() -> tuple[bool, str]:
    if _flag("ZOUNLEARN_SKIP_CUDA"):
        return False, "ZOUNLEARN_SKIP_CUDA is set"
    if torch.version.cuda is None:
        return False, "torch is a CPU build"
    nvcc = shutil.which("nvcc") or (CUDA_HOME and os.path.join(CUDA_HOME, "bin", "nvcc"))
    if not nvcc or not os.path.exists(nvcc):
        return False, "nvcc not found (set CUDA_HOME)"
    if not (torch.cuda.is_available() or _flag("ZOUNLEARN_FORCE_CUDA") or os.environ.get("TORCH_CUDA_ARCH_LIST")):
        return False, "no GPU visible; set TORCH_CUDA_ARCH_LIST or ZOUNLEARN_FORCE_CUDA=1"
    return True, ""


def extensions() -> list:
    exts = [
        CppExtension(
            "zounlearn._C_cpu",
            [os.path.join("csrc", "cpu", f) for f in ("module_cpu.cpp", "perturb_cpu.cpp", "update_cpu.cpp")],
            include_dirs=[CSRC],
            extra_compile_args={"cxx": CXX_FLAGS + _cpu_arch_flags()},
            extra_link_args=["-fopenmp"],
        )
    ]
    wanted, why = _cuda_wanted()
    if wanted:
        if not torch.cuda.is_available():
            os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        exts.append(
            CUDAExtension(
                "zounlearn._C_cuda",
                [os.path.join("csrc", "cuda", f) for f in CUDA_SOURCES],
                include_dirs=[CSRC],
                extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS},
            )
        )
    else:
        print(f"zounlearn: not building the CUDA extension: {why}")
    return exts


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)})
