"""Which implementation of the fused op runs, and why the others cannot.

Order of preference per device: CPU: cpp, reference; CUDA: cuda, triton, reference.
`ZOUNLEARN_BACKEND` or the per-call `backend=` argument picks one by name; a
backend that was asked for by name and cannot run raises, it never falls back silently.
"""

from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Callable

import torch

from . import reference
from ..rng import DISTRIBUTIONS

PerturbFn = Callable[..., None]
BACKENDS = ("cpp", "cuda", "triton", "reference")
PREFERENCE = {"cpu": ("cpp", "reference"), "cuda": ("cuda", "triton", "reference")}
ENV_VAR = "ZOUNLEARN_BACKEND"


class BackendUnavailable(RuntimeError):
    pass


def _extension(module: str) -> PerturbFn:
    try:
        ext = importlib.import_module(f"zounlearn.{module}")
    except ImportError as err:
        raise BackendUnavailable(
            f"extension zounlearn.{module} is not built ({err}); build it with "
            "`pip install --no-build-isolation -e .`"
        ) from None

    def run(params, offsets, alpha, coefs, streams, seed, dist):
        ext.perturb_(list(params), list(offsets), alpha, list(coefs), list(streams), seed, DISTRIBUTIONS.index(dist))

    return run


def _load_cpp() -> PerturbFn:
    return _extension("_C_cpu")


def _load_cuda() -> PerturbFn:
    if not torch.cuda.is_available():
        raise BackendUnavailable("no CUDA device is visible to torch")
    return _extension("_C_cuda")


def _load_triton() -> PerturbFn:
    try:
        import triton  # noqa: F401
    except ImportError:
        raise BackendUnavailable("triton is not installed (pip install triton)") from None
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        raise BackendUnavailable("no CUDA device (set TRITON_INTERPRET=1 to run Triton's interpreter on the CPU)")
    from zounlearn.kernels.perturb import perturb_

    return perturb_


_LOADERS: dict[str, Callable[[], PerturbFn]] = {
    "cpp": _load_cpp,
    "cuda": _load_cuda,
    "triton": _load_triton,
    "reference": lambda: reference.perturb_,
}
_DEVICES = {"cpp": ("cpu",), "cuda": ("cuda",), "triton": ("cuda", "cpu"), "reference": None}


def runs_on(name: str, device_type: str) -> bool:
    """Whether backend `name` can handle tensors on device_type at all (available or not)."""
    devices = _DEVICES[name]
    return devices is None or device_type in devices


@functools.cache
def load(name: str) -> PerturbFn:
    """The named backend's perturb function; raises BackendUnavailable with the reason."""
    return _LOADERS[name]()


def build_info(name: str) -> str:
    """What a compiled backend was built for, e.g. the CPU op's instruction set."""
    if name == "cpp":
        return f"built for {importlib.import_module('zounlearn._C_cpu').isa}"
    return ""


def status() -> dict[str, str | None]:
    """Backend name -> None when it can run here, else the reason it cannot."""
    result: dict[str, str | None] = {}
    for name in BACKENDS:
        try:
            load(name)
            result[name] = None
        except BackendUnavailable as err:
            result[name] = str(err)
    return result


def select(device_type: str, requested: str | None = None) -> tuple[str, PerturbFn]:
    """(name, function) of the backend that runs the op for tensors on device_type."""
    if requested in (None, "auto"):
        requested = os.environ.get(ENV_VAR) or "auto"
    if requested != "auto":
        if requested not in BACKENDS:
            raise ValueError(f"unknown backend {requested!r}; choose one of {BACKENDS} or 'auto'")
        if not runs_on(requested, device_type):
            hint = ", ".join(n for n in BACKENDS if runs_on(n, device_type))
            raise BackendUnavailable(f"backend {requested!r} cannot run on {device_type} tensors; use one of: {hint}")
        return requested, load(requested)
    for name in PREFERENCE.get(device_type, ("reference",)):
        try:
            return name, load(name)
        except BackendUnavailable:
            continue
    raise AssertionError("the reference backend is always available")
