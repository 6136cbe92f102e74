"""Prints the tables of benchmarks/README.md after a benchmark run, each ratio taken against a
baseline measured in the same run: the perturbation pass (GB/s, x the `add_` ceiling, speed-up
vs the MeZO-style reference), the ZO-SGD step (speed-up vs MeZO's loop) and the peak memory of
one step (x inference, and the excess as a share of the parameter bytes), and the Trainer path
against our own loop (steps per second and the memory each adds)."""

from __future__ import annotations

from collections import defaultdict


def _perturb_table(write, benches) -> None:
    cases: dict[str, dict[str, tuple[float, int]]] = defaultdict(dict)
    for bench in benches:
        info = bench.extra_info
        cases[info["case"]][info["kind"]] = (bench.stats.median, info["bytes"])
    write("| case | kernel | median ms | GB/s | x add_ bandwidth | speed-up vs MeZO reference |")
    write("|---|---|---:|---:|---:|---:|")
    for case, kinds in cases.items():
        ceiling = kinds.get("add_ ceiling")
        mezo = kinds.get("MeZO reference")
        for kind, (seconds, nbytes) in kinds.items():
            bw = f"{ceiling[0] / seconds:.2f}" if ceiling else "-"
            speedup = f"{mezo[0] / seconds:.1f}" if mezo else "-"
            write(f"| {case} | {kind} | {seconds * 1e3:.2f} | {nbytes / seconds / 1e9:.2f} | {bw} | {speedup} |")


def _step_table(write, benches) -> None:
    cases: dict[str, dict[str, float]] = defaultdict(dict)
    for bench in benches:
        cases[bench.extra_info["case"]][bench.extra_info["kind"]] = bench.stats.median
    write("| case | implementation | median ms | speed-up vs MeZO reference |")
    write("|---|---|---:|---:|")
    for case, kinds in cases.items():
        mezo = kinds.get("MeZO reference")
        for kind, seconds in kinds.items():
            write(f"| {case} | {kind} | {seconds * 1e3:.1f} | {f'{mezo / seconds:.1f}' if mezo else '-'} |")


def _memory_table(write, benches) -> None:
    rows = {b.extra_info["kind"]: b.extra_info for b in benches}
    base = rows.get("inference")
    write("| step | peak MiB | x inference | excess over inference, % of parameter bytes |")
    write("|---|---:|---:|---:|")
    for kind, info in rows.items():
        peak = info["peak_bytes"]
        ratio = f"{peak / base['peak_bytes']:.3f}" if base else "-"
        excess = f"{100 * (peak - base['peak_bytes']) / info['param_bytes']:.2f}" if base else "-"
        write(f"| {kind} | {peak / 2**20:.0f} | {ratio} | {excess} |")


def _hf_table(write, benches) -> None:
    rows: dict[str, dict[str, dict]] = defaultdict(dict)
    for bench in benches:
        rows[bench.extra_info["optimizer"]][bench.extra_info["path"]] = bench.extra_info
    write("| optimizer | loop steps/s | Trainer steps/s | Trainer / loop speed | loop added MiB | Trainer added MiB |")
    write("|---|---:|---:|---:|---:|---:|")
    for name, paths in rows.items():
        loop, trainer = paths.get("loop"), paths.get("trainer")
        if loop and trainer:
            write(f"| {name} | {loop['steps_per_second']:.2f} | {trainer['steps_per_second']:.2f} | "
                  f"{trainer['steps_per_second'] / loop['steps_per_second']:.2f} | {loop['added_bytes'] / 2**20:.0f} | "
                  f"{trainer['added_bytes'] / 2**20:.0f} |")


TABLES = {"perturb": _perturb_table, "step": _step_table, "memory": _memory_table, "hf": _hf_table}


def pytest_terminal_summary(terminalreporter, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    by_table = defaultdict(list)
    for bench in session.benchmarks:
        by_table[bench.extra_info["table"]].append(bench)
    for name, benches in by_table.items():
        terminalreporter.write_line("")
        TABLES[name](terminalreporter.write_line, benches)
