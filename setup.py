"""Builds zounlearn's C++ CPU extension always and its CUDA extension when it can.

The CPU extension's kernels (csrc/cpu/kernels_isa.cpp) are compiled once per instruction set of
csrc/cpu/isa_flags.json (generic x86-64, AVX2, AVX-512, AVX-512 with BF16) and the torch glue
once, for any x86-64; at run time csrc/cpu/capability.cpp picks the kernels the processor runs
(ZOUNLEARN_CPU_CAPABILITY overrides). Environment: ZOUNLEARN_SKIP_CUDA=1 never builds CUDA;
ZOUNLEARN_FORCE_CUDA=1 builds it even without a visible GPU (needs nvcc and a CUDA build of
torch); TORCH_CUDA_ARCH_LIST and MAX_JOBS are honoured by torch.utils.cpp_extension. Build with
`pip install --no-build-isolation .` so the extension links against the torch you run.
"""

import json
import os
import shutil
import subprocess

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(HERE, "csrc")
# -ffp-contract=off keeps alpha * theta + c * z two roundings, as the reference computes it, on
# every instruction set (no FMA even where -mfma is given).
# -fopenmp: at::parallel_for is an inline OpenMP loop; without it the op runs on one thread.
KERNEL_FLAGS = ["-O3", "-ffp-contract=off", "-fno-math-errno"]
CXX_FLAGS = [*KERNEL_FLAGS, "-fopenmp"]
# --fmad=false: csrc/update_rules.h's expressions compile to separately rounded IEEE operations,
# as the reference computes them (division and sqrtf are IEEE by default: no fast-math, keep
# -prec-div/-prec-sqrt). tests/test_cuda_compile.py compiles the kernels with these flags.
NVCC_FLAGS = ["-O3", "--fmad=false", "-lineinfo"]
CPU_SOURCES = ["module_cpu.cpp", "capability.cpp", "perturb_cpu.cpp", "update_cpu.cpp"]
CPU_KERNELS = os.path.join("csrc", "cpu", "kernels_isa.cpp")  # compiled once per instruction set
with open(os.path.join(CSRC, "cpu", "isa_flags.json")) as _f:
    ISA_FLAGS: dict[str, list[str]] = json.load(_f)
CUDA_SOURCES = ["module_cuda.cpp", "perturb_cuda.cpp", "update_cuda.cpp",
                "perturb_kernel.cu", "zo_update_kernel.cu", "grad_update_kernel.cu"]


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


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
            [os.path.join("csrc", "cpu", f) for f in CPU_SOURCES],
            include_dirs=[CSRC],
            extra_compile_args={"cxx": CXX_FLAGS},
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


class BuildExt(BuildExtension):
    """torch's build, plus the CPU kernels compiled once per instruction set and linked into
    zounlearn._C_cpu (a translation unit per ISA: per-file flags, which an Extension cannot give)."""

    def build_extension(self, ext) -> None:
        if ext.name == "zounlearn._C_cpu":
            ext.extra_objects = [obj for name, flags in ISA_FLAGS.items() for obj in self._compile_isa(name, flags)]
        super().build_extension(ext)

    def _compile_isa(self, name: str, flags: list[str]) -> list[str]:
        objects = self.compiler.compile(
            [CPU_KERNELS],
            output_dir=os.path.join(self.build_temp, f"isa-{name}"),
            macros=[("ZO_CPU_ISA", name)],
            include_dirs=[CSRC],
            extra_postargs=["-std=c++17", *KERNEL_FLAGS, *flags],
            depends=[os.path.join(CSRC, "cpu", f) for f in os.listdir(os.path.join(CSRC, "cpu")) if f.endswith(".h")],
        )
        _check_exports(name, objects)
        return objects


def _check_exports(name: str, objects: list[str]) -> None:
    """A build may export nothing but its table and its own namespace's code: of an inline function
    that every build exports, the linker keeps one copy for all, maybe the AVX-512 one for a
    processor without AVX-512."""
    nm = shutil.which("nm")
    if nm is None:
        print("zounlearn: nm not found; not checking what the CPU kernels export")
        return
    for obj in objects:
        listing = subprocess.run([nm, "-C", "-g", "--defined-only", obj], capture_output=True, text=True, check=True)
        symbols = [line.split(maxsplit=2)[-1] for line in listing.stdout.splitlines() if line.strip()]
        # A name that holds the build's namespace is the build's own, whatever else it holds.
        leaked = [s for s in symbols if s != f"zo::cpu::kernels_{name}()" and f"::isa_{name}::" not in s]
        if leaked:
            raise RuntimeError(f"{CPU_KERNELS} built for {name} exports {', '.join(leaked[:3])}: keep the kernels' "
                               "code in the build's namespace (csrc/cpu/storage.h) or inlined")


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExt.with_options(use_ninja=True)})
