"""The `zounlearn` command line: `info` lists the backends, `demo` runs a perturbation round trip."""

from __future__ import annotations

import argparse
import platform
import sys
import time

import torch

from . import __version__
from .ops import backends, perturb_


def info() -> int:
    print(f"zounlearn {__version__}  torch {torch.__version__}  python {platform.python_version()}")
    print(f"CUDA device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
    print("backends:")
    for name, reason in backends.status().items():
        built = backends.build_info(name) if reason is None else ""
        detail = f" ({built})" if built else ""
        print(f"  {name:<10} {'available' + detail if reason is None else 'unavailable: ' + reason}")
    for device in ("cpu", "cuda"):
        try:
            chosen, _ = backends.select(device)
        except backends.BackendUnavailable as err:
            chosen = f"none ({err})"
        if device == "cpu" or torch.cuda.is_available():
            print(f"default for {device} tensors: {chosen}")
    return 0


def demo(numel: int, seed: int, repeats: int) -> int:
    info()
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
            perturb_(theta, 0.0, seed, dist=dist, backend=name)  # warm-up: threads, caches
            theta.copy_(original)
            start = time.perf_counter()
            for _ in range(repeats):
                for coef in (mu, -2 * mu, mu):
                    perturb_(theta, coef, seed, dist=dist, backend=name)
            if device == "cuda":
                torch.cuda.synchronize()
            seconds = (time.perf_counter() - start) / (3 * repeats)
            gbps = 2 * theta.element_size() * numel / seconds / 1e9
            error = (theta - original).abs().max().item()
            print(f"{name:<10} {dist:<11} {seconds * 1e3:>9.4g} {gbps:>8.3g} {error:>12.1e}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="zounlearn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="which backends can run here, and why not")
    p_demo = sub.add_parser("demo", help="backends plus a timed perturb/restore round trip")
    p_demo.add_argument("--numel", type=int, default=1 << 22, help="parameters to perturb (default 2^22)")
    p_demo.add_argument("--seed", type=int, default=0)
    p_demo.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if args.command == "info":
        return info()
    return demo(args.numel, args.seed, args.repeats)


if __name__ == "__main__":
    sys.exit(main())
