"""Per-call overhead of the ops and the cost of a whole ZO-SGD step, this checkout against another
one (an older commit, say), each measured in fresh processes that alternate, so that both see the
same machine load; prints the medians and this checkout's ratio to the other's.

    git worktree add /tmp/old <commit> && (cd /tmp/old && python setup.py build_ext --inplace)
    .venv/bin/python benchmarks/overhead_vs_commit.py /tmp/old [--rounds 5]

What is timed (CPU, the default backend; both checkouts take the same public calls):
    call-1     zounlearn.ops.perturb_ on one 4-element tensor (validation + dispatch + kernel)
    call-300   the same on 300 tensors of 4 elements
    zo-step    ZOSGD.step with a constant loss on GPT-2 small's parameter list (124 M float32
               parameters in 148 tensors): the optimizer's own work, three passes
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
import torch
from zounlearn import optim
from zounlearn.ops import perturb_
torch.manual_seed(0)

def per_call(fn, calls):
    for _ in range(50):
        fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls

one = [torch.zeros(4)]
many = [torch.zeros(4) for _ in range(300)]
offsets = list(range(0, 1200, 4))
D = 768
block = [(D,), (D,), (D, 3 * D), (3 * D,), (D, D), (D,), (D,), (D,), (D, 4 * D), (4 * D,), (4 * D, D), (D,)]
params = [torch.nn.Parameter(torch.randn(s) * 0.02) for s in [(50257, D), (1024, D)] + block * 12 + [(D,), (D,)]]
opt = optim.ZOSGD(params, lr=1e-6, mu=1e-3)
print(json.dumps({
    "call-1": per_call(lambda: perturb_(one, 1e-3, 0, offsets=[0]), 4000),
    "call-300": per_call(lambda: perturb_(many, 1e-3, 0, offsets=offsets), 400),
    "zo-step": per_call(lambda: opt.step(lambda: 1.0), 5),
}))
"""


def measure(root: str) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", CHILD, root], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("other", help="the other checkout (its extension built in place)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating measurements of each (default 5)")
    args = parser.parse_args()
    this = os.path.dirname(HERE)
    runs: dict[str, list[dict[str, float]]] = {"this": [], "other": []}
    for _ in range(args.rounds):
        runs["other"].append(measure(args.other))
        runs["this"].append(measure(this))
    print(f"{'what':<10} {'other':>12} {'this':>12} {'this / other':>13}   (medians of {args.rounds} processes)")
    for key in runs["this"][0]:
        other = statistics.median(r[key] for r in runs["other"])
        mine = statistics.median(r[key] for r in runs["this"])
        unit, scale = ("ms", 1e3) if key == "zo-step" else ("us", 1e6)
        print(f"{key:<10} {other * scale:>9.1f} {unit} {mine * scale:>9.1f} {unit} {mine / other:>13.2f}")


if __name__ == "__main__":
    main()
