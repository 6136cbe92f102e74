"""Prints the perturbation table of benchmarks/README.md after a benchmark run: GB/s (bytes read
+ written) per case, and each kernel's ratios to the `add_` ceiling and to the MeZO-style
reference measured in the same run."""

from __future__ import annotations

from collections import defaultdict


def pytest_terminal_summary(terminalreporter, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    cases: dict[str, dict[str, tuple[float, int]]] = defaultdict(dict)
    for bench in session.benchmarks:
        info = bench.extra_info
        if "case" in info:
            cases[info["case"]][info["kind"]] = (bench.stats.median, info["bytes"])
    write = terminalreporter.write_line
    write("")
    write("| case | kernel | median ms | GB/s | x add_ bandwidth | speed-up vs MeZO reference |")
    write("|---|---|---:|---:|---:|---:|")
    for case, kinds in cases.items():
        ceiling = kinds.get("add_ ceiling")
        mezo = kinds.get("MeZO reference")
        for kind, (seconds, nbytes) in kinds.items():
            bw = f"{ceiling[0] / seconds:.2f}" if ceiling else "-"
            speedup = f"{mezo[0] / seconds:.1f}" if mezo else "-"
            write(f"| {case} | {kind} | {seconds * 1e3:.2f} | {nbytes / seconds / 1e9:.2f} | {bw} | {speedup} |")
