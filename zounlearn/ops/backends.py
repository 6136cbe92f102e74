"""Which kernels run the fused ops, chosen once per device type and registered with the dispatcher.

Order of preference: CPU tensors: cpp, then reference; CUDA tensors: cuda, then triton, then
reference. `ZOUNLEARN_BACKEND=name` forces one backend for every device type; `use(name)` does
the same for a block (tests, benchmarks, the command line's --backend). A backend that was
asked for by name and cannot run raises BackendUnavailable with the reason when an op is
called, never falls back silently; an automatic choice skips what cannot run.

The C++ backends register their kernels for the CPU or CUDA dispatch key from C++, so a call
never re-enters Python; Triton's and the reference's kernels are Python functions registered
the same way. The cpp backend holds its kernels built for several instruction sets and runs the
highest the processor supports; `ZOUNLEARN_CPU_CAPABILITY=generic|avx2|avx512|avx512_bf16`
chooses one for a process, `cpu_capability(name)` for a block.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import torch

from ..errors import BackendUnavailable
from . import library, reference

BACKENDS = ("cpp", "cuda", "triton", "reference")
DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}
PREFERENCE = {"cpu": ("cpp", "reference"), "cuda": ("cuda", "triton", "reference")}
ENV_VAR = "ZOUNLEARN_BACKEND"
CPU_CAPABILITY_ENV_VAR = "ZOUNLEARN_CPU_CAPABILITY"  # read by the cpp backend itself (csrc/cpu/capability.h)
_EXTENSIONS = {"cpp": "_C_cpu", "cuda": "_C_cuda"}
_DEVICES = {"cpp": ("cpu",), "cuda": ("cuda",), "triton": ("cuda", "cpu"), "reference": ("cpu", "cuda")}


def _import_extension(name: str) -> ModuleType:
    try:
        return importlib.import_module(f"zounlearn.{_EXTENSIONS[name]}")
    except ImportError as err:
        raise BackendUnavailable(f"extension zounlearn.{_EXTENSIONS[name]} is not built ({err}); build it with "
                                 "`pip install --no-build-isolation -e .`") from None


@functools.cache
def _why_not(name: str, device_type: str) -> str | None:
    """Why backend `name` cannot run the ops for tensors on device_type here; None when it can."""
    if name not in BACKENDS:
        return f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}"
    if device_type not in _DEVICES[name]:
        usable = ", ".join(n for n in BACKENDS if device_type in _DEVICES[n])
        return f"backend {name!r} cannot run on {device_type} tensors; use one of: {usable}"
    if device_type == "cuda" and not torch.cuda.is_available():
        return "no CUDA device is visible to torch"
    try:
        if name in _EXTENSIONS:
            _import_extension(name)
        elif name == "triton":
            _triton_kernels()
    except BackendUnavailable as err:
        return str(err)
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if name == "triton" and device_type == "cpu" and not interpreted:
        return "Triton runs CPU tensors only in its interpreter: set TRITON_INTERPRET=1 before importing zounlearn"
    if name == "triton" and device_type == "cuda" and interpreted:
        # The interpreter copies a kernel's tensor arguments to the host, not the tensors whose
        # addresses the kernels read from their tables (kernels/tables.py).
        return "Triton's interpreter cannot run CUDA tensors through zounlearn's kernels: unset TRITON_INTERPRET"
    return None


def _triton_kernels() -> ModuleType:
    try:
        import triton  # noqa: F401 -- the clear error, before zounlearn.kernels' own import fails
    except ImportError:
        raise BackendUnavailable("triton is not installed (pip install triton)") from None
    return importlib.import_module("zounlearn.kernels")


class _Registration:
    """One backend's kernels for one dispatch key; remove() takes them off the dispatcher."""

    def __init__(self, name: str, device_type: str) -> None:
        self.name = name
        key = DISPATCH_KEYS[device_type]
        reason = _why_not(name, device_type)
        if reason is None and name in _EXTENSIONS:
            self._handle: Any = _import_extension(name).register_kernels()
            return
        self._handle = torch.library.Library(library.NAMESPACE, "IMPL")
        for op in library.KERNEL_OPS:
            self._handle.impl(op, _unavailable(reason) if reason else _python_kernel(name, op), key)

    def remove(self) -> None:
        if isinstance(self._handle, torch.library.Library):
            self._handle._destroy()
        self._handle = None  # a C++ registration goes with its last reference


def _python_kernel(name: str, op: str) -> Callable[..., None]:
    kernel = getattr(_triton_kernels() if name == "triton" else reference, op)

    def below_autograd(*args: Any) -> None:
        # The reference's in-place torch ops on a parameter must not meet autograd, which the
        # C++ kernels never do; here, not in the public wrappers, so the C++ road pays nothing.
        with torch.no_grad():
            kernel(*args)

    return below_autograd


def _unavailable(reason: str) -> Callable[..., None]:
    def kernel(*args: Any) -> None:
        raise BackendUnavailable(reason)

    return kernel


_active: dict[str, _Registration] = {}


def _choose(device_type: str) -> str:
    requested = os.environ.get(ENV_VAR, "auto") or "auto"
    if requested != "auto":
        return requested
    return next(n for n in PREFERENCE[device_type] if _why_not(n, device_type) is None)


def _activate(device_type: str, name: str) -> None:
    old = _active.pop(device_type, None)
    if old is not None:
        old.remove()
    _active[device_type] = _Registration(name, device_type)


def _device_types() -> list[str]:
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


def active(device_type: str) -> str:
    """The name of the backend that runs the ops for tensors on device_type now."""
    return _active[device_type].name


@contextlib.contextmanager
def use(name: str) -> Iterator[None]:
    """Run the ops with backend `name` inside the block (for every device type; where it cannot
    run, the ops raise BackendUnavailable). Not thread-safe: the dispatcher table is global."""
    if name not in BACKENDS and name != "auto":
        raise BackendUnavailable(_why_not(name, "cpu"))
    previous = {d: r.name for d, r in _active.items()}
    try:
        for device_type in _device_types():
            _activate(device_type, _choose(device_type) if name == "auto" else name)
        yield
    finally:
        for device_type, old in previous.items():
            _activate(device_type, old)


def require(name: str, device_type: str) -> None:
    """Raise BackendUnavailable, with the reason, unless backend `name` can run on device_type."""
    reason = _why_not(name, device_type) if name != "auto" else None
    if reason is not None:
        raise BackendUnavailable(reason)


def status() -> dict[str, str | None]:
    """Backend name -> None when it can run on some device here, else why it cannot."""
    result: dict[str, str | None] = {}
    for name in BACKENDS:
        reasons = [_why_not(name, d) for d in _DEVICES[name]]
        result[name] = None if None in reasons else reasons[0]
    return result


def runs_on(name: str, device_type: str) -> bool:
    """Whether backend `name` can run the ops for tensors on device_type here."""
    return _why_not(name, device_type) is None


def why_not(name: str, device_type: str) -> str | None:
    """Why backend `name` cannot run the ops for tensors on device_type here; None when it can."""
    return _why_not(name, device_type)


def cpu_capabilities() -> dict[str, bool]:
    """The cpp backend's builds of its kernels, lowest instruction set first: name -> whether this
    processor runs it."""
    return dict(_import_extension("cpp").capabilities())


@contextlib.contextmanager
def cpu_capability(name: str) -> Iterator[None]:
    """Run the cpp backend's kernels of build `name` (a key of cpu_capabilities(), or 'auto': the
    highest this processor runs) inside the block, as ZOUNLEARN_CPU_CAPABILITY=name does for a
    whole process. Not thread-safe: the choice is global."""
    extension = _import_extension("cpp")
    previous = extension.capability()
    try:
        extension.set_capability(name)
    except RuntimeError as err:
        raise BackendUnavailable(str(err)) from None
    try:
        yield
    finally:
        extension.set_capability(previous)


def build_info(name: str) -> str:
    """What a compiled backend runs here, e.g. which build of the CPU kernels (instruction set)."""
    if name != "cpp" or not runs_on("cpp", "cpu"):
        return ""
    extension = _import_extension("cpp")
    builds = ", ".join(n for n, runs in extension.capabilities() if runs)
    try:
        chosen = extension.capability()
    except RuntimeError as err:  # a ZOUNLEARN_CPU_CAPABILITY this processor cannot run
        return f"but its ops fail: {err}"
    how = f"{CPU_CAPABILITY_ENV_VAR}" if os.environ.get(CPU_CAPABILITY_ENV_VAR, "auto") not in ("", "auto") else "cpuid"
    return f"CPU kernels: {chosen}, chosen by {how}; this processor runs {builds}"


for _device_type in _device_types():
    _activate(_device_type, _choose(_device_type))
