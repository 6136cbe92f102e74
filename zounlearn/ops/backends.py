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
from typing import NamedTuple

import torch

from ..errors import BackendUnavailable
from ..rng import DISTRIBUTIONS
from . import reference

BACKENDS = ("cpp", "cuda", "triton", "reference")
PREFERENCE = {"cpu": ("cpp", "reference"), "cuda": ("cuda", "triton", "reference")}
ENV_VAR = "ZOUNLEARN_BACKEND"


class Kernels(NamedTuple):
    """One backend's implementation of every op, with the Python-level signatures of
    zounlearn.ops.reference (dist as a name)."""

    perturb_: Callable[..., None]
    zo_update_: Callable[..., None]
    grad_update_: Callable[..., None]


def _extension(module: str) -> Kernels:
    try:
        ext = importlib.import_module(f"zounlearn.{module}")
    except ImportError as err:
        raise BackendUnavailable(
            f"extension zounlearn.{module} is not built ({err}); build it with "
            "`pip install --no-build-isolation -e .`"
        ) from None

    def perturb_(params, offsets, alpha, coefs, streams, seed, dist):
        ext.perturb_(params, offsets, alpha, coefs, streams, seed, DISTRIBUTIONS.index(dist))

    def zo_update_(params, m, v, offsets, coefs, streams, seed, dist, restore, rule, hyper):
        ext.zo_update_(params, m, v, offsets, coefs, streams, seed, DISTRIBUTIONS.index(dist), restore, rule, hyper)

    return Kernels(perturb_, zo_update_, ext.grad_update_)


def _load_cpp() -> Kernels:
    return _extension("_C_cpu")


def _load_cuda() -> Kernels:
    if not torch.cuda.is_available():
        raise BackendUnavailable("no CUDA device is visible to torch")
    return _extension("_C_cuda")


def _load_triton() -> Kernels:
    try:
        import triton  # noqa: F401
    except ImportError:
        raise BackendUnavailable("triton is not installed (pip install triton)") from None
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        raise BackendUnavailable("no CUDA device (set TRITON_INTERPRET=1 to run Triton's interpreter on the CPU)")
    from zounlearn.kernels import grad_update_, perturb_, zo_update_

    return Kernels(perturb_, zo_update_, grad_update_)


_LOADERS: dict[str, Callable[[], Kernels]] = {
    "cpp": _load_cpp,
    "cuda": _load_cuda,
    "triton": _load_triton,
    "reference": lambda: Kernels(reference.perturb_, reference.zo_update_, reference.grad_update_),
}
_DEVICES = {"cpp": ("cpu",), "cuda": ("cuda",), "triton": ("cuda", "cpu"), "reference": None}


def runs_on(name: str, device_type: str) -> bool:
    """Whether backend `name` can handle tensors on device_type at all (available or not)."""
    devices = _DEVICES[name]
    return devices is None or device_type in devices


@functools.cache
def load(name: str) -> Kernels:
    """The named backend's kernels; raises BackendUnavailable with the reason."""
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


def select(device_type: str, requested: str | None = None) -> tuple[str, Kernels]:
    """(name, kernels) of the backend that runs the ops for tensors on device_type."""
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
