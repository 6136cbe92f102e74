"""`zounlearn info`: which backends can run here and why not; with --timing, a timed
perturbation round trip on each (the parameters must come back to within rounding)."""

from __future__ import annotations

import argparse
import platform
import time

import torch

from .. import __version__
from ..checks import check_int
from ..ops import backends, perturb_


def info() -> int:
    print(f"zounlearn {__version__}  torch {torch.__version__}  python {platform.python_version()}")
    print(f"CUDA device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
    print("backends:")
    for name, reason in backends.status().items():
        built = backends.build_info(name) if reason is None else ""
        detail = f" ({built})" if built else ""
        print(f"  {name:<10} {'available' + detail if reason is None else 'unavailable: ' + reason}")
    for device in ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",):
        chosen = backends.active(device)
        why = backends.why_not(chosen, device)
        print(f"default for {device} tensors: {chosen}" + (f" (cannot run: {why})" if why else ""))
    return 0


def roundtrip(numel: int, seed: int, repeats: int) -> int:
    """Time a +mu z, -2 mu z, +mu z perturbation round trip on every backend that runs here."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    theta = torch.randn(numel, generator=torch.Generator().manual_seed(seed)).to(device)
    original = theta.clone()
    mu = 1e-3
    print(f"\nround trip on {numel:,} float32 parameters ({device}): +mu z, -2mu z, +mu z with mu = {mu}")
    print(f"{'backend':<10} {'dist':<11} {'ms/pass':>9} {'GB/s':>8} {'max |error|':>12}")
    for name, reason in backends.status().items():
        if reason is not None or not backends.runs_on(name, device):
            continue
        for dist in ("rademacher", "gaussian"):
            with backends.use(name):
                perturb_(theta, 0.0, seed, dist=dist)  # warm-up: threads, caches
                theta.copy_(original)
                start = time.perf_counter()
                for _ in range(repeats):
                    for coef in (mu, -2 * mu, mu):
                        perturb_(theta, coef, seed, dist=dist)
            if device == "cuda":
                torch.cuda.synchronize()
            seconds = (time.perf_counter() - start) / (3 * repeats)
            gbps = 2 * theta.element_size() * numel / seconds / 1e9
            error = (theta - original).abs().max().item()
            print(f"{name:<10} {dist:<11} {seconds * 1e3:>9.4g} {gbps:>8.3g} {error:>12.1e}")
    return 0


def run_info(args: argparse.Namespace) -> int:
    check_int("--numel", args.numel, 1)
    check_int("--repeats", args.repeats, 1)
    check_int("--seed", args.seed, 0)
    status = info()
    return roundtrip(args.numel, args.seed, args.repeats) if args.timing else status
